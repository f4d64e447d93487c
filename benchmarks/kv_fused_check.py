"""The fused KV kernel against torch's expansion, on the device, in one run (device_runs.sh
kv-fused): first the codec alone, through the caches' own code (``bench.calibrate``: one layer's
expansion of its old slots and encoding of its new one), in elements a second, for the widths,
layouts and batches the issue's configurations use; then the 13B shape with int4 g64 weights
and 4-bit KV at the planner's batch (the configuration the codec bound: 1.56x its floor), one
batch with each, the same weights placed once per run.

    python benchmarks/kv_fused_check.py
"""

import torch

from yalm_runner import kvformat
from yalm_runner.bench.calibrate import measure_kv_codec
from yalm_runner.bench.envelope import run_envelope
from yalm_runner.bench.synthetic import SHAPES
from yalm_runner.offload import OffloadPolicy, parse_bytes
from yalm_runner.quant import Quantization

device = torch.device("cuda")
cases = [  # shape, bits, layout, rows, context
    ("13b", 4, "slots", 512, 144),
    ("13b", 8, "slots", 512, 144),
    ("13b", 4, "rows", 512, 144),
    ("yalm-100b", 4, "slots", 64, 192),
    ("yalm-100b", 4, "slots", 128, 192),
]
print("| shape | KV | rows x context | torch elements/s | fused elements/s | speed-up |")
print("|---|---|---|---|---|---|")
for shape, bits, layout, rows, context in cases:
    rates = {}
    for fused in (False, True):
        kvformat.USE_FUSED_KERNEL = fused
        rates[fused] = measure_kv_codec(
            SHAPES[shape], bits, layout, rows, context, device, torch.bfloat16
        )
    print(
        f"| {shape} | {bits}-bit {layout} | {rows} x {context} | {rates[False]:.3g} | "
        f"{rates[True]:.3g} | {rates[True] / rates[False]:.1f}x |",
        flush=True,
    )
    torch.cuda.empty_cache()

policy = OffloadPolicy(
    gpu_memory_bytes=parse_bytes("8GiB"), cpu_memory_bytes=parse_bytes("100GiB"),
    weights_on="cpu", kv_on="auto", kv_bits=4,
)  # fmt: skip
for fused in (False, True):
    kvformat.USE_FUSED_KERNEL = fused
    print(f"\n## 13B, int4 g64, 4-bit KV: {'fused KV kernel' if fused else 'torch expansion'}")
    run_envelope("13b", None, Quantization("int4", 64), policy, (128, 128), 32, None, None)
    torch.cuda.empty_cache()
