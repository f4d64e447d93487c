"""The disk tier in ``yalm-runner bench``: the drive's sequential read rate against the rate at
which our streaming source actually brings disk-tier layers in, both measured in one run.

The drive is read through a fresh file with ``O_DIRECT`` (no page cache; where the file system
refuses it, a buffered read after ``POSIX_FADV_DONTNEED`` stands in and says so). The disk tier
is measured on a real store written to the same directory with ``StoreWriter`` from the bench's
synthetic weights; before every timed pass each layer file is dropped from the page cache, so
the bytes come from the drive. A pass here is the streaming source's own schedule with no
compute: the tier's rate, not the model's.
"""

from __future__ import annotations

import mmap
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from yalm_runner.bench.synthetic import SyntheticStore
from yalm_runner.checkpoint import ModelStore, StoreWriter, part_names
from yalm_runner.config import ModelConfig
from yalm_runner.offload import OffloadPolicy, plan_placement
from yalm_runner.streaming import StreamingWeights, part_bytes_in
from yalm_runner.tensorfile import TensorSpec

CHUNK_BYTES = 16 * 2**20


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget ``path``'s cached pages (they are clean once written+fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_test_file(path: Path, size_bytes: int) -> None:
    """``size_bytes`` (a multiple of 16 MiB) of incompressible bytes, fsynced, not cached."""
    block = os.urandom(CHUNK_BYTES)
    with open(path, "wb") as handle:
        for _ in range(size_bytes // CHUNK_BYTES):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    drop_from_page_cache(path)


def _read_all(fd: int, buffer: mmap.mmap) -> int:
    total = 0
    while True:
        count = os.readv(fd, [buffer])
        total += count
        if count < len(buffer):
            return total


@dataclass
class DriveRead:
    bytes_per_s: float
    method: str  # "O_DIRECT" or "buffered after POSIX_FADV_DONTNEED"
    size_bytes: int


def measure_drive_read(path: Path, size_bytes: int) -> DriveRead:
    """Write a fresh ``size_bytes`` file at ``path``, read it once sequentially, remove it."""
    size_bytes = max(CHUNK_BYTES, size_bytes // CHUNK_BYTES * CHUNK_BYTES)
    write_test_file(path, size_bytes)
    buffer = mmap.mmap(-1, CHUNK_BYTES)  # page-aligned, as O_DIRECT requires
    try:
        method = "O_DIRECT"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except (AttributeError, OSError):  # no O_DIRECT here, or the file system refuses it
            method = "buffered after POSIX_FADV_DONTNEED"
            drop_from_page_cache(path)
            fd = os.open(path, os.O_RDONLY)
        try:
            began = time.perf_counter()
            read = _read_all(fd, buffer)
            elapsed = time.perf_counter() - began
        finally:
            os.close(fd)
    finally:
        buffer.close()
        path.unlink(missing_ok=True)
    return DriveRead(read / elapsed, method, read)


def write_synthetic_store(path: Path, config: ModelConfig, dtype: torch.dtype) -> ModelStore:
    """A real store at ``path`` holding the bench's synthetic weights of ``config``."""
    synthetic = SyntheticStore(config, dtype)
    writer = StoreWriter(path, config, dtype, source={"synthetic": "yalm-runner bench"})
    for part in part_names(config):
        tensors = synthetic.read_part(part)
        specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
        writer.write_part(part, specs, partial(_pick, tensors))
    tokenizer = path / "synthetic-tokenizer.bin"
    tokenizer.write_bytes(b"synthetic weights: no vocabulary\n")
    writer.finish(tokenizer)
    return ModelStore.open(path)


def _pick(tensors: dict[str, torch.Tensor], spec: TensorSpec) -> torch.Tensor:
    return tensors[spec.name]


@dataclass
class DiskTierRead:
    bytes_per_s: float
    bytes_per_pass: int
    pass_s: float
    layers: int


def measure_disk_tier(
    store: ModelStore, device: torch.device | str, dtype: torch.dtype, repeats: int = 2
) -> DiskTierRead:
    """Every layer on the disk tier; the best of ``repeats`` cold passes (page cache dropped
    before each) of the streaming source's schedule, in bytes read from disk per second."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    policy = OffloadPolicy(weights_on="disk")
    placement = plan_placement(
        part_bytes_in(store, dtype), policy, budgets=policy.budgets_on(device.type)
    )
    layer_files = [store.parts[f"layer_{idx}"].path for idx in range(store.config.num_layers)]
    best = None
    with StreamingWeights(store, device, dtype, placement, verify=False) as weights:
        for _ in range(repeats):
            for path in layer_files:
                drop_from_page_cache(path)
            before = weights.bytes_from_disk
            if cuda:
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            for _layer_idx, _tensors in weights.layers():
                pass
            if cuda:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - began
            if best is None or elapsed < best[1]:
                best = (weights.bytes_from_disk - before, elapsed)
    moved, elapsed = best
    return DiskTierRead(moved / elapsed, moved, elapsed, len(layer_files))


def run_disk_bench(
    directory: Path, config: ModelConfig, dtype: torch.dtype, device: str, file_bytes: int
) -> dict[str, object]:
    """Both rates, measured in ``directory`` (a scratch folder under it is removed after)."""
    scratch = directory / "yalm-bench-disk"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        drive = measure_drive_read(scratch / "sequential.bin", file_bytes)
        store = write_synthetic_store(scratch / "store", config, dtype)
        tier = measure_disk_tier(store, device, dtype)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "drive_bytes_per_s": drive.bytes_per_s,
        "drive_method": drive.method,
        "drive_file_bytes": drive.size_bytes,
        "tier_bytes_per_s": tier.bytes_per_s,
        "tier_bytes_per_pass": tier.bytes_per_pass,
        "tier_pass_s": tier.pass_s,
        "tier_layers": tier.layers,
        "tier_over_drive": tier.bytes_per_s / drive.bytes_per_s,
    }
