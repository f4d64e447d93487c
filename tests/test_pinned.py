"""Pinned host memory: exact sizes, a clear error when the driver refuses, release when unused.

The GPU test in test_streaming.py registers real memory with a real driver; these tests put a
stand-in for the driver's two calls in its place, to reach the paths a healthy GPU never takes.
"""

import gc

import pytest
import torch

from yalm_runner import pinned
from yalm_runner.errors import OffloadError


class Driver:  # the two calls, under the driver's names
    def __init__(self, result=0):
        self.result = result
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []

    def cudaHostRegister(self, address, size, flags):
        if self.result == 0:
            self.registered[address] = size
        return self.result

    def cudaHostUnregister(self, address):
        self.unregistered.append(address)
        return 0


@pytest.fixture
def driver(monkeypatch):
    fake = Driver()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def test_a_buffer_is_locked_at_its_exact_size_and_unlocked_after_its_last_view(driver):
    before = pinned.locked_bytes()
    odd = 3 * 4096 + 123
    buffer = pinned.pinned_empty(odd, torch.uint8, pin=True, what="layer_7")
    assert list(driver.registered.values()) == [odd] and buffer.numel() == odd
    assert pinned.locked_bytes() - before == odd
    buffer[:] = 7
    view = buffer[100:200].view(torch.int32)
    del buffer
    gc.collect()
    assert driver.unregistered == []  # the view still reads the memory
    assert int(view[0]) == 0x07070707
    del view
    gc.collect()
    assert driver.unregistered == list(driver.registered)
    assert pinned.locked_bytes() == before


def test_a_refused_lock_names_the_buffer_and_the_size(driver):
    driver.result = 2  # cudaErrorMemoryAllocation
    with pytest.raises(OffloadError, match=r"could not lock 1.00 GiB of RAM for the layer_3"):
        pinned.pinned_empty(2**30, torch.uint8, pin=True, what="layer_3")
    assert pinned.locked_bytes() == 0


def test_without_a_gpu_nothing_is_locked():
    plain = pinned.pinned_empty(10, torch.float32, pin=False)
    assert plain.shape == (10,) and not plain.is_pinned()
