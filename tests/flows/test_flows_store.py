"""The store: migrations, the prompt queue, idempotent results, and resume state."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

import pytest
import yaml
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from flows_testkit import sample

from flows.errors import StoreError
from flows.prompting.rendering import render_prompts
from flows.prompting.templates import RenderedPrompt
from flows.sources.ingest import ingest_feeds
from flows.store.database import list_news, open_store
from flows.store.generations import (
    load_generation_state,
    mark_prompt_failed,
    pending_prompts,
    prompt_status,
    record_generation,
    retry_failed_prompts,
    save_generation_state,
    save_prompt,
)
from flows.store.models import Base, Feed
from flows.store.robot import COLUMNS, VIEW, read_forecasts


def make_prompt(key: str, *, ticker: str | None = "SBER", template: str = "t") -> RenderedPrompt:
    return RenderedPrompt(
        key=key,
        template_name=template,
        template_version=1,
        template_hash="h" * 64,
        language="ru",
        scope="ticker",
        ticker=ticker,
        as_of="2024-05-14",
        text=f"prompt {key}",
        token_count=3,
        max_new_tokens=16,
        sampling={"temperature": 0.7, "max_new_tokens": 16},
        item_keys=("k1", "k2"),
        items_dropped=0,
    )


def finish(store, key: str, text: str = "рост", **extra) -> int:
    arguments = {
        "text": text,
        "token_ids": [5, 6, 7],
        "prompt_tokens": 3,
        "finish_reason": "eos",
        "model_manifest_hash": "m" * 64,
        "timings_s": {"prefill_s": 0.5, "decode_s": 1.5},
        "tokens_per_s": 2.0,
        **extra,
    }
    return record_generation(store, key, **arguments)


def test_migrations_match_the_models(store):
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert compare_metadata(context, Base.metadata) == []


def test_store_uses_wal_busy_timeout_and_foreign_keys(store):
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_reopening_is_a_no_op(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with open_store(url) as first:
        save_prompt(first, make_prompt("a"))
    with open_store(url) as second:
        assert [prompt.key for prompt in pending_prompts(second)] == ["a"]


def test_view_has_the_documented_columns(store):
    with store.engine.connect() as connection:
        columns = [row[1] for row in connection.exec_driver_sql(f"PRAGMA table_info({VIEW})")]
    assert tuple(columns) == COLUMNS


def test_prompt_queue_and_idempotent_generation(store):
    assert save_prompt(store, make_prompt("a"))
    assert not save_prompt(store, make_prompt("a"))  # same key: nothing new
    save_prompt(store, make_prompt("b", template="other"))
    assert [prompt.key for prompt in pending_prompts(store)] == ["a", "b"]
    assert [prompt.key for prompt in pending_prompts(store, template="other")] == ["b"]
    assert pending_prompts(store, limit=1)[0].sampling == {"temperature": 0.7, "max_new_tokens": 16}

    first = finish(store, "a")
    second = finish(store, "a", text="something else")
    assert first == second
    assert prompt_status(store, "a") == "done"
    assert [prompt.key for prompt in pending_prompts(store)] == ["b"]
    forecasts = read_forecasts(store.engine.url.database)
    assert len(forecasts) == 1
    row = forecasts[0]
    assert (row.forecast, row.ticker, row.template, row.news_count, row.new_tokens) == (
        "рост",
        "SBER",
        "t",
        2,
        3,
    )
    assert row.model_hash == "m" * 64


def test_generation_provenance_is_kept(store):
    save_prompt(store, make_prompt("a"))
    finish(store, "a", code_version="test-1", run_id=None)
    with sqlite3.connect(store.engine.url.database) as connection:
        row = connection.execute(
            "SELECT template_name, template_version, template_hash, sampling_json, timings_json,"
            " tokens_per_s, code_version, model_manifest_hash FROM generations"
        ).fetchone()
    assert row == (
        "t",
        1,
        "h" * 64,
        '{"max_new_tokens":16,"temperature":0.7}',
        '{"decode_s":1.5,"prefill_s":0.5}',
        2.0,
        "test-1",
        "m" * 64,
    )


def test_generation_state_saved_replaced_and_cleared(store):
    save_prompt(store, make_prompt("a"))
    assert load_generation_state(store, "a") is None
    save_generation_state(store, "a", [1, 2])
    save_generation_state(store, "a", [1, 2, 3, 4])
    assert load_generation_state(store, "a") == [1, 2, 3, 4]
    finish(store, "a")
    assert load_generation_state(store, "a") is None
    with pytest.raises(StoreError, match="no prompt with key 'zzz'"):
        save_generation_state(store, "zzz", [1])


def test_failed_prompts_leave_the_queue_and_can_come_back(store):
    save_prompt(store, make_prompt("a"))
    mark_prompt_failed(store, "a", "CUDA out of memory")
    assert pending_prompts(store) == [] and prompt_status(store, "a") == "failed"
    assert retry_failed_prompts(store) == 1
    assert [prompt.key for prompt in pending_prompts(store)] == ["a"]
    with pytest.raises(StoreError, match="no prompt with key 'nope'"):
        finish(store, "nope")


def test_a_failed_transaction_writes_nothing(store):
    save_prompt(store, make_prompt("a"))
    with pytest.raises(StoreError), store.transaction() as session:
        session.add(Feed(name="x", url="http://x"))
        session.flush()
        session.add(Feed(name="x", url="http://y"))  # unique name: the whole transaction fails
        session.flush()
    with store.reading() as session:
        assert session.query(Feed).count() == 0
    assert [prompt.key for prompt in pending_prompts(store)] == ["a"]


def test_robot_filters(store):
    for key, ticker, template in [("a", "SBER", "t"), ("b", "GAZP", "t"), ("c", None, "brief")]:
        save_prompt(store, make_prompt(key, ticker=ticker, template=template))
        finish(store, key)
    database = store.engine.url.database
    assert {row.prompt_key for row in read_forecasts(database, ticker="SBER")} == {"a"}
    assert {row.prompt_key for row in read_forecasts(database, template="brief")} == {"c"}
    assert len(read_forecasts(database, since=datetime(2000, 1, 1, tzinfo=timezone.utc))) == 3
    assert read_forecasts(database, since="2999-01-01") == []
    assert len(read_forecasts(database, limit=2)) == 2


def test_rendering_is_idempotent_and_skips_tickers_without_news(
    feed_server, make_config, store, count_tokens
):
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    feed_server.add("/atom", body=sample("global_markets_en.atom.xml"))
    config = make_config(
        feeds=[{"name": n, "url": feed_server.url(f"/{n}")} for n in ("rss", "atom")],
        templates=["ticker_outlook_ru", "ticker_outlook_en", "morning_brief_ru"],
    )
    ingest_feeds(config, store)
    as_of = datetime(2024, 5, 14, 6, 0, tzinfo=timezone.utc)
    first = render_prompts(config, store, count_tokens=count_tokens, as_of=as_of)
    second = render_prompts(config, store, count_tokens=count_tokens, as_of=as_of)

    by_ticker = {(o.template, o.ticker): o for o in first}
    assert by_ticker[("ticker_outlook_ru", "SBER")].status == "new"
    assert by_ticker[("ticker_outlook_ru", "YDEX")].status == "new"
    assert by_ticker[("morning_brief_ru", None)].items_used == 8  # 16 h window: 4 + 4 items
    assert {o.status for o in second if o.prompt_key} == {"existing"}
    assert [o.prompt_key for o in first] == [o.prompt_key for o in second]
    queued = pending_prompts(store)
    assert len(queued) == sum(o.status == "new" for o in first)
    english = next(
        p for p in queued if p.template_name == "ticker_outlook_en" and p.ticker == "AAPL"
    )
    assert "Company: Apple (ticker AAPL)" in english.text
    assert english.token_count + english.max_new_tokens <= 1024
    assert english.sampling["temperature"] == 0.6  # the template's own setting
    # News from before the window is not used: nothing on AAPL a week later.
    later = render_prompts(
        config, store, count_tokens=count_tokens, as_of=datetime(2024, 5, 21, tzinfo=timezone.utc)
    )
    assert {o.status for o in later} == {"skipped"}
    assert len(list_news(store)) == 9


def test_a_broken_template_fails_its_own_prompts_only_with_the_cause(
    feed_server, tmp_path, make_config, store, count_tokens
):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    good_body = "{{ as_of }}\n{% for item in items %}- {{ item.title }}\n{% endfor %}"
    for name, body in (("good", good_body), ("bad", "{{ as_of }} {{ foo }}")):
        document = {"name": name, "version": 1, "language": "ru", "scope": "market", "body": body}
        (prompts / f"{name}.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    config = make_config(
        feeds=[{"name": "rss", "url": feed_server.url("/rss")}],
        prompts_dir="prompts",
        templates=["good", "bad"],
    )
    ingest_feeds(config, store)
    as_of = datetime(2024, 5, 14, 6, 0, tzinfo=timezone.utc)
    outcomes = render_prompts(config, store, count_tokens=count_tokens, as_of=as_of)
    assert [(each.template, each.status) for each in outcomes] == [
        ("good", "new"),
        ("bad", "failed"),
    ]
    assert outcomes[1].error == "template 'bad' body line 1: 'foo' is undefined"
    assert outcomes[1].template_version == 1
    assert [prompt.template_name for prompt in pending_prompts(store)] == ["good"]
    assert len(list_news(store)) == 5
