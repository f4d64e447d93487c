"""What each step of a night reports, as types: the summary the CLI, the console and the run
records read.

Owns the shape of the results (one frozen dataclass per step, ``NightSummary`` for the whole
night) and how a night's outcome follows from them (``Outcome``, with the exit code each one
means). It knows nothing of Prefect, the database or the model: the steps fill these in, the
front ends read them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Outcome(enum.Enum):
    """How a night ended; the value is the exit code of ``yalm-forecast run`` (docs/night.md)."""

    DONE = 0  # every step ran, nothing failed
    PARTIAL = 3  # some feeds, templates or prompts failed; everything else is stored
    FAILED = 1  # nothing could run (config, preflight), or a step failed before any forecast
    INTERRUPTED = 130  # SIGINT (143 for SIGTERM: see ``NightSummary.exit_code``)

    @property
    def word(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Failure:
    """One thing that failed on its own while the night went on: a feed, a template, a prompt."""

    kind: str  # feed | template | prompt | signal
    name: str  # the feed's name, the template's name, the prompt's key
    cause: str
    version: int | None = None  # the template's version

    @property
    def label(self) -> str:
        """``rbc``, ``ticker_outlook_ru v2``, a prompt's first 12 key characters."""
        name = self.name[:12] if self.kind == "prompt" else self.name
        return name + (f" v{self.version}" if self.version is not None else "")

    def line(self) -> str:
        return f"{self.kind} {self.label}: {self.cause}"


@dataclass(frozen=True)
class IngestSummary:
    run_id: int | None = None
    feeds: int = 0
    new_items: int = 0
    failures: tuple[Failure, ...] = ()


@dataclass(frozen=True)
class RenderSummary:
    new: int = 0
    existing: int = 0  # rendered before and still pending: queued
    done: int = 0  # rendered before and already generated
    skipped: int = 0
    failures: tuple[Failure, ...] = ()


@dataclass(frozen=True)
class GenerateSummary:
    run_id: int | None = None
    run_ids: tuple[int, ...] = ()  # a sharded night: each shard's run
    worker_id: str | None = None
    pending: int = 0
    held: int = 0
    generated: int = 0
    resumed: int = 0
    new_tokens: int = 0
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    batch_size: int | None = None
    device: str | None = None
    failures: tuple[Failure, ...] = ()  # prompts and signals that failed alone
    shards: tuple[dict[str, object], ...] = ()  # a sharded night: each shard run's end
    signals_pending: int = 0
    signals: int = 0  # signals stored (scored first, in the same model session)
    scoring_s: float = 0.0
    score_batch_size: int | None = None


@dataclass(frozen=True)
class StepStop:
    """The step that stopped the night, and why (one line; the traceback is in the log)."""

    step: str
    cause: str
    interrupted_by: int | None = None  # the signal's number


@dataclass
class NightSummary:
    """One night: each step's summary as it comes in, the failures, how it ended."""

    as_of: str | None = None
    night_id: int | None = None
    ingest: IngestSummary | None = None
    render: RenderSummary | None = None
    generate: GenerateSummary | None = None
    extra: dict[str, object] = field(default_factory=dict)  # steps added later (scoring, ...)
    stopped: StepStop | None = None
    visible: int | None = None  # this night's forecasts seen in forecasts_v1
    stored: int = 0  # forecasts stored this night (counted in the store at its end)
    markdown: str = ""

    @property
    def failures(self) -> tuple[Failure, ...]:
        steps = (self.ingest, self.render, self.generate, *self.extra.values())
        return tuple(each for step in steps for each in getattr(step, "failures", ()))

    @property
    def outcome(self) -> Outcome:
        if self.stopped is not None and self.stopped.interrupted_by is not None:
            return Outcome.INTERRUPTED
        if self.stopped is not None:
            # A fault after some forecasts were stored (out of memory, say) is a partial night.
            return Outcome.PARTIAL if self.stored else Outcome.FAILED
        return Outcome.PARTIAL if self.failures else Outcome.DONE

    @property
    def exit_code(self) -> int:
        if self.outcome is Outcome.INTERRUPTED:
            return 128 + (self.stopped.interrupted_by or 2)
        return self.outcome.value

    def cause(self) -> str:
        """The one line a person reads first: why the night is not ``done``."""
        if self.stopped is not None:
            return f"{self.stopped.step}: {self.stopped.cause}"
        failures = self.failures
        if not failures:
            return ""
        more = f" (and {len(failures) - 1} more: see the log)" if len(failures) > 1 else ""
        return f"{len(failures)} failed: {failures[0].line()}{more}"
