"""The real YaLM-100B tokenizer, shipped inside the package, and the proof that it is intact.

Owns where ``voc_100b.sp`` lies in an installed package and checking it against the checksum of
the released file, once per process. The file is Yandex's, released with YaLM-100B under the
Apache License 2.0 (see NOTICE at the project root). This module knows nothing of encoding
(``tokenizer.py``) or of model stores, which carry their own copy and checksum.
"""

from __future__ import annotations

import functools
from pathlib import Path

from yalm_runner.errors import CheckpointError
from yalm_runner.fsutil import sha256_file

BUNDLED_VOCAB_PATH = Path(__file__).resolve().parent / "voc_100b.sp"
# sha256 of voc_100b.sp as released with YaLM-100B (2,815,034 bytes).
BUNDLED_VOCAB_SHA256 = "2e63c3d3f3883978bc756b8d8d75183923e17fc90fa76c61bcafa0ddb5dcc2b4"


def verify_vocab(path: Path, expected_sha256: str) -> Path:
    """``path`` if its contents hash to ``expected_sha256``, else one error naming both hashes."""
    if not path.is_file():
        raise CheckpointError(f"the YaLM tokenizer is missing: {path}; reinstall yalm-forecast")
    actual = sha256_file(path, CheckpointError)
    if actual != expected_sha256:
        raise CheckpointError(
            f"{path}: the YaLM tokenizer is damaged (sha256 {actual}, expected "
            f"{expected_sha256}); reinstall yalm-forecast"
        )
    return path


@functools.cache
def bundled_vocab_path() -> Path:
    """The shipped ``voc_100b.sp``, its checksum verified on the first call of the process."""
    return verify_vocab(BUNDLED_VOCAB_PATH, BUNDLED_VOCAB_SHA256)
