"""One GPU against several on the same workload: tokens/s, scaling, and identical output.

The workload is a night's worth of prompts, more than one batch: ``rows`` prompts in batches of
the size the planner chooses under the per-GPU budget. It runs once on the first GPU and once
on the first ``gpus`` GPUs (``multigpu.MultiEngine``: batch k on GPU k mod n, one pinned copy
of the weights), and the two runs' ids are compared row by row. Pinned and pageable bandwidth
are measured on every GPU in the same run, since each GPU has its own link.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from yalm_runner.bench.link import measure_h2d
from yalm_runner.bench.synthetic import NO_EOS, SHAPES, SyntheticStore
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.multigpu import MultiEngine
from yalm_runner.offload import OffloadPolicy, parse_bytes
from yalm_runner.planning import plan_memory
from yalm_runner.streaming import StreamingWeights


def _requests(rows: int, prompt_len: int, new_tokens: int) -> list[Request]:
    return [
        Request(
            f"p{row}",
            tuple([1] + [(row * 131 + pos * 17) % 100000 + 100 for pos in range(prompt_len - 1)]),
            new_tokens,
        )
        for row in range(rows)
    ]


def _bandwidth_on(device: int) -> dict[str, float]:
    with torch.cuda.device(device):
        return measure_h2d()


def run(
    shape: str,
    layers: int | None,
    gpus: int,
    policy: OffloadPolicy,
    rows: int,
    prompt_len: int,
    new_tokens: int,
    json_path: Path | None,
) -> dict:
    config = SHAPES[shape] if layers is None else replace(SHAPES[shape], num_layers=layers)
    dtype = torch.bfloat16
    store = SyntheticStore(config, dtype)
    links = [_bandwidth_on(index) for index in range(gpus)]
    plan = plan_memory(
        store,
        torch.device("cuda"),
        dtype,
        policy,
        batch_size=None,
        max_context=prompt_len + new_tokens,
        prompt_tokens=prompt_len,
        rows=-(-rows // gpus),
        copies=gpus,
    )
    print(f"plan per GPU: {plan.describe()}", file=sys.stderr, flush=True)
    requests = _requests(rows, prompt_len, new_tokens)
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    results, outputs = [], {}
    with StreamingWeights(store, "cuda:0", dtype, plan.placement, verify=False) as first:
        sources = [first]
        for index in range(1, gpus):
            sources.append(
                StreamingWeights(
                    store, f"cuda:{index}", dtype, plan.placement, verify=False, share_pinned=first
                )
            )
        for count in (1, gpus):
            engines = [
                Engine.for_plan(source, plan, policy.kv_bits, eos_id=NO_EOS)
                for source in sources[:count]
            ]
            engine = engines[0] if count == 1 else MultiEngine(engines)
            warm = _requests(count, 8, 2)
            engine.generate(warm, sampling, batch_size=1)
            for index in range(count):
                torch.cuda.synchronize(index)
                torch.cuda.reset_peak_memory_stats(index)
            began = time.perf_counter()
            finished = engine.generate(requests, sampling, batch_size=plan.batch_size)
            for index in range(count):
                torch.cuda.synchronize(index)
            elapsed = time.perf_counter() - began
            outputs[count] = [done.new_ids for done in finished]
            new = sum(len(ids) for ids in outputs[count])
            results.append(
                {
                    "gpus": count,
                    "rows": rows,
                    "batch": plan.batch_size,
                    "elapsed_s": elapsed,
                    "tokens_per_s": new / elapsed,
                    "peak_gpu_bytes": max(
                        torch.cuda.max_memory_allocated(index) for index in range(count)
                    ),
                }
            )
            print(f"{count} GPU(s): {new / elapsed:.1f} tokens/s", file=sys.stderr, flush=True)
        for source in sources[1:]:
            source.close()
    identical = outputs[1] == outputs[gpus]
    report = {
        "shape": shape,
        "layers": config.num_layers,
        "links_pinned_gbps": [link["pinned"] / 1e9 for link in links],
        "links_pageable_gbps": [link["pageable"] / 1e9 for link in links],
        "plan": plan.describe(),
        "runs": results,
        "speedup": results[-1]["tokens_per_s"] / results[0]["tokens_per_s"],
        "identical_output": identical,
    }
    print(format_report(report, policy))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict, policy: OffloadPolicy) -> str:
    gib = 2**30
    links = ", ".join(f"{rate:.1f}" for rate in report["links_pinned_gbps"])
    lines = [
        f"shape {report['shape']} x {report['layers']} layers; pinned GB/s per GPU link: {links}",
        f"plan per GPU: {report['plan']}",
        "",
        "| GPUs | rows | batch | elapsed | tokens/s | peak GPU (budget) | vs 1 GPU |",
        "|---|---|---|---|---|---|---|",
    ]
    base = report["runs"][0]["tokens_per_s"]
    budget = f"{policy.gpu_memory_bytes / gib:.0f} GiB" if policy.gpu_memory_bytes else "none"
    for run_ in report["runs"]:
        lines.append(
            f"| {run_['gpus']} | {run_['rows']} | {run_['batch']} | {run_['elapsed_s']:.1f} s | "
            f"{run_['tokens_per_s']:.1f} | {run_['peak_gpu_bytes'] / gib:.2f} GiB ({budget}) | "
            f"{run_['tokens_per_s'] / base:.2f}x |"
        )
    lines.append("")
    lines.append(f"identical output, token for token: {report['identical_output']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="13b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--gpu-memory", default="8GiB")
    parser.add_argument("--cpu-memory")
    parser.add_argument("--kv-bits", type=int, choices=[16, 8, 4], default=16)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("-n", "--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    policy = OffloadPolicy(
        gpu_memory_bytes=parse_bytes(args.gpu_memory) if args.gpu_memory else None,
        cpu_memory_bytes=parse_bytes(args.cpu_memory) if args.cpu_memory else None,
        weights_on="cpu",
        kv_bits=args.kv_bits,
    )
    run(
        args.shape,
        args.layers,
        args.gpus,
        policy,
        args.rows,
        args.prompt_len,
        args.max_new_tokens,
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
