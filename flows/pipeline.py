"""The ``news-to-forecast`` Prefect flow: ingest, render, generate, publish.

Each task is one library call on a config path (tasks take paths and keys, never the engine):
``ingest_feeds``, ``render_prompts``, ``generate_pending``, and publishing the run's summary as
a markdown artifact and in the log. Correctness never depends on Prefect's state or result
cache: a killed run leaves Prefect's record stuck in RUNNING, and the next run resumes from the
store alone (``flows.forecasting``).

Retries are for transient faults only (``is_transient``: a locked or busy database, an I/O
error, a network error); a bad config, a broken checkpoint, a budget that cannot hold the model
or running out of memory fail the run at once with the reason. Feed faults are retried inside
``ingest_feeds`` per feed, so one dead feed costs its own retries, not the run's.

Only one generation uses the GPU at a time. On one machine the guarantee is the device lock
(``flows.devicelock``: released by the kernel even when a run is SIGKILLed). When a Prefect
server is configured (``PREFECT_API_URL``; also under ``prefect_test_harness``), generation also
holds a slot of the global concurrency limit ``yalm-forecast-gpu`` (created with limit 1 when
missing), which makes the limit visible in the UI and holds across machines; its lease expires
if the holder dies. With no server (Prefect's ephemeral mode) that limit is skipped, and the log
says so: an ephemeral server keeps leases in memory, so a killed holder's slot would never be
given back.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.config import load_config
from flows.console import attach_log_file, progress, run_markdown
from flows.devicelock import device_lock
from flows.errors import PipelineError
from flows.forecasting import generate_pending
from flows.ingest import ingest_feeds
from flows.rendering import render_run
from flows.store import open_store

FLOW_NAME = "news-to-forecast"
GPU_LIMIT = "yalm-forecast-gpu"
GPU_LEASE_S = 120.0  # renewed while generating; a dead holder's slot returns after this
ARTIFACT_KEY = "news-to-forecast-run"
RETRY_DELAYS_S = [10, 60]
log = logging.getLogger("flows.pipeline")

_NOT_TRANSIENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException | None) -> bool:
    """True for faults a retry can cure: locked/busy database, I/O errors, network errors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.OperationalError):
            text = str(exc).lower()
            return any(word in text for word in ("locked", "busy", "disk i/o"))
        if isinstance(exc, OSError) and not isinstance(exc, _NOT_TRANSIENT_OS):
            return True
        if isinstance(exc, httpx.TransportError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _retry_if_transient(task_, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:
        transient = is_transient(exc)
        if not transient:
            log.info("%s: not retried (%s)", task_.name, type(exc).__name__)
        return transient
    return False


TRANSIENT_RETRIES = dict(
    retries=len(RETRY_DELAYS_S),
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=_retry_if_transient,
)


@task(name="ingest", **TRANSIENT_RETRIES)
def ingest(config_path: str) -> dict[str, Any]:
    """Fetch every enabled feed and store the new items."""
    config = load_config(config_path)
    with open_store(config.database_url) as store:
        report = ingest_feeds(config, store)
    failed = [{"feed": feed.feed, "reason": feed.reason} for feed in report.failed]
    new_items = sum(feed.items_new for feed in report.feeds)
    log.info("ingest: %d feeds, %d new items, %d failed", len(report.feeds), new_items, len(failed))
    for item in failed:
        log.warning("ingest: feed %s failed: %s", item["feed"], item["reason"])
    return {
        "run_id": report.run_id,
        "feeds": len(report.feeds),
        "new_items": new_items,
        "failed": failed,
    }


@task(name="render", **TRANSIENT_RETRIES)
def render(config_path: str, as_of: str | None = None) -> dict[str, Any]:
    """Render the configured templates over stored news into pending prompts."""
    from flows.cli import resolve_tokenizer_path
    from yalm_runner.tokenizer import Tokenizer

    config = load_config(config_path)
    tokenizer = Tokenizer(resolve_tokenizer_path(config))
    moment = datetime.fromisoformat(as_of.replace("Z", "+00:00")) if as_of else None
    with open_store(config.database_url) as store:
        outcomes = render_run(
            config, store, count_tokens=lambda text: len(tokenizer.encode(text)), as_of=moment
        )
    counts = {status: 0 for status in ("new", "existing", "skipped")}
    for outcome in outcomes:
        counts[outcome.status] += 1
    log.info(
        "render: %d new prompts, %d already queued, %d skipped for lack of news",
        counts["new"],
        counts["existing"],
        counts["skipped"],
    )
    return counts


@contextmanager
def gpu_slot(device: str) -> Iterator[None]:
    """Hold the device lock, and the Prefect limit's slot when a server is configured."""
    from prefect.settings import get_current_settings

    from yalm_runner.session import resolve_device

    with device_lock(resolve_device(device).type) as path:
        if not get_current_settings().api.url:
            log.info(
                "generate: no Prefect server configured; one generation at a time is enforced "
                "by the device lock %s only (no global concurrency limit in ephemeral mode)",
                path,
            )
            yield
            return
        from prefect.concurrency.sync import concurrency

        _ensure_gpu_limit()
        with concurrency(GPU_LIMIT, occupy=1, lease_duration=GPU_LEASE_S, strict=True):
            yield


def _ensure_gpu_limit() -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # another run created it just now
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1)
                )
            log.info("generate: created the global concurrency limit %s (1 slot)", GPU_LIMIT)


@task(name="generate", tags=["gpu"], **TRANSIENT_RETRIES)
def generate(config_path: str) -> dict[str, Any]:
    """Generate every pending prompt, one forecast committed at a time (resumable)."""
    config = load_config(config_path)
    with (
        gpu_slot(config.generation.device),
        open_store(config.database_url) as store,
        progress("generating forecasts") as on_progress,
    ):
        report = generate_pending(config, store, on_progress=on_progress)
    log.info(
        "generate: %d forecasts stored, %d failed, %d resumed; %d new tokens at %.1f tokens/s",
        report.generated,
        report.failed,
        report.resumed,
        report.new_tokens,
        report.tokens_per_s,
    )
    for key, reason in report.failures:
        log.warning("generate: prompt %s failed: %s", key[:12], reason)
    return report.as_dict()


@task(name="publish", **TRANSIENT_RETRIES)
def publish(config_path: str, summary: dict[str, Any]) -> str:
    """Check the run's forecasts are in the robot's view; leave the summary table behind."""
    from flows.robot import read_forecasts

    config = load_config(config_path)
    run_id = (summary.get("generate") or {}).get("run_id")
    if run_id is not None:
        since = datetime.now(timezone.utc) - timedelta(days=2)
        rows = read_forecasts(config.database_url, since=since)
        visible = sum(row.run_id == run_id for row in rows)
        summary = {**summary, "visible": visible}
        log.info("publish: %d forecasts of this run are in forecasts_v1", visible)
    markdown = run_markdown(summary)
    create_markdown_artifact(
        markdown, key=ARTIFACT_KEY, description="What one news-to-forecast run did"
    )
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith(("| step", "| ---")):
            log.info("summary %s", line)
    return markdown


@flow(name=FLOW_NAME, log_prints=True)
def news_to_forecast(config_path: str, as_of: str | None = None) -> dict[str, Any]:
    """Fetch the feeds, render the prompts, generate the forecasts, publish the run's summary.

    ``as_of`` (ISO time) renders as if it were then; default now.
    """
    attach_log_file(load_config(config_path).log_file)
    summary: dict[str, Any] = {"as_of": as_of}
    summary["ingest"] = ingest(config_path)
    summary["render"] = render(config_path, as_of)
    try:
        summary["generate"] = generate(config_path)
    except Exception as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        log.error("generate: %s", summary["error"])
        publish(config_path, summary)
        raise
    summary["markdown"] = publish(config_path, summary)
    return summary


def serve(config_path: str) -> None:
    """Serve the flow with the config's nightly cron schedule in its time zone (blocks)."""
    from prefect.schedules import Cron
    from prefect.settings import get_current_settings

    config = load_config(config_path)
    if not get_current_settings().api.url:
        raise PipelineError(
            "serve: no Prefect server configured (PREFECT_API_URL is unset), and Prefect's "
            "temporary server runs no schedules; start one with `prefect server start` and "
            "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`, or have cron call "
            "`yalm-forecast run`"
        )
    log.info(
        "serve: %s nightly at '%s' (%s) with %s",
        FLOW_NAME,
        config.schedule.cron,
        config.schedule.timezone,
        config_path,
    )
    news_to_forecast.serve(
        name="nightly",
        schedules=[Cron(config.schedule.cron, timezone=config.schedule.timezone)],
        parameters={"config_path": config_path},
        global_limit=1,  # never two overnight runs at once
    )
