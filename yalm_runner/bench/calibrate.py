"""Short measurements of the rates the step-time model multiplies by, on the machine at hand.

Each rate is measured the way the engine incurs it, through the engine's own code where that
code is the cost: the KV caches' copy calls and their expansion and encoding are timed through
``kvcache``'s classes on a two-layer cache of the plan's shape, width and layout; the drive is
read as the streamer reads it (``directio.RangeReader``, one layer file after another from one
reader thread); the link is ``link.measure_h2d``. Each takes a few hundred milliseconds at most.
``calibrate`` measures what a plan needs and returns ``steptime.StepRates``; the overheads a
step has beside its layers are not measured here (they are the model's fitted defaults).

On a CPU the same code runs (the caches copy within RAM, timings are wall-clock): a smoke test
of the calibration, not a figure for a GPU. Knows nothing of tables, peers or the planner's
choices.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from yalm_runner import hostattn
from yalm_runner.bench.disk import drop_from_page_cache
from yalm_runner.bench.link import BackgroundCopies
from yalm_runner.config import ModelConfig
from yalm_runner.directio import SLACK, RangeReader
from yalm_runner.kvcache import HostArena, HostKV, SlotMajorHostKV
from yalm_runner.kvformat import encode_kv
from yalm_runner.pinned import pinned_empty
from yalm_runner.planning import MemoryPlan
from yalm_runner.quant import Quantization, dequantize_matrix
from yalm_runner.steptime import StepRates

# A calibration cache holds at most this much of one layer's keys (or values) on the device:
# the rates are throughputs, so the plan's batch is measured in fewer rows when it is larger.
CODEC_CACHE_BYTES = 256 << 20
# The copy call is measured at the plan's own rows up to this size of one layer's keys: capped
# at 181 of 512 rows (256 MiB), session 9's sweep under-predicted row-major steps by 13-30 %,
# while the cases calibrated at their own rows came within 2 %.
COPY_CALL_CACHE_BYTES = 1 << 30
# Rounds a calibration takes the median of: with 3, one case's copy call came out 34 us in one
# run and 72 us in the next (session 9), while the step it predicts ran 187 ms both times.
REPEATS = 5
HOST_WINDOW_S = 0.5  # how long the host attention kernel is timed for


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _timed(device: torch.device, times: list[float]) -> Iterator[None]:
    """Append the seconds the block took: device time between two events on a GPU (launch gaps
    included), wall-clock on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    else:
        began = time.perf_counter()
        yield
        times.append(time.perf_counter() - began)


def _median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def _two_layers(config: ModelConfig) -> ModelConfig:
    return replace(config, num_layers=2)


def _filled_cache(cache, config: ModelConfig, rows: int, context: int, device, dtype) -> None:
    """Write ``context`` positions of random keys and values into both layers of ``cache``, as a
    prefill would, so that expansion reads real records."""
    for layer_idx in range(2):
        keys, values = cache.layer(layer_idx, 0)
        keys[:, :context].normal_()
        values[:, :context].normal_()
        cache.stored(layer_idx, 0, context)
    _synchronize(device)


def measure_kv_codec(
    config: ModelConfig,
    bits: int,
    layout: str,
    rows: int,
    context: int,
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """Elements (keys and values apart) a pinned-RAM cache of ``bits`` and ``layout`` expands
    and encodes per second in a decode step at ``context`` positions: the time of one layer's
    expansion of its old slots and encoding of its new one, on the compute stream, through the
    cache's own code. ``rows`` is capped so one layer's keys take ``CODEC_CACHE_BYTES``."""
    element = torch.empty((), dtype=dtype).element_size()
    rows = max(1, min(rows, CODEC_CACHE_BYTES // (context * config.hidden_size * element)))
    kind = SlotMajorHostKV if layout == "slots" else HostKV
    small = _two_layers(config)
    # Nothing timed crosses the link, so the host copy need not be locked (which is slow).
    arena = HostArena(2, pin=False)
    cache = kind(small, rows, context + 1, device, dtype, bits=bits, arena=arena)
    _filled_cache(cache, small, rows, context, device, dtype)
    times: list[float] = []
    for _ in range(REPEATS + 1):  # the first round warms the allocator and the kernels
        cache.layer(0, context)  # fetches layer 0, and layer 1 ahead of its turn
        cache.stored(0, context, context + 1)
        _synchronize(device)
        # Layer 1 has arrived: this is its expansion and encoding. Its write-back copies are
        # queued after the end mark: a row-major cache issues one per row from Python, which
        # would stall the compute stream's clock for the copy calls' time (the model counts
        # those apart, as copy calls).
        with _copies_held(cache), _timed(device, times):
            cache.layer(1, context)
            cache.stored(1, context, context + 1)
        _synchronize(device)
    elements = 2 * rows * (context + 1) * config.hidden_size
    return elements / _median(times[1:])


@contextlib.contextmanager
def _copies_held(cache) -> Iterator[None]:
    """Keep ``cache``'s copy-stream work back while the block runs; issue it as the block ends
    (after any block nested inside this one has ended)."""
    held: list[Callable[[], None]] = []
    cache._on_copy_stream = held.append
    try:
        yield
    finally:
        del cache._on_copy_stream  # the class's own method again
        for work in held:
            cache._on_copy_stream(work)


def measure_copy_call(
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    rows: int = 64,
    context: int = 4,
    link_bytes_per_s: float | None = None,
    bits: int = 16,
    codec_elements_per_s: float | None = None,
) -> float:
    """Seconds one KV copy costs a row-major cache's copy stream beyond its bytes, at a run's
    sizes: decode steps of a row-major cache of ``bits`` and ``rows`` rows (capped so one
    layer's keys take ``COPY_CALL_CACHE_BYTES`` in 16 bits) over ``context`` positions,
    through the cache's own code, from the first call to the last copy's end, less the bytes'
    time at ``link_bytes_per_s`` (on a GPU; nothing on a CPU) and, for 8/4-bit records, the
    expansion and encoding at ``codec_elements_per_s`` (they run in the measured steps). The
    host issuing the calls and the copy engine running them overlap differently as copies grow
    (a tiny copy's issue, measured alone, cost twice what a run's did in session 8), and a
    16-bit cache's calls cost less than a compressed one's (session 9: compressed row-major
    steps under-predicted by 20-38% at 422-512 rows): the plan's own width, rows and context
    are what the model's per-call term stands for."""
    element = torch.empty((), dtype=dtype).element_size()
    per_row = (context + 1) * config.hidden_size * element
    rows = max(1, min(rows, COPY_CALL_CACHE_BYTES // per_row))
    small = _two_layers(config)
    arena = HostArena(2, pin=device.type == "cuda")  # pinned, as in a run
    cache = HostKV(small, rows, context + 1, device, dtype, bits=bits, arena=arena)
    _filled_cache(cache, small, rows, context, device, dtype)
    times = []
    for _ in range(REPEATS + 1):
        _synchronize(device)
        moved = cache.bytes_moved
        began = time.perf_counter()
        for layer_idx in range(2):
            cache.layer(layer_idx, context)
            cache.stored(layer_idx, context, context + 1)
        _synchronize(device)
        times.append(time.perf_counter() - began)
        moved = cache.bytes_moved - moved
    calls = 2 * 4 * rows  # per layer: a fetch and a write-back per row and cache
    bytes_s = moved / link_bytes_per_s if device.type == "cuda" and link_bytes_per_s else 0.0
    codec_s = 0.0
    if bits != 16 and codec_elements_per_s:  # two layers' expansion and encoding
        codec_s = 2 * 2.0 * rows * (context + 1) * config.hidden_size / codec_elements_per_s
    return max(_median(times[1:]) - bytes_s - codec_s, 0.0) / calls or 1e-9


def measure_host_attention(
    config: ModelConfig,
    bits: int,
    rows: int,
    context: int,
    dtype: torch.dtype,
    streaming: bool = False,
) -> float:
    """KV elements (keys and values apart) the host attention kernel reads per second: one
    layer's decode step over ``rows`` rows of ``context`` positions of random ``bits``-bit
    records, through ``hostattn.attend`` on all the process's threads (median of a few).
    ``streaming``: while pinned copies keep the link and the host's memory busy, as streamed
    weights do in a run (session 9: 13 ms a layer alone, 20-32 ms so)."""
    generator = torch.Generator().manual_seed(0)
    shape = (rows, context, config.num_heads, config.head_dim)
    keys, values = (
        encode_kv(torch.randn(shape, generator=generator).to(dtype), bits) for _ in range(2)
    )
    step = [torch.randn(rows, config.num_heads, config.head_dim) for _ in range(3)]
    valid = torch.ones(rows, context, dtype=torch.bool)
    times: list[float] = []
    # A layer's call takes milliseconds, and the host's other work (the drive's writeback, say)
    # comes and goes: the median of calls over half a second, not of five (session 11: one
    # five-call median read 20.9 G elements/s where the runs before read 62 and 67).
    with BackgroundCopies() if streaming else contextlib.nullcontext():
        while len(times) <= REPEATS or (sum(times[1:]) < HOST_WINDOW_S and len(times) < 200):
            began = time.perf_counter()
            hostattn.attend(keys, values, bits, dtype, *step, valid)
            times.append(time.perf_counter() - began)
    return 2 * rows * context * config.hidden_size / _median(times[1:])


def measure_disk_read(paths: list[Path], threads: int = 4) -> float:
    """Bytes per second the streamer's way of reading gets from ``paths`` (layer files, or any
    large files): each dropped from the page cache, then read whole by direct I/O with
    ``threads`` reads in flight, one file after another from one reader thread, the next file
    queued while one is read (the streamer reads two layers ahead)."""
    sizes = [os.path.getsize(path) for path in paths]
    for path in paths:
        drop_from_page_cache(path)
    buffers = [pinned_empty(max(sizes) + SLACK, torch.uint8, pin=False) for _ in range(2)]
    reader = RangeReader(threads=threads)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="yalm-calibrate") as pool:
            began = time.perf_counter()
            reads = [
                pool.submit(reader.read_range, path, 0, size, buffers[order % 2])
                for order, (path, size) in enumerate(zip(paths, sizes, strict=True))
            ]
            for read in reads:
                read.result()
            elapsed = time.perf_counter() - began
    finally:
        reader.close()
    return sum(sizes) / elapsed


def _best_rate(work: Callable[[], object], amount: float, device: torch.device) -> float:
    times: list[float] = []
    for _ in range(REPEATS + 1):
        with _timed(device, times):
            work()
    return amount / _median(times[1:])


def measure_matmul(
    config: ModelConfig, rows: int, device: torch.device, dtype: torch.dtype
) -> float:
    """Multiply-add arithmetic per second of ``rows`` tokens through a GeGLU matrix (ffn x
    hidden) of the model, as a decode step's largest matmul."""
    x = torch.randn(rows, config.hidden_size, device=device, dtype=dtype)
    weight = torch.randn(config.ffn_size, config.hidden_size, device=device, dtype=dtype)
    flops = 2.0 * rows * config.ffn_size * config.hidden_size
    return _best_rate(lambda: x @ weight.T, flops, device)


def measure_device_bytes(device: torch.device, size_bytes: int = 256 << 20) -> float:
    """Bytes per second device memory moves (a copy reads and writes each byte once)."""
    source = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return _best_rate(lambda: target.copy_(source), 2.0 * size_bytes, device)


def measure_dequant(
    config: ModelConfig, quantization: Quantization, device: torch.device, dtype: torch.dtype
) -> float:
    """Elements per second the engine dequantizes the model's largest compressed matrix at."""
    name = "mlp.dense_ffn_hidden.weight"
    shape = (config.ffn_size, config.hidden_size)
    stored = {}
    for stored_name, (size, kind) in quantization.stored_specs(name, shape).items():
        if stored_name.endswith(".q"):
            low, high = (-127, 128) if kind == torch.int8 else (0, 256)
            stored[stored_name] = torch.randint(low, high, size, dtype=kind, device=device)
        else:
            stored[stored_name] = torch.full(size, 0.01, dtype=kind, device=device)
    scratch = torch.empty(shape, dtype=dtype, device=device)
    elements = float(shape[0] * shape[1])
    return _best_rate(
        lambda: dequantize_matrix(stored, name, quantization, dtype, scratch), elements, device
    )


def calibrate(
    plan: MemoryPlan,
    config: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    quantization: Quantization | None = None,
    base: StepRates | None = None,
    copy_call_s: float | None = None,
) -> StepRates:
    """``base`` (the defaults when None) with the rates ``plan`` depends on measured here: the
    KV codec of its width and layout at its rows and context, the cost of a row-major cache's
    copy call at them (unless given), the matmul rate at its batch, device memory, and the
    dequantization of ``quantization``'s matrices. The link and the drive are the caller's to
    measure (``link.measure_h2d``, ``measure_disk_read``) and pass in ``base``."""
    device = torch.device(device)
    rates = base or StepRates()
    work = plan.decode
    assert work is not None, "calibrate a generation plan, not a scoring one"
    context = max(1, round(work.context))
    if work.codec_key is not None:
        bits_text, layout = work.codec_key.split("/")
        measured = measure_kv_codec(
            config, int(bits_text), layout, plan.batch_size, context, device, dtype
        )
        rates = rates.with_codec(work.codec_key, measured)
    bits = int(work.codec_key.split("/")[0]) if work.codec_key else 16  # the cache's width
    if work.host_calls:  # attention on the host: its kernel at the plan's rows and context
        rates = replace(
            rates,
            host_attention_elements_per_s=measure_host_attention(
                config, bits, plan.batch_size, context, dtype, streaming=device.type == "cuda"
            ),
        )
    if copy_call_s is None and work.copy_calls > 4:  # a row-major cache: a call per row
        copy_call_s = measure_copy_call(
            config, device, dtype, plan.batch_size, context, rates.link_bytes_per_s, bits,
            rates.codec_rate(work.codec_key) if work.codec_key else None,
        )  # fmt: skip
    return replace(
        rates,
        copy_call_s=rates.copy_call_s if copy_call_s is None else copy_call_s,
        matmul_flops_per_s=measure_matmul(config, plan.batch_size, device, dtype),
        device_bytes_per_s=measure_device_bytes(device),
        dequant_elements_per_s=(
            rates.dequant_elements_per_s
            if quantization is None
            else measure_dequant(config, quantization, device, dtype)
        ),
    )
