"""Kernels measured beside the engine's before they may replace them.

``paired_int4_dequantize`` is ``kernels.fused_int4_dequantize`` with one change: a packed
byte's two values are stored side by side in one store, and their scale and offset are loaded
once (a group's columns come in pairs), where the engine's kernel makes two strided stores of
every other element and loads the group's scale and offset for each. At the 100B envelope's
decode batch the dequantization is ~80% of a layer's device work (2.4 of ~2.9 ms at the default
rates), the part of the chain that attention on the host waits beside. Same rounding, so the
same bits; the envelope bench times both and says whether they agree
(``bench.envelope.matmul_variants``). Nothing here runs in the engine.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 1024  # packed bytes per program, as the engine's kernel


@functools.cache
def _paired_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int4_dequantize_paired(
        packed, scales, offsets, out, half_cols, cols, groups, group_size,
        out_dtype: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = j < half_cols
        byte = tl.load(packed + row * half_cols + j, mask=inside, other=0)
        group = row * groups + (2 * j) // group_size  # an even group size: one for both
        scale = tl.load(scales + group, mask=inside, other=0.0).to(tl.float32)
        offset = tl.load(offsets + group, mask=inside, other=0.0).to(tl.float32)
        low, high = (byte & 0xF).to(tl.float32), (byte >> 4).to(tl.float32)
        if out_dtype == tl.float32:
            low, high = low * scale + offset, high * scale + offset
        else:  # the product, then the sum, each rounded to nearest even: torch's two steps
            low = (low * scale).to(out_dtype, fp_downcast_rounding="rtne").to(tl.float32)
            high = (high * scale).to(out_dtype, fp_downcast_rounding="rtne").to(tl.float32)
            low = (low + offset).to(out_dtype, fp_downcast_rounding="rtne")
            high = (high + offset).to(out_dtype, fp_downcast_rounding="rtne")
        values = tl.reshape(tl.join(low, high), (2 * BLOCK,))  # low0, high0, low1, ...
        column = tl.reshape(tl.join(2 * j, 2 * j + 1), (2 * BLOCK,))
        kept = tl.reshape(tl.join(inside, inside), (2 * BLOCK,))
        tl.store(out + row * cols + column, values, mask=kept)

    return triton, tl, int4_dequantize_paired


def paired_int4_dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """``kernels.fused_int4_dequantize``'s contract (``scales``/``offsets`` already in
    ``out``'s dtype, (N, groups)); an even ``group_size``."""
    if group_size % 2:
        raise ValueError(f"the paired kernel needs an even group size, got {group_size}")
    triton, tl, kernel = _paired_kernel()
    rows, half_cols = packed.shape
    dtypes = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
    kernel[(rows, triton.cdiv(half_cols, BLOCK))](
        packed.contiguous(), scales.contiguous(), offsets.contiguous(), out,
        half_cols, 2 * half_cols, scales.shape[1], group_size,
        out_dtype=dtypes[out.dtype], BLOCK=BLOCK,
    )  # fmt: skip
    return out
