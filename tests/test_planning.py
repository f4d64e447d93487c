"""The memory plan: the batch and the KV placement follow from the budgets alone."""

from dataclasses import replace

import pytest
import torch

from yalm_runner.bench.synthetic import SHAPES, SyntheticStore
from yalm_runner.errors import OffloadError
from yalm_runner.offload import OffloadPolicy, parse_bytes
from yalm_runner.planning import plan_memory
from yalm_runner.steptime import StepRates

GPU = torch.device("cuda")  # planning allocates nothing: no CUDA device is needed
BUDGETS = OffloadPolicy(gpu_memory_bytes=parse_bytes("8GiB"), cpu_memory_bytes=parse_bytes("64GiB"))


@pytest.fixture(scope="module")
def store_13b():
    return SyntheticStore(SHAPES["13b"], torch.bfloat16)


def plan(store, policy=BUDGETS, **kwargs):
    kwargs.setdefault("batch_size", None)
    kwargs.setdefault("max_context", 160)
    kwargs.setdefault("prompt_tokens", 128)
    return plan_memory(store, GPU, torch.bfloat16, policy, **kwargs)


def test_every_plan_stays_inside_the_gpu_budget(store_13b):
    for batch in (1, 8, 32, 64, 128):
        chosen = plan(store_13b, batch_size=batch)
        assert chosen.placement.gpu_total_bytes <= BUDGETS.gpu_memory_bytes
        assert chosen.kv_host_bytes + chosen.placement.pinned_bytes <= BUDGETS.cpu_memory_bytes


def test_kv_moves_to_pinned_ram_when_the_gpu_cannot_hold_the_batch(store_13b):
    small = plan(store_13b, batch_size=8)
    assert small.kv_on == "gpu"
    large = plan(store_13b, batch_size=128)
    assert large.kv_on == "cpu"
    assert large.kv_host_bytes == 128 * 160 * SHAPES["13b"].kv_bytes_per_token(2)


def test_the_chosen_batch_beats_the_largest_batch_with_kv_on_the_gpu(store_13b):
    on_gpu = plan(store_13b, policy=replace(BUDGETS, kv_on="gpu"))
    chosen = plan(store_13b)
    # 8 GiB hold ~40 rows of KV beside the stream buffers; pinned KV lets far more rows share
    # each weight transfer, which the planner predicts to be faster.
    assert on_gpu.batch_size < 64 <= chosen.batch_size
    assert chosen.kv_on == "cpu"
    link = StepRates(link_bytes_per_s=25e9, disk_bytes_per_s=25e9)
    rate = lambda p: p.batch_size / p.predicted_step_s(link)  # noqa: E731
    assert rate(chosen) > rate(on_gpu)


def test_the_batch_is_capped_by_the_rows_there_are(store_13b):
    assert plan(store_13b, rows=5).batch_size == 5


def test_an_impossible_batch_is_refused_with_the_numbers(store_13b):
    with pytest.raises(OffloadError, match=r"batch size 100000 does not fit: .*GiB"):
        plan(store_13b, batch_size=100_000)
    tiny_gpu = replace(BUDGETS, gpu_memory_bytes=parse_bytes("1GiB"))
    with pytest.raises(OffloadError, match=r"not even one row fits .*GPU budget 1\.00 GiB"):
        plan(store_13b, policy=tiny_gpu)


def test_yalm_100b_in_16_bits_streams_from_disk_beyond_the_ram_budget():
    store = SyntheticStore(SHAPES["yalm-100b"], torch.bfloat16)
    chosen = plan(store, max_context=256, prompt_tokens=128)
    placement = chosen.placement
    assert placement.count("disk") > 0 and placement.count("cpu") > 0
    assert placement.pinned_bytes + chosen.kv_host_bytes <= BUDGETS.cpu_memory_bytes
    assert placement.gpu_total_bytes <= BUDGETS.gpu_memory_bytes


def test_the_plan_is_chosen_at_the_drive_and_link_rates_it_is_given():
    """YaLM-100B in 4 bits under 8 GiB / 64 GiB, free to use a drive: a slow drive gets no layers
    (or few) and the batch the RAM allows; a fast one gets more layers on disk and more rows.
    Each plan is the best of the candidates at its own rates, so it beats the other one there."""
    from yalm_runner.quant import Quantization

    store = SyntheticStore(SHAPES["yalm-100b"], torch.bfloat16, 0, Quantization("int4", 64))
    policy = replace(BUDGETS, kv_bits=4, weights_on="auto")
    slow, fast = (StepRates(link_bytes_per_s=55e9, disk_bytes_per_s=disk) for disk in (0.5e9, 12e9))
    plans = {
        name: plan(store, policy, max_context=256, prompt_tokens=128, rates=rates)
        for name, rates in (("slow", slow), ("fast", fast))
    }
    assert plans["slow"].placement.count("disk") < plans["fast"].placement.count("disk")
    assert plans["slow"].batch_size < plans["fast"].batch_size
    for name, rates in (("slow", slow), ("fast", fast)):
        other = plans["fast" if name == "slow" else "slow"]
        mine = plans[name]
        assert mine.batch_size / mine.predicted_step_s(rates) >= (
            other.batch_size / other.predicted_step_s(rates)
        )


def test_on_a_cpu_machine_the_ram_budget_bounds_resident_layers(tiny_store):
    from yalm_runner.checkpoint import ModelStore

    store = ModelStore.open(tiny_store)
    cpu = torch.device("cpu")
    roomy = plan_memory(store, cpu, torch.float32, OffloadPolicy(), batch_size=4, max_context=64)
    assert roomy.placement.count("disk") == 0 and roomy.kv_on == "gpu"
    disk = plan_memory(
        store, cpu, torch.float32, OffloadPolicy(weights_on="disk"), batch_size=4, max_context=64
    )
    assert disk.placement.count("disk") == store.config.num_layers
    with pytest.raises(OffloadError, match=r"RAM budget .* raise --cpu-memory"):
        plan_memory(
            store,
            cpu,
            torch.float32,
            OffloadPolicy(cpu_memory_bytes=1024),
            batch_size=4,
            max_context=64,
        )


def test_kv_settings_that_cannot_work_are_refused_by_name():
    from yalm_runner.errors import ConfigError

    # The same words as a flag's or a YAML key's: the settings module checks all three.
    with pytest.raises(ConfigError, match=r"^kv_on: one of auto, gpu, cpu, got 'disk'$"):
        OffloadPolicy(kv_on="disk")
    with pytest.raises(ConfigError, match=r"^kv_bits: one of 16, 8, 4, got 2$"):
        OffloadPolicy(kv_bits=2)
    with pytest.raises(ConfigError, match=r"^kv_bits: 8-bit KV is for a cache in pinned RAM"):
        OffloadPolicy(kv_on="gpu", kv_bits=8)
    with pytest.raises(ConfigError, match=r"^kv_layout: one of auto, rows, slots, got 'columns'$"):
        OffloadPolicy(kv_layout="columns")


def test_the_planner_picks_the_host_layout_that_predicts_more_tokens(store_13b):
    # As measured on the H200 (benchmarks/RESULTS.md): at 16 bits the slot-major staging area
    # costs rows, and row-major's larger batch wins; compressed, slot-major holds more rows and
    # spares the per-row copy calls. The planner compares at its own rates (PCIe 4); on the
    # H200's 55 GB/s link the 16-bit layouts are within 2% of each other, as measured.
    rate = lambda p: p.batch_size / p.predicted_step_s()  # noqa: E731
    for bits, expected in ((16, "rows"), (8, "slots"), (4, "slots")):
        policy = replace(BUDGETS, kv_on="cpu", kv_bits=bits, cpu_memory_bytes=None)
        chosen = plan(store_13b, policy=policy, rows=512)
        assert chosen.kv_layout == expected
        other = "rows" if expected == "slots" else "slots"
        assert rate(chosen) >= rate(plan(store_13b, policy=replace(policy, kv_layout=other)))
        assert f"pinned RAM ({expected}, moved per layer)" in chosen.describe()


def test_smaller_prefill_groups_are_taken_only_when_they_buy_resident_layers(store_13b):
    # Every layer is loaded once per prefill whatever the groups, so the planner trades group
    # size for layers kept on the GPU (here at DeepSpeed's uncapped peak on the H200).
    peer_peak = OffloadPolicy(gpu_memory_bytes=int(10.58 * 2**30), kv_on="gpu")
    chosen = plan(store_13b, policy=peer_peak, batch_size=32)
    assert chosen.prefill_rows == 16 and chosen.placement.count("gpu") == 7
    whole = plan(store_13b, policy=replace(peer_peak, gpu_memory_bytes=64 * 2**30), batch_size=32)
    assert whole.prefill_rows == 0  # the whole batch's 4096 tokens in one group when it fits
    # Nothing to buy: the largest group stays (the 4-bit plan holds 512 rows either way).
    streamed = replace(BUDGETS, kv_bits=4, cpu_memory_bytes=None, weights_on="cpu")
    four = plan(store_13b, policy=streamed, rows=512)
    assert four.batch_size == 512 and four.prefill_rows == 32


def test_a_grouped_prefill_counts_the_whole_batchs_logits_at_its_end():
    """Session 8's sweep: a 508-row prefill in groups of 8 ran out of memory concatenating its
    groups' fp32 logits (2 x 248 MiB beside the waiting hidden states). The engine now writes
    each group's logits into the batch's as they come; the plan counts them once, beside the
    hidden states still waiting, whenever that outgrows a group's layer activations."""
    config = SHAPES["tiny"]
    store = SyntheticStore(config, torch.float32)  # small layers, YaLM's 128,000-word head
    policy = OffloadPolicy(gpu_memory_bytes=parse_bytes("2GiB"), kv_on="gpu")
    grouped = plan(store, policy=policy, batch_size=512, max_context=160, prompt_tokens=128)
    assert 0 < grouped.prefill_rows < 512
    waiting = 512 * 128 * config.hidden_size * 4
    logits = 4 * (512 + 2 * grouped.prefill_rows) * config.vocab_size
    assert grouped.workspace_bytes - grouped.scratch_bytes >= waiting + logits


def test_attention_on_the_host_plans_a_row_major_cache_in_ram_and_predicts_its_race():
    """YaLM-100B in 4 bits under 8 GiB / 64 GiB at the H200's link: with the host attending,
    the cache stays in RAM (row-major) and off the link; fast cores beat moving it, slow ones
    lose to it, as the step model's host term says."""
    from yalm_runner.quant import Quantization

    store = SyntheticStore(SHAPES["yalm-100b"], torch.bfloat16, 0, Quantization("int4", 128))
    moved = replace(BUDGETS, kv_bits=4, weights_on="cpu")
    attended = replace(moved, kv_attention="host")
    rate = {}
    for cores, host in (("slow", 10e9), ("fast", 40e9)):
        rates = StepRates(link_bytes_per_s=55e9, host_attention_elements_per_s=host)
        by_host = plan(store, attended, max_context=256, prompt_tokens=128, rates=rates)
        assert by_host.kv_on == "cpu" and by_host.kv_layout == "rows"
        assert "attended on the host" in by_host.describe()
        assert by_host.decode.kv_in_bytes == 0 and by_host.decode.host_calls == 1
        # RAM: the rows' records, and the step's staging (fp32 q/k/v and output, one layer's
        # new records: 128 heads x 44 bytes, keys and values) as the cache pins it.
        config = store.config
        records = 2 * config.num_heads * 44
        staging = 4 * config.hidden_size * 4 + records
        assert by_host.kv_host_bytes == by_host.batch_size * (by_host.kv_bytes_per_row + staging)
        # The GPU holds no KV between passes: the prefill's two slots at the prompt's length
        # (bf16 keys and values) and their outgoing records are in its workspace alone.
        assert by_host.placement.kv_bytes == 0
        prefill_slots = by_host.batch_size * 128 * (4 * config.hidden_size * 2 + records)
        assert by_host.workspace_bytes - by_host.scratch_bytes >= prefill_slots
        by_link = plan(store, moved, max_context=256, prompt_tokens=128, rates=rates)
        rate[cores] = (
            by_host.batch_size / by_host.predicted_step_s(rates),
            by_link.batch_size / by_link.predicted_step_s(rates),
        )
    assert rate["fast"][0] > rate["fast"][1] and rate["slow"][0] < rate["slow"][1]
