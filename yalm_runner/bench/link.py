"""The host-to-device link as the benchmarks measure it: pinned and pageable copy rates.

Every table's floor and roofline is set against the rate measured here in the same run (on a
CPU-only smoke run, a copy within RAM stands in). Knows nothing of models, stores or the engine.
"""

from __future__ import annotations

import threading
import time

import torch


def measure_h2d(size_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Host-to-device bandwidth (bytes/s) from pinned and from pageable memory."""
    device_buffer = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    rates = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=pinned)
        host.fill_(1)
        device_buffer.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            device_buffer.copy_(host, non_blocking=pinned)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        rates[kind] = size_bytes / sorted(times)[len(times) // 2]
        del host
    return rates


def measure_ram_copy(size_bytes: int = 256 << 20, repeats: int = 3) -> dict[str, float]:
    """Bytes/s of a copy within RAM, under the same names as ``measure_h2d``'s rates: on a
    CPU-only run there is no link, and a streamed layer is read where it lies in RAM."""
    source = torch.ones(size_bytes, dtype=torch.uint8)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - began)
    rate = size_bytes / sorted(times[1:])[len(times[1:]) // 2]
    return {"pinned": rate, "pageable": rate}


class BackgroundCopies:
    """Pinned host-to-device copies of ``size`` bytes, back to back on a stream of their own,
    from ``with`` to its end: the link and the host's memory as busy as streamed weights keep
    them, for timing host work as a run sees it. ``bytes_per_s`` afterwards."""

    def __init__(self, size: int = 1 << 30):
        self.source = torch.empty(size, dtype=torch.uint8).pin_memory()
        self.target = torch.empty(size, dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream()
        self.running = False
        self.copied = 0
        self.bytes_per_s = 0.0

    def _loop(self) -> None:
        # A blocking event: the thread sleeps while a copy runs, as the engine's copies are
        # queued and left to run; a spinning wait would hold one of the cores being measured
        # (session 9: with it, the host kernel's time under DMA swung from 1.5x to 2.5x alone).
        done = torch.cuda.Event(blocking=True)
        with torch.cuda.stream(self.stream):
            while self.running:
                self.target.copy_(self.source, non_blocking=True)
                done.record(self.stream)
                done.synchronize()
                self.copied += self.source.numel()

    def __enter__(self) -> BackgroundCopies:
        self.running = True
        self.began = time.perf_counter()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.running = False
        self.thread.join()
        self.bytes_per_s = self.copied / (time.perf_counter() - self.began)
