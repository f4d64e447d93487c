"""Ours in ``yalm-runner bench``: one timed generation of the streaming engine at a batch, on
weights already placed, under a hard GPU cap, read back as a table row.

The bytes a decode step moves (the streamed weights, and the live rows' KV cache when it lives
in pinned RAM) are set against the pinned bandwidth measured in the same run. On a CPU (a smoke
run of the bench) the same generation runs with no cap and no peak to read. Knows nothing of
the peers or of how the rows are compared.
"""

from __future__ import annotations

import sys
import time

import torch

from yalm_runner import cudamem
from yalm_runner.bench.synthetic import NO_EOS, estimate_workspace
from yalm_runner.bench.table import BenchRow
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.errors import OffloadError
from yalm_runner.offload import OffloadPolicy, format_bytes, plan_placement
from yalm_runner.planning import MemoryPlan
from yalm_runner.streaming import StreamingWeights, part_bytes_in


def run_ours(
    weights: StreamingWeights,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    policy: OffloadPolicy,
    pinned_bps: float,
    plan: MemoryPlan | None = None,
    system: str | None = None,
    engine: Engine | None = None,
) -> BenchRow:
    """One timed generate() at ``batch`` on already-placed weights; the budget is checked
    first with this batch's KV cache and workspace (``OffloadError`` if it does not fit).
    With ``plan`` (the planner's), its KV placement and prefill chunks are used; ``engine``, one
    made for the same KV placement before, keeps its locked KV memory (run the largest batch
    first)."""
    config, dtype = weights.config, weights.dtype
    cuda = weights.device.type == "cuda"
    element = torch.empty((), dtype=dtype).element_size()
    if plan is None:
        slots = prompt_len + new_tokens
        kv = batch * slots * config.kv_bytes_per_token(element)
        workspace = estimate_workspace(config, batch, prompt_len, dtype)
        placement = plan_placement(part_bytes_in(weights.store, dtype), policy, kv, workspace)
        engine = Engine(weights, eos_id=NO_EOS)
    else:
        placement = plan.placement
        if engine is None:
            engine = Engine(weights, eos_id=NO_EOS, kv_on=plan.kv_on, kv_bits=policy.kv_bits,
                            kv_layout=plan.kv_layout)  # fmt: skip
        engine.prefill_rows = plan.prefill_rows
    weights.overlap = policy.overlap
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    requests = [
        Request(
            f"r{row}",
            tuple([1] + [(row * 7 + pos) % 50000 + 300 for pos in range(prompt_len - 1)]),
            new_tokens,
        )
        for row in range(batch)
    ]
    began = time.perf_counter()
    engine.reserve(batch, prompt_len + new_tokens)  # as the peers' caches, made beforehand
    reserve_s = time.perf_counter() - began
    warm_up = Request("warm-up", requests[0].prompt_ids[:8], 2)
    engine.generate([warm_up], SamplingParams(greedy=True), batch_size=1)
    engine.stats = type(engine.stats)()
    _synchronize(cuda)
    began = time.perf_counter()
    engine.generate(requests, SamplingParams(greedy=True), batch_size=batch)
    _synchronize(cuda)
    elapsed = time.perf_counter() - began
    stats = engine.stats
    _log(
        f"B={batch}: prefill {stats.prefill_s:.1f} s, decode {stats.decode_s:.1f} s "
        f"(KV memory locked beforehand in {reserve_s:.1f} s)"
    )
    decode_steps = max(stats.forward_passes - 1, 1)  # a prefill is one pass over the weights
    step_s = stats.decode_s / decode_steps
    # Bytes a decode step moves: the streamed weights, and the live rows' KV when it lives in
    # pinned RAM (all KV traffic less the prefill's write-back of the prompts).
    weights_total = stats.forward_passes * placement.streamed_bytes_per_pass
    kv_total = stats.bytes_moved - weights_total
    if plan is not None and plan.kv_on == "cpu":
        prompt_kv = sum(len(r.prompt_ids) for r in requests) * plan.kv_bytes_per_row
        kv_total -= prompt_kv // plan.max_context
    per_pass = placement.streamed_bytes_per_pass + max(kv_total, 0) / decode_steps
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    if policy.gpu_memory_bytes is not None and peak > policy.gpu_memory_bytes:
        raise OffloadError(
            f"B={batch}: peak {format_bytes(peak)} exceeds the budget "
            f"{format_bytes(policy.gpu_memory_bytes)}"
        )
    system = system or ("ours (streaming)" if policy.overlap else "ours, overlap off")
    return BenchRow(
        system,
        batch,
        stats.new_tokens / elapsed,  # every row runs its full length, as in the peers
        step_s,
        per_pass / step_s / 1e9 if per_pass else 0.0,
        (per_pass / pinned_bps) / step_s if per_pass else 0.0,
        peak,
        placement.describe(),
        policy.gpu_memory_bytes,
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _cap_gpu(cap_bytes: int | None) -> None:
    """Make ``cap_bytes`` a hard limit of this process's allocator (None lifts it)."""
    cudamem.configure()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_bytes is None else cap_bytes / total)


def try_ours(
    weights, batch, prompt_len, new_tokens, policy, pinned_bps, plan=None, system=None,
    engine=None,
) -> BenchRow | None:  # fmt: skip
    cuda = weights.device.type == "cuda"
    if cuda:
        _cap_gpu(policy.gpu_memory_bytes)
    try:
        row = run_ours(
            weights, batch, prompt_len, new_tokens, policy, pinned_bps, plan, system, engine
        )
        _log(
            f"{row.system} B={batch}: {row.tokens_per_s:.1f} tok/s, "
            f"{row.decode_step_s * 1e3:.0f} ms/step"
        )
        return row
    except (OffloadError, torch.OutOfMemoryError) as exc:
        _log(f"ours B={batch}: does not fit: {str(exc).splitlines()[0]}")
        return None
    finally:
        if cuda:
            torch.cuda.empty_cache()
            _cap_gpu(None)
