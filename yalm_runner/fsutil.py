"""Durable small-file primitives shared by the store and the resumable job files.

``write_text_atomic`` leaves either the old file or the complete new one after a crash (temp
file, flush, fsync, rename, fsync of the folder). Errors are raised as the caller's own
``YalmError`` subclass so each names its own domain (a store, a generation job).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from yalm_runner.errors import YalmError


def fsync_directory(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(handle)


def write_text_atomic(path: Path, text: str, error: type[YalmError]) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves either the old file or the new one."""
    temp_path = path.with_name(path.name + ".partial")
    try:
        with open(temp_path, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except OSError as exc:
        temp_path.unlink(missing_ok=True)
        raise error(f"cannot write {path}: {exc.strerror or exc}") from exc
    fsync_directory(path.parent)


def sha256_file(path: Path, error: type[YalmError]) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()
