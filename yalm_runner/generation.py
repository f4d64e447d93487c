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
travels as a ``Checkpoint``: each row's ids, the job's ``BatchPlan`` and, now and then, the live
batch's KV cache. The plan and the KV files are the same in both front ends: the job keeps them
through the sink's ``exact`` (``ExactResume``; ``kvstate.ExactState`` in both), and each sink
only saves that record where it keeps the rest of its state.

Resume is exact by construction. Before its first batch a job records its plan (each batch's
rows in order, with the ids each starts from) and the arithmetic it runs under (the session's
``arithmetic``: batch size, device, dtype, KV cache, kernels...). A re-run under the same
arithmetic replays the plan: batches whose rows are all done are skipped; the batch that was in
flight is restored from its last sound KV checkpoint (``kv_checkpoint_interval_s``) or
recomputed from its start, its finished rows included (the sink never sees them twice); the
rest run as planned; rows new to the job run after, in batches of their own. So every row meets
the same numbers as in an uninterrupted run. Under other arithmetic (another batch size, say),
or with no plan, rows go on from their saved ids (re-prefilled in one pass): their text is the
same except where floating point rounds a near tie differently; one line says so. Decoding is
this module's alone: a job that only scores (one prefill per batch) belongs beside it, on
``job.py``'s sinks and signal handling.

This module knows nothing of files, SQL or the pipeline: only of its sinks, the session's engine
and the tokenizer. The policy for bad rows stays with the front end (``admit`` and ``restore``
return what did not fit: the runner refuses the job, the pipeline fails or restarts the row).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from yalm_runner.batchplan import BatchPlan, Sizing, arithmetic_changes, restore_fits
from yalm_runner.batchstate import BatchCheckpoint, BatchRestore, PlannedBatch
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

    ``ids``: the ids each row has generated so far. ``plan``: from ``load``, the plan an
    earlier run recorded (None: none). ``kv``: at a checkpoint, the live batch's KV frame that
    ``exact.write_kv`` has written, for the sink to name in its state."""

    ids: dict[str, tuple[int, ...]] = field(default_factory=dict)
    plan: BatchPlan | None = None
    kv: Any = None


@dataclass(frozen=True)
class FinishedRow:
    """A row done: its new ids and the text they add, cut right after its first stop string."""

    key: str
    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "eos", "length" or "stop"
    stats: GenerationStats  # the job's totals when the row finished (for timings)


class ExactResume(Protocol):
    """A job's plan and its live batches' KV checkpoints (``kvstate.ExactState``, which keeps
    them in files): what makes a resume exact. The job records and reads them; the sink that
    holds them saves the record with the rest of its state."""

    def record_plan(self, plan: dict[str, Any], *, replay: bool) -> None:
        """Keep ``plan`` (``BatchPlan.to_dict``) durably before its first batch; without
        ``replay`` the earlier plan's KV state is dropped."""
        ...

    def restore_point(self, index: int) -> tuple[BatchRestore | None, str | None]:
        """Batch ``index``'s last sound KV checkpoint (None: recompute it), and one line if
        saved state for it was found unusable."""
        ...

    def write_kv(self, live: BatchCheckpoint) -> Any:
        """Append ``live``'s KV delta durably; what it returns goes to ``checkpoint``."""
        ...

    def batch_done(self, index: int) -> None:
        """Every row of batch ``index`` is stored: its KV state can go."""
        ...


class GenerationSink(JobSink[FinishedRow], Protocol):
    """Where a generation job's rows and saved state live. Besides ``finished`` and
    ``complete``, ``checkpoint`` and ``save`` run in a critical section too."""

    exact: ExactResume  # the plan and the KV checkpoints, saved with the sink's state

    def load(self, keys: Sequence[str]) -> Checkpoint:
        """What an earlier run of this same job saved for these rows (nothing: empty)."""
        ...

    def checkpoint(self, state: Checkpoint) -> None:
        """The rows in flight at a checkpoint (only they: rows not started keep what they
        had), and the KV frame ``exact.write_kv`` wrote for it, if any, made current."""
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
    (the runner sizes it by the restored rows, ``sizing``; the pipeline needs it for its
    fingerprint before it can restore). ``finished`` names rows of ``rows`` an earlier run
    finished: they are not run again, but kept to recompute a planned batch they were part of
    (the sink never gets them). ``done_before`` counts other rows an earlier run finished (for
    the interrupt message's "n/m rows done").
    """

    def __init__(
        self,
        rows: Sequence[JobRow],
        tokenizer: Tokenizer,
        config: ModelConfig,
        *,
        stop: tuple[str, ...] = (),
        done_before: int = 0,
        finished: Sequence[str] = (),
    ):
        self.rows = {row.key: row for row in rows}
        if len(self.rows) != len(rows):
            raise ValueError("a job's row keys must be unique")
        self.finished = set(finished) & set(self.rows)
        self.tokenizer = tokenizer
        self.config = config
        self.stops = StopStrings(tokenizer, stop, {row.key: row.stop for row in rows})
        requests = [
            Request(row.key, tuple(tokenizer.encode(row.text)), row.max_new_tokens) for row in rows
        ]
        self.requests = [request for request in requests if request.key not in self.finished]
        self._done_requests = {r.key: r for r in requests if r.key in self.finished}
        self.done_before = done_before + len(self.finished)
        self.finished_count = 0
        self._engine = None
        self._stats_before = GenerationStats()
        self._saved_plan: BatchPlan | None = None
        self._sizing: Sizing | None = None

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
    def saved_plan(self) -> BatchPlan | None:
        """The plan an earlier run recorded (after ``restore``), or None."""
        return self._saved_plan

    def sizing(self, plan: BatchPlan | None = None) -> Sizing:
        """What to size the session for: the recorded plan's sizing (``plan``, else the one
        ``restore`` found) when these rows fit it (then the planner picks the batch it picked
        the first time), else these rows'."""
        plan = plan or self._saved_plan
        starts = {}  # a planned row starts from its plan's ids, not from its latest saved ones
        if plan is not None:
            starts = {key: start for batch in plan.batches for key, start in batch}
        prefill = max(
            (len(r.prompt_ids) + len(starts.get(r.key, r.generated)) for r in self.requests),
            default=1,
        )
        needed = Sizing(min(self.max_context, self.config.max_positions), prefill, len(self) or 1)
        saved = plan.sizing if plan else None
        fits = saved is not None and (
            saved.max_context >= needed.max_context and saved.prompt_tokens >= needed.prompt_tokens
        )
        self._sizing = saved if fits else needed
        return self._sizing

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
        saved ids did not fit: they start over. The plan an earlier run recorded is kept for
        ``run``."""
        loaded = sink.load([request.key for request in self.requests])
        saved, self._saved_plan = loaded.ids, loaded.plan
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
        kv_checkpoint_interval_s: float = 0.0,
        longest_first: bool = False,
        catch_signals: bool = True,
        notify: Callable[[str], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> GenerationStats:
        """Generate every row into ``sink``; return what the engine did for it.

        The batches are the recorded plan's when it can be replayed (see the module docstring),
        else cut anew: rows in groups of equal sampling settings, in the order given (with
        ``longest_first``, longest prompt first within a group: less padding). Every
        ``checkpoint_every`` decode steps the rows in flight go to ``sink.checkpoint``, with
        the live batch's KV cache when ``kv_checkpoint_interval_s`` (0: never) have passed since
        the batch was taken up or last saved so. On SIGINT/SIGTERM (when ``catch_signals``)
        the rows' ids go to ``sink.save`` (no KV: a signal must end the run in seconds) and
        ``GenerationInterrupted`` is raised; on any other error they go to ``sink.save`` and
        the error is raised. ``notify`` gets the lines a person should read (resume not exact,
        saved state unusable). ``on_step(new_tokens)`` follows every decode step
        (``Engine.generate``): progress for a front end, never state.
        """
        notify = notify or (lambda line: None)
        engine = self._engine = session.engine
        self._stats_before = copy.deepcopy(engine.stats)
        total = self.done_before + len(self.requests)
        kv_saved_s: dict[int, float] = {}

        def in_flight(ids: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
            return {key: ids[key] for key in ids if key not in self.finished}

        def save() -> None:
            try:
                ids = engine.snapshot()
            except ValueError:  # the batch was being reshaped: the last checkpoint still holds
                ids = {}
            sink.save(Checkpoint(in_flight(ids)))

        def interrupted(signum: int) -> GenerationInterrupted:
            done = self.done_before + self.finished_count
            return GenerationInterrupted(signum, sink.location, done, total)

        def on_finished(finished: Finished) -> None:
            if finished.key in self.finished:
                return  # stored by an earlier run: it ran again only to recompute its batch
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

        def on_checkpoint(live: BatchCheckpoint) -> None:
            since = kv_saved_s.get(live.index, live.began_s)
            due = kv_checkpoint_interval_s > 0
            due = due and time.perf_counter() - since >= kv_checkpoint_interval_s
            # Outside the critical section: a signal may cut the frame; nothing names it yet.
            frame = sink.exact.write_kv(live) if due else None
            with guard.critical():
                sink.checkpoint(Checkpoint(in_flight(live.ids), kv=frame))
            if due:
                kv_saved_s[live.index] = time.perf_counter()

        def on_batch_done(index: int) -> None:
            with guard.critical():
                sink.exact.batch_done(index)

        with stopping_safely(save, interrupted, catch_signals=catch_signals) as guard:
            batches, plan, replay, lines = self._lay_out(session, sink, longest_first, on_finished)
            for line in lines:
                notify(line)
            with guard.critical():
                sink.exact.record_plan(plan.to_dict(), replay=replay)
            engine.run_batches(
                batches,
                on_finished=on_finished,
                checkpoint_every=checkpoint_every,
                on_checkpoint=on_checkpoint,
                on_batch_done=on_batch_done,
                stop=self.stops if self.stops else None,
                on_step=on_step,
            )
            with guard.critical():
                sink.complete()
                guard.disarm()
        return self.stats

    def _lay_out(
        self,
        session: GenerationSession,
        sink: GenerationSink,
        longest_first: bool,
        on_finished: Callable[[Finished], None],
    ) -> tuple[list[PlannedBatch], BatchPlan, bool, list[str]]:
        """The batches to run, the plan to record, whether it replays the saved one, and the
        lines to tell. Rows a resume left complete are finished here (``on_finished``)."""
        arithmetic = dict(session.arithmetic)
        saved, lines = self._saved_plan, []
        replay = saved is not None and dict(saved.arithmetic) == arithmetic
        if saved is not None and not replay:
            changes = ", ".join(arithmetic_changes(saved.arithmetic, arithmetic))
            lines.append(
                f"resume is not exact: {changes}; the unfinished rows go on from their saved ids"
            )
        unfinished = {r.key: r for r in self.requests}
        known = {**self._done_requests, **unfinished}
        batches: list[PlannedBatch] = []
        recorded = list(saved.batches) if replay else []
        covered: set[str] = set()
        lost = 0
        for index, members in enumerate(recorded):
            keys = [key for key, _ in members]
            if not any(key in unfinished for key in keys):
                recorded[index] = ()  # done (or no longer this job's): forgotten
                continue
            if any(key not in known for key in keys):
                lost += 1  # a row left the job (failed, or another worker's now): its rows go
                recorded[index] = ()  # on in batches of their own, below
                sink.exact.batch_done(index)
                continue
            requests = tuple(
                Request(key, known[key].prompt_ids, known[key].max_new_tokens, start)
                for key, start in members
            )
            restore, problem = sink.exact.restore_point(index)
            if restore is not None and not restore_fits(requests, restore):
                restore = None
                problem = f"batch {index}'s KV checkpoint does not match its plan; recomputing it"
                sink.exact.batch_done(index)  # its KV state is of no use: dropped
            if problem:
                lines.append(problem)
            elif restore is not None:
                lines.append(f"batch {index} goes on from its KV checkpoint at step {restore.step}")
            batches.append(PlannedBatch(index, requests, self.rows[keys[0]].sampling, restore))
            covered.update(keys)
        if saved is None and any(request.generated for request in self.requests):
            lines.append(
                f"resume is not exact: {sum(bool(r.generated) for r in self.requests)} rows go on "
                "from saved ids without the batch plan they began in"
            )
        if lost:
            lines.append(
                f"resume is not exact for the rows of {lost} planned batches that lost rows to "
                "failure or to another worker; they go on from their saved ids"
            )
        # Rows the plan does not hold (new, or their batch cannot be rebuilt): batches of their
        # own, after the plan's, from whatever ids they have.
        rest = [request for request in self.requests if request.key not in covered]
        groups: dict[SamplingParams, list[Request]] = {}
        for request in rest:
            # Saved ids may already end in a stop string: such a row is done.
            if request.generated and self.stops(request, list(request.generated)):
                on_finished(Finished(request.key, request.prompt_ids, request.generated, "stop"))
            else:
                groups.setdefault(self.rows[request.key].sampling, []).append(request)
        for sampling, group in groups.items():
            _, runnable = session.engine.settle(group, on_finished)
            if longest_first:
                runnable.sort(key=lambda r: -len(r.prompt_ids) - len(r.generated))
            for start in range(0, len(runnable), session.batch_size):
                cut = tuple(runnable[start : start + session.batch_size])
                batches.append(PlannedBatch(len(recorded), cut, sampling))
                recorded.append(tuple((r.key, r.generated) for r in cut))
        plan = BatchPlan(arithmetic, self._sizing or self.sizing(), tuple(recorded))
        return batches, plan, replay, lines
