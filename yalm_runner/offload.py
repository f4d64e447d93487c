"""Where weights live: memory budgets, the placement plan, and the resident weight sources.

A weight source hands the engine each part's tensors, on the compute device and in the compute
dtype, in forward order. ``ResidentWeights`` loads every part once and keeps it there
(``QuantizedResidentWeights`` the same for a compressed store, dequantizing on access); the
streaming source (``streaming.StreamingWeights``) follows the same contract, so the engine's
loop is one loop. ``plan_placement`` decides, from byte budgets rather than percentages, which
layers stay on the GPU, which live in pinned RAM and which are read from disk each step; a plan
that cannot fit is an ``OffloadError`` carrying the numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import ModelConfig
from yalm_runner.errors import ConfigError, OffloadError
from yalm_runner.model import Weights
from yalm_runner.quant import DequantizingWeights, scratch_elements, to_compute

FP16_MAX = 65504.0
TIERS = ("gpu", "cpu", "disk")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """``"8GiB"`` -> 8589934592; also plain integers and KB/MB/GB (powers of ten)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 8GiB, 512MiB or 2GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


@dataclass(frozen=True)
class OffloadPolicy:
    """Budgets, not percentages. None means no limit of that kind."""

    gpu_memory_bytes: int | None = None
    cpu_memory_bytes: int | None = None
    weights_on: str = "auto"  # auto, gpu, cpu or disk: where streamed layers must live
    overlap: bool = True
    kv_on: str = "auto"  # auto, gpu or cpu: where the KV cache lives between layers
    kv_bits: int = 16  # 8 or 4: the pinned-RAM KV cache is kept compressed per (token, head)
    # pinned-RAM KV: rows (a copy a row), slots (a copy a layer) or auto (the planner's pick)
    kv_layout: str = "auto"

    def __post_init__(self) -> None:
        if self.weights_on not in ("auto", *TIERS):
            raise ConfigError(f"weights_on must be auto, gpu, cpu or disk, got {self.weights_on!r}")
        if self.kv_on not in ("auto", "gpu", "cpu"):
            raise ConfigError(f"kv_on must be auto, gpu or cpu, got {self.kv_on!r}")
        if self.kv_layout not in ("auto", "rows", "slots"):
            raise ConfigError(f"kv_layout must be auto, rows or slots, got {self.kv_layout!r}")
        if self.kv_bits not in (16, 8, 4):
            raise ConfigError(f"kv_bits must be 16, 8 or 4, got {self.kv_bits}")
        if self.kv_bits != 16 and self.kv_on == "gpu":
            raise ConfigError(
                f"{self.kv_bits}-bit KV is for the pinned-RAM cache: use kv_on cpu or auto"
            )
        for name in ("gpu_memory_bytes", "cpu_memory_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class Placement:
    """Where each part lives and what the plan costs in each memory."""

    tiers: dict[str, str]  # part -> gpu, cpu or disk
    gpu_weight_bytes: int
    stream_buffer_bytes: int
    kv_bytes: int
    workspace_bytes: int
    cpu_weight_bytes: int
    streamed_bytes_per_pass: int
    disk_bytes_per_pass: int

    @property
    def gpu_total_bytes(self) -> int:
        return (
            self.gpu_weight_bytes + self.stream_buffer_bytes + self.kv_bytes + self.workspace_bytes
        )

    def count(self, tier: str) -> int:
        return sum(
            1 for part, where in self.tiers.items() if where == tier and part.startswith("layer_")
        )

    def predicted_pass_s(self, pinned_bytes_per_s: float, disk_bytes_per_s: float) -> float:
        """Lower bound on one forward pass: the streamed bytes over their links."""
        # Disk-tier bytes cross both the drive and the host-to-device link.
        return max(
            self.streamed_bytes_per_pass / pinned_bytes_per_s,
            self.disk_bytes_per_pass / disk_bytes_per_s,
        )

    def describe(self) -> str:
        return (
            f"layers: {self.count('gpu')} on the GPU, {self.count('cpu')} in pinned RAM, "
            f"{self.count('disk')} on disk; GPU: weights {format_bytes(self.gpu_weight_bytes)} + "
            f"stream buffers {format_bytes(self.stream_buffer_bytes)} + KV "
            f"{format_bytes(self.kv_bytes)} + workspace {format_bytes(self.workspace_bytes)} = "
            f"{format_bytes(self.gpu_total_bytes)}; "
            f"pinned RAM {format_bytes(self.cpu_weight_bytes)}; "
            f"streamed per pass {format_bytes(self.streamed_bytes_per_pass)}"
        )


def plan_placement(
    part_bytes: dict[str, int],
    policy: OffloadPolicy,
    kv_bytes: int = 0,
    workspace_bytes: int = 0,
    *,
    pinned_tier: bool = True,
) -> Placement:
    """Place parts: embedding and head on the GPU, then layers on the GPU while the budget
    allows (after stream buffers, KV and workspace), then pinned RAM, then disk.

    ``pinned_tier=False`` (a CPU-only machine, where RAM is the device memory) skips the pinned
    tier: layers are resident within the device budget, the rest stream from disk."""
    # On a CPU-only machine the device memory is RAM, budgeted by --cpu-memory.
    memory, flag = ("GPU", "--gpu-memory") if pinned_tier else ("RAM", "--cpu-memory")
    layers = [part for part in part_bytes if part.startswith("layer_")]
    fixed = part_bytes["embedding"] + part_bytes["head"]
    largest_layer = max(part_bytes[part] for part in layers)
    gpu_budget = policy.gpu_memory_bytes
    cpu_budget = policy.cpu_memory_bytes
    all_layers = sum(part_bytes[part] for part in layers)
    if policy.weights_on == "gpu" or (
        policy.weights_on == "auto"
        and (gpu_budget is None or fixed + all_layers + kv_bytes + workspace_bytes <= gpu_budget)
    ):
        need = fixed + all_layers + kv_bytes + workspace_bytes
        if gpu_budget is not None and need > gpu_budget:
            raise OffloadError(
                f"weights on the GPU need {format_bytes(need)} (weights "
                f"{format_bytes(fixed + all_layers)}, KV {format_bytes(kv_bytes)}, workspace "
                f"{format_bytes(workspace_bytes)}) but the {memory} budget is "
                f"{format_bytes(gpu_budget)}"
            )
        tiers = dict.fromkeys(part_bytes, "gpu")
        return Placement(tiers, fixed + all_layers, 0, kv_bytes, workspace_bytes, 0, 0, 0)

    buffers = 2 * largest_layer
    floor = fixed + buffers + kv_bytes + workspace_bytes
    if gpu_budget is not None and floor > gpu_budget:
        raise OffloadError(
            f"the {memory} budget {format_bytes(gpu_budget)} cannot hold the minimum: "
            f"embedding+head {format_bytes(fixed)} + 2 stream buffers {format_bytes(buffers)} + KV "
            f"{format_bytes(kv_bytes)} + workspace {format_bytes(workspace_bytes)} = "
            f"{format_bytes(floor)}; lower the batch size or raise {flag}"
        )
    tiers = {"embedding": "gpu", "head": "gpu"}
    gpu_used, cpu_used, streamed, from_disk = fixed, 0, 0, 0
    for part in layers:
        size = part_bytes[part]
        if policy.weights_on == "auto" and (
            gpu_budget is None or floor + (gpu_used - fixed) + size <= gpu_budget
        ):
            tiers[part] = "gpu"
            gpu_used += size
        elif (
            pinned_tier
            and policy.weights_on != "disk"
            and (cpu_budget is None or cpu_used + size <= cpu_budget)
        ):
            tiers[part] = "cpu"
            cpu_used += size
            streamed += size
        elif policy.weights_on == "cpu":
            raise OffloadError(
                f"--weights-on cpu needs {format_bytes(cpu_used + size)}+ of pinned RAM for "
                f"{part} onwards, but the CPU budget is {format_bytes(cpu_budget or 0)}"
            )
        else:
            tiers[part] = "disk"
            streamed += size
            from_disk += size
    return Placement(
        tiers, gpu_used, buffers, kv_bytes, workspace_bytes, cpu_used, streamed, from_disk
    )


class WeightSource(Protocol):
    """The engine's view of the weights: embedding, layers in order, head."""

    config: ModelConfig
    device: torch.device
    dtype: torch.dtype

    def embedding(self) -> Weights: ...

    def head(self) -> Weights: ...

    def layers(self) -> Iterator[tuple[int, Weights]]: ...


def cast_part(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype, part: str, source: str
) -> dict[str, torch.Tensor]:
    """Cast a part to the compute dtype; refuse fp16 when a value would overflow it."""
    if dtype == torch.float16:
        for name, tensor in tensors.items():
            if tensor.dtype != torch.float16 and tensor.is_floating_point():
                peak = tensor.abs().max().item() if tensor.numel() else 0.0
                if peak > FP16_MAX:
                    raise ConfigError(
                        f"{source}: tensor {name} of {part} has |value| {peak:.4g} beyond fp16's "
                        "range; run with --dtype bf16 or fp32"
                    )
    return {name: tensor.to(dtype) for name, tensor in tensors.items()}


class ResidentWeights:
    """Every part read once (checksums verified), cast, and kept on ``device``."""

    def __init__(
        self, store: ModelStore, device: torch.device | str, dtype: torch.dtype, verify: bool = True
    ):
        self.config = store.config
        self.device = torch.device(device)
        self.dtype = dtype
        self._parts: dict[str, Weights] = {}
        for part in store.parts:
            tensors = store.read_part(part, verify=verify)
            tensors = cast_part(tensors, dtype, part, str(store.parts[part].path))
            self._parts[part] = {name: tensor.to(self.device) for name, tensor in tensors.items()}

    def embedding(self) -> Weights:
        return self._parts["embedding"]

    def head(self) -> Weights:
        return self._parts["head"]

    def layers(self) -> Iterator[tuple[int, Weights]]:
        for layer_idx in range(self.config.num_layers):
            yield layer_idx, self._parts[f"layer_{layer_idx}"]


class QuantizedResidentWeights:
    """The weight source for a compressed store: every part read once (checksums verified) and
    kept on ``device`` as stored; layers dequantize through one shared scratch buffer."""

    def __init__(
        self, store: ModelStore, device: torch.device | str, dtype: torch.dtype, verify: bool = True
    ):
        if store.quantization is None:
            raise ConfigError(f"{store.path} is not a compressed store; use ResidentWeights")
        self.config = store.config
        self.device = torch.device(device)
        self.dtype = dtype
        self._scratch = torch.empty(scratch_elements(self.config), dtype=dtype, device=self.device)
        self._plain: dict[str, Weights] = {}
        self._layers: list[DequantizingWeights] = []
        for part in store.parts:
            where = str(store.parts[part].path)
            tensors = store.read_part(part, verify=verify)
            if part.startswith("layer_"):
                on_device = {name: tensor.to(self.device) for name, tensor in tensors.items()}
                self._layers.append(
                    DequantizingWeights(on_device, store.quantization, dtype, self._scratch, where)
                )
            else:
                self._plain[part] = {
                    name: to_compute(tensor, dtype, name, where).to(self.device)
                    for name, tensor in tensors.items()
                }

    def embedding(self) -> Weights:
        return self._plain["embedding"]

    def head(self) -> Weights:
        return self._plain["head"]

    def layers(self) -> Iterator[tuple[int, Weights]]:
        yield from enumerate(self._layers)
