"""The released checkpoint -> our store, one part at a time.

Sizes are inferred from tensor shapes (the release has no config file); the head count cannot be
inferred and is given (YaLM-100B's 128 by default). Each part's release files are memory-mapped,
its tensors merged across tensor-parallel ranks and cast one tensor at a time, and streamed into
the part's file, so peak memory stays near one release file plus one tensor.

With a ``Quantization`` the layers' linear matrices are compressed on the way (``quant``), from
the release's own values; a matrix's stored tensors are made together when the first of them
is written, so at most one part's compressed matrices wait in memory for their turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yalm_runner.checkpoint import StoreWriter, part_names, stored_specs
from yalm_runner.config import ModelConfig
from yalm_runner.errors import CheckpointError, ConfigError
from yalm_runner.quant import Quantization, matrix_of, quantize_matrix
from yalm_runner.release import (
    SPLIT_DIMS,
    YALM_100B_HEADS,
    ReleaseLayout,
    load_release_file,
    merge_shards,
    recorded_num_heads,
    scan_release,
    slots_for_parts,
)
from yalm_runner.settings import torch_dtype
from yalm_runner.tensorfile import TensorSpec

FP16_MAX = 65504.0
CHECK_CHUNK_ELEMENTS = 1 << 24


def parse_dtype(name: str) -> torch.dtype:
    """``bf16``/``fp16``/``fp32`` (or the long names): the settings' one vocabulary."""
    return torch_dtype(name)


@dataclass(frozen=True)
class PartProgress:
    """Reported after each part is written."""

    part: str
    index: int
    total: int
    bytes_written: int


def _merged_shape(name: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    dim = SPLIT_DIMS.get(name)
    if dim is None or len(shapes) == 1:
        return shapes[0]
    merged = list(shapes[0])
    merged[dim] = sum(shape[dim] for shape in shapes)
    return tuple(merged)


def _load_slot(layout: ReleaseLayout, slot: int) -> tuple[dict[str, list[torch.Tensor]], Path]:
    shards: dict[str, list[torch.Tensor]] = {}
    paths = layout.files(slot)
    for rank, path in enumerate(paths):
        tensors = load_release_file(path)
        if rank and set(tensors) != set(shards):
            raise CheckpointError(
                f"{path}: tensor names differ from rank 0's ({sorted(set(tensors) ^ set(shards))})"
            )
        for name, tensor in tensors.items():
            shards.setdefault(name, []).append(tensor)
    return shards, paths[0]


def infer_config(
    layout: ReleaseLayout, num_heads: int = 128, max_positions: int = 1024
) -> ModelConfig:
    """The model's shape from the release's tensor shapes (and the given head count)."""
    embedding, embedding_path = _load_slot(layout, 0)
    first_layer, layer_path = _load_slot(layout, 3)
    try:
        vocab_size, embedding_size = _merged_shape(
            "word_embeddings.weight", [t.shape for t in embedding["word_embeddings.weight"]]
        )
    except KeyError:
        raise CheckpointError(f"{embedding_path}: missing tensor word_embeddings.weight") from None
    try:
        qkv_rows, hidden_size = _merged_shape(
            "attention.query_key_value.weight",
            [t.shape for t in first_layer["attention.query_key_value.weight"]],
        )
        ffn_size, _ = _merged_shape(
            "mlp.dense_ffn_hidden.weight",
            [t.shape for t in first_layer["mlp.dense_ffn_hidden.weight"]],
        )
    except KeyError as exc:
        raise CheckpointError(f"{layer_path}: missing tensor {exc.args[0]}") from None
    if qkv_rows != 3 * hidden_size:
        raise CheckpointError(
            f"{layer_path}: attention.query_key_value.weight has {qkv_rows} rows, "
            f"expected 3 x {hidden_size}"
        )
    if hidden_size % num_heads:
        raise ConfigError(
            f"hidden size {hidden_size} is not divisible by --num-heads {num_heads}; "
            "the release does not record the head count, pass the right one"
        )
    return ModelConfig(
        vocab_size=vocab_size,
        embedding_size=embedding_size,
        hidden_size=hidden_size,
        num_layers=layout.num_layers,
        num_heads=num_heads,
        ffn_size=ffn_size,
        max_positions=max_positions,
    )


def _stored_specs(
    config: ModelConfig,
    part: str,
    shards: dict[str, list[torch.Tensor]],
    dtype: torch.dtype,
    quantization: Quantization | None,
) -> list[TensorSpec]:
    """What the part's file will hold: the release's tensors, compressed ones replaced."""
    if quantization is None:
        return [
            TensorSpec(name, _merged_shape(name, [t.shape for t in tensors]), dtype)
            for name, tensors in shards.items()
        ]
    # Names and shapes are checked against the model by the writer; a release tensor of the
    # wrong shape shows up there as a mismatch of its stored tensors.
    expected = stored_specs(config, part, quantization, dtype)
    specs = []
    for name, tensors in shards.items():
        shape = _merged_shape(name, [t.shape for t in tensors])
        stored = (
            quantization.stored_specs(name, shape)
            if len(shape) == 2 and any(matrix_of(key) == name for key in expected)
            else {name: (shape, dtype)}
        )
        specs.extend(TensorSpec(key, size, kind) for key, (size, kind) in stored.items())
    return specs


def _check_finite(tensor: torch.Tensor, name: str, source: Path) -> None:
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHECK_CHUNK_ELEMENTS):
        if not torch.isfinite(flat[start : start + CHECK_CHUNK_ELEMENTS]).all():
            raise CheckpointError(f"{source}: tensor {name} holds NaN or infinite values")


def _checked_cast(
    tensor: torch.Tensor, dtype: torch.dtype, name: str, source: Path
) -> torch.Tensor:
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHECK_CHUNK_ELEMENTS):
        chunk = flat[start : start + CHECK_CHUNK_ELEMENTS]
        if not torch.isfinite(chunk).all():
            raise CheckpointError(f"{source}: tensor {name} holds NaN or infinite values")
        if dtype == torch.float16 and tensor.dtype != torch.float16:
            peak = chunk.abs().max().item()
            if peak > FP16_MAX:
                raise CheckpointError(
                    f"{source}: tensor {name} has |value| {peak:.4g} beyond fp16's range; "
                    "convert with --dtype bf16 or fp32"
                )
    return tensor.to(dtype)


def release_dtype(layout: ReleaseLayout) -> torch.dtype:
    """The dtype the release stores its weights in (the word embedding's)."""
    first, _ = _load_slot(layout, 0)
    return first["word_embeddings.weight"][0].dtype


def release_source(name: str, layout: ReleaseLayout, num_heads: int) -> dict[str, Any]:
    """The manifest's record of where a store came from (part of the model's identity)."""
    return {
        "kind": "yalm-release",
        "path": name,
        "tensor_parallel_ranks": layout.num_ranks,
        "num_heads_given": num_heads,
    }


def convert_part(
    writer: StoreWriter,
    layout: ReleaseLayout,
    part: str,
    quantization: Quantization | None,
) -> int:
    """Convert one part from its release files into ``writer``'s store; returns its bytes."""
    config, dtype = writer.config, writer.dtype
    shards: dict[str, list[torch.Tensor]] = {}
    origin: dict[str, Path] = {}
    for slot in slots_for_parts(config.num_layers)[part]:
        slot_shards, path = _load_slot(layout, slot)
        for name, tensors in slot_shards.items():
            if name in shards:
                raise CheckpointError(f"{path}: tensor {name} appears twice in part {part}")
            shards[name] = tensors
            origin[name] = path
    specs = _stored_specs(config, part, shards, dtype, quantization)
    pending: dict[str, torch.Tensor] = {}

    def produce(spec: TensorSpec) -> torch.Tensor:
        if spec.name in pending:
            return pending.pop(spec.name)
        matrix = matrix_of(spec.name)
        name = spec.name if matrix is None else matrix
        # Pop each tensor's shards so its memory is released once it has been written.
        merged = merge_shards(name, shards.pop(name), origin[name])
        if matrix is None:
            return _checked_cast(merged, dtype, name, origin[name])
        assert quantization is not None
        _check_finite(merged, name, origin[name])
        pending.update(quantize_matrix(name, merged, quantization))
        return pending.pop(spec.name)

    try:
        return writer.write_part(part, specs, produce)
    except CheckpointError as exc:
        sources = sorted({str(path) for path in origin.values()})
        raise CheckpointError(f"{exc} (from {', '.join(sources)})") from exc


def convert_release(
    src: str | Path,
    dst: str | Path,
    *,
    num_heads: int | None = None,
    dtype: torch.dtype | None = None,
    max_positions: int = 1024,
    quantization: Quantization | None = None,
    on_part: Callable[[PartProgress], None] | None = None,
) -> Path:
    """Convert the release folder ``src`` into a store at ``dst``; returns the manifest path.

    ``num_heads`` None takes the head count the release records (``make-tiny`` records it),
    else YaLM-100B's 128. ``dtype`` None keeps the release's own dtype (for everything not
    compressed). An interrupted conversion into ``dst`` resumes: the parts it finished are kept
    as they are.
    """
    if num_heads is None:
        num_heads = recorded_num_heads(src) or YALM_100B_HEADS
    layout = scan_release(src)
    config = infer_config(layout, num_heads, max_positions)
    if dtype is None:
        dtype = release_dtype(layout)
    if not dtype.is_floating_point:
        raise ConfigError(f"store dtype must be floating point, got {dtype}")
    writer = StoreWriter(
        Path(dst),
        config,
        dtype,
        source=release_source(Path(src).name, layout, num_heads),
        quantization=quantization,
    )
    parts = part_names(config)
    for index, part in enumerate(parts):
        if part in writer.parts_written:
            continue
        bytes_written = convert_part(writer, layout, part, quantization)
        if on_part is not None:
            on_part(PartProgress(part, index, len(parts), bytes_written))
    return writer.finish(layout.vocab_path)
