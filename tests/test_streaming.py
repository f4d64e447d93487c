"""The streaming engine: offloaded output equals resident output, and budgets are enforced."""

import math
from dataclasses import replace

import pytest
import torch

from yalm_runner import hostattn
from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import SamplingParams
from yalm_runner.convert import convert_release
from yalm_runner.engine import Engine, Request
from yalm_runner.errors import ConfigError, OffloadError
from yalm_runner.kvcache import HostAttentionKV
from yalm_runner.kvformat import kv_record_shape
from yalm_runner.offload import (
    RELAY_SLACK,
    OffloadPolicy,
    Placement,
    QuantizedResidentWeights,
    ResidentWeights,
    parse_bytes,
    plan_placement,
    spread_disk_layers,
)
from yalm_runner.quant import Quantization
from yalm_runner.streaming import StreamingWeights, open_weights, part_bytes_in

GREEDY = SamplingParams(greedy=True)
MIXED = [
    Request("short", (1, 7), 9),
    Request("long", tuple([1, *range(200, 230)]), 6),
    Request("mid", (1, 40, 41, 42, 43, 44), 12),
]


def ids(weights, requests=MIXED, sampling=GREEDY, kv_on="gpu", kv_bits=16, kv_layout="rows"):
    engine = Engine(weights, kv_on=kv_on, kv_bits=kv_bits, kv_layout=kv_layout)
    return [row.new_ids for row in engine.generate(requests, sampling, batch_size=8)]


@pytest.fixture(scope="module")
def store(tiny_store):
    return ModelStore.open(tiny_store)


@pytest.fixture(scope="module")
def resident_ids(store):
    return ids(ResidentWeights(store, "cpu", torch.float32))


def test_disk_streaming_on_cpu_equals_resident(store, resident_ids):
    with open_weights(store, "cpu", torch.float32, OffloadPolicy(weights_on="disk")) as weights:
        assert weights.placement.count("disk") == store.config.num_layers
        assert ids(weights) == resident_ids
        assert weights.bytes_from_disk > 0
        # The reader clocks its reads, so a run can say what rate the drive gave it.
        assert 0 < weights.disk_read_s < 60


def test_kv_cache_in_host_ram_equals_kv_on_the_device(store, resident_ids):
    # Rows of MIXED finish at different steps, so the host cache's row map shrinks mid-batch.
    with open_weights(store, "cpu", torch.float32, OffloadPolicy(weights_on="disk")) as weights:
        assert ids(weights, kv_on="cpu") == resident_ids


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compressed_layers_stream_to_the_same_ids_as_resident_compressed(
    tiny_release, tmp_path, scheme
):
    compressed = ModelStore.open(
        convert_release(
            tiny_release,
            tmp_path / scheme,
            num_heads=4,
            quantization=Quantization(scheme, group_size=16),
        ).parent
    )
    expected = ids(QuantizedResidentWeights(compressed, "cpu", torch.float32))
    sizes = part_bytes_in(compressed, torch.float32)
    # Codes travel as stored: a compressed layer streams fewer bytes than its fp32 form.
    assert sizes["layer_1"] == compressed.parts["layer_1"].data_bytes
    for weights_on in ("disk", "cpu"):
        policy = OffloadPolicy(weights_on=weights_on)
        with open_weights(compressed, "cpu", torch.float32, policy) as weights:
            assert ids(weights) == expected
            assert ids(weights, kv_on="cpu") == expected


def test_8_bit_host_kv_stays_close_to_16_bit_and_moves_half_the_bytes(store, resident_ids):
    from yalm_runner.kvcache import HostKV
    from yalm_runner.kvformat import decode_kv, encode_kv

    values = torch.randn(3, 5, 4, 16) * torch.logspace(-2, 2, 16)  # spread magnitudes
    for bits in (8, 4):
        record = encode_kv(values, bits)
        restored = torch.empty_like(values)
        decode_kv(record, bits, restored)
        codes = 16 if bits == 8 else 8
        step = record[..., codes : codes + 4].view(torch.float32)  # one code step per head
        assert ((restored - values).abs() <= step / 2 + 1e-5).all()  # half a step at most
        # Every record is its codes and scales: 16 + 4 (8-bit) or 8 + 4 + 4 (4-bit) bytes.
        assert record.dtype == torch.uint8 and record.shape[-1] == {8: 20, 4: 16}[bits]
        # Slices of a record decode like the whole (what the engine does, 16 rows at a time).
        part = torch.empty_like(values[:2])
        decode_kv(record[:2], bits, part)
        assert torch.equal(part, restored[:2])

    moved = {}
    for bits in (16, 8, 4):
        with open_weights(store, "cpu", torch.float32, OffloadPolicy()) as weights:
            engine = Engine(weights, kv_on="cpu", kv_bits=bits)
            got = [row.new_ids for row in engine.generate(MIXED, GREEDY, batch_size=8)]
            moved[bits] = engine.stats.bytes_moved
        if bits == 16:
            assert got == resident_ids
        else:
            # A random tiny model's logits are nearly flat, so one flipped argmax sends a row
            # elsewhere; the prompt's keys (quantized from step 1 on) still lead the same way.
            assert [row[:2] for row in got] == [row[:2] for row in resident_ids]
    # fp32 values become a byte (or half) plus fp32 scales per 16-value head: the scales weigh
    # much here; at YaLM's 80-value heads in bf16 8 and 4 bits take 51% and 28% of 16.
    assert moved[8] < 0.4 * moved[16] and moved[4] < moved[8]
    with pytest.raises(ValueError, match="KV bits must be one of"):
        HostKV(store.config, 1, 4, torch.device("cpu"), torch.float32, bits=2)


@pytest.mark.skipif(not hostattn.available(), reason=f"{hostattn.unavailable_reason()}")
def test_attention_on_the_host_holds_device_slots_for_the_prefill_alone(store):
    """Nothing on the device until a prefill; then two slots of the prompt's length and their
    outgoing records, no incoming staging (a prefill from slot 0 fetches nothing); none from
    the first decode step on. A batch resumed from its records never takes them."""
    config, batch, prompt = store.config, 3, 10
    heads, dim = config.num_heads, config.head_dim
    kv = HostAttentionKV(config, batch, 40, torch.device("cpu"), torch.float32, bits=4,
                         prefill_slots=prompt)  # fmt: skip
    assert kv.device_bytes == 0
    generator = torch.Generator().manual_seed(0)
    for layer_idx in range(config.num_layers):
        keys, values = kv.layer(layer_idx, 0)
        assert keys.shape == (batch, prompt, heads, dim)
        keys.copy_(torch.randn(keys.shape, generator=generator))
        values.copy_(torch.randn(values.shape, generator=generator))
        kv.stored(layer_idx, 0, prompt)
    record = kv_record_shape(4, (batch, prompt, heads, dim), torch.float32)[0]
    slots = 2 * 2 * batch * prompt * heads * dim * 4
    assert kv.device_bytes == slots + 2 * 2 * math.prod(record)
    step = [torch.randn(batch, 1, heads, dim, generator=generator) for _ in range(3)]
    valid = torch.ones(batch, prompt, dtype=torch.bool)
    kv.attend(0, prompt, *step, valid)
    assert kv.device_bytes == 0
    with pytest.raises(ValueError, match="from slot 0 only"):
        kv.layer(0, prompt + 1)
    resumed = HostAttentionKV(config, batch, 40, torch.device("cpu"), torch.float32, bits=4)
    resumed.load(0, list(range(batch)), 0, *kv.records(0, 0, prompt + 1))
    resumed.attend(0, prompt + 1, *step, torch.ones(batch, prompt + 1, dtype=torch.bool))
    assert resumed.device_bytes == 0


@pytest.mark.skipif(not hostattn.available(), reason=f"{hostattn.unavailable_reason()}")
@pytest.mark.parametrize("bits", [8, 4])
def test_attention_on_the_host_gives_the_pinned_caches_ids_and_moves_no_cache(store, bits):
    # The same records (encoded the same way), attended on the host in fp32 instead of
    # expanded on the compute device: the sums' order differs, the ids do not.
    with open_weights(store, "cpu", torch.float32, OffloadPolicy(weights_on="disk")) as weights:
        kv_moved = {}
        for attention in ("device", "host"):
            engine = Engine(weights, kv_on="cpu", kv_bits=bits, kv_attention=attention)
            before = weights.bytes_streamed
            got = [row.new_ids for row in engine.generate(MIXED, GREEDY, batch_size=8)]
            kv_moved[attention] = engine.stats.bytes_moved - (weights.bytes_streamed - before)
            if attention == "device":
                expected = got
        assert "attention on the host" in engine.arithmetic["KV cache"]
        assert got == expected
        # The cache crosses nothing: a decode step moves its q/k/v, the new slot's records
        # and the output; the device path moves every old slot too.
        assert kv_moved["host"] < 0.6 * kv_moved["device"], kv_moved
        # Sampling (rows finishing at different steps, a seed) agrees too.
        sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
        assert Engine(weights, kv_on="cpu", kv_bits=bits, kv_attention="host").generate(
            MIXED, sampled, batch_size=2
        ) == Engine(weights, kv_on="cpu", kv_bits=bits).generate(MIXED, sampled, batch_size=2)


def test_attention_on_the_host_is_refused_without_a_compressed_cache_in_ram(store):
    from yalm_runner.errors import ConfigError, GenerationError

    with open_weights(store, "cpu", torch.float32, OffloadPolicy()) as weights:
        for kv_on, bits in (("gpu", 16), ("cpu", 16)):
            with pytest.raises(GenerationError, match="8 or 4 bits"):
                Engine(weights, kv_on=kv_on, kv_bits=bits, kv_attention="host")
    with pytest.raises(ConfigError, match="kv_attention"):
        OffloadPolicy(kv_on="cpu", kv_bits=16, kv_attention="host")


@pytest.mark.parametrize("prefill_rows", [0, 2])
def test_a_slot_major_host_cache_gives_the_same_ids(store, resident_ids, prefill_rows):
    # Rows finish at different steps: the layout is compacted once two of three are live.
    with open_weights(store, "cpu", torch.float32, OffloadPolicy(weights_on="disk")) as weights:
        engine = Engine(weights, kv_on="cpu", kv_layout="slots", prefill_rows=prefill_rows)
        got = [row.new_ids for row in engine.generate(MIXED, GREEDY, batch_size=8)]
        assert got == resident_ids
        rows_engine = Engine(weights, kv_on="cpu", prefill_rows=prefill_rows)
        rows_engine.generate(MIXED, GREEDY, batch_size=8)
        for bits in (8, 4):  # the same compressed values as the row-major cache
            by_rows = Engine(weights, kv_on="cpu", kv_bits=bits, prefill_rows=prefill_rows)
            by_slots = Engine(
                weights, kv_on="cpu", kv_bits=bits, kv_layout="slots", prefill_rows=prefill_rows
            )
            assert by_slots.generate(MIXED, GREEDY, batch_size=8) == by_rows.generate(
                MIXED, GREEDY, batch_size=8
            )


def test_a_slot_major_host_cache_survives_rows_finishing_out_of_order(store):
    # Of eight rows, row 2 finishes first (a gap: the new slots are scattered around it), then
    # rows 5 and 0 (fewer than 3/4 live: the layout is compacted), then the rest.
    lengths = [5, 9, 3, 9, 8, 4, 9, 7]
    requests = [Request(f"r{n}", (1, 50 + n, 60 + n), size) for n, size in enumerate(lengths)]
    with open_weights(store, "cpu", torch.float32, OffloadPolicy()) as weights:
        expected = Engine(weights).generate(requests, GREEDY, batch_size=8)
        for bits in (16, 8, 4):
            by_slots = Engine(weights, kv_on="cpu", kv_layout="slots", kv_bits=bits)
            got = by_slots.generate(requests, GREEDY, batch_size=8)
            if bits == 16:
                assert got == expected
            else:
                by_rows = Engine(weights, kv_on="cpu", kv_bits=bits)
                assert got == by_rows.generate(requests, GREEDY, batch_size=8)


def test_a_prefill_in_chunks_of_rows_gives_the_same_ids(store, resident_ids):
    with open_weights(store, "cpu", torch.float32, OffloadPolicy(weights_on="disk")) as weights:
        for kv_on in ("gpu", "cpu"):
            engine = Engine(weights, kv_on=kv_on, prefill_rows=2)
            got = [row.new_ids for row in engine.generate(MIXED, GREEDY, batch_size=8)]
            assert got == resident_ids
            # Three rows in groups of two, layer by layer: one prefill pass over the weights,
            # then one pass per decode step.
            assert engine.stats.forward_passes == max(len(ids) for ids in got)


def test_a_grouped_prefill_loads_each_layer_once(store, resident_ids):
    policy = OffloadPolicy(weights_on="disk")
    with open_weights(store, "cpu", torch.float32, policy) as weights:
        per_pass = weights.placement.streamed_bytes_per_pass
        for kv_on, layout in (("gpu", "rows"), ("cpu", "rows"), ("cpu", "slots")):
            before = weights.bytes_streamed
            engine = Engine(weights, kv_on=kv_on, kv_layout=layout, prefill_rows=1)
            got = [row.new_ids for row in engine.generate(MIXED, GREEDY, batch_size=8)]
            assert got == resident_ids
            # Three groups of one row: still one pass over the weights for the prefill.
            passes = max(len(ids) for ids in got)
            assert weights.bytes_streamed - before == passes * per_pass


@pytest.mark.parametrize("layout", ["rows", "slots"])
@pytest.mark.parametrize("bits", [16, 8])
def test_the_pinned_kv_memory_is_kept_across_batches_and_leaks_nothing(store, layout, bits):
    # A second batch, smaller and with other prompts, runs in the memory the first one left
    # (the engine locks pinned RAM once) and gives the ids a fresh engine gives it.
    first = [Request(f"a{n}", tuple([1, *range(300 + n, 330 + n)]), 7) for n in range(5)]
    second = [Request("b0", (1, 9, 8), 5), Request("b1", (1, 70, 71, 72), 11)]
    with open_weights(store, "cpu", torch.float32, OffloadPolicy()) as weights:
        engine = Engine(weights, kv_on="cpu", kv_bits=bits, kv_layout=layout)
        engine.reserve(len(first), 31 + 7)
        buffers = [id(buffer) for pair in engine._arena._buffers for buffer in pair]
        engine.generate(first, GREEDY, batch_size=8)
        again = engine.generate(second, GREEDY, batch_size=8)
        assert [id(b) for pair in engine._arena._buffers for b in pair] == buffers  # not re-made
        fresh = Engine(weights, kv_on="cpu", kv_bits=bits, kv_layout=layout)
        assert again == fresh.generate(second, GREEDY, batch_size=8)


# Layers of 100 kB: a disk tier's two pinned relays (a layer and a direct read's slack each)
# come to ~2.25 layers of the pinned budget.
LAYER = 100_000
FIXED = {"embedding": 10_000, "head": 5_000}
RELAYS = 2 * (LAYER + RELAY_SLACK)


def test_budgets_fill_gpu_then_pinned_ram_then_disk():
    sizes = {**FIXED, **{f"layer_{n}": LAYER for n in range(6)}}
    # GPU: 15 kB fixed + 2 stream buffers + one resident layer; RAM: two layers and the relays.
    policy = OffloadPolicy(gpu_memory_bytes=15_000 + 3 * LAYER, cpu_memory_bytes=2 * LAYER + RELAYS)
    placement = plan_placement(sizes, policy, kv_bytes=0)
    assert [placement.count(tier) for tier in ("gpu", "cpu", "disk")] == [1, 2, 3]
    assert placement.gpu_total_bytes <= policy.gpu_memory_bytes
    assert placement.relay_bytes == RELAYS
    assert placement.pinned_bytes == 2 * LAYER + RELAYS <= policy.cpu_memory_bytes
    assert placement.streamed_bytes_per_pass == 5 * LAYER
    assert placement.disk_bytes_per_pass == 3 * LAYER
    everything = plan_placement(sizes, OffloadPolicy(gpu_memory_bytes=10**7))
    assert everything.count("gpu") == 6 and everything.stream_buffer_bytes == 0
    assert everything.relay_bytes == 0


def test_the_disk_relays_take_pinned_ram_that_layers_would_have_taken():
    """A budget that holds four of the five streamed layers: the fifth goes to disk, so its
    relays must be pinned too, and they push two more layers to disk (the 100B envelope locked
    65.0 GiB under a 64 GiB budget when they were not counted)."""
    sizes = {**FIXED, **{f"layer_{n}": LAYER for n in range(6)}}
    policy = OffloadPolicy(gpu_memory_bytes=15_000 + 3 * LAYER, cpu_memory_bytes=4 * LAYER + 1)
    placement = plan_placement(sizes, policy)
    assert [placement.count(tier) for tier in ("gpu", "cpu", "disk")] == [1, 1, 4]
    assert placement.pinned_bytes == LAYER + RELAYS <= policy.cpu_memory_bytes
    # Two GPUs share the pinned layers; each streams through relays of its own.
    twelve = {**FIXED, **{f"layer_{n}": LAYER for n in range(12)}}
    shared = replace(policy, cpu_memory_bytes=2 * LAYER + 2 * RELAYS)
    pair = plan_placement(twelve, shared, sources=2)
    assert [pair.count(tier) for tier in ("gpu", "cpu", "disk")] == [1, 2, 9]
    assert pair.relay_bytes == 2 * RELAYS and pair.pinned_bytes == 2 * LAYER + 2 * RELAYS
    no_room = OffloadPolicy(gpu_memory_bytes=15_000 + 3 * LAYER, cpu_memory_bytes=LAYER)
    with pytest.raises(OffloadError, match=r"two pinned relays of .* over the CPU budget"):
        plan_placement(sizes, no_room)


def test_disk_layers_are_spread_among_the_others_within_the_same_budgets():
    # The greedy fill gives gpu, cpu, cpu, disk, disk, disk; the drive would idle while the first
    # three run. Spread: a disk layer every other place, the rest in their order.
    sizes = {**FIXED, **{f"layer_{n}": LAYER for n in range(6)}}
    policy = OffloadPolicy(gpu_memory_bytes=15_000 + 3 * LAYER, cpu_memory_bytes=2 * LAYER + RELAYS)
    placement = plan_placement(sizes, policy)
    layers = [placement.tiers[f"layer_{n}"] for n in range(6)]
    assert layers == ["gpu", "disk", "cpu", "disk", "cpu", "disk"]
    assert (placement.gpu_weight_bytes, placement.cpu_weight_bytes) == (15_000 + LAYER, 2 * LAYER)
    assert placement.disk_bytes_per_pass == 3 * LAYER
    # A CPU-only plan: layers resident in RAM, the rest on disk, spread the same way.
    policy = OffloadPolicy(cpu_memory_bytes=15_000 + 2 * LAYER + 3 * LAYER)
    on_cpu = plan_placement(sizes, policy, budgets=policy.budgets_on("cpu"))
    assert [on_cpu.tiers[f"layer_{n}"] for n in range(6)] == ["gpu", "disk"] * 3


def test_a_spread_that_would_break_a_budget_keeps_the_greedy_order():
    # Layer 4 is larger: spread, it would land in pinned RAM beside layer 1 (2.2 layers > 2).
    sizes = {**FIXED, **{f"layer_{n}": LAYER for n in range(6)}, "layer_4": 120_000}
    relays = 2 * (120_000 + RELAY_SLACK)
    policy = OffloadPolicy(gpu_memory_bytes=15_000 + 240_000, cpu_memory_bytes=2 * LAYER + relays)
    placement = plan_placement(sizes, policy)
    assert [placement.tiers[f"layer_{n}"] for n in range(6)] == ["cpu"] * 2 + ["disk"] * 4
    assert placement.cpu_weight_bytes == 2 * LAYER


def test_a_spread_placement_gives_the_resident_ids(store, resident_ids):
    # The greedy order cpu, disk, disk spread: the pinned layer runs between the two disk ones.
    # (The planner makes such a mix only with three or more layers on disk: its relays take two
    # layers' pinned RAM, so this three-layer store is placed by hand.)
    sizes = part_bytes_in(store, torch.float32)
    layers = [f"layer_{n}" for n in range(3)]
    spread = spread_disk_layers(["cpu", "disk", "disk"], layers)
    assert [spread[layer] for layer in layers] == ["disk", "cpu", "disk"]
    tiers = {"embedding": "gpu", "head": "gpu", **spread}
    placement = Placement(tiers, 0, 0, 0, 0, sizes["layer_1"], 0, 0)
    with StreamingWeights(store, "cpu", torch.float32, placement) as weights:
        assert ids(weights) == resident_ids


def test_mixed_tiers_and_no_overlap_equal_resident(store, resident_ids):
    sizes = part_bytes_in(store, torch.float32)
    tiers = {
        "embedding": "gpu",
        "head": "gpu",
        "layer_0": "disk",
        "layer_1": "gpu",
        "layer_2": "cpu",
    }
    placement = Placement(tiers, 0, 0, 0, 0, sizes["layer_2"], 0, 0)
    for overlap in (True, False):
        with StreamingWeights(store, "cpu", torch.float32, placement, overlap=overlap) as weights:
            assert ids(weights) == resident_ids


def test_bf16_store_streams_into_fp32_compute(tiny_release, tmp_path):
    bf16 = ModelStore.open(
        convert_release(tiny_release, tmp_path / "bf16", num_heads=4, dtype=torch.bfloat16).parent
    )
    expected = ids(ResidentWeights(bf16, "cpu", torch.float32))
    with open_weights(bf16, "cpu", torch.float32, OffloadPolicy(weights_on="disk")) as weights:
        assert ids(weights) == expected
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    with open_weights(bf16, "cpu", torch.float32, OffloadPolicy(weights_on="cpu")) as weights:
        assert ids(weights, sampling=sampled) == ids(
            ResidentWeights(bf16, "cpu", torch.float32), sampling=sampled
        )


def test_a_corrupt_layer_on_disk_is_named_when_streamed(tiny_store, tmp_path):
    import shutil

    from yalm_runner.errors import CheckpointError
    from yalm_runner.tensorfile import read_layout

    copy = tmp_path / "store"
    shutil.copytree(tiny_store, copy)
    path = copy / "layers/layer_002.safetensors"
    data = bytearray(path.read_bytes())
    data[read_layout(path).data_start + 10] ^= 0x55
    path.write_bytes(bytes(data))
    policy = OffloadPolicy(weights_on="disk")
    with (
        open_weights(ModelStore.open(copy), "cpu", torch.float32, policy) as weights,
        pytest.raises(CheckpointError, match=r"layer_002\.safetensors: checksum mismatch"),
    ):
        ids(weights)


def test_budget_errors_carry_the_numbers(store):
    sizes = part_bytes_in(store, torch.float32)
    with pytest.raises(OffloadError, match=r"GPU budget 1\.00 KiB cannot hold the minimum"):
        plan_placement(sizes, OffloadPolicy(gpu_memory_bytes=1024))
    with pytest.raises(OffloadError, match=r"weights on the GPU need .* budget is"):
        plan_placement(sizes, OffloadPolicy(gpu_memory_bytes=4096, weights_on="gpu"))
    with pytest.raises(OffloadError, match="--weights-on cpu needs"):
        plan_placement(sizes, OffloadPolicy(cpu_memory_bytes=10, weights_on="cpu"))


def test_sizes_parse_in_both_unit_systems():
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    with pytest.raises(ConfigError, match="8 gigs"):
        parse_bytes("8 gigs")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_streaming_on_gpu_equals_resident_in_bf16(tiny_release, tmp_path):
    bf16 = ModelStore.open(
        convert_release(tiny_release, tmp_path / "bf16", num_heads=4, dtype=torch.bfloat16).parent
    )
    expected = ids(ResidentWeights(bf16, "cuda", torch.bfloat16))
    for weights_on in ("cpu", "disk"):
        policy = OffloadPolicy(weights_on=weights_on)
        with open_weights(bf16, "cuda", torch.bfloat16, policy) as weights:
            assert ids(weights) == expected
            assert ids(weights, kv_on="cpu") == expected
            eight = ids(weights, kv_on="cpu", kv_bits=8)
            assert [row[:2] for row in eight] == [row[:2] for row in expected]
            assert ids(weights, kv_on="cpu", kv_layout="slots") == expected
            assert ids(weights, kv_on="cpu", kv_bits=8, kv_layout="slots") == eight


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not hostattn.available(), reason=f"{hostattn.unavailable_reason()}")
def test_attention_on_the_host_gives_the_device_paths_ids_on_a_gpu(tiny_release, tmp_path):
    # In fp32 both paths add the same values in another order: the greedy ids are equal. In
    # bf16 the device path rounds its scores and probabilities to bf16 and the host keeps
    # fp32, so on this flat random model a near tie may go the other way (session 9: one row,
    # at its fifth token, 8 bits): the first two tokens of every row agree, as the 8-bit
    # cache's do with the 16-bit one (``test_pinned_streaming_on_gpu_equals_resident_in_bf16``).
    for dtype in (torch.float32, torch.bfloat16):
        converted = ModelStore.open(
            convert_release(tiny_release, tmp_path / str(dtype), num_heads=4, dtype=dtype).parent
        )
        policy = OffloadPolicy(weights_on="cpu")
        with open_weights(converted, "cuda", dtype, policy) as weights:
            for bits in (8, 4):
                expected = ids(weights, kv_on="cpu", kv_bits=bits)
                engine = Engine(weights, kv_on="cpu", kv_bits=bits, kv_attention="host")
                got = [row.new_ids for row in engine.generate(MIXED, GREEDY, batch_size=8)]
                if dtype == torch.float32:
                    assert got == expected, bits
                else:
                    assert [row[:2] for row in got] == [row[:2] for row in expected], bits


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_spread_placement_on_gpu_equals_resident_in_bf16(tiny_release, tmp_path):
    # Disk, pinned, disk: each disk layer's copy waits for its read, the pinned one between them
    # goes early on the copy stream; the pinned KV cache keeps its own stream (a disk tier).
    bf16 = ModelStore.open(
        convert_release(tiny_release, tmp_path / "bf16", num_heads=4, dtype=torch.bfloat16).parent
    )
    expected = ids(ResidentWeights(bf16, "cuda", torch.bfloat16))
    sizes = part_bytes_in(bf16, torch.bfloat16)
    layer = max(sizes[f"layer_{n}"] for n in range(3))
    policy = OffloadPolicy(
        gpu_memory_bytes=sizes["embedding"] + sizes["head"] + 2 * layer, cpu_memory_bytes=layer
    )
    placement = plan_placement(sizes, policy)
    assert [placement.tiers[f"layer_{n}"] for n in range(3)] == ["disk", "cpu", "disk"]
    with StreamingWeights(bf16, "cuda", torch.bfloat16, placement) as weights:
        assert weights.copy_stream is None
        assert ids(weights) == expected
        assert ids(weights, kv_on="cpu") == expected
        assert ids(weights, kv_on="cpu", kv_layout="slots") == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deeper_prefetch_on_gpu_gives_the_same_ids_as_double_buffering(tiny_release, tmp_path):
    bf16 = ModelStore.open(
        convert_release(tiny_release, tmp_path / "bf16", num_heads=4, dtype=torch.bfloat16).parent
    )
    expected = ids(ResidentWeights(bf16, "cuda", torch.bfloat16))
    placement = plan_placement(part_bytes_in(bf16, torch.bfloat16), OffloadPolicy(weights_on="cpu"))
    for buffers in (3, 4):
        with StreamingWeights(bf16, "cuda", torch.bfloat16, placement, buffers=buffers) as weights:
            assert len(weights._slots) == buffers
            assert ids(weights) == expected
            assert ids(weights, kv_on="cpu", kv_layout="slots") == expected


def test_streaming_refuses_fewer_than_two_buffers(tiny_release, tmp_path):
    bf16 = ModelStore.open(convert_release(tiny_release, tmp_path / "bf16", num_heads=4).parent)
    placement = plan_placement(part_bytes_in(bf16, torch.float32), OffloadPolicy(weights_on="cpu"))
    with pytest.raises(ValueError, match="at least 2 device buffers, got 1"):
        StreamingWeights(bf16, "cpu", torch.float32, placement, buffers=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compressed_streaming_on_gpu_equals_resident_compressed(tiny_release, tmp_path):
    for scheme in ("int8", "int4"):
        compressed = ModelStore.open(
            convert_release(
                tiny_release,
                tmp_path / scheme,
                num_heads=4,
                dtype=torch.bfloat16,
                quantization=Quantization(scheme, group_size=16),
            ).parent
        )
        expected = ids(QuantizedResidentWeights(compressed, "cuda", torch.bfloat16))
        for weights_on in ("cpu", "disk"):
            policy = OffloadPolicy(weights_on=weights_on)
            with open_weights(compressed, "cuda", torch.bfloat16, policy) as weights:
                assert ids(weights) == expected
                assert ids(weights, kv_on="cpu") == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_memory_is_locked_at_its_exact_size_and_released(store):
    import gc

    from yalm_runner.pinned import locked_bytes, pinned_empty

    before = locked_bytes()
    odd = 669 * 2**20 + 12345  # torch's own pinned allocator would lock 1 GiB for this
    buffer = pinned_empty(odd, torch.uint8, pin=True, what="test")
    assert buffer.is_pinned() and buffer.numel() == odd
    assert locked_bytes() - before == odd
    on_gpu = torch.arange(odd, device="cuda", dtype=torch.uint8)
    view = buffer[1000:]
    view.copy_(on_gpu[1000:], non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(buffer[1000:2000].cuda(), on_gpu[1000:2000])
    del buffer
    gc.collect()
    assert locked_bytes() - before == odd  # a view still holds it
    del view
    gc.collect()
    assert locked_bytes() == before
    with open_weights(store, "cuda", torch.float32, OffloadPolicy(weights_on="cpu")) as weights:
        layers = weights.placement.cpu_weight_bytes
        assert locked_bytes() - before == sum(t.numel() for t in weights._pinned.values())
        assert locked_bytes() - before >= layers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_fused_kv_kernel_gives_the_torch_versions_bits(monkeypatch):
    """``kvformat.decode_kv`` on CUDA runs the fused kernel; it must give torch's bits for both
    widths and 16-bit dtypes, in the layouts the caches hand it: a whole cache, a row-major slice
    (rows and slots strided), and a slot-major staging area seen row-major (transposed). YaLM's
    head size (80: 40 code bytes a 4-bit record) and a tiny one; enough bytes to span programs."""
    from yalm_runner import kvformat
    from yalm_runner.kernels import fused_kv_available, fused_kv_decode

    assert fused_kv_available(), "Triton should be there on a CUDA machine"
    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float16):
        for bits in (4, 8):
            for rows, slots, heads, head_dim in ((6, 40, 128, 80), (3, 7, 4, 16)):
                values = torch.randn(rows, slots, heads, head_dim, generator=generator) * 3
                record = kvformat.encode_kv(values.to(dtype).cuda(), bits)
                staged = record.transpose(0, 1).contiguous().transpose(0, 1)
                cases = [
                    (record, torch.empty(rows, slots, heads, head_dim)),
                    (record[1:4, : slots - 2], torch.zeros(rows, slots + 3, heads, head_dim)),
                    (staged[:, : slots - 1], torch.zeros(rows, slots, heads, head_dim)),
                ]
                for case, (source, frame) in enumerate(cases):
                    frame = frame.to(dtype).cuda()
                    fused = frame[: source.shape[0], : source.shape[1]]
                    plain = fused.clone()
                    assert fused_kv_decode(source, bits, fused) is not None  # it took them
                    monkeypatch.setattr(kvformat, "USE_FUSED_KERNEL", False)
                    kvformat.decode_kv(source, bits, plain)
                    monkeypatch.setattr(kvformat, "USE_FUSED_KERNEL", True)
                    same = torch.equal(fused.view(torch.int16), plain.view(torch.int16))
                    assert same, (dtype, bits, rows, slots, heads, head_dim, case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_fused_kv_kernel_that_gives_other_bits_is_refused_on_first_use(monkeypatch):
    """The first fused expansion of a width and dtype is checked against torch's; a kernel that
    disagrees (a Triton or driver that rounds otherwise) is dropped with a warning and the
    values come from torch."""
    from yalm_runner import kernels, kvformat

    def wrong(record, bits, out):
        out.zero_()
        return out

    monkeypatch.setattr(kvformat, "fused_kv_decode", wrong)
    monkeypatch.setattr(kvformat, "_checked", set())
    monkeypatch.setitem(kernels._kv_state, "refused", "")
    values = torch.randn(2, 5, 4, 16, generator=torch.Generator().manual_seed(1)) + 3
    record = kvformat.encode_kv(values.to(torch.bfloat16).cuda(), 4)
    out = torch.empty(2, 5, 4, 16, dtype=torch.bfloat16, device="cuda")
    with pytest.warns(UserWarning, match="fused KV kernel is not used .* 4-bit bfloat16 values"):
        kvformat.decode_kv(record, 4, out)
    monkeypatch.setattr(kvformat, "USE_FUSED_KERNEL", False)
    expected = torch.empty_like(out)
    kvformat.decode_kv(record, 4, expected)
    assert torch.equal(out, expected) and not kernels.fused_kv_available()
