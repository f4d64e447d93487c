"""Our on-disk store: ``manifest.json`` plus one contiguous safetensors file per model part.

Layout of a store directory::

    manifest.json             format version, ModelConfig, dtype, tokenizer, per-file tensor records
    tokenizer.sp              the SentencePiece model the weights were trained with
    embedding.safetensors     word embedding + the projector's LayerNorm
    layers/layer_000.safetensors ... one per transformer layer
    head.safetensors          the output head (its matrix is tied to the word embedding)

A compressed store (``quantization`` in the manifest, format version 2) keeps each layer's
linear matrices as ``X.weight.q`` plus ``X.weight.scale`` (and ``X.weight.zero``) in place of
``X.weight`` (see ``quant``; ``stored_specs`` is what a store keeps per part, either way);
``read_part`` returns them as stored. Uncompressed stores are still
written as version 1, so older readers keep reading them; both versions open here.

The manifest is written last, so a store without one is incomplete. Until then ``progress.json``
records the settings and each part as it is finished (rewritten atomically after every part), so
an interrupted conversion resumes: a writer opened on the same folder with the same settings
keeps the parts already written whose files are intact, and the finished manifest equals the one
an uninterrupted run writes. Opening a store checks
everything that is cheap (manifest, file presence, sizes, headers, names, shapes, dtypes);
reading a part also checks each tensor's sha256. Every failure is a ``CheckpointError`` naming
the file and tensor at fault. This module knows the model's part names and shapes (from
``model``), not how the weights are used or moved.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yalm_runner.config import ModelConfig
from yalm_runner.errors import CheckpointError, ConfigError
from yalm_runner.fsutil import fsync_directory, sha256_file, write_text_atomic
from yalm_runner.model import expected_shapes
from yalm_runner.quant import QUANTIZED_MATRICES, Quantization
from yalm_runner.tensorfile import (
    DTYPE_NAMES,
    DTYPES_BY_NAME,
    FileLayout,
    TensorRecord,
    TensorSpec,
    read_into,
    read_layout,
    write_tensor_file,
)

FORMAT_NAME = "yalm-store"
FORMAT_VERSION = 2  # 2 added compressed stores; the version written is the lowest that reads it
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.json"
PROGRESS_FORMAT = "yalm-store-progress"
TOKENIZER_NAME = "tokenizer.sp"


def stored_specs(
    config: ModelConfig, part: str, quantization: Quantization | None, dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a store keeps for ``part``."""
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, shape in expected_shapes(config, part).items():
        if quantization is not None and name in QUANTIZED_MATRICES:
            specs.update(quantization.stored_specs(name, shape))
        else:
            specs[name] = (shape, dtype)
    return specs


def part_names(config: ModelConfig) -> list[str]:
    """Parts in forward order: ``embedding``, ``layer_0`` .. ``layer_{L-1}``, ``head``."""
    return ["embedding", *(f"layer_{idx}" for idx in range(config.num_layers)), "head"]


def part_file(part: str) -> str:
    if part.startswith("layer_"):
        return f"layers/layer_{int(part.removeprefix('layer_')):03d}.safetensors"
    return f"{part}.safetensors"


@dataclass(frozen=True)
class PartInfo:
    """One part's file as the manifest records it."""

    part: str
    path: Path
    file_bytes: int
    records: tuple[TensorRecord, ...]

    @property
    def data_bytes(self) -> int:
        return sum(record.end - record.begin for record in self.records)


class StoreWriter:
    """Writes a store part by part; ``finish`` writes the manifest that makes it complete."""

    def __init__(
        self,
        path: Path,
        config: ModelConfig,
        dtype: torch.dtype,
        source: dict[str, Any] | None = None,
        quantization: Quantization | None = None,
    ):
        self.path = Path(path)
        self.config = config
        self.dtype = dtype
        self.quantization = quantization
        self.source = source or {}
        self._files: dict[str, dict[str, Any]] = {}
        if (self.path / MANIFEST_NAME).exists():
            raise CheckpointError(f"{self.path} already holds a store; remove it or pick another")
        try:
            (self.path / "layers").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create {self.path}: {exc.strerror or exc}") from exc
        recorded = _read_progress(self.path)
        if recorded is not None:
            theirs, ours = recorded["settings"], self._settings()
            if theirs != ours:
                differ = "; ".join(
                    f"{key} {theirs.get(key)} there, {ours[key]} now"
                    for key in ours
                    if theirs.get(key) != ours[key]
                )
                raise CheckpointError(
                    f"{self.path} holds an interrupted conversion with other settings "
                    f"({differ}); re-run with the same settings or remove it"
                )
            self._files = {
                part: entry
                for part, entry in recorded["files"].items()
                if _part_file_intact(self.path, entry)
            }
        self._record_progress()

    @classmethod
    def resume(cls, path: Path) -> StoreWriter | None:
        """The writer of an interrupted conversion at ``path``, its settings as recorded."""
        recorded = _read_progress(Path(path))
        if recorded is None:
            return None
        settings = recorded["settings"]
        try:
            config = ModelConfig.from_dict(settings["model"])
            quantization = (
                Quantization.from_dict(settings["quantization"])
                if settings["quantization"]
                else None
            )
            dtype = DTYPES_BY_NAME[settings["dtype"]]
        except (ConfigError, KeyError) as exc:
            raise CheckpointError(f"{Path(path) / PROGRESS_NAME}: malformed ({exc})") from exc
        return cls(Path(path), config, dtype, settings["source"], quantization)

    @property
    def parts_written(self) -> set[str]:
        return set(self._files)

    def _settings(self) -> dict[str, Any]:
        settings = {
            "model": self.config.to_dict(),
            "dtype": DTYPE_NAMES[self.dtype],
            "quantization": self.quantization.to_dict() if self.quantization else None,
            "source": self.source,
        }
        return json.loads(json.dumps(settings))  # as it reads back from the file

    def _record_progress(self) -> None:
        progress = {"format": PROGRESS_FORMAT, "settings": self._settings(), "files": self._files}
        write_text_atomic(
            self.path / PROGRESS_NAME, json.dumps(progress, indent=1) + "\n", CheckpointError
        )

    def write_part(
        self, part: str, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor]
    ) -> int:
        """Write one part's file from ``specs``; returns the file's size in bytes."""
        expected = stored_specs(self.config, part, self.quantization, self.dtype)
        names = {spec.name for spec in specs}
        if names != set(expected):
            missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
            raise CheckpointError(f"part {part}: missing tensors {missing}, extra tensors {extra}")
        for spec in specs:
            if (spec.shape, spec.dtype) != expected[spec.name]:
                raise CheckpointError(
                    f"part {part}: tensor {spec.name} is {spec.shape} {spec.dtype}, "
                    f"expected {expected[spec.name][0]} {expected[spec.name][1]}"
                )
        relative = part_file(part)
        records = write_tensor_file(self.path / relative, specs, produce, {"part": part})
        self._files[part] = {
            "part": part,
            "file": relative,
            "bytes": (self.path / relative).stat().st_size,
            "tensors": [
                {
                    "name": record.name,
                    "shape": list(record.shape),
                    "dtype": DTYPE_NAMES[record.dtype],
                    "offset": record.begin,
                    "nbytes": record.end - record.begin,
                    "sha256": record.sha256,
                }
                for record in records
            ],
        }
        self._record_progress()
        return self._files[part]["bytes"]

    def finish(self, tokenizer_path: Path) -> Path:
        missing = [part for part in part_names(self.config) if part not in self._files]
        if missing:
            raise CheckpointError(f"store {self.path} is missing parts {missing}")
        target = self.path / TOKENIZER_NAME
        try:
            target.write_bytes(Path(tokenizer_path).read_bytes())
        except OSError as exc:
            raise CheckpointError(f"cannot copy tokenizer {tokenizer_path}: {exc}") from exc
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION if self.quantization else 1,
            "model": self.config.to_dict(),
            "dtype": DTYPE_NAMES[self.dtype],
            **({"quantization": self.quantization.to_dict()} if self.quantization else {}),
            "tokenizer": {"file": TOKENIZER_NAME, "sha256": sha256_file(target, CheckpointError)},
            "source": self.source,
            "files": [self._files[part] for part in part_names(self.config)],
        }
        write_text_atomic(
            self.path / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n", CheckpointError
        )
        (self.path / PROGRESS_NAME).unlink(missing_ok=True)
        fsync_directory(self.path)
        return self.path / MANIFEST_NAME


def _read_progress(path: Path) -> dict[str, Any] | None:
    progress_path = path / PROGRESS_NAME
    if not progress_path.is_file():
        return None
    try:
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
        if progress.get("format") != PROGRESS_FORMAT:
            raise CheckpointError(f"{progress_path}: not a {PROGRESS_FORMAT} file")
        if not isinstance(progress["settings"], dict) or not isinstance(progress["files"], dict):
            raise TypeError("settings and files must be mappings")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{progress_path}: malformed ({exc!r}); remove it to start over"
        ) from exc
    return progress


def _part_file_intact(store_path: Path, entry: dict[str, Any]) -> bool:
    """Does a recorded part's file still hold what was recorded (size and header)?

    Each part file is fsynced and renamed into place before it is recorded, so this cheap check
    catches a file removed or replaced since; the tensors' sha256 are checked when read.
    """
    file_path = store_path / entry["file"]
    try:
        if file_path.stat().st_size != entry["bytes"]:
            return False
        layout = read_layout(file_path)
    except (OSError, CheckpointError):
        return False
    on_disk = {(r.name, r.shape, DTYPE_NAMES[r.dtype], r.begin, r.end) for r in layout.records}
    recorded = {
        (t["name"], tuple(t["shape"]), t["dtype"], t["offset"], t["offset"] + t["nbytes"])
        for t in entry["tensors"]
    }
    return on_disk == recorded


class ModelStore:
    """A validated store on disk. ``ModelStore.open`` raises ``CheckpointError`` on any defect."""

    def __init__(self, path: Path, manifest: dict[str, Any], manifest_sha256: str):
        self.path = path
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        try:
            self.config = ModelConfig.from_dict(manifest["model"])
        except ConfigError as exc:
            raise CheckpointError(f"{path / MANIFEST_NAME}: {exc}") from exc
        self.dtype = DTYPES_BY_NAME[manifest["dtype"]]
        self.quantization: Quantization | None = None
        if "quantization" in manifest:
            try:
                self.quantization = Quantization.from_dict(manifest["quantization"])
            except ConfigError as exc:
                raise CheckpointError(f"{path / MANIFEST_NAME}: {exc}") from exc
        self.tokenizer_path = path / manifest["tokenizer"]["file"]
        self.parts: dict[str, PartInfo] = {}
        self._layouts: dict[str, FileLayout] = {}

    @classmethod
    def open(cls, path: str | Path, *, verify_tokenizer: bool = True) -> ModelStore:
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            hint = " (an interrupted conversion?)" if (path / "layers").is_dir() else ""
            raise CheckpointError(f"{path} is not a store: {MANIFEST_NAME} is missing{hint}")
        raw = manifest_path.read_bytes()
        try:
            manifest = json.loads(raw)
            if manifest.get("format") != FORMAT_NAME:
                raise CheckpointError(f"{manifest_path}: not a {FORMAT_NAME} manifest")
            if manifest.get("format_version") not in READABLE_VERSIONS:
                raise CheckpointError(
                    f"{manifest_path}: format version {manifest.get('format_version')!r} is not "
                    f"supported (this code reads versions {list(READABLE_VERSIONS)})"
                )
            if "quantization" in manifest and manifest["format_version"] < 2:
                raise CheckpointError(f"{manifest_path}: quantization needs format version 2")
            if manifest.get("dtype") not in DTYPES_BY_NAME:
                raise CheckpointError(f"{manifest_path}: unknown dtype {manifest.get('dtype')!r}")
            store = cls(path, manifest, hashlib.sha256(raw).hexdigest())
            store._check_files(manifest["files"], verify_tokenizer)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{manifest_path}: malformed manifest ({exc!r})") from exc
        return store

    def _check_files(self, files: list[dict[str, Any]], verify_tokenizer: bool) -> None:
        by_part = {entry["part"]: entry for entry in files}
        wanted = part_names(self.config)
        extra = sorted(set(by_part) - set(wanted))
        if extra:
            raise CheckpointError(f"{self.path / MANIFEST_NAME}: unexpected parts {extra}")
        for part in wanted:
            if part not in by_part:
                raise CheckpointError(f"{self.path / MANIFEST_NAME}: part {part} is not listed")
            self.parts[part] = self._check_part(part, by_part[part])
        if not self.tokenizer_path.is_file():
            raise CheckpointError(f"missing file {self.tokenizer_path}")
        if verify_tokenizer:
            actual = sha256_file(self.tokenizer_path, CheckpointError)
            if actual != self.manifest["tokenizer"]["sha256"]:
                raise CheckpointError(f"{self.tokenizer_path}: checksum mismatch")

    def _check_part(self, part: str, entry: dict[str, Any]) -> PartInfo:
        file_path = self.path / entry["file"]
        if not file_path.is_file():
            raise CheckpointError(f"missing file {file_path} (part {part})")
        actual_bytes = file_path.stat().st_size
        if actual_bytes < entry["bytes"]:
            raise CheckpointError(
                f"{file_path}: truncated file ({actual_bytes} bytes, expected {entry['bytes']})"
            )
        if actual_bytes > entry["bytes"]:
            raise CheckpointError(
                f"{file_path}: file is {actual_bytes} bytes, expected {entry['bytes']}"
            )
        layout = read_layout(file_path)
        listed = {tensor["name"]: tensor for tensor in entry["tensors"]}
        on_disk = {record.name: record for record in layout.records}
        expected = stored_specs(self.config, part, self.quantization, self.dtype)
        for name in expected:
            if name not in listed or name not in on_disk:
                raise CheckpointError(f"{file_path}: missing tensor {name}")
        for name in sorted((set(listed) | set(on_disk)) - set(expected)):
            raise CheckpointError(f"{file_path}: unexpected tensor {name}")
        records = []
        for name, (shape, dtype) in expected.items():
            record, tensor = on_disk[name], listed[name]
            if record.shape != shape or tuple(tensor["shape"]) != shape:
                raise CheckpointError(
                    f"{file_path}: tensor {name} has shape {record.shape}, expected {shape}"
                )
            if record.dtype != dtype:
                raise CheckpointError(
                    f"{file_path}: tensor {name} is {DTYPE_NAMES[record.dtype]}, expected "
                    f"{DTYPE_NAMES[dtype]}"
                )
            if DTYPE_NAMES[record.dtype] != tensor["dtype"]:
                raise CheckpointError(
                    f"{file_path}: tensor {name} is {DTYPE_NAMES[record.dtype]} on disk but "
                    f"{tensor['dtype']} in the manifest"
                )
            if (record.begin, record.end - record.begin) != (tensor["offset"], tensor["nbytes"]):
                raise CheckpointError(f"{file_path}: tensor {name} is not where the manifest says")
            records.append(
                TensorRecord(
                    name, record.shape, record.dtype, record.begin, record.end, tensor["sha256"]
                )
            )
        self._layouts[part] = layout
        records.sort(key=lambda record: record.begin)
        return PartInfo(part, file_path, actual_bytes, tuple(records))

    def read_part(
        self, part: str, *, buffer: torch.Tensor | None = None, verify: bool = True
    ) -> dict[str, torch.Tensor]:
        """The tensors of ``part`` as views into ``buffer`` (a fresh CPU buffer if None)."""
        info = self.parts[part]
        if buffer is None:
            buffer = torch.empty(info.data_bytes, dtype=torch.uint8)
        tensors = read_into(info.path, self._layouts[part], buffer)
        if verify:
            self.verify_part(part, buffer)
        return tensors

    def verify_part(self, part: str, buffer: torch.Tensor) -> None:
        """Check the sha256 of every tensor of ``part`` held in ``buffer`` (a CPU uint8 buffer)."""
        info = self.parts[part]
        data = memoryview(buffer.numpy()).cast("B")
        for record in info.records:
            actual = hashlib.sha256(data[record.begin : record.end]).hexdigest()
            if actual != record.sha256:
                raise CheckpointError(f"{info.path}: checksum mismatch in tensor {record.name}")

    def verify(self) -> None:
        """Read every part and check every checksum."""
        for part in self.parts:
            self.read_part(part, verify=True)

    @property
    def weight_bytes(self) -> int:
        return sum(info.data_bytes for info in self.parts.values())
