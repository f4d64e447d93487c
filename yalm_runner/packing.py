"""How answers to score become one batch: a shared prefix, each candidate's own block, one mask.

Scoring a prompt's candidate answers needs, for every candidate token, the log-probability the
model gives it after the prefix and the candidate's earlier tokens. The candidates of one prompt
share their longest common token prefix, so a prompt is packed into one row that computes that
prefix once, followed by each candidate's remaining tokens in a block of its own (a tree laid out
flat, as in SpecInfer's or Medusa's tree attention)::

    slots     0 ... L-1 | L ...           | ...            | padding
    segment   0 (shared)| 1 (candidate 1) | 2 (candidate 2)| -1
    position  0 ... L-1 | L, L+1, ...     | L, L+1, ...    | 0

A query sees the keys at or before its slot that are shared or in its own segment; padding is
seen by nobody (and sees only itself, so no row is fully masked). Positions restart at ``L`` in
every block, so each candidate sees exactly the sequence ``prefix + candidate``: the packed row
computes the same numbers as separate full-sequence passes, with the shared part done once.

The last token of a candidate is never fed (nothing after it is scored); a candidate whose whole
sequence is shared (identical candidates, or a single one) needs no block at all.

This module builds token, position, segment and mask tensors and says where to read each
candidate's log-probabilities; it knows nothing of weights, layers or text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from yalm_runner.config import ModelConfig

SHARED, PADDING = 0, -1
# Head positions computed at a time: their fp32 logits and log-softmax are (chunk, V) each.
HEAD_CHUNK = 256


@dataclass(frozen=True)
class ScoreRequest:
    """One prompt's candidates: each as the ids of prefix + candidate (BOS first); the tokens
    from ``context_len`` on are the candidate's (those the prefix alone does not have)."""

    key: str
    context_len: int
    sequences: tuple[tuple[int, ...], ...]

    @property
    def shared_len(self) -> int:
        """The longest common token prefix of every candidate's sequence."""
        first = self.sequences[0]
        length = min(len(sequence) for sequence in self.sequences)
        for sequence in self.sequences[1:]:
            common = 0
            while common < length and sequence[common] == first[common]:
                common += 1
            length = common
        return length

    def blocks(self) -> list[tuple[int, ...]]:
        """Each candidate's fed tokens after the shared part (its last token is not fed)."""
        shared = self.shared_len
        return [sequence[shared : len(sequence) - 1] for sequence in self.sequences]

    @property
    def packed_len(self) -> int:
        """Slots of this prompt's row."""
        return self.shared_len + sum(len(block) for block in self.blocks())

    @property
    def scored_positions(self) -> int:
        """Candidate tokens to score (what the head is computed for, at most)."""
        return sum(len(sequence) - self.context_len for sequence in self.sequences)


@dataclass(frozen=True)
class Scored:
    """A prompt scored: per candidate, the summed log-probability of its tokens and their
    count."""

    key: str
    logprobs: tuple[float, ...]
    tokens: tuple[int, ...]


def score_problem(config: ModelConfig, request: ScoreRequest) -> str | None:
    """Why ``request`` cannot be scored on a model of ``config``, or None when it can."""
    if not request.sequences:
        return "no candidates"
    if request.context_len < 1:
        return "empty prefix (it needs at least BOS)"
    for number, sequence in enumerate(request.sequences, start=1):
        if len(sequence) <= request.context_len:
            return f"candidate {number} adds no tokens after the prefix"
        if len(sequence) > config.max_positions:
            return (
                f"prefix + candidate {number} is {len(sequence)} tokens, over the model's "
                f"{config.max_positions} positions"
            )
        bad = [token for token in sequence if not 0 <= token < config.vocab_size]
        if bad:
            return f"candidate {number}: token ids {bad[:5]} outside the vocabulary"
    return None


@dataclass
class PackedBatch:
    """The tensors of one batch of packed prompts (on one device) and where to read results."""

    tokens: torch.Tensor  # (B, T) ids, padding = pad_id
    positions: torch.Tensor  # (B, T) rotary positions
    segments: torch.Tensor  # (B, T) SHARED, candidate number, or PADDING
    read_rows: torch.Tensor  # (N,) row of each slot whose next-token distribution is needed
    read_slots: torch.Tensor  # (N,) that slot
    # Per prompt, per candidate: (index into the read slots, target id) of each of its tokens.
    targets: list[list[list[tuple[int, int]]]]

    def mask(self, rows: slice) -> torch.Tensor:
        """Which keys each query of ``rows`` may see: (b, 1, T, T) booleans, True = allowed."""
        segments = self.segments[rows]  # (b, T)
        slots = torch.arange(segments.shape[1], device=segments.device)
        causal = slots[None, :] <= slots[:, None]  # (T, T): key at or before the query
        query, key = segments[:, :, None], segments[:, None, :]  # (b, T, 1), (b, 1, T)
        visible = (key == SHARED) | (key == query)
        allowed = causal[None] & visible & (key != PADDING)
        allowed |= torch.eye(segments.shape[1], dtype=torch.bool, device=segments.device)[None]
        return allowed[:, None]  # (b, 1, T, T)


def pack(requests: Sequence[ScoreRequest], pad_id: int, device: torch.device | str) -> PackedBatch:
    """Lay ``requests`` out one prompt per row, padded on the right to the longest row."""
    width = max(request.packed_len for request in requests)
    batch = len(requests)
    tokens = torch.full((batch, width), pad_id, dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    segments = torch.full((batch, width), PADDING, dtype=torch.long)
    reads: dict[tuple[int, int], int] = {}
    targets: list[list[list[tuple[int, int]]]] = []

    def read(row: int, slot: int) -> int:
        return reads.setdefault((row, slot), len(reads))

    for row, request in enumerate(requests):
        shared = request.shared_len
        first = request.sequences[0]
        tokens[row, :shared] = torch.tensor(first[:shared], dtype=torch.long)
        positions[row, :shared] = torch.arange(shared)
        segments[row, :shared] = SHARED
        begin = shared
        per_candidate = []
        for number, (sequence, block) in enumerate(
            zip(request.sequences, request.blocks(), strict=True), start=1
        ):
            end = begin + len(block)
            if block:
                tokens[row, begin:end] = torch.tensor(block, dtype=torch.long)
                positions[row, begin:end] = torch.arange(shared, shared + len(block))
                segments[row, begin:end] = number
            wanted = []
            for target in range(request.context_len, len(sequence)):
                before = target - 1  # the position whose distribution predicts the target
                slot = before if before < shared else begin + before - shared
                wanted.append((read(row, slot), sequence[target]))
            per_candidate.append(wanted)
            begin = end
        targets.append(per_candidate)
    order = sorted(reads, key=reads.__getitem__)
    return PackedBatch(
        tokens.to(device),
        positions.to(device),
        segments.to(device),
        torch.tensor([row for row, _ in order], dtype=torch.long, device=device),
        torch.tensor([slot for _, slot in order], dtype=torch.long, device=device),
        targets,
    )
