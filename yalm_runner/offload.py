"""Where weights live and when they move to the compute device.

A weight source hands the engine each part's tensors, on the compute device and in the compute
dtype, in forward order. ``ResidentWeights`` loads every part once and keeps it there; the
streaming sources (pinned RAM, disk) follow the same contract, so the engine's loop is one loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from yalm_runner.checkpoint import Store
from yalm_runner.config import ModelConfig
from yalm_runner.errors import ConfigError
from yalm_runner.model import Weights

FP16_MAX = 65504.0


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
        self, store: Store, device: torch.device | str, dtype: torch.dtype, verify: bool = True
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
