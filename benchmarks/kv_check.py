"""Ours alone on the device: the planner's batch with the KV cache in pinned RAM, for each KV
width given (``4,8,16``) in both host layouts; 13B shape, every layer in pinned RAM, 8 GiB cap,
prompt 128, 32 new tokens. Run by ``device_runs.sh``; prints one table."""

import gc
import sys

import torch

from yalm_runner.bench.link import measure_h2d
from yalm_runner.bench.ours import try_ours
from yalm_runner.bench.synthetic import SHAPES, SyntheticStore
from yalm_runner.bench.table import format_table
from yalm_runner.offload import OffloadPolicy, parse_bytes
from yalm_runner.pinned import locked_bytes
from yalm_runner.planning import plan_memory
from yalm_runner.streaming import StreamingWeights

store = SyntheticStore(SHAPES["13b"], torch.bfloat16)
pinned = measure_h2d()["pinned"]
rows, weights = [], None
for bits in [int(b) for b in sys.argv[1].split(",")]:
    for layout in ("slots", "rows"):
        policy = OffloadPolicy(
            gpu_memory_bytes=parse_bytes("8GiB"), weights_on="cpu", kv_on="cpu", kv_bits=bits,
            kv_layout=layout,
        )  # fmt: skip
        plan = plan_memory(store, torch.device("cuda"), torch.bfloat16, policy, batch_size=None,
                           max_context=160, prompt_tokens=128, rows=512)  # fmt: skip
        print(f"pinned {pinned / 1e9:.1f} GB/s; {bits}-bit {layout}: {plan.describe()}", flush=True)
        if weights is None or weights.placement.tiers != plan.placement.tiers:
            weights = None
            gc.collect()
            weights = StreamingWeights(store, "cuda", torch.bfloat16, plan.placement, verify=False)
            print(f"weights placed; locked {locked_bytes() / 2**30:.1f} GiB", flush=True)
        name = f"{bits}-bit KV, {layout}"
        row = try_ours(weights, plan.batch_size, 128, 32, policy, pinned, plan, name)
        rows += [row] if row else []
        gc.collect()
        torch.cuda.empty_cache()
print(format_table(rows))
