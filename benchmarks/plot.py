"""Decode tokens/s against batch, one line per configuration, from the benches' JSON: an SVG.

Reads what ``yalm-runner bench --json`` writes (a row per system and batch) and what
``python -m yalm_runner.bench.envelope --json`` writes (one batch), any number of files. A
configuration is a row's system, with its weights when they are not 16-bit (``int4 g64``);
each is one solid line with a marker per batch, and beside it, dashed in the same colour, the
link's bound: batch / floor step, the floor being the bytes a decode step moved over the pinned
bandwidth measured in the same run. The y axis is decode throughput (batch / decode step), the
quantity the bound is about: the benches' own tokens/s also count the prefill.

The SVG is written by hand (no plotting library): axes with a log-2 batch scale, ticks, labels
with units, a legend and a title.

    python benchmarks/plot.py bench.json [more.json ...] -o throughput.svg [--title TEXT]

A file that is not such JSON is refused in one line naming it; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 960, 600
LEFT, RIGHT, TOP, BOTTOM = 80, 330, 60, 70  # the legend lives in the right margin
COLOURS = (
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22",
)  # fmt: skip


class PlotError(Exception):
    """A file that cannot be plotted; the message names it."""


@dataclass
class Series:
    label: str
    points: list[tuple[int, float, float | None]] = field(default_factory=list)  # batch, tok/s,
    # the link's bound in tokens/s (None when nothing was moved)


def _number(value: object, what: str, source: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlotError(f"{source}: {what} is not a number: {value!r}")
    return float(value)


def read_series(paths: list[Path]) -> list[Series]:
    """Every configuration of every file, in the order first seen."""
    series: dict[str, Series] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlotError(f"{path}: not readable JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise PlotError(f"{path}: expected an object, got {type(data).__name__}")
        for label, batch, step_s, floor_s in _points(data, path):
            if step_s <= 0 or batch < 1:
                raise PlotError(f"{path}: {label} at batch {batch} has no decode step")
            bound = batch / floor_s if floor_s > 0 else None
            series.setdefault(label, Series(label)).points.append((batch, batch / step_s, bound))
    if not series:
        raise PlotError(f"{', '.join(map(str, paths))}: no rows to plot")
    for line in series.values():
        line.points.sort()
    return list(series.values())


def _points(data: dict, path: Path):
    """(label, batch, decode step s, floor step s) of each row of one file."""
    if "rows" in data:  # yalm-runner bench
        weights = data.get("weights", "bf16")
        suffix = "" if weights == "bf16" else f", {weights} weights"
        if not isinstance(data["rows"], list):
            raise PlotError(f"{path}: rows is not a list")
        for index, row in enumerate(data["rows"]):
            if not isinstance(row, dict) or "system" not in row:
                raise PlotError(f"{path}: row {index} has no system")
            step = _number(row.get("decode_step_s"), f"row {index} decode_step_s", path)
            fraction = _number(row.get("roofline_fraction"), f"row {index} roofline", path)
            batch = int(_number(row.get("batch"), f"row {index} batch", path))
            yield f"{row['system']}{suffix}", batch, step, step * fraction
    elif "floor_step_s" in data and "batch" in data:  # bench.envelope
        scheme = data.get("quantization", {})
        label = (
            f"envelope {data.get('shape')} x {data.get('layers')}, {scheme.get('scheme')} "
            f"g{scheme.get('group_size')}, {data.get('kv_bits')}-bit KV"
        )
        step = _number(data.get("decode_step_s"), "decode_step_s", path)
        floor = _number(data.get("floor_step_s"), "floor_step_s", path)
        yield label, int(_number(data["batch"], "batch", path)), step, floor
    else:
        raise PlotError(
            f"{path}: neither a `yalm-runner bench --json` file (rows) nor an envelope one "
            "(batch, floor_step_s)"
        )


def _nice_top(value: float) -> tuple[float, float]:
    """An axis top at or above ``value`` and its tick step (1, 2 or 5 times a power of ten)."""
    raw = max(value, 1e-9) / 5
    power = 10 ** math.floor(math.log10(raw))
    step = next(f * power for f in (1, 2, 5, 10) if f * power >= raw)
    return step * math.ceil(value / step), step


def render(series: list[Series], title: str) -> str:
    batches = [batch for line in series for batch, _, _ in line.points]
    low = 2 ** math.floor(math.log2(min(batches)))
    high = 2 ** math.ceil(math.log2(max(batches)))
    if high == low:
        high = low * 2
    values = [value for line in series for _, tps, bound in line.points for value in (tps, bound)]
    top, step = _nice_top(max(value for value in values if value is not None) * 1.05)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(batch: float) -> float:
        return LEFT + plot_w * (math.log2(batch) - math.log2(low)) / math.log2(high / low)

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text class="title" x="{LEFT + plot_w / 2}" y="{TOP / 2}" text-anchor="middle" '
        f'font-size="16">{escape(title)}</text>',
    ]
    # Grid, ticks and tick labels.
    tick = low
    while tick <= high:
        out.append(
            f'<line x1="{x(tick):.1f}" y1="{TOP}" x2="{x(tick):.1f}" y2="{TOP + plot_h}" '
            'stroke="#e0e0e0"/>'
        )
        out.append(
            f'<text x="{x(tick):.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{tick:g}</text>'
        )
        tick *= 2
    for index in range(round(top / step) + 1):
        value = index * step
        out.append(
            f'<line x1="{LEFT}" y1="{y(value):.1f}" x2="{LEFT + plot_w}" y2="{y(value):.1f}" '
            'stroke="#e0e0e0"/>'
        )
        out.append(
            f'<text x="{LEFT - 8}" y="{y(value) + 4:.1f}" text-anchor="end">{value:g}</text>'
        )
    out += [
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" '
        'stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="black"/>',
        f'<text class="axis-label" x="{LEFT + plot_w / 2}" y="{HEIGHT - 20}" '
        'text-anchor="middle">batch (rows decoded together, log scale)</text>',
        f'<text class="axis-label" x="20" y="{TOP + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 20 {TOP + plot_h / 2})">decode tokens/s (batch / step time)</text>',
    ]
    # One solid line with markers per configuration; its link bound dashed in the same colour.
    legend_x, legend_y = LEFT + plot_w + 20, TOP + 10
    for index, line in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        measured = " ".join(
            f"{'M' if n == 0 else 'L'}{x(b):.1f},{y(v):.1f}"
            for n, (b, v, _) in enumerate(line.points)
        )
        out.append(
            f'<path class="measured" d="{measured}" fill="none" stroke="{colour}" '
            f'stroke-width="2"><title>{escape(line.label)}</title></path>'
        )
        out += [
            f'<circle cx="{x(b):.1f}" cy="{y(v):.1f}" r="3.5" fill="{colour}"/>'
            for b, v, _ in line.points
        ]
        bounded = [(b, bound) for b, _, bound in line.points if bound is not None]
        if bounded:
            dashed = " ".join(
                f"{'M' if n == 0 else 'L'}{x(b):.1f},{y(v):.1f}" for n, (b, v) in enumerate(bounded)
            )
            out.append(
                f'<path class="bound" d="{dashed}" fill="none" stroke="{colour}" '
                f'stroke-width="1.5" stroke-dasharray="6 4"><title>{escape(line.label)}: the '
                "link's bound</title></path>"
            )
        row_y = legend_y + 20 * index
        out += [
            f'<line x1="{legend_x}" y1="{row_y}" x2="{legend_x + 24}" y2="{row_y}" '
            f'stroke="{colour}" stroke-width="2"/>',
            f'<circle cx="{legend_x + 12}" cy="{row_y}" r="3.5" fill="{colour}"/>',
            f'<text class="legend" x="{legend_x + 32}" y="{row_y + 4}">{escape(line.label)}</text>',
        ]
    note_y = legend_y + 20 * len(series) + 10
    out += [
        f'<line x1="{legend_x}" y1="{note_y}" x2="{legend_x + 24}" y2="{note_y}" stroke="black" '
        'stroke-width="1.5" stroke-dasharray="6 4"/>',
        f'<text class="legend" x="{legend_x + 32}" y="{note_y + 4}">the link\'s bound: batch / '
        "floor step</text>",
        f'<text class="legend" x="{legend_x + 32}" y="{note_y + 20}">(bytes moved per step over '
        "the measured</text>",
        f'<text class="legend" x="{legend_x + 32}" y="{note_y + 36}">pinned bandwidth)</text>',
        "</svg>",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="bench or envelope JSON files")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the SVG to write")
    parser.add_argument("--title", default="Decode throughput against batch, with the link's bound")
    args = parser.parse_args(argv)
    try:
        series = read_series(args.inputs)
    except PlotError as exc:
        print(f"plot: error: {exc}", file=sys.stderr)
        return 1
    args.output.write_text(render(series, args.title), encoding="utf-8")
    print(f"{args.output}: {len(series)} configurations", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
