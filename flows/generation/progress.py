"""How far a job is, for someone watching from afar (a Prefect UI), published best-effort.

Owns two small things:

- ``TokenProgress``: the share of a generation job's tokens done. The engine reports each decode
  step's new tokens (``on_step``, one per row in flight); a row that ends early (EOS, a stop
  string) counts its unused budget as done, so a finished job is at exactly 100. It counts;
  it never waits.
- ``ProgressPublisher``: hands the latest value to a sender on a thread of its own: the sender
  creates the record once, then updates it at most once every ``every_s`` seconds with the
  newest value (a value that arrives meanwhile replaces the one waiting, so a slow sender costs
  updates, never the job's time). The first failure is logged once and the publisher goes quiet
  (no retries: a server that went away must not cost the night anything); ``close`` sends the
  last value and waits for it at most ``close_timeout_s``.

The thread runs in a copy of the starting thread's context variables, so a sender that relies
on them (Prefect's run and settings contexts) sees the run that started it. It knows nothing of
Prefect (the flow module gives the sender), the engine or the store.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("flows.pipeline")

DEFAULT_CLOSE_TIMEOUT_S = 3.0  # the most the end of a job waits for its last update


@dataclass(frozen=True)
class ProgressSender:
    """How one kind of record is kept: ``create(percent, text)`` returns its handle,
    ``update(handle, percent, text)`` changes it. Both are called on the publisher's thread."""

    name: str  # for the log: "the Prefect progress artifact news-to-forecast-generation"
    create: Callable[[float, str], Any]
    update: Callable[[Any, float, str], None]


# What a step is given to publish a job's progress: the job's kind ("generation", "scoring")
# -> a publisher, or None when there is nowhere to publish (no Prefect run, say).
PublisherFactory = Callable[[str], "ProgressPublisher | None"]


class ProgressPublisher:
    """The latest (percent, text) of one job, published on a thread of its own (see the module
    docstring). Use as a context manager around the job: entering starts it, leaving closes."""

    def __init__(
        self,
        sender: ProgressSender,
        *,
        every_s: float,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
    ):
        self.sender = sender
        self.every_s = every_s
        self.close_timeout_s = close_timeout_s
        self.updates = 0  # updates the sender took (the creation not counted)
        self.failed = False
        self._latest: tuple[float, str] = (0.0, "")
        self._news = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProgressPublisher:
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._publish,), name="progress-publisher", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def set(self, percent: float, text: str) -> None:
        """The newest value; returns at once (called from the job's loop)."""
        self._latest = (percent, text)
        self._news.set()

    def close(self) -> None:
        """Publish the last value, waiting for it at most ``close_timeout_s``."""
        self._closing.set()
        self._news.set()
        if self._thread is not None:
            self._thread.join(self.close_timeout_s)

    def _publish(self) -> None:
        try:
            sent = self._latest
            handle = self.sender.create(*sent)
            while True:
                self._news.wait()
                self._news.clear()
                latest = self._latest
                if latest != sent:
                    self.sender.update(handle, *latest)
                    sent = latest
                    self.updates += 1
                if self._closing.is_set():
                    if self._latest == sent:
                        return
                    continue  # a value came in while the last one was sent
                self._closing.wait(self.every_s)  # the rate limit; closing cuts it short
        except Exception as exc:  # best-effort by contract: the job goes on without it
            text = " ".join(str(exc).split()) or type(exc).__name__
            log.warning("progress: %s: %s; not updated again this run", self.sender.name, text)
            self.failed = True  # after the line: whoever sees the flag finds it in the log


class TokenProgress:
    """The share of a generation job's token budget done (see the module docstring), set on a
    publisher after every decode step."""

    def __init__(self, publisher: ProgressPublisher, total_tokens: int, forecasts: int):
        self.publisher = publisher
        self.total_tokens = total_tokens
        self.forecasts = forecasts
        self.done_tokens = 0
        self.done_forecasts = 0
        self._publish()

    def step(self, new_tokens: int) -> None:
        """The engine's ``on_step``: one decode step added ``new_tokens``."""
        self.done_tokens += new_tokens
        self._publish()

    def row_finished(self, unused_tokens: int) -> None:
        """A forecast is stored; the budget it did not use counts as done."""
        self.done_tokens += unused_tokens
        self.done_forecasts += 1
        self._publish()

    @property
    def percent(self) -> float:
        if self.total_tokens <= 0:
            return 100.0
        return min(100.0, 100.0 * self.done_tokens / self.total_tokens)

    def _publish(self) -> None:
        self.publisher.set(
            round(self.percent, 1),
            f"{self.done_tokens} of {self.total_tokens} tokens, "
            f"{self.done_forecasts} of {self.forecasts} forecasts",
        )


class RowProgress:
    """The share of a job's rows done (scoring: a prompt, or the content-free prompt it is
    calibrated by), set on a publisher as rows finish."""

    def __init__(self, publisher: ProgressPublisher, total_rows: int, what: str):
        self.publisher = publisher
        self.total_rows = total_rows
        self.what = what  # "prompts scored"
        self.done_rows = 0
        self._publish()

    def advance(self, rows: int = 1) -> None:
        self.done_rows += rows
        self._publish()

    def _publish(self) -> None:
        share = 100.0 * self.done_rows / self.total_rows if self.total_rows > 0 else 100.0
        self.publisher.set(
            round(min(share, 100.0), 1), f"{self.done_rows} of {self.total_rows} {self.what}"
        )
