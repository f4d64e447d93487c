"""The released checkpoint's layout, for reading it and for writing tiny copies of it.

The facts are in docs/yalm.md §Release layout.

A release is a folder with ``weights/layer_XX-model_RR-model_states.pt`` (DeepSpeed pipeline
slots XX; tensor-parallel rank RR) and ``vocab/voc_100b.sp``. Slot 00 holds the word embedding,
01 the projector's LayerNorm, 03..L+2 the transformer layers, L+4 the head; 02 and L+3 do not
exist. Every file is a flat dict of module-relative tensor names.

This module is a table of those facts plus the rules that merge tensor-parallel shards and check
one release file against the table; it does not decide dtypes, write our store, or know how the
files arrive (``fetch`` and ``downloader`` do).
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from yalm_runner.config import ModelConfig
from yalm_runner.errors import CheckpointError
from yalm_runner.model import expected_shapes

WEIGHTS_DIR = "weights"
VOCAB_DIR = "vocab"
VOCAB_NAME = "voc_100b.sp"
# The released checkpoint does not record its attention heads (YaLM-100B has 128). A release
# made here (``make-tiny``) records its own in this file, so ``convert`` needs no flag for it.
HEADS_RECORD = "num_heads.json"
YALM_100B_HEADS = 128
FILE_PATTERN = re.compile(r"^layer_(\d\d)-model_(\d\d)-model_states\.pt$")
# Where the original repository's download/download.sh takes the release from, and the folder
# it puts it in.
PUBLIC_URL = "https://yalm-100b.s3.yandex.net/"
DEFAULT_FOLDER_NAME = "yalm100b_checkpoint"
FIRST_LAYER_SLOT = 3

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


def release_path(slot: int, rank: int = 0) -> str:
    """A weights file's path relative to the release folder (and to its URL)."""
    return f"{WEIGHTS_DIR}/{release_file_name(slot, rank)}"


VOCAB_PATH = f"{VOCAB_DIR}/{VOCAB_NAME}"


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


def slot_shapes(config: ModelConfig, slot: int, num_ranks: int = 1) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in one rank's file of ``slot`` (a shard when split)."""
    if slot in (0, 1):
        full = expected_shapes(config, "embedding")
        names = ["word_embeddings.weight"] if slot == 0 else list(full)[1:]
        full = {name: full[name] for name in names}
    elif slot == config.num_layers + 4:
        full = expected_shapes(config, "head")
    elif FIRST_LAYER_SLOT <= slot < config.num_layers + FIRST_LAYER_SLOT:
        full = expected_shapes(config, f"layer_{slot - FIRST_LAYER_SLOT}")
    else:
        raise CheckpointError(
            f"slot {slot:02d} holds no tensors in a {config.num_layers}-layer release"
        )
    shards = {}
    for name, shape in full.items():
        dim = SPLIT_DIMS.get(name)
        if dim is not None and num_ranks > 1:
            shape = (*shape[:dim], shape[dim] // num_ranks, *shape[dim + 1 :])
        shards[name] = shape
    return shards


def discover_release(exists: Callable[[str], bool]) -> tuple[int, int]:
    """(layers, tensor-parallel ranks) of a release seen only through ``exists(relative path)``.

    Reads the layout as ``scan_release`` does: layer files from slot 03 up to the first missing
    slot N = L + 3, the head at N + 1; ranks from 00 up to the first missing one in slot 00.
    """
    for path in (VOCAB_PATH, release_path(0), release_path(1)):
        if not exists(path):
            raise CheckpointError(f"not a YaLM release: {path} is missing")
    slot = FIRST_LAYER_SLOT
    while exists(release_path(slot)):
        slot += 1
    num_layers = slot - FIRST_LAYER_SLOT
    if num_layers < 1:
        raise CheckpointError(f"not a YaLM release: {release_path(FIRST_LAYER_SLOT)} is missing")
    if not exists(release_path(slot + 1)):
        raise CheckpointError(
            f"{release_path(slot + 1)} is missing: after {num_layers} layers "
            f"(the first missing slot is {slot:02d}) the head must follow"
        )
    num_ranks = 1
    while exists(release_path(0, num_ranks)):
        num_ranks += 1
    return num_layers, num_ranks


def recorded_num_heads(root: str | Path) -> int | None:
    """The head count a release records (``HEADS_RECORD``), or None when it records none."""
    path = Path(root) / HEADS_RECORD
    if not path.is_file():
        return None
    try:
        heads = json.loads(path.read_text(encoding="utf-8"))["num_heads"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a head-count record ({exc!r})") from None
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise CheckpointError(f"{path}: num_heads must be a positive integer, got {heads!r}")
    return heads


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


def check_release_file(path: Path, expected: dict[str, tuple[int, ...]] | set[str]) -> None:
    """Is ``path`` a whole torch zip checkpoint holding the tensors ``expected``?

    ``expected`` maps names to shapes, or is a set of names when the shapes are not known yet.
    Every zip member's CRC is checked (a damaged or truncated download fails here), then the
    tensors' names and shapes. Raises ``CheckpointError`` naming the file and what is wrong.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except FileNotFoundError as exc:
        raise CheckpointError(f"missing file {path}") from exc
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a whole torch zip checkpoint ({exc})") from exc
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged (checksum mismatch in {damaged})")
    tensors = load_release_file(path)
    names = set(expected)
    if set(tensors) != names:
        raise CheckpointError(
            f"{path}: missing tensors {sorted(names - set(tensors))}, "
            f"extra tensors {sorted(set(tensors) - names)}"
        )
    if isinstance(expected, dict):
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise CheckpointError(
                    f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                    f"expected {shape}"
                )


def check_vocab(path: Path) -> None:
    """Is ``path`` a SentencePiece model that loads? Raises ``CheckpointError`` naming it."""
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a SentencePiece model ({exc})") from exc


def slot_names(slot: int, num_layers: int) -> set[str]:
    """The tensor names of ``slot``, which do not depend on the model's sizes."""
    probe = ModelConfig(
        vocab_size=2,
        embedding_size=2,
        hidden_size=2,
        num_layers=num_layers,
        num_heads=1,
        ffn_size=2,
    )
    return set(slot_shapes(probe, slot))


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
