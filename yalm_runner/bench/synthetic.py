"""The bench's workload: named model shapes and their synthetic weights, at the base of
``yalm_runner.bench``.

``SyntheticStore`` offers the part of ``ModelStore``'s interface the streaming source and the
planner read, with random weights made on the fly and never written to disk; ``SHAPES`` names
the shapes every benchmark (and the planner's tests) run; ``estimate_workspace`` is the bench's
own safe overestimate of a prefill's activation memory, used to size the peers' batches as well
as ours. This module measures nothing and knows nothing of the peers, the tables or the link.
"""

from __future__ import annotations

from pathlib import Path

import torch

from yalm_runner.checkpoint import PartInfo, part_names, stored_specs
from yalm_runner.config import ModelConfig
from yalm_runner.quant import Quantization
from yalm_runner.tensorfile import TensorRecord

# An id no row produces: random weights would end rows at random, so every row runs its full
# length and runs compared with each other do the same work.
NO_EOS = -1

SHAPES = {
    # A 13B-class shape in YaLM's layer form (GeGLU, biases, 2048-wide embedding).
    "13b": ModelConfig(
        vocab_size=128000,
        embedding_size=2048,
        hidden_size=5120,
        num_layers=40,
        num_heads=40,
        ffn_size=13824,
    ),
    "yalm-100b": ModelConfig(),
    "tiny": ModelConfig(
        vocab_size=1000, embedding_size=32, hidden_size=64, num_layers=4, num_heads=4, ffn_size=172
    ),
}


class SyntheticStore:
    """The part of ``ModelStore``'s interface the streaming source reads, with random weights; with
    ``quantization``, the layers' records are those of a compressed store."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        seed: int = 0,
        quantization: Quantization | None = None,
    ):
        self.config = config
        self.dtype = dtype
        self.quantization = quantization
        self.parts: dict[str, PartInfo] = {}
        for part in part_names(config):
            offset, records = 0, []
            for name, (shape, kind) in stored_specs(config, part, quantization, dtype).items():
                count = 1
                for size in shape:
                    count *= size
                size = count * torch.empty((), dtype=kind).element_size()
                records.append(TensorRecord(name, shape, kind, offset, offset + size, ""))
                offset += size  # contiguous, as the store's files are
            self.parts[part] = PartInfo(part, Path(f"<synthetic {part}>"), offset, tuple(records))
        self._generator_device = "cuda" if torch.cuda.is_available() else "cpu"
        self._seed = seed

    def read_part(
        self, part: str, *, buffer: torch.Tensor | None = None, verify: bool = True
    ) -> dict[str, torch.Tensor]:
        generator = torch.Generator(self._generator_device).manual_seed(
            self._seed + len(part) * 1000 + sum(map(ord, part))
        )
        tensors = {}
        for record in self.parts[part].records:
            if "norm" in record.name:
                tensor = torch.ones(record.shape, device=self._generator_device)
            else:
                scale = 1.0 if "word_embeddings" in record.name else record.shape[-1] ** -0.5
                tensor = torch.empty(record.shape, device=self._generator_device).uniform_(
                    -scale, scale, generator=generator
                )
            tensors[record.name] = tensor.to(self.dtype).cpu()
        return tensors


def estimate_workspace(config: ModelConfig, batch: int, prompt_len: int, dtype: torch.dtype) -> int:
    """Activation memory of the prefill pass, the largest of the run (a safe overestimate)."""
    element = torch.empty((), dtype=dtype).element_size()
    tokens = batch * prompt_len
    per_token = 3 * config.hidden_size + 3 * config.ffn_size + 4 * config.hidden_size
    scores = batch * config.num_heads * prompt_len * prompt_len * 4
    logits = batch * config.vocab_size * 4 * 3
    return tokens * per_token * element + 2 * scores + logits
