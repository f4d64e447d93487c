"""The table ``yalm-runner bench`` prints: one row per system and batch, the ratios of ours to
each row under the same cap, and the targets the comparison is held to.

Rows are plain figures; this module formats and compares them and knows nothing of how they
were measured (our engine, the peers' child processes or the disk tier).
"""

from __future__ import annotations

from dataclasses import dataclass

from yalm_runner.offload import format_bytes


@dataclass
class BenchRow:
    system: str
    batch: int
    tokens_per_s: float
    decode_step_s: float
    effective_gbps: float
    roofline_fraction: float
    peak_gpu_bytes: int
    placement: str
    cap_bytes: int | None = None  # the GPU budget this row ran under (None: uncapped)
    ours_over_this: float | None = None  # our tokens/s at the same cap over this row's
    predicted_step_s: float | None = None  # ours: the step-time model at calibrated rates


TARGETS = (  # (system, capped?, the least ours/system the issue asks for)
    ("HF Accelerate", True, 10.0),
    ("DeepSpeed ZeRO-3", True, 5.0),
    ("DeepSpeed ZeRO-3", False, 1.25),
)


def compare_with_ours(rows: list[BenchRow]) -> None:
    """Fill ``ours_over_this``: our best tokens/s under the same cap over each row's."""
    for row in rows:
        ours = [
            other.tokens_per_s
            for other in rows
            if other.system.startswith("ours")
            and "overlap off" not in other.system
            and other.cap_bytes == row.cap_bytes
        ]
        if ours and row.tokens_per_s > 0:
            row.ours_over_this = max(ours) / row.tokens_per_s


def target_lines(rows: list[BenchRow]) -> list[str]:
    lines = []
    for system, capped, least in TARGETS:
        found = [
            row
            for row in rows
            if row.system == system and (row.cap_bytes is not None) == capped
            and row.ours_over_this is not None
        ]  # fmt: skip
        where = "capped" if capped else "uncapped"
        if not found:
            lines.append(f"target ours >= {least:g}x {system} ({where}): not measured")
            continue
        ratio = max(row.ours_over_this for row in found)
        verdict = "met" if ratio >= least else "NOT met"
        lines.append(f"target ours >= {least:g}x {system} ({where}): {ratio:.2f}x, {verdict}")
    return lines


def format_table(rows: list[BenchRow]) -> str:
    lines = [
        f"{'system':<20} {'cap':>9} {'B':>4} {'tok/s':>8} {'ms/step':>8} {'GB/s':>6} "
        f"{'roofline':>8} {'peak GiB':>8} {'ours/x':>7}"
    ]
    for row in rows:
        cap = format_bytes(row.cap_bytes) if row.cap_bytes else "none"
        ratio = f"{row.ours_over_this:.2f}" if row.ours_over_this is not None else "-"
        lines.append(
            f"{row.system:<20} {cap:>9} {row.batch:>4} {row.tokens_per_s:>8.1f} "
            f"{row.decode_step_s * 1e3:>8.1f} {row.effective_gbps:>6.1f} "
            f"{row.roofline_fraction:>8.1%} {row.peak_gpu_bytes / 2**30:>8.2f} {ratio:>7}"
        )
    return "\n".join(lines)


def format_disk(disk: dict[str, object]) -> str:
    return (
        f"disk: drive sequential read {disk['drive_bytes_per_s'] / 1e9:.2f} GB/s "
        f"({disk['drive_method']}, {format_bytes(disk['drive_file_bytes'])} fresh file); "
        f"our disk tier {disk['tier_bytes_per_s'] / 1e9:.2f} GB/s "
        f"({disk['tier_layers']} layers, {format_bytes(disk['tier_bytes_per_pass'])} per cold "
        f"pass); tier/drive {disk['tier_over_drive']:.1%}"
    )
