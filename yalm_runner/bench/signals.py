"""What a signal costs on the 100B envelope: scoring against generation from the same prompts.

A signal is one prefill, no decoding: the prompt (~800 tokens of news) packed with its three
answers, and the content-free prompt (the template with no news, ~100 tokens) with the same
answers, as the pipeline scores them (``flows/generation/signals.py``). Every layer streams once
per scoring batch, and the batch is bounded by activations alone, sized by the planner in the
room the generation plan keeps beside the weights (``MemoryPlan.score_room_bytes``), as the
nightly session does.

``run_signals`` builds the envelope's synthetic compressed store (``envelope``: random 4-bit
codes in YaLM-100B's shape, never a 16-bit copy), plans the generation batch from the budgets,
scores that many prompts (one warm-up pass first), then generates ``-n`` tokens for the same
prompts at the planner's batch, and prints one table: signals per hour beside texts per hour,
passes, bytes streamed, time. ``--shape tiny --device cpu`` runs the same code on a CPU in
seconds (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from yalm_runner.bench.envelope import CompressedSyntheticStore
from yalm_runner.bench.synthetic import NO_EOS, SHAPES
from yalm_runner.config import ModelConfig, SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.offload import OffloadPolicy, parse_bytes
from yalm_runner.packing import ScoreRequest
from yalm_runner.planning import ScoreShape, fit_score_batch, plan_memory
from yalm_runner.quant import Quantization
from yalm_runner.streaming import StreamingWeights

ANSWER_TOKENS = (1, 2, 3)  # " rise", " fall", " stay flat": answers of 1 to 3 tokens


def _ids(config: ModelConfig, row: int, length: int, salt: int) -> list[int]:
    """``length`` deterministic ids after BOS, inside the vocabulary, none of them EOS."""
    span = config.vocab_size - 3
    return [1] + [(row * 7919 + pos * 31 + salt) % span + 3 for pos in range(length - 1)]


def score_requests(
    config: ModelConfig, rows: int, prompt_len: int, free_len: int, answers: int
) -> list[ScoreRequest]:
    """Per prompt, its row and its content-free row, each with ``answers`` answers."""
    requests = []
    for row in range(rows):
        for kind, length in (("prompt", prompt_len), ("free", free_len)):
            context = _ids(config, row, length, 0 if kind == "prompt" else 17)
            sequences = tuple(
                tuple(context + _ids(config, row, 1 + tokens, 101 + answer)[1:])
                for answer, tokens in zip(range(answers), ANSWER_TOKENS * answers, strict=False)
            )
            requests.append(ScoreRequest(f"{kind}{row}", len(context), sequences))
    return requests


def run_signals(
    shape: str,
    layers: int | None,
    quantization: Quantization,
    policy: OffloadPolicy,
    device: torch.device,
    prompt_len: int,
    free_len: int,
    answers: int,
    new_tokens: int,
    rows: int | None,
    json_path: Path | None,
) -> dict:
    config = SHAPES[shape] if layers is None else replace(SHAPES[shape], num_layers=layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    store = CompressedSyntheticStore(config, quantization, dtype)
    plan = plan_memory(
        store,
        device,
        dtype,
        policy,
        batch_size=rows,
        max_context=prompt_len + new_tokens,
        prompt_tokens=prompt_len,
    )
    _log(f"plan: {plan.describe()}")
    requests = score_requests(config, plan.batch_size, prompt_len, free_len, answers)
    shape_ = ScoreShape(
        tokens=max(request.packed_len for request in requests),
        positions=max(request.scored_positions for request in requests),
        rows=len(requests),
    )
    scoring = fit_score_batch(config, dtype, plan.score_room_bytes, shape_)
    room = plan.score_room_bytes
    _log(f"scoring: {scoring.describe()} in the plan's "
         f"{'unbounded room' if room is None else f'{room / 2**30:.2f} GiB'}")  # fmt: skip
    began = time.perf_counter()
    with StreamingWeights(store, device, dtype, plan.placement, verify=False) as weights:
        load_s = time.perf_counter() - began
        cuda = device.type == "cuda"
        if cuda and policy.gpu_memory_bytes:  # a hard cap: going over is an out-of-memory error
            total = torch.cuda.get_device_properties(device).total_memory
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(policy.gpu_memory_bytes / total, index)
        engine = Engine.for_plan(weights, plan, policy.kv_bits, eos_id=NO_EOS)
        engine.reserve(plan.batch_size, plan.max_context)
        engine.score(requests[:2], batch_size=2)  # warm-up: kernels, allocator, first reads
        engine.generate([Request("warm", tuple(_ids(config, 0, 8, 5)), 2)],
                        SamplingParams(greedy=True), batch_size=1)  # fmt: skip
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

        engine.stats = type(engine.stats)()
        began = time.perf_counter()
        engine.score(requests, batch_size=scoring.batch_size, group_rows=scoring.group_rows)
        if cuda:
            torch.cuda.synchronize(device)
        score_s = time.perf_counter() - began
        score_stats = engine.stats
        score_peak = torch.cuda.max_memory_allocated(device) if cuda else 0

        engine.stats = type(engine.stats)()
        prompts = [
            Request(f"text{row}", tuple(_ids(config, row, prompt_len, 0)), new_tokens)
            for row in range(plan.batch_size)
        ]
        began = time.perf_counter()
        finished = engine.generate(prompts, SamplingParams(greedy=True), batch_size=plan.batch_size)
        if cuda:
            torch.cuda.synchronize(device)
        generate_s = time.perf_counter() - began
        generate_stats = engine.stats
        peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    assert all(len(done.new_ids) == new_tokens for done in finished)
    signals = plan.batch_size  # each signal: its prompt's row and its content-free row
    result = {
        "shape": shape,
        "layers": config.num_layers,
        "device": str(device),
        "quantization": quantization.to_dict(),
        "gpu_budget": policy.gpu_memory_bytes,
        "cpu_budget": policy.cpu_memory_bytes,
        "plan": plan.describe(),
        "scoring_plan": scoring.describe(),
        "prompt_tokens": prompt_len,
        "content_free_tokens": free_len,
        "answers": answers,
        "signals": signals,
        "score_rows": len(requests),
        "score_batch": scoring.batch_size,
        "score_passes": score_stats.forward_passes,
        "score_s": score_s,
        "score_bytes_moved": score_stats.bytes_moved,
        "score_tokens": score_stats.prompt_tokens,
        "signals_per_hour": signals * 3600 / score_s,
        "texts": len(finished),
        "generate_batch": plan.batch_size,
        "new_tokens": new_tokens,
        "generate_passes": generate_stats.forward_passes,
        "generate_s": generate_s,
        "generate_bytes_moved": generate_stats.bytes_moved,
        "texts_per_hour": len(finished) * 3600 / generate_s,
        "score_peak_gpu_bytes": score_peak,
        "peak_gpu_bytes": peak,
        "load_s": load_s,
    }
    print(format_signals(result))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    return result


def format_signals(r: dict) -> str:
    gib = 2**30
    lines = [
        f"YaLM shape {r['shape']} x {r['layers']} layers, {r['quantization']['scheme']} weights "
        f"on {r['device']}",
        f"plan: {r['plan']}",
        f"scoring: {r['scoring_plan']}",
        "",
        "| work | items | batch | passes | elapsed | per hour | moved |",
        "|---|---|---|---|---|---|---|",
        f"| signals: {r['prompt_tokens']}-token prompt + {r['content_free_tokens']}-token "
        f"content-free prompt, {r['answers']} answers each | {r['signals']} | "
        f"{r['score_batch']} rows | {r['score_passes']} | {r['score_s']:.1f} s | "
        f"{r['signals_per_hour']:.0f} signals | {r['score_bytes_moved'] / 1e9:.1f} GB |",
        f"| texts: {r['new_tokens']} new tokens from the same prompts | {r['texts']} | "
        f"{r['generate_batch']} rows | {r['generate_passes']} | {r['generate_s']:.1f} s | "
        f"{r['texts_per_hour']:.0f} texts | {r['generate_bytes_moved'] / 1e9:.1f} GB |",
    ]
    if r["gpu_budget"] and r["peak_gpu_bytes"]:
        lines += [
            "",
            f"peak GPU: scoring {r['score_peak_gpu_bytes'] / gib:.2f} GiB, generation "
            f"{r['peak_gpu_bytes'] / gib:.2f} GiB, of {r['gpu_budget'] / gib:.2f} GiB; weights "
            f"placed in {r['load_s']:.0f} s",
        ]
    return "\n".join(lines)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="yalm-100b", help="yalm-100b, 13b or tiny")
    parser.add_argument("--layers", type=int, help="override the shape's layer count")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quantize", choices=["int8", "int4"], default="int4")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--gpu-memory", default="8GiB")
    parser.add_argument("--cpu-memory", default="64GiB")
    parser.add_argument("--kv-bits", type=int, choices=[16, 8, 4], default=4)
    parser.add_argument("--prompt-len", type=int, default=800, help="tokens of a signal's prompt")
    parser.add_argument("--content-free-len", type=int, default=100, help="its content-free one")
    parser.add_argument("--answers", type=int, default=3)
    parser.add_argument("-n", "--max-new-tokens", type=int, default=128)
    parser.add_argument("--rows", type=int, help="generation batch (default: the planner's)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    policy = OffloadPolicy(
        gpu_memory_bytes=parse_bytes(args.gpu_memory),
        cpu_memory_bytes=parse_bytes(args.cpu_memory),
        weights_on="cpu" if device.type == "cuda" else "auto",
        kv_on="auto" if device.type == "cuda" else "gpu",
        kv_bits=args.kv_bits if device.type == "cuda" else 16,
    )
    run_signals(
        args.shape,
        args.layers,
        Quantization(args.quantize, args.group_size),
        policy,
        device,
        args.prompt_len,
        args.content_free_len,
        args.answers,
        args.max_new_tokens,
        args.rows,
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
