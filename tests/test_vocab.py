"""The real YaLM tokenizer ships inside the package and is checked before it is used."""

import hashlib
import shutil
import subprocess
import sys

import pytest

from yalm_runner import vocab
from yalm_runner.errors import CheckpointError
from yalm_runner.tokenizer import Tokenizer


@pytest.fixture
def fresh_check(monkeypatch):
    """A process-wide check that has not run yet; the real one is restored afterwards."""
    vocab.bundled_vocab_path.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    vocab.bundled_vocab_path.cache_clear()


def test_the_shipped_tokenizer_is_the_released_yalm_vocabulary():
    path = vocab.bundled_vocab_path()
    assert path.stat().st_size == 2_815_034
    assert hashlib.sha256(path.read_bytes()).hexdigest() == vocab.BUNDLED_VOCAB_SHA256
    tokenizer = Tokenizer(path)
    assert tokenizer.vocab_size == 128000
    assert tokenizer.encode("hello world!") == [1, 49524, 2175, 127679]


def test_a_damaged_copy_is_one_error_naming_the_file_and_both_hashes(fresh_check, tmp_path):
    damaged = tmp_path / "voc_100b.sp"
    data = bytearray(vocab.BUNDLED_VOCAB_PATH.read_bytes())
    data[1000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    fresh_check.setattr(vocab, "BUNDLED_VOCAB_PATH", damaged)
    with pytest.raises(CheckpointError) as error:
        vocab.bundled_vocab_path()
    message = str(error.value)
    assert str(damaged) in message
    assert vocab.BUNDLED_VOCAB_SHA256 in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message


def test_a_missing_copy_is_an_error_naming_the_file(fresh_check, tmp_path):
    fresh_check.setattr(vocab, "BUNDLED_VOCAB_PATH", tmp_path / "voc_100b.sp")
    with pytest.raises(CheckpointError, match=r"the YaLM tokenizer is missing: .*voc_100b\.sp"):
        vocab.bundled_vocab_path()


def test_the_checksum_is_checked_once_per_process(fresh_check, tmp_path):
    copy = tmp_path / "voc_100b.sp"
    shutil.copyfile(vocab.BUNDLED_VOCAB_PATH, copy)
    fresh_check.setattr(vocab, "BUNDLED_VOCAB_PATH", copy)
    assert vocab.bundled_vocab_path() == copy
    copy.write_bytes(b"damaged after the first check")
    assert vocab.bundled_vocab_path() == copy  # not hashed again


def test_make_tiny_can_use_the_shipped_vocabulary(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "yalm_runner.cli",
            "make-tiny",
            str(tmp_path / "rel"),
            "--yalm-vocab",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "vocab 128000" in result.stderr
    written = tmp_path / "rel" / "vocab" / "voc_100b.sp"
    assert written.read_bytes() == vocab.BUNDLED_VOCAB_PATH.read_bytes()
