"""Templates: deterministic, strict about variables, sandboxed, and cut to the model's budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.config import BUNDLED_PROMPTS_DIR
from flows.errors import TemplateError
from flows.prompting.templates import fit_to_budget, load_template, parse_template

BODY = """Новости {{ ticker.symbol }} на {{ as_of }}:
{% for item in items %}
- {{ item.title }}
{% endfor %}
Прогноз:"""


def make_template(body: str = BODY, **fields) -> object:
    document = {"name": "t", "version": 1, "language": "ru", "body": body, **fields}
    return parse_template(document, raw_text=yaml.safe_dump(document, allow_unicode=True))


def context(**extra):
    return {"ticker": {"symbol": "SBER", "name": "Сбербанк"}, "as_of": "2024-05-14", **extra}


def items(count: int, words: int = 3) -> list[dict]:
    return [
        {"title": f"Новость номер {index}: " + " ".join(["Сбербанк отчитался"] * words)}
        for index in range(count)
    ]


def test_rendering_is_deterministic():
    template = make_template()
    first = template.render(context(items=items(5)))
    assert first == make_template().render(context(items=items(5)))
    assert first.startswith("Новости SBER на 2024-05-14:\n- Новость номер 0")
    assert first.endswith("Прогноз:\n")


def test_missing_variable_is_a_clear_error():
    with pytest.raises(TemplateError, match=r"template 't' body line 1: 'as_of' is undefined"):
        make_template().render({"ticker": {"symbol": "SBER"}, "items": []})


def test_feed_text_with_template_syntax_stays_literal():
    hostile = [{"title": "{{ 7 * 7 }} {% for x in range(3) %}loop{% endfor %} {{ config }}"}]
    text = make_template().render(context(items=hostile))
    assert "- {{ 7 * 7 }} {% for x in range(3) %}loop{% endfor %} {{ config }}" in text
    assert "49" not in text


def test_sandbox_refuses_unsafe_attributes():
    template = make_template("{{ ticker.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError, match="template 't'"):
        template.render(context(items=[]))


def test_syntax_error_names_the_file_and_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text(
        "name: broken\nversion: 1\nlanguage: en\nbody: |\n  ok\n  {% for x in items %}\n"
    )
    with pytest.raises(TemplateError, match=r"broken.yaml: body line \d+"):
        load_template(path)


def test_bad_template_fields_are_named(tmp_path: Path):
    with pytest.raises(TemplateError, match="version: expected an integer version"):
        make_template(version="one")
    with pytest.raises(TemplateError, match="unknown key 'temperature'"):
        make_template(temperature=0.5)
    with pytest.raises(TemplateError, match=r"items\.max_items"):
        make_template(items={"max_items": 0})
    path = tmp_path / "other.yaml"
    path.write_text("name: t\nversion: 1\nlanguage: en\nbody: x\n")
    with pytest.raises(TemplateError, match="must match the file name 'other'"):
        load_template(path)


def test_oversized_context_trimmed_to_budget_dropping_oldest(count_tokens):
    template = make_template()
    news = items(300, words=6)
    fitted = fit_to_budget(template, context(), news, count_tokens=count_tokens, max_new_tokens=200)
    assert fitted.token_count == count_tokens(fitted.text)
    assert fitted.token_count + 200 <= 1024
    assert 0 < len(fitted.items_used) < 300
    assert fitted.items_dropped == 300 - len(fitted.items_used)
    assert list(fitted.items_used) == news[-len(fitted.items_used) :]  # the newest are kept
    assert "Новость номер 299" in fitted.text and "Новость номер 0:" not in fitted.text
    # It keeps as many as fit: one more item would overflow the budget.
    one_more = news[-len(fitted.items_used) - 1 :]
    assert count_tokens(template.render(context(items=one_more))) + 200 > 1024


def test_small_context_is_not_trimmed(count_tokens):
    fitted = fit_to_budget(
        make_template(), context(), items(3), count_tokens=count_tokens, max_new_tokens=200
    )
    assert fitted.items_dropped == 0 and len(fitted.items_used) == 3


def test_template_too_long_even_without_items_is_a_clear_error(count_tokens):
    template = make_template("{{ theses }}\n" + BODY)
    with pytest.raises(TemplateError, match="even without news items, over the budget of 824"):
        fit_to_budget(
            template,
            context(theses="Тезис. " * 2000),
            items(3),
            count_tokens=count_tokens,
            max_new_tokens=200,
        )


@pytest.mark.parametrize("name", ["ticker_outlook_ru", "ticker_outlook_en", "morning_brief_ru"])
def test_bundled_templates_render(name: str, count_tokens):
    template = load_template(BUNDLED_PROMPTS_DIR / f"{name}.yaml")
    entry = {"symbol": "SBER", "name": "Сбербанк", "aliases": ["Сбербанк"]}
    news = [
        {
            "title": "Сбербанк увеличил прибыль",
            "summary": "Прибыль выросла на 7%.",
            "source": "markets",
            "link": "",
            "published_at": "2024-05-14T02:30:00Z",
            "tickers": ["SBER"],
        }
    ]
    ctx = {"as_of": "2024-05-14", "language": template.language, "watchlist": [entry]}
    ctx.update(theses="Ставка останется высокой.", ticker=entry)
    fitted = fit_to_budget(
        template,
        ctx,
        news,
        count_tokens=count_tokens,
        max_new_tokens=template.generation["max_new_tokens"],
    )
    assert "Сбербанк увеличил прибыль" in fitted.text
    assert "Ставка останется высокой." in fitted.text
    assert "2024-05-14" in fitted.text
