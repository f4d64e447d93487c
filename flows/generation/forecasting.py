"""Generating the pending prompts with the engine: the queue in the store meets the model.

Owns one job: claim the pending prompts (all, or one shard's keys) for a worker id, run them
through the engine in large batches (one batch plan for the whole queue, grouped by sampling
settings), commit each finished forecast on its own as it finishes, and keep the ids of the
rows in flight in the store at the engine's checkpoints. A killed job, re-run, resumes from the
store alone: finished prompts are no longer pending, unfinished ones carry their saved ids, and
because a row's random draws come from (seed, prompt key, step) the resumed text equals an
uninterrupted run's.

Saved ids are tagged with a fingerprint (model manifest, dtype, device type, compressed KV);
ids saved under another fingerprint are not continued but started over, so a swapped model never
finishes a half-written forecast of the old one. Everything is checked before the model is
opened or any state is touched: a prompt that cannot fit the model is marked failed with the
reason and the others go on.

Prompts are taken through ``flows.store.claims`` under the worker id's lease (renewed at every
checkpoint, given back when the job fails), so several workers, on several hosts, can work
through the same queue: each generates only what it claimed, and a prompt another live worker
holds is left to it. A re-run under the same worker id takes its own claims back at once. On one
host with SQLite the worker id is the host and device, and the job claims the whole queue, as
before. It knows nothing of Prefect, feeds, templates or how shards are cut.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field

from flows.config import PipelineConfig
from flows.errors import PipelineConfigError, StoreError
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
    load_generation_state,
    mark_prompt_failed,
    pending_prompts,
    save_generation_states,
)

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
    batch_size: int | None = None  # the largest batch that ran
    device: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (prompt key, reason)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.compute_s if self.compute_s > 0 else 0.0

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
        }


def _sampling_group(sampling: dict) -> tuple:
    return tuple(sorted((key, value) for key, value in sampling.items() if key != "max_new_tokens"))


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
) -> GenerateReport:
    """Claim and generate the pending prompts (only ``keys``, if given; at most ``limit``).

    ``worker_id`` defaults to ``default_worker_id``; see the module docstring.
    """
    from yalm_runner.checkpoint import Store as ModelStore
    from yalm_runner.tokenizer import Tokenizer

    began = time.perf_counter()
    report = GenerateReport(worker_id=worker_id or default_worker_id(config))
    prompts = pending_prompts(store)
    if keys is not None:
        wanted = set(keys)
        prompts = [prompt for prompt in prompts if prompt.key in wanted]
    prompts = prompts[:limit] if limit is not None else prompts
    report.pending = len(prompts)
    if not prompts:
        log.info("generate: no pending prompts")
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
    prompts = [prompt for prompt in prompts if prompt.key in claimed]
    if not prompts:
        return report
    try:
        _claimed_job(config, store, model, Tokenizer(model.tokenizer_path), prompts, report, began,
                     on_progress)  # fmt: skip
    except BaseException:
        # Out of memory, Ctrl-C, a cancelled run: the saved ids stay, the prompts go back to
        # the queue at once (not after the lease) for whichever worker runs next.
        with suppress(StoreError):
            release_claims(store, report.worker_id, keys=claimed)
        raise
    return report


def _claimed_job(config, store, model, tokenizer, prompts, report, began, on_progress) -> None:
    from yalm_runner.session import open_session

    encoded = {prompt.key: tuple(tokenizer.encode(prompt.text)) for prompt in prompts}
    report.run_id = start_run(store, "generate", {"pending": len(prompts)})
    rows = _admit(store, model.config.max_positions, prompts, encoded, report)
    if not rows:
        _finish(store, report, began)
        return
    settings = config.generation
    try:
        with open_session(
            model,  # the store opened above, not opened and checked again
            device=settings.device,
            dtype=settings.torch_dtype(),
            policy=settings.offload_policy(),
            batch_size=settings.batch_size,
            max_context=max(len(ids) + prompt.max_new_tokens for prompt, ids in rows),
            rows=len(rows),  # a plan for 13 prompts is not a plan for 512
        ) as session:
            report.batch_size = session.batch_size
            report.device = str(session.engine.device)
            log.info("generate: memory plan: %s", session.plan.describe())
            _generate(session, store, rows, report, on_progress, settings)
    except BaseException as exc:
        report.wall_s = time.perf_counter() - began
        with suppress(StoreError):
            finish_run(store, report.run_id, "failed", {**report.as_dict(), "error": str(exc)})
        raise
    _finish(store, report, began)


def _finish(store: Store, report: GenerateReport, began: float) -> None:
    report.wall_s = time.perf_counter() - began
    status = "ok" if not report.failed else ("failed" if not report.generated else "partial")
    finish_run(store, report.run_id, status, report.as_dict())


def _admit(store, max_positions, prompts, encoded, report) -> list[tuple[PendingPrompt, tuple]]:
    """The prompts that fit the model; the others are marked failed with the reason."""
    rows = []
    for prompt in prompts:
        ids = encoded[prompt.key]
        if len(ids) + prompt.max_new_tokens > max_positions:
            reason = (
                f"{len(ids)} prompt tokens + {prompt.max_new_tokens} new tokens exceed the "
                f"model's {max_positions} positions"
            )
            mark_prompt_failed(store, prompt.key, reason)
            report.failed += 1
            report.failures.append((prompt.key, reason))
            log.error("generate: %s %s: %s", prompt.template_name, prompt.ticker or "", reason)
            continue
        rows.append((prompt, ids))
    return rows


def _fingerprint(session) -> str:
    """What the ids depend on beyond the batch layout: the model, the dtype, the device type,
    and a KV cache kept compressed (lossy)."""
    engine = session.engine
    dtype = str(engine.dtype).removeprefix("torch.")
    first = getattr(engine, "engines", [engine])[0]
    compressed = first.kv_on == "cpu" and first.kv_bits != 16
    kv = f":kv{first.kv_bits}" if compressed else ""
    return f"{session.store.manifest_sha256}:{dtype}:{engine.device.type}{kv}"


def _generate(session, store: Store, rows, report, on_progress, settings) -> None:
    from yalm_runner.engine import Finished, Request
    from yalm_runner.settings import sampling_params

    engine, tokenizer = session.engine, session.tokenizer
    fingerprint = _fingerprint(session)
    model_hash = session.store.manifest_sha256
    vocab_size = engine.config.vocab_size

    # Every row is checked before anything is generated; saved ids that cannot belong to the
    # row are dropped (that row starts over) rather than continued.
    requests: list[Request] = []
    by_key = {prompt.key: prompt for prompt, _ in rows}
    for prompt, prompt_ids in rows:
        saved = load_generation_state(store, prompt.key, fingerprint=fingerprint) or []
        if len(saved) > prompt.max_new_tokens or any(not 0 <= t < vocab_size for t in saved):
            log.warning("generate: prompt %s: saved ids do not fit; starting over", prompt.key)
            discard_generation_state(store, prompt.key)
            saved = []
        request = Request(prompt.key, prompt_ids, prompt.max_new_tokens, tuple(saved))
        engine.check(request)
        requests.append(request)
        report.resumed += bool(saved)
    total = len(requests)
    unfinished = {request.key for request in requests}

    def renew() -> None:
        # Loading the model and every checkpoint renew the lease on what is left to do.
        held = renew_claims(store, report.worker_id, sorted(unfinished), lease_seconds=lease_s)
        lost = unfinished - set(held)
        if lost:
            log.warning(
                "generate: %d prompts were taken over after this worker's lease ran out; "
                "each is still recorded once",
                len(lost),
            )

    lease_s = settings.lease_s
    renew()
    log.info(
        "generate: %d prompts (%d resumed from saved ids) on %s, batch size %d",
        total,
        report.resumed,
        report.device,
        session.batch_size,
    )

    def on_finished(finished: Finished) -> None:
        prompt = by_key[finished.key]
        text = tokenizer.continuation(list(finished.prompt_ids), list(finished.new_ids))
        stats = engine.stats
        record_claimed_generation(
            store,
            finished.key,
            text=text,
            token_ids=finished.new_ids,
            prompt_tokens=len(finished.prompt_ids),
            finish_reason=finished.finish_reason,
            model_manifest_hash=model_hash,
            timings_s={"prefill_s": stats.prefill_s, "decode_s": stats.decode_s},
            tokens_per_s=round(stats.tokens_per_s, 3),
            sampling=dict(prompt.sampling),
            run_id=report.run_id,
        )
        unfinished.discard(finished.key)
        report.generated += 1
        if on_progress is not None:
            on_progress(report.generated, total)

    def on_checkpoint(snapshot: dict[str, tuple[int, ...]]) -> None:
        save_generation_states(store, snapshot, fingerprint=fingerprint)
        renew()

    groups: dict[tuple, list[Request]] = {}
    for request in requests:
        groups.setdefault(_sampling_group(dict(by_key[request.key].sampling)), []).append(request)
    tokens_before = engine.stats.new_tokens
    try:
        for group in groups.values():
            # Longest prompts together: less padding; a row's text does not depend on its batch.
            group.sort(key=lambda request: -len(request.prompt_ids) - len(request.generated))
            engine.generate(
                group,
                sampling_params(by_key[group[0].key].sampling),
                batch_size=session.batch_size,
                on_finished=on_finished,
                checkpoint_every=settings.checkpoint_every,
                on_checkpoint=on_checkpoint,
            )
    except BaseException:
        # Out of memory, Ctrl-C, Prefect cancelling the run: keep the ids of the rows in flight
        # (more than the last checkpoint has) for a re-run, then let the error go on.
        with suppress(ValueError, StoreError):
            save_generation_states(store, engine.snapshot(), fingerprint=fingerprint)
        raise
    finally:
        report.batch_size = max(engine.stats.batch_sizes, default=0)
        report.new_tokens = engine.stats.new_tokens - tokens_before
        report.compute_s = engine.stats.prefill_s + engine.stats.decode_s
