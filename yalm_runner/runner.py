"""Generation jobs over files: JSONL prefixes in, JSONL continuations out.

This is the one place where text, the store and the engine meet for the command line. The input
format is the original repo's conditional-generation format: one JSON object per line with a
``prefix``; each output line keeps the input's fields and adds ``suffix`` (the text the new
tokens add) and ``token_ids`` (the new ids). A line may carry its own ``max_new_tokens`` and an
``id`` (the row's key for sampling; the line number otherwise) and its own ``stop`` strings.

Jobs are resumable, exactly: finished rows are appended to the output as they finish, the batch
plan and the unfinished rows' ids are checkpointed beside it (and, every so often, the live
batch's KV cache, in ``OUT.jsonl.kv/``), and a re-run continues to the bytes an uninterrupted
run writes. This module owns the files' side (``JsonlSink``: reading the input, refusing another
job's state, the output's final order); the job itself (encoding, the plan, saved ids, stop
strings, checkpoints, signals) is ``generation.py``'s, the files' formats are ``resume.py``'s
and ``kvstate.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from yalm_runner import settings
from yalm_runner.batchplan import BatchPlan
from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import SamplingParams
from yalm_runner.engine import GenerationStats
from yalm_runner.errors import ConfigError, GenerationError
from yalm_runner.generation import Checkpoint, FinishedRow, GenerationJob, JobRow, StopStrings
from yalm_runner.job import GenerationInterrupted
from yalm_runner.kvstate import ExactState
from yalm_runner.offload import OffloadPolicy
from yalm_runner.resume import (
    NO_RESUME_HINT,
    JobFingerprint,
    JobState,
    OutputLog,
    StateFile,
    read_input,
)
from yalm_runner.session import default_dtype, open_session, resolve_devices
from yalm_runner.tokenizer import Tokenizer

__all__ = ["GenerationInterrupted", "JsonlSink", "StopStrings", "generate_file", "read_prompts"]

MEASURED_PINNED_GBPS = 55.0  # the lent H200's pinned host-to-device copies (PCIe 5)
DEFAULT_CHECKPOINT_EVERY = 16  # decode steps between state saves
DEFAULT_KV_CHECKPOINT_INTERVAL_S = settings.field_info(
    settings.RunnerSettings, "kv_checkpoint_interval"
).default


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """The input rows of ``path``; raises ``GenerationError`` naming the bad line."""
    return read_input(path, _generation_problem)


def _generation_problem(row: dict[str, Any]) -> str | None:
    limit = row.get("max_new_tokens")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        return "max_new_tokens must be a positive integer"
    stop = row.get("stop")
    if stop is not None and not (
        (isinstance(stop, str) and stop)
        or (isinstance(stop, list) and all(isinstance(text, str) and text for text in stop))
    ):
        return "stop must be a non-empty string or a list of them"
    return None


class JsonlSink:
    """A generation job's sink in files: finished rows appended to the output (``OutputLog``),
    the plan and the rows in flight checkpointed beside it (``StateFile``), the live batch's KV
    in ``OUT.jsonl.kv/`` (``exact``, an ``ExactState`` the job writes through, whose record
    this sink saves in the state file), the output rewritten in input order at the end.
    Constructing it reads what an earlier run left (refusing another job's state); nothing is
    changed on disk before ``begin``."""

    def __init__(
        self,
        output_path: Path,
        fingerprint: JobFingerprint,
        rows: list[dict[str, Any]],
        *,
        resume: bool,
    ):
        self.state_file = StateFile.beside(output_path)
        self.location = str(self.state_file.path)
        self.keys = [row["__key__"] for row in rows]
        self.fields_by_key = {
            row["__key__"]: {name: value for name, value in row.items() if name != "__key__"}
            for row in rows
        }
        self.saved = _saved_state(self.state_file, fingerprint) if resume else None
        self.log = OutputLog(output_path)
        self.done: dict[str, dict[str, Any]] = self.log.recover(self.keys) if self.saved else {}
        self.state = JobState(fingerprint)
        try:
            self.exact = ExactState(
                StateFile.kv_folder_beside(output_path),
                self.saved.exact if self.saved else None,
                self._persist,
            )
            self.plan = BatchPlan.from_dict(self.exact.plan) if self.exact.plan else None
        except ValueError as exc:
            raise GenerationError(
                f"{self.state_file.path}: not a valid generation state ({exc}); {NO_RESUME_HINT}"
            ) from None

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.log.close()

    def load(self, keys: Sequence[str]) -> Checkpoint:
        partial = self.saved.partial if self.saved else {}
        self.state.partial = {key: partial[key] for key in keys if key in partial}
        return Checkpoint(dict(self.state.partial), self.plan)

    def misfit_error(self, key: str) -> GenerationError:
        return GenerationError(
            f"{self.state_file.path}: saved ids for row {key} do not fit the job; {NO_RESUME_HINT}"
        )

    def begin(self, notify: Callable[[str], None]) -> None:
        """The first change on disk: start over (no saved state) or go on from the earlier
        run's (``load`` restored its rows in flight)."""
        if self.saved is None:
            if self.state_file.path.exists():
                notify(f"--no-resume: discarding {self.state_file.path} and {self.log.path}")
            # The output goes before a state is written, so that a state file never sits
            # beside output from another job.
            self.log.remove()
            self.state_file.remove()
            self.exact.discard()
        elif self.done or self.state.partial:
            notify(
                f"resuming: {len(self.done)}/{len(self.keys)} rows done, "
                f"{len(self.state.partial)} partial"
            )
        self._persist()

    def _persist(self) -> None:
        self.state.exact = self.exact.to_dict()
        self.state_file.save(self.state)

    def finished(self, finished: FinishedRow) -> None:
        row = dict(self.fields_by_key[finished.key])
        row["suffix"] = finished.text
        row["token_ids"] = list(finished.new_ids)
        self.log.append(finished.key, row)
        self.done[finished.key] = row
        self.state.partial.pop(finished.key, None)

    def checkpoint(self, state: Checkpoint) -> None:
        self.state.partial.update(state.ids)
        if state.kv is not None:
            self.exact.commit(state.kv)
        self._persist()

    save = checkpoint

    def complete(self) -> None:
        self.log.finish(self.done[key] for key in self.keys)
        self.state_file.remove()
        self.exact.discard()


def generate_file(
    store_path: Path,
    input_path: Path,
    output_path: Path,
    *,
    sampling: SamplingParams,
    max_new_tokens: int,
    device: torch.device | str | Sequence[torch.device],
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    policy: OffloadPolicy | None = None,
    verify: bool = True,
    stop: tuple[str, ...] = (),
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    kv_checkpoint_interval_s: float = DEFAULT_KV_CHECKPOINT_INTERVAL_S,
    resume: bool = True,
    notify: Callable[[str], None] | None = None,
) -> GenerationStats:
    """Continue every prefix of ``input_path`` into ``output_path``, resumably and exactly.

    Finished rows are appended to ``output_path`` as they finish; the batch plan, and every
    ``checkpoint_every`` decode steps (0: only on signals) and on SIGINT/SIGTERM the
    unfinished rows' ids, go to ``OUTPUT.state.json``; at such a checkpoint, once
    ``kv_checkpoint_interval_s`` (0: never) have passed, the live batch's KV cache goes to
    ``OUTPUT.kv/``. A second call with the same job continues where the first stopped, to the
    bytes an uninterrupted run writes (under other arithmetic, a batch size say, from the saved
    ids: one line says that is not exact); a different job is refused unless ``resume`` is
    False, which starts over. On completion the output is rewritten in input order and the
    state removed. ``notify`` gets progress lines for a human.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint interval must be >= 0 steps, got {checkpoint_every}")
    if not kv_checkpoint_interval_s >= 0:
        raise ConfigError(
            f"KV checkpoint interval must be >= 0 seconds, got {kv_checkpoint_interval_s}"
        )
    if any(not isinstance(text, str) or not text for text in stop):
        raise ConfigError(f"stop strings must be non-empty, got {list(stop)!r}")
    notify = notify or (lambda message: None)
    input_path, output_path = Path(input_path), Path(output_path)
    rows = read_prompts(input_path)
    store = ModelStore.open(store_path)
    tokenizer = Tokenizer(store.tokenizer_path)
    devices = resolve_devices(device)  # a list the caller resolved is taken as it is
    dtype = dtype or default_dtype(store, devices[0])
    fingerprint = JobFingerprint.for_job(
        store_manifest_sha256=store.manifest_sha256,
        input_path=input_path,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        stop=stop,
        dtype=str(dtype).removeprefix("torch."),
        device_type=devices[0].type,
    )
    with ExitStack() as stack:
        sink = stack.enter_context(JsonlSink(output_path, fingerprint, rows, resume=resume))
        job = GenerationJob(
            [
                JobRow(
                    row["__key__"],
                    row["prefix"],
                    row.get("max_new_tokens", max_new_tokens),
                    sampling,
                    _row_stops(row.get("stop")),
                )
                for row in rows
            ],
            tokenizer,
            store.config,
            stop=stop,
            finished=list(sink.done),  # kept to recompute a planned batch they were part of
        )
        # Before any file changes: bad input loses nothing. A row that cannot run, or saved
        # ids that do not fit their row, refuse the whole job.
        rejected = job.admit()
        if rejected:
            key, reason = rejected[0]
            raise GenerationError(f"row {key}: {reason}")
        misfits = job.restore(sink)
        if misfits:
            raise sink.misfit_error(misfits[0])
        sizing = job.sizing()  # a recorded plan's, so that the planner picks what it picked
        session = stack.enter_context(
            open_session(
                store,  # opened above for the fingerprint: not opened and checked twice
                device=devices,
                dtype=dtype,
                policy=policy,
                batch_size=batch_size,
                max_context=sizing.max_context,
                prompt_tokens=sizing.prompt_tokens,
                rows=sizing.rows,
                verify=verify,
                tokenizer=tokenizer,  # loaded above to count the prompts' tokens
            )
        )
        notify(f"plan: {session.plan.describe()}")
        sink.begin(notify)
        return job.run(
            session,
            sink,
            checkpoint_every=checkpoint_every,
            kv_checkpoint_interval_s=kv_checkpoint_interval_s,
            notify=notify,
        )


def _row_stops(stop: str | list[str] | None) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


def _saved_state(state_file: StateFile, fingerprint: JobFingerprint) -> JobState | None:
    """The saved state of this same job, or None; a different job's is refused."""
    saved = state_file.load()
    if saved is not None:
        changes = saved.fingerprint.differences(fingerprint)
        if changes:
            raise GenerationError(
                f"{state_file.path} belongs to a different job: {'; '.join(changes)} changed; "
                f"run the original command to resume, or {NO_RESUME_HINT}"
            )
    return saved


def describe_store(store: ModelStore) -> str:
    """A human summary: shape, sizes, and what one decode step must move when streamed."""
    config = store.config
    layer_bytes = [store.parts[f"layer_{idx}"].data_bytes for idx in range(config.num_layers)]
    embedding_bytes = store.parts["embedding"].data_bytes
    head_bytes = store.parts["head"].data_bytes
    step_bytes = sum(layer_bytes) + head_bytes + embedding_bytes
    lines = [
        f"store            {store.path}",
        f"manifest sha256  {store.manifest_sha256}",
        f"dtype            {store.manifest['dtype']}",
        f"layers           {config.num_layers} x hidden {config.hidden_size}, {config.num_heads} "
        f"heads of {config.head_dim}, GeGLU {config.ffn_size}",
        f"embedding        {config.vocab_size} x {config.embedding_size}",
        f"max positions    {config.max_positions}",
        f"parameters       {config.param_count():,}",
        f"weights          {store.weight_bytes / 2**30:.3f} GiB",
        f"bytes per layer  {max(layer_bytes) / 2**20:.2f} MiB "
        f"(layer 0: {layer_bytes[0] / 2**20:.2f} MiB)",
        f"embedding/head   {embedding_bytes / 2**20:.2f} MiB / {head_bytes / 2**20:.2f} MiB",
        f"KV per token     {config.kv_bytes_per_token(2) / 2**20:.3f} MiB in 16 bits",
        f"one decode step  moves {step_bytes / 2**30:.3f} GiB if nothing is resident: "
        f"{step_bytes / (MEASURED_PINNED_GBPS * 1e9) * 1e3:.1f} ms at "
        f"{MEASURED_PINNED_GBPS:.0f} GB/s pinned",
    ]
    return "\n".join(lines)
