"""How many rows share each weight transfer, and where their KV cache lives: the memory plan.

One decode step streams the offloaded weights once whatever the batch, so throughput grows with
the batch until the KV cache, not the weights, runs out of room. This module sizes that trade
from the budgets alone (no allocation, no device needed), so ``inspect`` can print it and
``generate`` can refuse an impossible plan before loading anything:

- KV on the GPU: each row costs ``max_context x kv_bytes_per_token`` of GPU memory for the whole
  run, and the weights that no longer fit go to pinned RAM or disk.
- KV in pinned RAM: rows cost pinned RAM; the GPU holds two layers' worth of KV (the layer in use
  and the next one arriving), and each step moves every live row's keys and values over the
  link besides the weights.

With no batch size given, the planner tries batch sizes under both placements and takes the plan
that predicts the most tokens per second (pinned KV takes RAM that weights would otherwise use,
pushing layers to disk, so the largest batch is not always the fastest). The prediction is the
step-time model's (``steptime``: the link, the drive, the KV copy calls and the device's work,
pipelined over the layers) at the machine's link and drive rates (``OffloadPolicy.rates``, from
``--link-gbps`` and ``--disk-gbps``; by default ``PLANNING_RATES``, the target's class); every
plan carries what its decode step and its prefill move and compute, so that ``inspect``, the
bench and the GPU sweep can predict it at other rates. Workspace (activations of a prefill) is
estimated from the model's shapes.

Scoring (``engine.Engine.score``) keeps no KV cache across steps: one pass per batch, so its batch
is bounded by activations alone. The big tensors are a group's attention scores (B, NH, T, T),
the layer at hand's keys and values, the hidden states of every row waiting between layers, and
the head's fp32 logits over the vocabulary at the scored positions (computed ``HEAD_CHUNK`` at a
time). ``fit_score_batch`` sizes a scoring batch in the GPU memory a plan sets aside beside the
weights (its KV and workspace: a generation session scores in the room its generation batch
will use); ``plan_memory(score=...)`` with no generation plans that room for scoring alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import ModelConfig
from yalm_runner.errors import OffloadError
from yalm_runner.kvformat import DECODE_BYTES, kv_bytes_per_token
from yalm_runner.offload import OffloadPolicy, Placement, format_bytes, plan_placement
from yalm_runner.packing import HEAD_CHUNK
from yalm_runner.quant import scratch_elements
from yalm_runner.steptime import (
    CacheShape,
    PassTime,
    PassWork,
    StepRates,
    decode_work,
    mean_decode_context,
    predict_pass,
    prefill_work,
)
from yalm_runner.streaming import part_bytes_in

MAX_BATCH = 512  # beyond this the host-side bookkeeping, not the link, dominates
# The rates plans are compared at, and ``inspect``'s machine class: a PCIe 4 x16 link, an NVMe
# drive, and the device-side rates an H200 measured (``steptime.StepRates``).
PLANNING_RATES = StepRates()
# Tokens per prefill group, largest first. Every layer is loaded once whatever the groups, so a
# smaller group costs only kernel efficiency (and, for a compressed store, one dequantization
# of each matrix per group); the planner takes one only when it buys rows or resident layers.
PREFILL_TOKENS = (4096, 2048, 1024)
# How much faster a later KV choice or prefill group must be predicted to displace an earlier
# one for the same batch (1%: within the step-time model's own error).
CHOICE_MARGIN = 1.01
ALLOCATOR_SLACK_BYTES = 256 << 20  # kept free of the plan; 5% of a smaller budget


@dataclass(frozen=True)
class MemoryPlan:
    """The batch, where its KV cache lives, and the weight placement that goes with them."""

    batch_size: int
    max_context: int
    kv_on: str  # "gpu" or "cpu"
    kv_bytes_per_row: int
    kv_host_bytes: int  # pinned RAM for KV (0 when it lives on the GPU)
    workspace_bytes: int
    placement: Placement
    prefill_rows: int = 0  # rows per prefill group (0: the whole batch in one)
    kv_layout: str = "rows"  # of the pinned-RAM cache: rows or slots
    kv_attention: str = "device"  # or host: decode attention on the CPU (``hostattn``)
    # What a decode step and the batch's prefill move and compute (``steptime``); a scoring
    # plan has no decode step, its pass is the prefill.
    decode: PassWork | None = None
    prefill: PassWork | None = None
    # The device-memory budget the plan was made under (None: no limit), and what of its
    # workspace is not activations (a compressed store's dequantization buffer, allocator slack).
    device_budget_bytes: int | None = None
    scratch_bytes: int = 0

    @property
    def score_room_bytes(self) -> int | None:
        """Device memory a scoring batch's activations may take (no KV is kept while scoring):
        what the budget leaves beside the weights, their stream buffers and the scratch; at
        least what this plan's batch keeps there. None under no budget: no limit, whatever
        batch the generation plan was made for (``batch_size: 1`` left long prompts no room)."""
        if self.device_budget_bytes is None:
            return None
        placement = self.placement
        beside = placement.gpu_weight_bytes + placement.stream_buffer_bytes + self.scratch_bytes
        kept = placement.kv_bytes + placement.workspace_bytes - self.scratch_bytes
        return max(self.device_budget_bytes - beside, kept)

    def predict_step(self, rates: StepRates = PLANNING_RATES) -> PassTime:
        """One average decode step at ``rates`` (``steptime.predict_pass``)."""
        assert self.decode is not None, "a scoring plan has no decode step"
        return predict_pass(self.decode, rates)

    def predicted_step_s(self, rates: StepRates = PLANNING_RATES) -> float:
        return self.predict_step(rates).total_s

    def predict_prefill(self, rates: StepRates = PLANNING_RATES) -> PassTime:
        """The batch's prefill (a scoring plan's pass) at ``rates``."""
        assert self.prefill is not None, "every plan the planner makes counts its prefill"
        return predict_pass(self.prefill, rates)

    def describe(self) -> str:
        where = (
            self.placement.device_memory
            if self.kv_on == "gpu"
            else f"pinned RAM ({self.kv_layout}, moved per layer)"
        )
        if self.kv_attention == "host":
            where = "pinned RAM (rows, attended on the host)"
        chunks = f", prefill in groups of {self.prefill_rows} rows" if self.prefill_rows else ""
        return (
            f"batch {self.batch_size} rows x {self.max_context} positions{chunks}; KV "
            f"{format_bytes(self.kv_bytes_per_row)}/row in {where}"
            + (f", {format_bytes(self.kv_host_bytes)} of RAM" if self.kv_on == "cpu" else "")
            + f"; {self.placement.describe()}"
        )


def workspace_bytes(
    config: ModelConfig, batch: int, tokens: int, context: int, element: int
) -> int:
    """Activation memory of one layer over ``batch`` rows of ``tokens`` new tokens, generously.

    Counts the residual stream and its LayerNorm, q/k/v, the attention scores and their softmax
    (B, NH, T, S), the GeGLU's three (B, T, F) tensors, and the fp32 logits of the last position.
    """
    per_token = 8 * config.hidden_size + 4 * config.ffn_size + 3 * config.num_heads * context
    return element * batch * tokens * per_token + 2 * 4 * batch * config.vocab_size


def _element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_memory(
    store: ModelStore,
    device: torch.device,
    dtype: torch.dtype,
    policy: OffloadPolicy,
    *,
    batch_size: int | None,
    max_context: int,
    prompt_tokens: int | None = None,
    rows: int | None = None,
    copies: int = 1,
    rates: StepRates | None = None,
) -> MemoryPlan:
    """Choose the batch and KV placement for ``policy``; raise ``OffloadError`` if none fits.

    ``prompt_tokens`` is the longest prefill (``max_context`` when unknown); ``rows`` caps the
    chosen batch at the number of requests there are. ``copies`` devices each run a batch under
    the GPU budget; they share the pinned weights but each has its own pinned KV. Plans are
    compared by their predicted step at ``rates`` (default: the policy's link and drive,
    ``OffloadPolicy.rates``): a slower drive makes layers on disk cost more and so takes fewer
    rows than a fast one would.
    """
    rates = rates or policy.rates()
    config = store.config
    element = _element(dtype)
    parts = part_bytes_in(store, dtype)
    prefill = prompt_tokens or max_context
    kv_row = max_context * config.kv_bytes_per_token(element)
    kv_layer_row = max_context * 2 * config.hidden_size * element
    host_row = max_context * kv_bytes_per_token(config, policy.kv_bits, element)
    layer_token = kv_bytes_per_token(config, policy.kv_bits, element) // config.num_layers
    # On a CPU-only machine RAM is the device memory (the CPU budget bounds what stays
    # resident), there is no pinned tier, and the KV cache lives with the compute, unless
    # asked for in the host cache's own format (``kv_on=cpu``: plain RAM, 8/4-bit records).
    budgets = policy.budgets_on(device.type)
    if policy.kv_attention == "host":  # only over a cache in RAM, row-major
        kv_choices = ["cpu"]
    elif device.type == "cpu":
        kv_choices = ["cpu"] if policy.kv_on == "cpu" else ["gpu"]
    else:
        kv_choices = ["gpu", "cpu"] if policy.kv_on == "auto" else [policy.kv_on]

    # A compressed store dequantizes each matrix into one scratch buffer on the device. The
    # caching allocator keeps some memory reserved but unused (fragmentation): the workspace
    # counts that slack too, so that the real peak stays under the budget.
    compressed = getattr(store, "quantization", None) is not None
    scratch = scratch_elements(config) * element if compressed else 0
    device_budget = budgets.device_bytes
    if device_budget is not None:
        scratch += min(ALLOCATOR_SLACK_BYTES, device_budget // 20)

    def attempt(kv_on: str, batch: int, layout: str, group_tokens: int) -> MemoryPlan:
        # A long prefill of a large batch runs in groups of rows: its activations, not the
        # decode's, would otherwise decide the batch.
        group = min(batch, max(1, group_tokens // prefill))
        # Between layers a grouped prefill keeps every group's hidden states on the device; at
        # its end they wait beside the whole batch's fp32 logits and one group's head.
        waiting, grouped = 0, workspace_bytes(config, group, prefill, max_context, element)
        if group < batch:
            waiting = batch * prefill * config.hidden_size * element
            grouped = max(grouped, 4 * (batch + 2 * group) * config.vocab_size)
        decode = workspace_bytes(config, batch, 1, max_context, element)
        host_attention = kv_on == "cpu" and policy.kv_attention == "host"
        if host_attention:
            # Its device slots live through the prefill alone (``HostAttentionKV``): two, at the
            # prompt's length, with their outgoing records and the encoder's temporaries. A
            # decode step holds its q/k/v and output in fp32 and the new slot's records.
            waiting += batch * prefill * (4 * config.hidden_size * element + 2 * layer_token)
            waiting += 3 * DECODE_BYTES
            decode += batch * (4 * config.hidden_size * 4 + layer_token)
        work = scratch + max(waiting + grouped, decode)
        group_rows = group if group < batch else 0
        if kv_on == "gpu":
            placement = plan_placement(
                parts, policy, batch * kv_row, work, budgets=budgets, sources=copies
            )
            plan = MemoryPlan(batch, max_context, "gpu", kv_row, 0, work, placement, group_rows)
            return _counted(plan, config, parts, element, compressed, prefill, 16)
        # The rows' KV is reserved in RAM first; the weights take what is left of it.
        host = copies * batch * host_row
        if host_attention:
            # The step's staging: q/k/v and the output in fp32, the new slot's records of one
            # layer (as ``HostAttentionKV`` pins them).
            host += copies * batch * (4 * config.hidden_size * 4 + layer_token)
        pinned_budget = budgets.pinned_bytes
        if pinned_budget is not None and host >= pinned_budget:
            raise OffloadError(
                f"KV in pinned RAM for {batch} rows needs {format_bytes(host)}, over the CPU "
                f"budget {format_bytes(pinned_budget)}"
            )
        rest = replace(
            budgets, pinned_bytes=None if pinned_budget is None else pinned_budget - host
        )
        # Compressed KV also needs staging on the device (in and out, two slots each) and
        # room for the temporaries of expanding a group of rows at a time.
        layer_host = batch * host_row // config.num_layers
        if host_attention:  # the prefill's slots and staging: in the workspace, above
            device_kv = 0
        elif layout == "slots":  # a slot-major staging area per device slot, always
            device_kv = 2 * batch * kv_layer_row + 2 * layer_host + 3 * DECODE_BYTES
        elif policy.kv_bits != 16:
            device_kv = 2 * batch * kv_layer_row + 4 * layer_host + 3 * DECODE_BYTES
        else:
            device_kv = 2 * batch * kv_layer_row
        placement = plan_placement(parts, policy, device_kv, work, budgets=rest, sources=copies)
        plan = MemoryPlan(
            batch, max_context, "cpu", host_row, host, work, placement, group_rows, layout,
            kv_attention=policy.kv_attention,
        )  # fmt: skip
        return _counted(plan, config, parts, element, compressed, prefill, policy.kv_bits)

    # The pinned cache's layouts to try. Slot-major moves a layer in one copy per cache (host
    # time per step stays flat as rows grow) but needs a staging area on the GPU, so at 16 bits
    # it may hold fewer rows than row-major; the predicted rate decides.
    layouts = ["slots", "rows"] if policy.kv_layout == "auto" else [policy.kv_layout]
    if policy.kv_attention == "host":
        layouts = ["rows"]
    choices = [("gpu", "rows")] if "gpu" in kv_choices else []
    choices += [("cpu", layout) for layout in layouts] if "cpu" in kv_choices else []

    def best_of(batch: int, errors: list[str]) -> MemoryPlan | None:
        """The fastest plan for ``batch`` over the KV choices and prefill groups. Within
        ``CHOICE_MARGIN`` of each other the first is kept: KV on the GPU, then slot-major (whose
        host time does not grow with the rows), then larger groups; a prediction's last percent
        does not decide between them (at the user's link, 13B with 4-bit KV at 512 rows put
        row-major 0.02% ahead)."""
        best = None
        for kv_on, layout in choices:
            for group_tokens in PREFILL_TOKENS:
                try:
                    candidate = attempt(kv_on, batch, layout, group_tokens)
                except OffloadError as exc:
                    errors.append(str(exc))
                    continue
                if best is None or _rate(candidate, rates) > _rate(best, rates) * CHOICE_MARGIN:
                    best = candidate
        return best

    budget = {"device_budget_bytes": device_budget, "scratch_bytes": scratch}
    if batch_size is not None:
        errors: list[str] = []
        found = best_of(batch_size, errors)
        if found is None:
            unique = list(dict.fromkeys(errors))
            raise OffloadError(f"batch size {batch_size} does not fit: " + "; ".join(unique))
        return replace(found, **budget)

    cap = min(MAX_BATCH, -(-rows // copies)) if rows else MAX_BATCH
    best: MemoryPlan | None = None
    failures: list[str] = []
    for batch in _candidates(cap):
        candidate = best_of(batch, failures)
        if candidate is not None and (best is None or _rate(candidate, rates) > _rate(best, rates)):
            best = candidate
    if best is None:
        raise OffloadError(f"not even one row fits the budgets: {failures[0]}")
    return replace(best, **budget)


def _candidates(cap: int) -> list[int]:
    """Batch sizes to try: every size up to 16, then steps of about 6% up to ``cap``."""
    sizes, size = set(range(1, min(cap, 16) + 1)), 16.0
    while size < cap:
        size *= 1.0625
        sizes.add(min(cap, int(size)))
    return sorted(sizes)


def _streamed(
    placement: Placement, config: ModelConfig, parts: dict[str, int]
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Each layer's tier, and the bytes it streams per pass (0 when resident)."""
    tiers = tuple(placement.tiers[f"layer_{layer_idx}"] for layer_idx in range(config.num_layers))
    sizes = tuple(
        0 if tier == "gpu" else parts[f"layer_{layer_idx}"] for layer_idx, tier in enumerate(tiers)
    )
    return tiers, sizes


def _counted(
    plan: MemoryPlan,
    config: ModelConfig,
    parts: dict[str, int],
    element: int,
    compressed: bool,
    prompt_tokens: int,
    kv_bits: int,
) -> MemoryPlan:
    """``plan`` with what its decode step and its prefill move and compute counted."""
    tiers, sizes = _streamed(plan.placement, config, parts)
    cache = CacheShape(
        plan.kv_on, kv_bits if plan.kv_on == "cpu" else 16, plan.kv_layout, plan.kv_attention
    )
    context = mean_decode_context(prompt_tokens, plan.max_context)
    batch = plan.batch_size
    decode = decode_work(config, batch, context, tiers, sizes, cache, element, compressed)
    prefill = prefill_work(
        config, batch, prompt_tokens, plan.prefill_rows, tiers, sizes, cache, element, compressed
    )
    return replace(plan, decode=decode, prefill=prefill)


def _rate(plan: MemoryPlan, rates: StepRates) -> float:
    """Predicted new tokens (a scoring plan: prompts) per second at ``rates``; only
    comparisons between plans use it."""
    work = plan.decode if plan.decode is not None else plan.prefill
    assert work is not None, "the planner counts every plan's work"
    return plan.batch_size / predict_pass(work, rates).total_s


@dataclass(frozen=True)
class ScoreShape:
    """What a scoring job asks of the memory: its longest packed row, the most scored positions
    of one prompt, and how many prompts there are."""

    tokens: int
    positions: int
    rows: int


@dataclass(frozen=True)
class ScorePlan:
    """Prompts per scoring pass, and rows per group going through a layer together."""

    batch_size: int
    group_rows: int  # 0: the whole batch in one group
    workspace_bytes: int

    def describe(self) -> str:
        groups = f" in groups of {self.group_rows}" if self.group_rows else ""
        return (
            f"scoring {self.batch_size} prompts per pass{groups}, "
            f"activations {format_bytes(self.workspace_bytes)}"
        )


def score_workspace_bytes(
    config: ModelConfig, batch: int, group: int, shape: ScoreShape, element: int
) -> int:
    """Activation memory of one scoring pass over ``batch`` prompts, ``group`` rows at a time."""
    tokens = shape.tokens
    waiting = batch * tokens * config.hidden_size * element if group < batch else 0
    layer = workspace_bytes(config, group, tokens, tokens, element)
    kv = group * tokens * 2 * config.hidden_size * element  # the layer at hand's, reused
    mask = group * tokens * tokens  # booleans
    head = 2 * 4 * min(batch * shape.positions, HEAD_CHUNK) * config.vocab_size
    return waiting + layer + kv + mask + head


def _score_choice(
    config: ModelConfig, batch: int, shape: ScoreShape, element: int, room: int | None
) -> ScorePlan | None:
    """The largest group (fewest passes of a layer's kernels) that lets ``batch`` fit."""
    for group_tokens in PREFILL_TOKENS:
        group = min(batch, max(1, group_tokens // shape.tokens))
        work = score_workspace_bytes(config, batch, group, shape, element)
        if room is None or work <= room:
            return ScorePlan(batch, group if group < batch else 0, work)
    return None


def fit_score_batch(
    config: ModelConfig,
    dtype: torch.dtype,
    room_bytes: int | None,
    shape: ScoreShape,
    batch_size: int | None = None,
) -> ScorePlan:
    """The scoring batch that fits ``room_bytes`` of activations (None: no limit): the largest,
    up to the prompts there are, or ``batch_size`` if it fits; ``OffloadError`` with the
    numbers if not."""
    element = _element(dtype)
    if batch_size is not None:
        found = _score_choice(config, batch_size, shape, element, room_bytes)
        if found is None:
            need = score_workspace_bytes(config, batch_size, 1, shape, element)
            raise OffloadError(
                f"scoring batch {batch_size} of {shape.tokens} tokens needs "
                f"{format_bytes(need)} of activations, over the {format_bytes(room_bytes or 0)} "
                "the plan leaves beside the weights"
            )
        return found
    best = None
    for batch in _candidates(max(1, min(MAX_BATCH, shape.rows))):
        found = _score_choice(config, batch, shape, element, room_bytes)
        if found is None:
            break
        best = found
    if best is None:
        need = score_workspace_bytes(config, 1, 1, shape, element)
        raise OffloadError(
            f"scoring one prompt of {shape.tokens} tokens needs {format_bytes(need)} of "
            f"activations, over the {format_bytes(room_bytes or 0)} the plan leaves beside the "
            "weights; raise --gpu-memory or shorten the prompts"
        )
    return best


def plan_scoring(
    store: ModelStore,
    device: torch.device,
    dtype: torch.dtype,
    policy: OffloadPolicy,
    shape: ScoreShape,
    *,
    batch_size: int | None = None,
) -> MemoryPlan:
    """A plan for scoring alone: no KV cache across steps, the batch's activations as the
    workspace, the batch (at most the prompts there are) that predicts the most prompts per
    second; ``OffloadError`` if none fits."""
    config = store.config
    element = _element(dtype)
    parts = part_bytes_in(store, dtype)
    budgets = policy.budgets_on(device.type)
    compressed = getattr(store, "quantization", None) is not None
    scratch = scratch_elements(config) * element if compressed else 0
    gpu = budgets.device_bytes
    scratch += 0 if gpu is None else min(ALLOCATOR_SLACK_BYTES, gpu // 20)
    rates = policy.rates()

    def attempt(batch: int) -> MemoryPlan:
        error = OffloadError("no prefill group to try")
        for group_tokens in PREFILL_TOKENS:  # the largest group whose placement fits
            group = min(batch, max(1, group_tokens // shape.tokens))
            work = scratch + score_workspace_bytes(config, batch, group, shape, element)
            try:
                placement = plan_placement(parts, policy, 0, work, budgets=budgets)
            except OffloadError as exc:
                error = exc
                continue
            rows = group if group < batch else 0
            plan = MemoryPlan(batch, shape.tokens, "gpu", 0, 0, work, placement, rows)
            tiers, sizes = _streamed(placement, config, parts)
            scored = prefill_work(
                config, batch, shape.tokens, rows, tiers, sizes, CacheShape("gpu"), element,
                compressed,
            )  # fmt: skip
            return replace(plan, prefill=scored, device_budget_bytes=gpu, scratch_bytes=scratch)
        raise error

    if batch_size is not None:
        return attempt(batch_size)
    best, failure = None, None
    for batch in _candidates(max(1, min(MAX_BATCH, shape.rows))):
        try:
            candidate = attempt(batch)
        except OffloadError as exc:
            failure = failure or exc
            continue
        if best is None or _rate(candidate, rates) >= _rate(best, rates):
            best = candidate
    if best is None:
        raise OffloadError(f"not even one prompt can be scored under the budgets: {failure}")
    return best
