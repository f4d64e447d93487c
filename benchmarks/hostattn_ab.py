"""The host attention kernel against its own source at another revision, on this machine.

Both sources are compiled (``hostattn``'s build, its cache folder) and called in turn on the
same records, so that a busy machine's drift falls on both alike; prints each one's median time
and G elements/s, their ratio, and whether their outputs are the same bits. How session 10's
per-core figures in benchmarks/RESULTS.md were taken.

    python benchmarks/hostattn_ab.py REV [--bits 4] [--threads 1] [--rows 32] [--context 178]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from yalm_runner import hostattn
from yalm_runner.kvformat import encode_kv


def source_at(revision: str) -> str:
    """``hostattn.SOURCE`` as committed at ``revision``."""
    text = subprocess.run(
        ["git", "show", f"{revision}:yalm_runner/hostattn.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    source = text.split('SOURCE = r"""', 1)[1].split('"""', 1)[0]
    if "yalm_vector_path" not in source:  # older than the symbol the module now asks for
        source += '\nconst char *yalm_vector_path(void) { return "not said"; }\n'
    return source


def build(source: str):
    """The compiled kernel for ``source`` (the module's build, pointed at that source)."""
    hostattn.SOURCE, hostattn._library, hostattn._why_not = source, None, None
    if not hostattn.available():
        raise SystemExit(f"cannot build: {hostattn.unavailable_reason()}")
    return hostattn._library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the revision to compare the working tree's kernel to")
    parser.add_argument("--bits", type=int, default=4, choices=[8, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--context", type=int, default=178)
    parser.add_argument("--calls", type=int, default=25, help="of each; the first 3 not counted")
    args = parser.parse_args()
    current = hostattn.SOURCE
    libraries = {args.revision: build(source_at(args.revision)), "working tree": build(current)}
    heads, dim = 128, 80  # YaLM-100B's
    generator = torch.Generator().manual_seed(0)
    shape = (args.rows, args.context, heads, dim)
    keys, values = (
        encode_kv(torch.randn(shape, generator=generator).to(torch.bfloat16), args.bits)
        for _ in range(2)
    )
    step = [torch.randn(args.rows, heads, dim, generator=generator) for _ in range(3)]
    valid = torch.ones(args.rows, args.context, dtype=torch.bool)
    out = torch.empty(args.rows, heads, dim)
    times: dict[str, list[float]] = {name: [] for name in libraries}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.calls):
        for name, library in libraries.items():
            hostattn._library = library
            began = time.perf_counter()
            hostattn.attend(keys, values, args.bits, torch.bfloat16, *step, valid, out=out,
                            threads=args.threads)  # fmt: skip
            times[name].append(time.perf_counter() - began)
            outputs.setdefault(name, out.clone())
    elements = 2 * args.rows * args.context * heads * dim
    medians = {name: statistics.median(spent[3:]) for name, spent in times.items()}
    print(f"{args.bits}-bit, {args.threads} thread(s), {args.rows} rows x {args.context} slots")
    for name, median in medians.items():
        print(f"  {name:>14}: {median * 1e3:.2f} ms, {elements / median / 1e9:.2f} G elements/s")
    before, after = medians.values()
    same = torch.equal(*outputs.values())
    print(f"  working tree / {args.revision}: {after / before:.3f}; same bits: {same}")


if __name__ == "__main__":
    main()
