"""One generation job, whatever keeps its results: prompts in, finished rows out through a sink.

Both front ends (the JSONL runner, ``runner.py``, and the pipeline's database,
``flows/generation/forecasting.py``) run their prompts through ``GenerationJob``, which owns
everything between text and the engine: encoding the prompts, setting aside those the model
cannot take (``admit``), restoring the ids an earlier run saved and checking that they fit
(``restore``), the stop-string rule (``StopStrings``), grouping rows by their sampling settings,
calling the engine with checkpoints, and stopping safely (``job.stopping_safely``: the rows in
flight are saved on SIGINT/SIGTERM and on any error).

What differs between the front ends is a ``GenerationSink`` (``job.JobSink`` plus saved state):
where saved state is loaded from, where a finished row goes, what a checkpoint writes. State
travels as a ``Checkpoint``, which today holds each row's ids; exact resume extends it (the
rows' KV and their batch layout), and the sinks with it, not this loop. Generation is
deterministic per row (``sampling``): saved ids are a prefix of the row's one output, so an old
checkpoint costs recomputation, never text. Decoding is this module's alone: a job that only
scores (one prefill per batch) belongs beside it, on ``job.py``'s sinks and signal handling.

This module knows nothing of files, SQL or the pipeline: only of its sinks, the session's engine
and the tokenizer. The policy for bad rows stays with the front end (``admit`` and ``restore``
return what did not fit: the runner refuses the job, the pipeline fails or restarts the row).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from yalm_runner.config import ModelConfig, SamplingParams
from yalm_runner.engine import Finished, GenerationStats, Request, request_problem
from yalm_runner.job import GenerationInterrupted, JobSink, stopping_safely
from yalm_runner.tokenizer import Tokenizer

if TYPE_CHECKING:
    from yalm_runner.session import GenerationSession


@dataclass(frozen=True)
class JobRow:
    """One prompt of a job, as a front end hands it over."""

    key: str  # the row's identity: its saved state, and its random draws (with the seed)
    text: str
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()  # this row's own stop strings (the job's apply too)


@dataclass
class Checkpoint:
    """What a job saves of its rows in flight, and what a re-run restores.

    Today: the ids each row has generated so far. Exact resume adds the rows' KV state and
    their batches (membership, order, padding) here."""

    ids: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class FinishedRow:
    """A row done: its new ids and the text they add, cut right after its first stop string."""

    key: str
    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "eos", "length" or "stop"
    stats: GenerationStats  # the job's totals when the row finished (for timings)


class GenerationSink(JobSink[FinishedRow], Protocol):
    """Where a generation job's rows and saved state live. Besides ``finished`` and
    ``complete``, ``checkpoint`` and ``save`` run in a critical section too."""

    def load(self, keys: Sequence[str]) -> Checkpoint:
        """What an earlier run of this same job saved for these rows (nothing: empty)."""
        ...

    def checkpoint(self, state: Checkpoint) -> None:
        """The rows in flight at a checkpoint (only they: rows not started keep what they
        had)."""
        ...

    def save(self, state: Checkpoint) -> None:
        """The rows in flight when the job stops early (a signal or an error)."""
        ...


class StopStrings:
    """The engine's ``stop`` callback for text stop sequences (job-wide and per row).

    A row stops as soon as the text its new ids add contains one of its stop strings; the
    written suffix ends right after the first such string (the stop string is kept).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        job_stops: tuple[str, ...],
        row_stops: Mapping[str, str | Sequence[str] | None],
    ):
        self.tokenizer = tokenizer
        self.by_key = {}
        for key, own in row_stops.items():
            own = [own] if isinstance(own, str) else own or []
            self.by_key[key] = tuple(dict.fromkeys([*job_stops, *own]))

    def __bool__(self) -> bool:
        return any(self.by_key.values())

    def __call__(self, request: Request, generated: list[int]) -> bool:
        stops = self.by_key.get(request.key, ())
        if not stops:
            return False
        text = self.tokenizer.continuation(list(request.prompt_ids), list(generated))
        return any(stop in text for stop in stops)

    def cut(self, key: str, text: str) -> str:
        """``text`` up to the end of the first stop string completed in it."""
        ends = [text.find(stop) + len(stop) for stop in self.by_key.get(key, ()) if stop in text]
        return text[: min(ends)] if ends else text


class GenerationJob:
    """Rows to continue on one model: ``admit``, then ``restore``, then ``run`` in a session.

    The steps are separate because the front ends open their session at different moments
    (the runner sizes it by the restored rows; the pipeline needs it for its fingerprint before
    it can restore). ``done_before`` counts rows an earlier run finished (for the interrupt
    message's "n/m rows done").
    """

    def __init__(
        self,
        rows: Sequence[JobRow],
        tokenizer: Tokenizer,
        config: ModelConfig,
        *,
        stop: tuple[str, ...] = (),
        done_before: int = 0,
    ):
        self.rows = {row.key: row for row in rows}
        if len(self.rows) != len(rows):
            raise ValueError("a job's row keys must be unique")
        self.tokenizer = tokenizer
        self.config = config
        self.stops = StopStrings(tokenizer, stop, {row.key: row.stop for row in rows})
        self.requests = [
            Request(row.key, tuple(tokenizer.encode(row.text)), row.max_new_tokens) for row in rows
        ]
        self.done_before = done_before
        self.finished_count = 0
        self._engine = None
        self._stats_before = GenerationStats()

    def __len__(self) -> int:
        """The rows to run (those ``admit`` took out no longer count)."""
        return len(self.requests)

    @property
    def max_context(self) -> int:
        """The longest prompt plus its new tokens (1 for an empty job)."""
        return max((len(r.prompt_ids) + r.max_new_tokens for r in self.requests), default=1)

    @property
    def longest_prefill(self) -> int:
        """The longest prompt plus the ids restored for it (1 for an empty job)."""
        return max((len(r.prompt_ids) + len(r.generated) for r in self.requests), default=1)

    @property
    def tokens_left(self) -> int:
        """The new tokens the rows may still add: their budgets less the ids restored."""
        return sum(request.remaining for request in self.requests)

    @property
    def resumed(self) -> int:
        """Rows that go on from restored ids."""
        return sum(bool(request.generated) for request in self.requests)

    @property
    def stats(self) -> GenerationStats:
        """What the engine has done for this job so far (nothing before ``run``)."""
        if self._engine is None:
            return GenerationStats()
        return self._engine.stats.since(self._stats_before)

    def admit(self) -> list[tuple[str, str]]:
        """Take out the rows this model cannot run; return them as (row key, reason)."""
        rejected, kept = [], []
        for request in self.requests:
            problem = request_problem(self.config, request)
            if problem:
                rejected.append((request.key, problem))
            else:
                kept.append(request)
        self.requests = kept
        return rejected

    def restore(self, sink: GenerationSink) -> list[str]:
        """Continue each row from the ids ``sink`` saved for it, when they fit the row (no more
        than its ``max_new_tokens``, all in the vocabulary); return the keys of rows whose
        saved ids did not fit: they start over."""
        saved = sink.load([request.key for request in self.requests]).ids
        misfits, restored = [], []
        for request in self.requests:
            ids = tuple(saved.get(request.key, ()))
            if len(ids) > request.max_new_tokens or any(
                not 0 <= token < self.config.vocab_size for token in ids
            ):
                misfits.append(request.key)
                ids = ()
            restored.append(Request(request.key, request.prompt_ids, request.max_new_tokens, ids))
        self.requests = restored
        return misfits

    def run(
        self,
        session: GenerationSession,
        sink: GenerationSink,
        *,
        checkpoint_every: int,
        longest_first: bool = False,
        catch_signals: bool = True,
        on_step: Callable[[int], None] | None = None,
    ) -> GenerationStats:
        """Generate every row into ``sink``; return what the engine did for it.

        Rows are run in groups of equal sampling settings, in the order given (with
        ``longest_first``, longest prompt first within a group: less padding; a row's text
        does not depend on its batch). Every ``checkpoint_every`` decode steps the rows in
        flight go to ``sink.checkpoint``. On SIGINT/SIGTERM (when ``catch_signals``) they go to
        ``sink.save`` and ``GenerationInterrupted`` is raised; on any other error they go to
        ``sink.save`` and the error is raised. ``on_step(new_tokens)`` follows every decode step
        (``Engine.generate``): progress for a front end, never state.
        """
        engine = self._engine = session.engine
        self._stats_before = copy.deepcopy(engine.stats)
        total = self.done_before + len(self.requests)

        def save() -> None:
            try:
                ids = engine.snapshot()
            except ValueError:  # the batch was being reshaped: the last checkpoint still holds
                ids = {}
            sink.save(Checkpoint(ids))

        def interrupted(signum: int) -> GenerationInterrupted:
            done = self.done_before + self.finished_count
            return GenerationInterrupted(signum, sink.location, done, total)

        def on_finished(finished: Finished) -> None:
            text = self.tokenizer.continuation(list(finished.prompt_ids), list(finished.new_ids))
            row = FinishedRow(
                finished.key,
                finished.prompt_ids,
                finished.new_ids,
                self.stops.cut(finished.key, text),
                finished.finish_reason,
                self.stats,
            )
            with guard.critical():
                sink.finished(row)
                self.finished_count += 1

        def on_checkpoint(ids: dict[str, tuple[int, ...]]) -> None:
            with guard.critical():
                sink.checkpoint(Checkpoint(ids))

        with stopping_safely(save, interrupted, catch_signals=catch_signals) as guard:
            groups: dict[SamplingParams, list[Request]] = {}
            for request in self.requests:
                # Saved ids may already end in a stop string: such a row is done.
                if request.generated and self.stops(request, list(request.generated)):
                    ids = request.generated
                    on_finished(Finished(request.key, request.prompt_ids, ids, "stop"))
                else:
                    groups.setdefault(self.rows[request.key].sampling, []).append(request)
            for sampling, group in groups.items():
                if longest_first:
                    group.sort(key=lambda r: -len(r.prompt_ids) - len(r.generated))
                engine.generate(
                    group,
                    sampling,
                    batch_size=session.batch_size,
                    on_finished=on_finished,
                    checkpoint_every=checkpoint_every,
                    on_checkpoint=on_checkpoint,
                    stop=self.stops if self.stops else None,
                    on_step=on_step,
                )
            with guard.critical():
                sink.complete()
                guard.disarm()
        return self.stats
