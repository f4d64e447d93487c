"""Generation jobs over files: JSONL prefixes in, JSONL continuations out.

This is the one place where text, the store and the engine meet for the command line. The input
format is the original repo's conditional-generation format: one JSON object per line with a
``prefix``; each output line keeps the input's fields and adds ``suffix`` (the text the new
tokens add) and ``token_ids`` (the new ids). A line may carry its own ``max_new_tokens`` and an
``id`` (the row's key for sampling; the line number otherwise) and its own ``stop`` strings.

Jobs are resumable: finished rows are appended to the output as they finish, the unfinished
rows' ids are checkpointed beside it, and a re-run continues (the files are resume.py's; this
module glues them to the engine and to SIGINT/SIGTERM).
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from yalm_runner.checkpoint import Store
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Finished, GenerationStats, Request
from yalm_runner.errors import ConfigError, GenerationError
from yalm_runner.offload import OffloadPolicy
from yalm_runner.resume import (
    KEY_FIELD,
    NO_RESUME_HINT,
    JobFingerprint,
    JobState,
    OutputLog,
    StateFile,
)
from yalm_runner.session import default_dtype, open_session, resolve_devices
from yalm_runner.tokenizer import Tokenizer

MEASURED_PINNED_GBPS = 55.0  # the lent H200's pinned host-to-device copies (PCIe 5)
DEFAULT_CHECKPOINT_EVERY = 16  # decode steps between state saves


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """The input rows of ``path``; raises ``GenerationError`` naming the bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GenerationError(f"input file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GenerationError(f"cannot read {path}: {exc}") from exc
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GenerationError(f"{path} line {line_no}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prefix"), str):
            raise GenerationError(
                f"{path} line {line_no}: expected an object with a 'prefix' string"
            )
        limit = row.get("max_new_tokens")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise GenerationError(
                f"{path} line {line_no}: max_new_tokens must be a positive integer"
            )
        stop = row.get("stop")
        if stop is not None and not (
            (isinstance(stop, str) and stop)
            or (isinstance(stop, list) and all(isinstance(text, str) and text for text in stop))
        ):
            raise GenerationError(
                f"{path} line {line_no}: stop must be a non-empty string or a list of them"
            )
        if KEY_FIELD in row:
            raise GenerationError(f"{path} line {line_no}: {KEY_FIELD!r} is a reserved field")
        rows.append({"__key__": str(row.get("id", f"line-{line_no}")), **row})
    if not rows:
        raise GenerationError(f"{path}: no prompts")
    keys = [row["__key__"] for row in rows]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise GenerationError(f"{path}: duplicate ids {duplicates[:5]}")
    return rows


class GenerationInterrupted(GenerationError):
    """SIGINT or SIGTERM stopped a job after its state was saved; re-running it resumes."""

    def __init__(self, signum: int, state_path: Path, rows_done: int, rows_total: int):
        self.signum = signum
        self.state_path = state_path
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name} with {rows_done}/{rows_total} rows done; state saved to "
            f"{state_path}; run the same command again to resume"
        )


class StopStrings:
    """The engine's ``stop`` callback for text stop sequences (job-wide and per row).

    A row stops as soon as the text its new ids add contains one of its stop strings; the
    written suffix ends right after the first such string (the stop string is kept).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        job_stops: tuple[str, ...],
        row_stops: dict[str, str | list[str] | None],
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


class _SignalGuard:
    """SIGINT/SIGTERM handlers for one job: ``on_signal`` runs at once, unless a durable write
    is in progress (``critical``), in which case it runs as soon as that write is complete."""

    def __init__(self, on_signal: Callable[[int], None]):
        self.on_signal = on_signal
        self.depth = 0
        self.pending: int | None = None
        self.firing = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
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
    resume: bool = True,
    notify: Callable[[str], None] | None = None,
) -> GenerationStats:
    """Continue every prefix of ``input_path`` into ``output_path``, resumably.

    Finished rows are appended to ``output_path`` as they finish; every ``checkpoint_every``
    decode steps (0: only on signals) and on SIGINT/SIGTERM the unfinished rows' ids go to
    ``OUTPUT.state.json``. A second call with the same job continues where the first stopped;
    a different job is refused unless ``resume`` is False, which starts over. On completion the
    output is rewritten in input order and the state file removed. ``notify`` gets progress
    lines for a human.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint interval must be >= 0 steps, got {checkpoint_every}")
    if any(not isinstance(text, str) or not text for text in stop):
        raise ConfigError(f"stop strings must be non-empty, got {list(stop)!r}")
    notify = notify or (lambda message: None)
    input_path, output_path = Path(input_path), Path(output_path)
    rows = read_prompts(input_path)
    keys = [row["__key__"] for row in rows]
    known = set(keys)
    store = Store.open(store_path)
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
    state_file = StateFile.beside(output_path)
    saved = _saved_state(state_file, fingerprint) if resume else None
    with ExitStack() as stack:
        log = stack.enter_context(OutputLog(output_path))
        done: dict[str, dict[str, Any]] = log.recover(keys) if saved else {}
        partial = {
            key: ids
            for key, ids in (saved.partial if saved else {}).items()
            if key in known and key not in done
        }
        requests = [
            Request(
                row["__key__"],
                tuple(tokenizer.encode(row["prefix"])),
                row.get("max_new_tokens", max_new_tokens),
                partial.get(row["__key__"], ()),
            )
            for row in rows
            if row["__key__"] not in done
        ]
        if not requests:
            requests_context = 1
        else:
            requests_context = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
        session = stack.enter_context(
            open_session(
                store,  # opened above for the fingerprint: not opened and checked twice
                device=devices,
                dtype=dtype,
                policy=policy,
                batch_size=batch_size,
                max_context=min(requests_context, store.config.max_positions),
                prompt_tokens=max(
                    (len(r.prompt_ids) + len(r.generated) for r in requests), default=1
                ),
                rows=len(requests) or 1,
                verify=verify,
                tokenizer=tokenizer,  # loaded above to count the prompts' tokens
            )
        )
        engine = session.engine
        for request in requests:  # before any file changes: bad input loses nothing
            engine.check(request)
            _check_partial(request, state_file.path, store.config.vocab_size)
        notify(f"plan: {session.plan.describe()}")
        if saved is None:
            if state_file.path.exists():
                notify(f"--no-resume: discarding {state_file.path} and {output_path}")
            # The output goes before a state is written, so that a state file never sits
            # beside output from another job.
            log.remove()
            state_file.remove()
        elif done or partial:
            notify(f"resuming: {len(done)}/{len(keys)} rows done, {len(partial)} partial")
        state = JobState(fingerprint, partial)
        state_file.save(state)
        stops = StopStrings(tokenizer, stop, {row["__key__"]: row.get("stop") for row in rows})
        fields_by_key = {
            row["__key__"]: {name: value for name, value in row.items() if name != "__key__"}
            for row in rows
        }

        def on_finished(finished: Finished) -> None:
            row = dict(fields_by_key[finished.key])
            text = tokenizer.continuation(list(finished.prompt_ids), list(finished.new_ids))
            row["suffix"] = stops.cut(finished.key, text)
            row["token_ids"] = list(finished.new_ids)
            with guard.critical():
                log.append(finished.key, row)
                done[finished.key] = row
                state.partial.pop(finished.key, None)

        def on_checkpoint(snapshot: dict[str, tuple[int, ...]]) -> None:
            with guard.critical():
                state.partial.update(snapshot)
                state_file.save(state)

        def save_in_flight() -> None:
            with guard.critical():
                # ValueError: the batch was being reshaped; the last checkpoint still holds.
                with suppress(ValueError):
                    state.partial.update(engine.snapshot())
                state_file.save(state)

        def on_signal(signum: int) -> None:
            save_in_flight()
            raise GenerationInterrupted(signum, state_file.path, len(done), len(keys))

        with _SignalGuard(on_signal) as guard:
            pending = []
            for request in requests:
                if request.generated and stops(request, list(request.generated)):
                    ids = request.generated
                    on_finished(Finished(request.key, request.prompt_ids, ids, "stop"))
                else:
                    pending.append(request)
            try:
                engine.generate(
                    pending,
                    sampling,
                    batch_size=session.batch_size,
                    on_finished=on_finished,
                    checkpoint_every=checkpoint_every,
                    on_checkpoint=on_checkpoint,
                    stop=stops if stops else None,
                )
            except GenerationInterrupted:
                raise
            except Exception:
                # Out of memory, say: keep the progress for a re-run (maybe with a smaller
                # batch), then report the original error.
                with suppress(GenerationError):
                    save_in_flight()
                raise
            with guard.critical():
                log.finish(done[key] for key in keys)
                state_file.remove()
                guard.disarm()
    return engine.stats


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


def _check_partial(request: Request, state_path: Path, vocab_size: int) -> None:
    if len(request.generated) > request.max_new_tokens or any(
        not 0 <= token < vocab_size for token in request.generated
    ):
        raise GenerationError(
            f"{state_path}: saved ids for row {request.key} do not fit the job; {NO_RESUME_HINT}"
        )


def describe_store(store: Store) -> str:
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
