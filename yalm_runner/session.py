"""Open a model for generation under memory budgets: the one entry point for callers.

A caller (the CLI's ``generate``, the pipeline's generation task) says which store, which device
and how much GPU and pinned RAM it may use; it gets back the tokenizer, an engine whose weights
follow a placement planned for those budgets, and the batch size the budgets allow (or the one it
asked for, checked against them). Everything heavy is released when the ``with`` block ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from yalm_runner.checkpoint import Store
from yalm_runner.engine import Engine
from yalm_runner.errors import ConfigError
from yalm_runner.offload import OffloadPolicy, Placement
from yalm_runner.planning import MemoryPlan, plan_memory
from yalm_runner.streaming import StreamingWeights
from yalm_runner.tokenizer import Tokenizer


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but no CUDA device is available")
    return device


def default_dtype(store: Store, device: torch.device) -> torch.dtype:
    """fp32 on the CPU; the store's 16-bit dtype (bf16 for an fp32 store) on a GPU."""
    if device.type == "cpu":
        return torch.float32
    return store.dtype if store.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


@dataclass
class GenerationSession:
    """What a caller needs to generate: keep it inside the ``with`` of ``open_session``."""

    store: Store
    tokenizer: Tokenizer
    engine: Engine
    plan: MemoryPlan

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def placement(self) -> Placement:
        return self.plan.placement


@contextmanager
def open_session(
    store_path: Path | str,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    policy: OffloadPolicy | None = None,
    batch_size: int | None = None,
    max_context: int | None = None,
    prompt_tokens: int | None = None,
    rows: int | None = None,
    verify: bool = True,
) -> Iterator[GenerationSession]:
    """Open ``store_path`` for generation under ``policy``'s budgets.

    ``max_context`` is the longest prompt plus new tokens any row will need (the model's
    positions when not given); with ``batch_size`` it sizes the KV cache, and ``prompt_tokens``
    (the longest prefill) the activations. When ``batch_size`` is None the planner picks the
    batch (at most ``rows``) that the budgets make fastest. Over-budget plans raise
    ``OffloadError`` with the numbers before anything is loaded.
    """
    store = Store.open(Path(store_path))
    device = resolve_device(device)
    dtype = dtype or default_dtype(store, device)
    policy = policy or OffloadPolicy()
    plan = plan_memory(
        store,
        device,
        dtype,
        policy,
        batch_size=batch_size,
        max_context=max_context or store.config.max_positions,
        prompt_tokens=prompt_tokens,
        rows=rows,
    )
    tokenizer = Tokenizer(store.tokenizer_path)
    with StreamingWeights(
        store, device, dtype, plan.placement, overlap=policy.overlap, verify=verify
    ) as weights:
        engine = Engine(weights, kv_on=plan.kv_on)
        yield GenerationSession(store, tokenizer, engine, plan)
