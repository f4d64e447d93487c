"""The news-to-forecast flow end to end under ``prefect_test_harness``, and the demo.

Real Prefect (a temporary server), real HTTP on loopback, a real SQLite file, a tiny model of the
YaLM architecture converted by the real converter; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from flows_testkit import sample, write_config

from flows.commands.cli import main
from flows.commands.console import run_markdown
from flows.config import load_config
from flows.errors import PipelineConfigError, StoreError
from flows.generation.devicelock import DeviceBusyError, device_lock
from flows.night.summaries import (
    Failure,
    GenerateSummary,
    IngestSummary,
    NightSummary,
    RenderSummary,
)
from flows.pipeline import GPU_LIMIT, is_transient
from yalm_runner.checkpoint import ModelStore

AS_OF = "2024-05-14T06:00:00Z"
NEW_ITEM = """    <item>
      <title>Сбербанк объявил об обратном выкупе акций</title>
      <link>https://example.ru/markets/2024/05/14/sber-buyback</link>
      <guid isPermaLink="false">markets-ru-100240</guid>
      <pubDate>Tue, 14 May 2024 08:50:00 +0300</pubDate>
      <description>Набсовет Сбербанка одобрил выкуп акций на 50 млрд рублей.</description>
    </item>
  </channel>"""


@pytest.fixture(autouse=True)
def private_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("YALM_FORECAST_LOCK_DIR", str(tmp_path / "locks"))


def pipeline_config(directory: Path, feed_server, model: Path, **overrides) -> Path:
    templates = [
        {"name": "ticker_outlook_ru", "generation": {"max_new_tokens": 10}},
        {"name": "morning_brief_ru", "generation": {"max_new_tokens": 14}},
    ]
    settings = dict(
        feeds=[{"name": n, "url": feed_server.url(f"/{n}")} for n in ("rss", "atom")],
        templates=templates,
        model=str(model),
        generation={"device": "cpu", "checkpoint_every": 3},
    )
    return write_config(directory, **{**settings, **overrides})


def forecasts_table(database: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return connection.execute(
            "SELECT prompt_key, text, token_ids_json, finish_reason, new_tokens, "
            "model_manifest_hash FROM generations ORDER BY prompt_key"
        ).fetchall()


def results_json(config_path: Path, capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["results", "--config", str(config_path), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_flow_end_to_end_then_nothing_new_then_exactly_the_new(
    prefect_harness, feed_server, tiny_store, tmp_path, capsys
):
    from prefect import get_client

    from flows.pipeline import news_to_forecast

    rss = feed_server.add("/rss", body=sample("markets_ru.rss.xml"), etag='"1"')
    feed_server.add("/atom", body=sample("global_markets_en.atom.xml"))
    path = pipeline_config(tmp_path, feed_server, tiny_store)
    config = load_config(path)

    first = news_to_forecast(config_path=str(path), as_of=AS_OF)
    assert first.ingest == IngestSummary(run_id=1, feeds=2, new_items=9)
    assert first.render == RenderSummary(new=7)  # 6 tickers + the brief
    generated = first.generate
    assert (generated.generated, generated.failures, generated.resumed) == (7, (), 0)
    assert generated.tokens_per_s > 0 and first.outcome.word == "done"
    assert "| generated | 7 |" in first.markdown and "| tokens/s |" in first.markdown

    results = results_json(path, capsys)
    assert len(results) == 7
    manifest_hash = ModelStore.open(tiny_store).manifest_sha256
    for row in results:
        assert row["model_hash"] == manifest_hash
        assert row["as_of"] == "2024-05-14" and row["template_version"] == 2
        assert row["run_id"] == generated.run_id and len(row["prompt_key"]) == 64
        assert 1 <= row["new_tokens"] <= 14 and row["finish_reason"] in ("eos", "length")
    assert {row["ticker"] for row in results} == {None, "SBER", "GAZP", "LKOH", "YDEX", "AAPL"} | {
        "NVDA"
    }
    before = forecasts_table(config.database_path)

    # The limit that keeps generations off the GPU together exists and was given back.
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        artifact = client.read_latest_artifacts()
    assert (limit.limit, limit.active_slots) == (1, 0)
    assert any(item.key == "news-to-forecast-run" for item in artifact)

    second = news_to_forecast(config_path=str(path), as_of=AS_OF)
    assert second.ingest.new_items == 0 and second.render == RenderSummary(done=7)
    assert second.generate.generated == 0 and second.generate.pending == 0
    assert forecasts_table(config.database_path) == before

    rss.body = sample("markets_ru.rss.xml").replace(b"  </channel>", NEW_ITEM.encode())
    rss.etag = '"2"'
    third = news_to_forecast(config_path=str(path), as_of=AS_OF)
    assert third.ingest.new_items == 1
    # The item is about SBER: its outlook and the market brief change; nothing else does.
    assert third.render == RenderSummary(new=2, done=5)
    assert third.generate.generated == 2
    after = forecasts_table(config.database_path)
    assert len(after) == 9 and set(before) <= set(after)
    newest = results_json(path, capsys)[:2]
    assert {row["ticker"] for row in newest} == {"SBER", None}
    assert all(row["run_id"] == third.generate.run_id for row in newest)


def test_run_command_refuses_a_bad_model_before_fetching_then_ends_partial_on_a_dead_feed(
    prefect_harness, feed_server, tiny_store, tmp_path, capsys
):
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    atom = feed_server.add("/atom", body=b"", status=404)
    broken = tmp_path / "broken-store"
    broken.mkdir()
    path = pipeline_config(
        tmp_path, feed_server, broken, tokenizer=str(ModelStore.open(tiny_store).tokenizer_path)
    )
    code = main(["run", "--config", str(path), "--as-of", AS_OF])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines()[-1] == (
        f"yalm-forecast: error: {path}: model: {broken} is not a store: manifest.json is "
        "missing (no store); fix `model:` or convert the store again"
    )
    assert atom.requests == 0 and not load_config(path).database_path.exists()

    fixed = pipeline_config(tmp_path, feed_server, tiny_store)
    code = main(["run", "--config", str(fixed), "--as-of", AS_OF])
    captured = capsys.readouterr()
    assert code == 3  # the atom feed fails
    assert "| generated | 5 |" in captured.out and "feed `atom`: HTTP 404" in captured.out
    assert captured.err.splitlines()[-1] == (
        "yalm-forecast: partial: 1 failed: feed atom: HTTP 404 Not Found"
    )
    log_text = load_config(fixed).log_file.read_text(encoding="utf-8")
    assert "ingest: feed atom failed: HTTP 404" in log_text

    # The UI shows the partial night as such, named after its night, with the cause.
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
    assert run.name.startswith("night of 2024-05-14T06:00:00")
    assert (run.state.name, run.state.message) == (
        "Partial",
        "partial: 1 failed: feed atom: HTTP 404 Not Found",
    )


def test_demo_then_results_in_the_same_folder(prefect_harness, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "yalm-forecast results" in out and "forecast.sqlite" in out
    assert (tmp_path / "yalm-forecast.yaml").is_file()
    results = results_json(tmp_path / "yalm-forecast.yaml", capsys)
    assert main(["results", "--format", "json"]) == 0  # the default config is the demo's
    assert json.loads(capsys.readouterr().out) == results
    assert len(results) == 13 and {row["template"] for row in results} == {
        "ticker_outlook_ru",
        "ticker_outlook_en",
        "morning_brief_ru",
    }
    # Someone's own config is never overwritten; a second demo adds nothing.
    mine = tmp_path / "yalm-forecast.yaml"
    mine.write_text("database: mine.sqlite\n", encoding="utf-8")
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert mine.read_text(encoding="utf-8") == "database: mine.sqlite\n"
    assert "--config yalm-forecast-demo/yalm-forecast.yaml" in out
    assert "| generated | 0 |" in out


@pytest.mark.slow
def test_the_quickstart_shows_the_demo_in_a_folder_with_someone_s_own_config(tmp_path):
    """``yalm-forecast demo && yalm-forecast results`` beside a config of one's own: the config
    stays byte for byte, and results show the demo's forecasts until that config's own database
    exists (then its own, never the demo's)."""
    from flows.store.database import open_store

    mine = tmp_path / "yalm-forecast.yaml"
    own = "# моя ночь\r\ndatabase: mine.sqlite\r\nfeeds: []\r\n".encode()
    mine.write_bytes(own)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), OMP_NUM_THREADS="1",
               YALM_FORECAST_LOCK_DIR=str(tmp_path / "locks"))  # fmt: skip

    def forecast(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "flows.commands.cli", *args]
        return subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )

    demo = forecast("demo")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert mine.read_bytes() == own
    results = forecast("results", "--format", "json")
    assert results.returncode == 0, results.stderr[-3000:]
    demo_database = tmp_path / "yalm-forecast-demo" / "forecast.sqlite"
    assert results.stderr.splitlines() == [
        f"yalm-forecast: showing the demo's database {demo_database} "
        f"({tmp_path / 'yalm-forecast-demo' / 'yalm-forecast.yaml'}): {tmp_path / 'mine.sqlite'}, "
        f"the database of {mine}, does not exist yet"
    ]
    shown = json.loads(results.stdout)
    assert len(shown) == 13 and {row["template"] for row in shown} == {
        "ticker_outlook_ru",
        "ticker_outlook_en",
        "morning_brief_ru",
    }
    signals = forecast("signals", "--format", "json")
    assert signals.returncode == 0 and len(json.loads(signals.stdout)) > 0

    with open_store(f"sqlite:///{tmp_path / 'mine.sqlite'}"):
        pass  # one's own database now exists (empty): it is the one shown, alone
    results = forecast("results", "--format", "json")
    assert (results.returncode, results.stdout, results.stderr) == (0, "[]\n", "")
    assert mine.read_bytes() == own


def test_serve_without_a_prefect_server_says_how_to_get_one(tmp_path):
    path = write_config(tmp_path)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    result = subprocess.run(
        [sys.executable, "-m", "flows.commands.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("yalm-forecast: error: serve: no Prefect server configured")
    assert "prefect server start" in last


def test_only_transient_faults_are_retried():
    import httpx
    import torch

    from yalm_runner.errors import CheckpointError, OffloadError

    def wrapped(cause: BaseException) -> StoreError:
        try:
            raise StoreError("forecast.sqlite: database is locked") from cause
        except StoreError as exc:
            return exc

    assert is_transient(wrapped(sqlite3.OperationalError("database is locked")))
    assert is_transient(httpx.ConnectError("connection refused"))
    assert is_transient(OSError(5, "Input/output error"))
    assert not is_transient(wrapped(sqlite3.OperationalError("no such table: prompts")))
    assert not is_transient(FileNotFoundError(2, "No such file"))
    assert not is_transient(PipelineConfigError("generation.dtype: one of ..."))
    assert not is_transient(CheckpointError("layer_001.safetensors: sha256 mismatch"))
    assert not is_transient(OffloadError("batch size 64 does not fit"))
    assert not is_transient(torch.OutOfMemoryError("CUDA out of memory"))


def locked_database() -> StoreError:
    try:
        raise StoreError("forecast.sqlite: database is locked") from sqlite3.OperationalError(
            "database is locked"
        )
    except StoreError as exc:
        return exc


def test_prefect_retries_a_locked_database_but_never_a_bad_config(prefect_harness):
    from prefect import flow, task

    from flows import pipeline

    for each in (pipeline.ingest, pipeline.render, pipeline.generate, pipeline.publish):
        assert each.retries == 2 and each.retry_condition_fn is pipeline._retry_if_transient
    calls = []

    @task(**{**pipeline.TRANSIENT_RETRIES, "retry_delay_seconds": 0})
    def step(kind: str) -> str:
        calls.append(kind)
        if kind == "locked" and len(calls) == 1:
            raise locked_database()
        if kind == "config":
            raise PipelineConfigError("generation.dtype: one of ...")
        return "stored"

    @flow
    def one_step(kind: str) -> str:
        return step(kind)

    assert one_step("locked") == "stored" and calls == ["locked", "locked"]
    calls.clear()
    with pytest.raises(PipelineConfigError):
        one_step("config")
    assert calls == ["config"]


def test_several_gpus_are_locked_together_in_one_order(tmp_path, monkeypatch):
    from flows.generation.devicelock import device_locks

    monkeypatch.setenv("YALM_FORECAST_LOCK_DIR", str(tmp_path))
    with device_locks(["cuda:1", "cuda:0"]) as first:
        assert first.name.endswith("cuda0.lock")
        # Either GPU alone is busy while the pair is held.
        for device in ("cuda:0", "cuda:1"):
            with pytest.raises(DeviceBusyError), device_lock(device, timeout_s=0):
                pass
    with device_locks(["cuda:0", "cuda:1"], timeout_s=0):
        pass


def test_the_device_lock_admits_one_holder(tmp_path):
    with device_lock("cuda") as path:
        assert "pid" in path.read_text()
        busy = pytest.raises(DeviceBusyError, match="another generation is using the device")
        with busy, device_lock("cuda:0", timeout_s=0):
            pass
        with device_lock("cpu"):  # another device: its own lock
            pass
    with device_lock("cuda", timeout_s=0):
        pass


def test_summary_table_names_what_failed():
    markdown = run_markdown(
        NightSummary(
            as_of=AS_OF,
            ingest=IngestSummary(
                feeds=3, new_items=4, failures=(Failure("feed", "rbc", "HTTP 503"),)
            ),
            render=RenderSummary(new=2, existing=1, done=3),
            generate=GenerateSummary(
                generated=1, tokens_per_s=9, batch_size=4, device="cpu",
                failures=(Failure("prompt", "ab" * 32, "too long"),),
            ),
        )
    )  # fmt: skip
    assert markdown.startswith(f"# news-to-forecast night, as of {AS_OF}: partial\n")
    assert "| failed | 2 | 1 feeds, 0 templates, 1 prompts, 0 signals |" in markdown
    assert "1 still queued, 3 done before" in markdown and "batch size 4 on cpu" in markdown
    assert "- feed `rbc`: HTTP 503" in markdown and "- prompt `abababababab`: too long" in markdown
