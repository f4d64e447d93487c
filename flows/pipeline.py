"""The ``news-to-forecast`` Prefect flow: ingest, render, generate, publish.

Each task is one library call on a config path (tasks take paths and keys, never the engine):
``ingest_feeds``, ``render_prompts``, ``generate_pending`` (which scores the signals first, in
the same model session), and publishing the run's summary as
a markdown artifact and in the log. Correctness never depends on Prefect's state or result
cache: a killed run leaves Prefect's record stuck in RUNNING, and the next run resumes from the
store alone (``flows.generation.forecasting``).

Retries are for transient faults only (``is_transient``: a locked or busy database, an I/O
error, a network error); a bad config, a broken checkpoint, a budget that cannot hold the model
or running out of memory fail the run at once with the reason. Feed faults are retried inside
``ingest_feeds`` per feed, so one dead feed costs its own retries, not the run's.

The server is a view of the night, never a condition of it (``flows.prefect_link``): the run is
tagged with its night and its jobs keep progress artifacts, best-effort; a server that stops
answering is never retried against (not a transient fault of a step), and the night goes on
without it, each step in this process.

Only one generation uses the GPU at a time. On one machine the guarantee is the device lock
(``flows.generation.devicelock``: released by the kernel even when a run is SIGKILLed). When a
Prefect
server is configured (``PREFECT_API_URL``; also under ``prefect_test_harness``), generation also
holds a slot of the global concurrency limit ``yalm-forecast-gpu`` (created with limit 1 when
missing), which makes the limit visible in the UI and holds across machines; its lease expires
if the holder dies. With no server (Prefect's ephemeral mode) that limit is skipped, and the log
says so: an ephemeral server keeps leases in memory, so a killed holder's slot would never be
given back.

Several hosts: with ``generation.shards`` > 1 and ``generation.deployment`` (the
``generate-shard`` flow deployed to a work pool whose workers run on the GPU hosts), the nightly
flow cuts the pending prompts into that many shards (``flows.generation.shards``) and starts one
run of the
deployment per shard with Prefect's ``run_deployment``, each inside a task so that they run at
once, and waits for them. Each shard run claims its prompts (``flows.store.claims``) under the
shard's
worker id, so it is resumable on its own: run it again and it takes back its claims and resumes
from the saved ids. Without a Prefect server (no workers to reach) the nightly flow generates
everything in its own process, as with one host.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from typing import Any

import httpx
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.commands.console import attach_log_file, run_markdown
from flows.config import load_config
from flows.errors import PipelineError
from flows.generation.shards import (
    check_shard,
    in_shard,
    shard_report,
    shard_worker_id,
    split_round_robin,
)
from flows.night.runner import publish_summary, run_night
from flows.night.steps import NightRef, Step, generate_step, ingest_step, render_step
from flows.night.summaries import Failure, GenerateSummary, NightSummary, Outcome
from flows.prefect_link import (
    FLOW_NAME,
    DetachingCaller,
    ServerLink,
    current_link,
    prefect_progress,
    prefect_unreachable,
    recorded,
    server_link,
    tag_night,
)
from flows.store.database import open_store, utc_now
from flows.store.generations import pending_prompts

SHARD_FLOW_NAME = "generate-shard"
GPU_LIMIT = "yalm-forecast-gpu"
GPU_LEASE_S = 120.0  # renewed while generating; a dead holder's slot returns after this
ARTIFACT_KEY = "news-to-forecast-run"
RETRY_DELAY_S = 30  # one number: the UI shows a list of delays as "NaNs"
RETRIES = 2
log = logging.getLogger("flows.pipeline")

_NOT_TRANSIENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


# PostgreSQL error classes a retry can cure: connection lost or refused (08), serialization
# failure or deadlock (40), too many connections or out of disk (53), server shutting down or
# starting (57P). A wrong password (28) or a missing database (3D) is not among them.
_TRANSIENT_SQLSTATES = ("08", "40", "53", "57P")


def is_transient(exc: BaseException | None) -> bool:
    """True for faults a retry can cure: locked/busy database, I/O errors, network errors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.OperationalError):
            text = str(exc).lower()
            return any(word in text for word in ("locked", "busy", "disk i/o"))
        postgres = _postgres_transient(exc)
        if postgres is not None:
            return postgres
        if isinstance(exc, OSError) and not isinstance(exc, _NOT_TRANSIENT_OS):
            return True
        if isinstance(exc, httpx.TransportError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _postgres_transient(exc: BaseException) -> bool | None:
    """For a psycopg error: whether a retry can cure it; None for anything else."""
    try:
        import psycopg
    except ImportError:  # SQLite only: no psycopg errors to meet
        return None
    if not isinstance(exc, psycopg.Error):
        return None
    # A failed connection attempt carries no SQLSTATE (libpq reports it), so its text decides:
    # refused or reset is worth a retry, a missing database or a refused login is not.
    state = getattr(exc, "sqlstate", None)
    if state is None:
        text = str(exc).lower()
        refused_for_good = ("does not exist", "authentication failed", "pg_hba.conf", "password")
        return isinstance(exc, psycopg.OperationalError) and not any(
            words in text for words in refused_for_good
        )
    return state.startswith(_TRANSIENT_SQLSTATES)


def _retry_if_transient(task_, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:
        # A Prefect server that stopped answering is not the step's fault: the night goes on
        # without it (``prefect_link.DetachingCaller``) rather than retrying against it.
        transient = is_transient(exc) and not prefect_unreachable(exc)
        if not transient:
            log.info("%s: not retried (%s)", task_.name, type(exc).__name__)
        return transient
    return False


TRANSIENT_RETRIES = dict(
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAY_S,
    retry_condition_fn=_retry_if_transient,
)


ingest = task(name="ingest", **TRANSIENT_RETRIES)(recorded(ingest_step))
render = task(name="render", **TRANSIENT_RETRIES)(recorded(render_step))
_TASKS = {"ingest": ingest, "render": render}


@contextmanager
def gpu_slot() -> Iterator[None]:
    """A slot of the global concurrency limit when a server is configured (the device lock is
    taken by the step itself, ``flows.night.steps.generate_step``)."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        log.info(
            "generate: no Prefect server configured; one generation at a time is enforced by "
            "the device lock only (no global concurrency limit in ephemeral mode)"
        )
        yield
        return
    from prefect.concurrency.sync import concurrency

    _ensure_gpu_limit()
    # A lease that cannot be renewed (the server went away) must not stop the generation: the
    # device lock is the guarantee on this machine, and the lease runs out on its own.
    slot = concurrency(GPU_LIMIT, occupy=1, lease_duration=GPU_LEASE_S, strict=True,
                       raise_on_lease_renewal_failure=False)  # fmt: skip
    with _released_best_effort(slot):
        yield


@contextmanager
def _released_best_effort(slot) -> Iterator[None]:
    """Hold ``slot`` (a context manager); a release that fails because the server stopped
    answering is logged, not raised (the lease runs out on its own), and never hides the
    error of the block."""
    slot.__enter__()
    try:
        yield
    except BaseException as exc:
        try:
            slot.__exit__(type(exc), exc, exc.__traceback__)
        except Exception as failure:
            if failure is not exc and not current_link().met(failure, "generate"):
                raise
        raise
    try:
        slot.__exit__(None, None, None)
    except Exception as failure:
        if not current_link().met(failure, "generate"):
            raise
        log.info("generate: the GPU slot's lease runs out on its own within %.0f s", GPU_LEASE_S)


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


@task(name="generate", **TRANSIENT_RETRIES)
def generate(
    config_path: str,
    night: NightRef | None = None,
    keys: list[str] | None = None,
    worker_id: str | None = None,
) -> GenerateSummary:
    """Score the pending signals, then claim and generate the pending prompts (only ``keys``, if
    given), in one model session, each signal and forecast committed on its own (resumable);
    ``worker_id`` defaults to this host and device."""
    every_s = load_config(config_path).generation.progress_every_s
    with gpu_slot():
        return recorded(generate_step)(config_path, night or NightRef(None, ""), keys, worker_id,
                                       publish=prefect_progress(every_s))  # fmt: skip


@task(name="publish", **TRANSIENT_RETRIES)
def publish(config_path: str, summary: NightSummary) -> str:
    """Check the night's forecasts are in the robot's view; leave the summary table behind."""
    markdown = publish_summary(config_path, summary)
    with suppress(Exception):  # best-effort: the UI's copy never fails the night
        create_markdown_artifact(
            markdown, key=ARTIFACT_KEY, description="What one news-to-forecast night did"
        )
    return markdown


def _call_as_task(step: Step, config_path: str, night: NightRef) -> object:
    """Each step a Prefect task (retried for transient faults); generate through
    ``generate_all`` (shards when configured), tagged ``gpu`` only when it runs on one."""
    if step.name == "generate":
        return generate_all(config_path, night)
    wrapped = _TASKS.get(step.name) or task(name=step.name, **TRANSIENT_RETRIES)(recorded(step.run))
    return wrapped(config_path, night)


def _night_run_name() -> str:
    from prefect.runtime import flow_run

    as_of = flow_run.parameters.get("as_of") or datetime.now(timezone.utc).strftime(
        "%Y-%m-%dT%H:%MZ"
    )
    return f"night of {as_of}"


def night_state(summary: NightSummary):
    """The flow run's final state for how the night ended (docs/night.md): ``Completed`` when
    done; ``Failed`` named ``Partial`` for a partial night (red in the UI and counted, the cause
    as its message); ``Cancelled`` when interrupted; ``Failed`` when nothing could run. The
    summary is the state's data either way (``state.result(raise_on_failure=False)``)."""
    from prefect.states import Cancelled, Completed, Failed

    cause = summary.cause()
    outcome = summary.outcome
    if outcome is Outcome.DONE:
        return Completed(data=summary, message=f"done: {summary.stored} forecasts stored")
    if outcome is Outcome.PARTIAL:
        return Failed(data=summary, name="Partial", message=f"partial: {cause}")
    if outcome is Outcome.INTERRUPTED:
        return Cancelled(data=summary, message=f"interrupted: {cause}")
    return Failed(data=summary, message=f"failed: {cause}")


@flow(name=FLOW_NAME, log_prints=True, flow_run_name=_night_run_name)
def news_to_forecast(config_path: str, as_of: str | None = None):
    """Fetch the feeds, render the prompts, generate the forecasts, publish the night's summary.

    ``as_of`` (ISO time) renders as if it were then; default now. A failed step stops the night
    with its cause (``summary.stopped``), a failed feed, template or prompt only itself. The
    run ends in the state ``night_state`` maps the outcome to; its data is the ``NightSummary``.
    """
    attach_log_file(load_config(config_path).log_file)
    moment = datetime.fromisoformat(as_of.replace("Z", "+00:00")) if as_of else utc_now()
    with server_link() as link, DetachingCaller(link, _call_as_task) as call:
        tag_night(moment)
        summary = run_night(config_path, moment, call=call)
        _publish(config_path, summary, link)
        link.summary = summary
    return night_state(summary)


def _publish(config_path: str, summary: NightSummary, link: ServerLink) -> None:
    """The ``publish`` task while the server answers; once it does not, the table alone (the
    step may run twice: it tidies the store and counts what the robot sees)."""
    try:
        if link.lost is None:
            try:
                publish(config_path, summary)
                return
            except Exception as exc:
                if not link.met(exc, "publish"):
                    raise
        publish_summary(config_path, summary)
    except Exception as exc:  # the forecasts are stored: the table is only a copy of them
        log.error("publish failed: %s", exc, exc_info=exc)
        summary.markdown = run_markdown(summary)


def generate_all(config_path: str, night: NightRef) -> GenerateSummary:
    """Every pending prompt: in shard runs on the workers when configured, else in-process."""
    from prefect.settings import get_current_settings

    settings = load_config(config_path).generation
    if settings.shards > 1 and settings.deployment:
        if get_current_settings().api.url:
            return generate_in_shards(config_path, settings.shards, settings.deployment)
        log.warning(
            "generate: %d shards configured, but no Prefect server (PREFECT_API_URL) to reach "
            "the workers through; generating every shard in this process",
            settings.shards,
        )
    on_gpu = not str(settings.device).startswith("cpu")
    return generate.with_options(tags=["gpu"] if on_gpu else [])(config_path, night)


@task(name="run-shard")
def run_shard(
    deployment: str, config_path: str, shard_index: int, shard_count: int, keys: list[str]
) -> dict[str, Any]:
    """Start one run of the shard deployment and wait for it to end (a subflow of this task)."""
    from prefect.deployments import run_deployment

    run = run_deployment(
        name=deployment,
        parameters={
            "config_path": config_path,
            "shard_index": shard_index,
            "shard_count": shard_count,
            "keys": keys,
        },
        flow_run_name=f"shard {shard_index + 1} of {shard_count} ({len(keys)} prompts)",
        timeout=None,  # as long as the shard takes
    )
    state = run.state
    log.info("generate: shard %d/%d: %s", shard_index, shard_count, state.name if state else "?")
    return {"flow_run_id": str(run.id), "state": state.name if state else None,
            "completed": bool(state and state.is_completed())}  # fmt: skip


def generate_in_shards(config_path: str, shard_count: int, deployment: str) -> GenerateSummary:
    """Cut the pending prompts into shards, run each through ``deployment``, sum them up."""
    config = load_config(config_path)
    with open_store(config.database_url) as store:
        keys = _pending_keys(store)
    shards = [shard for shard in split_round_robin(keys, shard_count) if shard]
    log.info(
        "generate: %d pending prompts in %d shards through the deployment %s",
        len(keys),
        len(shards),
        deployment,
    )
    futures = [
        run_shard.submit(deployment, config_path, index, shard_count, shard)
        for index, shard in enumerate(shards)
    ]
    runs = [future.result() for future in futures]
    with open_store(config.database_url) as store:
        report = shard_report(store, keys)
    unfinished = [run for run in runs if not run["completed"]]
    if unfinished:
        raise PipelineError(
            f"generate: {len(unfinished)} of {len(runs)} shard runs did not complete ("
            + ", ".join(f"{run['flow_run_id']}: {run['state']}" for run in unfinished)
            + f"); {report['pending']} prompts are still pending: run those shard runs again"
        )
    return GenerateSummary(
        run_id=(report["run_ids"] or [None])[0],
        run_ids=tuple(report["run_ids"]),
        pending=report["pending"],
        generated=report["generated"],
        resumed=report["resumed"],
        batch_size=report["batch_size"],
        device=report["device"],
        new_tokens=report.get("new_tokens", 0),
        tokens_per_s=report.get("tokens_per_s", 0.0),
        failures=tuple(
            Failure("prompt", key, reason) for key, reason in report.get("failures", [])
        ),
        shards=tuple(runs),
    )


def _pending_keys(store) -> list[str]:
    """The prompts with a forecast or a signal to make, oldest first: what shards are cut from."""
    from flows.store.signals import pending_signals

    keys = [prompt.key for prompt in pending_prompts(store)]
    return keys + sorted({signal.key for signal in pending_signals(store)} - set(keys))


@flow(name=SHARD_FLOW_NAME, log_prints=True)
def generate_shard(
    config_path: str,
    shard_index: int = 0,
    shard_count: int = 1,
    keys: Sequence[str] | None = None,
) -> GenerateSummary:
    """Generate one shard of the pending prompts, resumable on its own.

    The shard is ``keys`` when given (the nightly flow's cut), else the pending prompts whose
    key falls in shard ``shard_index`` of ``shard_count``. Its worker id is the shard's own
    (``shard-0-of-2``), so a re-run, on any host, takes back the shard's claims at once.
    """
    config = load_config(config_path)
    attach_log_file(config.log_file)
    worker_id = shard_worker_id(shard_index, shard_count)
    if keys is None:
        check_shard(shard_index, shard_count)
        with open_store(config.database_url) as store:
            keys = [key for key in _pending_keys(store) if in_shard(key, shard_index, shard_count)]
    return generate(config_path, keys=list(keys), worker_id=worker_id)


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
