"""The KV cache's record format and its sizes: what the planner and ``quality`` need of it.

Keys and values are kept in 16 bits as they are, or compressed per (token, head): 8 bits are
int8 codes with one scale (symmetric), 4 bits are two codes a byte with a scale and a minimum.
``kv_record_shape`` says which tensor holds one cache of a given shape; ``encode_kv`` and
``decode_kv`` turn values into records and back; ``host_elements`` and ``kv_bytes_per_token``
size the host copy. This module allocates nothing and knows nothing of pinned memory or copy
streams: the caches that move the records (``kvcache``) build on it. On a CUDA device with
Triton ``decode_kv`` runs ``kernels.fused_kv_decode``, which gives the same bits.
"""

from __future__ import annotations

import math

import torch

from yalm_runner import settings
from yalm_runner.config import ModelConfig
from yalm_runner.kernels import fused_kv_available, fused_kv_decode, refuse_fused_kv

KV_BITS = settings.KV_BITS  # the widths a KV cache may have: defined with the settings
# Compressed KV is expanded a group of rows at a time, each group's temporaries within this
# (the planner reserves room for it beside the device slots).
DECODE_BYTES = 128 << 20
# On a CUDA device with Triton, records are expanded by one fused kernel (``kernels``: the same
# bits as the torch version below, in one pass); tests turn it off to compare the two.
USE_FUSED_KERNEL = True


def _fields(bits: int, head_dim: int, element: int) -> list[tuple[int, int]]:
    """Byte ranges of a compressed (token, head) record: codes, then scale (and minimum)."""
    codes = head_dim if bits == 8 else head_dim // 2
    fields = [(0, codes), (codes, codes + element)]
    if bits == 4:
        fields.append((codes + element, codes + 2 * element))
    return fields


def kv_record_shape(
    bits: int, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[tuple[int, ...], torch.dtype]:
    """The tensor that holds one cache (keys or values) of ``shape`` (..., D) in ``bits``.

    In 16 bits the values themselves. Compressed, uint8 with one record per (token, head): the
    codes, then the scale (and the minimum) in ``dtype``; one tensor, so a row's slots travel
    in one copy.
    """
    if bits == 16:
        return shape, dtype
    element = torch.empty((), dtype=dtype).element_size()
    head_dim = shape[-1]
    if (head_dim if bits == 8 else head_dim // 2) % element:
        raise ValueError(f"{bits}-bit KV needs the head size's codes to fill whole scales")
    return (*shape[:-1], _fields(bits, head_dim, element)[-1][1]), torch.uint8


def encode_kv(x: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) values -> the records ``kv_record_shape`` describes (16 bits: ``x`` itself)."""
    if bits == 16:
        return x
    if bits == 8:
        scale = x.abs().amax(dim=-1, keepdim=True).float() / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
        fields = [codes, scale.to(x.dtype)]
    else:
        low = x.amin(dim=-1, keepdim=True).float()
        scale = (x.amax(dim=-1, keepdim=True).float() - low) / 15.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round((x.float() - low) / scale).clamp_(0, 15).to(torch.uint8)
        fields = [codes[..., 0::2] | (codes[..., 1::2] << 4), scale.to(x.dtype), low.to(x.dtype)]
    return torch.cat([field.contiguous().view(torch.uint8) for field in fields], dim=-1)


def decode_kv(record: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Write the values that ``record`` encodes into ``out`` (..., D)."""
    if bits == 16:
        out.copy_(record)
        return
    if USE_FUSED_KERNEL and out.is_cuda and fused_kv_available() and _fused(record, bits, out):
        return
    _decode_with_torch(record, bits, out)


# (bits, dtype) pairs whose fused expansion was checked against torch's in this process.
_checked: set[tuple[int, torch.dtype]] = set()


def _fused(record: torch.Tensor, bits: int, out: torch.Tensor) -> bool:
    """Expand with the fused kernel; False when it declined or gave other bits than torch's
    (checked on a few slots the first time for each width and dtype: then it is refused for the
    rest of the process and the caller expands with torch)."""
    if fused_kv_decode(record, bits, out) is None:
        return False
    if (bits, out.dtype) in _checked:
        return True
    rows, slots = min(2, out.shape[0]), min(4, out.shape[1])
    expected = torch.empty_like(out[:rows, :slots])
    _decode_with_torch(record[:rows, :slots], bits, expected)
    same = torch.equal(expected.view(torch.int16), out[:rows, :slots].view(torch.int16))
    if same:
        _checked.add((bits, out.dtype))
    else:
        refuse_fused_kv(f"its {bits}-bit {str(out.dtype).removeprefix('torch.')} values differ")
    return same


def _decode_with_torch(record: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    fields = [record[..., a:b] for a, b in _fields(bits, out.shape[-1], out.element_size())]
    scale = fields[1].view(out.dtype)
    if bits == 8:
        torch.mul(fields[0].view(torch.int8).to(out.dtype), scale, out=out)
    else:
        packed, low = fields[0], fields[2].view(out.dtype)
        out[..., 0::2] = (packed & 15).to(out.dtype) * scale + low
        out[..., 1::2] = (packed >> 4).to(out.dtype) * scale + low


def host_elements(
    config: ModelConfig, batch: int, slots: int, bits: int, dtype: torch.dtype
) -> tuple[int, torch.dtype]:
    """Elements (and their type) of one layer's keys, or values, for ``batch`` x ``slots`` in
    host RAM: the same for the row-major and the slot-major layout."""
    shape, kind = kv_record_shape(bits, (batch, slots, config.num_heads, config.head_dim), dtype)
    return math.prod(shape), kind


def kv_bytes_per_token(config: ModelConfig, bits: int, element: int) -> int:
    """Host bytes one token's keys and values take over all layers in ``bits``."""
    heads, head_dim = config.num_heads, config.head_dim
    per_head = {16: head_dim * element, 8: head_dim + element, 4: head_dim // 2 + 2 * element}
    return 2 * config.num_layers * heads * per_head[bits]
