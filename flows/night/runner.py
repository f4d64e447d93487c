"""Running one night: the steps in order, each failure kept where it happens, the night recorded.

Owns the night's bookkeeping: a ``nights`` row (``flows.store.nights``) started before the
first step and finished after the last with the outcome, the counts and the one-line cause; the
feeds, templates and prompts that failed on their own recorded against it; a step that raises
stops the night there, with its cause logged in full (traceback included: the log file is what
the 7 am reader opens) and kept to one line in the summary. A signal (Ctrl-C, SIGTERM) stops
the night as ``interrupted``: the step that was running and the night are recorded so, and the
rows in flight were saved by the job on the way out.

``run_night`` takes how to call a step: directly (the command line) or as a Prefect task (the
flow). ``signals_interrupt`` is the command line's signal handling: the first SIGINT/SIGTERM
raises ``NightInterrupted`` in the main thread, the second exits at once. Knows nothing of
Prefect.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timezone

from sqlalchemy import func, select, update

from flows.config import load_config
from flows.errors import NightInterrupted, StoreError, interrupt_signal
from flows.night.steps import STEPS, NightRef, Step
from flows.night.summaries import NightSummary, StepStop
from flows.store.database import open_store, tidy_after_run, utc_now
from flows.store.models import Generation, Run
from flows.store.nights import finish_night, record_failures, start_night

log = logging.getLogger("flows.pipeline")

StepCaller = Callable[[Step, str, NightRef], object]


def call_directly(step: Step, config_path: str, night: NightRef) -> object:
    return step.run(config_path, night)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def run_night(
    config_path: str,
    as_of: datetime | None = None,
    *,
    steps: Sequence[Step] = STEPS,
    call: StepCaller = call_directly,
) -> NightSummary:
    """Run ``steps`` for the night ``as_of`` (default now); never raises for a failed step or a
    signal: the summary says how the night ended (``summary.outcome``)."""
    config = load_config(config_path)
    moment = (as_of or utc_now()).astimezone(timezone.utc)
    night_as_of = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    with open_store(config.database_url) as store:
        night_id = start_night(store, moment)
        started = utc_now()
    summary = NightSummary(as_of=night_as_of, night_id=night_id)
    night = NightRef(night_id, night_as_of)
    log.info("night %d (as of %s): started", night_id, night_as_of)
    try:
        for step in steps:
            try:
                result = call(step, config_path, night)
            except BaseException as exc:
                signum = interrupt_signal(exc)
                if signum is None and not isinstance(exc, Exception):
                    raise
                _stopped(summary, step.name, exc, signum)
                break
            if hasattr(summary, step.name) and step.name != "extra":
                setattr(summary, step.name, result)
            else:
                summary.extra[step.name] = result
    finally:
        _finish(config.database_url, summary, moment, started)
    return summary


def _stopped(summary: NightSummary, step: str, exc: BaseException, signum: int | None) -> None:
    if signum is not None:
        name = signal.Signals(signum).name
        cause = f"interrupted by {name}; what was stored stays: run the same command to resume"
        log.warning("%s: %s", step, cause)
    else:
        cause = one_line(exc)
        log.error("%s failed: %s", step, cause, exc_info=exc)
    summary.stopped = StepStop(step, cause, signum)


def _finish(database_url: str, summary: NightSummary, moment: datetime, started: datetime) -> None:
    """Record how the night ended. Best-effort on the way out of an interrupt: a store that
    cannot be written now is said in the log, never turned into another error."""
    try:
        with open_store(database_url) as store:
            summary.stored = _stored_since(store, started)
            if summary.stopped is not None and summary.stopped.interrupted_by is not None:
                _mark_running_runs(store, started)
            failures = summary.failures
            record_failures(
                store,
                summary.night_id,
                moment,
                [(each.kind, each.name, each.version, each.cause) for each in failures],
            )
            finish_night(
                store,
                summary.night_id,
                summary.outcome.word,
                stored=summary.stored,
                failed=sum(each.kind == "prompt" for each in failures),
                cause=summary.cause() or None,
            )
    except StoreError as exc:
        log.error("night %s: could not record its end: %s", summary.night_id, exc)
        return
    log.info(
        "night %d (as of %s): %s, %d forecasts stored%s",
        summary.night_id,
        summary.as_of,
        summary.outcome.word,
        summary.stored,
        f"; {summary.cause()}" if summary.cause() else "",
    )


def _stored_since(store, started: datetime) -> int:
    with store.reading() as session:
        query = select(func.count()).select_from(Generation)
        return session.scalar(query.where(Generation.created_at >= started)) or 0


def _mark_running_runs(store, started: datetime) -> None:
    """The step runs this night left ``running`` when the signal came: ``interrupted``."""
    with store.transaction() as session:
        session.execute(
            update(Run)
            .where(Run.status == "running", Run.started_at >= started)
            .values(status="interrupted", finished_at=utc_now())
        )


@contextmanager
def signals_interrupt(on_second: Callable[[int], None] | None = None) -> Iterator[None]:
    """SIGINT/SIGTERM raise ``NightInterrupted`` once; a second one exits at once (128 + its
    number) after ``on_second`` says so. Main thread only (signals are delivered there)."""
    seen: list[int] = []

    def handle(signum: int, frame: object) -> None:
        if seen:
            if on_second is not None:
                with suppress(Exception):
                    on_second(signum)
            sys.stderr.flush()
            os._exit(128 + signum)
        seen.append(signum)
        raise NightInterrupted(signum)

    previous = {each: signal.signal(each, handle) for each in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)


def publish_summary(config_path: str, summary: NightSummary) -> str:
    """The night's table (and the count of its forecasts visible in forecasts_v1), logged."""
    from datetime import timedelta

    from flows.commands.console import run_markdown
    from flows.store.robot import read_forecasts

    config = load_config(config_path)
    # End with the store's statistics fresh and its WAL truncated (each step's run did too;
    # this covers a step that stopped before recording its run).
    with open_store(config.database_url) as store:
        tidy_after_run(store)
    run_ids = set(summary.generate.run_ids if summary.generate else ())
    if run_ids:
        since = datetime.now(timezone.utc) - timedelta(days=2)
        rows = read_forecasts(config.database_url, since=since)
        summary.visible = sum(row.run_id in run_ids for row in rows)
        log.info("publish: %d forecasts of this night are in forecasts_v1", summary.visible)
    markdown = run_markdown(summary)
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith(("| step", "| ---")):
            log.info("summary %s", line)
    summary.markdown = markdown
    return markdown
