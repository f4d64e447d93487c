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

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import ModelConfig
from yalm_runner.directio import SLACK
from yalm_runner.errors import ConfigError, OffloadError
from yalm_runner.model import Weights
from yalm_runner.quant import DequantizingWeights, scratch_elements, to_compute
from yalm_runner.settings import (  # noqa: F401 (parse_bytes: callers import it here)
    check_offload_rules,
    check_setting,
    parse_bytes,
)
from yalm_runner.steptime import StepRates

FP16_MAX = 65504.0
RELAY_SLACK = SLACK  # a direct read's alignment slack, per relay
TIERS = ("gpu", "cpu", "disk")


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


@dataclass(frozen=True)
class MemoryBudgets:
    """What a placement may use, named for what each budget is on the machine at hand.

    On a GPU run the device memory is the GPU's (``--gpu-memory``) and layers that do not fit
    may live in pinned RAM (``--cpu-memory``). On a CPU-only run the device memory *is* RAM, set
    by ``--cpu-memory``, and there is no pinned tier: what does not stay resident is read from
    disk each step. ``plan_placement`` and the planner read only this record, so a RAM budget
    never travels under a GPU's name.
    """

    device_bytes: int | None  # None: no limit
    pinned_bytes: int | None  # pinned host RAM for streamed layers; None: no limit
    pinned_tier: bool = True
    device_memory: str = "GPU"  # what messages call the device memory: GPU or RAM
    device_flag: str = "--gpu-memory"  # the flag that sets ``device_bytes``


@dataclass(frozen=True)
class OffloadPolicy:
    """Budgets, not percentages, as the user gave them (``--gpu-memory``, ``--cpu-memory``);
    None means no limit of that kind. ``budgets_on`` says what they mean on a device."""

    gpu_memory_bytes: int | None = None
    cpu_memory_bytes: int | None = None
    weights_on: str = "auto"  # auto, gpu, cpu or disk: where streamed layers must live
    overlap: bool = True
    kv_on: str = "auto"  # auto, gpu or cpu: where the KV cache lives between layers
    kv_bits: int = 16  # 8 or 4: the pinned-RAM KV cache is kept compressed per (token, head)
    # pinned-RAM KV: rows (a copy a row), slots (a copy a layer) or auto (the planner's pick)
    kv_layout: str = "auto"
    kv_attention: str = "device"  # or host: decode attention on the CPU, where the cache lies
    # The link's and the drive's rates the planner compares plans at (``--link-gbps``,
    # ``--disk-gbps``): the machine's, not budgets.
    link_gbps: float = 25.0
    disk_gbps: float = 3.0

    def __post_init__(self) -> None:
        # The settings' own checks (yalm_runner.settings), so that a policy built in code is
        # refused with the same words as a flag or a YAML key.
        for name in ("weights_on", "kv_on", "kv_bits", "kv_layout", "kv_attention", "overlap",
                     "link_gbps", "disk_gbps"):  # fmt: skip
            check_setting(name, getattr(self, name))
        check_offload_rules(self.kv_bits, self.kv_on, self.kv_attention)
        for name in ("gpu_memory_bytes", "cpu_memory_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")

    @classmethod
    def from_settings(cls, settings: Any) -> OffloadPolicy:
        """The policy of checked runner settings (``yalm_runner.settings.RunnerSettings``)."""
        return cls(
            gpu_memory_bytes=settings.gpu_memory_bytes,
            cpu_memory_bytes=settings.cpu_memory_bytes,
            weights_on=settings.weights_on,
            kv_on=settings.kv_on,
            kv_bits=settings.kv_bits,
            kv_layout=settings.kv_layout,
            kv_attention=settings.kv_attention,
            overlap=settings.overlap,
            link_gbps=settings.link_gbps,
            disk_gbps=settings.disk_gbps,
        )

    def rates(self) -> StepRates:
        """The step-time model's rates for this machine: its link and drive, the device-side
        rates as ``steptime`` defaults them."""
        return StepRates(
            link_bytes_per_s=self.link_gbps * 1e9, disk_bytes_per_s=self.disk_gbps * 1e9
        )

    def budgets_on(self, device_type: str) -> MemoryBudgets:
        """The budgets as they apply on a ``cuda`` or ``cpu`` device."""
        if device_type == "cpu":
            return MemoryBudgets(self.cpu_memory_bytes, None, False, "RAM", "--cpu-memory")
        return MemoryBudgets(self.gpu_memory_bytes, self.cpu_memory_bytes)


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
    device_memory: str = "GPU"  # the device memory's name: GPU, or RAM on a CPU-only run
    relay_bytes: int = 0  # pinned RAM the disk tier's two relays take (0: no layer on disk)

    @property
    def pinned_bytes(self) -> int:
        """Pinned RAM the weights take: their layers and the disk tier's relays."""
        return self.cpu_weight_bytes + self.relay_bytes

    @property
    def gpu_total_bytes(self) -> int:
        """Everything the plan puts in the device memory (RAM on a CPU-only run)."""
        return (
            self.gpu_weight_bytes + self.stream_buffer_bytes + self.kv_bytes + self.workspace_bytes
        )

    def count(self, tier: str) -> int:
        return sum(
            1 for part, where in self.tiers.items() if where == tier and part.startswith("layer_")
        )

    def describe(self) -> str:
        memory = self.device_memory
        resident = "on the GPU" if memory == "GPU" else f"resident in {memory}"
        pinned = f", {self.count('cpu')} in pinned RAM" if memory == "GPU" else ""
        return (
            f"layers: {self.count('gpu')} {resident}{pinned}, {self.count('disk')} on disk; "
            f"{memory}: weights {format_bytes(self.gpu_weight_bytes)} + "
            f"stream buffers {format_bytes(self.stream_buffer_bytes)} + KV "
            f"{format_bytes(self.kv_bytes)} + workspace {format_bytes(self.workspace_bytes)} = "
            f"{format_bytes(self.gpu_total_bytes)}; "
            f"pinned RAM {format_bytes(self.cpu_weight_bytes)}"
            + (f" + disk relays {format_bytes(self.relay_bytes)}" if self.relay_bytes else "")
            + "; "
            f"streamed per pass {format_bytes(self.streamed_bytes_per_pass)}"
        )


def plan_placement(
    part_bytes: dict[str, int],
    policy: OffloadPolicy,
    kv_bytes: int = 0,
    workspace_bytes: int = 0,
    *,
    budgets: MemoryBudgets | None = None,
    sources: int = 1,
) -> Placement:
    """Place parts: embedding and head on the device, then layers on the device while its
    budget allows (after stream buffers, KV and workspace), then pinned RAM, then disk.
    ``sources``: the devices streaming the placement (they share the pinned layers; each has
    its own disk relays).

    ``budgets`` default to ``policy``'s on a GPU; a CPU-only machine passes
    ``policy.budgets_on("cpu")``: layers are resident within the RAM budget, the rest stream
    from disk (no pinned tier)."""
    budgets = budgets or policy.budgets_on("cuda")
    memory, flag = budgets.device_memory, budgets.device_flag
    pinned_tier = budgets.pinned_tier
    where = "on the GPU" if pinned_tier else "in RAM"
    # Without a pinned tier, "gpu" and "cpu" both mean the device memory.
    weights_on = policy.weights_on
    if not pinned_tier and weights_on in ("gpu", "cpu"):
        weights_on = "auto"
    layers = [part for part in part_bytes if part.startswith("layer_")]
    fixed = part_bytes["embedding"] + part_bytes["head"]
    largest_layer = max(part_bytes[part] for part in layers)
    device_budget = budgets.device_bytes
    pinned_budget = budgets.pinned_bytes
    all_layers = sum(part_bytes[part] for part in layers)
    if weights_on == "gpu" or (
        weights_on == "auto"
        and (
            device_budget is None
            or fixed + all_layers + kv_bytes + workspace_bytes <= device_budget
        )
    ):
        need = fixed + all_layers + kv_bytes + workspace_bytes
        if device_budget is not None and need > device_budget:
            raise OffloadError(
                f"weights {where} need {format_bytes(need)} (weights "
                f"{format_bytes(fixed + all_layers)}, KV {format_bytes(kv_bytes)}, workspace "
                f"{format_bytes(workspace_bytes)}) but the {memory} budget is "
                f"{format_bytes(device_budget)}"
            )
        tiers = dict.fromkeys(part_bytes, "gpu")
        return Placement(tiers, fixed + all_layers, 0, kv_bytes, workspace_bytes, 0, 0, 0, memory)

    buffers = 2 * largest_layer
    floor = fixed + buffers + kv_bytes + workspace_bytes
    if device_budget is not None and floor > device_budget:
        raise OffloadError(
            f"the {memory} budget {format_bytes(device_budget)} cannot hold the minimum: "
            f"embedding+head {format_bytes(fixed)} + 2 stream buffers {format_bytes(buffers)} + KV "
            f"{format_bytes(kv_bytes)} + workspace {format_bytes(workspace_bytes)} = "
            f"{format_bytes(floor)}; lower the batch size or raise {flag}"
        )

    def greedy(pinned_room: int | None) -> tuple[dict[str, str], int, int, int, int]:
        tiers = {"embedding": "gpu", "head": "gpu"}
        device_used, pinned_used, streamed, from_disk = fixed, 0, 0, 0
        for part in layers:
            size = part_bytes[part]
            if weights_on == "auto" and (
                device_budget is None or floor + (device_used - fixed) + size <= device_budget
            ):
                tiers[part] = "gpu"
                device_used += size
            elif (
                pinned_tier
                and weights_on != "disk"
                and (pinned_room is None or pinned_used + size <= pinned_room)
            ):
                tiers[part] = "cpu"
                pinned_used += size
                streamed += size
            elif weights_on == "cpu":
                raise OffloadError(
                    f"--weights-on cpu needs {format_bytes(pinned_used + size)}+ of pinned RAM "
                    f"for {part} onwards, but the CPU budget is {format_bytes(pinned_room or 0)}"
                )
            else:
                tiers[part] = "disk"
                streamed += size
                from_disk += size
        return tiers, device_used, pinned_used, streamed, from_disk

    # A layer read from disk passes through one of two pinned relays (``streaming``): once any
    # layer is, the pinned budget holds the relays beside the pinned layers (the 100B envelope
    # locked 65.0 GiB under a 64 GiB budget before they were counted).
    tiers, device_used, pinned_used, streamed, from_disk = greedy(pinned_budget)
    relay_bytes = sources * 2 * (largest_layer + RELAY_SLACK) if from_disk and pinned_tier else 0
    if relay_bytes and pinned_budget is not None and pinned_used + relay_bytes > pinned_budget:
        if relay_bytes > pinned_budget:
            raise OffloadError(
                f"layers read from disk pass through two pinned relays of "
                f"{format_bytes(relay_bytes // (2 * sources))} per device, over the CPU budget "
                f"{format_bytes(pinned_budget)}"
            )
        tiers, device_used, pinned_used, streamed, from_disk = greedy(pinned_budget - relay_bytes)
    spread = spread_disk_layers([tiers[part] for part in layers], layers)
    used = {
        tier: sum(part_bytes[part] for part in layers if spread[part] == tier) for tier in TIERS
    }
    if (device_budget is None or floor + used["gpu"] <= device_budget) and (
        pinned_budget is None or used["cpu"] + relay_bytes <= pinned_budget
    ):  # the budgets the greedy order was held to (layers of one size: always)
        tiers.update(spread)
        device_used, pinned_used, from_disk = fixed + used["gpu"], used["cpu"], used["disk"]
        streamed = used["cpu"] + used["disk"]
    return Placement(
        tiers,
        device_used,
        buffers,
        kv_bytes,
        workspace_bytes,
        pinned_used,
        streamed,
        from_disk,
        memory,
        relay_bytes,
    )


def spread_disk_layers(tiers: list[str], layers: list[str]) -> dict[str, str]:
    """The same tiers, the disk ones spread evenly over the layers, the others in their order.

    The streamer reads disk layers one after another, each into one of two relays, the next read
    starting when the layer two back has left its relay. Disk layers bunched at the end leave the
    drive idle while the layers before them run; spread out, each read overlaps the other layers
    between two disk layers, and when the drive sets the pace (a consumer machine whose RAM does
    not hold the model) the step approaches the drive's time alone (the step-time model predicts
    YaLM-100B int4 at 7 GiB / 52 GiB on PCIe 4 and a 3 GB/s NVMe 11 % faster)."""
    disk = tiers.count("disk")
    if not disk or disk == len(tiers):
        return dict(zip(layers, tiers, strict=True))
    positions = {int((k + 0.5) * len(tiers) / disk) for k in range(disk)}
    others = iter(tier for tier in tiers if tier != "disk")
    return {
        part: "disk" if index in positions else next(others) for index, part in enumerate(layers)
    }


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
