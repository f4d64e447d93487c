"""The calibration runs the engine's own KV caches and reader on the machine at hand (here a
CPU: a smoke test of the code, not a figure for a GPU) and hands back rates the model takes."""

import math

import pytest
import torch

from yalm_runner.bench.calibrate import (
    calibrate,
    measure_copy_call,
    measure_disk_read,
    measure_kv_codec,
)
from yalm_runner.bench.synthetic import SHAPES, SyntheticStore
from yalm_runner.offload import OffloadPolicy
from yalm_runner.planning import plan_memory
from yalm_runner.steptime import StepRates

CPU = torch.device("cpu")
TINY = SHAPES["tiny"]


def pinned_plan(bits: int, layout: str, batch: int = 16):
    """A GPU plan with the KV cache in pinned RAM (planning needs no device)."""
    store = SyntheticStore(TINY, torch.float32)
    policy = OffloadPolicy(weights_on="cpu", kv_on="cpu", kv_bits=bits, kv_layout=layout)
    return plan_memory(
        store, torch.device("cuda"), torch.float32, policy, batch_size=batch, max_context=48,
        prompt_tokens=32,
    )  # fmt: skip


@pytest.mark.parametrize(("bits", "layout"), [(16, "slots"), (8, "rows"), (4, "slots")])
def test_the_kv_codec_rate_is_measured_through_the_cache_itself(bits, layout):
    rate = measure_kv_codec(TINY, bits, layout, 16, 40, CPU, torch.float32)  # 16 rows, 40 slots
    assert math.isfinite(rate) and 1e5 < rate < 1e13  # elements per second


def test_a_copy_call_costs_microseconds_not_nothing():
    call_s = measure_copy_call(TINY, CPU, torch.float32, rows=64)
    assert 1e-8 < call_s < 1e-2
    # At a run's context the copies carry bytes; on a CPU there is no link to take them off.
    assert 1e-8 < measure_copy_call(TINY, CPU, torch.float32, rows=16, context=40) < 1e-2


def test_the_drive_is_read_the_streamers_way(tmp_path):
    files = []
    for index in range(2):
        path = tmp_path / f"layer_{index}.bin"
        path.write_bytes(bytes(range(256)) * (8 << 12))  # 8 MiB each
        files.append(path)
    rate = measure_disk_read(files)
    assert 1e6 < rate < 1e12  # bytes per second, page cache or not


def test_calibrate_replaces_the_rates_the_plan_depends_on():
    base = StepRates(link_bytes_per_s=12e9, disk_bytes_per_s=2e9)
    slots = calibrate(pinned_plan(4, "slots"), TINY, CPU, torch.float32, base=base)
    assert slots.link_bytes_per_s == 12e9 and slots.disk_bytes_per_s == 2e9  # the caller's
    assert slots.codec_rate("4/slots") != base.codec_rate("4/slots")  # measured
    assert slots.codec_rate("8/rows") == base.codec_rate("8/rows")  # not this plan's
    assert slots.copy_call_s == base.copy_call_s  # four calls a layer: not worth measuring
    assert slots.matmul_flops_per_s != base.matmul_flops_per_s
    rows = calibrate(pinned_plan(8, "rows"), TINY, CPU, torch.float32, base=base)
    assert rows.copy_call_s != base.copy_call_s
    given = calibrate(pinned_plan(8, "rows"), TINY, CPU, torch.float32, copy_call_s=3e-6)
    assert given.copy_call_s == 3e-6
    # What the model then predicts for the plan is a real, finite time.
    assert 0 < pinned_plan(8, "rows").predicted_step_s(rows) < 10


def test_the_codec_clock_holds_the_write_back_copies_until_it_stops():
    """A row-major cache issues its write-backs one call per row from Python: the codec's timing
    keeps them back (they are the copy calls' term of the model) and issues them after."""
    from yalm_runner.bench.calibrate import _copies_held, _filled_cache, _two_layers
    from yalm_runner.kvcache import HostArena, HostKV

    small = _two_layers(TINY)
    cache = HostKV(small, 4, 6, CPU, torch.float32, bits=16, arena=HostArena(2, pin=False))
    _filled_cache(cache, small, 4, 5, CPU, torch.float32)
    cache.layer(0, 5)
    cache._slots[0][0][:, 5].fill_(7.0)  # the new slot layer 0 just wrote
    with _copies_held(cache):
        cache.stored(0, 5, 6)
        assert not (cache._host[0][0][:, 5] == 7.0).any()  # not sent yet
    assert (cache._host[0][0][:, 5] == 7.0).all()
    assert "_on_copy_stream" not in vars(cache)  # the class's own method again
