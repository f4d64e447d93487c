"""The robot's contract: a reader process sees whole rows while a writer inserts, never writes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flows_testkit import wait_for

from flows.errors import StoreError
from flows.prompting.templates import RenderedPrompt
from flows.store.generations import record_generation, save_generation_state, save_prompt
from flows.store.robot import connect_readonly, read_forecasts

READER = r"""
import json, sys
from pathlib import Path
from flows.store.robot import read_forecasts

database, ready, done, out = map(Path, sys.argv[1:5])
reads, most, errors = 0, 0, []
ready.write_text("reading")
while True:
    finished = done.exists()
    try:
        rows = read_forecasts(database)
    except Exception as exc:
        errors.append(repr(exc))
        rows = []
    for row in rows:
        complete = row.forecast == ("прогноз " + row.prompt_key + " ") * 200
        if not complete or row.new_tokens != 3 or row.ticker != "SBER" or row.news_count != 2:
            errors.append("partial row " + row.prompt_key)
    if len(rows) < most:
        errors.append("rows went backwards")
    most, reads = max(most, len(rows)), reads + 1
    if finished:
        break
out.write_text(json.dumps({"reads": reads, "rows": most, "errors": errors[:5]}))
"""


def prompt(key: str) -> RenderedPrompt:
    return RenderedPrompt(
        key=key,
        template_name="ticker_outlook_ru",
        template_version=1,
        template_hash="h" * 64,
        language="ru",
        scope="ticker",
        ticker="SBER",
        as_of="2024-05-14",
        text="prompt",
        token_count=1,
        max_new_tokens=8,
        sampling={},
        item_keys=("k1", "k2"),
        items_dropped=0,
    )


def generate(store, key: str) -> None:
    record_generation(
        store,
        key,
        text=("прогноз " + key + " ") * 200,
        token_ids=[1, 2, 3],
        prompt_tokens=1,
        finish_reason="length",
        model_manifest_hash="m" * 64,
        timings_s={"total_s": 0.1},
    )


def test_reader_process_sees_only_whole_rows_while_writer_inserts(store, tmp_path: Path):
    count = 150
    keys = [f"p{index:04d}" for index in range(count)]
    for key in keys:
        save_prompt(store, prompt(key))
    database = store.engine.url.database
    ready, done, out = tmp_path / "ready", tmp_path / "done", tmp_path / "out.json"
    script = tmp_path / "reader.py"
    script.write_text(READER, encoding="utf-8")
    reader = subprocess.Popen([sys.executable, str(script), database, ready, done, out])
    try:
        wait_for(ready.exists, timeout_s=120)  # a hang guard: a busy CI box starts Python slowly
        for key in keys:
            save_generation_state(store, key, [1, 2])  # more write traffic, as a real run has
            generate(store, key)
        done.write_text("done")
        assert reader.wait(timeout=120) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
    result = json.loads(out.read_text())
    assert result["errors"] == []
    assert result["reads"] > 1
    assert result["rows"] == count


def test_reader_never_waits_for_an_open_write_transaction(store):
    save_prompt(store, prompt("a"))
    generate(store, "a")
    save_prompt(store, prompt("b"))
    generate(store, "b")
    database = store.engine.url.database
    # Another connection holds the write lock with an uncommitted change in progress.
    writer = sqlite3.connect(database, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE prompts SET status = 'failed' WHERE key = 'a'")
    started = time.monotonic()
    rows = read_forecasts(database)
    assert time.monotonic() - started < 1.0
    assert sorted(row.prompt_key for row in rows) == ["a", "b"]  # the last committed state
    writer.execute("ROLLBACK")
    writer.close()


def test_reader_cannot_write(store):
    save_prompt(store, prompt("a"))
    generate(store, "a")
    connection = connect_readonly(store.engine.url.database)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        connection.execute("DELETE FROM generations")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        connection.execute("CREATE TABLE robot_notes (x)")
    connection.close()
    assert len(read_forecasts(store.engine.url.database)) == 1


def test_reader_errors_are_clear(tmp_path: Path):
    with pytest.raises(StoreError, match=r"database not found: .*yalm-forecast ingest"):
        read_forecasts(tmp_path / "missing.sqlite")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).close()
    with pytest.raises(StoreError, match="cannot read forecasts_v1: no such table"):
        read_forecasts(other)
