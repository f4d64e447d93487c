"""Scale-out on a real PostgreSQL server: shard runs in worker processes, killed and re-run.

The pipeline's store is a database on the session's PostgreSQL server (``postgres_server``, from
the distribution's package). The reference is one uninterrupted in-process ``news-to-forecast``
run on its own database. The sharded side ingests and renders the same news, then two real
``yalm-forecast generate-shard --shard I/2`` processes (each its own Prefect ephemeral server
and device lock, as two hosts would have) generate their shards with the real tiny model; a
barrier (``shard_child.py``) holds each at its first checkpoint until both are there, so they
provably generate at the same time, and one SIGKILLs itself a few checkpoints later. Its re-run
takes back its shard's claims and finishes; the table must equal the reference's.

The nightly flow's shards run through a deployment served by a real ``prefect worker start``,
stopped afterwards as a service manager stops it, with SIGTERM. That stop has two clocks. The
worker's own: its handler ends its loops and its runs and it prints "Worker '...' stopped!"
(0.02-0.25 s measured with two other suites running; a worker busy with two shard runs, one
generating and one waiting for the GPU slot, exited in 0.4 s). Then Prefect's: at interpreter
exit it delivers its last events to the API server over a websocket and waits for that with no
overall deadline (10 s to open and 10 s to close per attempt, up to 11 attempts, pongs and the
auth reply awaited without a timeout), so this part lasts as long as the server takes to
answer: with the harness server stopped (SIGSTOP) for 40 and 90 s, the worker exited after 42
and 91 s. With several suites on two cores the session's harness server is starved (it
sometimes cannot even start within its 30 s), and one 60 s bound on both parts then sometimes
failed. So the worker's own part is held to ``WORKER_STOP_S``, and the delivery gets the bound
a shard worker's whole run gets.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from flows_testkit import sample, write_config
from sqlalchemy import text

from flows.commands.cli import main
from flows.config import load_config
from flows.generation.shards import in_shard, split_round_robin
from flows.store.database import open_store
from flows.store.generations import pending_prompts

AS_OF = "2024-05-14T06:00:00Z"
SHARD_CHILD = Path(__file__).resolve().parent / "shard_child.py"
FORECASTS = (
    "SELECT prompt_key, text, token_ids_json, finish_reason, new_tokens, model_manifest_hash "
    "FROM generations ORDER BY prompt_key"
)
WORKER_STOP_S = 60  # SIGTERM to "Worker '...' stopped!": the worker's own handling
WORKER_EXIT_S = 600  # then to its exit: its last events delivered, at the API server's pace
WORKER_STOPPED = re.compile(r"Worker '[^']*' stopped!")


def shard_config(directory: Path, feed_server, model: Path, database: str, **generation) -> Path:
    directory.mkdir()
    return write_config(
        directory,
        database=database,
        feeds=[{"name": n, "url": feed_server.url(f"/{n}")} for n in ("rss", "atom")],
        templates=[
            {"name": "ticker_outlook_ru", "generation": {"max_new_tokens": 12}},
            {"name": "morning_brief_ru", "generation": {"max_new_tokens": 12}},
        ],
        model=str(model),
        # Batches of two, a checkpoint every two steps: a kill finds rows in flight.
        generation={"device": "cpu", "batch_size": 2, "checkpoint_every": 2, **generation},
    )


def query(config_path: Path, sql: str) -> list[tuple]:
    with open_store(load_config(config_path).database_url) as store, store.reading() as session:
        return [tuple(row) for row in session.execute(text(sql))]


def start_worker(config_path: Path, shard: str, name: str, peers: str, kill_after: int, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(
        OMP_NUM_THREADS="1",
        PREFECT_HOME=str(tmp_path / f"prefect-{name}"),  # its own ephemeral server
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        YALM_FORECAST_LOCK_DIR=str(tmp_path / f"locks-{name}"),  # its own "GPU"
    )
    (tmp_path / "barrier").mkdir(exist_ok=True)
    command = [sys.executable, str(SHARD_CHILD), str(tmp_path / "barrier"), name, peers]
    command += [str(kill_after), "generate-shard", "--config", str(config_path), "--shard", shard]
    err = (tmp_path / f"{name}.err").open("wb")
    return subprocess.Popen(command, env=env, stderr=err, start_new_session=True), err


def finish(worker, err) -> tuple[int, str]:
    try:
        status = worker.wait(timeout=600)
    finally:
        # Whatever the worker started ends with it: its process group (a SIGKILLed worker's
        # temporary Prefect server is ended by its guard too: test_flows_kill).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        err.close()
    return status, Path(err.name).read_text()


@dataclass
class WorkerStop:
    """How a ``prefect worker start`` took SIGTERM."""

    stopped_s: float | None = None  # SIGTERM to "stopped!" (None: not within WORKER_STOP_S)
    status: int | None = None  # its exit status (None: it had not exited WORKER_EXIT_S later)
    left_running: int = 0  # processes it started still running WORKER_STOP_S after it ended


def stop_worker(worker: subprocess.Popen, log_path: Path) -> WorkerStop:
    """SIGTERM a worker's process group as a service manager would, and see it end (see the
    module docstring for its two clocks). Whatever is left of it, or of the flow runs it
    started, is SIGKILLed at the end: nothing outlives the test."""
    try:
        started = psutil.Process(worker.pid).children(recursive=True)  # its flow runs, if any
    except psutil.NoSuchProcess:
        started = []
    stop, began = WorkerStop(), time.monotonic()

    def said_stopped() -> bool:
        if stop.stopped_s is None and WORKER_STOPPED.search(log_path.read_text(errors="replace")):
            stop.stopped_s = time.monotonic() - began
        return stop.stopped_s is not None

    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGTERM)
    try:
        while not said_stopped() and worker.poll() is None:
            if time.monotonic() - began > WORKER_STOP_S:
                return stop
            time.sleep(0.05)
        stop.status = worker.wait(timeout=WORKER_EXIT_S)
        said_stopped()  # a worker that exits at once says so just before
    except subprocess.TimeoutExpired:
        pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()  # reaped: at once after SIGKILL
        alive = psutil.wait_procs(started, timeout=WORKER_STOP_S)[1]
        for process in alive:
            process.kill()
        stop.left_running = len(alive)
    return stop


def stored(err: str) -> int:
    return int(re.search(r"\): (\d+) forecasts stored", err).group(1))


@pytest.mark.slow
def test_two_shard_workers_on_postgres_each_forecast_once_and_a_killed_shard_rerun(
    prefect_harness, postgres_server, feed_server, tiny_store, tmp_path, monkeypatch
):
    from flows.pipeline import news_to_forecast

    monkeypatch.setenv("YALM_FORECAST_LOCK_DIR", str(tmp_path / "locks"))
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    feed_server.add("/atom", body=sample("global_markets_en.atom.xml"))
    reference = shard_config(
        tmp_path / "reference", feed_server, tiny_store, postgres_server.create_database()
    )
    summary = news_to_forecast(config_path=str(reference), as_of=AS_OF)
    assert summary.generate.generated == 7
    expected = query(reference, FORECASTS)

    sharded = shard_config(
        tmp_path / "sharded", feed_server, tiny_store, postgres_server.create_database()
    )
    assert main(["ingest", "--config", str(sharded)]) == 0
    assert main(["render", "--config", str(sharded), "--as-of", AS_OF]) == 0
    with open_store(load_config(sharded).database_url) as store:
        keys = [prompt.key for prompt in pending_prompts(store)]
    shards = [[key for key in keys if in_shard(key, index, 2)] for index in (0, 1)]
    assert len(keys) == 7 and all(shards), shards  # both workers have work

    # Shard 1's worker dies at its third checkpoint, after both have started generating.
    workers = [
        start_worker(sharded, "0/2", "w0", "w0,w1", 0, tmp_path),
        start_worker(sharded, "1/2", "w1", "w0,w1", 3, tmp_path),
    ]
    (status0, err0), (status1, err1) = [finish(*worker) for worker in workers]
    assert status0 == 0, err0[-3000:]
    assert status1 == -signal.SIGKILL, err1[-3000:]
    assert stored(err0) == len(shards[0]) and "0 held by other workers" in err0
    # The summary is the last line, after Prefect stopped the shard's temporary server.
    assert re.fullmatch(r"shard 0/2 \(.+\): \d+ forecasts stored, .*", err0.splitlines()[-1])
    done = query(sharded, FORECASTS)
    in_flight = {key for (key,) in query(sharded, "SELECT prompt_key FROM generation_state")}
    assert set(done) <= set(expected)  # what was committed is already final
    assert in_flight and in_flight <= set(shards[1]) - {row[0] for row in done}
    held = query(sharded, "SELECT DISTINCT claimed_by FROM prompts WHERE status = 'pending'")
    assert held == [("shard-1-of-2",)]  # the dead worker's lease still holds its shard

    # The re-run of shard 1 takes back its claims at once and resumes from the saved ids.
    rerun = start_worker(sharded, "1/2", "w1-rerun", "w1-rerun", 0, tmp_path)
    status, err = finish(*rerun)
    assert status == 0, err[-3000:]
    assert re.search(r"[1-9]\d* resumed", err), err[-3000:]
    assert stored(err0) + len(done) - len(shards[0]) + stored(err) == 7  # each generated once
    assert query(sharded, FORECASTS) == expected
    assert query(sharded, "SELECT count(*) FROM generation_state") == [(0,)]
    assert query(sharded, "SELECT status, count(*) FROM prompts GROUP BY status") == [("done", 7)]


def test_shards_are_stable_and_the_nightly_cut_is_balanced():
    keys = [f"{index:064x}" for index in range(0, 7000, 7)]
    cut = [[key for key in keys if in_shard(key, index, 3)] for index in range(3)]
    assert sorted(key for shard in cut for key in shard) == sorted(keys)
    assert [key for key in keys[5:] if in_shard(key, 1, 3)] == [k for k in cut[1] if k in keys[5:]]
    dealt = split_round_robin(keys[:7], 3)
    assert dealt == [keys[0:7:3], keys[1:7:3], keys[2:7:3]] and [len(s) for s in dealt] == [3, 2, 2]


@pytest.mark.slow
def test_the_nightly_flow_runs_its_shards_through_a_deployment_and_a_real_worker(
    prefect_harness, postgres_server, feed_server, tiny_store, tmp_path, monkeypatch
):
    """``run_deployment`` to a process work pool served by a real ``prefect worker start``."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import get_current_settings

    from flows.pipeline import generate_shard, news_to_forecast

    monkeypatch.setenv("YALM_FORECAST_LOCK_DIR", str(tmp_path / "locks"))
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    feed_server.add("/atom", body=sample("global_markets_en.atom.xml"))
    config = shard_config(
        tmp_path / "nightly", feed_server, tiny_store, postgres_server.create_database(),
        shards=2, deployment="generate-shard/test-gpu",
    )  # fmt: skip
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="test-gpu", type="process"), overwrite=True)
    repo = Path(__file__).resolve().parents[2]
    generate_shard.from_source(str(repo), "flows/pipeline.py:generate_shard").deploy(
        name="test-gpu", work_pool_name="test-gpu", print_next_steps=False
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_WORKER_QUERY_SECONDS": "1"}
    env["PREFECT_API_URL"] = get_current_settings().api.url
    log_path = tmp_path / "worker.log"
    log = log_path.open("wb")
    worker = subprocess.Popen(
        ["prefect", "worker", "start", "--pool", "test-gpu", "--limit", "2"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        summary = news_to_forecast(config_path=str(config), as_of=AS_OF)
    finally:
        stop = stop_worker(worker, log_path)
        log.close()
    # SIGTERM stops the worker at once; it then exits by itself, cleanly, leaving nothing behind.
    said = log_path.read_text(errors="replace")
    assert "Received SIGTERM" in said and stop.stopped_s is not None, said[-3000:]
    assert stop.status == 0 and stop.left_running == 0, (stop, said[-3000:])
    generated = summary.generate
    assert [run["completed"] for run in generated.shards] == [True, True]
    assert (generated.generated, generated.pending, generated.failures) == (7, 0, ())
    assert len(generated.run_ids) == 2 and "| generated | 7 |" in summary.markdown
    # The shard runs, which the worker ran in processes of its own, showed their progress too.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = ArtifactFilterKey(any_=["news-to-forecast-generation"])
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    finished = {str(each.flow_run_id) for each in artifacts if each.data == 100.0}
    assert {run["flow_run_id"] for run in generated.shards} <= finished
    assert query(config, "SELECT DISTINCT claimed_by FROM prompts ORDER BY 1") == [
        ("shard-0-of-2",),
        ("shard-1-of-2",),
    ]
