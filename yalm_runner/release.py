"""The released checkpoint's layout, for reading it and for writing tiny copies of it.

The facts are in docs/yalm.md §Release layout.

A release is a folder with ``weights/layer_XX-model_RR-model_states.pt`` (DeepSpeed pipeline
slots XX; tensor-parallel rank RR) and ``vocab/voc_100b.sp``. Slot 00 holds the word embedding,
01 the projector's LayerNorm, 03..L+2 the transformer layers, L+4 the head; 02 and L+3 do not
exist. Every file is a flat dict of module-relative tensor names.

This module is a table of those facts plus the rules that merge tensor-parallel shards; it does
not decide dtypes or write our store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from yalm_runner.errors import CheckpointError

WEIGHTS_DIR = "weights"
VOCAB_DIR = "vocab"
VOCAB_NAME = "voc_100b.sp"
FILE_PATTERN = re.compile(r"^layer_(\d\d)-model_(\d\d)-model_states\.pt$")

# Tensor-parallel split dimension per tensor name; names absent here are replicated
# (docs/yalm.md §Tensor-parallel shards).
SPLIT_DIMS = {
    "word_embeddings.weight": 0,
    "output_bias": 0,
    "attention.query_key_value.weight": 0,
    "attention.query_key_value.bias": 0,
    "mlp.dense_ffn_hidden.weight": 0,
    "mlp.dense_ffn_hidden.bias": 0,
    "mlp.dense_ffn_gate.weight": 0,
    "mlp.dense_ffn_gate.bias": 0,
    "attention.dense.weight": 1,
    "mlp.dense_ffn_output.weight": 1,
    "dense.weight": 1,
}


def release_file_name(slot: int, rank: int = 0) -> str:
    return f"layer_{slot:02d}-model_{rank:02d}-model_states.pt"


def slots_for_parts(num_layers: int) -> dict[str, list[int]]:
    """Our part name -> the release slots it is made of."""
    mapping = {"embedding": [0, 1]}
    mapping.update({f"layer_{idx}": [idx + 3] for idx in range(num_layers)})
    mapping["head"] = [num_layers + 4]
    return mapping


@dataclass(frozen=True)
class ReleaseLayout:
    """What is in a release folder: its slots, its tensor-parallel ranks, its vocabulary."""

    root: Path
    num_layers: int
    num_ranks: int
    vocab_path: Path

    def files(self, slot: int) -> list[Path]:
        return [
            self.root / WEIGHTS_DIR / release_file_name(slot, rank)
            for rank in range(self.num_ranks)
        ]


def scan_release(root: str | Path) -> ReleaseLayout:
    """Find the slots and ranks of a release folder; raise ``CheckpointError`` if incomplete."""
    root = Path(root)
    weights_dir = root / WEIGHTS_DIR
    if not weights_dir.is_dir():
        raise CheckpointError(f"{root} is not a YaLM release: no {WEIGHTS_DIR}/ folder")
    found: dict[int, set[int]] = {}
    for entry in weights_dir.iterdir():
        match = FILE_PATTERN.match(entry.name)
        if match:
            found.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not found:
        raise CheckpointError(f"{weights_dir}: no layer_XX-model_RR-model_states.pt files")
    head_slot = max(found)
    num_layers = head_slot - 4
    if num_layers < 1:
        raise CheckpointError(f"{weights_dir}: cannot tell the layer count (last slot {head_slot})")
    num_ranks = max(max(ranks) for ranks in found.values()) + 1
    for slot in [0, 1, *range(3, num_layers + 3), head_slot]:
        for rank in range(num_ranks):
            if rank not in found.get(slot, set()):
                raise CheckpointError(f"missing file {weights_dir / release_file_name(slot, rank)}")
    for slot in (2, num_layers + 3):
        if slot in found:
            raise CheckpointError(
                f"{weights_dir / release_file_name(slot, 0)}: unexpected slot (YaLM has none)"
            )
    vocab_dir = root / VOCAB_DIR
    candidates = sorted(vocab_dir.glob("*.sp")) if vocab_dir.is_dir() else []
    preferred = vocab_dir / VOCAB_NAME
    if preferred.is_file():
        vocab_path = preferred
    elif len(candidates) == 1:
        vocab_path = candidates[0]
    else:
        raise CheckpointError(f"{root}: expected one SentencePiece model in {VOCAB_DIR}/")
    return ReleaseLayout(root, num_layers, num_ranks, vocab_path)


def load_release_file(path: Path) -> dict[str, torch.Tensor]:
    """A release file's tensors, memory-mapped where the file format allows it."""
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (pre-zip) pickles cannot be memory-mapped; read them whole.
            data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"missing file {path}") from exc
    except Exception as exc:  # torch raises many types for a damaged pickle or zip
        raise CheckpointError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in data.items()
    ):
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return data


def merge_shards(name: str, shards: list[torch.Tensor], source: Path) -> torch.Tensor:
    """One full tensor from its tensor-parallel shards (contiguous chunks; docs/yalm.md
    §Tensor-parallel shards)."""
    if len(shards) == 1:
        return shards[0]
    dim = SPLIT_DIMS.get(name)
    if dim is None:
        first = shards[0]
        for rank, shard in enumerate(shards[1:], start=1):
            if shard.shape != first.shape or not torch.equal(shard, first):
                raise CheckpointError(
                    f"{source}: replicated tensor {name} differs between ranks 0 and {rank}"
                )
        return first
    return torch.cat(shards, dim=dim)


def save_release_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    torch.save({name: tensor.contiguous() for name, tensor in tensors.items()}, path)
