"""On a GPU: every plan the planner accepts runs under its cap, whatever it chose or was told.

Memory is planned per layer, so a few layers of the 13B shape exercise the same buffers as the
whole model: the sweep covers KV on the GPU and in pinned RAM (row- and slot-major, 16/8/4
bits), weights in pinned RAM and on disk, and two budgets, each at the planner's batch, under a
hard allocator cap. The cap is set on what the allocator *reserves* (that is what runs out), and
the test asserts on the reserved peak, not only on what tensors hold. Each case also prints the
planner's predicted decode step against the measured one (the prediction uses the pinned and
drive rates measured in the same run).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace

import pytest
import torch

from yalm_runner import cudamem
from yalm_runner.bench.disk import measure_drive_read, write_synthetic_store, write_test_file
from yalm_runner.bench.link import measure_h2d
from yalm_runner.bench.synthetic import NO_EOS, SHAPES, SyntheticStore
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.offload import OffloadPolicy, format_bytes, parse_bytes
from yalm_runner.planning import plan_memory
from yalm_runner.streaming import StreamingWeights

pytestmark = pytest.mark.gpu

LAYERS = 4
PROMPT, NEW = 128, 16
BUDGETS = ("8GiB", "4GiB")


@dataclass(frozen=True)
class Case:
    budget: str
    weights_on: str
    kv_on: str
    kv_bits: int = 16
    kv_layout: str = "auto"

    def __str__(self) -> str:
        return (
            f"{self.budget} weights {self.weights_on} KV {self.kv_on} {self.kv_bits}-bit "
            f"{self.kv_layout}"
        )


def cases() -> list[Case]:
    every = []
    for budget in BUDGETS:
        every.append(Case(budget, "auto", "auto"))
        for weights_on in ("cpu", "disk"):
            every.append(Case(budget, weights_on, "gpu"))
            for bits in (16, 8, 4):
                for layout in ("rows", "slots"):
                    every.append(Case(budget, weights_on, "cpu", bits, layout))
    return every


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cudamem.configure()
    config = replace(SHAPES["13b"], num_layers=LAYERS)
    folder = tmp_path_factory.mktemp("planner-sweep")
    on_disk = write_synthetic_store(folder / "store", config, torch.bfloat16)
    probe = folder / "probe.bin"
    write_test_file(probe, 1 << 30)
    drive_bps = measure_drive_read(probe, 1 << 30).bytes_per_s
    probe.unlink(missing_ok=True)
    pinned_bps = measure_h2d()["pinned"]
    return SyntheticStore(config, torch.bfloat16), on_disk, pinned_bps, drive_bps


_placed: dict = {}  # the weights of the last case, reused while the placement is the same


def place(store, plan) -> StreamingWeights:
    key = (id(store), tuple(sorted(plan.placement.tiers.items())))
    if key not in _placed:
        for weights in _placed.values():
            weights.close()
        _placed.clear()
        gc.collect()
        torch.cuda.empty_cache()
        _placed[key] = StreamingWeights(
            store, torch.device("cuda"), torch.bfloat16, plan.placement, verify=False
        )
    return _placed[key]


@pytest.mark.parametrize("case", cases(), ids=str)
def test_an_accepted_plan_runs_under_its_cap(case: Case, stores):
    synthetic, on_disk, pinned_bps, drive_bps = stores
    store = on_disk if case.weights_on in ("disk", "auto") else synthetic
    cap = parse_bytes(case.budget)
    policy = OffloadPolicy(
        gpu_memory_bytes=cap,
        cpu_memory_bytes=parse_bytes("48GiB"),
        weights_on=case.weights_on,
        kv_on=case.kv_on,
        kv_bits=case.kv_bits,
        kv_layout=case.kv_layout,
    )
    plan = plan_memory(
        store, torch.device("cuda"), torch.bfloat16, policy, batch_size=None,
        max_context=PROMPT + NEW, prompt_tokens=PROMPT, rows=512,
    )  # fmt: skip
    total = torch.cuda.get_device_properties(0).total_memory
    began = time.perf_counter()
    try:
        torch.cuda.set_per_process_memory_fraction(cap / total)
        weights = place(store, plan)
        torch.cuda.reset_peak_memory_stats()
        engine = Engine(
            weights, eos_id=NO_EOS, kv_on=plan.kv_on, kv_bits=case.kv_bits,
            prefill_rows=plan.prefill_rows, kv_layout=plan.kv_layout,
        )  # fmt: skip
        requests = [
            Request(f"r{row}", tuple([1] + [(row * 7 + pos) % 50000 + 300
                                             for pos in range(PROMPT - 1)]), NEW)
            for row in range(plan.batch_size)
        ]  # fmt: skip
        engine.generate(requests, SamplingParams(greedy=True), batch_size=plan.batch_size)
        torch.cuda.synchronize()
        reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    stats = engine.stats
    measured = stats.decode_s / max(stats.forward_passes - 1, 1)
    predicted = plan.predicted_step_s(pinned_bps, drive_bps)
    ratio = f"{measured / predicted:.2f}x" if predicted else "nothing streams"
    print(
        f"\n{case!s:40} reserved {format_bytes(reserved):>10} allocated "
        f"{format_bytes(allocated):>10}; step predicted {predicted * 1e3:6.1f} ms measured "
        f"{measured * 1e3:6.1f} ms ({ratio}); {time.perf_counter() - began:.0f} s "
        f"[{plan.describe()}]",
        flush=True,
    )
    assert reserved <= cap, f"reserved {format_bytes(reserved)} over the {case.budget} cap"
