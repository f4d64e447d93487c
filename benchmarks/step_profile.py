"""Where a decode step of the envelope goes above its floor, from the device's own timeline.

The envelope's step is ~1.2x the bytes it moves over the measured link. This script runs the
envelope's workload on a slice of YaLM-100B's real layer shape (``--layers``, int4 groups of 128,
KV in pinned RAM at 4 bits, the planner's batch under an 8 GiB cap), first plainly to time the
steps, then a few decode steps under ``torch.profiler``, and prints what the device spent per
step: host-to-device and device-to-host copies (their sum is the link's share), the compute
kernels by name, and the step's wall time against both. A step whose copies fill it is at the
floor; a step with idle copy time is waiting on the host (launches, Python, synchronisation) or
on compute that the copies wait for.

    python benchmarks/step_profile.py [--layers 20] [--steps 8]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from yalm_runner.bench.envelope import CompressedSyntheticStore, _prompts
from yalm_runner.bench.link import measure_h2d
from yalm_runner.bench.synthetic import NO_EOS, SHAPES
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Engine
from yalm_runner.offload import OffloadPolicy, parse_bytes
from yalm_runner.planning import plan_memory
from yalm_runner.quant import Quantization
from yalm_runner.streaming import StreamingWeights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--kv-bits", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64, help="the full envelope's batch")
    args = parser.parse_args()
    config = replace(SHAPES["yalm-100b"], num_layers=args.layers)
    dtype = torch.bfloat16
    link = measure_h2d()["pinned"]
    store = CompressedSyntheticStore(config, Quantization("int4", 128), dtype)
    policy = OffloadPolicy(
        gpu_memory_bytes=parse_bytes("8GiB"),
        cpu_memory_bytes=parse_bytes("64GiB"),
        kv_bits=args.kv_bits,
    )
    plan = plan_memory(
        store,
        torch.device("cuda"),
        dtype,
        policy,
        batch_size=args.rows,
        max_context=256,
        prompt_tokens=128,
    )
    print(f"link {link / 1e9:.1f} GB/s; plan: {plan.describe()}", flush=True)
    with StreamingWeights(store, "cuda", dtype, plan.placement, verify=False) as weights:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(policy.gpu_memory_bytes / total)
        engine = Engine(
            weights,
            eos_id=NO_EOS,
            kv_on=plan.kv_on,
            kv_bits=policy.kv_bits,
            kv_layout=plan.kv_layout,
            prefill_rows=plan.prefill_rows,
        )
        engine.reserve(plan.batch_size, plan.max_context)
        greedy = SamplingParams(greedy=True)
        engine.generate(_prompts(1, 8, 8, 2), greedy, batch_size=1)

        def run(steps: int) -> tuple[float, int, int]:
            engine.stats = type(engine.stats)()
            requests = _prompts(plan.batch_size, 100, 128, steps + 1)
            engine.generate(requests, greedy, batch_size=plan.batch_size)
            torch.cuda.synchronize()
            stats = engine.stats
            return stats.decode_s / steps, stats.bytes_moved, stats.forward_passes

        step_s, moved, passes = run(args.steps)
        floor_s = moved / passes / link
        print(
            f"plain: step {step_s * 1e3:.1f} ms, floor {floor_s * 1e3:.1f} ms "
            f"({moved / passes / 1e9:.2f} GB a pass), step/floor {step_s / floor_s:.2f}",
            flush=True,
        )
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            began = time.perf_counter()
            profiled_step_s, _, _ = run(args.steps)
            wall = time.perf_counter() - began
    events = prof.key_averages()
    per_kind: dict[str, float] = defaultdict(float)
    kernels = []
    for event in events:
        device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if not device_us or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.key
        if "Memcpy HtoD" in name:
            per_kind["copies host->device"] += device_us
        elif "Memcpy DtoH" in name:
            per_kind["copies device->host"] += device_us
        elif "Memcpy" in name or "Memset" in name:
            per_kind["other copies/sets"] += device_us
        else:
            per_kind["compute kernels"] += device_us
            kernels.append((device_us, event.count, name))
    passes = args.steps + 1
    print(
        f"profiled: {args.steps} decode steps + prefill in {wall:.2f} s wall "
        f"(step {profiled_step_s * 1e3:.1f} ms under the profiler)"
    )
    print("| device work | ms per pass | / floor |")
    print("|---|---|---|")
    for kind, total_us in sorted(per_kind.items(), key=lambda item: -item[1]):
        per_pass_ms = total_us / 1e3 / passes
        print(f"| {kind} | {per_pass_ms:.1f} | {per_pass_ms / (floor_s * 1e3):.2f} |")
    print("| top kernel | ms per pass | calls per pass |")
    print("|---|---|---|")
    for device_us, count, name in sorted(kernels, reverse=True)[:15]:
        print(f"| {name[:70]} | {device_us / 1e3 / passes:.2f} | {count / passes:.0f} |")
    cpu = sorted(
        (e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
        key=lambda e: -e.self_cpu_time_total,
    )[:12]
    print("| host op (self CPU) | ms per pass | calls per pass |")
    print("|---|---|---|")
    for event in cpu:
        print(
            f"| {event.key[:70]} | {event.self_cpu_time_total / 1e3 / passes:.2f} | "
            f"{event.count / passes:.0f} |"
        )


if __name__ == "__main__":
    main()
