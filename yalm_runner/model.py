"""YaLM's forward pass as pure functions of activations and weights (docs/yalm.md §Architecture).

Every function takes its weights as a mapping from the release's module-relative names
(``attention.query_key_value.weight``, ...) to tensors already on the compute device, so the
resident path and the streaming engine run the very same math. Nothing here reads files, moves
weights between devices or knows about CUDA streams.

Shapes: B batch, T new positions this call, S cached + new positions, H hidden, E embedding,
NH heads, D head dim, F FFN width, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from yalm_runner.config import ModelConfig

Weights = Mapping[str, torch.Tensor]

# The reference fills blocked attention scores with -10000 before the softmax
# (docs/yalm.md, pitfall: mask).
MASKED_SCORE = -10000.0

EMBEDDING_KEYS = ("word_embeddings.weight",)
PROJECTOR_KEYS = ("input_layernorm.weight", "input_layernorm.bias")
LAYER_KEYS = (
    "input_layernorm.weight",
    "input_layernorm.bias",
    "attention.query_key_value.weight",
    "attention.query_key_value.bias",
    "attention.dense.weight",
    "attention.dense.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "mlp.dense_ffn_hidden.weight",
    "mlp.dense_ffn_hidden.bias",
    "mlp.dense_ffn_gate.weight",
    "mlp.dense_ffn_gate.bias",
    "mlp.dense_ffn_output.weight",
    "mlp.dense_ffn_output.bias",
)
HEAD_KEYS = (
    "input_layer_norm.weight",
    "input_layer_norm.bias",
    "dense.weight",
    "dense.bias",
    "output_layer_norm.weight",
    "output_layer_norm.bias",
    "output_bias",
)


def layer_keys(layer_idx: int) -> tuple[str, ...]:
    """The tensor names of transformer layer ``layer_idx``: layer 0 has no input LayerNorm."""
    if layer_idx == 0:
        return tuple(key for key in LAYER_KEYS if not key.startswith("input_layernorm."))
    return LAYER_KEYS


def expected_shapes(config: ModelConfig, part: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of one part: ``embedding``, ``layer_<i>`` or ``head``."""
    V, E, H, F_ = config.vocab_size, config.embedding_size, config.hidden_size, config.ffn_size
    if part == "embedding":
        return {
            "word_embeddings.weight": (V, E),
            "input_layernorm.weight": (E,),
            "input_layernorm.bias": (E,),
        }
    if part == "head":
        return {
            "input_layer_norm.weight": (H,),
            "input_layer_norm.bias": (H,),
            "dense.weight": (E, H),
            "dense.bias": (E,),
            "output_layer_norm.weight": (E,),
            "output_layer_norm.bias": (E,),
            "output_bias": (V,),
        }
    layer_idx = int(part.removeprefix("layer_"))
    shapes = {
        "input_layernorm.weight": (H,),
        "input_layernorm.bias": (H,),
        "attention.query_key_value.weight": (3 * H, H),
        "attention.query_key_value.bias": (3 * H,),
        "attention.dense.weight": (H, H),
        "attention.dense.bias": (H,),
        "post_attention_layernorm.weight": (H,),
        "post_attention_layernorm.bias": (H,),
        "mlp.dense_ffn_hidden.weight": (F_, H),
        "mlp.dense_ffn_hidden.bias": (F_,),
        "mlp.dense_ffn_gate.weight": (F_, H),
        "mlp.dense_ffn_gate.bias": (F_,),
        "mlp.dense_ffn_output.weight": (H, F_),
        "mlp.dense_ffn_output.bias": (H,),
    }
    return {key: shapes[key] for key in layer_keys(layer_idx)}


@dataclass(frozen=True)
class Rotary:
    """cos/sin tables of YaLM's rotate-half rotary encoding, one row per position."""

    cos: torch.Tensor  # (max_positions, D)
    sin: torch.Tensor  # (max_positions, D)

    @classmethod
    def build(cls, config: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> Rotary:
        head_dim = config.head_dim
        inv_freq = 1.0 / (
            config.rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        )
        positions = torch.arange(config.max_positions, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # (P, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (P, D)
        # The reference computes the tables in fp32 and casts them to the compute dtype.
        return cls(angles.cos().to(device, dtype), angles.sin().to(device, dtype))

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (B, T, NH, D) at ``positions`` (B, T)."""
        cos = self.cos[positions].unsqueeze(2)  # (B, T, 1, D)
        sin = self.sin[positions].unsqueeze(2)
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
        return x * cos + rotated * sin


def layer_norm(x: torch.Tensor, weights: Weights, prefix: str, eps: float) -> torch.Tensor:
    weight = weights[f"{prefix}.weight"]
    return F.layer_norm(x, weight.shape, weight, weights[f"{prefix}.bias"], eps)


def linear(x: torch.Tensor, weights: Weights, prefix: str) -> torch.Tensor:
    return F.linear(x, weights[f"{prefix}.weight"], weights[f"{prefix}.bias"])


def embed(tokens: torch.Tensor, weights: Weights, config: ModelConfig) -> torch.Tensor:
    """Token ids (B, T) -> the residual stream (B, T, H).

    ``weights`` holds the word embedding and the projector's LayerNorm. The projector's
    ``eye(E, H)`` is zero-padding, so it is written as a pad rather than a matmul
    (docs/yalm.md, pitfall: projector).
    """
    x = F.embedding(tokens, weights["word_embeddings.weight"])  # (B, T, E)
    x = layer_norm(x, weights, "input_layernorm", config.layernorm_eps)
    return F.pad(x, (0, config.hidden_size - config.embedding_size))  # (B, T, H)


def attention_mask(key_valid: torch.Tensor, start: int, num_new: int) -> torch.Tensor:
    """Which keys each new query may see: (B, 1, T, S) booleans, True = allowed.

    ``key_valid`` (B, S) marks real (non-padding) slots of the cache after this call, the new
    ones at ``start .. start+num_new-1``. A query sees valid keys at or before its own slot.
    Every query also sees its own slot, so a padding query is never fully masked (which would
    give NaN in low precision and spread through ``0 * NaN`` into valid rows).
    """
    num_slots = key_valid.shape[1]
    query_slots = torch.arange(start, start + num_new, device=key_valid.device)  # (T,)
    key_slots = torch.arange(num_slots, device=key_valid.device)  # (S,)
    causal = key_slots[None, :] <= query_slots[:, None]  # (T, S)
    own = key_slots[None, :] == query_slots[:, None]
    allowed = (causal[None] & key_valid[:, None, :]) | own[None]  # (B, T, S)
    return allowed[:, None]  # (B, 1, T, S)


def attention_inputs(
    h: torch.Tensor, weights: Weights, config: ModelConfig, rotary: Rotary, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's queries, keys (both after rotary) and values for ``h`` (B, T, H): each
    (B, T, NH, D)."""
    batch, num_new, _ = h.shape
    # Layer 0 has no input LayerNorm: the projector's LayerNorm plays that role
    # (docs/yalm.md, pitfall: first-layer-norm).
    a = (
        layer_norm(h, weights, "input_layernorm", config.layernorm_eps)
        if ("input_layernorm.weight" in weights)
        else h
    )
    qkv = linear(a, weights, "attention.query_key_value")  # (B, T, 3H)
    # Rows are grouped per head as [q|k|v] (docs/yalm.md, pitfall: qkv-interleave).
    qkv = qkv.view(batch, num_new, config.num_heads, 3, config.head_dim)  # (B, T, NH, 3, D)
    query = rotary.apply(qkv[:, :, :, 0], positions)
    key = rotary.apply(qkv[:, :, :, 1], positions)
    return query, key, qkv[:, :, :, 2]


def block_output(
    h: torch.Tensor, context: torch.Tensor, weights: Weights, config: ModelConfig
) -> torch.Tensor:
    """The rest of a layer once attention gave ``context`` (B, T, H): the residual stream."""
    h = h + linear(context, weights, "attention.dense")
    m = layer_norm(h, weights, "post_attention_layernorm", config.layernorm_eps)
    # GeGLU: exact GeLU on dense_ffn_hidden, dense_ffn_gate stays linear
    # (docs/yalm.md, pitfall: geglu-branches).
    ffn = F.gelu(linear(m, weights, "mlp.dense_ffn_hidden")) * linear(
        m, weights, "mlp.dense_ffn_gate"
    )
    return h + linear(ffn, weights, "mlp.dense_ffn_output")


def block(
    h: torch.Tensor,
    weights: Weights,
    config: ModelConfig,
    rotary: Rotary,
    positions: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    start: int,
    mask: torch.Tensor,
) -> torch.Tensor:
    """One transformer layer over ``h`` (B, T, H); returns the new residual stream.

    ``key_cache``/``value_cache`` (B, S_max, NH, D) receive this call's keys (after rotary)
    and values at slots ``start .. start+T-1``; attention reads slots ``0 .. start+T-1``.
    """
    batch, num_new, _ = h.shape
    end = start + num_new
    query, key, value = attention_inputs(h, weights, config, rotary, positions)
    key_cache[:, start:end] = key
    value_cache[:, start:end] = value

    keys = key_cache[:, :end].transpose(1, 2)  # (B, NH, S, D)
    values = value_cache[:, :end].transpose(1, 2)  # (B, NH, S, D)
    scores = torch.matmul(query.transpose(1, 2), keys.transpose(2, 3))  # (B, NH, T, S)
    # as the reference's baddbmm(alpha=1/sqrt(D))
    scores = scores * (1.0 / math.sqrt(config.head_dim))
    scores = scores.masked_fill(~mask, MASKED_SCORE)
    probs = torch.softmax(scores, dim=-1)
    context = torch.matmul(probs, values)  # (B, NH, T, D)
    context = context.transpose(1, 2).reshape(batch, num_new, config.hidden_size)  # (B, T, H)
    return block_output(h, context, weights, config)


def head(
    h: torch.Tensor, weights: Weights, word_embeddings: torch.Tensor, config: ModelConfig
) -> torch.Tensor:
    """Residual stream (..., H) -> fp32 logits (..., V): LN, dense, GeLU, LN, tied embedding.

    There is no final LayerNorm in the stack; this head is all of it
    (docs/yalm.md, pitfall: head).
    """
    y = layer_norm(h, weights, "input_layer_norm", config.layernorm_eps)
    y = F.gelu(linear(y, weights, "dense"))  # (..., E)
    y = layer_norm(y, weights, "output_layer_norm", config.layernorm_eps)
    logits = F.linear(y, word_embeddings, weights["output_bias"])  # (..., V)
    return logits.float()
