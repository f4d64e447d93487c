"""Logits -> next token ids, with randomness that belongs to each row, not to the batch.

Filtering follows the original scripts (docs/yalm.md §Sampling): divide by the temperature,
keep the top k (if k > 0), then the nucleus: sort, cumulative softmax, drop tokens past
``top_p`` but keep the first one that crosses it. The draw is an inverse-CDF lookup of one
uniform number per row, taken from a generator seeded by (seed, row key, step): a row's draws
do not depend on which batch it ran in, its position there, or whether the run was interrupted
and resumed. (Its logits' last bits do depend on the batch's shapes; where a near tie lets them
pick the token, exact resume replays the batch itself: ``generation``.)
"""

from __future__ import annotations

import hashlib

import torch

from yalm_runner.config import SamplingParams


def row_seed(seed: int, row_key: str, step: int) -> int:
    """A 63-bit seed for one row's draw at one step."""
    digest = hashlib.sha256(f"{seed}\x00{row_key}\x00{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def row_uniform(seed: int, row_key: str, step: int) -> float:
    generator = torch.Generator().manual_seed(row_seed(seed, row_key, step))
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The original's ``top_k_logits``: blocked entries become -inf. ``logits`` is (B, V)."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p > 0.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits.scatter_(-1, sorted_indices, sorted_logits.masked_fill(remove, float("-inf")))
    return logits


def sample_next(
    logits: torch.Tensor, params: SamplingParams, row_keys: list[str], steps: list[int]
) -> torch.Tensor:
    """One token id per row of ``logits`` (B, V); ``steps[r]`` is row r's own step count."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    filtered = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(filtered, dim=-1).double()
    cdf = torch.cumsum(probs, dim=-1)  # (B, V)
    uniforms = torch.tensor(
        [row_uniform(params.seed, key, step) for key, step in zip(row_keys, steps, strict=True)],
        dtype=torch.float64,
        device=logits.device,
    )
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    picks = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    # Never land on a zero-probability token through rounding at the top of the CDF.
    picks = picks.clamp(max=logits.shape[-1] - 1)
    blocked = probs.gather(-1, picks.unsqueeze(-1)).squeeze(-1) == 0
    if blocked.any():
        fallback = torch.argmax(probs, dim=-1)
        picks = torch.where(blocked, fallback, picks)
    return picks
