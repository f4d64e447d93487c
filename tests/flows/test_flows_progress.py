"""Progress where Prefect users look: the night's flow run tagged with its night, and progress
artifacts updated every few decode steps, best-effort.

The flow runs on a real Prefect server (``prefect_test_harness``) reached through a loopback
proxy that passes every byte on and notes the HTTP requests going by, so the updates counted
are the ones the server received. The publisher's own contract (never blocking the job, one
log line on failure) is proven against real sockets that refuse or never answer.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
from flows_testkit import LoopbackProxy, sample, wait_for, write_config

from flows.commands.cli import main
from flows.generation.progress import ProgressPublisher, ProgressSender
from flows.pipeline import prefect_progress  # Prefect set up at collection, as for the flow tests

AS_OF = "2024-05-14T06:00:00Z"


@pytest.fixture(autouse=True)
def private_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("YALM_FORECAST_LOCK_DIR", str(tmp_path / "locks"))


def progress_config(directory: Path, feed_server, model: Path) -> Path:
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    feed_server.add("/atom", body=sample("global_markets_en.atom.xml"))
    return write_config(
        directory,
        feeds=[{"name": n, "url": feed_server.url(f"/{n}")} for n in ("rss", "atom")],
        templates=[
            {"name": "ticker_outlook_ru", "generation": {"max_new_tokens": 16}},
            {"name": "morning_brief_ru", "generation": {"max_new_tokens": 16}},
        ],
        model=str(model),
        # Two rows a batch: each pair of forecasts is 16 decode steps, each step saved.
        generation={
            "device": "cpu",
            "batch_size": 2,
            "greedy": True,
            "checkpoint_every": 1,
            "progress_every_s": 0,
        },
    )


def test_a_night_under_prefect_is_tagged_and_shows_its_progress_every_few_steps(
    prefect_harness, feed_server, tiny_store, tmp_path, capsys, monkeypatch
):
    from prefect import get_client

    from flows.generation import forecasting

    # A decode step of the tiny model takes a few milliseconds, less than an update's round
    # trip: each step's save is made to take 30 ms, as on a slow disk, so that a forecast
    # lasts long enough to be seen more than once.
    save = forecasting.save_generation_states

    def slow_save(*args, **kwargs):
        time.sleep(0.03)
        return save(*args, **kwargs)

    monkeypatch.setattr(forecasting, "save_generation_states", slow_save)
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    config = progress_config(tmp_path, feed_server, tiny_store)
    server = get_current_settings().api.url
    with LoopbackProxy(server) as proxy, temporary_settings({PREFECT_API_URL: proxy.url + "/api"}):
        code = main(["run", "--config", str(config), "--as-of", AS_OF])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert "| generated | 7 |" in capsys.readouterr().out

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        artifacts = {
            kind: client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[f"news-to-forecast-{kind}"])
                )
            )
            for kind in ("generation", "scoring")
        }
    assert run.name.startswith("night of 2024-05-14T06:00:00") and "night:2024-05-14" in run.tags
    for kind, found in artifacts.items():
        [artifact] = [each for each in found if each.flow_run_id == run.id]
        assert (artifact.type, artifact.data) == ("progress", 100.0), kind
    [generation] = [each for each in artifacts["generation"] if each.flow_run_id == run.id]
    assert re.fullmatch(r"generation: (\d+) of \1 tokens, 7 of 7 forecasts", generation.description)

    # What the server was sent: every update of the generation artifact, in order.
    updates = [
        json.loads(request.body)
        for request in proxy.requests
        if request.method == "PATCH" and request.path == f"/api/artifacts/{generation.id}"
    ]
    progress = [update["data"] for update in updates]
    assert progress == sorted(progress) and progress[-1] == 100.0
    assert len(updates) > 7  # more updates than forecasts
    by_forecasts: dict[str, set[float]] = {}
    for update in updates:
        done = re.search(r"(\d+) of 7 forecasts", update["description"]).group(1)
        by_forecasts.setdefault(done, set()).add(update["data"])
    # Several values while one forecast was being generated: updated between forecasts, too.
    assert max(len(values) for values in by_forecasts.values()) > 1


def test_outside_a_prefect_run_there_is_nothing_to_publish_to():
    assert prefect_progress(5.0) is None


def refused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again: connections are refused


def test_a_refused_sender_fails_once_into_the_log_and_never_holds_the_job(caplog):
    url = f"http://127.0.0.1:{refused_port()}/artifacts"
    sender = ProgressSender(
        "the progress record at a dead server",
        create=lambda percent, text: httpx.post(url, json={"data": percent}, timeout=5),
        update=lambda handle, percent, text: httpx.patch(url, json={"data": percent}, timeout=5),
    )
    caplog.set_level(logging.WARNING, logger="flows.pipeline")
    began = time.perf_counter()
    with ProgressPublisher(sender, every_s=0) as publisher:
        for step in range(200):
            publisher.set(step / 2, f"{step} of 200 steps")
    assert time.perf_counter() - began < 5.0
    assert publisher.failed and publisher.updates == 0
    [line] = [record.getMessage() for record in caplog.records]
    assert line.startswith("progress: the progress record at a dead server: ")
    assert line.endswith("; not updated again this run")


def test_a_server_that_never_answers_cannot_stall_the_end_of_a_job(caplog):
    silent = socket.create_server(("127.0.0.1", 0))  # takes connections, never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/artifacts"
    sender = ProgressSender(
        "the progress record at a silent server",
        create=lambda percent, text: httpx.post(url, json={"data": percent}, timeout=60),
        update=lambda handle, percent, text: None,
    )
    caplog.set_level(logging.WARNING, logger="flows.pipeline")
    began = time.perf_counter()
    with ProgressPublisher(sender, every_s=5.0, close_timeout_s=0.5) as publisher:
        publisher.set(100.0, "done")
    assert time.perf_counter() - began < 3.0
    assert not publisher.failed  # still waiting, on its own thread, which the job left behind
    silent.close()  # the server goes away: the waiting call fails, once, into the log
    wait_for(lambda: publisher.failed, timeout_s=30.0)
    [line] = [record.getMessage() for record in caplog.records]
    assert line.startswith("progress: the progress record at a silent server: ")
