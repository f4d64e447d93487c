"""Direct reads of byte ranges: the bytes asked for, at any offset, or one clear error."""

import os
from pathlib import Path

import pytest
import torch

from yalm_runner.directio import CHUNK, SLACK, RangeReader
from yalm_runner.errors import CheckpointError


@pytest.fixture
def data_file(tmp_path):
    payload = os.urandom(2 * CHUNK + 12345)  # several chunks and a ragged tail
    path = tmp_path / "layer.bin"
    path.write_bytes(payload)
    return path, payload


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize(("offset", "length"), [(0, 4096), (64, 1000), (777, 2 * CHUNK + 11000)])
def test_a_range_reads_back_exactly(data_file, direct, offset, length):
    path, payload = data_file
    reader = RangeReader(direct=direct)
    storage = torch.full((length + SLACK + 4096,), 0xAB, dtype=torch.uint8)
    try:
        # Every misalignment of the buffer's address against the file offset's.
        for shift in (0, 1, 64, 4095):
            buffer = storage[shift : shift + length + SLACK]
            view = reader.read_range(path, offset, length, buffer)
            assert bytes(view.numpy()) == payload[offset : offset + length]
    finally:
        reader.close()


def test_a_truncated_file_is_named(data_file):
    path, payload = data_file
    reader = RangeReader()
    buffer = torch.empty(len(payload) + SLACK, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"layer\.bin: truncated file \(ended 10 bytes"):
        reader.read_range(path, 10, len(payload), buffer)
    reader.close()


def test_a_filesystem_without_direct_io_falls_back_to_plain_reads(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir():  # not Linux: the fallback is what runs everywhere
        shm = tmp_path
    path = shm / f"yalm-directio-{os.getpid()}.bin"
    path.write_bytes(b"x" * 5000 + b"tail")
    try:
        reader = RangeReader()
        buffer = torch.empty(5004 + SLACK, dtype=torch.uint8)
        assert bytes(reader.read_range(path, 5000, 4, buffer).numpy()) == b"tail"
        reader.close()
    finally:
        path.unlink()


def test_a_buffer_without_room_for_alignment_is_refused(data_file):
    path, _ = data_file
    with pytest.raises(ValueError, match="buffer too small"):
        RangeReader().read_range(path, 0, 4096, torch.empty(4096, dtype=torch.uint8))
