"""The step-time model: the pipeline's terms are summed and maxed as the engine overlaps them,
the step grows with the batch, and rates read back from a bench's JSON are checked by name."""

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from yalm_runner.bench.synthetic import SHAPES, SyntheticStore
from yalm_runner.errors import ConfigError
from yalm_runner.offload import OffloadPolicy, parse_bytes
from yalm_runner.planning import plan_memory
from yalm_runner.steptime import CacheShape, PassWork, StepRates, decode_work, predict_pass

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
# Round rates, so that every expected time below is simple arithmetic.
RATES = StepRates(
    link_bytes_per_s=10 * GB,
    disk_bytes_per_s=1 * GB,
    copy_call_s=1e-5,
    codec_elements_per_s={"4/slots": 1e9, "4/rows": 1e9},
    matmul_flops_per_s=1e12,
    device_bytes_per_s=1e12,
    dequant_elements_per_s=1e9,
    step_overhead_s=0.002,
    row_overhead_s=0.0,
)


def work(**given) -> PassWork:
    """Four pinned layers of 1 GB, no KV traffic, 10 ms of matmuls each, unless ``given``."""
    values = dict(
        rows=8, context=100, tiers=("cpu",) * 4, layer_bytes=(GB,) * 4, kv_in_bytes=0.0,
        kv_out_bytes=0.0, copy_calls=0, codec_key=None, codec_elements=0.0, flops=1e10,
        device_bytes=0.0, dequant_elements=0.0,
    )  # fmt: skip
    values.update(given)
    return PassWork(**values)


def test_a_link_bound_step_is_every_layers_bytes_plus_the_last_layers_work():
    # 100 ms of link a layer hides 10 ms of device work; the last layer's shows.
    step = predict_pass(work(), RATES)
    assert step.total_s == pytest.approx(4 * 0.100 + 0.010 + 0.002)
    assert step.link_s == pytest.approx(0.4) and step.compute_s == pytest.approx(0.04)
    assert step.bound == "the link"


def test_a_device_bound_step_is_the_first_arrival_plus_every_layers_work():
    step = predict_pass(work(flops=2e11), RATES)  # 200 ms of device work against 100 of link
    assert step.total_s == pytest.approx(0.100 + 4 * 0.200 + 0.002)
    assert step.bound == "device work"


def test_disk_layers_are_read_one_after_another_then_cross_the_link():
    # 1 s a read; the last layer's trip over the link and its work are not hidden.
    step = predict_pass(work(tiers=("disk",) * 4), RATES)
    assert step.total_s == pytest.approx(4 * 1.0 + 0.100 + 0.010 + 0.002)
    assert step.disk_s == pytest.approx(4.0) and step.bound == "the drive"


def test_disk_reads_overlap_the_pinned_layers_before_them_two_layers_ahead():
    # Two pinned layers of 1 GB, then two disk layers of 100 MB: both reads (100 ms each) start
    # with the pass, as the reader runs two layers ahead, and are done by the time the pinned
    # layers have crossed the link (200 ms). The step is the link's, as if all were pinned.
    tiers = ("cpu", "cpu", "disk", "disk")
    step = predict_pass(work(tiers=tiers, layer_bytes=(GB, GB, GB // 10, GB // 10)), RATES)
    link = 0.100 + 0.100 + 0.010 + 0.010
    assert step.total_s == pytest.approx(link + 0.010 + 0.002)
    assert step.disk_s == pytest.approx(0.2) and step.bound == "the link"


def test_disk_layers_spread_among_pinned_ones_hide_their_reads_behind_the_link():
    # Four pinned layers of 5 GB (500 ms of link each) and four disk layers of 0.5 GB (500 ms a
    # read, 50 ms of link). Bunched at the end, the reader does two reads while the pinned
    # layers cross the link, then waits for their relays: the last two reads show (3.1 s).
    # Spread, every read runs while the pinned layer before it crosses: the link's 2.2 s.
    pinned, disk = 5 * GB, GB // 2
    bunched = ("cpu",) * 4 + ("disk",) * 4
    spread = ("cpu", "disk") * 4
    sizes = {tier: pinned if tier == "cpu" else disk for tier in ("cpu", "disk")}

    def step(tiers):
        layer_bytes = tuple(sizes[tier] for tier in tiers)
        return predict_pass(work(tiers=tiers, layer_bytes=layer_bytes), RATES)

    assert step(bunched).total_s == pytest.approx(3.1 + 0.010 + 0.002)
    assert step(spread).total_s == pytest.approx(2.2 + 0.010 + 0.002)
    assert step(spread).bound == "the link" and step(spread).disk_s == pytest.approx(2.0)


def test_row_major_copy_calls_make_the_kv_stream_the_slowest_stage():
    # 1000 calls of 10 us = 10 ms a layer on the KV stream, beside 10 ms of its bytes; the link
    # carries 1 GB of weights + 0.1 GB of KV (110 ms): the link still bounds the step.
    kv = work(kv_in_bytes=1e8, copy_calls=1000)
    assert predict_pass(kv, RATES).total_s == pytest.approx(4 * 0.110 + 0.010 + 0.002)
    # With 20,000 calls (200 ms) the KV stream is the slowest: bytes + calls every layer.
    many = replace(kv, copy_calls=20_000)
    step = predict_pass(many, RATES)
    assert step.total_s == pytest.approx(4 * (0.010 + 0.200) + 0.010 + 0.002)
    assert step.bound == "KV copy calls" and step.copy_calls_s == pytest.approx(0.8)


def test_kv_expansion_is_device_work_and_adds_to_the_matmuls():
    # 50 M elements at 1 G/s: 50 ms a layer on the compute stream after its 10 ms of matmuls.
    step = predict_pass(work(codec_key="4/slots", codec_elements=5e7), RATES)
    assert step.codec_s == pytest.approx(0.2)
    assert step.total_s == pytest.approx(4 * 0.100 + 0.060 + 0.002)
    deep = predict_pass(work(codec_key="4/slots", codec_elements=2e8), RATES)
    assert deep.total_s == pytest.approx(0.100 + 4 * 0.210 + 0.002)


def test_resident_layers_with_the_kv_cache_on_the_device_wait_for_nothing():
    resident = work(tiers=("gpu",) * 4, layer_bytes=(0,) * 4)
    assert predict_pass(resident, RATES).total_s == pytest.approx(4 * 0.010 + 0.002)


def test_the_overhead_is_paid_once_a_step_and_per_row():
    rates = replace(RATES, row_overhead_s=1e-4)
    assert predict_pass(work(rows=100), rates).total_s == pytest.approx(0.412 + 0.01)


def test_a_decode_step_counts_the_kv_traffic_the_cache_moves():
    config = SHAPES["13b"]  # 40 layers, 40 heads of 128
    rows = decode_work(
        config, 512, 135.0, ("cpu",) * 40, (1,) * 40, CacheShape("cpu", 4, "rows"), 2, False
    )
    slots = decode_work(
        config, 512, 135.0, ("cpu",) * 40, (1,) * 40, CacheShape("cpu", 4, "slots"), 2, False
    )
    record = 2 * 40 * (128 // 2 + 2 * 2)  # a token's keys and values in one layer, 4 bits
    assert rows.kv_in_bytes == slots.kv_in_bytes == 512 * 135 * record
    assert rows.copy_calls == 4 * 512 and slots.copy_calls == 4
    assert rows.codec_elements == slots.codec_elements == 2 * 512 * 136 * 5120
    plain = decode_work(
        config, 512, 135.0, ("cpu",) * 40, (1,) * 40, CacheShape("cpu", 16, "rows"), 2, False
    )
    assert plain.codec_key is None and plain.codec_elements == 0  # rows land in the slot
    on_device = decode_work(
        config, 512, 135.0, ("cpu",) * 40, (1,) * 40, CacheShape("gpu"), 2, False
    )
    assert on_device.kv_in_bytes == 0 and on_device.copy_calls == 0


@pytest.mark.parametrize(
    ("kv_on", "bits", "layout"),
    [("gpu", 16, "auto"), ("cpu", 16, "rows"), ("cpu", 8, "slots"), ("cpu", 4, "rows")],
)
def test_the_predicted_step_never_shrinks_as_the_batch_grows(kv_on, bits, layout):
    store = SyntheticStore(SHAPES["13b"], torch.bfloat16)
    policy = OffloadPolicy(weights_on="cpu", kv_on=kv_on, kv_bits=bits, kv_layout=layout)
    batches, steps = (1, 2, 8, 32, 64, 128, 256, 512), []
    for batch in batches:
        plan = plan_memory(
            store, torch.device("cuda"), torch.bfloat16, policy, batch_size=batch,
            max_context=160, prompt_tokens=128,
        )  # fmt: skip
        steps.append(plan.predicted_step_s())
    assert steps == sorted(steps)
    assert steps[-1] > steps[0]
    tokens_per_s = [batch / step for batch, step in zip(batches, steps, strict=True)]
    assert tokens_per_s == sorted(tokens_per_s)  # a row's share of the weights still pays


def test_the_planning_rates_are_the_pcie4_machine_class():
    rates = StepRates()
    assert rates.link_bytes_per_s == 25e9 and rates.disk_bytes_per_s == 3e9
    store = SyntheticStore(replace(SHAPES["13b"], num_layers=4), torch.bfloat16)
    policy = OffloadPolicy(gpu_memory_bytes=parse_bytes("8GiB"), weights_on="cpu", kv_on="gpu")
    plan = plan_memory(
        store, torch.device("cuda"), torch.bfloat16, policy, batch_size=8, max_context=144,
        prompt_tokens=128,
    )  # fmt: skip
    step = plan.predict_step()
    # Four 634 MB layers over 25 GB/s, the last layer's matmuls, and the step's overhead.
    layer = plan.placement.streamed_bytes_per_pass / 4
    assert step.link_s == pytest.approx(4 * layer / 25e9)
    assert step.total_s == pytest.approx(
        step.link_s + step.compute_s / 4 + rates.step_overhead_s + 8 * rates.row_overhead_s
    )


def test_rates_read_back_from_a_mapping_keep_their_values_and_defaults():
    measured = StepRates(link_bytes_per_s=55.05e9).with_codec("4/slots", 61e9)
    assert StepRates.from_dict(measured.to_dict()) == measured
    partial = StepRates.from_dict({"copy_call_s": 9e-6, "codec_elements_per_s": {"8/rows": 7e10}})
    assert partial.copy_call_s == 9e-6 and partial.codec_rate("8/rows") == 7e10
    assert partial.codec_rate("4/slots") == StepRates().codec_rate("4/slots")
    assert partial.link_bytes_per_s == 25e9


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ([1, 2], r"^bench\.json: rates must be a mapping, got list$"),
        ({"link_gbps": 25}, r"^bench\.json: unknown rates \['link_gbps'\]; known: \["),
        ({"copy_call_s": 0}, r"^bench\.json: copy_call_s must be a positive number, got 0$"),
        ({"disk_bytes_per_s": "3e9"}, r"^bench\.json: disk_bytes_per_s must be a positive"),
        ({"link_bytes_per_s": float("nan")}, r"link_bytes_per_s must be a positive number"),
        ({"codec_elements_per_s": {"2/rows": 1e9}}, r"unknown widths/layouts \['2/rows'\]"),
        ({"codec_elements_per_s": {"4/rows": -1}}, r"codec 4/rows must be a positive number"),
    ],
)
def test_a_bad_rate_is_refused_by_name(given, message):
    with pytest.raises(ConfigError, match=message):
        StepRates.from_dict(given, "bench.json")


def test_the_defaults_explain_every_row_of_the_h200_sweep_within_ten_percent():
    # The recorded measurements and their arithmetic live in the benchmark script; --check
    # holds every sweep row to 0.90-1.10x.
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_model_check.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    sweep = result.stdout.split("\n\n")[0].splitlines()[2:]
    ratios = [float(re.search(r" (\d+\.\d\d)x ", line).group(1)) for line in sweep]
    assert len(ratios) == 13
    assert all(0.90 <= ratio <= 1.10 for ratio in ratios), sweep


def test_attention_on_the_host_waits_in_the_devices_chain_and_moves_no_cache():
    rates = replace(RATES, host_attention_elements_per_s=1e9, host_call_s=1e-4)
    # 50 ms of host attention a layer (5e7 elements) plus its call, after 10 ms of matmuls:
    # under the 100 ms a layer's weights take, the link still sets the pace.
    hidden = work(host_elements=5e7, host_calls=1)
    step = predict_pass(hidden, rates)
    assert step.total_s == pytest.approx(4 * 0.100 + 0.010 + 0.0501 + 0.002)
    assert step.host_s == pytest.approx(4 * 0.0501) and step.bound == "the link"
    # 200 ms a layer: the host is the step.
    slow = predict_pass(work(host_elements=2e8, host_calls=1), rates)
    assert slow.total_s == pytest.approx(0.100 + 4 * (0.010 + 0.2001) + 0.002)
    assert slow.bound == "device work and host attention"
    # Counted from a plan's shape: the records stay put, only the step's vectors cross (fp32
    # q/k/v out and the output back, ~a twelfth of the 4-bit cache at 178 positions).
    config = SHAPES["yalm-100b"]
    tiers, sizes = ("cpu",) * config.num_layers, (10**9,) * config.num_layers
    host = CacheShape("cpu", 4, "rows", "host")
    counted = decode_work(config, 64, 178.0, tiers, sizes, host, 2, True)
    moved = decode_work(config, 64, 178.0, tiers, sizes, CacheShape("cpu", 4, "slots"), 2, True)
    assert counted.kv_in_bytes == 0 and counted.copy_calls == 0 and counted.host_calls == 1
    assert counted.host_elements == 2 * 64 * 178 * config.hidden_size
    assert counted.host_bytes < moved.kv_in_bytes / 10
