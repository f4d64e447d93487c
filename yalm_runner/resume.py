"""What a generation job keeps on disk so that a killed run resumes exactly: three small parts.

- ``JobFingerprint``: everything that decides the output bytes (model, input file, sampling,
  limits, stop strings, numeric precision, this format's version). A resume must match it.
- ``StateFile``: the fingerprint plus the ids generated so far by each unfinished row and the
  exact-resume record (``kvstate.ExactState``: the batch plan and the live batch's KV
  checkpoint headers; its KV files sit in ``OUT.jsonl.kv/``), written atomically (temp file,
  flush, fsync, rename, fsync of the folder) beside the output.
- ``OutputLog``: the output file itself while the job runs, one finished row per line in
  finishing order, each tagged with its row key and fsynced as written; at the end it is
  rewritten in input order without the tags.

Generation is deterministic per row (sampling.py) and, with the recorded plan, per batch
(generation.py): an old state costs recomputation, never correctness. The log is the
authority on which rows are done. This module knows files only: not the engine, the model, the
tokenizer or signals (the job core, generation.py, runs the rows; runner.py's ``JsonlSink`` hands
it these files); the pipeline keeps the same state in its database.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from yalm_runner import fsutil
from yalm_runner.config import SamplingParams
from yalm_runner.errors import GenerationError

STATE_FORMAT = "yalm-runner-generation-state"
FORMAT_VERSION = 1
KEY_FIELD = "__key__"  # tags a row in the output log; absent from the finished file
NO_RESUME_HINT = "pass --no-resume to start over"


def read_input(
    path: Path,
    check: Callable[[dict[str, Any]], str | None] = lambda row: None,
    *,
    with_line: bool = False,
) -> list[dict[str, Any]]:
    """The rows of a job's input JSONL (``generate``'s or ``score``'s), each keyed by its ``id``
    or its line (``__key__``; with ``with_line`` also ``__line__``). A line that is not an
    object with a ``prefix`` string, uses the reserved field, or that ``check`` finds a problem
    with (returned as text) is a ``GenerationError`` naming the line; so is an empty file or a
    repeated id."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GenerationError(f"input file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GenerationError(f"cannot read {path}: {exc}") from exc
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GenerationError(f"{path} line {line_no}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prefix"), str):
            raise GenerationError(
                f"{path} line {line_no}: expected an object with a 'prefix' string"
            )
        problem = check(row)
        if problem:
            raise GenerationError(f"{path} line {line_no}: {problem}")
        if KEY_FIELD in row:
            raise GenerationError(f"{path} line {line_no}: {KEY_FIELD!r} is a reserved field")
        numbered = {"__line__": line_no} if with_line else {}
        rows.append({KEY_FIELD: str(row.get("id", f"line-{line_no}")), **numbered, **row})
    if not rows:
        raise GenerationError(f"{path}: no prompts")
    keys = [row[KEY_FIELD] for row in rows]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise GenerationError(f"{path}: duplicate ids {duplicates[:5]}")
    return rows


def sha256_file(path: Path) -> str:
    return fsutil.sha256_file(path, GenerationError)


def write_atomic(path: Path, text: str) -> None:
    fsutil.write_text_atomic(path, text, GenerationError)


def jsonl_line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class JobFingerprint:
    """What must be equal for a saved job to be continued. Batch size is not in it: it belongs to
    the arithmetic a batch plan records (``generation.BatchPlan``); under another, the job still
    resumes, from the saved ids, and says it is not exact."""

    store_manifest_sha256: str
    input_sha256: str
    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int
    max_new_tokens: int
    stop: tuple[str, ...]
    dtype: str
    device_type: str
    format_version: int = FORMAT_VERSION

    @classmethod
    def for_job(
        cls,
        *,
        store_manifest_sha256: str,
        input_path: Path,
        sampling: SamplingParams,
        max_new_tokens: int,
        stop: Iterable[str],
        dtype: str,
        device_type: str,
    ) -> JobFingerprint:
        return cls(
            store_manifest_sha256=store_manifest_sha256,
            input_sha256=sha256_file(input_path),
            greedy=sampling.greedy,
            temperature=float(sampling.temperature),
            top_k=sampling.top_k,
            top_p=float(sampling.top_p),
            seed=sampling.seed,
            max_new_tokens=max_new_tokens,
            stop=tuple(sorted(set(stop))),
            dtype=dtype,
            device_type=device_type,
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["stop"] = list(self.stop)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobFingerprint:
        names = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError("fingerprint fields differ from this version's")
        return cls(**{**data, "stop": tuple(data["stop"])})

    def differences(self, current: JobFingerprint) -> list[str]:
        """What changed from ``self`` (the saved job) to ``current``, in words."""
        changed = []
        for field in dataclasses.fields(self):
            saved, now = getattr(self, field.name), getattr(current, field.name)
            if saved == now:
                continue
            if field.name == "store_manifest_sha256":
                changed.append(f"the model store (manifest sha256 {saved[:12]} -> {now[:12]})")
            elif field.name == "input_sha256":
                changed.append(f"the input file (sha256 {saved[:12]} -> {now[:12]})")
            else:
                changed.append(f"{field.name} ({saved!r} -> {now!r})")
        return changed


@dataclass
class JobState:
    """A job's resumable state: its fingerprint, the ids of rows begun but not finished, and
    the exact-resume record (``kvstate.ExactState.to_dict``; None in a state written before
    it existed: such a job resumes from its ids)."""

    fingerprint: JobFingerprint
    partial: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    exact: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint.to_dict(),
            "partial": {key: list(ids) for key, ids in self.partial.items()},
            "exact": self.exact,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobState:
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        partial = data["partial"]
        if not isinstance(partial, dict) or not all(
            isinstance(ids, list) and all(type(token) is int for token in ids)
            for ids in partial.values()
        ):
            raise ValueError("partial must map row keys to lists of token ids")
        fingerprint = JobFingerprint.from_dict(data["fingerprint"])
        exact = data.get("exact")
        if exact is not None and not isinstance(exact, dict):
            raise ValueError("exact must be a mapping")
        return cls(fingerprint, {str(key): tuple(ids) for key, ids in partial.items()}, exact)


class StateFile:
    """One job's ``JobState`` in a JSON file, replaced atomically on every save."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def beside(cls, output_path: Path) -> StateFile:
        output_path = Path(output_path)
        return cls(output_path.with_name(output_path.name + ".state.json"))

    @staticmethod
    def kv_folder_beside(output_path: Path) -> Path:
        """Where the live batches' KV files go: ``OUT.jsonl.kv/``."""
        output_path = Path(output_path)
        return output_path.with_name(output_path.name + ".kv")

    def load(self) -> JobState | None:
        """The saved state, or None when there is none; a damaged file is an error naming it."""
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise GenerationError(f"cannot read {self.path}: {exc}") from exc
        try:
            return JobState.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise GenerationError(
                f"{self.path}: not a valid generation state ({exc}); {NO_RESUME_HINT}"
            ) from None

    def save(self, state: JobState) -> None:
        write_atomic(self.path, json.dumps(state.to_dict(), ensure_ascii=False))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_name(self.path.name + ".partial").unlink(missing_ok=True)
        fsutil.fsync_directory(self.path.parent)


class OutputLog:
    """The output file of a running job: finished rows appended, each exactly once.

    ``recover`` reads what an earlier run stored (dropping a torn last line, ignoring repeats);
    ``append`` adds a row and fsyncs it; ``finish`` rewrites the file in input order, untagged.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle: IO[bytes] | None = None

    def __enter__(self) -> OutputLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self.path.with_name(self.path.name + ".partial").unlink(missing_ok=True)
        fsutil.fsync_directory(self.path.parent)

    def recover(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Rows already stored, by key (``keys`` are the job's rows in input order).

        A last line without its newline was cut by a crash: it is cut off the file (the row is
        generated again). A file without tags is a finished rewrite: its lines are the rows in
        input order. Any other damage is an error naming the line; nothing is changed then.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise GenerationError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        complete = data[: data.rfind(b"\n") + 1]
        entries = []
        for line_no, line in enumerate(complete.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise GenerationError(
                    f"{self.path} line {line_no}: damaged output line ({exc}); {NO_RESUME_HINT}"
                ) from None
            if not isinstance(row, dict):
                raise GenerationError(f"{self.path} line {line_no}: not a JSON object")
            entries.append((line_no, row))
        known = set(keys)
        tagged = [KEY_FIELD in row for _, row in entries]
        done: dict[str, dict[str, Any]] = {}
        if entries and not any(tagged):
            if len(entries) != len(keys):
                raise GenerationError(
                    f"{self.path}: {len(entries)} untagged rows for a job of {len(keys)}; "
                    f"{NO_RESUME_HINT}"
                )
            done = {key: row for key, (_, row) in zip(keys, entries, strict=True)}
        else:
            for line_no, row in entries:
                key = row.pop(KEY_FIELD, None)
                if not isinstance(key, str) or key not in known:
                    raise GenerationError(
                        f"{self.path} line {line_no}: row key {key!r} is not in the input; "
                        f"{NO_RESUME_HINT}"
                    )
                done.setdefault(key, row)
        if len(complete) < len(data):
            self._truncate(len(complete))
        return done

    def _truncate(self, size: int) -> None:
        try:
            with open(self.path, "r+b") as handle:
                handle.truncate(size)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise GenerationError(f"cannot repair {self.path}: {exc.strerror or exc}") from exc

    def append(self, key: str, row: dict[str, Any]) -> None:
        """Store one finished row durably (write, flush, fsync) before returning."""
        try:
            if self._handle is None:
                # Kept open across appends; closed by close() / the context manager.
                self._handle = open(self.path, "ab")  # noqa: SIM115
                fsutil.fsync_directory(self.path.parent)
            self._handle.write(jsonl_line({KEY_FIELD: key, **row}).encode("utf-8"))
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            raise GenerationError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def finish(self, rows: Iterable[dict[str, Any]]) -> None:
        """Replace the log with ``rows`` (input order, no tags), atomically."""
        self.close()
        write_atomic(self.path, "".join(jsonl_line(row) for row in rows))
