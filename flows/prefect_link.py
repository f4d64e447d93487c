"""The night's link to a Prefect server: what the night shows there, and going on without it.

A Prefect server is a view of the night (its runs, states, logs and artifacts), never a
condition of it: the store is the record. This module owns the parts of the flow that follow
from that:

- the views, best-effort, without retries and with a short timeout (``without_retries``): the
  run's tag (``tag_night``: ``night:2024-05-14``) and the progress artifacts of the scoring and
  generation jobs (``prefect_progress``, published by ``flows.generation.progress``);
- ``ServerLink``: one flow run's link, shared by everything that talks to the server for it in
  this process (the steps' caller, the progress publishers on their threads, the GPU slot) and
  by the command that started the run. Whoever first meets the server not answering
  (``prefect_unreachable``: a connection refused, reset or timed out on the way to its API)
  says so once (``ServerLink.lose``); from then on the run goes on without it: the steps run
  directly (``DetachingCaller``), Prefect's events and console lines are dropped. A step whose
  work was done when Prefect failed to record it keeps its result (``recorded``);
- handing the night's summary to the command that started the flow in its own process
  (``ServerLink.summary``), since Prefect's engine raises, instead of returning the run's
  state, when it cannot record the end of a run.

It knows nothing of what the steps do, the model or the store; the flow module (``pipeline``)
wires it in.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx

from flows.generation.progress import ProgressPublisher, ProgressSender, PublisherFactory
from flows.night.runner import one_line
from flows.night.steps import NightRef, Step
from flows.night.summaries import NightSummary

log = logging.getLogger("flows.pipeline")

VIEW_TIMEOUT_S = 10.0  # a Prefect call that is only a view of the night (progress, tags)
FLOW_NAME = "news-to-forecast"


@contextmanager
def without_retries() -> Iterator[None]:
    """Prefect calls in this block that are only a view of the night: no retries and a short
    timeout, so that a server that went away costs seconds, not minutes."""
    from prefect.settings import (
        PREFECT_API_REQUEST_TIMEOUT,
        PREFECT_CLIENT_MAX_RETRIES,
        temporary_settings,
    )

    updates = {PREFECT_CLIENT_MAX_RETRIES: 0, PREFECT_API_REQUEST_TIMEOUT: VIEW_TIMEOUT_S}
    with temporary_settings(updates=updates):
        yield


# ---- the link ---------------------------------------------------------------------------------


def prefect_unreachable(exc: BaseException | None) -> bool:
    """True when ``exc``, or what caused it, is the Prefect server not answering: a connection
    refused, reset or timed out on the way to its API (never a feed's error: feeds fail alone).
    A server that answers, even with an error (a busy database's 503), is not lost."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, httpx.TransportError) and _to_the_api(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _to_the_api(exc: httpx.TransportError) -> bool:
    from prefect.settings import get_current_settings

    try:
        url = str(exc.request.url)
    except RuntimeError:  # an error raised without its request
        return False
    api = get_current_settings().api.url
    return url.startswith(api.rstrip("/")) if api else "/api/" in url


@dataclass
class ServerLink:
    """One flow run's link to its server (see the module docstring): the night's summary once
    it ends, and where the server was lost (None while it answers)."""

    summary: NightSummary | None = None
    lost: str | None = None  # "at generate"
    # The publishers' threads may meet the loss as the night's own thread does.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def lose(self, exc: BaseException, where: str) -> None:
        """The server stopped answering (``exc``, met ``where``): said once, in the log; from
        now on the run goes on without it."""
        with self._lock:
            if self.lost is not None:
                return
            self.lost = f"at {where}"
        log.warning(
            "%s: the Prefect server stopped answering (%s); the night goes on without it, "
            "and the store keeps its record",
            where,
            one_line(exc),
        )
        _without_prefect()

    def met(self, exc: BaseException, where: str) -> bool:
        """Whether ``exc`` is the server not answering (lost, then, if not already)."""
        if not prefect_unreachable(exc):
            return False
        self.lose(exc, where)
        return True


_link: ContextVar[ServerLink | None] = ContextVar("yalm_forecast_server_link", default=None)


@contextmanager
def server_link() -> Iterator[ServerLink]:
    """The link of the flow runs in this block: the one already open (the command's, around
    the flow it starts), else a new one (a run that ``serve`` or a worker started)."""
    existing = _link.get()
    if existing is not None:
        yield existing
        return
    link = ServerLink()
    token = _link.set(link)
    try:
        yield link
    finally:
        _link.reset(token)


def current_link() -> ServerLink:
    """The open link, or a detached one that nothing else reads (outside ``server_link``)."""
    return _link.get() or ServerLink()


def _without_prefect() -> None:
    """The rest of this process without the server: the events Prefect would still send are
    dropped (each would cost seconds of reconnecting, at exit too), and Prefect's own log lines
    are silenced: they could only repeat that the server is gone, with tracebacks, on a
    terminal whose last line is the command's (the night's log has said it once)."""
    from prefect.events.clients import NullEventsClient
    from prefect.events.worker import EventsWorker

    EventsWorker.set_client_override(NullEventsClient)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.split(".")[0] in ("prefect", "EventsWorker") and isinstance(logger, logging.Logger):
            logger.disabled = True
    logging.raiseExceptions = False  # the log sender's "--- Error logging to API ---" lines


def quiet_after_loss(timeout_s: float = 5.0) -> None:
    """At the end of a command whose server was lost: give Prefect's log sender at most
    ``timeout_s`` to try what it still holds, and stop it, so that nothing it has to say comes
    after the command's last line."""
    from prefect.logging.handlers import APILogWorker

    _without_prefect()
    APILogWorker.drain_all(timeout=timeout_s, at_exit=False)


# What a task's body did, for the caller waiting on the task: its result, or its own error.
_outcome: ContextVar[dict[str, Any] | None] = ContextVar("yalm_forecast_step", default=None)


def recorded(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, noting its result (or its error) for a ``DetachingCaller`` waiting on the
    task it is the body of; nothing is noted when no caller waits."""

    @functools.wraps(function)
    def body(*args: Any, **kwargs: Any) -> Any:
        slot = _outcome.get()
        try:
            result = function(*args, **kwargs)
        except BaseException as exc:
            if slot is not None:
                slot["error"] = exc
            raise
        if slot is not None:
            slot["result"] = result
        return result

    return body


class DetachingCaller:
    """``run_night``'s way of calling a step under Prefect: as a task (``as_task``) while the
    server answers, directly once it is lost (see the module docstring).

    When a task call fails because the server did not answer, the step's own outcome decides:
    its result, if its body finished; its own error, if it raised one; otherwise the step runs
    directly. Once the link is lost the flow's own log lines are no longer sent to the server
    either. Use as a context manager around the night."""

    def __init__(self, link: ServerLink, as_task: Callable[[Step, str, NightRef], object]):
        self.link = link
        self.as_task = as_task
        self._stack = ExitStack()
        self._logs_kept_here = False

    def __enter__(self) -> DetachingCaller:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def __call__(self, step: Step, config_path: str, night: NightRef) -> object:
        if self.link.lost is not None:
            self._keep_logs_here()
            return step.run(config_path, night)
        slot: dict[str, Any] = {}
        token = _outcome.set(slot)
        try:
            return self.as_task(step, config_path, night)
        except Exception as exc:
            if not self.link.met(exc, step.name):
                raise
            self._keep_logs_here()
            if "error" in slot:
                raise slot["error"] from None
            if "result" in slot:
                return slot["result"]
        finally:
            _outcome.reset(token)
        return step.run(config_path, night)

    def _keep_logs_here(self) -> None:
        from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

        if not self._logs_kept_here:
            self._logs_kept_here = True
            self._stack.enter_context(temporary_settings({PREFECT_LOGGING_TO_API_ENABLED: False}))


# ---- the views --------------------------------------------------------------------------------


def tag_night(moment: datetime) -> None:
    """Tag this flow run with its night (``night:2024-05-14``, UTC) for the UI's filters;
    best-effort: a tag that cannot be written is logged, never the night's fault."""
    from prefect import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    tag = f"night:{moment.astimezone(timezone.utc):%Y-%m-%d}"
    try:
        with without_retries(), get_client(sync_client=True) as client:
            tags = client.read_flow_run(context.flow_run.id).tags
            if tag not in tags:
                client.update_flow_run(context.flow_run.id, tags=[*tags, tag])
    except Exception as exc:  # best-effort: the UI's filter, never the night
        if not current_link().met(exc, "the start"):
            log.warning("the flow run could not be tagged %s: %s", tag, one_line(exc))


def prefect_progress(every_s: float) -> PublisherFactory | None:
    """Progress artifacts (``news-to-forecast-generation``, ``news-to-forecast-scoring``) for
    the jobs of the Prefect run this is called in, updated at most every ``every_s`` seconds;
    None outside a run (nothing to attach them to) or once the server is lost."""
    from prefect.context import FlowRunContext, TaskRunContext

    link = current_link()
    if link.lost or (TaskRunContext.get() is None and FlowRunContext.get() is None):
        return None

    def publisher(kind: str) -> ProgressPublisher | None:
        if link.lost:
            return None
        key = f"{FLOW_NAME}-{kind}"
        sender = ProgressSender(
            f"the Prefect progress artifact {key}",
            create=lambda percent, text: _create_progress(link, key, f"{kind}: {text}", percent),
            update=lambda artifact, percent, text: _update_progress(
                link, artifact, f"{kind}: {text}", percent
            ),
        )
        return ProgressPublisher(sender, every_s=every_s)

    return publisher


def _create_progress(link: ServerLink, key: str, description: str, percent: float) -> Any:
    from prefect.artifacts import create_progress_artifact

    try:
        with without_retries():
            return create_progress_artifact(percent, key=key, description=description)
    except Exception as exc:
        link.met(exc, "generate")
        raise


def _update_progress(link: ServerLink, artifact_id: Any, description: str, percent: float):
    from prefect.artifacts import update_progress_artifact

    try:
        with without_retries():
            update_progress_artifact(artifact_id, percent, description=description)
    except Exception as exc:
        link.met(exc, "generate")
        raise
