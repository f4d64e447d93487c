"""Logits -> next token ids, with randomness that belongs to each row, not to the batch.

Filtering follows the original scripts (docs/yalm.md §Sampling): divide by the temperature,
keep the top k (if k > 0), then the nucleus: sort, cumulative softmax, drop tokens past
``top_p`` but keep the first one that crosses it. The draw is an inverse-CDF lookup of one
uniform number per row, taken from a generator seeded by (seed, row key, step): a row's draws
do not depend on which batch it ran in, its position there, or whether the run was interrupted
and resumed. (Its logits' last bits do depend on the batch's shapes; where a near tie lets them
pick the token, exact resume replays the batch itself: ``generation``.)

Both running sums (the nucleus's and the draw's CDF) add probabilities as integers (fixed point,
``FIXED_ONE``), never as floats: integer sums are exact, so they do not depend on the order in
which a device adds. CUDA's floating-point ``cumsum`` does depend on it, from one call to the
next on the same input (PyTorch lists it among the nondeterministic operations), and over the
128,000 tokens of a flat distribution its last bits moved a draw across a CDF step: the same
command on the GPU wrote different text once in a few runs.
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


# Probabilities as multiples of 2**-52: a sum over the whole vocabulary stays below 2**53, so
# every partial sum and its float64 image are exact.
FIXED_ONE = 2**52


def fixed_cumsum(probs: torch.Tensor) -> torch.Tensor:
    """Running sums along the last dim of ``probs`` (each in [0, 1]) as int64 multiples of
    ``1 / FIXED_ONE``: the same bits on any device, in any order of addition."""
    return torch.cumsum(torch.round(probs.double() * FIXED_ONE).to(torch.int64), dim=-1)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The original's ``top_k_logits``: blocked entries become -inf. ``logits`` is (B, V)."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p > 0.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
        cumulative = fixed_cumsum(torch.softmax(sorted_logits, dim=-1))
        remove = cumulative.double() > top_p * cumulative[..., -1:].double()
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
    probs = torch.softmax(filtered, dim=-1)
    cdf = fixed_cumsum(probs)  # (B, V)
    uniforms = torch.tensor(
        [row_uniform(params.seed, key, step) for key, step in zip(row_keys, steps, strict=True)],
        dtype=torch.float64,
        device=logits.device,
    )
    # target < total (the product can round up to it), and a token of probability 0 adds nothing
    # to the CDF: the first sum above the target always belongs to a token with a probability.
    total = cdf[:, -1]
    targets = torch.minimum(torch.floor(uniforms * total.double()).to(torch.int64), total - 1)
    return torch.searchsorted(cdf, targets.unsqueeze(-1), right=True).squeeze(-1)
