"""The step-time model against the decode steps the H200 measured: the arithmetic behind the
defaults of ``yalm_runner.steptime.StepRates`` (docs/benchmarks.md, "The step-time model").

No device is needed: each recorded run's plan is made again by the planner (it allocates
nothing), and its step is predicted with the rates that run measured (its pinned link) or
implies (the disk tier's read rate), every device-side rate at its default. Prints one table per
recorded run; ``--check`` exits 1 when a row of the planner sweep is outside 0.90-1.10x.

    python benchmarks/step_model_check.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from yalm_runner.bench.envelope import CompressedSyntheticStore
from yalm_runner.bench.synthetic import SHAPES, SyntheticStore
from yalm_runner.offload import OffloadPolicy, parse_bytes
from yalm_runner.planning import plan_memory
from yalm_runner.quant import Quantization
from yalm_runner.steptime import StepRates

# benchmarks/RESULTS.md, 2026-12-02 (session 8), the planner's sweep on the H200
# (tests/test_planner_safety.py, two runs: the slot-major and GPU rows from the first, the
# row-major and disk rows from the second, after the fused KV kernel): 13B layers, 4 of them,
# prompt 128, the planner's batch; pinned link 55.07-55.40 GB/s. Columns: budget, weights on,
# KV on, bits, layout, new tokens, measured ms, and for a disk row the drive rate read from
# that case's own layer files just before it ran (GB/s).
SWEEP = """\
8GiB cpu cpu 16 slots 16 141.3
8GiB cpu cpu 8 slots 16 106.2
8GiB cpu cpu 4 slots 16 82.0
4GiB cpu gpu 16 auto 16 49.3
4GiB cpu cpu 16 slots 16 74.4
4GiB cpu cpu 8 slots 16 64.9
4GiB cpu cpu 4 slots 16 59.6
8GiB cpu cpu 16 rows 16 181.1
8GiB cpu cpu 8 rows 16 116.7
8GiB cpu cpu 4 rows 16 118.7
4GiB cpu cpu 16 rows 16 121.2
4GiB cpu cpu 8 rows 16 67.1
4GiB cpu cpu 4 rows 16 64.0"""
SWEEP_LINK_BYTES_PER_S = 55.2e9
# The disk rows: shown, not held. The lent machine's drive read 1.50-2.08 GB/s across
# consecutive cases of one run, and a case's steps ran at rates up to 20% off what its own
# files had read just before, so one drive rate cannot hold them to 10%; each is predicted at
# its own measured rate.
DISK_SWEEP = """\
8GiB disk cpu 16 rows 6 1285.6 2.08
8GiB disk cpu 16 slots 6 1462.0 1.61
8GiB disk cpu 8 rows 6 1296.5 1.58
8GiB disk cpu 8 slots 6 1222.2 1.85
8GiB disk cpu 4 rows 6 1313.5 1.88
8GiB disk cpu 4 slots 6 1622.0 1.62
4GiB disk gpu 16 auto 6 1400.6 1.69
4GiB disk cpu 16 rows 6 1556.9 1.50
4GiB disk cpu 16 slots 6 1393.0 1.61
4GiB disk cpu 8 rows 6 1357.4 1.82
4GiB disk cpu 8 slots 6 1345.2 1.93
4GiB disk cpu 4 rows 6 1398.7 1.95
4GiB disk cpu 4 slots 6 1626.2 1.59"""
LOW, HIGH = 0.90, 1.10

# Other recorded runs, shown beside the sweep but not held to its bound: (label, shape, layers,
# quantization, budget, KV bits, layout, batch, prompt, new tokens, pinned GB/s, measured ms).
OTHERS = (
    ("kv_check 11-28 16 slots", "13b", 40, None, "8GiB", 16, "slots", 352, 128, 32, 55.1, 1214.9),
    ("kv_check 11-28 16 rows", "13b", 40, None, "8GiB", 16, "rows", 512, 128, 32, 55.1, 1681.5),
    ("kv_check 11-28 8 slots", "13b", 40, None, "8GiB", 8, "slots", 448, 128, 32, 55.1, 952.5),
    ("kv_check 11-28 8 rows", "13b", 40, None, "8GiB", 8, "rows", 352, 128, 32, 55.1, 957.6),
    ("kv_check 12-01 4 slots", "13b", 40, None, "8GiB", 4, "slots", 512, 128, 32, 55.2, 778.3),
    ("kv_check 12-01 4 rows", "13b", 40, None, "8GiB", 4, "rows", 512, 128, 32, 55.3, 1354.7),
    ("bench 11-28 KV on the GPU", "13b", 40, None, None, 16, "gpu", 128, 128, 16, 55.1, 460.6),
    ("100B envelope 12-01", "yalm-100b", 80, ("int4", 128), "8GiB", 4, "slots", 64, 128, 128, 55.0,
     1430.0),
)  # fmt: skip


def sweep_rows(table: str = SWEEP) -> list[tuple[str, float, float, str]]:
    """(case, predicted s, measured s, bound) for every row of ``table``."""
    config = replace(SHAPES["13b"], num_layers=4)
    store = SyntheticStore(config, torch.bfloat16)
    rows = []
    for line in table.splitlines():
        budget, weights_on, kv_on, bits, layout, new, measured_ms, *drive = line.split()
        rates = StepRates(link_bytes_per_s=SWEEP_LINK_BYTES_PER_S)
        if drive:
            rates = replace(rates, disk_bytes_per_s=float(drive[0]) * 1e9)
        policy = OffloadPolicy(
            gpu_memory_bytes=parse_bytes(budget), cpu_memory_bytes=parse_bytes("48GiB"),
            weights_on=weights_on, kv_on=kv_on, kv_bits=int(bits), kv_layout=layout,
        )  # fmt: skip
        plan = plan_memory(
            store, torch.device("cuda"), torch.bfloat16, policy, batch_size=None,
            max_context=128 + int(new), prompt_tokens=128, rows=512,
        )  # fmt: skip
        predicted = plan.predict_step(rates)
        case = f"{budget} weights {weights_on} KV {kv_on} {bits}-bit {layout} B={plan.batch_size}"
        rows.append((case, predicted.total_s, float(measured_ms) / 1e3, predicted.bound))
    return rows


def other_rows() -> list[tuple[str, float, float, str]]:
    rows = []
    for label, shape, layers, quant, budget, bits, layout, batch, prompt, new, gbps, ms in OTHERS:
        config = replace(SHAPES[shape], num_layers=layers)
        store = (
            SyntheticStore(config, torch.bfloat16)
            if quant is None
            else CompressedSyntheticStore(config, Quantization(*quant), torch.bfloat16)
        )
        policy = OffloadPolicy(
            gpu_memory_bytes=parse_bytes(budget) if budget else None,
            weights_on="cpu",
            kv_on="gpu" if layout == "gpu" else "cpu",
            kv_bits=bits,
            kv_layout="auto" if layout == "gpu" else layout,
        )
        plan = plan_memory(
            store, torch.device("cuda"), torch.bfloat16, policy, batch_size=batch,
            max_context=prompt + new, prompt_tokens=prompt,
        )  # fmt: skip
        predicted = plan.predict_step(StepRates(link_bytes_per_s=gbps * 1e9))
        rows.append((f"{label} B={batch}", predicted.total_s, ms / 1e3, predicted.bound))
    return rows


def format_rows(rows: list[tuple[str, float, float, str]]) -> str:
    lines = [f"{'case':48} {'predicted':>10} {'measured':>10} {'ratio':>6}  bound"]
    for case, predicted, measured, bound in rows:
        lines.append(
            f"{case:48} {predicted * 1e3:7.1f} ms {measured * 1e3:7.1f} ms "
            f"{measured / predicted:5.2f}x  {bound}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a sweep row is off")
    args = parser.parse_args(argv)
    sweep = sweep_rows()
    print(
        f"planner sweep (H200, 13B x 4 layers): link {SWEEP_LINK_BYTES_PER_S / 1e9:.2f} GB/s, "
        "device-side rates at their defaults"
    )
    print(format_rows(sweep))
    print("\nthe sweep's disk rows (each at its drive rate as measured; not held to the bound):")
    print(format_rows(sweep_rows(DISK_SWEEP)))
    print("\nother recorded runs (the link each measured; not held to the bound):")
    print(format_rows(other_rows()))
    off = [row for row in sweep if not LOW <= row[2] / row[1] <= HIGH]
    if args.check and off:
        print(f"\n{len(off)} sweep rows outside {LOW:.2f}-{HIGH:.2f}x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
