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
    parser.add_argument(
        "--buffers", default="2,3,4", help="device buffers to compare; the first is profiled"
    )
    parser.add_argument("--trace", help="write the long run's Chrome trace here (.json.gz)")
    parser.add_argument("--kv-attention", choices=["device", "host"], default="device")
    parser.add_argument(
        "--moves",
        default="auto",
        help="with --kv-attention host: how the step's q/k/v and output cross (Engine.host_moves)"
        ", a comma list to compare (auto,copy); each with every buffer count",
    )
    args = parser.parse_args()
    counts = [int(count) for count in args.buffers.split(",")]
    moves = args.moves.split(",") if args.kv_attention == "host" else ["auto"]
    config = replace(SHAPES["yalm-100b"], num_layers=args.layers)
    dtype = torch.bfloat16
    link = measure_h2d()["pinned"]
    store = CompressedSyntheticStore(config, Quantization("int4", 128), dtype)
    policy = OffloadPolicy(
        gpu_memory_bytes=parse_bytes("8GiB"),
        cpu_memory_bytes=parse_bytes("64GiB"),
        kv_bits=args.kv_bits,
        weights_on="cpu",  # every layer streams, as in the full envelope
        kv_attention=args.kv_attention,
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
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(policy.gpu_memory_bytes / total)
    greedy = SamplingParams(greedy=True)
    profiles = {}
    print("| device buffers | host moves | step | floor | step/floor | peak GPU |")
    print("|---|---|---|---|---|---|")
    for count, move in [(count, move) for count in counts for move in moves]:
        weights = StreamingWeights(
            store, "cuda", dtype, plan.placement, verify=False, buffers=count
        )
        engine = Engine.for_plan(weights, plan, policy.kv_bits, eos_id=NO_EOS)
        engine.host_moves = move
        engine.reserve(plan.batch_size, plan.max_context)
        engine.generate(_prompts(1, 8, 8, 2), greedy, batch_size=1)
        torch.cuda.reset_peak_memory_stats()

        def run(steps: int, engine: Engine = engine) -> tuple[float, int, int]:
            engine.stats = type(engine.stats)()
            requests = _prompts(plan.batch_size, 100, 128, steps + 1)
            engine.generate(requests, greedy, batch_size=plan.batch_size)
            torch.cuda.synchronize()
            stats = engine.stats
            return stats.decode_s / steps, stats.bytes_moved, stats.forward_passes

        step_s, moved, passes = run(args.steps)
        floor_s = moved / passes / link
        print(
            f"| {count} | {move} | {step_s * 1e3:.1f} ms | {floor_s * 1e3:.1f} ms | "
            f"{step_s / floor_s:.2f} | {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB |",
            flush=True,
        )
        if (count, move) == (counts[0], moves[0]):
            for steps in (1, 1 + args.steps):  # their difference is decode steps alone
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    run(steps)
                profiles[steps] = _totals(prof.key_averages())
            if args.trace:
                prof.export_chrome_trace(args.trace)
            profiled_step_s = step_s
        weights.close()
        del engine, weights, run
        torch.cuda.empty_cache()
    short, long = profiles[1], profiles[1 + args.steps]
    per_step = {
        key: ((long[key][0] - short.get(key, (0, 0))[0]) / args.steps,
              (long[key][1] - short.get(key, (0, 0))[1]) / args.steps)
        for key in long
    }  # fmt: skip
    per_kind: dict[str, float] = defaultdict(float)
    for (device_type, name), (us, _count) in per_step.items():
        if device_type == "cpu":
            continue
        if "Memcpy HtoD" in name:
            per_kind["copies host->device"] += us
        elif "Memcpy DtoH" in name:
            per_kind["copies device->host"] += us
        elif "Memcpy" in name or "Memset" in name:
            per_kind["other copies/sets"] += us
        else:
            per_kind["compute kernels"] += us
    floor_ms = floor_s * 1e3
    print(
        f"per decode step with {counts[0]} buffers (the difference of a {1 + args.steps}-step "
        "and a 1-step run):"
    )
    print("| device work | ms per step | / floor |")
    print("|---|---|---|")
    for kind, us in sorted(per_kind.items(), key=lambda item: -item[1]):
        print(f"| {kind} | {us / 1e3:.1f} | {us / 1e3 / floor_ms:.2f} |")
    print(
        f"| (the step's wall time, {counts[0]} buffers) | {profiled_step_s * 1e3:.1f} | "
        f"{profiled_step_s * 1e3 / floor_ms:.2f} |"
    )
    for device_type, title in (("cuda", "kernel"), ("cpu", "host op (self CPU)")):
        rows = sorted(
            ((us, count, name) for (kind, name), (us, count) in per_step.items()
             if kind == device_type and "Memcpy" not in name),
            reverse=True,
        )[:14]  # fmt: skip
        print(f"| {title} | ms per step | calls per step |")
        print("|---|---|---|")
        for us, count, name in rows:
            print(f"| {_short(name)} | {us / 1e3:.2f} | {count:.0f} |")


def _short(name: str) -> str:
    """A kernel's name cut to what tells kernels apart (torch's elementwise kernels differ only
    in the functor at the end of a long template name)."""
    if len(name) <= 90:
        return name
    return name[:40] + " ... " + name[-45:]


def _totals(events) -> dict[tuple[str, str], tuple[float, int]]:
    """(device or cpu, name) -> (microseconds, calls) of one profile."""
    totals = {}
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
            totals[("cuda", event.key)] = (us, event.count)
        else:
            totals[("cpu", event.key)] = (event.self_cpu_time_total, event.count)
    return totals


if __name__ == "__main__":
    main()
