"""The release over HTTP -> a store, one part at a time, resumable, on the disk a user has.

Owns the order of the work and the disk it takes. The release's files are learnt with ``HEAD``
requests (``release.discover_release``), then downloaded at most ``parallel`` at a time, in the
order the conversion needs them; each part is converted (``convert.convert_part``) as soon as
its files are complete and checked, and the raw files nobody needs any more are deleted. The
order of steps::

    shape      vocabulary, slots 00 and 03: the model's shape, recorded in the store's
               progress.json before those files may go
    layer_0    slot 03          (so slot 03 goes before slot 01 arrives)
    embedding  slots 00 and 01
    layer_i    slot i + 3, ..., head: slot L + 4
    tokenizer  the vocabulary is copied and the manifest written

Raw files on disk (downloaded or downloading, not yet deleted) stay within ``parallel`` times
the largest weights file, except that the files the next step needs are always let in (else
slot 00, held from the shape step to the embedding, could block slot 03 forever). Free space is
checked before the first download against the store still to write plus that allowance
(estimated from the file sizes while the shape is unknown, re-checked exactly once it is known).

Resumable at every level: a file cut short continues by ``Range`` (``downloader``); a file
downloaded and checked is recorded in ``provenance.json`` (size, ``ETag``, sha256, beside the
manifest and kept with the store) and not fetched again while it is on disk; a part converted is
recorded by the store itself (``checkpoint``'s progress), and its files are not fetched again.
HTTP lives in ``downloader``, the layout and file checks in ``release``, conversion in
``convert``; this module only schedules them.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from yalm_runner.checkpoint import MANIFEST_NAME, StoreWriter, part_names, stored_specs
from yalm_runner.config import ModelConfig
from yalm_runner.convert import (
    PartProgress,
    convert_part,
    infer_config,
    release_dtype,
    release_source,
)
from yalm_runner.downloader import Disk, Downloaded, Downloader, RemoteFile, TransferPolicy
from yalm_runner.errors import CheckpointError, ConfigError, DownloadError
from yalm_runner.fsutil import fsync_directory, sha256_file, write_text_atomic
from yalm_runner.quant import Quantization
from yalm_runner.release import (
    DEFAULT_FOLDER_NAME,
    FILE_PATTERN,
    PUBLIC_URL,
    VOCAB_PATH,
    WEIGHTS_DIR,
    ReleaseLayout,
    check_release_file,
    check_vocab,
    discover_release,
    release_path,
    slot_names,
    slot_shapes,
    slots_for_parts,
)
from yalm_runner.tensorfile import TensorSpec

DEFAULT_PARALLEL = 2
WORK_DIR_NAME = ".fetch"
PROVENANCE_NAME = "provenance.json"
PROVENANCE_FORMAT = "yalm-release-provenance"
# Before the shape is known the store's size is estimated from the files' sizes, taking the
# release's elements as 2 bytes wide (YaLM's are bf16, SPEC §2.3): for YaLM-100B within 0.1% of
# the exact size (biases are priced as compressed), an overestimate for a 4-byte release; the
# exact size is checked once the shape is known. Compressed matrices are priced on a row of
# this many inputs.
ASSUMED_RELEASE_ELEMENT_BYTES = 2
ESTIMATE_ROW_INPUTS = 8192
PART_HEADER_ALLOWANCE_BYTES = 1 << 16
# A file that arrives damaged is fetched again this many times before fetch gives up on it.
DAMAGED_REFETCHES = 2
SHAPE_STEP, TOKENIZER_STEP = "shape", "tokenizer"
_SIDE = (".partial", ".partial.json")  # the downloader's files beside a target


class FetchMonitor:
    """What fetch reports as it goes. This one reports nothing; the CLI draws a progress bar."""

    def planned(self, files: int, download_bytes: int) -> None:
        """``files`` still to download, ``download_bytes`` in all (bytes kept excluded)."""

    def received(self, nbytes: int) -> None:
        """Called from download threads as bytes arrive."""

    def note(self, message: str) -> None:
        """One line worth telling the user (a retry, a resume, a damaged file)."""

    def part_done(self, progress: PartProgress) -> None:
        """A part is converted and recorded (its raw files are not yet deleted)."""


@dataclass(frozen=True)
class _Step:
    name: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class _Damaged:
    error: CheckpointError


def release_name(source: str) -> str:
    """The release folder's name as the source URL tells it (the manifest records it)."""
    segments = [segment for segment in urlparse(source).path.split("/") if segment]
    return segments[-1] if segments else DEFAULT_FOLDER_NAME


def _plan_steps(num_layers: int, num_ranks: int) -> list[_Step]:
    slots = slots_for_parts(num_layers)

    def files(*slot_list: int) -> tuple[str, ...]:
        return tuple(release_path(slot, rank) for slot in slot_list for rank in range(num_ranks))

    steps = [
        _Step(SHAPE_STEP, (VOCAB_PATH, *files(0, 3))),
        _Step("layer_0", files(*slots["layer_0"])),
        _Step("embedding", files(*slots["embedding"])),
    ]
    steps += [_Step(f"layer_{idx}", files(idx + 3)) for idx in range(1, num_layers)]
    steps += [_Step("head", files(*slots["head"])), _Step(TOKENIZER_STEP, (VOCAB_PATH,))]
    return steps


def _slot_of(name: str) -> int:
    match = FILE_PATTERN.match(name.removeprefix(f"{WEIGHTS_DIR}/"))
    assert match is not None, name
    return int(match.group(1))


def _read_provenance(dst: Path) -> dict[str, dict]:
    path = dst / PROVENANCE_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != PROVENANCE_FORMAT or not isinstance(data["files"], dict):
            raise ValueError("not a provenance file")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed ({exc}); remove it to start over") from exc
    return data["files"]


def _write_provenance(dst: Path, source: str, files: dict[str, dict]) -> None:
    document = {
        "format": PROVENANCE_FORMAT,
        "source": source,
        "note": "what was downloaded: compare sha256 with another machine's copy",
        "files": dict(sorted(files.items())),
    }
    write_text_atomic(dst / PROVENANCE_NAME, json.dumps(document, indent=1) + "\n", DownloadError)


def _store_bytes(
    config: ModelConfig, dtype: torch.dtype, quantization: Quantization | None, parts: list[str]
) -> int:
    total = 0
    for part in parts:
        specs = stored_specs(config, part, quantization, dtype)
        total += PART_HEADER_ALLOWANCE_BYTES + sum(
            TensorSpec(name, shape, kind).nbytes for name, (shape, kind) in specs.items()
        )
    return total


def _estimated_store_bytes(
    release_bytes: dict[str, int], dtype: torch.dtype | None, quantization: Quantization | None
) -> int:
    """The store made of parts of these release bytes, before the shape is known."""
    dense = (dtype.itemsize if dtype else ASSUMED_RELEASE_ELEMENT_BYTES) / (
        ASSUMED_RELEASE_ELEMENT_BYTES
    )
    compressed = dense
    if quantization is not None:
        row = quantization.stored_specs("matrix", (1, ESTIMATE_ROW_INPUTS))
        per_weight = (
            sum(TensorSpec(name, shape, kind).nbytes for name, (shape, kind) in row.items())
            / ESTIMATE_ROW_INPUTS
        )
        compressed = per_weight / ASSUMED_RELEASE_ELEMENT_BYTES
    total = 0
    for part, size in release_bytes.items():
        ratio = compressed if part.startswith("layer_") else dense
        total += PART_HEADER_ALLOWANCE_BYTES + int(size * ratio)
    return total


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 100e6 else f"{nbytes / 1e6:.2f} MB"


def _check_space(disk: Disk, needs: list[tuple[Path, int, str]]) -> None:
    """Refuse in one line if a filesystem lacks the bytes the listed folders still need."""
    by_device: dict[int, tuple[Path, int, list[str]]] = {}
    for folder, nbytes, what in needs:
        anchor = next(path for path in (folder, *folder.parents) if path.exists())
        device = anchor.stat().st_dev
        _, total, whats = by_device.get(device, (anchor, 0, []))
        by_device[device] = (anchor, total + nbytes, [*whats, what])
    for anchor, nbytes, whats in by_device.values():
        free = disk.free_bytes(anchor)
        if free < nbytes:
            raise DownloadError(
                f"not enough free space on the drive of {anchor}: fetch needs {_gb(nbytes)} "
                f"({' + '.join(whats)}), {_gb(free)} is free"
            )


def fetch_release(
    dst: str | Path,
    *,
    source: str = PUBLIC_URL,
    num_heads: int = 128,
    dtype: torch.dtype | None = None,
    max_positions: int = 1024,
    quantization: Quantization | None = None,
    keep_release: str | Path | None = None,
    parallel: int = DEFAULT_PARALLEL,
    policy: TransferPolicy | None = None,
    disk: Disk | None = None,
    monitor: FetchMonitor | None = None,
) -> Path:
    """Download the release at ``source`` and convert it into a store at ``dst``.

    Returns the manifest path. Run again with the same arguments after any interruption: it
    continues where it stopped. ``keep_release`` keeps the raw files in that folder.
    """
    if parallel < 1:
        raise ConfigError(f"parallel downloads must be at least 1, got {parallel}")
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigError(f"store dtype must be floating point, got {dtype}")
    dst = Path(dst)
    monitor = monitor or FetchMonitor()
    disk = disk or Disk()
    work_dir = dst / WORK_DIR_NAME
    if (dst / MANIFEST_NAME).exists():
        if work_dir.exists():  # finished, stopped while tidying up
            shutil.rmtree(work_dir)
            return dst / MANIFEST_NAME
        raise CheckpointError(f"{dst} already holds a store; remove it or pick another")
    base = source if source.endswith("/") else source + "/"
    release_dir = Path(keep_release) if keep_release is not None else work_dir
    with Downloader(
        policy or TransferPolicy(), disk=disk, on_bytes=monitor.received, notify=monitor.note
    ) as loader:
        job = _FetchJob(
            dst, base, release_dir, keep_release is not None, parallel, loader, disk, monitor
        )
        manifest = job.run(num_heads, dtype, max_positions, quantization)
    if keep_release is None:
        shutil.rmtree(work_dir, ignore_errors=True)
        fsync_directory(dst)
    return manifest


class _FetchJob:
    """One run of fetch: discovery, the space check, then the download/convert loop."""

    def __init__(
        self,
        dst: Path,
        base: str,
        release_dir: Path,
        keep: bool,
        parallel: int,
        loader: Downloader,
        disk: Disk,
        monitor: FetchMonitor,
    ):
        self.dst, self.base, self.release_dir, self.keep = dst, base, release_dir, keep
        self.parallel, self.loader, self.disk, self.monitor = parallel, loader, disk, monitor
        self.remote: dict[str, RemoteFile] = {}
        self.config: ModelConfig | None = None

    def _exists(self, name: str) -> bool:
        found = self.loader.probe(self.base + name)
        if found is not None:
            self.remote[name] = found
        return found is not None

    def size_of(self, name: str) -> int:
        return self.remote[name].size_bytes or 0

    def run(
        self,
        num_heads: int,
        dtype: torch.dtype | None,
        max_positions: int,
        quantization: Quantization | None,
    ) -> Path:
        num_layers, num_ranks = discover_release(self._exists)
        try:
            self.dst.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create {self.dst}: {exc.strerror or exc}") from exc
        writer = StoreWriter.resume(self.dst)
        if writer is not None:
            _check_same_options(writer, num_heads, dtype, max_positions, quantization)
            if writer.config.num_layers != num_layers:
                raise CheckpointError(
                    f"{self.dst} holds an interrupted fetch of a {writer.config.num_layers}-layer "
                    f"model; {self.base} serves {num_layers} layers"
                )
            self.config = writer.config
        steps = _plan_steps(num_layers, num_ranks)
        done = {SHAPE_STEP} if writer is not None else set()
        done |= writer.parts_written if writer is not None else set()
        pending = [step for step in steps if step.name not in done]
        order: list[str] = []
        for step in pending:
            order += [name for name in step.files if name not in order]
        provenance = _read_provenance(self.dst)
        ready = {
            name
            for name in order
            if name in provenance
            and (self.release_dir / name).is_file()
            and (self.release_dir / name).stat().st_size == provenance[name]["bytes"]
        }
        if not self.keep:
            self._remove_leftovers(set(order))
        weights = [name for name in self.remote if name != VOCAB_PATH]
        self.steps = steps
        self.budget = self.parallel * max(self.size_of(name) for name in weights)
        self.layout = ReleaseLayout(
            self.release_dir, num_layers, num_ranks, self.release_dir / VOCAB_PATH
        )
        self.check_space(writer, dtype, quantization, pending)
        to_get = [name for name in order if name not in ready]
        kept = sum(_partial_bytes(self.release_dir / name) for name in to_get)
        self.monitor.planned(len(to_get), sum(map(self.size_of, to_get)) - kept)
        scheduler = _Scheduler(self, order, ready, provenance, self.budget)
        return scheduler.run(pending, writer, num_heads, dtype, max_positions, quantization)

    def _remove_leftovers(self, needed: set[str]) -> None:
        """Raw files (whole or partial) of parts an earlier run finished are not needed."""
        for name in self.remote:
            if name not in needed:
                target = self.release_dir / name
                for path in (target, *(target.with_name(target.name + s) for s in _SIDE)):
                    path.unlink(missing_ok=True)

    def _raw_allowance(self) -> int:
        if self.keep:
            return sum(map(self.size_of, self.remote))
        step_bytes = max(sum(map(self.size_of, step.files)) for step in self.steps[:3])
        return self.size_of(VOCAB_PATH) + max(self.budget, step_bytes)

    def check_space(
        self,
        writer: StoreWriter | None,
        dtype: torch.dtype | None,
        quantization: Quantization | None,
        pending: list[_Step],
    ) -> None:
        steps = self.steps
        left = [step.name for step in pending if step.name not in (SHAPE_STEP, TOKENIZER_STEP)]
        if writer is not None:
            store = _store_bytes(writer.config, writer.dtype, writer.quantization, left)
            how = "store still to write"
        else:
            by_part = {step.name: sum(map(self.size_of, step.files)) for step in steps}
            store = _estimated_store_bytes(
                {part: by_part[part] for part in left}, dtype, quantization
            )
            how = "store still to write, estimated from the file sizes"
        store += self.size_of(VOCAB_PATH)
        present = sum(
            path.stat().st_size
            for path in self.release_dir.rglob("*")
            if path.is_file() and not path.name.endswith(".json")
        )
        raw = max(0, self._raw_allowance() - present)
        raw_what = "the release kept" if self.keep else "release files in flight"
        needs = [(self.dst, store, f"{_gb(store)} {how}")]
        needs.append((self.release_dir, raw, f"{_gb(raw)} {raw_what}"))
        _check_space(self.disk, needs)

    def fetch_file(self, name: str) -> Downloaded | _Damaged:
        """Download ``name`` (or take a complete one already on disk) and check it."""
        remote = self.remote[name]
        target = self.release_dir / name
        if target.is_file():  # complete but not recorded: stopped between the two
            downloaded = Downloaded(
                remote.url,
                target,
                target.stat().st_size,
                remote.etag,
                remote.last_modified,
                sha256_file(target, DownloadError),
                target.stat().st_size,
            )
        else:
            downloaded = self.loader.download(remote.url, target)
        try:
            if name == VOCAB_PATH:
                check_vocab(target)
            elif self.config is not None:
                check_release_file(
                    target, slot_shapes(self.config, _slot_of(name), self.layout.num_ranks)
                )
            else:
                check_release_file(target, slot_names(_slot_of(name), self.layout.num_layers))
        except CheckpointError as exc:
            return _Damaged(exc)
        return downloaded


class _Scheduler:
    """The download/convert loop of one run; see the module docstring for the rules."""

    def __init__(
        self,
        job: _FetchJob,
        order: list[str],
        ready: set[str],
        provenance: dict[str, dict],
        budget: int,
    ):
        self.job, self.order, self.ready = job, order, set(ready)
        self.provenance, self.budget = provenance, budget
        self.queue = [name for name in order if name not in ready]
        self.on_disk = {name: job.size_of(name) for name in ready}
        self.in_flight: dict[Future, str] = {}
        self.damaged: dict[str, int] = {}

    def run(
        self,
        pending: list[_Step],
        writer: StoreWriter | None,
        num_heads: int,
        dtype: torch.dtype | None,
        max_positions: int,
        quantization: Quantization | None,
    ) -> Path:
        job = self.job
        manifest = job.dst / MANIFEST_NAME
        pool = ThreadPoolExecutor(job.parallel, thread_name_prefix="fetch")
        try:
            for index, step in enumerate(pending):
                self._wait_for(step, pool)
                if step.name == SHAPE_STEP:
                    config = infer_config(job.layout, num_heads, max_positions)
                    writer = StoreWriter(
                        job.dst,
                        config,
                        dtype or release_dtype(job.layout),
                        source=release_source(release_name(job.base), job.layout, num_heads),
                        quantization=quantization,
                    )
                    job.config = config
                    job.check_space(writer, dtype, quantization, pending[index + 1 :])
                elif step.name == TOKENIZER_STEP:
                    assert writer is not None
                    manifest = writer.finish(job.layout.vocab_path)
                else:
                    assert writer is not None
                    parts = part_names(writer.config)
                    written = convert_part(writer, job.layout, step.name, quantization)
                    job.monitor.part_done(
                        PartProgress(step.name, parts.index(step.name), len(parts), written)
                    )
                self._drop_unneeded(pending[index + 1 :])
        except BaseException:
            job.loader.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return manifest

    def _launch(self, step: _Step, pool: ThreadPoolExecutor) -> None:
        """Start downloads in order while the parallel limit and the disk budget allow."""
        while self.queue and len(self.in_flight) < self.job.parallel:
            name = self.queue[0]
            size = self.job.size_of(name)
            if name not in step.files and sum(self.on_disk.values()) + size > self.budget:
                return
            self.queue.pop(0)
            self.on_disk[name] = size
            self.in_flight[pool.submit(self.job.fetch_file, name)] = name

    def _wait_for(self, step: _Step, pool: ThreadPoolExecutor) -> None:
        while True:
            self._launch(step, pool)
            if all(name in self.ready for name in step.files):
                return
            done, _ = wait(self.in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                name = self.in_flight.pop(future)
                outcome = future.result()
                if isinstance(outcome, _Damaged):
                    self._refetch(name, outcome.error)
                else:
                    self._record(name, outcome)

    def _record(self, name: str, downloaded: Downloaded) -> None:
        self.provenance[name] = {
            "url": downloaded.url,
            "bytes": downloaded.size_bytes,
            "etag": downloaded.etag,
            "last_modified": downloaded.last_modified,
            "sha256": downloaded.sha256,
        }
        _write_provenance(self.job.dst, self.job.base, self.provenance)
        self.ready.add(name)

    def _refetch(self, name: str, error: CheckpointError) -> None:
        count = self.damaged[name] = self.damaged.get(name, 0) + 1
        (self.job.release_dir / name).unlink(missing_ok=True)
        self.on_disk.pop(name, None)
        if count > DAMAGED_REFETCHES:
            raise CheckpointError(f"{error} (after {count} downloads; is the source damaged?)")
        self.job.monitor.note(f"{error}; fetching it again")
        self.queue.append(name)
        self.queue.sort(key=self.order.index)

    def _drop_unneeded(self, rest: list[_Step]) -> None:
        needed = {name for step in rest for name in step.files}
        for name in sorted(self.ready - needed):
            self.ready.discard(name)
            self.on_disk.pop(name, None)
            if not self.job.keep:
                (self.job.release_dir / name).unlink(missing_ok=True)
        fsync_directory(self.job.release_dir / WEIGHTS_DIR)


def _partial_bytes(target: Path) -> int:
    partial = target.with_name(target.name + ".partial")
    return partial.stat().st_size if partial.is_file() else 0


def _check_same_options(
    writer: StoreWriter,
    num_heads: int,
    dtype: torch.dtype | None,
    max_positions: int,
    quantization: Quantization | None,
) -> None:
    differ = []
    if writer.config.num_heads != num_heads:
        differ.append(f"--num-heads {writer.config.num_heads}")
    if writer.config.max_positions != max_positions:
        differ.append(f"--max-positions {writer.config.max_positions}")
    if dtype is not None and writer.dtype != dtype:
        differ.append(f"--dtype {str(writer.dtype).removeprefix('torch.')}")
    if writer.quantization != quantization:
        recorded = writer.quantization
        differ.append(
            "no --quantize"
            if recorded is None
            else f"--quantize {recorded.scheme}"
            + (f" --group-size {recorded.group_size}" if recorded.scheme == "int4" else "")
        )
    if differ:
        raise CheckpointError(
            f"{writer.path} holds an interrupted fetch made with {', '.join(differ)}; "
            "run it again with those options, or remove the folder to start over"
        )
