"""``yalm-runner bench``: the streaming engine against the link it streams over, in one run.

A synthetic model of a named shape (random weights made on the fly, never written to disk) is
placed under the given budgets; the run measures pinned and pageable host-to-device bandwidth,
then prefill + decode for each batch size, and reports tokens/s, the effective streaming rate
and its fraction of the roofline (bytes streamed per decode step over the measured pinned
bandwidth). Peak device memory is read from the allocator and set against the budget.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from yalm_runner import cudamem
from yalm_runner.checkpoint import PartInfo, part_names
from yalm_runner.config import ModelConfig, SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.errors import ConfigError, OffloadError
from yalm_runner.offload import OffloadPolicy, format_bytes, plan_placement
from yalm_runner.planning import MemoryPlan, plan_memory
from yalm_runner.quant import Quantization, stored_specs
from yalm_runner.streaming import StreamingWeights, part_bytes_in
from yalm_runner.tensorfile import TensorRecord

# An id no row produces: random weights would end rows at random, so every row runs its full
# length and runs compared with each other do the same work.
NO_EOS = -1
SHAPES = {
    # A 13B-class shape in YaLM's layer form (GeGLU, biases, 2048-wide embedding).
    "13b": ModelConfig(
        vocab_size=128000,
        embedding_size=2048,
        hidden_size=5120,
        num_layers=40,
        num_heads=40,
        ffn_size=13824,
    ),
    "yalm-100b": ModelConfig(),
    "tiny": ModelConfig(
        vocab_size=1000, embedding_size=32, hidden_size=64, num_layers=4, num_heads=4, ffn_size=172
    ),
}


class SyntheticStore:
    """The part of ``Store``'s interface the streaming source reads, with random weights; with
    ``quantization``, the layers' records are those of a compressed store."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        seed: int = 0,
        quantization: Quantization | None = None,
    ):
        self.config = config
        self.dtype = dtype
        self.quantization = quantization
        self.parts: dict[str, PartInfo] = {}
        for part in part_names(config):
            offset, records = 0, []
            for name, (shape, kind) in stored_specs(config, part, quantization, dtype).items():
                count = 1
                for size in shape:
                    count *= size
                size = count * torch.empty((), dtype=kind).element_size()
                records.append(TensorRecord(name, shape, kind, offset, offset + size, ""))
                offset += size  # contiguous, as the store's files are
            self.parts[part] = PartInfo(part, Path(f"<synthetic {part}>"), offset, tuple(records))
        self._generator_device = "cuda" if torch.cuda.is_available() else "cpu"
        self._seed = seed

    def read_part(
        self, part: str, *, buffer: torch.Tensor | None = None, verify: bool = True
    ) -> dict[str, torch.Tensor]:
        generator = torch.Generator(self._generator_device).manual_seed(
            self._seed + len(part) * 1000 + sum(map(ord, part))
        )
        tensors = {}
        for record in self.parts[part].records:
            if "norm" in record.name:
                tensor = torch.ones(record.shape, device=self._generator_device)
            else:
                scale = 1.0 if "word_embeddings" in record.name else record.shape[-1] ** -0.5
                tensor = torch.empty(record.shape, device=self._generator_device).uniform_(
                    -scale, scale, generator=generator
                )
            tensors[record.name] = tensor.to(self.dtype).cpu()
        return tensors


def measure_h2d(size_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Host-to-device bandwidth (bytes/s) from pinned and from pageable memory."""
    device_buffer = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    rates = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=pinned)
        host.fill_(1)
        device_buffer.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            device_buffer.copy_(host, non_blocking=pinned)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        rates[kind] = size_bytes / sorted(times)[len(times) // 2]
        del host
    return rates


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


def run_ours(
    weights: StreamingWeights,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    policy: OffloadPolicy,
    pinned_bps: float,
    plan: MemoryPlan | None = None,
    system: str | None = None,
) -> BenchRow:
    """One timed generate() at ``batch`` on already-placed weights; the budget is checked
    first with this batch's KV cache and workspace (``OffloadError`` if it does not fit).
    With ``plan`` (the planner's), its KV placement and prefill chunks are used."""
    config, dtype = weights.config, weights.dtype
    element = torch.empty((), dtype=dtype).element_size()
    if plan is None:
        slots = prompt_len + new_tokens
        kv = batch * slots * config.kv_bytes_per_token(element)
        workspace = estimate_workspace(config, batch, prompt_len, dtype)
        placement = plan_placement(part_bytes_in(weights.store, dtype), policy, kv, workspace)
        engine = Engine(weights, eos_id=NO_EOS)
    else:
        placement = plan.placement
        engine = Engine(
            weights,
            eos_id=NO_EOS,
            kv_on=plan.kv_on,
            kv_bits=policy.kv_bits,
            kv_layout=plan.kv_layout,
            prefill_rows=plan.prefill_rows,
        )
    weights.overlap = policy.overlap
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
    torch.cuda.synchronize()
    began = time.perf_counter()
    engine.generate(requests, SamplingParams(greedy=True), batch_size=batch)
    torch.cuda.synchronize()
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
    if policy.gpu_memory_bytes is not None and torch.cuda.max_memory_allocated() > (
        policy.gpu_memory_bytes
    ):
        raise OffloadError(
            f"B={batch}: peak {format_bytes(torch.cuda.max_memory_allocated())} exceeds the "
            f"budget {format_bytes(policy.gpu_memory_bytes)}"
        )
    system = system or ("ours (streaming)" if policy.overlap else "ours, overlap off")
    return BenchRow(
        system,
        batch,
        stats.new_tokens / elapsed,  # every row runs its full length, as in the peers
        step_s,
        per_pass / step_s / 1e9 if per_pass else 0.0,
        (per_pass / pinned_bps) / step_s if per_pass else 0.0,
        torch.cuda.max_memory_allocated(),
        placement.describe(),
        policy.gpu_memory_bytes,
    )


def estimate_workspace(config: ModelConfig, batch: int, prompt_len: int, dtype: torch.dtype) -> int:
    """Activation memory of the prefill pass, the largest of the run (a safe overestimate)."""
    element = torch.empty((), dtype=dtype).element_size()
    tokens = batch * prompt_len
    per_token = 3 * config.hidden_size + 3 * config.ffn_size + 4 * config.hidden_size
    scores = batch * config.num_heads * prompt_len * prompt_len * 4
    logits = batch * config.vocab_size * 4 * 3
    return tokens * per_token * element + 2 * scores + logits


PEER_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TARGETS = (  # (system, capped?, the least ours/system the issue asks for)
    ("HF Accelerate", True, 10.0),
    ("DeepSpeed ZeRO-3", True, 5.0),
    ("DeepSpeed ZeRO-3", False, 1.25),
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cap_gpu(cap_bytes: int | None) -> None:
    """Make ``cap_bytes`` a hard limit of this process's allocator (None lifts it)."""
    cudamem.configure()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_bytes is None else cap_bytes / total)


def _try_ours(
    weights, batch, prompt_len, new_tokens, policy, pinned_bps, plan=None, system=None
) -> BenchRow | None:
    _cap_gpu(policy.gpu_memory_bytes)
    try:
        row = run_ours(weights, batch, prompt_len, new_tokens, policy, pinned_bps, plan, system)
        _log(
            f"{row.system} B={batch}: {row.tokens_per_s:.1f} tok/s, "
            f"{row.decode_step_s * 1e3:.0f} ms/step"
        )
        return row
    except (OffloadError, torch.OutOfMemoryError) as exc:
        _log(f"ours B={batch}: does not fit: {str(exc).splitlines()[0]}")
        return None
    finally:
        torch.cuda.empty_cache()
        _cap_gpu(None)


def _ours_within(store, peer: BenchRow, prompt_len, new_tokens, pinned_bps) -> list[BenchRow]:
    policy = OffloadPolicy(gpu_memory_bytes=peer.peak_gpu_bytes, kv_on="gpu")
    try:
        plan = plan_memory(
            store,
            torch.device("cuda"),
            torch.bfloat16,
            policy,
            batch_size=peer.batch,
            max_context=prompt_len + new_tokens,
            prompt_tokens=prompt_len,
        )
    except OffloadError as exc:
        _log(f"ours within {format_bytes(peer.peak_gpu_bytes)}: {exc}")
        return []
    _log(f"ours within the peer's {format_bytes(peer.peak_gpu_bytes)}: {plan.describe()}")
    with StreamingWeights(store, "cuda", torch.bfloat16, plan.placement, verify=False) as weights:
        row = _try_ours(
            weights, peer.batch, prompt_len, new_tokens, policy, pinned_bps, plan,
            "ours, peer's memory",
        )  # fmt: skip
    torch.cuda.empty_cache()
    if row is None:
        return []
    row.cap_bytes = None  # compared with the uncapped peer whose peak it stayed under
    return [row]


def _largest_planned_batch(store, policy, prompt_len, new_tokens, limit) -> int | None:
    """The largest batch of ``PEER_BATCHES`` (up to ``limit``) our planner places under
    ``policy``'s budgets, KV cache and prefill workspace included."""
    element = torch.empty((), dtype=torch.bfloat16).element_size()
    best = None
    for batch in (size for size in PEER_BATCHES if size <= limit):
        kv = batch * (prompt_len + new_tokens) * store.config.kv_bytes_per_token(element)
        workspace = estimate_workspace(store.config, batch, prompt_len, torch.bfloat16)
        try:
            plan_placement(part_bytes_in(store, torch.bfloat16), policy, kv, workspace)
        except OffloadError:
            break
        best = batch
    return best


def _peer_row(result, pinned_bps: float) -> BenchRow:
    from yalm_runner.bench_peers import SYSTEM_LABELS

    step_s, streamed = result.decode_step_s, result.streamed_bytes_per_pass
    settings = json.dumps(result.settings, default=str) if result.settings else ""
    return BenchRow(
        SYSTEM_LABELS[result.system],
        result.batch,
        result.tokens_per_s,
        step_s,
        streamed / step_s / 1e9 if step_s else 0.0,
        (streamed / pinned_bps) / step_s if step_s else 0.0,
        result.peak_gpu_bytes,
        settings,
        result.cap_bytes,
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


def run_bench(
    shape: str,
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    gpu_memory: int | None,
    cpu_memory: int | None,
    num_layers: int | None,
    json_path: Path | None,
    *,
    peers: tuple[str, ...] = (),
    uncapped_peers: tuple[str, ...] | None = None,
    uncapped_batch: int = 32,
    max_batch: int = 256,
    kv_bits: tuple[int, ...] = (16,),
    kv_layout: str = "auto",
    peer_timeout_s: float = 900.0,
    disk_dir: Path | None = None,
    disk_layers: int = 8,
    disk_file_bytes: int = 4 * 2**30,
) -> list[BenchRow]:
    """Ours at each of ``batches`` (overlap on and off) under the budgets; with ``peers``, also
    ours and each peer at its largest batch under ``gpu_memory`` and at ``uncapped_batch`` with
    no cap (every layer offloaded to the CPU in all three); with ``disk_dir``, the disk tier
    against the drive. Prints one table; writes everything to ``json_path`` too."""
    if not torch.cuda.is_available():
        raise ConfigError("bench measures host-to-device streaming and needs a CUDA device")
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    from yalm_runner.bench_peers import SYSTEMS

    uncapped_peers = peers if uncapped_peers is None else uncapped_peers
    unknown = [name for name in (*peers, *uncapped_peers) if name not in SYSTEMS]
    if unknown:
        raise ConfigError(f"unknown peers {unknown}; choose from {list(SYSTEMS)}")
    if peers and gpu_memory is None:
        raise ConfigError("--peers compares systems under a GPU budget: give --gpu-memory too")
    config = SHAPES[shape]
    if num_layers:
        config = replace(config, num_layers=num_layers)
    store = SyntheticStore(config, torch.bfloat16)
    bandwidth = measure_h2d()
    pinned = bandwidth["pinned"]
    base = OffloadPolicy(gpu_memory_bytes=gpu_memory, cpu_memory_bytes=cpu_memory, weights_on="cpu")
    placement = plan_placement(part_bytes_in(store, torch.bfloat16), base)
    rows: list[BenchRow] = []
    with StreamingWeights(store, "cuda", torch.bfloat16, placement, verify=False) as weights:
        for batch in batches:
            for overlap in (True, False):
                row = _try_ours(
                    weights, batch, prompt_len, new_tokens, replace(base, overlap=overlap), pinned
                )
                if row is None:
                    break
                rows.append(row)
        if peers:
            capped = _largest_planned_batch(store, base, prompt_len, new_tokens, max_batch)
            if capped is not None and not any(
                row.batch == capped and row.system == "ours (streaming)" for row in rows
            ):
                row = _try_ours(weights, capped, prompt_len, new_tokens, base, pinned)
                rows += [row] if row else []
            # The planner's batch at each KV width: the KV cache may go to pinned RAM,
            # so that many more rows share each weight transfer under the same GPU budget.
            for bits in sorted(set(kv_bits), reverse=True):
                policy = replace(base, kv_on="auto", kv_bits=bits, kv_layout=kv_layout)
                plan = plan_memory(
                    store,
                    torch.device("cuda"),
                    torch.bfloat16,
                    policy,
                    batch_size=None,
                    max_context=prompt_len + new_tokens,
                    prompt_tokens=prompt_len,
                    rows=max_batch,
                )
                _log(f"planned ({bits}-bit KV): {plan.describe()}")
                label = "ours, KV in RAM" if bits == 16 else f"ours, {bits}-bit KV"
                label = label if plan.kv_on == "cpu" else "ours, planned"
                row = _try_ours(
                    weights, plan.batch_size, prompt_len, new_tokens, policy, pinned, plan, label
                )
                rows += [row] if row else []
            uncapped = replace(base, gpu_memory_bytes=None)
            row = _try_ours(weights, uncapped_batch, prompt_len, new_tokens, uncapped, pinned)
            rows += [row] if row else []
    del weights  # its pinned copy of the model goes before the peers make theirs
    torch.cuda.empty_cache()
    disk = None
    if disk_dir is not None:
        from yalm_runner.bench_disk import run_disk_bench

        disk_config = replace(config, num_layers=min(disk_layers, config.num_layers))
        disk = run_disk_bench(disk_dir, disk_config, torch.bfloat16, "cuda", disk_file_bytes)
    peer_results = []
    if peers or uncapped_peers:
        from yalm_runner.bench_peers import largest_fitting, run_peer  # imports this module

        layers_arg = num_layers or None
        element = torch.empty((), dtype=torch.bfloat16).element_size()
        for system in peers:
            candidates = [
                batch
                for batch in PEER_BATCHES
                if batch <= max_batch
                and batch * (prompt_len + new_tokens) * config.kv_bytes_per_token(element)
                + estimate_workspace(config, batch, prompt_len, torch.bfloat16)
                < gpu_memory
            ]
            best, tried = largest_fitting(
                system, shape, layers_arg, candidates, prompt_len, new_tokens, gpu_memory,
                peer_timeout_s, _log,
            )  # fmt: skip
            peer_results += tried
            rows += [_peer_row(best, pinned)] if best else []
        for system in uncapped_peers:
            result = run_peer(
                system, shape, layers_arg, uncapped_batch, prompt_len, new_tokens, None,
                peer_timeout_s,
            )  # fmt: skip
            peer_results.append(result)
            if result.ok:
                rows.append(_peer_row(result, pinned))
            else:
                _log(f"{system} uncapped B={uncapped_batch}: {result.error}")
        zero = [r for r in rows if r.system.startswith("DeepSpeed") and r.cap_bytes is None]
        if zero:  # ours given the GPU memory ZeRO took: layers that fit stay resident
            rows += _ours_within(store, zero[0], prompt_len, new_tokens, pinned)
    compare_with_ours(rows)
    print(
        f"shape {shape}: {config.num_layers} layers x hidden {config.hidden_size}, "
        f"{config.param_count() / 1e9:.1f} B params; prompt {prompt_len}, {new_tokens} new tokens"
    )
    print(
        f"measured host-to-device: pinned {pinned / 1e9:.1f} GB/s, "
        f"pageable {bandwidth['pageable'] / 1e9:.1f} GB/s; GPU budget "
        f"{format_bytes(gpu_memory) if gpu_memory else 'none'}"
    )
    print(format_table(rows))
    if peers or uncapped_peers:
        print("\n".join(target_lines(rows)))
    if disk is not None:
        print(format_disk(disk))
    if json_path is not None:
        json_path.write_text(
            json.dumps(
                {
                    "shape": shape,
                    "config": config.to_dict(),
                    "prompt_len": prompt_len,
                    "new_tokens": new_tokens,
                    "gpu_memory": gpu_memory,
                    "cpu_memory": cpu_memory,
                    "bandwidth_bytes_per_s": bandwidth,
                    "rows": [row.__dict__ for row in rows],
                    "peer_attempts": [result.__dict__ for result in peer_results],
                    "targets": target_lines(rows) if peers or uncapped_peers else [],
                    "disk": disk,
                },
                indent=1,
            )
        )
    return rows
