"""Rendering the configured templates over stored news into pending prompts.

Glue between ``flows.prompting.templates`` and the store: picks each template's news items (time
window,
sources, ticker, maximum count), builds the template context, fits it to the model's positions,
keys the result by a hash of everything that went into it, and saves it as pending. Re-rendering
the same inputs finds the same key and adds nothing. A template's signal is rendered beside the
prompt (the question after it, and after the content-free prompt: the body with no news items)
and queued for scoring with it. Token counting is a function the caller
passes in (the CLI gives the real YaLM tokenizer); this module never imports the model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from flows.config import PipelineConfig, TemplateSelection, WatchlistEntry
from flows.errors import PipelineConfigError, PipelineError, TemplateError
from flows.prompting.templates import PromptTemplate, RenderedPrompt, fit_to_budget, load_template
from flows.store.database import Store, finish_run, list_news, start_run, utc_now
from flows.store.generations import prompt_status, save_prompt

_CYRILLIC = re.compile(r"[а-яё]", re.IGNORECASE)


@dataclass(frozen=True)
class RenderOutcome:
    template: str
    ticker: str | None
    status: str  # new | existing (still pending) | done (generated before) | skipped | failed
    prompt_key: str | None
    token_count: int
    items_used: int
    items_dropped: int
    template_version: int | None = None
    error: str | None = None  # why it failed: the template, the variable, the line


# A news item for checking a template before any news is stored (preflight, an empty night).
SAMPLE_ITEM = {
    "key": "sample",
    "title": "Sample headline",
    "summary": "A sample news item, used to check that the template renders.",
    "source": "sample",
    "link": "https://example.invalid/sample",
    "published_at": "2024-05-01T06:00:00Z",
    "tickers": [],
}


def sample_context(
    config: PipelineConfig, template: PromptTemplate, as_of: datetime | None = None
) -> dict[str, Any]:
    """What a template is rendered with, built from the watchlist and one sample item."""
    as_of = as_of or utc_now()
    entry = config.watchlist[0] if config.watchlist and template.scope == "ticker" else None
    context = _context(config, template, entry, as_of=as_of, theses="")
    return {**context, "items": [{**SAMPLE_ITEM, "tickers": [entry.ticker] if entry else []}]}


def check_template(config: PipelineConfig, selection: TemplateSelection) -> PromptTemplate:
    """Load the template ``selection`` names and render it against a sample context; raises
    ``TemplateError`` naming the template (and the variable, the line) when it cannot."""
    template = load_template(config.prompts_dir / f"{selection.name}.yaml")
    effective_sampling(config, template, selection)
    template.render(sample_context(config, template))
    return template


def _failed(name: str, version: int | None, ticker: str | None, error: str) -> RenderOutcome:
    return RenderOutcome(name, ticker, "failed", None, 0, 0, 0, version, error)


def read_theses(config: PipelineConfig) -> str:
    if config.theses is None:
        return ""
    try:
        return config.theses.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineConfigError(f"theses: cannot read {config.theses}: {exc}") from exc


def render_prompts(
    config: PipelineConfig,
    store: Store,
    *,
    count_tokens: Callable[[str], int],
    as_of: datetime | None = None,
    run_id: int | None = None,
) -> list[RenderOutcome]:
    """Render every configured template (per ticker or market-wide) and queue the prompts.

    A template that cannot be loaded or rendered fails alone: its prompts come back as
    ``failed`` outcomes with the cause (checked against a sample context first, so that a
    broken template is found even on a night without news), and the others are rendered.
    """
    as_of = as_of or utc_now()
    theses = read_theses(config)
    outcomes = []
    for selection in config.templates:
        template = None
        try:
            template = load_template(config.prompts_dir / f"{selection.name}.yaml")
            template.render(sample_context(config, template, as_of))
        except TemplateError as exc:
            version = template.version if template is not None else None
            outcomes.append(_failed(selection.name, version, None, str(exc)))
            continue
        sampling = effective_sampling(config, template, selection)
        targets = config.watchlist if template.scope == "ticker" else (None,)
        for entry in targets:
            try:
                outcome = render_one(
                    config,
                    store,
                    template,
                    sampling,
                    entry,
                    as_of=as_of,
                    theses=theses,
                    count_tokens=count_tokens,
                    run_id=run_id,
                )
            except TemplateError as exc:
                ticker = entry.ticker if entry else None
                outcome = _failed(template.name, template.version, ticker, str(exc))
            outcomes.append(outcome)
    return outcomes


def render_run(
    config: PipelineConfig,
    store: Store,
    *,
    count_tokens: Callable[[str], int],
    as_of: datetime | None = None,
) -> list[RenderOutcome]:
    """``render_prompts`` recorded as a ``render`` run (failed, with the reason, if it fails)."""
    run_id = start_run(store, "render")
    try:
        outcomes = render_prompts(
            config, store, count_tokens=count_tokens, as_of=as_of, run_id=run_id
        )
    except PipelineError as exc:
        finish_run(store, run_id, "failed", {"error": str(exc)})
        raise
    failed = [asdict(outcome) for outcome in outcomes if outcome.status == "failed"]
    details = {"prompts": len(outcomes), "failed": failed}
    finish_run(store, run_id, "partial" if failed else "ok", details)
    return outcomes


def effective_sampling(
    config: PipelineConfig, template: PromptTemplate, selection: TemplateSelection
) -> dict[str, Any]:
    """Config defaults, overridden by the template, overridden by the config's per-template."""
    return {**config.generation.sampling(), **template.generation, **selection.generation}


def render_one(
    config: PipelineConfig,
    store: Store,
    template: PromptTemplate,
    sampling: Mapping[str, Any],
    entry: WatchlistEntry | None,
    *,
    as_of: datetime,
    theses: str,
    count_tokens: Callable[[str], int],
    run_id: int | None = None,
) -> RenderOutcome:
    ticker = entry.ticker if entry else None
    selection = template.items
    news = list_news(
        store,
        since=as_of - timedelta(hours=selection.window_h),
        until=as_of,
        source=list(selection.sources) or None,
        ticker=ticker,
        limit=selection.max_items,
        text_only=True,
    )
    if not news:
        return RenderOutcome(template.name, ticker, "skipped", None, 0, 0, 0)
    items = [_item_context(row, selection.max_summary_chars) for row in reversed(news)]
    context = _context(config, template, entry, as_of=as_of, theses=theses)
    max_new_tokens = int(sampling["max_new_tokens"])
    fit = functools.partial(
        fit_to_budget,
        template,
        context,
        items,
        count_tokens=count_tokens,
        max_positions=config.generation.max_positions,
    )
    # The scored prompt (body, question, longest answer) must fit the positions too: keep room
    # for it when it is longer than the forecast's new tokens. A signal that cannot fit at all
    # fails alone when it is scored; the forecast is still made.
    reserve = max_new_tokens
    if template.signal is not None:
        question = template.signal_prefix("", {**context, "items": []})
        longest = max(count_tokens(answer) for answer in template.signal.answers.values())
        reserve = max(reserve, count_tokens(question) + longest)
    try:
        fitted = fit(max_new_tokens=reserve)
    except TemplateError:
        if reserve == max_new_tokens:
            raise
        fitted = fit(max_new_tokens=max_new_tokens)
    key_inputs = {
        "template": [template.name, template.version, template.template_hash],
        "context": {**context, "items": list(fitted.items_used)},
        "sampling": dict(sorted(sampling.items())),
        "max_positions": config.generation.max_positions,
    }
    signal = None
    if template.signal is not None:
        used, empty = {**context, "items": list(fitted.items_used)}, {**context, "items": []}
        signal = {
            "prefix": template.signal_prefix(fitted.text, used),
            # Calibration's content-free prompt: the same template with no news items.
            "content_free_prefix": template.signal_prefix(template.render(empty), empty),
            "answers": dict(template.signal.answers),
        }
    encoded = json.dumps(key_inputs, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    prompt = RenderedPrompt(
        key=hashlib.sha256(encoded.encode("utf-8")).hexdigest(),
        template_name=template.name,
        template_version=template.version,
        template_hash=template.template_hash,
        language=template.language,
        scope=template.scope,
        ticker=ticker,
        as_of=context["as_of"],
        text=fitted.text,
        token_count=fitted.token_count,
        max_new_tokens=max_new_tokens,
        sampling=dict(sampling),
        item_keys=tuple(item["key"] for item in fitted.items_used),
        items_dropped=fitted.items_dropped,
        signal=signal,
    )
    is_new = save_prompt(store, prompt, run_id=run_id)
    status = (
        "new" if is_new else ("done" if prompt_status(store, prompt.key) == "done" else "existing")
    )
    return RenderOutcome(
        template.name,
        ticker,
        status,
        prompt.key,
        fitted.token_count,
        len(fitted.items_used),
        fitted.items_dropped,
        template.version,
    )


def _context(
    config: PipelineConfig,
    template: PromptTemplate,
    entry: WatchlistEntry | None,
    *,
    as_of: datetime,
    theses: str,
) -> dict[str, Any]:
    return {
        "as_of": as_of.astimezone(ZoneInfo(config.schedule.timezone)).date().isoformat(),
        "language": template.language,
        "theses": theses,
        "watchlist": [_ticker_context(item, template.language) for item in config.watchlist],
        **({"ticker": _ticker_context(entry, template.language)} if entry else {}),
    }


def _ticker_context(entry: WatchlistEntry, language: str) -> dict[str, Any]:
    """``name`` is the first alias written in the template's script (Cyrillic for ru)."""
    cyrillic = language == "ru"
    in_script = [alias for alias in entry.aliases if bool(_CYRILLIC.search(alias)) == cyrillic]
    name = (in_script or list(entry.aliases) or [entry.ticker])[0]
    return {"symbol": entry.ticker, "name": name, "aliases": list(entry.aliases)}


def _item_context(row: Mapping[str, Any], max_summary_chars: int) -> dict[str, Any]:
    summary = row["summary"]
    if len(summary) > max_summary_chars:
        summary = summary[: max_summary_chars - 1].rstrip() + "…"
    return {
        "key": row["dedup_key"],
        "title": row["title"],
        "summary": summary,
        "source": row["source"],
        "link": row["link"] or "",
        "published_at": row["published_at"],
        "tickers": list(row["tickers"]),
    }


def outcome_rows(outcomes: list[RenderOutcome]) -> list[dict[str, Any]]:
    return [asdict(outcome) for outcome in outcomes]
