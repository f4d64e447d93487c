"""The host-to-device link as the benchmarks measure it: pinned and pageable copy rates.

Every table's floor and roofline is set against the rate measured here in the same run (on a
CPU-only smoke run, a copy within RAM stands in). Knows nothing of models, stores or the engine.
"""

from __future__ import annotations

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
