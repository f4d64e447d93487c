"""What every job over a batch of rows shares, whatever it computes: stopping safely.

A job (generating continuations in ``generation``; scoring answers, later) runs rows through an
engine and hands what it makes to a sink, which stores it durably (a JSONL file, a database).
This module owns the part of that which does not depend on what the rows compute:

- ``SignalGuard``: SIGINT and SIGTERM handlers that never cut a durable write in half: a signal
  that lands inside a ``critical`` section is acted on as soon as the section ends.
- ``GenerationInterrupted``: the error a job raises after a signal, once the rows in flight are
  saved; it carries the signal's number (a front end exits 128 + it) and the counts.
- ``stopping_safely``: the frame a job's loop runs in: on a signal, save and raise
  ``GenerationInterrupted``; on any other error (out of memory, a cancelled run), save and let
  the error go on.
- ``JobSink``: what every sink does: take a finished row, finish the job; each kind of job adds
  what its state needs (``generation.GenerationSink``: saved ids, checkpoints).

It knows nothing of the engine, the model, tokens, files or databases: what "save" means is the
job's and its sink's.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from yalm_runner.errors import GenerationError


class GenerationInterrupted(GenerationError):
    """SIGINT or SIGTERM stopped a job after its state was saved; re-running it resumes."""

    def __init__(self, signum: int, location: str, rows_done: int, rows_total: int):
        self.signum = signum
        self.location = location  # where the state was saved, in words
        self.rows_done = rows_done
        self.rows_total = rows_total
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name} with {rows_done}/{rows_total} rows done; state saved to "
            f"{location}; run the same command again to resume"
        )


ResultT = TypeVar("ResultT", contravariant=True)


class JobSink(Protocol[ResultT]):
    """Where one job's results go. Its methods run in a critical section: a signal waits until
    they return."""

    location: str  # where the job's state is saved, in words ("out.jsonl.state.json")

    def finished(self, result: ResultT) -> None:
        """Store one finished row durably before returning."""
        ...

    def complete(self) -> None:
        """Every row is done: make the result final."""
        ...


class SignalGuard:
    """SIGINT/SIGTERM handlers for one job: ``on_signal`` runs at once, unless a durable write
    is in progress (``critical``), in which case it runs as soon as that write is complete.

    Handlers can only be installed from the main thread; elsewhere, or when ``enabled`` is
    False, signals keep their handlers and ``critical`` only counts."""

    def __init__(self, on_signal: Callable[[int], None], *, enabled: bool = True):
        self.on_signal = on_signal
        self.enabled = enabled
        self.depth = 0
        self.pending: int | None = None
        self.firing = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> SignalGuard:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None and not self.firing:
            self._fire(self.pending)

    def disarm(self) -> None:
        """Ignore signals from now on (the job is complete)."""
        self.pending = None
        self.firing = True

    def _handle(self, signum: int, frame: object) -> None:
        if self.firing:
            return
        if self.depth:
            self.pending = signum
        else:
            self._fire(signum)

    def _fire(self, signum: int) -> None:
        self.pending = None
        self.firing = True
        self.on_signal(signum)


@contextmanager
def stopping_safely(
    save: Callable[[], None],
    interrupted: Callable[[int], GenerationInterrupted],
    *,
    catch_signals: bool = True,
) -> Iterator[SignalGuard]:
    """Run a job's loop in the ``with`` block so that stopping it loses nothing.

    ``save`` keeps what the rows in flight have made (it runs in a critical section). On SIGINT
    or SIGTERM (when ``catch_signals``), ``save`` runs and ``interrupted(signum)`` is raised. On
    any other error ``save`` runs and the error goes on; should ``save`` fail too, its error is
    noted on the original, which is the one raised. The block wraps its durable writes in the
    guard's ``critical`` and disarms it once the job's result is final.
    """

    def safe_save() -> None:
        with guard.critical():
            save()

    def on_signal(signum: int) -> None:
        safe_save()
        raise interrupted(signum)

    with SignalGuard(on_signal, enabled=catch_signals) as guard:
        try:
            yield guard
        except GenerationInterrupted:
            raise
        except BaseException as exc:
            # Out of memory, say, or Ctrl-C reaching a job that leaves signals to its caller:
            # keep the progress for a re-run (maybe with a smaller batch), then report the error.
            try:
                safe_save()
            except Exception as failure:  # the original error is the one to report
                exc.add_note(f"the rows in flight could not be saved: {failure}")
            raise
