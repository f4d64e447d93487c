"""One safetensors file per model part, written as a stream and read as one block.

The format is plain safetensors (an 8-byte little-endian header length, a JSON header, then the
tensors' bytes back to back), so the ``safetensors`` library reads our files. We write and read
it ourselves for two reasons: writing streams tensor by tensor while hashing (the converter never
holds a second copy of a layer), and reading fills one caller-given buffer (pinned RAM, say)
with a single sequential read, the tensors then being views into it.

Data starts at a 64-byte boundary and tensors are ordered by element size, widest first, so
every view is aligned. This module knows nothing of YaLM: names, shapes and checksums are data.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from yalm_runner.errors import CheckpointError

DATA_ALIGNMENT = 64
WRITE_CHUNK_BYTES = 64 << 20
MAX_HEADER_BYTES = 100 << 20

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be, known before its bytes exist."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class TensorRecord:
    """Where a tensor lies in its file (offsets from the start of the data) and its checksum."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int
    end: int
    sha256: str


@dataclass(frozen=True)
class FileLayout:
    """A parsed header: tensor records in data order and where the data starts."""

    data_start: int
    records: tuple[TensorRecord, ...]
    metadata: dict[str, str]

    @property
    def file_bytes(self) -> int:
        return self.data_start + (self.records[-1].end if self.records else 0)


def _data_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    return sorted(specs, key=lambda spec: -torch.empty((), dtype=spec.dtype).element_size())


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    padded = -(8 + len(raw)) % DATA_ALIGNMENT
    return raw + b" " * padded


def write_tensor_file(
    path: Path,
    specs: Iterable[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> list[TensorRecord]:
    """Write ``path`` atomically, asking ``produce`` for one tensor at a time.

    The file appears under its name only once complete and fsynced. On any failure (a full
    disk, a producer error) the partial temporary file is removed and the error is raised as
    ``CheckpointError`` naming ``path``.
    """
    ordered = _data_order(specs)
    header = _header_bytes(ordered, metadata or {})
    temp_path = path.with_name(path.name + ".partial")
    records: list[TensorRecord] = []
    try:
        with open(temp_path, "wb") as handle:
            handle.write(struct.pack("<Q", len(header)))
            handle.write(header)
            offset = 0
            for spec in ordered:
                tensor = produce(spec)
                if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                    raise CheckpointError(
                        f"{path}: tensor {spec.name} is {tuple(tensor.shape)} {tensor.dtype}, "
                        f"expected {spec.shape} {spec.dtype}"
                    )
                digest = hashlib.sha256()
                flat = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
                for chunk_start in range(0, flat.size, WRITE_CHUNK_BYTES):
                    chunk = memoryview(flat[chunk_start : chunk_start + WRITE_CHUNK_BYTES])
                    digest.update(chunk)
                    handle.write(chunk)
                del tensor, flat
                records.append(
                    TensorRecord(
                        spec.name,
                        spec.shape,
                        spec.dtype,
                        offset,
                        offset + spec.nbytes,
                        digest.hexdigest(),
                    )
                )
                offset += spec.nbytes
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except OSError as exc:
        temp_path.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return records


def read_layout(path: Path) -> FileLayout:
    """Parse and sanity-check the header of ``path`` (no data is read)."""
    try:
        file_bytes = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated file ({file_bytes} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_bytes:
                raise CheckpointError(f"{path}: truncated or corrupt header (length {header_len})")
            raw = handle.read(header_len)
    except FileNotFoundError as exc:
        raise CheckpointError(f"missing file {path}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    records = []
    for name, entry in header.items():
        try:
            dtype = DTYPES_BY_NAME[entry["dtype"]]
            begin, end = (int(value) for value in entry["data_offsets"])
            shape = tuple(int(size) for size in entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name}") from exc
        records.append(TensorRecord(name, shape, dtype, begin, end, ""))
    records.sort(key=lambda record: record.begin)
    position = 0
    for record in records:
        if (
            record.begin != position
            or record.end - record.begin
            != TensorSpec(record.name, record.shape, record.dtype).nbytes
        ):
            raise CheckpointError(f"{path}: tensor {record.name} has inconsistent data offsets")
        position = record.end
    data_start = 8 + header_len
    if data_start + position > file_bytes:
        raise CheckpointError(
            f"{path}: truncated file ({file_bytes} bytes, header promises {data_start + position})"
        )
    return FileLayout(data_start, tuple(records), metadata)


def read_into(path: Path, layout: FileLayout, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Read all tensor data of ``path`` into the uint8 ``buffer``; return views by name.

    ``buffer`` must hold at least the data bytes; it may be pinned RAM. One sequential read.
    """
    data_bytes = layout.file_bytes - layout.data_start
    if buffer.dtype != torch.uint8 or buffer.numel() < data_bytes:
        raise ValueError(f"buffer too small for {path}: {buffer.numel()} < {data_bytes}")
    target = memoryview(buffer.numpy()).cast("B")[:data_bytes]
    try:
        with open(path, "rb", buffering=0) as handle:
            handle.seek(layout.data_start)
            filled = 0
            while filled < data_bytes:
                count = handle.readinto(target[filled:])
                if not count:
                    raise CheckpointError(
                        f"{path}: truncated file (ended {data_bytes - filled} bytes early)"
                    )
                filled += count
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return views(buffer, layout)


def views(buffer: torch.Tensor, layout: FileLayout) -> dict[str, torch.Tensor]:
    """Tensors of ``layout`` as views into a uint8 ``buffer`` holding the file's data."""
    return {
        record.name: buffer[record.begin : record.end].view(record.dtype).view(record.shape)
        for record in layout.records
    }


def sha256_of(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()
