"""What fetch costs on loopback: downloads with 1, 2 and 4 files in flight, and fetch end to end
(download + check + convert + delete) against converting a folder already on disk.

The mirror runs in its own process (``python -m yalm_runner.mirror``), so the client's threads do
not share a GIL with the server. Loopback has no latency and no per-connection cap, so this
measures what parallelism *costs* (threads, CPU, the disk), not what it buys on a long fat link.

    python benchmarks/fetch_throughput.py [--layers 6] [--hidden 2048] [--dir FOLDER]

Prints one table; each row is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from yalm_runner.convert import convert_release
from yalm_runner.downloader import Downloader
from yalm_runner.fetch import fetch_release
from yalm_runner.quant import Quantization
from yalm_runner.tiny import TinySpec, make_tiny


def release_files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def download_all(url: str, names: list[str], into: Path, parallel: int) -> float:
    started = time.perf_counter()
    with Downloader() as loader, ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda name: loader.download(url + name, into / name), names))
    return time.perf_counter() - started


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        release = work / "mirror" / "rel"
        make_tiny(
            release,
            TinySpec(
                num_layers=args.layers,
                embedding_size=256,
                hidden_size=args.hidden,
                num_heads=16,
                ffn_size=args.hidden * 8 // 3 // 2 * 2,  # even, for int4
                dtype=torch.bfloat16,
            ),
        )
        names = release_files(release)
        total = sum((release / name).stat().st_size for name in names)
        largest = max((release / name).stat().st_size for name in names)
        mirror = [sys.executable, "-m", "yalm_runner.mirror", str(work / "mirror")]
        server = subprocess.Popen(
            [*mirror, "--port", "0", "--host", "127.0.0.1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            url = server.stdout.readline().split(" at ")[1].strip() + "rel/"
            runs = {
                f"download only, {parallel} in flight": (
                    lambda target, p=parallel: download_all(url, names, target, p)
                )
                for parallel in (1, 2, 4)
            }
            for quantize in (None, "int4"):
                quantization = Quantization(quantize) if quantize else None
                what = quantize or "bf16"
                runs[f"convert from disk ({what})"] = lambda target, q=quantization: timed(
                    lambda: convert_release(release, target, num_heads=16, quantization=q)
                )
                for parallel in (1, 2):
                    runs[f"fetch ({what}), {parallel} in flight"] = (
                        lambda target, q=quantization, p=parallel: timed(
                            lambda: fetch_release(
                                target, source=url, num_heads=16, quantization=q, parallel=p
                            )
                        )
                    )
            # Rounds interleave the runs, so a change in the machine's load hits all alike.
            times: dict[str, list[float]] = {label: [] for label in runs}
            for _ in range(args.repeats):
                for label, run in runs.items():
                    target = work / "out"
                    times[label].append(run(target))
                    shutil.rmtree(target, ignore_errors=True)
                    print(f"{label}: {times[label][-1]:.2f} s", file=sys.stderr)
            rows = []
            for label, seconds in times.items():
                median = statistics.median(seconds)
                rows.append((label, median, total / median / 1e6))
        finally:
            server.terminate()
            server.wait()
        print(
            f"release: {len(names)} files, {total / 1e6:.0f} MB (largest {largest / 1e6:.0f} MB),"
            f" {args.layers} layers of hidden {args.hidden}; loopback, median of {args.repeats};"
            f" {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
        )
        print(f"| {'run':<30} | seconds | release MB/s |")
        print(f"| {'-' * 30} | ------- | ------------ |")
        for label, seconds, rate in rows:
            print(f"| {label:<30} | {seconds:7.2f} | {rate:12.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
