"""What exact resume costs and saves: kills at fractions of a job, the re-run's time, and the
overhead of KV checkpoints.

The job is the issue's: a random release-layout model with nearly flat next-token distributions
over the real vocabulary (by default 8 layers, hidden 768, 12 heads, GeGLU 2048), 24 prompts,
``--temp 0.8 --top-p 0.9 -s 7 -n 96``, batches of 8, fp32 on the CPU (or bf16 with
``--device cuda``). Every run is a real ``yalm-runner generate`` process:

- the uninterrupted run (its wall time T), and an empty one (start-up S: interpreter, model
  load), so that the work is W = T - S;
- for each fraction f (0.35, 0.6, 0.85 of the decode forwards) and each KV interval (every
  checkpoint; the default, which in a job this short writes none), a run SIGKILLed by itself at
  that forward, then the re-run: its wall time against (1 - f) W + S, and whether its output is
  byte for byte the uninterrupted one's;
- the overhead: tokens/s (the engine's, over prefill and decode; the median of ``--repeats``
  in-process runs, interleaved) and KV bytes written with KV checkpoints off, at the default
  interval and at every checkpoint.

With ``--envelope`` (a CUDA machine) it measures instead YaLM-100B's shape in the 8 GiB /
64 GiB envelope (``yalm_runner.bench.envelope``'s synthetic int4 store and plan): one weight
placement, the same batch decoded with KV checkpoints off and at every ids checkpoint
(``--checkpoint-every``), written to ``--kv-dir`` (put it on the NVMe drive the state would
use), tokens/s and bytes written per hour.

    python benchmarks/resume_exact.py [--device cuda] [--layers 4 --hidden 256 ...]
    python benchmarks/resume_exact.py --envelope --kv-dir /nvme/kvstate
    python benchmarks/resume_exact.py --envelope --envelope-shape tiny   # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FRACTIONS = (0.35, 0.6, 0.85)
PREFIXES = ["The market", "Сбербанк повысил", "Oil prices fell", "Analysts expect", "Яндекс"]
EVERY = "1e-9"  # a KV checkpoint at every ids checkpoint


def make_model(folder: Path, args: argparse.Namespace) -> Path:
    from yalm_runner.convert import convert_release
    from yalm_runner.tiny import TinySpec, make_tiny
    from yalm_runner.vocab import bundled_vocab_path

    spec = TinySpec(
        num_layers=args.layers,
        embedding_size=64,
        hidden_size=args.hidden,
        num_heads=args.heads,
        ffn_size=args.ffn,
        dtype=torch.float32,
        seed=3,
        embedding_std=0.03,  # flat distributions: the last bits decide tokens
    )
    make_tiny(folder / "release", spec, vocab=bundled_vocab_path())
    convert_release(folder / "release", folder / "store")
    return folder / "store"


def write_prompts(path: Path, count: int) -> Path:
    rows = [{"prefix": f"{PREFIXES[n % len(PREFIXES)]} {n}"} for n in range(count)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def command(args, store: Path, prompts: Path, output: Path, interval: str | None) -> list[str]:
    dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    line = ["generate", "-m", str(store), "--input", str(prompts), "--output", str(output)]
    line += ["-n", str(args.new_tokens), "--temp", "0.8", "--top-p", "0.9", "-s", "7"]
    line += ["--batch-size", str(args.batch_size), "--device", args.device, "--dtype", dtype]
    line += ["--checkpoint-every", str(args.checkpoint_every)]
    return line + (["--kv-checkpoint-interval", interval] if interval is not None else [])


def run(line: list[str], kill_at: int = 0) -> tuple[float, int, str]:
    """Run ``yalm-runner LINE`` (SIGKILLed as decode forward ``kill_at`` begins); returns the
    wall time, the exit status and stderr."""
    prefix = [sys.executable, __file__, "--child-kill", str(kill_at), "--"]
    began = time.perf_counter()
    done = subprocess.run(
        prefix + line, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return time.perf_counter() - began, done.returncode, done.stderr


def child(kill_at: int, line: list[str]) -> int:
    """``yalm-runner LINE`` in this process, SIGKILLed as decode forward ``kill_at`` begins."""
    from yalm_runner import engine
    from yalm_runner.cli import main

    if kill_at:
        plain, seen = engine.Engine._forward, {"decode": 0}

        def forward(self, state, tokens):
            if tokens.shape[1] == 1:
                seen["decode"] += 1
                if seen["decode"] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return plain(self, state, tokens)

        engine.Engine._forward = forward
    return main(line)


def overhead(args, store: Path, prompts: Path, folder: Path, interval: str) -> dict:
    """One in-process job: the engine's tokens/s and the KV bytes it wrote."""
    from yalm_runner import kvstate
    from yalm_runner.config import SamplingParams
    from yalm_runner.runner import generate_file

    written = {"bytes": 0, "frames": 0}
    plain = kvstate.ExactState.write_kv

    def counted(self, live):
        frame = plain(self, live)
        written["bytes"] += frame.header["frames"][-1][1]
        written["frames"] += 1
        return frame

    kvstate.ExactState.write_kv = counted
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        began = time.perf_counter()
        stats = generate_file(
            store,
            prompts,
            folder / f"overhead-{interval}.jsonl",
            sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=7),
            max_new_tokens=args.new_tokens,
            device=args.device,
            dtype=torch.bfloat16 if args.device.startswith("cuda") else torch.float32,
            batch_size=args.batch_size,
            checkpoint_every=args.checkpoint_every,
            kv_checkpoint_interval_s=float(interval),
            resume=False,
        )
        wall_s = time.perf_counter() - began
    finally:
        kvstate.ExactState.write_kv = plain
        torch.set_num_threads(threads)
    return {"tokens_per_s": stats.tokens_per_s, "wall_s": wall_s, **written}


def bench(args: argparse.Namespace) -> None:
    folder = Path(args.dir or tempfile.mkdtemp(prefix="resume-exact-"))
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model" / "store"
    store = Path(args.model) if args.model else model if model.exists() else make_model(
        folder / "model", args)  # fmt: skip
    prompts = write_prompts(folder / "in.jsonl", args.prompts)
    print(f"{args.prompts} prompts, -n {args.new_tokens}, batch {args.batch_size}, "
          f"--checkpoint-every {args.checkpoint_every}, {args.device}, model {args.layers} "
          f"layers x hidden {args.hidden}, torch {torch.__version__}", flush=True)  # fmt: skip
    if args.only in (None, "kills"):
        kills(args, store, prompts, folder)
    if args.only in (None, "overhead"):
        costs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):  # interleaved: a busy moment of the machine hits all
            for name, value in (("off (0)", "0"), ("default (600 s)", "600"),
                                ("every checkpoint", EVERY)):  # fmt: skip
                costs.setdefault(name, []).append(overhead(args, store, prompts, folder, value))
        print()
        print(f"| KV checkpoints | tokens/s (median of {args.repeats}) | KV frames | "
              "KV bytes written | wall (median) |")  # fmt: skip
        print("|---|---|---|---|---|")
        for name, runs in costs.items():
            rate = statistics.median(run["tokens_per_s"] for run in runs)
            wall = statistics.median(run["wall_s"] for run in runs)
            print(f"| {name} | {rate:.1f} | {runs[0]['frames']} | "
                  f"{runs[0]['bytes'] / 2**20:.1f} MiB | {wall:.1f} s |")  # fmt: skip


def kills(args: argparse.Namespace, store: Path, prompts: Path, folder: Path) -> None:
    """Kills at each fraction, each KV interval, and the re-runs' times; prints the table."""
    one = write_prompts(folder / "one.jsonl", 1)
    startup_s, status, err = run([*command(args, store, one, folder / "one.out", None), "-n", "1"])
    assert status == 0, err
    reference = folder / "reference.jsonl"
    full_s, status, err = run(command(args, store, prompts, reference, None))
    assert status == 0, err
    work_s = full_s - startup_s
    forwards = _decode_forwards(args, store, prompts)
    print(f"start-up {startup_s:.1f} s; uninterrupted {full_s:.1f} s; {forwards} decode forwards")
    rows = []
    for fraction in args.fractions:
        for label, interval in (("every checkpoint", EVERY), ("default (600 s)", None)):
            output = folder / f"killed-{fraction}-{interval}.jsonl"
            for stale in folder.glob(output.name + "*"):
                stale.unlink() if stale.is_file() else _remove_tree(stale)
            line = command(args, store, prompts, output, interval)
            _, status, err = run(line, kill_at=max(1, round(fraction * forwards)))
            assert status == -signal.SIGKILL, f"the kill at {fraction} did not land: {err}"
            rerun_s, status, err = run(line)
            assert status == 0, err
            expected_s = (1 - fraction) * work_s + startup_s
            same = output.read_bytes() == reference.read_bytes()
            rows.append((fraction, label, rerun_s, expected_s, same))
            print(f"  killed at {fraction:.0%}, KV {label}: re-run {rerun_s:.1f} s", flush=True)
    print()
    print("| killed at | KV checkpoints | re-run | (1 - f) x work + start-up | ratio | output |")
    print("|---|---|---|---|---|---|")
    print(f"| (uninterrupted) | - | {full_s:.1f} s | - | - | - |")
    for fraction, label, rerun_s, expected_s, same in rows:
        verdict = "identical" if same else "DIFFERENT"
        print(f"| {fraction:.0%} | {label} | {rerun_s:.1f} s | {expected_s:.1f} s | "
              f"{rerun_s / expected_s:.2f} | {verdict} |", flush=True)  # fmt: skip


def _decode_forwards(args, store: Path, prompts: Path) -> int:
    """How many decode forwards the job makes (from an in-process run's counts)."""
    from yalm_runner.config import SamplingParams
    from yalm_runner.runner import generate_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            stats = generate_file(
                store,
                prompts,
                Path(scratch) / "count.jsonl",
                sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=7),
                max_new_tokens=args.new_tokens,
                device=args.device,
                dtype=torch.bfloat16 if args.device.startswith("cuda") else torch.float32,
                batch_size=args.batch_size,
                checkpoint_every=0,
            )
    finally:
        torch.set_num_threads(threads)
    return stats.forward_passes - len(stats.batch_sizes)


def _remove_tree(path: Path) -> None:
    for item in path.iterdir():
        item.unlink()
    path.rmdir()


def envelope_prompts(vocab: int, rows: int, low: int, high: int, new: int) -> tuple:
    """The envelope's prompts: ``low .. high`` tokens, ids spread over the vocabulary."""
    from yalm_runner.engine import Request

    span = high - low + 1
    return tuple(
        Request(
            f"text{row}",
            (
                1,
                *(
                    (row * 7919 + pos * 31) % (vocab - 100) + 100
                    for pos in range(low + row % span - 1)
                ),
            ),
            new,
        )
        for row in range(rows)
    )


def envelope(args: argparse.Namespace) -> None:
    """YaLM-100B's envelope: the same batch with KV checkpoints off and at every checkpoint."""
    from dataclasses import replace

    from yalm_runner.batchstate import PlannedBatch
    from yalm_runner.bench.envelope import CompressedSyntheticStore
    from yalm_runner.bench.synthetic import NO_EOS, SHAPES
    from yalm_runner.config import SamplingParams
    from yalm_runner.engine import Engine
    from yalm_runner.kvstate import ExactState
    from yalm_runner.offload import OffloadPolicy, parse_bytes
    from yalm_runner.planning import plan_memory
    from yalm_runner.quant import Quantization
    from yalm_runner.streaming import StreamingWeights

    config = SHAPES[args.envelope_shape]
    config = config if args.envelope_layers is None else replace(
        config, num_layers=args.envelope_layers)  # fmt: skip
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    policy = OffloadPolicy(gpu_memory_bytes=parse_bytes("8GiB"), cpu_memory_bytes=parse_bytes(
        "64GiB"), weights_on="cpu", kv_on="auto", kv_bits=4)  # fmt: skip
    store = CompressedSyntheticStore(config, Quantization("int4", 128), dtype)  # as recorded
    plan = plan_memory(store, device, dtype, policy, batch_size=args.envelope_batch,
                       max_context=128 + args.new_tokens, prompt_tokens=128)  # fmt: skip
    print(f"plan: {plan.describe()}", file=sys.stderr)
    kv_dir = Path(args.kv_dir or tempfile.mkdtemp(prefix="kvstate-")) / "resume-exact-bench"
    results = {}
    with StreamingWeights(store, device, dtype, plan.placement, verify=False) as weights:
        engine = Engine.for_plan(weights, plan, 4, eos_id=NO_EOS)
        engine.reserve(plan.batch_size, plan.max_context)

        requests = envelope_prompts(config.vocab_size, plan.batch_size, 100, 128, args.new_tokens)
        warm = envelope_prompts(config.vocab_size, 1, 8, 8, 2)
        engine.run_batches([PlannedBatch(0, warm, SamplingParams(greedy=True))])
        for name, every in (("off", False), ("every checkpoint", True)):
            state = ExactState(kv_dir, None, lambda: None)
            written = {"bytes": 0, "s": 0.0}

            def on_checkpoint(live, every=every, state=state, written=written):
                if every:
                    began = time.perf_counter()
                    frame = state.write_kv(live)
                    state.commit(frame)
                    written["s"] += time.perf_counter() - began
                    written["bytes"] += frame.header["frames"][-1][1]

            engine.stats = type(engine.stats)()
            synchronize()
            began = time.perf_counter()
            engine.run_batches(
                [PlannedBatch(1, requests, SamplingParams(greedy=True))],
                checkpoint_every=args.checkpoint_every,
                on_checkpoint=on_checkpoint,
            )
            synchronize()
            elapsed = time.perf_counter() - began
            state.discard()
            new = plan.batch_size * args.new_tokens
            results[name] = (new / elapsed, elapsed, written["bytes"], written["s"])
    print(f"{args.envelope_shape} shape x {config.num_layers} layers, int4 g128, 4-bit KV; batch "
          f"{plan.batch_size}, -n {args.new_tokens}, --checkpoint-every {args.checkpoint_every}; "
          f"KV to {kv_dir}")  # fmt: skip
    print()
    print("| KV checkpoints | tokens/s | elapsed | KV written | writing | GB per hour |")
    print("|---|---|---|---|---|---|")
    for name, (rate, elapsed, nbytes, writing_s) in results.items():
        print(f"| {name} | {rate:.1f} | {elapsed:.1f} s | {nbytes / 1e9:.2f} GB | "
              f"{writing_s:.1f} s | {nbytes / 1e9 * 3600 / elapsed:.0f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-kill"]:
        return child(int(argv[1]), argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="default: cpu; cuda with --envelope")
    parser.add_argument("--model", help="a store to use instead of the flat random model")
    parser.add_argument("--dir", help="where to keep the model and the outputs (default: temp)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("-n", "--new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=16)
    parser.add_argument("--fractions", type=lambda text: [float(f) for f in text.split(",")],
                        default=list(FRACTIONS))  # fmt: skip
    parser.add_argument("--only", choices=["kills", "overhead"], help="one of the two tables")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each overhead setting")
    parser.add_argument("--envelope", action="store_true", help="YaLM-100B's envelope (CUDA)")
    parser.add_argument("--envelope-layers", type=int, help="fewer layers, for a smoke run")
    parser.add_argument("--envelope-shape", default="yalm-100b", help="tiny: a smoke run on a CPU")
    parser.add_argument("--kv-dir", help="where --envelope writes its KV files")
    parser.add_argument(
        "--envelope-batch",
        type=int,
        help="rows (default: the planner's; 64 is the whole envelope's)",
    )
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if args.envelope else "cpu")
    if args.envelope:
        if args.new_tokens == 96:
            args.new_tokens = 128  # the envelope's own
        envelope(args)
    else:
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
