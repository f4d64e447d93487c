"""A flow process killed mid-generation, re-run, ends with the table an uninterrupted run makes;
a command killed while Prefect's temporary server runs leaves no server behind.

The killed runs are real ``yalm-forecast run`` processes without a Prefect server (what a cron
job or a person at a terminal gets: the night in the command's own process), each SIGKILLed by
itself right after a chosen checkpoint, inside a prefill or between two checkpoints
(``kill_child.py``), so the kill lands mid-generation by construction, not by timing. The first
test's reference is an uninterrupted run of the same config under ``prefect_test_harness``; the
flat model's (``flat_store``: its text is decided by the last bits), an uninterrupted run of the
same process. ``generate-shard`` without a server runs its flow on a temporary Prefect server,
which must not outlive the command.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from flows_testkit import sample, wait_for, write_config

from flows.config import load_config

AS_OF = "2024-05-14T06:00:00Z"
KILL_CHILD = Path(__file__).resolve().parent / "kill_child.py"


def kill_config(directory: Path, feed_server, model: Path, **generation) -> Path:
    directory.mkdir()
    return write_config(
        directory,
        feeds=[{"name": n, "url": feed_server.url(f"/{n}")} for n in ("rss", "atom")],
        templates=[
            {"name": "ticker_outlook_ru", "generation": {"max_new_tokens": 12}},
            {"name": "morning_brief_ru", "generation": {"max_new_tokens": 12}},
        ],
        model=str(model),
        # Small batches so that a kill finds forecasts committed, rows in flight and rows not
        # started.
        generation={"device": "cpu", "batch_size": 2, "checkpoint_every": 2, **generation},
    )


def serve_samples(feed_server) -> None:
    """The two bundled sample feeds, at /rss and /atom (``kill_config``'s feeds)."""
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    feed_server.add("/atom", body=sample("global_markets_en.atom.xml"))


def command_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A command's environment: no Prefect settings of ours (a temporary server of its own,
    under ``tmp_path``), its own device locks, one torch thread; ``extra`` on top."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(OMP_NUM_THREADS="1", PREFECT_HOME=str(tmp_path / "prefect-home"),
               YALM_FORECAST_LOCK_DIR=str(tmp_path / "locks"), **extra)  # fmt: skip
    return env


def table(config_path: Path, query: str) -> list[tuple]:
    database = load_config(config_path).database_path
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return connection.execute(query).fetchall()


FORECASTS = (
    "SELECT prompt_key, text, token_ids_json, finish_reason, new_tokens, model_manifest_hash "
    "FROM generations ORDER BY prompt_key"
)


def run_child(
    config_path: Path, kill_after: int, tmp_path: Path, moment: str = ""
) -> tuple[int, str, str]:
    """Run the child in its own process group; returns (exit status, stdout, stderr)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(
        KILL_MOMENT=moment,
        OMP_NUM_THREADS="1",
        PREFECT_HOME=str(tmp_path / "prefect-home"),  # its own ephemeral server and database
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        YALM_FORECAST_LOCK_DIR=str(tmp_path / "locks"),
    )
    command = [sys.executable, str(KILL_CHILD), str(kill_after)]
    command += ["run", "--config", str(config_path), "--as-of", AS_OF]
    out_path, err_path = tmp_path / "child.out", tmp_path / "child.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            status = child.wait(timeout=600)
        finally:
            # Whatever the child started ends with it: its process group (ours: started above
            # in a new session).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
    return status, out_path.read_text(), err_path.read_text()


@pytest.mark.slow
def test_a_flow_killed_mid_generation_resumes_to_the_uninterrupted_table(
    prefect_harness, feed_server, tiny_store, tmp_path, monkeypatch
):
    from flows.pipeline import news_to_forecast

    monkeypatch.setenv("YALM_FORECAST_LOCK_DIR", str(tmp_path / "locks"))
    serve_samples(feed_server)
    reference = kill_config(tmp_path / "reference", feed_server, tiny_store)
    summary = news_to_forecast(config_path=str(reference), as_of=AS_OF)
    assert summary.generate.generated == 7
    expected = table(reference, FORECASTS)

    killed = kill_config(tmp_path / "killed", feed_server, tiny_store)
    # Rows of 12 tokens, checkpoints every 2 steps: 5 saves per batch of two.
    for kill_after in (8, 3):
        status, _, err = run_child(killed, kill_after, tmp_path)
        assert status == -signal.SIGKILL, err[-3000:]
        done = table(killed, FORECASTS)
        in_flight = table(killed, "SELECT prompt_key FROM generation_state")
        assert 0 < len(done) < 7 and in_flight, "the kill did not land mid-generation"
        assert set(done) <= set(expected)  # what was committed is already final
        assert not {key for (key,) in in_flight} & {row[0] for row in done}

    status, out, err = run_child(killed, 0, tmp_path)
    assert status == 0, err[-3000:]
    assert re.search(r"generate: \d+ prompts \([1-9]\d* resumed from saved ids\)", err), err
    assert "| generated | " in out
    assert table(killed, FORECASTS) == expected
    assert table(killed, "SELECT * FROM generation_state") == []
    statuses = table(killed, "SELECT status, count(*) FROM prompts GROUP BY status")
    assert statuses == [("done", 7)]


@pytest.mark.slow
def test_a_flow_killed_anywhere_in_generation_resumes_exactly_on_a_flat_model(
    feed_server, flat_store, tmp_path, monkeypatch
):
    """Sampling on, KV checkpointed at every checkpoint, killed inside a prefill, right after a
    checkpoint, between two checkpoints and late: the stored forecasts are byte for byte an
    uninterrupted run's, each stored once, and the state folder is gone at the end."""
    serve_samples(feed_server)
    settings = {"temperature": 0.8, "top_p": 0.9, "kv_checkpoint_interval": 1e-9}
    reference = kill_config(tmp_path / "reference", feed_server, flat_store, **settings)
    status, _, err = run_child(reference, 0, tmp_path)
    assert status == 0, err[-3000:]
    expected = table(reference, FORECASTS)
    assert len(expected) == 7

    killed = kill_config(tmp_path / "killed", feed_server, flat_store, **settings)
    state_dir = load_config(killed).state_dir
    told = []
    for kill_after, moment in ((0, "prefill:3"), (3, ""), (0, "decode:5"), (0, "prefill:6")):
        status, _, err = run_child(killed, kill_after, tmp_path, moment)
        assert status == -signal.SIGKILL, err[-3000:]
        told.append(err)
        done = table(killed, FORECASTS)
        assert len(done) < 7 and set(done) <= set(expected)  # what was committed is final
        assert any(state_dir.rglob("state.json")), "the plan was not kept"
    status, _, err = run_child(killed, 0, tmp_path)
    assert status == 0, err[-3000:]
    told = "\n".join([*told, err])
    assert "goes on from its KV checkpoint" in told, told[-3000:]
    assert "not exact" not in told and "unusable" not in told, told[-3000:]
    assert table(killed, FORECASTS) == expected
    assert table(killed, "SELECT count(*) FROM generations") == [(7,)]
    assert not any(state_dir.rglob("*")), "the state folder was not cleared"


def test_a_killed_command_leaves_no_temporary_prefect_server_behind(
    feed_server, tiny_store, tmp_path
):
    from flows.commands.serverguard import OWNER_ENV, SERVER_COMMAND

    serve_samples(feed_server)
    config = kill_config(tmp_path / "shard", feed_server, tiny_store)
    env = command_env(tmp_path)
    for command in (["ingest"], ["render", "--as-of", AS_OF]):
        subprocess.run([sys.executable, "-m", "flows.commands.cli", *command, "--config",
                        str(config)], env=env, check=True, capture_output=True)  # fmt: skip
    # generate-shard without a server: its flow runs on a temporary Prefect server, a child of
    # the command; the command alone (not its group) is SIGKILLed at its 3rd checkpoint.
    err = tmp_path / "child.err"  # a file, not a pipe: the server would hold a pipe open
    with err.open("wb") as err_file:
        child = subprocess.Popen(
            [sys.executable, str(KILL_CHILD), "3", "generate-shard", "--config", str(config)],
            env=env, stdout=subprocess.DEVNULL, stderr=err_file, start_new_session=True,
        )  # fmt: skip
    try:
        assert child.wait(timeout=600) == -signal.SIGKILL, err.read_text()[-3000:]
        log_file = load_config(config).log_file
        pattern = re.compile(
            r"WARNING ended the temporary Prefect server \(pid (\d+)\) that yalm-forecast "
            rf"\(pid {child.pid}\) left behind when it was killed$",
            re.MULTILINE,
        )
        wait_for(lambda: pattern.search(log_file.read_text(encoding="utf-8")), timeout_s=60.0)
        server = int(pattern.search(log_file.read_text(encoding="utf-8")).group(1))
        mark = f"{OWNER_ENV}={child.pid}:".encode()
        left = [
            pid
            for pid in proc_pids()
            if SERVER_COMMAND in read_proc(pid, "cmdline")
            and any(item.startswith(mark) for item in read_proc(pid, "environ").split(b"\0"))
        ]
        assert left == [] and server not in proc_pids()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)


def proc_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def read_proc(pid: int, name: str) -> bytes:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:  # gone, or not ours
        return b""


def test_a_temporary_server_that_never_answers_stops_the_shard_in_one_line_and_claims_nothing(
    feed_server, tiny_store, tmp_path
):
    """Prefect gives its temporary server a time to answer; past it, generate-shard ends with
    one line naming the server and the setting, exit 1, nothing claimed or generated, and no
    server left running. (The product's default is 120 s; here the user has set 0 s: the server
    is never waited for.)"""
    from flows.commands.serverguard import OWNER_ENV, SERVER_COMMAND

    serve_samples(feed_server)
    config = kill_config(tmp_path / "shard", feed_server, tiny_store)
    env = command_env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    command = [sys.executable, "-m", "flows.commands.cli"]
    for step in (["ingest"], ["render", "--as-of", AS_OF]):
        subprocess.run([*command, *step, "--config", str(config)], env=env, check=True,
                       capture_output=True)  # fmt: skip
    before = table(config, "SELECT key, status, claimed_by FROM prompts ORDER BY key")
    done = subprocess.run([*command, "generate-shard", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    said = "yalm-forecast: error: generate-shard: Prefect's temporary server did not answer "
    assert last.startswith(f"{said}within 0 s of starting"), done.stderr[-3000:]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in last
    assert "Traceback" not in done.stderr
    log_text = load_config(config).log_file.read_text(encoding="utf-8")
    assert "Prefect's temporary server did not answer" in log_text
    assert "Traceback" in log_text  # the whole story is in the log file
    assert table(config, "SELECT key, status, claimed_by FROM prompts ORDER BY key") == before
    assert {status for _, status, _ in before} == {"pending"}
    assert table(config, "SELECT count(*) FROM generations") == [(0,)]
    left = [
        pid
        for pid in proc_pids()
        if SERVER_COMMAND in read_proc(pid, "cmdline")
        and f"{OWNER_ENV}=".encode() in read_proc(pid, "environ")
        and str(tmp_path).encode() in read_proc(pid, "environ")
    ]
    assert left == []


@pytest.mark.parametrize("command", [["run"], ["generate-shard"]])
def test_an_invalid_prefect_setting_is_one_line_naming_its_variable(
    command, feed_server, tiny_store, tmp_path
):
    """Prefect refuses a setting of the wrong type (its startup timeout must be whole seconds)
    from deep inside a flow run, with pydantic's traceback. The command checks Prefect's
    settings before any flow: exit 1, the variable named in the last line (and in the log),
    no store written."""
    serve_samples(feed_server)
    config = kill_config(tmp_path / "bad", feed_server, tiny_store)
    env = command_env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0.01")
    done = subprocess.run(
        [sys.executable, "-m", "flows.commands.cli", *command, "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "yalm-forecast: error: Prefect setting PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="
        "'0.01': Input should be a valid integer, unable to parse string as an integer"
    ), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert last in load_config(config).log_file.read_text(encoding="utf-8")
    assert not load_config(config).database_path.exists()  # nothing fetched, nothing written
