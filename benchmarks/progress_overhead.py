"""What the Prefect UI's progress costs a generation: the same engine job with no per-step
callback, with the token count published at the default rate (every 5 s), and published as
fast as the receiver answers (every step), on the CPU with a tiny model (or any store given).

The publisher is the pipeline's own (``flows.generation.progress``) and sends each update over
real HTTP to a loopback server that answers at once, so the thread, the requests and the
callback's counting are all in the time. Prints a table: median wall time per job, the decode
steps reported, the updates sent, and the difference against no callback.

    python benchmarks/progress_overhead.py [--model STORE] [--repeats 5]

On a machine other work shares, run it with ``OMP_NUM_THREADS=1``: torch's threads otherwise
wait on each other for whichever core is busy, and the spread swamps what is measured.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import torch

from flows.generation.progress import ProgressPublisher, ProgressSender, TokenProgress
from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import SamplingParams
from yalm_runner.convert import convert_release
from yalm_runner.engine import Engine, Request
from yalm_runner.offload import ResidentWeights
from yalm_runner.tiny import TinySpec, make_tiny
from yalm_runner.tokenizer import Tokenizer

SAMPLING = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)


class Receiver(BaseHTTPRequestHandler):
    """Answers every POST and PATCH with 200 at once, as a healthy Prefect server would."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_POST = do_PATCH = _answer

    def log_message(self, *args: object) -> None:
        pass


def make_store(folder: Path) -> Path:
    spec = TinySpec(num_layers=6, embedding_size=64, hidden_size=384, num_heads=6,
                    ffn_size=1024, dtype=torch.float32, seed=3)  # fmt: skip
    make_tiny(folder / "release", spec)
    convert_release(folder / "release", folder / "store", num_heads=6)
    return folder / "store"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a store (default: make a tiny one)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("-n", "--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/api/artifacts"

    with tempfile.TemporaryDirectory() as scratch, httpx.Client() as client:
        store = ModelStore.open(args.model or make_store(Path(scratch)))
        tokenizer = Tokenizer(store.tokenizer_path)
        engine = Engine(ResidentWeights(store, "cpu", torch.float32))
        requests = [
            Request(f"row-{n}", tuple(tokenizer.encode(f"The market {n} rose")),
                    args.max_new_tokens)
            for n in range(args.rows)
        ]  # fmt: skip
        sender = ProgressSender(
            "the benchmark's receiver",
            create=lambda percent, text: client.post(url, json={"data": percent}).status_code,
            update=lambda handle, percent, text: client.patch(url, json={"data": percent}),
        )

        def job(every_s: float | None) -> tuple[float, int, int]:
            steps = []
            if every_s is None:
                began = time.perf_counter()
                engine.generate(requests, SAMPLING, batch_size=args.batch_size)
                return time.perf_counter() - began, 0, 0
            publisher = ProgressPublisher(sender, every_s=every_s)
            progress = TokenProgress(publisher, args.rows * args.max_new_tokens, args.rows)

            def on_step(new_tokens: int) -> None:
                steps.append(new_tokens)
                progress.step(new_tokens)

            began = time.perf_counter()
            with publisher:
                engine.generate(requests, SAMPLING, batch_size=args.batch_size, on_step=on_step,
                                on_finished=lambda row: progress.row_finished(
                                    args.max_new_tokens - len(row.new_ids)))  # fmt: skip
            return time.perf_counter() - began, len(steps), publisher.updates

        job(None)  # warm up
        modes = [("no per-step callback", None), ("published every 5 s (default)", 5.0),
                 ("published every step it can", 0.0)]  # fmt: skip
        # The modes take turns, so that a change in the machine's load falls on all of them.
        runs = {label: [] for label, _ in modes}
        for _ in range(args.repeats):
            for label, every_s in modes:
                runs[label].append(job(every_s))
        results = [(label, statistics.median(run[0] for run in runs[label]), runs[label][-1])
                   for label, _ in modes]  # fmt: skip
    server.shutdown()

    print(f"{args.rows} rows x {args.max_new_tokens} new tokens, batch {args.batch_size}, "
          f"median of {args.repeats}; torch threads {torch.get_num_threads()}")  # fmt: skip
    header = f"{'mode':<32} {'wall s':>8} {'vs none':>8} {'steps':>6} {'updates':>8}"
    print(header)
    print("-" * len(header))
    base = results[0][1]
    for label, wall, (_, steps, updates) in results:
        print(f"{label:<32} {wall:>8.3f} {(wall / base - 1) * 100:>+7.1f}% {steps:>6} "
              f"{updates:>8}")  # fmt: skip


if __name__ == "__main__":
    main()
