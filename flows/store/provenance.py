"""Where a result came from: the code version and content hashes of files.

Owns only identification (a version string, a SHA-256 of a file); it does not know what the
identified things are used for.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

from flows import __version__

REPO_ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def code_version() -> str:
    """``0.1.0+g<commit>`` inside a git checkout (``-dirty`` if modified), else ``0.1.0``."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit}{'-dirty' if dirty else ''}" if commit else __version__


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
