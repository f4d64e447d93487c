"""Open a model for generation under memory budgets: the one entry point for callers.

A caller (the CLI's ``generate``, the pipeline's generation task) says which store, which device
and how much GPU and pinned RAM it may use; it gets back the tokenizer, an engine whose weights
follow a placement planned for those budgets, and the batch size the budgets allow (or the one it
asked for, checked against them). Everything heavy is released when the ``with`` block ends.
The session also says what generated ids depend on besides the model (device, dtype, the width
the KV cache is kept in; and, bit for bit, ``arithmetic``), so that a front end can fingerprint
saved ids and batch plans without reaching into the engine.

A session scores too (``score_plan``): a scoring pass keeps no KV cache across steps, so its
batch is sized in the GPU memory the plan set aside beside the weights for the generation batch
(its KV cache and workspace). A session opened for scoring alone (``score_only``) plans that
room for scoring instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from yalm_runner.checkpoint import ModelStore
from yalm_runner.engine import Engine
from yalm_runner.errors import ConfigError
from yalm_runner.multigpu import MultiEngine
from yalm_runner.offload import OffloadPolicy, Placement
from yalm_runner.planning import (
    MemoryPlan,
    ScorePlan,
    ScoreShape,
    fit_score_batch,
    plan_memory,
    plan_scoring,
)
from yalm_runner.settings import check_setting
from yalm_runner.streaming import StreamingWeights
from yalm_runner.tokenizer import Tokenizer


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return device


def resolve_devices(
    names: str | torch.device | Sequence[torch.device],
) -> list[torch.device]:
    """A device, or several separated by commas (``cuda:0,cuda:1``); ``cuda:all`` is every GPU.

    The spelling is the settings' (``yalm_runner.settings``); this says whether those devices
    are here. A front end resolves once and hands the list down: a list of ``torch.device`` is
    taken as already resolved."""
    if isinstance(names, (list, tuple)):
        return list(names)
    text = str(names)
    check_setting("device", text)
    if text == "cuda:all":
        if not torch.cuda.is_available():
            raise ConfigError("cuda:all asked for, but no CUDA device is available")
        return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    names = [name.strip() for name in text.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise ConfigError(f"a device is named twice in {text!r}")
    return [resolve_device(name) for name in names]


def default_dtype(store: ModelStore, device: torch.device) -> torch.dtype:
    """fp32 on the CPU; the store's 16-bit dtype (bf16 for an fp32 store) on a GPU."""
    if device.type == "cpu":
        return torch.float32
    return store.dtype if store.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


@dataclass
class GenerationSession:
    """What a caller needs to generate: keep it inside the ``with`` of ``open_session``."""

    store: ModelStore
    tokenizer: Tokenizer
    engine: Engine | MultiEngine
    plan: MemoryPlan  # for each device

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def placement(self) -> Placement:
        return self.plan.placement

    # What the ids depend on beyond the model and the job (a saved job's fingerprint):
    @property
    def device(self) -> torch.device:
        """The (first) device the engine computes on."""
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    @property
    def kv_stored_bits(self) -> int:
        """16, or 8/4 when the KV cache is kept compressed in pinned RAM (lossy)."""
        return self.engine.kv_stored_bits

    @property
    def arithmetic(self) -> dict:
        """What shapes the bits of every row besides the model and the job: the batch size and
        the engine's own (device, dtype, KV cache, prefill groups, kernels). A saved batch
        plan is replayed exactly only under the same (``generation``)."""
        return {"batch size": self.batch_size, **self.engine.arithmetic}

    def score_plan(self, shape: ScoreShape, batch_size: int | None = None) -> ScorePlan:
        """The scoring batch that fits the room this plan keeps beside the weights (the
        generation batch's KV and workspace); ``OffloadError`` if not even one prompt fits."""
        room = self.plan.score_room_bytes
        return fit_score_batch(self.store.config, self.dtype, room, shape, batch_size)


@contextmanager
def open_session(
    store_path: Path | str | ModelStore,
    *,
    device: str | torch.device | Sequence[torch.device] = "auto",
    dtype: torch.dtype | None = None,
    policy: OffloadPolicy | None = None,
    batch_size: int | None = None,
    max_context: int | None = None,
    prompt_tokens: int | None = None,
    rows: int | None = None,
    verify: bool = True,
    tokenizer: Tokenizer | None = None,
    score_only: ScoreShape | None = None,
) -> Iterator[GenerationSession]:
    """Open ``store_path`` (a folder, or a ``ModelStore`` already open) for generation under
    ``policy``'s budgets.

    ``max_context`` is the longest prompt plus new tokens any row will need (the model's
    positions when not given); with ``batch_size`` it sizes the KV cache, and ``prompt_tokens``
    (the longest prefill) the activations. When ``batch_size`` is None the planner picks the
    batch (at most ``rows``) that the budgets make fastest. Over-budget plans raise
    ``OffloadError`` with the numbers before anything is loaded. ``device`` may name several
    GPUs (``cuda:0,cuda:1``, or be the list ``resolve_devices`` made of that): each gets the
    budgets, they share one pinned copy of the weights, and batches alternate between them
    (``multigpu``). A caller that already loaded the store's ``tokenizer`` passes it. With
    ``score_only`` (the job's shape) the session is planned for scoring alone: no KV cache, the
    room beside the weights for a scoring batch (``batch_size`` prompts, or the fastest the
    budgets allow).
    """
    store = store_path if isinstance(store_path, ModelStore) else ModelStore.open(Path(store_path))
    devices = resolve_devices(device)
    device = devices[0]
    dtype = dtype or default_dtype(store, device)
    policy = policy or OffloadPolicy()
    if score_only is not None:
        plan = plan_scoring(store, device, dtype, policy, score_only, batch_size=batch_size)
    else:
        plan = plan_memory(
            store,
            device,
            dtype,
            policy,
            batch_size=batch_size,
            max_context=max_context or store.config.max_positions,
            prompt_tokens=prompt_tokens,
            rows=rows,
            copies=len(devices),
        )
    tokenizer = tokenizer or Tokenizer(store.tokenizer_path)
    with ExitStack() as stack:
        sources: list[StreamingWeights] = []
        for each in devices:
            sources.append(
                stack.enter_context(
                    StreamingWeights(
                        store,
                        each,
                        dtype,
                        plan.placement,
                        overlap=policy.overlap,
                        verify=verify,
                        share_pinned=sources[0] if sources else None,
                    )
                )
            )
        engines = [Engine.for_plan(source, plan, policy.kv_bits) for source in sources]
        engine = engines[0] if len(engines) == 1 else MultiEngine(engines)
        yield GenerationSession(store, tokenizer, engine, plan)
