"""``yalm-runner bench``: the streaming engine against the link it streams over, in one run.

A synthetic model of a named shape (random weights made on the fly, never written to disk) is
placed under the given budgets; the run measures pinned and pageable host-to-device bandwidth,
then prefill + decode for each batch size, and reports tokens/s, the effective streaming rate
and its fraction of the roofline (bytes streamed per decode step over the measured pinned
bandwidth). Peak device memory is read from the allocator and set against the budget.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from yalm_runner.checkpoint import PartInfo, part_names
from yalm_runner.config import ModelConfig, SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.errors import ConfigError, OffloadError
from yalm_runner.model import expected_shapes
from yalm_runner.offload import OffloadPolicy, format_bytes, plan_placement
from yalm_runner.streaming import StreamingWeights, part_bytes_in
from yalm_runner.tensorfile import TensorRecord

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
    """The part of ``Store``'s interface the streaming source reads, with random weights."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, seed: int = 0):
        self.config = config
        self.dtype = dtype
        self.parts: dict[str, PartInfo] = {}
        element = torch.empty((), dtype=dtype).element_size()
        for part in part_names(config):
            offset, records = 0, []
            for name, shape in expected_shapes(config, part).items():
                count = 1
                for size in shape:
                    count *= size
                records.append(
                    TensorRecord(name, shape, dtype, offset, offset + count * element, "")
                )
                offset += count * element
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


def run_ours(
    weights: StreamingWeights,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    policy: OffloadPolicy,
    pinned_bps: float,
) -> BenchRow:
    """One timed generate() at ``batch`` on already-placed weights; the budget is checked
    first with this batch's KV cache and workspace (``OffloadError`` if it does not fit)."""
    config, dtype = weights.config, weights.dtype
    slots = prompt_len + new_tokens
    kv = batch * slots * config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())
    workspace = estimate_workspace(config, batch, prompt_len, dtype)
    placement = plan_placement(part_bytes_in(weights.store, dtype), policy, kv, workspace)
    weights.overlap = policy.overlap
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = Engine(weights)
    requests = [
        Request(
            f"r{row}",
            tuple([1] + [(row * 7 + pos) % 50000 + 300 for pos in range(prompt_len - 1)]),
            new_tokens,
        )
        for row in range(batch)
    ]
    engine.generate(requests[:1], SamplingParams(greedy=True), batch_size=1)  # warm-up
    engine.stats = type(engine.stats)()
    torch.cuda.synchronize()
    began = time.perf_counter()
    engine.generate(requests, SamplingParams(greedy=True), batch_size=batch)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - began
    decode_steps = max(engine.stats.forward_passes - 1, 1)
    step_s = engine.stats.decode_s / decode_steps
    per_pass = placement.streamed_bytes_per_pass
    system = "ours (streaming)" if policy.overlap else "ours, overlap off"
    return BenchRow(
        system,
        batch,
        batch * new_tokens / elapsed,
        step_s,
        per_pass / step_s / 1e9 if per_pass else 0.0,
        (per_pass / pinned_bps) / step_s if per_pass else 0.0,
        torch.cuda.max_memory_allocated(),
        placement.describe(),
    )


def estimate_workspace(config: ModelConfig, batch: int, prompt_len: int, dtype: torch.dtype) -> int:
    """Activation memory of the prefill pass, the largest of the run (a safe overestimate)."""
    element = torch.empty((), dtype=dtype).element_size()
    tokens = batch * prompt_len
    per_token = 3 * config.hidden_size + 3 * config.ffn_size + 4 * config.hidden_size
    scores = batch * config.num_heads * prompt_len * prompt_len * 4
    logits = batch * config.vocab_size * 4 * 3
    return tokens * per_token * element + 2 * scores + logits


def run_bench(
    shape: str,
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    gpu_memory: int | None,
    cpu_memory: int | None,
    num_layers: int | None,
    json_path: Path | None,
) -> list[BenchRow]:
    if not torch.cuda.is_available():
        raise ConfigError("bench measures host-to-device streaming and needs a CUDA device")
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    config = SHAPES[shape]
    if num_layers:
        config = replace(config, num_layers=num_layers)
    store = SyntheticStore(config, torch.bfloat16)
    bandwidth = measure_h2d()
    base = OffloadPolicy(gpu_memory_bytes=gpu_memory, cpu_memory_bytes=cpu_memory, weights_on="cpu")
    placement = plan_placement(part_bytes_in(store, torch.bfloat16), base)
    rows = []
    with StreamingWeights(store, "cuda", torch.bfloat16, placement, verify=False) as weights:
        for batch in batches:
            for overlap in (True, False):
                policy = replace(base, overlap=overlap)
                try:
                    rows.append(
                        run_ours(
                            weights, batch, prompt_len, new_tokens, policy, bandwidth["pinned"]
                        )
                    )
                except OffloadError as exc:
                    print(f"B={batch}: does not fit: {exc}")
                    break
    print(
        f"shape {shape}: {config.num_layers} layers x hidden {config.hidden_size}, "
        f"{config.param_count() / 1e9:.1f} B params; prompt {prompt_len}, {new_tokens} new tokens"
    )
    print(
        f"measured host-to-device: pinned {bandwidth['pinned'] / 1e9:.1f} GB/s, "
        f"pageable {bandwidth['pageable'] / 1e9:.1f} GB/s; GPU budget "
        f"{format_bytes(gpu_memory) if gpu_memory else 'none'}"
    )
    print(
        f"{'system':<20} {'B':>4} {'tok/s':>9} {'step ms':>8} {'GB/s':>7} {'roofline':>8} "
        f"{'peak GPU':>10}"
    )
    for row in rows:
        print(
            f"{row.system:<20} {row.batch:>4} {row.tokens_per_s:>9.1f} "
            f"{row.decode_step_s * 1e3:>8.1f} {row.effective_gbps:>7.1f} "
            f"{row.roofline_fraction:>8.1%} {format_bytes(row.peak_gpu_bytes):>10}"
        )
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
                },
                indent=1,
            )
        )
    return rows
