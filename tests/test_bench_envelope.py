"""The 100B envelope's synthetic compressed store: the real shape's layout, and a plan that fits."""

from dataclasses import replace

import torch

from yalm_runner.bench.envelope import (
    CompressedSyntheticStore,
    DiskBackedSyntheticStore,
    format_envelope,
    main,
)
from yalm_runner.bench.synthetic import SHAPES
from yalm_runner.checkpoint import stored_specs
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.offload import OffloadPolicy, parse_bytes, plan_placement
from yalm_runner.planning import plan_memory
from yalm_runner.quant import Quantization
from yalm_runner.steptime import StepRates
from yalm_runner.streaming import StreamingWeights, part_bytes_in

ENVELOPE = OffloadPolicy(
    gpu_memory_bytes=parse_bytes("8GiB"),
    cpu_memory_bytes=parse_bytes("64GiB"),
    weights_on="cpu",
    kv_bits=4,
)


def envelope_plan(store, policy: OffloadPolicy, rates: StepRates | None = None):
    """The planner's choice for the envelope's prompts (to 128 tokens, 128 new) on a GPU."""
    return plan_memory(
        store, torch.device("cuda"), torch.bfloat16, policy,
        batch_size=None, max_context=256, prompt_tokens=128, rates=rates,
    )  # fmt: skip


def test_yalm_100b_in_4_bits_fits_the_envelope_with_dozens_of_rows():
    store = CompressedSyntheticStore(SHAPES["yalm-100b"], Quantization("int4", 128), torch.bfloat16)
    layers = sum(info.data_bytes for part, info in store.parts.items() if part.startswith("layer"))
    assert 49 * 2**30 < layers < 51 * 2**30  # ~4.25 bits a weight
    plan = envelope_plan(store, ENVELOPE)
    assert plan.placement.count("cpu") == 80 and plan.kv_on == "cpu"
    assert plan.placement.gpu_total_bytes <= ENVELOPE.gpu_memory_bytes
    assert plan.placement.pinned_bytes + plan.kv_host_bytes <= ENVELOPE.cpu_memory_bytes
    assert plan.batch_size >= 48


def test_synthetic_compressed_layers_run_through_the_engine():
    config = SHAPES["tiny"]
    store = CompressedSyntheticStore(config, Quantization("int4", 16), torch.float32)
    tensors = store.read_part("layer_1")
    specs = stored_specs(config, "layer_1", store.quantization, torch.float32)
    assert {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()} == specs
    placement = plan_placement(part_bytes_in(store, torch.float32), OffloadPolicy(weights_on="cpu"))
    with StreamingWeights(store, "cpu", torch.float32, placement, verify=False) as source:
        done = Engine(source, eos_id=-1).generate(
            [Request("a", (1, 5, 6), 4)], SamplingParams(greedy=True)
        )
    assert len(done[0].new_ids) == 4


def test_layers_written_to_disk_compute_what_the_synthetic_layers_compute(tmp_path):
    """The disk-tier envelope's store: the layers a plan reads from disk become real files, read
    by direct I/O, holding exactly the tensors the generator makes: the same greedy ids."""
    store = DiskBackedSyntheticStore(SHAPES["tiny"], Quantization("int4", 16), torch.float32)
    sizes = part_bytes_in(store, torch.float32)
    roomy = OffloadPolicy(weights_on="cpu")
    in_ram = plan_placement(sizes, roomy, budgets=roomy.budgets_on("cpu"))
    to_disk = OffloadPolicy(weights_on="disk")
    on_disk = plan_placement(sizes, to_disk, budgets=to_disk.budgets_on("cpu"))
    requests = [Request("a", (1, 5, 6, 7), 6), Request("b", (1, 9), 6)]

    def run(placement):
        with StreamingWeights(store, "cpu", torch.float32, placement, verify=False) as source:
            done = Engine(source, eos_id=-1).generate(
                requests, SamplingParams(greedy=True), batch_size=2
            )
            return [d.new_ids for d in done], source.bytes_from_disk, source._direct is not None

    reference, from_disk, _ = run(in_ram)
    assert from_disk == 0
    parts = [part for part, tier in on_disk.tiers.items() if tier == "disk"]
    assert len(parts) == 4
    store.write_layers(tmp_path / "layers", parts)
    files = sorted(path.name for path in (tmp_path / "layers").iterdir())
    assert files == sorted(f"{part}.ytf" for part in parts)
    ids, from_disk, direct = run(on_disk)
    assert ids == reference and direct
    layer_bytes = sum(store.parts[part].data_bytes for part in parts)
    assert from_disk == layer_bytes * 6  # every layer, once a forward (a prefill, five steps)


def test_the_disk_tier_envelope_runs_end_to_end_and_leaves_no_files(tmp_path, capsys):
    """A smoke run on the CPU: the drive measured, layers planned onto it and written, one batch,
    the report's disk line, and the scratch folder gone."""
    main([
        "--shape", "tiny", "--group-size", "16", "--device", "cpu", "--disk-dir", str(tmp_path),
        "--gpu-memory", "800KiB", "--cpu-memory", "150KiB", "--drive-file", "16MiB", "-n", "8",
        "--prompt-len", "8-12", "--rows", "4",
    ])  # fmt: skip
    report = capsys.readouterr().out
    assert "disk tier: 3 layers" in report
    assert "(O_DIRECT)" in report or "(buffered after POSIX_FADV_DONTNEED)" in report
    assert "step predicted at the measured rates" in report
    assert list(tmp_path.iterdir()) == []


def test_the_report_reads_as_a_table():
    result = {
        "shape": "yalm-100b",
        "layers": 80,
        "quantization": {"scheme": "int4", "group_size": 128},
        "kv_bits": 4,
        "pinned_gbps": 55.0,
        "pageable_gbps": 7.0,
        "plan": "batch 56 rows",
        "batch": 56,
        "new_tokens": 128,
        "elapsed_s": 180.0,
        "tokens_per_s": 39.8,
        "texts_per_hour": 1120.0,
        "decode_step_s": 1.3,
        "floor_step_s": 1.2,
        "step_over_floor": 1.08,
        "bytes_per_pass": 66e9,
        "weights_per_pass": 54e9,
        "bf16_layers_bytes": 201e9,
        "peak_gpu_bytes": 7 * 2**30,
        "gpu_budget": 8 * 2**30,
        "pinned_ram_bytes": 63 * 2**30,
        "locked_ram_bytes": 63 * 2**30,
        "cpu_budget": 64 * 2**30,
        "prefill_s": 3.0,
        "decode_s": 177.0,
        "load_s": 40.0,
        "matmul": [{"variant": "bf16 matmul (no compression)", "ms": 0.5}],
    }
    text = format_envelope(result)
    assert "| 56 | 128 | 180.0 s | 39.8 | 1120 | 1300 ms | 1200 ms | 1.08 |" in text
    assert "peak GPU 7.00 GiB of 8.00 GiB (88%)" in text
    assert "63.0 GiB of 64 GiB planned, 63.0 GiB locked" in text


def test_the_envelope_attending_on_the_host_plans_its_pinned_ram_within_the_budget():
    """Session 11's envelope: attention on the host at the H200's measured rates, the planner
    free to keep layers on the GPU and to read some from the drive. Every pinned byte counts
    against the 64 GiB, a disk tier's relays too (the run that left them out locked 65.0 GiB),
    and the spare GPU memory holds layers."""
    store = DiskBackedSyntheticStore(SHAPES["yalm-100b"], Quantization("int4", 128), torch.bfloat16)
    policy = replace(ENVELOPE, weights_on="auto", kv_attention="host")
    rates = StepRates(
        link_bytes_per_s=55.4e9, disk_bytes_per_s=1.78e9, host_attention_elements_per_s=66.7e9
    )
    plan = envelope_plan(store, policy, rates)
    assert plan.kv_attention == "host" and plan.placement.count("gpu") >= 3
    assert plan.placement.gpu_total_bytes <= ENVELOPE.gpu_memory_bytes
    assert plan.placement.pinned_bytes + plan.kv_host_bytes <= ENVELOPE.cpu_memory_bytes
    # Uncounted, the relays let this plan take 82 rows and a layer on disk, 1 GiB over the RAM
    # budget; counted, the disk layer would cost its relays' two layers of RAM too.
    assert plan.placement.count("disk") == 0 and plan.placement.relay_bytes == 0
    assert plan.batch_size >= 72
