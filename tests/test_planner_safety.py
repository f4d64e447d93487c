"""On a GPU: every plan the planner accepts runs under its cap, whatever it chose or was told.

Memory is planned per layer, so a few layers of the 13B shape exercise the same buffers as the
whole model: the sweep covers KV on the GPU and in pinned RAM (row- and slot-major, 16/8/4
bits; 8/4 bits attended on the host), weights in pinned RAM and on disk, and two budgets, each
at the planner's batch, under a hard allocator cap. The cap is set on what the allocator
*reserves* (that is what runs out), and the test asserts on the reserved peak, not only on what
tensors hold.

Each case also predicts its decode step with the step-time model (``steptime``) at rates
calibrated in the same run (``bench.calibrate``: the pinned link, the case's copy call and KV
codec at its rows and context, the matmuls; the drive at the rate the case's own reads got),
prints the prediction beside the measured step, and asserts that the measurement is within
0.90-1.10x of it whenever something streams (a plan with every layer and the KV cache resident
is bound by launches and the step's overhead, which the model takes from its fitted defaults:
printed, not held).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace

import pytest
import torch

from yalm_runner import cudamem
from yalm_runner.bench.calibrate import calibrate, measure_disk_read
from yalm_runner.bench.disk import write_synthetic_store
from yalm_runner.bench.link import measure_h2d
from yalm_runner.bench.synthetic import NO_EOS, SHAPES, SyntheticStore
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.offload import OffloadPolicy, format_bytes, parse_bytes
from yalm_runner.pinned import locked_bytes
from yalm_runner.planning import plan_memory
from yalm_runner.steptime import StepRates
from yalm_runner.streaming import StreamingWeights

pytestmark = pytest.mark.gpu

LAYERS = 4
PROMPT, NEW = 128, 16
DISK_NEW = 6
BUDGETS = ("8GiB", "4GiB")
# A forced row-major cache issues four copies a row and layer from Python. From about this many
# rows its step and the calibration of its copy call both swing with the shared host's load:
# session 9 measured one case (8 GiB, 4-bit, 512 rows) at 111, 133, 106, 120 and 145 ms and
# calibrated its calls at 34-108 ms a step across five runs. Its memory is held like every
# case's; its prediction, when it misses 10%, is reported as an expected failure with the
# figures. The planner picks row-major only when it predicts it 1% faster than slot-major.
ROW_MAJOR_NOISY_ROWS = 256


@dataclass(frozen=True)
class Case:
    budget: str
    weights_on: str
    kv_on: str
    kv_bits: int = 16
    kv_layout: str = "auto"
    kv_attention: str = "device"

    def __str__(self) -> str:
        attended = " attended on the host" if self.kv_attention == "host" else ""
        return (
            f"{self.budget} weights {self.weights_on} KV {self.kv_on} {self.kv_bits}-bit "
            f"{self.kv_layout}{attended}"
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
            # Attention on the host: the cache's device slots live through the prefill alone
            # (its workspace), the decode holds the step's staging; run apart with -k host.
            for bits in (8, 4):
                every.append(Case(budget, weights_on, "cpu", bits, "rows", "host"))
    return every


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cudamem.configure()
    config = replace(SHAPES["13b"], num_layers=LAYERS)
    folder = tmp_path_factory.mktemp("planner-sweep")
    on_disk = write_synthetic_store(folder / "store", config, torch.bfloat16)
    # The rates every case shares: the link, and the disk tier read as the streamer reads it
    # (two of the store's own layer files; measured again before each disk case).
    layer_files = [on_disk.parts[f"layer_{idx}"].path for idx in range(2)]
    rates = StepRates(
        link_bytes_per_s=measure_h2d()["pinned"], disk_bytes_per_s=measure_disk_read(layer_files)
    )
    print(
        f"\ncalibrated: link {rates.link_bytes_per_s / 1e9:.2f} GB/s, disk tier "
        f"{rates.disk_bytes_per_s / 1e9:.2f} GB/s",
        flush=True,
    )
    return SyntheticStore(config, torch.bfloat16), on_disk, rates


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
    synthetic, on_disk, shared_rates = stores
    store = on_disk if case.weights_on in ("disk", "auto") else synthetic
    cap = parse_bytes(case.budget)
    policy = OffloadPolicy(
        gpu_memory_bytes=cap,
        cpu_memory_bytes=parse_bytes("48GiB"),
        weights_on=case.weights_on,
        kv_on=case.kv_on,
        kv_bits=case.kv_bits,
        kv_layout=case.kv_layout,
        kv_attention=case.kv_attention,
    )
    # A disk-tier step takes ~1.5 s on the lent H200's drive: fewer of them keep the sweep
    # inside a device call (the steps after the first are alike).
    new = DISK_NEW if case.weights_on == "disk" else NEW
    plan = plan_memory(
        store, torch.device("cuda"), torch.bfloat16, policy, batch_size=None,
        max_context=PROMPT + new, prompt_tokens=PROMPT, rows=512,
    )  # fmt: skip
    began = time.perf_counter()
    # The case's own rates (its KV codec and a row-major cache's copy calls at its rows and
    # context, the matmuls at its batch), measured before the cap, their memory handed back so
    # that the reserved peak is the run's.
    rates = calibrate(plan, store.config, "cuda", torch.bfloat16, base=shared_rates)
    drive_before = None
    if plan.placement.disk_bytes_per_pass:
        # Every disk-tier layer file of the case, read just before it runs: printed beside
        # the rate the run's own reads got (the lent machine's virtual drive drifts by 10-40 %
        # over a sweep, so the prediction is made at the latter; see below).
        files = [
            store.parts[name].path for name, tier in plan.placement.tiers.items() if tier == "disk"
        ]
        drive_before = measure_disk_read(files)
    # The weights are placed before the cap: a synthetic store generates each tensor on the
    # GPU in fp32 (a 13B embedding is 2.4 GiB of it), which a real store never does. What
    # stays resident counts against the cap from here on; the generators' memory goes back.
    weights = place(store, plan)
    gc.collect()
    torch.cuda.empty_cache()
    calibrated_s = time.perf_counter() - began
    total = torch.cuda.get_device_properties(0).total_memory
    read_before = (weights.bytes_from_disk, weights.disk_read_s)
    try:
        torch.cuda.set_per_process_memory_fraction(cap / total)
        torch.cuda.reset_peak_memory_stats()
        engine = Engine.for_plan(weights, plan, case.kv_bits, eos_id=NO_EOS)
        requests = [
            Request(f"r{row}", tuple([1] + [(row * 7 + pos) % 50000 + 300
                                             for pos in range(PROMPT - 1)]), new)
            for row in range(plan.batch_size)
        ]  # fmt: skip
        engine.generate(requests, SamplingParams(greedy=True), batch_size=plan.batch_size)
        torch.cuda.synchronize()
        reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
        # Pinned RAM the run holds (weights, a disk tier's relays, the KV cache and its
        # staging), against what the plan counted (session 11: uncounted relays put the
        # envelope 1 GiB over its RAM budget).
        locked = locked_bytes()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    stats = engine.stats
    planned_pinned = plan.placement.pinned_bytes + plan.kv_host_bytes
    measured = stats.decode_s / max(stats.forward_passes - 1, 1)
    if drive_before is not None:
        # The drive is an input of the model, like the link: the step is predicted at the
        # rate the run's reader got from it (bytes over the time in reads, waits excluded).
        read_bytes = weights.bytes_from_disk - read_before[0]
        rates = replace(rates, disk_bytes_per_s=read_bytes / (weights.disk_read_s - read_before[1]))
    predicted = plan.predict_step(rates)
    ratio = measured / predicted.total_s
    streams = plan.placement.streamed_bytes_per_pass > 0 or plan.kv_on == "cpu"
    codec = plan.decode.codec_key
    codec_rate = f", codec {rates.codec_rate(codec) / 1e9:.0f} G/s" if codec else ""
    if drive_before is not None:
        codec_rate += (
            f", drive {rates.disk_bytes_per_s / 1e9:.2f} GB/s in the run, "
            f"{drive_before / 1e9:.2f} GB/s just before"
        )
    terms = (
        f"busy ms: link {predicted.link_s * 1e3:.1f}, drive {predicted.disk_s * 1e3:.1f}, "
        f"copy calls {predicted.copy_calls_s * 1e3:.1f}, codec {predicted.codec_s * 1e3:.1f}, "
        f"compute {predicted.compute_s * 1e3:.1f}, overhead {predicted.overhead_s * 1e3:.1f}"
    )
    if predicted.host_s:
        terms += (
            f", host attention {predicted.host_s * 1e3:.1f} at "
            f"{rates.host_attention_elements_per_s / 1e9:.1f} G elements/s under DMA"
        )
    print(
        f"\n{case!s:40} reserved {format_bytes(reserved):>10} allocated "
        f"{format_bytes(allocated):>10}; step predicted {predicted.total_s * 1e3:6.1f} ms "
        f"measured {measured * 1e3:6.1f} ms ({ratio:.2f}x{'' if streams else ', not held'}; "
        f"{predicted.bound}{codec_rate}; {terms}); {time.perf_counter() - began:.0f} s, "
        f"calibration {calibrated_s:.1f} s; pinned {format_bytes(locked)} locked, "
        f"{format_bytes(planned_pinned)} planned [{plan.describe()}]",
        flush=True,
    )
    assert reserved <= cap, f"reserved {format_bytes(reserved)} over the {case.budget} cap"
    assert locked <= policy.cpu_memory_bytes, f"pinned {format_bytes(locked)} over the RAM budget"
    if streams and not 0.90 <= ratio <= 1.10:
        miss = (
            f"measured step {measured * 1e3:.1f} ms is {ratio:.2f}x the predicted "
            f"{predicted.total_s * 1e3:.1f} ms"
        )
        if case.kv_layout == "rows" and plan.batch_size >= ROW_MAJOR_NOISY_ROWS:
            # A known gap, not hidden: reported as XFAIL with the figures (see the constant).
            pytest.xfail(f"row-major at {plan.batch_size} rows, host-bound: {miss}")
        raise AssertionError(miss)
