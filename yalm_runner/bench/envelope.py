"""The 100B envelope: YaLM-100B's real shape with compressed weights under the user's budgets.

The target machine has an 8 GiB GPU and 64 GiB of RAM. In 16 bits YaLM-100B is ~200 GB, so most
of it would stream from disk every step; in 4-bit groups it is ~57 GB and fits in pinned RAM,
and the link, not the drive, sets the pace. What is left of the RAM holds the KV cache (8- or
4-bit), and that decides how many prompts share each weight transfer.

``run_envelope`` builds a synthetic store of the named shape whose layers are generated straight
into the compressed layout (random codes and scales; no 16-bit copy is ever made), lets the
planner choose the batch and the KV placement from the budgets, and runs one timed batch of
prompts of ~100-128 tokens, 128 new tokens each, under a hard GPU cap. It reports texts per hour,
tokens/s, the decode step against its floor (bytes moved per step over the pinned bandwidth
measured in the same run), peak GPU memory against the budget, and the pinned RAM used. A
micro-benchmark times the ways to multiply by a 4-bit matrix at the run's batch size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from yalm_runner.bench.calibrate import measure_host_attention
from yalm_runner.bench.disk import drop_from_page_cache, measure_drive_read
from yalm_runner.bench.link import measure_h2d
from yalm_runner.bench.synthetic import NO_EOS, SHAPES, SyntheticStore
from yalm_runner.checkpoint import PartInfo
from yalm_runner.config import ModelConfig, SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.offload import OffloadPolicy, parse_bytes
from yalm_runner.pinned import locked_bytes
from yalm_runner.planning import MemoryPlan, plan_memory
from yalm_runner.quant import Quantization, dequantize_matrix, int4_scales_offsets
from yalm_runner.steptime import mean_decode_context
from yalm_runner.streaming import StreamingWeights
from yalm_runner.tensorfile import (
    FileLayout,
    TensorSpec,
    read_into,
    read_layout,
    write_tensor_file,
)


class CompressedSyntheticStore(SyntheticStore):
    """``SyntheticStore`` whose layers are random codes and scales in a compressed layout."""

    def __init__(
        self, config: ModelConfig, quantization: Quantization, dtype: torch.dtype, seed: int = 0
    ):
        super().__init__(config, dtype, seed, quantization)

    def read_part(
        self, part: str, *, buffer: torch.Tensor | None = None, verify: bool = True
    ) -> dict[str, torch.Tensor]:
        if not part.startswith("layer_"):
            return super().read_part(part, buffer=buffer, verify=verify)
        device = self._generator_device
        generator = torch.Generator(device).manual_seed(self._seed + sum(map(ord, part)))
        tensors = {}
        for record in self.parts[part].records:
            name, shape = record.name, record.shape
            if name.endswith(".q"):
                low, high = (-127, 128) if record.dtype == torch.int8 else (0, 256)
                tensor = torch.randint(
                    low, high, shape, dtype=record.dtype, device=device, generator=generator
                )
            elif name.endswith(".scale"):
                cols = (
                    self.config.ffn_size if "dense_ffn_output" in name else self.config.hidden_size
                )
                # Codes spread ~4.6 (4-bit) or ~73 (int8) around zero: weights of std 1/sqrt(K).
                spread = 73.0 if self.quantization.scheme == "int8" else 4.6
                tensor = torch.full(shape, 1.0 / (spread * cols**0.5), device=device)
            elif name.endswith(".zero"):
                tensor = torch.zeros(shape, device=device)
            elif "norm" in name:
                tensor = torch.ones(shape, device=device)
            else:
                tensor = torch.empty(shape, device=device).uniform_(
                    -0.01, 0.01, generator=generator
                )
            tensors[name] = tensor.to(record.dtype).cpu()
        return tensors


class DiskBackedSyntheticStore(CompressedSyntheticStore):
    """``CompressedSyntheticStore`` whose chosen layers are real files: the disk tier reads them
    from the drive by direct I/O, as it reads a converted store's, and every other layer stays
    synthetic (placed in pinned RAM straight from the generator). A file holds exactly the
    tensors ``read_part`` generates for its layer, so both tiers compute the same model."""

    has_files = True  # ``streaming``: disk-tier parts are files in the store format

    def __init__(
        self, config: ModelConfig, quantization: Quantization, dtype: torch.dtype, seed: int = 0
    ):
        super().__init__(config, quantization, dtype, seed)
        self._files: dict[str, FileLayout] = {}

    def write_layers(self, folder: Path, parts: list[str]) -> float:
        """Write ``parts`` into ``folder`` (fsynced, then dropped from the page cache, so that
        reads come from the drive); return the seconds it took."""
        began = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        for part in parts:
            tensors = super().read_part(part)
            path = folder / f"{part}.ytf"
            specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
            write_tensor_file(path, specs, lambda spec, tensors=tensors: tensors[spec.name])
            del tensors
            drop_from_page_cache(path)
            layout = read_layout(path)
            self._files[part] = layout
            records = tuple(sorted(layout.records, key=lambda record: record.begin))
            self.parts[part] = PartInfo(part, path, layout.file_bytes, records)
        return time.perf_counter() - began

    def read_part(
        self, part: str, *, buffer: torch.Tensor | None = None, verify: bool = True
    ) -> dict[str, torch.Tensor]:
        if part not in self._files:
            return super().read_part(part, buffer=buffer, verify=verify)
        layout = self._files[part]
        if buffer is None:
            buffer = torch.empty(layout.file_bytes - layout.data_start, dtype=torch.uint8)
        return read_into(self.parts[part].path, layout, buffer)


def _prompts(
    batch: int, low: int, high: int, new_tokens: int, vocab: int = 128_000
) -> list[Request]:
    span, spread = high - low + 1, min(120_000, vocab - 100)  # ids in 100 .. 100 + spread
    return [
        Request(
            f"text{row}",
            tuple(
                [1]
                + [(row * 7919 + pos * 31) % spread + 100 for pos in range(low + row % span - 1)]
            ),
            new_tokens,
        )
        for row in range(batch)
    ]


def _tinygemm(stored, name, group, x, scratch, quantization) -> dict:
    """torch's own fused int4 matmul (``_weight_int4pack_mm``, tinygemm): it reads the packed
    weights once, without a dequantized copy. Its format is this store's: a value is (code - 8)
    x scale + zero, groups along the input. It wants the output rows in eights, so YaLM's
    27308 are padded to 27312 (zero codes, zero scales), and the packed bytes (N, K/2) with the
    even column in the high nibble, ours in the low. Timed, and its largest error against the
    engine's dequantize-then-matmul printed beside."""
    variant = "torch int4 packed matmul (tinygemm, weights pre-packed)"
    try:
        codes, scales, zeros = (stored[f"{name}.{part}"] for part in ("q", "scale", "zero"))
        pad = -codes.shape[0] % 8
        codes, scales, zeros = (torch.nn.functional.pad(t, (0, 0, 0, pad))
                                for t in (codes, scales, zeros))  # fmt: skip
        swapped = ((codes & 0xF) << 4) | (codes >> 4)
        packed_int = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), 8)
        scales_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        scales_zeros = scales_zeros.to(torch.bfloat16)

        def packed() -> torch.Tensor:
            return torch.ops.aten._weight_int4pack_mm(x, packed_int, group, scales_zeros)

        expected = x @ dequantize_matrix(stored, name, quantization, torch.bfloat16, scratch).T
        got = packed()[:, : expected.shape[1]]
        error = (got.float() - expected.float()).abs().max() / expected.float().abs().max()
        from triton.testing import do_bench

        return {"variant": variant, "ms": do_bench(packed), "max error": float(error)}
    except (RuntimeError, AttributeError) as exc:
        return {"variant": variant, "error": str(exc).splitlines()[0]}


def _dequantize_alone(stored, name, group, scratch) -> list[dict]:
    """The engine's int4 dequantization kernel alone."""
    from triton.testing import do_bench

    from yalm_runner.kernels import fused_int4_dequantize

    codes = stored[f"{name}.q"]
    scales, offsets = int4_scales_offsets(
        stored[f"{name}.scale"], stored[f"{name}.zero"], scratch.dtype
    )
    if fused_int4_dequantize(codes, scales, offsets, group, scratch) is None:
        return [{"variant": "int4 dequantization alone", "error": "the fused kernel is off"}]
    engine_ms = do_bench(lambda: fused_int4_dequantize(codes, scales, offsets, group, scratch))
    return [{"variant": "int4 dequantization alone (the engine's kernel)", "ms": engine_ms}]


def matmul_variants(config: ModelConfig, quantization: Quantization, batch: int) -> list[dict]:
    """Time y = x W^T for the largest matrix at ``batch`` rows: 16-bit, dequantize then
    matmul (what the engine does), and torch's packed int4 matmul where this build has it."""
    from triton.testing import do_bench

    rows, cols = config.ffn_size, config.hidden_size
    name = "mlp.dense_ffn_hidden.weight"
    specs = quantization.stored_specs(name, (rows, cols))
    stored = {}
    for stored_name, (shape, kind) in specs.items():
        if stored_name.endswith(".q"):
            low, high = (-127, 128) if kind == torch.int8 else (0, 256)
            stored[stored_name] = torch.randint(low, high, shape, dtype=kind, device="cuda")
        else:
            stored[stored_name] = torch.full(shape, 0.01, dtype=kind, device="cuda")
    x = torch.randn(batch, cols, dtype=torch.bfloat16, device="cuda")
    dense = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
    scratch = torch.empty(rows, cols, dtype=torch.bfloat16, device="cuda")
    results = [
        {"variant": "bf16 matmul (no compression)", "ms": do_bench(lambda: x @ dense.T)},
        {
            "variant": f"dequantize {quantization.scheme} + bf16 matmul (the engine)",
            "ms": do_bench(
                lambda: x @ dequantize_matrix(stored, name, quantization, torch.bfloat16, scratch).T
            ),
        },
    ]
    if quantization.scheme == "int4":
        results.append(_tinygemm(stored, name, quantization.group_size, x, scratch, quantization))
        results += _dequantize_alone(stored, name, quantization.group_size, scratch)
    gigabytes = sum(t.numel() * t.element_size() for t in stored.values()) / 1e9
    for result in results:
        result["rows x cols"] = f"{batch} x {cols} @ {cols} x {rows}"
        result["stored GB"] = gigabytes
    return results


def run_envelope(
    shape: str,
    layers: int | None,
    quantization: Quantization,
    policy: OffloadPolicy,
    prompt_len: tuple[int, int],
    new_tokens: int,
    rows: int | None,
    json_path: Path | None,
    disk_dir: Path | None = None,
    drive_file_bytes: int = 4 << 30,
    device: str = "cuda",
) -> dict:
    """One timed batch under ``policy``'s budgets. With ``disk_dir`` the planner may put layers
    on the drive there (``policy.weights_on`` "auto" or "disk"): the drive's rate is measured
    first, the plan is made at the measured link and drive rates, and the layers it reads from
    disk are written to real files under ``disk_dir`` (removed afterwards)."""
    config = SHAPES[shape] if layers is None else replace(SHAPES[shape], num_layers=layers)
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    link = measure_h2d() if cuda else {"pinned": float("nan"), "pageable": float("nan")}
    scratch = None if disk_dir is None else Path(tempfile.mkdtemp(prefix="envelope-", dir=disk_dir))
    try:
        rates = policy.rates()  # on a GPU, the link as measured in this run
        rates = replace(rates, link_bytes_per_s=link["pinned"]) if cuda else rates
        drive = None
        if scratch is not None:
            drive = measure_drive_read(scratch / "sequential.bin", drive_file_bytes)
            _log(f"drive: {drive.bytes_per_s / 1e9:.2f} GB/s sequential ({drive.method})")
            rates = replace(rates, disk_bytes_per_s=drive.bytes_per_s)
        store = DiskBackedSyntheticStore(config, quantization, dtype)
        max_context = prompt_len[1] + new_tokens
        if policy.kv_attention == "host":
            # The host's rate decides the plan (how many rows its cores attend over in a
            # layer's time), so it is measured first: at the decode's mean context and the
            # envelope's 64 rows (per element it hardly depends on the rows).
            context = max(1, round(mean_decode_context(prompt_len[1], max_context)))
            rate = measure_host_attention(
                config, policy.kv_bits, rows or 64, context, dtype, streaming=cuda
            )
            rates = replace(rates, host_attention_elements_per_s=rate)
            while_streaming = " while the link streams" if cuda else ""
            _log(
                f"host attention: {rate / 1e9:.1f} G elements/s at {context} positions"
                f"{while_streaming}"
            )
        plan = plan_memory(
            store,
            torch.device("cuda"),  # the plan is a GPU's, also for a smoke run on the CPU
            dtype,
            policy,
            batch_size=rows,
            max_context=max_context,
            prompt_tokens=prompt_len[1],
            rates=rates,
        )
        _log(f"plan: {plan.describe()}")
        on_disk = [part for part, tier in plan.placement.tiers.items() if tier == "disk"]
        write_s = 0.0
        if on_disk:
            assert scratch is not None, "only a run with a disk folder plans layers on disk"
            write_s = store.write_layers(scratch / "layers", on_disk)
            _log(f"{len(on_disk)} layers written to disk in {write_s:.0f} s")
        measured = _timed_batch(store, plan, policy, prompt_len, new_tokens, device, dtype)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    stats, finished, requests = measured["stats"], measured["finished"], measured["requests"]
    assert all(len(done.new_ids) == new_tokens for done in finished)
    passes = stats.forward_passes
    decode_steps = passes - 1
    step_s = stats.decode_s / decode_steps
    moved_per_pass = stats.bytes_moved / passes
    disk_per_pass = measured["from_disk"] / passes
    floor_s = max(
        moved_per_pass / link["pinned"],
        disk_per_pass / drive.bytes_per_s if drive is not None else 0.0,
    )
    elapsed = measured["elapsed_s"]
    new = sum(len(done.new_ids) for done in finished)
    bf16_layer_bytes = sum(config.layer_param_count(i) for i in range(config.num_layers)) * 2
    result = {
        "shape": shape,
        "layers": config.num_layers,
        "quantization": quantization.to_dict(),
        "kv_bits": policy.kv_bits,
        "kv_attention": plan.kv_attention,
        "gpu_budget": policy.gpu_memory_bytes,
        "cpu_budget": policy.cpu_memory_bytes,
        "pinned_gbps": link["pinned"] / 1e9,
        "pageable_gbps": link["pageable"] / 1e9,
        "plan": plan.describe(),
        "batch": plan.batch_size,
        "prompt_tokens": [min(len(r.prompt_ids) for r in requests), prompt_len[1]],
        "new_tokens": new_tokens,
        "elapsed_s": elapsed,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "tokens_per_s": new / elapsed,
        "texts_per_hour": len(finished) * 3600 / elapsed,
        "decode_step_s": step_s,
        "predicted_step_s": plan.predicted_step_s(rates),
        "bytes_per_pass": moved_per_pass,
        "weights_per_pass": measured["weights_moved"] / passes,
        "disk_layers": len(on_disk),
        "disk_bytes_per_pass": disk_per_pass,
        "drive_gbps": drive.bytes_per_s / 1e9 if drive is not None else None,
        "drive_method": drive.method if drive is not None else None,
        "layers_written_s": write_s,
        "floor_step_s": floor_s,
        "step_over_floor": step_s / floor_s,
        "peak_gpu_bytes": measured["peak"],
        "pinned_ram_bytes": plan.placement.pinned_bytes + plan.kv_host_bytes,
        "locked_ram_bytes": measured["locked"],
        "bf16_layers_bytes": bf16_layer_bytes,
        "load_s": measured["load_s"],
        "matmul": matmul_variants(config, quantization, plan.batch_size) if cuda else [],
    }
    print(format_envelope(result))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    return result


def _timed_batch(
    store: CompressedSyntheticStore,
    plan: MemoryPlan,
    policy: OffloadPolicy,
    prompt_len: tuple[int, int],
    new_tokens: int,
    device: str,
    dtype: torch.dtype,
) -> dict:
    """Place the weights, lock the KV memory, warm up, then run one batch of the plan's size."""
    cuda = device == "cuda"
    synchronize = torch.cuda.synchronize if cuda else lambda: None
    began = time.perf_counter()
    with StreamingWeights(store, device, dtype, plan.placement, verify=False) as weights:
        load_s = time.perf_counter() - began
        _log(f"weights placed in {load_s:.0f} s")
        if cuda and policy.gpu_memory_bytes:  # a hard cap: going over is an out-of-memory error
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(policy.gpu_memory_bytes / total)
        engine = Engine.for_plan(weights, plan, policy.kv_bits, eos_id=NO_EOS)
        began = time.perf_counter()
        engine.reserve(plan.batch_size, plan.max_context)
        _log(f"KV memory locked in {time.perf_counter() - began:.1f} s")
        vocab = store.config.vocab_size
        engine.generate(_prompts(1, 8, 8, 2, vocab), SamplingParams(greedy=True), batch_size=1)
        synchronize()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        engine.stats = type(engine.stats)()
        streamed_before, disk_before = weights.bytes_streamed, weights.bytes_from_disk
        requests = _prompts(plan.batch_size, prompt_len[0], prompt_len[1], new_tokens, vocab)
        began = time.perf_counter()
        finished = engine.generate(
            requests, SamplingParams(greedy=True), batch_size=plan.batch_size
        )
        synchronize()
        return {
            "elapsed_s": time.perf_counter() - began,
            "stats": engine.stats,
            "finished": finished,
            "requests": requests,
            "peak": torch.cuda.max_memory_allocated() if cuda else 0,
            "locked": locked_bytes(),  # what the driver really holds page-locked
            "weights_moved": weights.bytes_streamed - streamed_before,
            "from_disk": weights.bytes_from_disk - disk_before,
            "load_s": load_s,
        }


def format_envelope(r: dict) -> str:
    gib = 2**30
    lines = [
        f"YaLM shape {r['shape']} x {r['layers']} layers, {r['quantization']['scheme']} weights"
        f" (group {r['quantization'].get('group_size')}), {r['kv_bits']}-bit KV in pinned RAM"
        + (", attended on the host" if r.get("kv_attention") == "host" else ""),
        f"link: pinned {r['pinned_gbps']:.1f} GB/s, pageable {r['pageable_gbps']:.1f} GB/s",
        f"plan: {r['plan']}",
        "",
        "| batch | new tokens | elapsed | tokens/s | texts/hour | step | floor | step/floor |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['batch']} | {r['new_tokens']} | {r['elapsed_s']:.1f} s | {r['tokens_per_s']:.1f} | "
        f"{r['texts_per_hour']:.0f} | {r['decode_step_s'] * 1e3:.0f} ms | "
        f"{r['floor_step_s'] * 1e3:.0f} ms | {r['step_over_floor']:.2f} |",
        "",
        f"bytes per pass {r['bytes_per_pass'] / 1e9:.2f} GB (weights "
        f"{r['weights_per_pass'] / 1e9:.2f} GB; the 16-bit layers would be "
        f"{r['bf16_layers_bytes'] / 1e9:.1f} GB)",
        *(
            [
                f"disk tier: {r['disk_layers']} layers, {r['disk_bytes_per_pass'] / 1e9:.2f} GB "
                f"read a pass; drive {r['drive_gbps']:.2f} GB/s ({r['drive_method']}); layers "
                f"written in {r['layers_written_s']:.0f} s"
            ]
            if r.get("disk_layers")
            else []
        ),
        *(
            [
                f"step predicted at the measured rates {r['predicted_step_s'] * 1e3:.0f} ms, "
                f"measured {r['decode_step_s'] * 1e3:.0f} ms "
                f"({r['decode_step_s'] / r['predicted_step_s']:.2f}x)"
            ]
            if r.get("predicted_step_s")
            else []
        ),
        f"peak GPU {r['peak_gpu_bytes'] / gib:.2f} GiB of {r['gpu_budget'] / gib:.2f} GiB "
        f"({r['peak_gpu_bytes'] / r['gpu_budget']:.0%}); pinned RAM "
        f"{r['pinned_ram_bytes'] / gib:.1f} GiB of {r['cpu_budget'] / gib:.0f} GiB planned, "
        f"{r['locked_ram_bytes'] / gib:.1f} GiB locked",
        f"prefill {r['prefill_s']:.1f} s, decode {r['decode_s']:.1f} s, weights placed in "
        f"{r['load_s']:.0f} s",
        "",
        "| matmul at the run's batch | ms |",
        "|---|---|",
    ]
    for row in r["matmul"]:
        value = f"{row['ms']:.3f}" if "ms" in row else row.get("error", "")
        if "max error" in row:  # against the engine's dequantize-then-matmul, relative
            value += f" (max error {row['max error']:.1e})"
        lines.append(f"| {row['variant']} | {value} |")
    return "\n".join(lines)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="yalm-100b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--quantize", choices=["int8", "int4"], default="int4")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--gpu-memory", default="8GiB")
    parser.add_argument("--cpu-memory", default="64GiB")
    parser.add_argument("--kv-bits", type=int, choices=[16, 8, 4], default=4)
    parser.add_argument("--prompt-len", default="100-128")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=128)
    parser.add_argument("--rows", type=int, help="batch size (default: the planner's)")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--disk-dir",
        type=Path,
        help="let the planner read layers from the drive holding this folder (weights on auto): "
        "the drive is measured and the chosen layers written there, then removed",
    )
    parser.add_argument("--drive-file", default="4GiB", help="size of the drive's read test")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (no figures)")
    parser.add_argument(
        "--kv-attention",
        choices=["device", "host"],
        default="device",
        help="host: decode attention on the CPU's cores, where the KV cache lies",
    )
    args = parser.parse_args(argv)
    low, _, high = args.prompt_len.partition("-")
    policy = OffloadPolicy(
        gpu_memory_bytes=parse_bytes(args.gpu_memory),
        cpu_memory_bytes=parse_bytes(args.cpu_memory),
        weights_on="auto" if args.disk_dir else "cpu",
        kv_on="auto",
        kv_bits=args.kv_bits,
        kv_attention=args.kv_attention,
    )
    run_envelope(
        args.shape,
        args.layers,
        Quantization(args.quantize, args.group_size),
        policy,
        (int(low), int(high or low)),
        args.max_new_tokens,
        args.rows,
        args.json,
        disk_dir=args.disk_dir,
        drive_file_bytes=parse_bytes(args.drive_file),
        device=args.device,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
