"""Frozen configuration records: the model's shape and the sampling settings.

``ModelConfig`` is read from a store's manifest (never from a folder name or a flag) or inferred
from the released checkpoint's tensor shapes by the converter. Validation raises
``ConfigError`` naming the value at fault. Offload policy lives with the offload code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from yalm_runner.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a YaLM model. Defaults are YaLM-100B's (docs/yalm.md §Sizes)."""

    vocab_size: int = 128000
    embedding_size: int = 2048
    hidden_size: int = 10240
    num_layers: int = 80
    num_heads: int = 128
    ffn_size: int = 27308
    max_positions: int = 1024
    layernorm_eps: float = 1e-5
    rotary_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "embedding_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "ffn_size",
            "max_positions",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model config: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model config: head dim {self.head_dim} must be even for rotary")
        if self.embedding_size > self.hidden_size:
            raise ConfigError(
                f"model config: embedding_size {self.embedding_size} exceeds hidden_size "
                f"{self.hidden_size}; the projector only zero-pads"
            )
        if not (isinstance(self.layernorm_eps, float) and 0 < self.layernorm_eps < 1):
            raise ConfigError(
                f"model config: layernorm_eps must be in (0, 1), got {self.layernorm_eps!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layer_param_count(self, layer_idx: int) -> int:
        hidden, ffn = self.hidden_size, self.ffn_size
        count = 3 * hidden * hidden + 3 * hidden  # query_key_value
        count += hidden * hidden + hidden  # attention.dense
        count += 2 * (ffn * hidden + ffn) + hidden * ffn + hidden  # GeGLU
        count += 2 * hidden  # post_attention_layernorm
        if layer_idx > 0:
            count += 2 * hidden  # input_layernorm (layer 0 has none)
        return count

    def param_count(self) -> int:
        embedding = self.vocab_size * self.embedding_size + 2 * self.embedding_size
        head = 2 * self.hidden_size + self.embedding_size * self.hidden_size
        head += self.embedding_size + 2 * self.embedding_size + self.vocab_size
        layers = sum(self.layer_param_count(layer_idx) for layer_idx in range(self.num_layers))
        return embedding + layers + head

    def kv_bytes_per_token(self, element_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.hidden_size * element_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a mapping, got {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config: unknown keys {unknown}")
        values = dict(data)
        for name in ("layernorm_eps", "rotary_base"):
            if name in values and isinstance(values[name], int):
                values[name] = float(values[name])
        return cls(**values)


@dataclass(frozen=True)
class SamplingParams:
    """How logits become tokens. Defaults are the original scripts' (docs/yalm.md §Sampling)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.9
    seed: int = 1234

    def __post_init__(self) -> None:
        # The settings' own checks, so that a record built in code is refused with the same
        # words as a flag or a YAML key (``temperature: must be > 0 unless greedy is set``).
        from yalm_runner.settings import SamplingSettings, build

        build(SamplingSettings, dataclasses.asdict(self))

    @classmethod
    def from_settings(cls, settings: Any) -> SamplingParams:
        """The record of checked settings (``yalm_runner.settings.SamplingSettings`` or any
        settings that extend it)."""
        return cls(
            greedy=settings.greedy,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=settings.seed,
        )

    @classmethod
    def from_mapping(cls, sampling: Mapping[str, Any]) -> SamplingParams:
        """A stored prompt's sampling mapping (``settings.SAMPLING_KEYS``), checked."""
        from yalm_runner.settings import SamplingSettings, build

        return cls.from_settings(build(SamplingSettings, sampling, "sampling"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
