"""Generating the pending prompts: the queue in the store meets the model's generation job.

Owns the database's side of one job: claim the pending prompts (all, or one shard's keys) for a
worker id, hand them to ``yalm_runner.generation.GenerationJob`` (one batch plan for the whole
queue; the job groups by sampling settings, checkpoints, saves on errors), and be its sink
(``ForecastSink``): commit each finished forecast on its own as it finishes, keep the ids of the
rows in flight in the store at the job's checkpoints, report what happened. A killed job,
re-run, resumes: finished prompts are no longer pending, unfinished ones carry their saved ids.
Of the model runner it uses the session (``open_session``), the job and its state files
(``kvstate``), nothing of the engine.

Resume is exact: the job's batch plan and, every ``kv_checkpoint_interval`` seconds, the live
batch's KV cache are kept in files under the config's ``state_dir`` (one folder per worker,
``yalm_runner.kvstate``), so that a re-run replays the plan; prompts already done that shared a
batch with unfinished ones are read back to recompute it (never stored twice). The folder goes
when the job completes. Saved ids are tagged with a fingerprint (model manifest, dtype, device
type, compressed KV); ids saved under another fingerprint are not continued but started over,
so a swapped model never finishes a half-written forecast of the old one. Everything is checked
before the model is opened or any state is touched: a prompt that cannot fit the model is
marked failed with the reason and the others go on.

Prompts are taken through ``flows.store.claims`` under the worker id's lease (renewed at every
checkpoint, given back when the job fails), so several workers, on several hosts, can work
through the same queue: each generates only what it claimed, and a prompt another live worker
holds is left to it. A re-run under the same worker id takes its own claims back at once. On one
host with SQLite the worker id is the host and device, and the job claims the whole queue, as
before. It knows nothing of Prefect, feeds, templates or how shards are cut.

Signals go first: the pending signals of the same prompts (``flows.generation.signals``) are
scored in the same model session before any forecast is generated, so the robot's numbers are
ready before the long part of the night; with no forecast to generate the session is planned for
scoring alone. A signal whose prompt another live worker holds is left to it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flows.config import PipelineConfig
from flows.errors import PipelineConfigError, StoreError, is_interrupt
from flows.generation.progress import PublisherFactory, TokenProgress
from flows.store.claims import (
    claim_prompts,
    record_claimed_generation,
    release_claims,
    renew_claims,
)
from flows.store.database import Store, finish_run, start_run
from flows.store.generations import (
    PendingPrompt,
    discard_generation_state,
    done_prompts,
    load_generation_state,
    mark_prompt_failed,
    pending_prompts,
    save_generation_states,
)
from flows.store.signals import pending_signals

if TYPE_CHECKING:
    from pathlib import Path

    from flows.night.summaries import GenerateSummary
    from yalm_runner.batchplan import BatchPlan
    from yalm_runner.generation import Checkpoint, FinishedRow, GenerationJob
    from yalm_runner.kvstate import ExactState
    from yalm_runner.session import GenerationSession

log = logging.getLogger(__name__)

# (done, total): called after each forecast is committed.
ProgressCallback = Callable[[int, int], None]


@dataclass
class GenerateReport:
    """What one generation job did (all counts are prompts, except the token counts)."""

    run_id: int | None = None
    worker_id: str | None = None
    pending: int = 0
    held: int = 0  # pending prompts left to another live worker (claimed by it)
    generated: int = 0
    failed: int = 0
    resumed: int = 0
    new_tokens: int = 0
    compute_s: float = 0.0
    wall_s: float = 0.0
    # The batch the memory plan sized: at most this many rows run together. The one source of
    # "batch size" for the log line, the summary and the run's record.
    batch_size: int | None = None
    device: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (prompt key, reason)
    signals_pending: int = 0
    signals: int = 0  # signals stored
    scoring_s: float = 0.0
    score_batch_size: int | None = None
    signal_failures: list[tuple[str, str]] = field(default_factory=list)  # (prompt key, reason)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.compute_s if self.compute_s > 0 else 0.0

    def summary(self) -> GenerateSummary:
        from flows.night.summaries import Failure, GenerateSummary

        return GenerateSummary(
            run_id=self.run_id,
            run_ids=(self.run_id,) if self.run_id is not None else (),
            worker_id=self.worker_id,
            pending=self.pending,
            held=self.held,
            generated=self.generated,
            resumed=self.resumed,
            new_tokens=self.new_tokens,
            tokens_per_s=round(self.tokens_per_s, 2),
            wall_s=round(self.wall_s, 2),
            batch_size=self.batch_size,
            device=self.device,
            failures=tuple(Failure("prompt", key, reason) for key, reason in self.failures)
            + tuple(Failure("signal", key, reason) for key, reason in self.signal_failures),
            signals_pending=self.signals_pending,
            signals=self.signals,
            scoring_s=round(self.scoring_s, 2),
            score_batch_size=self.score_batch_size,
        )

    def as_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "worker_id": self.worker_id,
            "pending": self.pending,
            "held": self.held,
            "generated": self.generated,
            "failed": self.failed,
            "resumed": self.resumed,
            "new_tokens": self.new_tokens,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "wall_s": round(self.wall_s, 2),
            "batch_size": self.batch_size,
            "device": self.device,
            "failures": [list(failure) for failure in self.failures],
            "signals_pending": self.signals_pending,
            "signals": self.signals,
            "scoring_s": round(self.scoring_s, 2),
            "score_batch_size": self.score_batch_size,
            "signal_failures": [list(failure) for failure in self.signal_failures],
        }


def default_worker_id(config: PipelineConfig) -> str:
    """This host and device (``gpu-host-1:cuda:0``): a re-run here takes back its own claims."""
    return f"{socket.gethostname()}:{config.generation.device}"


def generate_pending(
    config: PipelineConfig,
    store: Store,
    *,
    on_progress: ProgressCallback | None = None,
    limit: int | None = None,
    worker_id: str | None = None,
    keys: Iterable[str] | None = None,
    publish: PublisherFactory | None = None,
) -> GenerateReport:
    """Claim and generate the pending prompts (only ``keys``, if given; at most ``limit``).

    ``worker_id`` defaults to ``default_worker_id``; see the module docstring. ``publish``
    gives each step of the job (scoring, generation) a publisher of its progress
    (``flows.generation.progress``: the Prefect UI's progress artifacts), updated as the
    signals are scored and every few decode steps.
    """
    from yalm_runner.checkpoint import ModelStore
    from yalm_runner.tokenizer import Tokenizer

    began = time.perf_counter()
    report = GenerateReport(worker_id=worker_id or default_worker_id(config))
    prompts = pending_prompts(store)
    if keys is not None:
        wanted = set(keys)
        prompts = [prompt for prompt in prompts if prompt.key in wanted]
    prompts = prompts[:limit] if limit is not None else prompts
    report.pending = len(prompts)
    signals = pending_signals(store, keys=keys)
    report.signals_pending = len(signals)
    if not prompts and not signals:
        log.info("generate: no pending prompts or signals")
        return report
    if config.model is None:
        raise PipelineConfigError("model: not set; generation needs a converted YaLM store")
    model = ModelStore.open(config.model)
    lease_s = config.generation.lease_s
    claimed = set(
        claim_prompts(
            store,
            report.worker_id,
            limit=len(prompts),
            lease_seconds=lease_s,
            keys=[prompt.key for prompt in prompts],
        )
    )
    report.held = len(prompts) - len(claimed)
    if report.held:
        log.info("generate: %d pending prompts are held by other workers", report.held)
    held = {prompt.key for prompt in prompts} - claimed
    prompts = [prompt for prompt in prompts if prompt.key in claimed]
    signals = [signal for signal in signals if signal.key not in held]
    if not prompts and not signals:
        return report
    try:
        _claimed_job(config, store, model, Tokenizer(model.tokenizer_path), prompts, signals,
                     report, began, on_progress, publish)  # fmt: skip
    except BaseException:
        # Out of memory, Ctrl-C, a cancelled run: the saved ids stay, the prompts go back to
        # the queue at once (not after the lease) for whichever worker runs next.
        with suppress(StoreError):
            release_claims(store, report.worker_id, keys=claimed)
        raise
    return report


def state_folder(config: PipelineConfig, worker_id: str) -> Path:
    """Where ``worker_id``'s generation job keeps its plan and KV checkpoints."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", worker_id)[:64]
    return config.state_dir / f"{readable}-{hashlib.sha256(worker_id.encode()).hexdigest()[:8]}"


def _exact_state(config, model, worker_id, prompts, store):
    """This worker's saved plan and KV state, and the done prompts that shared a planned batch
    with the pending ones (to recompute that batch as it first ran)."""
    from yalm_runner.batchplan import BatchPlan
    from yalm_runner.kvstate import ExactState

    exact, problem = ExactState.in_folder(state_folder(config, worker_id), model.manifest_sha256)
    if problem:
        log.warning("generate: %s", problem)
    try:
        plan = BatchPlan.from_dict(exact.plan) if exact.plan else None
    except ValueError as exc:
        log.warning("generate: %s: %s; dropped", exact.folder, exc)
        exact.remove()
        plan = None
    pending = {prompt.key for prompt in prompts}
    shared = set()
    for batch in plan.batches if plan else ():
        keys = {key for key, _ in batch}
        if keys & pending:
            shared |= keys - pending
    return exact, plan, done_prompts(store, sorted(shared))


def _claimed_job(
    config, store, model, tokenizer, prompts, signals, report, began, on_progress, publish
):
    from flows.generation.signals import SignalScoring
    from yalm_runner.config import SamplingParams
    from yalm_runner.generation import GenerationJob, JobRow
    from yalm_runner.offload import OffloadPolicy
    from yalm_runner.session import open_session

    exact, plan, done = _exact_state(config, model, report.worker_id, prompts, store)
    rows = [
        JobRow(
            prompt.key,
            prompt.text,
            prompt.max_new_tokens,
            SamplingParams.from_mapping(prompt.sampling),
        )
        for prompt in [*prompts, *done]
    ]
    job = GenerationJob(rows, tokenizer, model.config, finished=[prompt.key for prompt in done])
    report.run_id = start_run(
        store, "generate", {"pending": len(prompts), "signals_pending": len(signals)}
    )
    _admit(store, job, {prompt.key: prompt for prompt in prompts}, report)
    scoring = SignalScoring(store, tokenizer, model.config, signals) if signals else None
    _take_scores(report, scoring)
    if len(job) == 0 and (scoring is None or not scoring.runnable):  # nothing admitted
        _finish(store, report, began)
        return
    settings = config.generation
    generating = len(job) > 0
    sizing = job.sizing(plan)  # a saved plan's: the planner picks the batch it picked then
    try:
        with open_session(
            model,  # the store opened above, not opened and checked again
            device=settings.device,
            dtype=settings.torch_dtype(),
            policy=OffloadPolicy.from_settings(settings),
            batch_size=settings.batch_size if generating else None,
            max_context=sizing.max_context,
            rows=sizing.rows,  # a plan for 13 prompts is not a plan for 512
            score_only=None if generating else scoring.shape,
        ) as session:
            report.batch_size = session.batch_size if generating else None
            report.device = str(session.device)
            log.info("generate: memory plan: %s", session.plan.describe())
            if scoring is not None:  # first: the robot's numbers before the long part
                _take_scores(report, scoring.run(session, run_id=report.run_id,
                                                 publish=publish))  # fmt: skip
            if generating:
                sink = ForecastSink(store, session, prompts, report, settings.lease_s, on_progress,
                                    exact, plan)  # fmt: skip
                _generate(session, job, sink, report, settings, publish)
    except BaseException as exc:
        report.wall_s = time.perf_counter() - began
        status = "interrupted" if is_interrupt(exc) else "failed"
        cause = str(exc) or type(exc).__name__
        with suppress(StoreError):
            finish_run(store, report.run_id, status, {**report.as_dict(), "error": cause})
        raise
    _finish(store, report, began)


def _take_scores(report: GenerateReport, scoring) -> None:
    """Copy a scoring step's counts (a ``SignalScoring`` or its ``ScoreReport``) to ``report``."""
    scores = getattr(scoring, "report", scoring)
    if scores is None:
        return
    report.signals = scores.stored
    report.scoring_s = scores.scoring_s
    report.score_batch_size = scores.batch_size
    report.signal_failures = list(scores.failures)


def _finish(store: Store, report: GenerateReport, began: float) -> None:
    report.wall_s = time.perf_counter() - began
    failed = report.failed + len(report.signal_failures)
    done = report.generated + report.signals
    status = "ok" if not failed else ("failed" if not done else "partial")
    finish_run(store, report.run_id, status, report.as_dict())


def _admit(
    store: Store, job: GenerationJob, prompts: dict[str, PendingPrompt], report: GenerateReport
) -> None:
    """Mark the prompts the model cannot take (too long) failed with the reason; the others go
    on."""
    for key, reason in job.admit():
        prompt = prompts[key]
        mark_prompt_failed(store, key, reason)
        report.failed += 1
        report.failures.append((key, reason))
        log.error("generate: %s %s: %s", prompt.template_name, prompt.ticker or "", reason)


def _fingerprint(session: GenerationSession) -> str:
    """What the ids depend on beyond the batch layout: the model, the dtype, the device type,
    and a KV cache kept compressed (lossy)."""
    dtype = str(session.dtype).removeprefix("torch.")
    kv = f":kv{session.kv_stored_bits}" if session.kv_stored_bits != 16 else ""
    return f"{session.store.manifest_sha256}:{dtype}:{session.device.type}{kv}"


class ForecastSink:
    """The generation job's sink in the store: saved ids under the session's fingerprint, each
    forecast committed on its own as it finishes, the worker's claims renewed at every
    checkpoint; the plan and the KV checkpoints in the worker's state folder (``exact``, which
    the job writes through; this sink saves its record at a checkpoint and removes it at the
    end)."""

    location = "the database"

    def __init__(
        self,
        store: Store,
        session: GenerationSession,
        prompts: list[PendingPrompt],
        report: GenerateReport,
        lease_s: float,
        on_progress: ProgressCallback | None,
        exact: ExactState,
        plan: BatchPlan | None,
    ) -> None:
        self.exact = exact
        self.plan = plan
        self.store = store
        self.fingerprint = _fingerprint(session)
        self.model_hash = session.store.manifest_sha256
        self.by_key = {prompt.key: prompt for prompt in prompts}
        self.report = report
        self.lease_s = lease_s
        self.on_progress = on_progress
        self.tokens: TokenProgress | None = None  # the Prefect UI's share of tokens done
        self.unfinished: set[str] = set()
        self.total = 0

    def load(self, keys: Sequence[str]) -> Checkpoint:
        from yalm_runner.generation import Checkpoint

        self.unfinished, self.total = set(keys), len(keys)
        saved = {key: load_generation_state(self.store, key, fingerprint=self.fingerprint)
                 for key in keys}  # fmt: skip
        return Checkpoint({key: tuple(ids) for key, ids in saved.items() if ids}, self.plan)

    def renew(self) -> None:
        """Renew the lease on what is left to do; say so if some of it was taken over."""
        held = renew_claims(
            self.store, self.report.worker_id, sorted(self.unfinished), lease_seconds=self.lease_s
        )
        lost = self.unfinished - set(held)
        if lost:
            log.warning(
                "generate: %d prompts were taken over after this worker's lease ran out; "
                "each is still recorded once",
                len(lost),
            )

    def finished(self, row: FinishedRow) -> None:
        stats = row.stats
        record_claimed_generation(
            self.store,
            row.key,
            text=row.text,
            token_ids=row.new_ids,
            prompt_tokens=len(row.prompt_ids),
            finish_reason=row.finish_reason,
            model_manifest_hash=self.model_hash,
            timings_s={"prefill_s": stats.prefill_s, "decode_s": stats.decode_s},
            tokens_per_s=round(stats.tokens_per_s, 3),
            sampling=dict(self.by_key[row.key].sampling),
            run_id=self.report.run_id,
        )
        self.unfinished.discard(row.key)
        self.report.generated += 1
        if self.tokens is not None:
            self.tokens.row_finished(self.by_key[row.key].max_new_tokens - len(row.new_ids))
        if self.on_progress is not None:
            self.on_progress(self.report.generated, self.total)

    def checkpoint(self, state: Checkpoint) -> None:
        if state.kv is not None:  # its frame is fsynced: name it
            self.exact.commit(state.kv)
            self.exact.persist()
        save_generation_states(self.store, state.ids, fingerprint=self.fingerprint)
        self.renew()

    def save(self, state: Checkpoint) -> None:
        # More than the last checkpoint has: the ids of the rows in flight now.
        if state.ids:
            save_generation_states(self.store, state.ids, fingerprint=self.fingerprint)

    def complete(self) -> None:
        """Each forecast was committed as it finished: only the plan and KV state go."""
        self.exact.remove()


def _generate(
    session: GenerationSession,
    job: GenerationJob,
    sink: ForecastSink,
    report: GenerateReport,
    settings,
    publish: PublisherFactory | None = None,
) -> None:
    # Every row is checked before anything is generated; saved ids that cannot belong to the
    # row are dropped (that row starts over) rather than continued.
    for key in job.restore(sink):
        log.warning("generate: prompt %s: saved ids do not fit; starting over", key)
        discard_generation_state(sink.store, key)
    report.resumed = job.resumed
    sink.renew()  # loading the model took a while
    log.info(
        "generate: %d prompts (%d resumed from saved ids) on %s, batch size %d",
        sink.total,
        report.resumed,
        report.device,
        report.batch_size,
    )
    publisher = publish("generation") if publish is not None else None
    if publisher is not None:
        sink.tokens = TokenProgress(publisher, job.tokens_left, sink.total)
    on_step = None if sink.tokens is None else sink.tokens.step
    try:
        with publisher or nullcontext():
            # Longest prompts together: less padding. Signals stay with the caller (Prefect,
            # the command line): Ctrl-C arrives as KeyboardInterrupt, and the rows in flight
            # are saved on the way out as for any other error.
            job.run(
                session,
                sink,
                checkpoint_every=settings.checkpoint_every,
                kv_checkpoint_interval_s=settings.kv_checkpoint_interval,
                longest_first=True,
                catch_signals=False,
                notify=lambda line: log.info("generate: %s", line),
                on_step=on_step,
            )
    finally:
        report.new_tokens = job.stats.new_tokens
        report.compute_s = job.stats.prefill_s + job.stats.decode_s
