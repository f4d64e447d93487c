"""Where the disk tier's layers sit in the pass: bunched at the end, or spread among the others.

When RAM cannot hold the model, some layers are read from the drive every decode step. The
streamer reads them one after another into two relays, a read starting when the disk layer two
back has left its relay. With the disk layers bunched at the end of the pass (how the planner
used to place them), the drive reads two of them while the RAM layers run and then idles; the
disk layers then arrive one read after another. Spread evenly among the RAM layers (what
``offload.plan_placement`` does now), each read overlaps the layers between two disk layers.

This measures both on a real store written to ``--dir`` (put it on the drive the disk tier would
use), in one run: the drive's sequential read rate (a fresh file, ``O_DIRECT``), then the same
greedy decode of ``--rows`` rows on the CPU with the same layers on disk, in the two orders,
interleaved ``--repeats`` times (medians). The disk tier reads by direct I/O, so the page cache
plays no part. It prints each order's step, the disk bytes a step, the rate they came in at
against the drive's, and tokens/s.

    python benchmarks/disk_spread.py [--dir DIR] [--rows 48] [--threads 1] [--repeats 5]

On the CPU the compute competes with the reads for the cores: the default leaves one core to the
reader (on a GPU machine the host only waits for reads). Pick ``--rows`` so that a layer computes
in about half a layer's read: that is where the order matters most.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from yalm_runner.bench.disk import measure_drive_read, write_synthetic_store
from yalm_runner.bench.synthetic import NO_EOS
from yalm_runner.config import ModelConfig, SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.offload import OffloadPolicy, plan_placement
from yalm_runner.streaming import StreamingWeights, part_bytes_in


def bunched(tiers: dict[str, str], layers: int) -> dict[str, str]:
    """The same tiers with every disk layer moved to the end of the pass (the old placement)."""
    names = [f"layer_{index}" for index in range(layers)]
    order = sorted((tiers[name] == "disk", tiers[name]) for name in names)
    return {**tiers, **{name: tier for name, (_, tier) in zip(names, order, strict=True)}}


def decode_step_s(weights: StreamingWeights, rows: int, prompt: int, new: int) -> float:
    """One greedy batch of ``rows``; the mean decode step (the prefill not counted)."""
    engine = Engine(weights, eos_id=NO_EOS)
    requests = [Request(f"r{row}", tuple(range(1, prompt + 1)), new) for row in range(rows)]
    engine.generate(requests, SamplingParams(greedy=True), batch_size=rows)
    return engine.stats.decode_s / (new - 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to write the store (default: a temporary folder)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=2736)
    parser.add_argument("--on-disk", type=int, default=8, help="layers read from disk each step")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("-n", "--new-tokens", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="compute threads (default 1: a core for the reads)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = ModelConfig(
        vocab_size=1024,
        embedding_size=256,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        ffn_size=args.ffn,
    )
    folder = Path(tempfile.mkdtemp(prefix="disk-spread-", dir=args.dir))
    try:
        drive = measure_drive_read(folder / "sequential.bin", 1 << 30)
        store = write_synthetic_store(folder / "store", config, torch.float32)
        sizes = part_bytes_in(store, torch.float32)
        layer_bytes = sizes["layer_0"]
        resident = args.layers - args.on_disk
        # The resident layers, and two relays for the disk ones (and the margin the planner keeps)
        budget = sizes["embedding"] + sizes["head"] + (resident + 3) * layer_bytes
        policy = OffloadPolicy(cpu_memory_bytes=budget)
        spread = plan_placement(sizes, policy, budgets=policy.budgets_on("cpu"))
        orders = {
            "none (all in RAM)": plan_placement(
                sizes, OffloadPolicy(), budgets=OffloadPolicy().budgets_on("cpu")
            ),
            "bunched at the end": replace(spread, tiers=bunched(spread.tiers, args.layers)),
            "spread": spread,
        }
        steps: dict[str, list[float]] = {name: [] for name in orders}
        disk_bytes = {}
        for _ in range(args.repeats):
            for name, placement in orders.items():
                with StreamingWeights(store, "cpu", torch.float32, placement, verify=False) as w:
                    steps[name].append(decode_step_s(w, args.rows, args.prompt, args.new_tokens))
                    disk_bytes[name] = w.bytes_from_disk / args.new_tokens  # a pass a forward
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    medians = {name: statistics.median(times) for name, times in steps.items()}
    compute_s = medians["none (all in RAM)"]
    print(
        f"store: {args.layers} layers of {layer_bytes / 1e6:.1f} MB (fp32, hidden {args.hidden}, "
        f"GeGLU {args.ffn}), {spread.count('disk')} read from disk each step; {args.rows} rows, "
        f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads; medians of "
        f"{args.repeats}, interleaved"
    )
    print(
        f"drive: {drive.bytes_per_s / 1e9:.2f} GB/s sequential ({drive.method}, "
        f"{drive.size_bytes / 2**30:.0f} GiB): {layer_bytes / drive.bytes_per_s * 1e3:.0f} ms a "
        f"layer; compute: {compute_s / args.layers * 1e3:.0f} ms a layer (all in RAM)"
    )
    print("floor: the larger of the disk layers' reads at the drive's rate and the all-in-RAM step")
    print()
    print(
        "| disk layers | layout (D: disk) | decode step | disk bytes a step | disk rate | "
        "of the drive's | step / floor | tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, step_s in medians.items():
        placement = orders[name]
        layout = "".join(
            "D" if placement.tiers[f"layer_{n}"] == "disk" else "r" for n in range(args.layers)
        )
        floor_s = max(disk_bytes[name] / drive.bytes_per_s, compute_s)
        rate = disk_bytes[name] / step_s
        print(
            f"| {name} | `{layout}` | {step_s * 1e3:.0f} ms | {disk_bytes[name] / 1e6:.0f} MB | "
            f"{rate / 1e9:.2f} GB/s | {rate / drive.bytes_per_s:.2f} | {step_s / floor_s:.2f} | "
            f"{args.rows / step_s:.1f} |"
        )
    print()
    ratio = medians["bunched at the end"] / medians["spread"]
    print(f"spread against bunched: {ratio:.2f}x the tokens/s")
    for name, times in steps.items():
        print(f"  {name}: " + ", ".join(f"{t * 1e3:.0f}" for t in times) + " ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
