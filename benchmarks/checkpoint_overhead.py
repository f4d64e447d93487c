"""What resumability costs: a generation job with checkpoints off, at the default interval, and
at every decode step, on the CPU with a tiny model (or any store given with --model).

Prints a table: median wall time per job, the state saves it made, the time they took each
(timed around StateFile.save itself), and the durable per-row appends to the output log. The
engine-only row runs the same requests with no files at all.

    python benchmarks/checkpoint_overhead.py [--model STORE] [--dir FOLDER] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import SamplingParams
from yalm_runner.convert import convert_release
from yalm_runner.engine import Engine, Request
from yalm_runner.offload import ResidentWeights
from yalm_runner.resume import JobFingerprint, JobState, OutputLog, StateFile
from yalm_runner.runner import DEFAULT_CHECKPOINT_EVERY, generate_file, read_prompts
from yalm_runner.tiny import TinySpec, make_tiny
from yalm_runner.tokenizer import Tokenizer

SAMPLING = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)


class Timed:
    """Wraps a method to record the duration of each call."""

    def __init__(self, owner: type, name: str):
        self.owner, self.name = owner, name
        self.original = getattr(owner, name)
        self.durations: list[float] = []

    def __enter__(self) -> Timed:
        original, durations = self.original, self.durations

        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                durations.append(time.perf_counter() - began)

        setattr(self.owner, self.name, timed)
        return self

    def __exit__(self, *exc_info: object) -> None:
        setattr(self.owner, self.name, self.original)


def make_store(folder: Path) -> Path:
    spec = TinySpec(
        num_layers=6,
        embedding_size=64,
        hidden_size=384,
        num_heads=6,
        ffn_size=1024,
        dtype=torch.float32,
        seed=3,
    )
    make_tiny(folder / "release", spec)
    convert_release(folder / "release", folder / "store", num_heads=6)
    return folder / "store"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a store (default: make a tiny one)")
    parser.add_argument("--dir", type=Path, help="where the output and state files go")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("-n", "--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        scratch = Path(scratch)
        store = args.model or make_store(scratch)
        prompts = scratch / "in.jsonl"
        prompts.write_text(
            "".join(json.dumps({"prefix": f"The market {n} rose"}) + "\n" for n in range(args.rows))
        )
        common = dict(
            sampling=SAMPLING,
            max_new_tokens=args.max_new_tokens,
            device=torch.device("cpu"),
            dtype=torch.float32,
            batch_size=args.batch_size,
        )

        def engine_only() -> float:
            began = time.perf_counter()
            opened = ModelStore.open(store)
            tokenizer = Tokenizer(opened.tokenizer_path)
            requests = [
                Request(row["__key__"], tuple(tokenizer.encode(row["prefix"])), args.max_new_tokens)
                for row in read_prompts(prompts)
            ]
            engine = Engine(ResidentWeights(opened, "cpu", torch.float32))
            engine.generate(requests, SAMPLING, batch_size=args.batch_size)
            return time.perf_counter() - began

        results = []
        engine_walls = [engine_only() for _ in range(args.repeats)]
        results.append(("engine only, no files", statistics.median(engine_walls), 0, [], []))
        reference = None
        for label, every in [
            ("checkpoints off (signals only)", 0),
            (f"default, every {DEFAULT_CHECKPOINT_EVERY} steps", DEFAULT_CHECKPOINT_EVERY),
            ("every step", 1),
        ]:
            walls, saves, appends = [], [], []
            for repeat in range(args.repeats):
                output = scratch / f"out-{every}-{repeat}.jsonl"
                with Timed(StateFile, "save") as saved, Timed(OutputLog, "append") as appended:
                    began = time.perf_counter()
                    stats = generate_file(store, prompts, output, checkpoint_every=every, **common)
                    walls.append(time.perf_counter() - began)
                saves.append(saved.durations)
                appends.append(appended.durations)
                data = output.read_bytes()
                assert reference is None or data == reference, "outputs differ between settings"
                reference = data
            results.append((label, statistics.median(walls), stats.new_tokens, saves, appends))

    full_state_ms = time_full_state_save(args.dir)
    print(
        f"{args.rows} rows x {args.max_new_tokens} new tokens, batch {args.batch_size}, "
        f"median of {args.repeats}; wall time includes loading the store"
    )
    header = f"{'mode':<32} {'wall s':>7} {'vs off':>7} {'saves':>6} {'ms/save':>8}"
    header += f" {'ms/row append':>14}"
    print(header)
    print("-" * len(header))
    off_wall = results[1][1]
    for label, wall, _, saves, appends in results:
        count = len(saves[0]) if saves else 0
        per_save = statistics.median([d for run in saves for d in run]) * 1e3 if saves else 0.0
        per_row = statistics.median([d for run in appends for d in run]) * 1e3 if appends else 0.0
        vs_off = f"{(wall / off_wall - 1) * 100:+.1f}%"
        print(
            f"{label:<32} {wall:>7.3f} {vs_off:>7} {count:>6} {per_save:>8.2f} "
            f"{per_row if appends else float('nan'):>14.2f}"
        )
    print(
        f"a full-size state (32 rows x 1024 ids, a 100B batch at the position limit): "
        f"{full_state_ms:.2f} ms per save"
    )


def time_full_state_save(folder: Path | None, repeats: int = 20) -> float:
    """The median time to save the largest state a 32-row batch of YaLM-100B can have."""
    fingerprint = JobFingerprint("0" * 64, "0" * 64, False, 1.0, 0, 0.9, 1234, 1024, (), "x", "cpu")
    generator = torch.Generator().manual_seed(0)
    partial = {
        f"row-{row}": tuple(torch.randint(0, 128000, (1024,), generator=generator).tolist())
        for row in range(32)
    }
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        state_file = StateFile(Path(scratch) / "out.jsonl.state.json")
        durations = []
        for _ in range(repeats):
            began = time.perf_counter()
            state_file.save(JobState(fingerprint, partial))
            durations.append(time.perf_counter() - began)
    return statistics.median(durations) * 1e3


if __name__ == "__main__":
    main()
