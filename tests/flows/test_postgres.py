"""The store on a real PostgreSQL server: migrations, the robot's view, claims, real workers.

One server for the session (``postgres_server`` in conftest, started from the distribution's
package), one fresh database per test. The workers are real subprocesses
(``claim_worker.py``) whose "model" is a deterministic function of the prompt text; what is
under test is the database side: claiming, resume state, exactly-once recording.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from claim_worker import forecast_text, target_ids
from flows_testkit import wait_for
from sqlalchemy import text

from flows.errors import StoreError
from flows.prompting.templates import RenderedPrompt
from flows.store.claims import (
    claim_prompts,
    claimed_keys,
    expire_claims,
    record_claimed_generation,
    release_claims,
    renew_claims,
)
from flows.store.database import _alembic_config, open_store
from flows.store.generations import (
    load_generation_state,
    mark_prompt_failed,
    pending_prompts,
    record_generation,
    save_prompt,
)
from flows.store.models import Base
from flows.store.robot import COLUMNS, VIEW, connect_readonly, read_forecasts

WORKER = Path(__file__).resolve().parent / "claim_worker.py"
T0 = datetime(2024, 5, 14, 3, 0, tzinfo=timezone.utc)


@pytest.fixture
def pg_url(postgres_server):
    return postgres_server.create_database()


@pytest.fixture
def pg_store(pg_url):
    with open_store(pg_url) as store:
        yield store


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_server").create_database()
    with open_store(url) as store:
        yield store


def make_prompt(key: str, *, ticker: str | None = "SBER", template: str = "t", items=2):
    return RenderedPrompt(
        key=key,
        template_name=template,
        template_version=3,
        template_hash="h" * 64,
        language="ru",
        scope="ticker" if ticker else "market",
        ticker=ticker,
        as_of="2024-05-14",
        text=f"Прогноз по {ticker or 'рынку'}: {key}",
        token_count=7,
        max_new_tokens=8,
        sampling={"temperature": 0.7},
        item_keys=tuple(f"item{index}" for index in range(items)),
        items_dropped=0,
    )


def finish(store, key: str, text_: str = "рост") -> int:
    return record_generation(
        store,
        key,
        text=text_,
        token_ids=[5, 6, 7],
        prompt_tokens=7,
        finish_reason="eos",
        model_manifest_hash="m" * 64,
        timings_s={"total_s": 1.0},
    )


def scalar(store, sql: str):
    with store.engine.connect() as connection:
        return connection.execute(text(sql)).scalar()


# ---- schema ----------------------------------------------------------------------------------


def test_migrations_upgrade_on_postgres_and_match_the_models(pg_url):
    with open_store(pg_url) as store:
        assert store.dialect == "postgresql"
        with store.engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            version = connection.exec_driver_sql("SELECT version_num FROM alembic_version")
            assert (
                version.scalar()
                == ScriptDirectory.from_config(_alembic_config()).get_current_head()
            )
            columns = connection.exec_driver_sql(
                "SELECT column_name FROM information_schema.columns"
                f" WHERE table_name = '{VIEW}' ORDER BY ordinal_position"
            )
            assert tuple(columns.scalars()) == COLUMNS
    with open_store(pg_url) as again:  # reopening: nothing to apply
        assert scalar(again, "SELECT count(*) FROM alembic_version") == 1


def test_robot_view_returns_the_same_rows_on_postgres_as_on_sqlite(pg_store, tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'same.sqlite'}") as sqlite_store:
        for store in (sqlite_store, pg_store):
            for index, (ticker, template, items) in enumerate(
                [("SBER", "ticker_outlook_ru", 2), ("GAZP", "ticker_outlook_ru", 0),
                 (None, "morning_brief_ru", 5), ("AAPL", "ticker_outlook_en", 1),
                 ("YDEX", "ticker_outlook_ru", 3), ("LKOH", "ticker_outlook_ru", 4)]
            ):  # fmt: skip
                save_prompt(store, make_prompt(f"k{index}", ticker=ticker, template=template,
                                               items=items))  # fmt: skip
            for index in range(4):
                finish(store, f"k{index}", f"текст {index} «{index}»")
            mark_prompt_failed(store, "k4", "CUDA out of memory")  # k4 failed, k5 pending
            with store.transaction() as session:  # fixed times, so `since` means the same
                for forecast_id in range(1, 5):
                    moment = f"2024-05-14T0{forecast_id}:00:00Z"
                    session.execute(
                        text("UPDATE generations SET created_at = :at WHERE id = :id"),
                        {"at": moment, "id": forecast_id},
                    )
        sqlite_path = sqlite_store.engine.url.database
        for filters in ({}, {"since": "2024-05-14T02:00:00Z"}, {"since": "2024-05-14"},
                        {"ticker": "SBER"}, {"template": "ticker_outlook_ru"}, {"limit": 2},
                        {"since": datetime(2024, 5, 14, 3, tzinfo=timezone.utc)}):  # fmt: skip
            on_sqlite = read_forecasts(sqlite_path, **filters)
            on_postgres = read_forecasts(pg_store.engine.url.render_as_string(False), **filters)
            assert on_postgres == on_sqlite, filters
        everything = read_forecasts(sqlite_path)
        assert [row.prompt_key for row in everything] == ["k3", "k2", "k1", "k0"]
        assert [row.news_count for row in everything] == [1, 5, 0, 2]
        assert everything[1].ticker is None


def test_runs_v1_reads_the_same_nights_on_sqlite_and_postgres(any_store, tmp_path):
    from flows.store.nights import finish_night, record_failures, start_night
    from flows.store.robot import read_runs

    as_of = datetime(2024, 5, 14, 6, 0, tzinfo=timezone.utc)
    night = start_night(any_store, as_of)
    record_failures(any_store, night, as_of, [("template", "broken", 2, "'tickr' is undefined")])
    finish_night(any_store, night, "partial", stored=6, failed=0, cause="1 failed: template")
    running = start_night(any_store, as_of)
    url = any_store.engine.url.render_as_string(False)
    if any_store.dialect == "sqlite":
        url = url.removeprefix("sqlite:///")
    rows = read_runs(url)
    assert [(row.night_id, row.outcome, row.forecasts_stored) for row in rows] == [
        (running, "running", 0),
        (night, "partial", 6),
    ]
    assert rows[1].as_of == "2024-05-14T06:00:00Z" and rows[1].cause == "1 failed: template"
    assert rows[0].finished_at is None and rows[1].finished_at is not None


# ---- read-only access ------------------------------------------------------------------------


def test_reads_are_read_only_transactions(pg_store):
    save_prompt(pg_store, make_prompt("a"))
    finish(pg_store, "a")
    with pytest.raises(StoreError, match="read-only transaction"), pg_store.reading() as session:
        session.execute(text("DELETE FROM generations"))
    connection = connect_readonly(pg_store.engine.url.render_as_string(False))
    try:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            connection.execute("DELETE FROM generations")
    finally:
        connection.close()
    assert len(read_forecasts(pg_store.engine.url.render_as_string(False))) == 1


def test_robot_role_reads_the_view_and_nothing_else(postgres_server, pg_store):
    save_prompt(pg_store, make_prompt("a"))
    finish(pg_store, "a")
    database = pg_store.engine.url.database
    # The statements docs/postgres.md gives for the robot's role.
    postgres_server.execute(
        "CREATE ROLE robot LOGIN",
        f'GRANT CONNECT ON DATABASE "{database}" TO robot',
        "GRANT USAGE ON SCHEMA public TO robot",
        "GRANT SELECT ON forecasts_v1 TO robot",
        "ALTER ROLE robot SET default_transaction_read_only = on",
        database=database,
    )
    robot_url = postgres_server.url(database, user="robot")
    try:
        assert [row.forecast for row in read_forecasts(robot_url)] == ["рост"]
        with psycopg.connect(robot_url.replace("+psycopg", ""), autocommit=True) as connection:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute("SELECT * FROM generations")
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                connection.execute("CREATE TABLE robot_notes (x int)")
    finally:
        postgres_server.execute(
            "DROP OWNED BY robot", "DROP ROLE robot", database=database
        )  # roles are cluster-wide


# ---- errors ----------------------------------------------------------------------------------


def test_bad_database_urls_are_one_readable_error(postgres_server):
    unused = postgres_server.port + 1 if postgres_server.port < 65535 else 1
    with pytest.raises(StoreError, match=r"127\.0\.0\.1.*cannot open or migrate: .*refused"):
        open_store(f"postgresql+psycopg://yalm:secret@127.0.0.1:{unused}/yalm")
    with pytest.raises(StoreError) as caught:
        open_store(f"postgresql://yalm:secret@127.0.0.1:{unused}/yalm")
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(StoreError, match=r'database "nope" does not exist'):
        open_store(postgres_server.url("nope"))
    with pytest.raises(StoreError, match=r"127\.0\.0\.1.*cannot connect"):
        read_forecasts(f"postgresql://robot@127.0.0.1:{unused}/yalm")
    with pytest.raises(StoreError, match="unsupported database 'mysql'"):
        open_store("mysql://user@host/db")
    with pytest.raises(StoreError, match="use postgresql\\+psycopg://"):
        open_store("postgresql+psycopg2://user@host/db")
    with pytest.raises(StoreError, match="names no database"):
        open_store("postgresql://user@host")


# ---- claims (both databases, in-process) -----------------------------------------------------


def test_claims_are_disjoint_and_leases_expire(any_store):
    for index in range(6):
        save_prompt(any_store, make_prompt(f"p{index}"))
    first = claim_prompts(any_store, "w1", limit=4, lease_seconds=60, now=T0)
    second = claim_prompts(any_store, "w2", limit=4, lease_seconds=60, now=T0)
    assert first == ["p0", "p1", "p2", "p3"] and second == ["p4", "p5"]
    assert claim_prompts(any_store, "w3", limit=4, lease_seconds=60, now=T0) == []
    # A re-run of w1 (same id) takes its own shard back at once.
    assert claim_prompts(any_store, "w1", limit=4, lease_seconds=60, now=T0) == first
    # w1 renews; w2 does not: after the lease, w3 gets w2's prompts only.
    later = T0 + timedelta(seconds=50)
    assert renew_claims(any_store, "w1", first, lease_seconds=60, now=later) == first
    after = T0 + timedelta(seconds=61)
    assert claim_prompts(any_store, "w3", limit=10, lease_seconds=60, now=after) == second
    assert renew_claims(any_store, "w2", second, lease_seconds=60, now=after) == []
    # Done and failed prompts leave the queue; released ones come back at once.
    finish(any_store, "p0")
    mark_prompt_failed(any_store, "p1", "bad")
    assert claimed_keys(any_store, "w1") == ["p2", "p3"]
    assert release_claims(any_store, "w1") == 2
    assert claim_prompts(any_store, "w4", limit=10, lease_seconds=60, now=after) == ["p2", "p3"]
    # Expiry housekeeping clears run-out leases on pending prompts only.
    assert expire_claims(any_store, now=T0 + timedelta(hours=1)) == 4
    assert claimed_keys(any_store, "w3") == []


def test_claims_respect_a_shard_and_bad_arguments_are_named(any_store):
    for index in range(4):
        save_prompt(any_store, make_prompt(f"p{index}"))
    shard = ["p3", "p1"]
    assert claim_prompts(any_store, "w", limit=10, lease_seconds=5, keys=shard) == ["p1", "p3"]
    with pytest.raises(StoreError, match="worker id must be a non-empty string"):
        claim_prompts(any_store, " ", limit=1, lease_seconds=5)
    with pytest.raises(StoreError, match="lease_seconds must be positive"):
        claim_prompts(any_store, "w", limit=1, lease_seconds=0)
    with pytest.raises(StoreError, match="limit must be at least 1"):
        claim_prompts(any_store, "w", limit=0, lease_seconds=5)


def test_a_claimer_skips_rows_another_claimer_has_locked(pg_store, pg_url):
    for index in range(4):
        save_prompt(pg_store, make_prompt(f"p{index}"))
    result = {}

    def claim():
        result["keys"] = claim_prompts(pg_store, "w2", limit=2, lease_seconds=60)

    with psycopg.connect(pg_url.replace("+psycopg", "")) as other:
        # Another claimer is mid-transaction, holding the two oldest prompts.
        other.execute("SELECT key FROM prompts WHERE key IN ('p0', 'p1') FOR UPDATE")
        thread = threading.Thread(target=claim)
        thread.start()
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        wait_for(lambda: not thread.is_alive() or scalar(pg_store, waiting) > 0, timeout_s=30)
        blocked = thread.is_alive()
        other.rollback()
        thread.join()
    assert not blocked, "the claim waited for another claimer's row locks"
    assert result["keys"] == ["p2", "p3"]


def test_two_holders_finishing_the_same_prompt_leave_one_forecast(pg_store, pg_url):
    """Worker A's lease ran out while it was still busy; B took the prompt. Both finish at once:
    B's insert waits on A's uncommitted row, then the unique key refuses it; A's forecast wins."""
    save_prompt(pg_store, make_prompt("a"))
    outcome = {}
    with psycopg.connect(pg_url.replace("+psycopg", "")) as holder_a:
        holder_a.execute(
            "INSERT INTO generations (prompt_key, text, token_ids_json, prompt_tokens, new_tokens,"
            " finish_reason, model_manifest_hash, template_name, template_version, template_hash,"
            " sampling_json, timings_json, code_version, created_at) VALUES ('a', 'by A', '[1]',"
            " 7, 1, 'eos', 'm', 't', 3, 'h', '{}', '{}', 'x', '2024-05-14T03:00:00Z')"
        )
        first_id = holder_a.execute("SELECT id FROM generations").fetchone()[0]

        def holder_b():
            outcome["id"] = record_claimed_generation(
                pg_store, "a", text="by B", token_ids=[2], prompt_tokens=7,
                finish_reason="eos", model_manifest_hash="m", timings_s={},
            )  # fmt: skip

        thread = threading.Thread(target=holder_b)
        thread.start()
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        wait_for(lambda: scalar(pg_store, waiting) == 1, timeout_s=30)
        holder_a.commit()
        thread.join(timeout=30)
    assert outcome["id"] == first_id
    assert scalar(pg_store, "SELECT string_agg(text, ',') FROM generations") == "by A"


# ---- real worker processes -------------------------------------------------------------------


def start_worker(url: str, worker_id: str, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(WORKER), url, worker_id, str(out), *extra]
    return subprocess.Popen(command, env=env, cwd=WORKER.parent)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split() if path.exists() else []


def assert_every_prompt_recorded_once(store, keys: list[str], out: Path) -> None:
    with store.reading() as session:
        rows = session.execute(
            text(
                "SELECT p.key, p.status, p.text, g.text, g.token_ids_json FROM prompts AS p"
                " LEFT JOIN generations AS g ON g.prompt_key = p.key ORDER BY p.key"
            )
        ).all()
        states = session.execute(text("SELECT count(*) FROM generation_state")).scalar()
    assert [row[0] for row in rows] == sorted(keys)
    for key, status, prompt_text, forecast, token_ids_json in rows:
        assert status == "done", key
        assert json.loads(token_ids_json) == target_ids(prompt_text), key
        assert forecast == forecast_text(target_ids(prompt_text)), key
    assert states == 0
    assert scalar(store, "SELECT count(*) FROM generations") == len(keys)
    recorded = Counter(key for path in out.glob("*.done") for key in lines(path))
    assert recorded == Counter(keys)  # no worker generated a prompt another one generated


def test_two_worker_processes_generate_every_prompt_exactly_once(pg_store, pg_url, tmp_path):
    keys = [f"p{index:03d}" for index in range(40)]
    for key in keys:
        save_prompt(pg_store, make_prompt(key))
    workers = {name: start_worker(pg_url, name, tmp_path, "--gate") for name in ("w1", "w2")}
    try:
        # Both hold a shard at the same moment before either generates anything.
        wait_for(lambda: all((tmp_path / f"{n}.claimed").exists() for n in workers), 60)
        first_shards = [set(json.loads((tmp_path / f"{n}.claimed").read_text())) for n in workers]
        assert len(first_shards[0]) == len(first_shards[1]) == 4
        assert not first_shards[0] & first_shards[1]
        (tmp_path / "go").write_text("go")
        for worker in workers.values():
            assert worker.wait(timeout=120) == 0
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()
    assert_every_prompt_recorded_once(pg_store, keys, tmp_path)
    claimed = [json.loads(line) for n in workers for line in
               (tmp_path / f"{n}.claims").read_text().splitlines()]  # fmt: skip
    assert sorted(key for shard in claimed for key in shard) == keys  # no shard claimed twice


def test_a_killed_workers_shard_is_completed_by_a_rerun(pg_store, pg_url, tmp_path):
    keys = [f"p{index:03d}" for index in range(16)]
    for key in keys:
        save_prompt(pg_store, make_prompt(key))
    victim = start_worker(pg_url, "gpu-a", tmp_path, "--shard", "6", "--hang-after", "2")
    other = None
    try:
        wait_for((tmp_path / "gpu-a.hanging").exists, timeout_s=60)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        held = claimed_keys(pg_store, "gpu-a")
        interrupted = (tmp_path / "gpu-a.hanging").read_text()
        assert len(held) == 4 and held[0] == interrupted
        assert (
            load_generation_state(pg_store, interrupted)
            == target_ids(make_prompt(interrupted).text)[:3]
        )
        # Another worker runs meanwhile: it takes everything free, never the killed one's shard.
        other = start_worker(pg_url, "gpu-b", tmp_path, "--shard", "3")
        assert other.wait(timeout=120) == 0
        assert [prompt.key for prompt in pending_prompts(pg_store)] == held
        assert not set(lines(tmp_path / "gpu-b.done")) & set(held)
        # The re-run of the killed worker's shard (same worker id) finishes it, resuming the
        # interrupted prompt from its saved ids.
        rerun = start_worker(pg_url, "gpu-a", tmp_path, "--shard", "6")
        assert rerun.wait(timeout=120) == 0
    finally:
        for process in (victim, other):
            if process is not None and process.poll() is None:
                process.kill()
    assert lines(tmp_path / "gpu-a.done")[2:] == held
    assert_every_prompt_recorded_once(pg_store, keys, tmp_path)


def test_only_transient_postgres_faults_are_retried(postgres_server):
    from flows.pipeline import is_transient

    unused = postgres_server.port + 1 if postgres_server.port < 65535 else 1
    with pytest.raises(StoreError) as refused:
        open_store(f"postgresql://yalm@127.0.0.1:{unused}/yalm")
    with pytest.raises(StoreError) as missing:
        open_store(postgres_server.url("nope"))
    assert is_transient(refused.value)  # the server is down or restarting: retry
    assert not is_transient(missing.value)  # a wrong database name: fail at once
    assert is_transient(psycopg.errors.SerializationFailure("could not serialize access"))


# ---- signals ---------------------------------------------------------------------------------


def test_signals_v1_reads_the_same_on_both_databases_and_the_robot_role_may_select_it(
    postgres_server, pg_store, tmp_path
):
    from dataclasses import replace

    from flows.store.robot import read_signals
    from flows.store.signals import SignalAnswer, pending_signals, record_signal

    signal = {"prefix": "Итог:", "content_free_prefix": "Итог:", "answers": {"up": " рост",
              "down": " падение", "flat": " боковик"}}  # fmt: skip
    answers = [
        SignalAnswer(label, text, -1.0 - index, index + 1, p, -2.0, 1, 1 / 3, p)
        for index, ((label, text), p) in enumerate(
            zip(signal["answers"].items(), (0.5, 0.3, 0.2), strict=True)
        )
    ]
    with open_store(f"sqlite:///{tmp_path / 'store.sqlite'}") as sqlite_store:
        for store in (sqlite_store, pg_store):
            save_prompt(store, replace(make_prompt("s1"), signal=signal))
            save_prompt(store, replace(make_prompt("s2", ticker=None), signal=signal))
            assert [queued.key for queued in pending_signals(store)] == ["s1", "s2"]
            for key in ("s1", "s2"):
                assert record_signal(store, key, answers, model_manifest_hash="m" * 64)
            assert not record_signal(store, "s1", answers, model_manifest_hash="m" * 64)
            assert pending_signals(store) == []
        sqlite_rows = read_signals(sqlite_store.engine.url.database)
    postgres_url = pg_store.engine.url.render_as_string(False)
    strip = [(row.prompt_key, row.ticker, row.label, row.probability) for row in sqlite_rows]
    assert [
        (r.prompt_key, r.ticker, r.label, r.probability) for r in read_signals(postgres_url)
    ] == (strip)
    assert {row.ticker for row in sqlite_rows} == {"SBER", ""}  # market-wide: empty
    database = pg_store.engine.url.database
    postgres_server.execute(
        "CREATE ROLE robot LOGIN",
        f'GRANT CONNECT ON DATABASE "{database}" TO robot',
        "GRANT USAGE ON SCHEMA public TO robot",
        "GRANT SELECT ON forecasts_v1 TO robot",
        "GRANT SELECT ON signals_v1 TO robot",
        "ALTER ROLE robot SET default_transaction_read_only = on",
        database=database,
    )
    robot_url = postgres_server.url(database, user="robot")
    try:
        rows = read_signals(robot_url, ticker="SBER")
        assert [row.label for row in rows] == ["up", "down", "flat"]
        assert sum(row.probability for row in rows) == pytest.approx(1.0)
        connection = psycopg.connect(robot_url.replace("+psycopg", ""), autocommit=True)
        with connection, pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("SELECT * FROM signals")
    finally:
        postgres_server.execute("DROP OWNED BY robot", "DROP ROLE robot", database=database)
