"""The fused 4-bit dequantization kernel against the torch version, on the device, in one run:
bits equal and time per YaLM-100B matrix, then the envelope's workload on a slice of the real
shape (20 of 80 layers, batch 64, 4-bit KV in pinned RAM) with each. Run by device_runs.sh."""

import torch
from triton.testing import do_bench

from yalm_runner import quant
from yalm_runner.bench.envelope import format_envelope, run_envelope
from yalm_runner.bench.synthetic import SHAPES
from yalm_runner.offload import OffloadPolicy, parse_bytes

config = SHAPES["yalm-100b"]
h, f = config.hidden_size, config.ffn_size


def compare(rows: int, cols: int) -> str:
    groups = -(-cols // 128)
    packed = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, device="cuda")
    scales = torch.rand(rows, groups, device="cuda", dtype=torch.float16) * 0.01
    zeros = torch.rand(rows, groups, device="cuda", dtype=torch.float16) * 0.01
    out = torch.empty(rows, cols, dtype=torch.bfloat16, device="cuda")

    def run() -> torch.Tensor:
        return quant.dequantize_int4(packed, scales, zeros, 128, torch.bfloat16, out)

    times, results = {}, {}
    for fused in (False, True):
        quant.USE_FUSED_KERNEL = fused
        times[fused] = do_bench(run)
        results[fused] = run().clone()
    same = torch.equal(results[False], results[True])
    return f"{times[False]:.3f} | {times[True]:.3f} | {times[False] / times[True]:.1f}x | {same} |"


print("| matrix (out x in) | torch ms | fused ms | speed-up | same bits |")
print("|---|---|---|---|---|")
shapes = {
    "query_key_value": (3 * h, h),
    "dense": (h, h),
    "ffn_hidden / gate": (f, h),
    "ffn_output": (h, f),
}
for name, (rows, cols) in shapes.items():
    print(f"| {name} ({rows} x {cols}) | {compare(rows, cols)}", flush=True)
torch.cuda.empty_cache()

policy = OffloadPolicy(
    gpu_memory_bytes=parse_bytes("8GiB"), cpu_memory_bytes=parse_bytes("64GiB"),
    weights_on="cpu", kv_on="auto", kv_bits=4,
)  # fmt: skip
for fused in (False, True):
    quant.USE_FUSED_KERNEL = fused
    print(f"\n## envelope slice, {'fused kernel' if fused else 'torch dequantization'}")
    result = run_envelope(
        "yalm-100b", 20, quant.Quantization("int4", 128), policy, (100, 128), 48, 64, None
    )
    print(format_envelope(result), flush=True)
    torch.cuda.empty_cache()
