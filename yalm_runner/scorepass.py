"""Scoring: one pass over a batch of prompts, no decoding (``Engine.score``).

The prompts are packed with their candidate answers (``packing``): one prefill per batch, every
layer streamed once per batch, the head computed only where a candidate token is predicted. No
KV cache is kept beyond the layer at hand: one scratch buffer of keys and values for a group of
rows, reused by every layer. Owns that pass; knows nothing of files, jobs or the pipeline
(``scoring`` and ``scorefile`` call it), nor of decoding (``engine``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

from yalm_runner import model
from yalm_runner.errors import GenerationError
from yalm_runner.packing import HEAD_CHUNK, Scored, ScoreRequest, pack, score_problem
from yalm_runner.tokenizer import EOS_ID

PAD_ID = EOS_ID  # the reference pads with </s>


class ScoringPass:
    """``Engine``'s scoring, over the attributes every engine has: ``weights``, ``config``,
    ``device``, ``dtype``, ``rotary``, ``stats`` and ``_cancelled``."""

    def check_score(self, request: ScoreRequest) -> None:
        """Raise ``GenerationError`` if ``request`` cannot be scored on this model."""
        problem = score_problem(self.config, request)
        if problem:
            raise GenerationError(f"row {request.key}: {problem}")

    def score(
        self,
        requests: Iterable[ScoreRequest],
        *,
        batch_size: int,
        group_rows: int = 0,
        on_scored: Callable[[Scored], None] | None = None,
    ) -> list[Scored]:
        """Score every request's candidates, ``batch_size`` prompts per pass over the weights;
        return them in request order. ``group_rows`` (0: all) rows of a batch go through each
        layer together, bounding the activations; ``on_scored`` gets each prompt as its batch
        ends, so a caller can store it at once."""
        pending = list(requests)
        for request in pending:
            self.check_score(request)
        results: dict[str, Scored] = {}
        for start in range(0, len(pending), batch_size):
            if self._cancelled:
                raise GenerationError("scoring cancelled")
            for scored in self._score_batch(pending[start : start + batch_size], group_rows):
                results[scored.key] = scored
                if on_scored is not None:
                    on_scored(scored)
        return [results[request.key] for request in pending]

    @torch.inference_mode()
    def _score_batch(self, requests: list[ScoreRequest], group_rows: int) -> list[Scored]:
        config, device = self.config, self.device
        streamed_before = getattr(self.weights, "bytes_streamed", 0)
        began = time.perf_counter()
        packed = pack(requests, PAD_ID, device)
        batch, width = packed.tokens.shape
        size = min(group_rows or batch, batch)
        groups = [slice(first, min(first + size, batch)) for first in range(0, batch, size)]
        masks = [packed.mask(rows) for rows in groups]
        embedding = self.weights.embedding()
        hidden = [model.embed(packed.tokens[rows], embedding, config) for rows in groups]
        # The layer at hand's keys and values, for one group: nothing is kept across layers.
        shape = (size, width, config.num_heads, config.head_dim)
        keys = torch.empty(shape, device=device, dtype=self.dtype)
        values = torch.empty(shape, device=device, dtype=self.dtype)
        for _, weights in self.weights.layers():
            for group, rows in enumerate(groups):
                count = rows.stop - rows.start
                hidden[group] = model.block(
                    hidden[group], weights, config, self.rotary, packed.positions[rows],
                    keys[:count], values[:count], 0, masks[group],
                )  # fmt: skip
        del keys, values
        states = hidden[0] if len(hidden) == 1 else torch.cat(hidden)  # (B, T, H)
        selected = states[packed.read_rows, packed.read_slots]  # (N, H)
        # Flat (read index, target id) pairs: a shared slot may predict several candidates.
        pairs = [pair for prompt in packed.targets for wanted in prompt for pair in wanted]
        read_index = torch.tensor([index for index, _ in pairs], device=device)
        target_ids = torch.tensor([target for _, target in pairs], device=device)
        values_out = torch.empty(len(pairs), dtype=torch.float32, device=device)
        head = self.weights.head()
        for first in range(0, selected.shape[0], HEAD_CHUNK):
            last = min(first + HEAD_CHUNK, selected.shape[0])
            logits = model.head(selected[first:last], head, embedding["word_embeddings.weight"],
                                config)  # fmt: skip
            log_probs = torch.log_softmax(logits, dim=-1)  # (chunk, V)
            inside = (read_index >= first) & (read_index < last)
            values_out[inside] = log_probs[read_index[inside] - first, target_ids[inside]]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        flat = values_out.double().cpu().tolist()
        results, cursor = [], 0
        for request, prompt in zip(requests, packed.targets, strict=True):
            sums = []
            for wanted in prompt:
                sums.append(float(sum(flat[cursor : cursor + len(wanted)])))
                cursor += len(wanted)
            results.append(Scored(request.key, tuple(sums), tuple(len(w) for w in prompt)))
        self.stats.rows += batch
        self.stats.prompt_tokens += int((packed.segments >= 0).sum())
        self.stats.forward_passes += 1
        self.stats.batch_sizes.append(batch)
        self.stats.prefill_s += time.perf_counter() - began
        self.stats.bytes_moved += getattr(self.weights, "bytes_streamed", 0) - streamed_before
        return results
