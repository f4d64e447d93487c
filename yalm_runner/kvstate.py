"""A job's exact-resume state on disk: its recorded batch plan, and each live batch's KV file.

``ExactState`` is a JSON-able record (the plan, and for each batch in flight its last two KV
checkpoint headers) that a front end keeps inside a file it replaces atomically (the runner's
``OUT.jsonl.state.json``, the pipeline's ``state.json``), plus a folder of KV files, one per
batch in flight. The order of writes keeps every crash safe:

1. ``write_kv``: the live batch's KV delta (``batchstate.KVDelta``) is appended to the batch's
   file as one frame and fsynced. Nothing names it yet: a crash here leaves bytes past the end
   the state knows, cut off by the next append and never read.
2. ``commit`` and the front end's atomic save: the new header (step, ``length``, live rows and
   their ids, the file's end, every frame's offset, size and CRC32) becomes current, the old one
   is kept as previous.
3. ``batch_done``: the header goes first (saved), then the file.

On resume, ``restore_point`` checks the current header's frames (present, whole, CRC32) and
returns a ``batchstate.BatchRestore`` that reads them; a torn or damaged frame falls back to the
previous header, else to nothing (the batch is recomputed from its start), with one line that
says so. Frame layout: ``YKVF``, a little-endian u32 meta length, the meta (JSON: rows, length,
each layer's first slot, the record shape and dtype), then each layer's keys and values records
as the cache keeps them.

This module owns files, CRCs and fsync. It knows nothing of the engine's caches (only
``batchstate``'s records), of jobs, sinks or databases.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yalm_runner import fsutil
from yalm_runner.batchstate import BatchCheckpoint, BatchRestore, KVDelta
from yalm_runner.errors import GenerationError

MAGIC = b"YKVF"
META_LENGTH = struct.Struct("<I")
CHUNK_BYTES = 16 << 20  # CRCs are computed over reads of this size
STATE_NAME = "state.json"  # a folder's own record (``ExactState.in_folder``)
STATE_FORMAT = "yalm-runner-exact-state"


@dataclass(frozen=True)
class WrittenFrame:
    """A frame appended and fsynced, not yet named by the state (``ExactState.commit``)."""

    index: int
    header: dict[str, Any]


def _element_type(name: str) -> torch.dtype:
    kind = getattr(torch, name, None)
    if not isinstance(kind, torch.dtype):
        raise ValueError(f"unknown record dtype {name!r}")
    return kind


class ExactState:
    """The plan and the batches' KV checkpoints of one job; ``persist`` saves the file that
    holds ``to_dict()`` atomically (the front end's). ``folder`` holds the KV files."""

    def __init__(
        self, folder: Path, record: dict[str, Any] | None, persist: Callable[[], None]
    ) -> None:
        self.folder = Path(folder)
        self.persist = persist
        record = record or {}
        self.plan: dict[str, Any] | None = record.get("plan")
        self.batches: dict[str, dict[str, Any]] = dict(record.get("batches") or {})
        if self.plan is not None and not isinstance(self.plan, dict):
            raise ValueError("exact.plan must be a mapping")

    @classmethod
    def in_folder(cls, folder: Path, owner: str) -> tuple[ExactState, str | None]:
        """A job's state kept in a folder of its own (``state.json`` beside the KV files), for a
        front end that keeps its rows elsewhere (the pipeline's database). ``owner`` names what
        it belongs to (a model, a worker); another owner's state, or a damaged one, is dropped
        with its files, and the line returned says so (the rows still have their saved ids)."""
        folder = Path(folder)
        path = folder / STATE_NAME
        problem, record = None, None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != STATE_FORMAT or data.get("owner") != owner:
                problem = f"{path} belongs to another model or worker; dropped"
            else:
                record = data["exact"]
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError, ValueError, KeyError, AttributeError) as exc:
            problem = f"{path} is damaged ({exc}); dropped: rows go on from their saved ids"

        def persist() -> None:
            folder.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"format": STATE_FORMAT, "owner": owner, "exact": state.to_dict()})
            fsutil.write_text_atomic(path, text, GenerationError)

        try:
            state = cls(folder, record, persist)
        except ValueError as exc:
            problem = f"{path} is damaged ({exc}); dropped: rows go on from their saved ids"
            state = cls(folder, None, persist)
        if problem:
            state.remove()
        return state, problem

    def remove(self) -> None:
        """A folder-kept state (``in_folder``) is done: its record, KV files and folder go."""
        self.plan, self.batches = None, {}
        self._unlink(self.folder / STATE_NAME)
        self._remove_files()

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan, "batches": self.batches}

    def path(self, index: int) -> Path:
        return self.folder / f"batch-{index:05d}.kv"

    # Recording.

    def record_plan(self, plan: dict[str, Any], *, replay: bool) -> None:
        """Make ``plan`` the job's. Without ``replay`` (a new plan: the earlier one's batches
        do not exist any more) every batch's KV state goes."""
        if not replay:
            self.batches = {}
            self.plan = plan
            self.persist()
            self._remove_files()
            return
        self.plan = plan
        self.persist()

    def write_kv(self, live: BatchCheckpoint) -> WrittenFrame:
        """Append ``live``'s KV delta to its batch's file as one frame and fsync it."""
        delta = live.kv_delta()
        entry = self.batches.get(str(live.index))
        current = entry["current"] if entry else None
        path = self.path(live.index)
        if not path.exists():  # gone under us: its frames with it
            current = None
        end = current["end"] if current else 0
        meta = {
            "rows": list(delta.rows),
            "length": delta.length,
            "firsts": list(delta.firsts),
            "record_shape": list(delta.record_shape),
            "dtype": str(delta.dtype).removeprefix("torch."),
        }
        meta_bytes = json.dumps(meta).encode("utf-8")
        crc, size = 0, 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            created = not path.exists()
            with open(path, "r+b" if not created else "wb") as handle:
                handle.truncate(end)  # bytes a crash left past the last checkpoint's end
                handle.seek(end)
                for chunk in (MAGIC, META_LENGTH.pack(len(meta_bytes)), meta_bytes):
                    handle.write(chunk)
                    crc, size = zlib.crc32(chunk, crc), size + len(chunk)
                for layer_idx in range(len(delta.firsts)):
                    for records in delta.read(layer_idx):
                        data = records.contiguous().reshape(-1).view(torch.uint8).numpy()
                        handle.write(data)
                        crc, size = zlib.crc32(data, crc), size + data.nbytes
                handle.flush()
                os.fsync(handle.fileno())
            if created:
                fsutil.fsync_directory(self.folder)
        except OSError as exc:
            raise GenerationError(f"cannot write {path}: {exc.strerror or exc}") from exc
        frames = [*(current["frames"] if current else []), [end, size, crc]]
        header = {
            "step": live.step,
            "length": live.length,
            "rows": list(live.rows),
            "keys": list(live.ids),
            "ids": [list(ids) for ids in live.ids.values()],
            "layout": live.layout,
            "frames": frames,
            "end": end + size,
        }
        return WrittenFrame(live.index, header)

    def commit(self, frame: WrittenFrame) -> None:
        """Name ``frame`` in the record (the caller saves it): its header becomes the batch's
        current one, the old current its previous."""
        entry = self.batches.get(str(frame.index))
        previous = entry["current"] if entry else None
        self.batches[str(frame.index)] = {"current": frame.header, "previous": previous}

    def batch_done(self, index: int) -> None:
        """The batch's rows are all stored: forget its KV state, then delete its file."""
        if self.batches.pop(str(index), None) is not None:
            self.persist()
        self._unlink(self.path(index))

    def discard(self) -> None:
        """The job is complete (or starts over): every KV file goes, and the folder if empty."""
        self.batches = {}
        self._remove_files()

    def _remove_files(self) -> None:
        for path in self.folder.glob("batch-*.kv"):
            self._unlink(path)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # absent, or holding something that is not ours (the pipeline's state.json)
        else:
            fsutil.fsync_directory(self.folder.parent)

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise GenerationError(f"cannot remove {path}: {exc.strerror or exc}") from exc

    # Resuming.

    def restore_point(self, index: int) -> tuple[BatchRestore | None, str | None]:
        """The batch's state at its last sound KV checkpoint, or None (recompute it from its
        start); and one line when a header was found torn or damaged."""
        entry = self.batches.get(str(index))
        if entry is None:
            return None, None
        path = self.path(index)
        found = None
        for which in ("current", "previous"):
            header = entry.get(which)
            if header is None:
                continue
            problem = self._problem(path, header)
            if problem is None:
                self.batches[str(index)] = {"current": header, "previous": None}
                if which == "current":
                    return self._restore(path, header), None
                return self._restore(path, header), (
                    f"batch {index}'s last KV checkpoint is unusable ({found}); going on from "
                    f"the one before it (step {header['step']})"
                )
            found = found or problem
        del self.batches[str(index)]
        self._unlink(path)
        if found is None:
            return None, None
        return None, (
            f"batch {index}'s KV checkpoints are unusable ({found}); recomputing the batch from "
            "its start"
        )

    def _problem(self, path: Path, header: dict[str, Any]) -> str | None:
        """What is wrong with ``header``'s frames in ``path``, in words, or None."""
        try:
            frames = [(int(o), int(n), int(c)) for o, n, c in header["frames"]]
            if not frames or frames[-1][0] + frames[-1][1] != int(header["end"]):
                return "its header does not add up"
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < header["end"]:
                    return f"{path.name} has {size} of {header['end']} bytes"
                for number, (offset, length, expected) in enumerate(frames):
                    handle.seek(offset)
                    crc, left = 0, length
                    while left:
                        chunk = handle.read(min(left, CHUNK_BYTES))
                        crc, left = zlib.crc32(chunk, crc), left - len(chunk)
                    if crc != expected:
                        return f"frame {number} of {path.name} fails its CRC32"
        except FileNotFoundError:
            return f"{path.name} is missing"
        except (OSError, KeyError, TypeError, ValueError) as exc:
            return f"{path.name} cannot be read: {exc}"
        return None

    def _restore(self, path: Path, header: dict[str, Any]) -> BatchRestore:
        frames = [(int(offset), int(length)) for offset, length, _ in header["frames"]]

        def deltas() -> Iterator[KVDelta]:
            with open(path, "rb") as handle:
                for offset, _ in frames:
                    yield _read_frame(handle, offset)

        return BatchRestore(
            int(header["step"]),
            int(header["length"]),
            tuple(int(row) for row in header["rows"]),
            tuple(tuple(int(token) for token in ids) for ids in header["ids"]),
            header["layout"],
            deltas,
        )


def _read_frame(handle, offset: int) -> KVDelta:
    """The frame at ``offset``; its records are read when asked for, layer by layer."""
    handle.seek(offset)
    magic, (meta_length,) = handle.read(4), META_LENGTH.unpack(handle.read(META_LENGTH.size))
    if magic != MAGIC:
        raise GenerationError(f"{handle.name}: no KV frame at byte {offset}")
    meta = json.loads(handle.read(meta_length).decode("utf-8"))
    dtype = _element_type(meta["dtype"])
    rows, length = tuple(meta["rows"]), int(meta["length"])
    firsts, record_shape = tuple(meta["firsts"]), tuple(meta["record_shape"])
    element = torch.empty((), dtype=dtype).element_size()
    start = offset + 4 + META_LENGTH.size + meta_length
    places = []  # each layer's keys: their offset and shape (values follow them)
    for first in firsts:
        shape = (len(rows), length - first, *record_shape)
        places.append((start, shape))
        start += 2 * math.prod(shape) * element

    def read(layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        at, shape = places[layer_idx]
        nbytes = math.prod(shape) * element
        if not nbytes:
            return torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        handle.seek(at)
        data = bytearray(handle.read(2 * nbytes))
        if len(data) != 2 * nbytes:
            raise GenerationError(f"{handle.name}: KV frame at byte {offset} is cut short")
        both = torch.frombuffer(data, dtype=torch.uint8)
        keys, values = (part.view(dtype).view(shape) for part in (both[:nbytes], both[nbytes:]))
        return keys, values

    return KVDelta(rows, length, firsts, record_shape, dtype, read)
