"""Real nights, run as a cron job runs them: ``yalm-forecast run`` in a subprocess, feeds from a
loopback server, the tiny model; no Prefect server (so none is started), except where a test
gives it one: the session's test server, one of its own that it kills mid-night, or a port
where nothing answers.

Each test asserts on stderr's exact last line: no test may pass on a traceback.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flows_testkit import prefect_server, sample, write_config

from flows.config import load_config
from flows.store.robot import read_runs

AS_OF = "2024-05-14T06:00:00Z"
KILL_CHILD = Path(__file__).resolve().parent / "kill_child.py"
BROKEN = """name: broken_outlook
version: 2
language: ru
scope: ticker
body: |
  Прогноз по {{ ticker.symbol }}.
  {{ tickr.symbol }}
"""


def night_config(directory: Path, feed_server, model: Path | str, **overrides) -> Path:
    directory.mkdir(exist_ok=True)
    settings = dict(
        feeds=[{"name": n, "url": feed_server.url(f"/{n}")} for n in ("rss", "atom")],
        templates=[
            {"name": "ticker_outlook_ru", "generation": {"max_new_tokens": 12}},
            {"name": "morning_brief_ru", "generation": {"max_new_tokens": 12}},
        ],
        model=str(model),
        generation={"device": "cpu", "batch_size": 2, "checkpoint_every": 2, "greedy": True},
    )
    return write_config(directory, **{**settings, **overrides})


def serve_feeds(feed_server) -> None:
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    feed_server.add("/atom", body=sample("global_markets_en.atom.xml"))


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        OMP_NUM_THREADS="1",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        YALM_FORECAST_LOCK_DIR=str(tmp_path / "locks"),
        **extra,
    )
    return env


def forecast(config: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "flows.commands.cli", *args, "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def last_line(text: str) -> str:
    return text.rstrip("\n").splitlines()[-1]


def table(config: Path, query: str) -> list[tuple]:
    database = load_config(config).database_path
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return connection.execute(query).fetchall()


FORECASTS = "SELECT prompt_key, text, token_ids_json FROM generations ORDER BY prompt_key"


def test_a_broken_template_fails_alone_and_the_night_ends_partial(
    feed_server, tiny_store, tmp_path
):
    serve_feeds(feed_server)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("ticker_outlook_ru", "morning_brief_ru"):
        source = Path(__file__).resolve().parents[2] / "prompts" / f"{name}.yaml"
        (prompts / f"{name}.yaml").write_bytes(source.read_bytes())
    (prompts / "broken_outlook.yaml").write_text(BROKEN, encoding="utf-8")
    config = night_config(
        tmp_path / "night", feed_server, tiny_store, prompts_dir=str(prompts),
        templates=[{"name": "broken_outlook"}, {"name": "ticker_outlook_ru",
                   "generation": {"max_new_tokens": 6}}],
    )  # fmt: skip
    result = forecast(config, "run", "--as-of", AS_OF, env=environment(tmp_path))
    assert result.returncode == 3, result.stderr[-3000:]
    assert last_line(result.stderr) == (
        "yalm-forecast: partial: 1 failed: template broken_outlook v2: "
        "template 'broken_outlook' "
        "body line 2: 'tickr' is undefined"
    )
    assert "Traceback" not in result.stderr
    stored = table(config, "SELECT count(*) FROM forecasts_v1 WHERE template='ticker_outlook_ru'")
    assert stored == [(6,)]  # every ticker of the good template
    log_text = load_config(config).log_file.read_text(encoding="utf-8")
    assert "render: template broken_outlook failed: template 'broken_outlook'" in log_text
    [night] = read_runs(load_config(config).database_url)
    assert (night.outcome, night.forecasts_stored, night.as_of) == ("partial", 6, AS_OF)
    assert "broken_outlook" in night.cause
    failures = table(config, "SELECT kind, name, version, as_of FROM night_failures")
    assert failures == [("template", "broken_outlook", 2, AS_OF)]

    check = forecast(config, "check", env=environment(tmp_path))
    assert check.returncode == 1
    assert last_line(check.stderr).startswith("yalm-forecast: error: template broken_outlook: ")


def test_a_missing_model_is_refused_before_any_feed_is_fetched(feed_server, tmp_path):
    serve_feeds(feed_server)
    config = night_config(tmp_path / "night", feed_server, tmp_path / "no-such-store")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = forecast(config, "run", "--as-of", AS_OF, env=environment(tmp_path))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time, not wall time: this answer must not wait for anything, whatever the load.
    took_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"yalm-forecast: error: {config}: model: {tmp_path / 'no-such-store'} is not a store: "
        "manifest.json is missing (no store); fix `model:` or convert the store again"
    ]
    assert sum(route.requests for route in feed_server.routes.values()) == 0
    assert not (tmp_path / "night" / "forecast.sqlite").exists()  # nothing written
    assert took_s < 5.0, took_s


def test_a_cuda_device_without_a_gpu_is_refused_at_preflight(feed_server, tiny_store, tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: `device: cuda` is valid here")
    serve_feeds(feed_server)
    config = night_config(
        tmp_path / "night", feed_server, tiny_store, generation={"device": "cuda"}
    )
    result = forecast(config, "check", env=environment(tmp_path))
    assert result.returncode == 1
    assert last_line(result.stderr) == (
        f"yalm-forecast: error: {config}: generation.device: device cuda asked for, but no CUDA "
        "device is available; set `device: cpu` or `auto` to run without one"
    )
    result = forecast(config, "run", env=environment(tmp_path))
    assert result.returncode == 1 and last_line(result.stderr) == result.stderr.strip()
    assert sum(route.requests for route in feed_server.routes.values()) == 0


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_mid_generation_stops_the_night_fast_and_the_rerun_finishes_it(
    feed_server, tiny_store, tmp_path, signame, code
):
    serve_feeds(feed_server)
    reference = night_config(tmp_path / "reference", feed_server, tiny_store)
    result = forecast(reference, "run", "--as-of", AS_OF, env=environment(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = table(reference, FORECASTS)
    assert len(expected) == 7

    config = night_config(tmp_path / "night", feed_server, tiny_store)
    stamp = tmp_path / "signalled-at"
    env = environment(tmp_path, KILL_SIGNAL=signame, KILL_STAMP=str(stamp))
    command = [sys.executable, str(KILL_CHILD), "8", "run", "--config", str(config)]
    child = subprocess.Popen(
        [*command, "--as-of", AS_OF], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    _, err = child.communicate(timeout=600)
    ended_at = time.time()
    assert child.returncode == code, err[-3000:]
    assert ended_at - float(stamp.read_text()) < 10.0
    assert last_line(err) == (
        f"yalm-forecast: interrupted: generate: interrupted by {signame}; what was stored "
        "stays: run the same command to resume"
    )
    assert "Traceback" not in err
    [night] = read_runs(load_config(config).database_url)
    assert night.outcome == "interrupted"
    assert table(config, "SELECT status FROM runs WHERE kind = 'generate'") == [("interrupted",)]
    assert 0 < len(table(config, FORECASTS)) < 7
    assert table(config, "SELECT count(*) FROM generation_state")[0][0] > 0  # rows in flight

    again = forecast(config, "run", "--as-of", AS_OF, env=environment(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert table(config, FORECASTS) == expected
    outcomes = [night.outcome for night in read_runs(load_config(config).database_url)]
    assert outcomes == ["done", "interrupted"]


def test_the_preflight_passes_without_importing_prefect(feed_server, tiny_store, tmp_path):
    config = night_config(tmp_path / "night", feed_server, tiny_store)
    code = (
        "import sys\n"
        "from flows.night.preflight import preflight\n"
        f"report = preflight({str(config)!r})\n"
        "assert not report.template_failures, report.template_failures\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'prefect', 'httpx'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "[]\n"


def test_the_log_and_the_summary_report_one_batch_size(feed_server, tiny_store, tmp_path):
    # 7 prompts in two sampling groups (6 and 1) under batch_size 8: the plan and the log line
    # said 8, the summary 6 (the largest batch that ran). The plan's batch is the one figure.
    serve_feeds(feed_server)
    config = night_config(
        tmp_path / "night", feed_server, tiny_store,
        templates=[
            {"name": "ticker_outlook_ru", "generation": {"max_new_tokens": 6}},
            {"name": "morning_brief_ru", "generation": {"max_new_tokens": 6, "temperature": 0.5}},
        ],
        generation={"device": "cpu", "batch_size": 8, "greedy": True},
    )  # fmt: skip
    result = forecast(config, "run", "--as-of", AS_OF, env=environment(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    log_text = load_config(config).log_file.read_text(encoding="utf-8")
    started = r"generate: 7 prompts \(0 resumed from saved ids\) on cpu, batch size (\d+)"
    logged = re.findall(started, log_text)
    summarized = re.findall(r"\| tokens/s \| [\d.]+ \| batch size (\d+) on cpu \|", result.stdout)
    planned = re.findall(r"generate: memory plan: batch (\d+) rows", log_text)
    [recorded] = table(config, "SELECT json_extract(details_json, '$.batch_size') FROM runs "
                               "WHERE kind = 'generate'")  # fmt: skip
    assert logged == summarized == planned == [str(recorded[0])] == ["8"]


def test_a_second_ctrl_c_while_the_first_is_saving_exits_at_once(feed_server, tiny_store, tmp_path):
    serve_feeds(feed_server)
    config = night_config(tmp_path / "night", feed_server, tiny_store)
    stamp = tmp_path / "signalled-at"
    # The first Ctrl-C lands after the 8th checkpoint; the save of the rows in flight it
    # starts would take 30 s, and a second Ctrl-C comes as that save begins.
    env = environment(tmp_path, KILL_SIGNAL="SIGINT", KILL_STAMP=str(stamp), KILL_AGAIN="1",
                      KILL_AGAIN_SAVE_S="30")  # fmt: skip
    command = [sys.executable, str(KILL_CHILD), "8", "run", "--config", str(config)]
    child = subprocess.Popen(
        [*command, "--as-of", AS_OF], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    _, err = child.communicate(timeout=600)
    ended_at = time.time()
    assert child.returncode == 130, err[-3000:]
    assert ended_at - float(Path(f"{stamp}.again").read_text()) < 5.0  # not the 30 s save
    assert last_line(err) == "yalm-forecast: interrupted again: exiting now"
    assert "Traceback" not in err
    stored = table(config, FORECASTS)
    assert 0 < len(stored) < 7  # what was committed before the first Ctrl-C stays

    again = forecast(config, "run", "--as-of", AS_OF, env=environment(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert set(stored) <= set(table(config, FORECASTS)) and len(table(config, FORECASTS)) == 7


def test_ctrl_c_mid_generation_of_a_flow_run_on_a_prefect_server_is_recorded_interrupted(
    prefect_harness, feed_server, tiny_store, tmp_path
):
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import get_current_settings

    serve_feeds(feed_server)
    config = night_config(tmp_path / "night", feed_server, tiny_store)
    stamp = tmp_path / "signalled-at"
    env = environment(tmp_path, KILL_SIGNAL="SIGINT", KILL_STAMP=str(stamp),
                      PREFECT_API_URL=get_current_settings().api.url)  # fmt: skip
    command = [sys.executable, str(KILL_CHILD), "8", "run", "--config", str(config)]
    child = subprocess.Popen(
        [*command, "--as-of", AS_OF], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    out, err = child.communicate(timeout=600)
    ended_at = time.time()
    assert child.returncode == 130, err[-3000:]
    assert ended_at - float(stamp.read_text()) < 15.0
    assert last_line(err) == (
        "yalm-forecast: interrupted: generate: interrupted by SIGINT; what was stored stays: "
        "run the same command to resume"
    )
    assert "# news-to-forecast night, as of 2024-05-14T06:00:00Z: interrupted" in out
    [night] = read_runs(load_config(config).database_url)
    assert night.outcome == "interrupted" and 0 < night.forecasts_stored < 7
    assert table(config, "SELECT status FROM runs WHERE kind = 'generate'") == [("interrupted",)]
    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
    assert run.name.startswith("night of 2024-05-14T06:00:00")
    assert run.state.type.value == "CANCELLED" and run.state.message.startswith("interrupted: ")


@pytest.mark.slow
def test_a_prefect_server_killed_mid_night_costs_seconds_and_the_exit_code_follows_the_store(
    feed_server, tiny_store, tmp_path
):
    serve_feeds(feed_server)
    config = night_config(tmp_path / "night", feed_server, tiny_store)
    stamp = tmp_path / "server-killed-at"
    with prefect_server(tmp_path / "prefect-server") as (server, url):
        # The server is SIGKILLed right after the 3rd checkpoint of the generation task.
        env = environment(tmp_path, KILL_PID=str(server.pid), KILL_STAMP=str(stamp),
                          PREFECT_API_URL=url)  # fmt: skip
        command = [sys.executable, str(KILL_CHILD), "3", "run", "--config", str(config)]
        result = subprocess.run(
            [*command, "--as-of", AS_OF], env=env, capture_output=True, text=True, timeout=600
        )
        ended_at = time.time()
        assert server.poll() == -signal.SIGKILL  # killed by the night, mid-generation
    assert result.returncode == 0, result.stderr[-3000:]
    assert ended_at - float(stamp.read_text()) < 60.0  # seconds, not minutes of retries
    assert last_line(result.stderr) == (
        "yalm-forecast: done; the Prefect server stopped answering at generate, so its record "
        "of this night is incomplete: runs_v1 has all of it"
    )
    assert "Traceback" not in result.stderr
    assert "| generated | 7 |" in result.stdout
    [night] = read_runs(load_config(config).database_url)
    assert (night.outcome, night.forecasts_stored, night.cause) == ("done", 7, None)
    assert len(table(config, FORECASTS)) == 7
    log_text = load_config(config).log_file.read_text(encoding="utf-8")
    assert "generate: the Prefect server stopped answering (" in log_text


def test_a_prefect_server_that_never_answers_leaves_the_night_to_this_process(
    feed_server, tiny_store, tmp_path
):
    serve_feeds(feed_server)
    config = night_config(tmp_path / "night", feed_server, tiny_store)
    with socket.socket() as probe:  # a port nothing listens on: every connection is refused
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/api"
    env = environment(tmp_path, PREFECT_API_URL=url)
    result = forecast(config, "run", "--as-of", AS_OF, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.splitlines()[0].endswith(
        f"WARNING the Prefect server does not answer (Failed to reach API at {url}/); running "
        "the night in this process without it"
    )
    assert last_line(result.stderr) == (
        "yalm-forecast: done; the Prefect server stopped answering before the night began, so "
        "its record of this night is incomplete: runs_v1 has all of it"
    )
    assert "Traceback" not in result.stderr
    [night] = read_runs(load_config(config).database_url)
    assert (night.outcome, night.forecasts_stored) == ("done", 7)
