"""A fused 4-bit dequantization kernel (Triton), used on a CUDA device when Triton is there.

The torch version of ``quant.dequantize_int4`` makes four passes over the output matrix (low
nibbles, high nibbles, scale, offset); for YaLM-100B's 27308 x 10240 matrices that is ~2.6 ms
of a layer's compute, next to ~0.25 ms for the matmul that follows. This kernel reads each
packed byte once and writes both values once. It rounds exactly where the torch version does
(the product to the output dtype, then the sum), so both give the same bits and a store reads
the same on any path.

Without Triton (CPU-only installs, CI) ``fused_int4_available`` is False and callers keep the
torch version.
"""

from __future__ import annotations

import functools
import warnings

import torch

BLOCK = 1024  # packed bytes per program


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int4_dequantize(
        packed, scales, offsets, out, half_cols, cols, groups, group_size,
        out_dtype: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = j < half_cols
        byte = tl.load(packed + row * half_cols + j, mask=inside, other=0)
        for nibble in tl.static_range(2):
            column = 2 * j + nibble
            code = ((byte >> (4 * nibble)) & 0xF).to(tl.float32)
            group = row * groups + column // group_size
            scale = tl.load(scales + group, mask=inside, other=0.0).to(tl.float32)
            offset = tl.load(offsets + group, mask=inside, other=0.0).to(tl.float32)
            if out_dtype == tl.float32:
                value = code * scale + offset
            else:  # round the product, then the sum, to nearest even: torch's two steps
                product = code * scale
                product = product.to(out_dtype, fp_downcast_rounding="rtne").to(tl.float32)
                value = (product + offset).to(out_dtype, fp_downcast_rounding="rtne")
            tl.store(out + row * cols + column, value, mask=inside)

    return triton, tl, int4_dequantize


_state = {"proven": False, "refused": ""}


@functools.cache
def _importable() -> bool:
    try:
        _kernel()
    except Exception:  # no Triton, or a build without a working backend
        return False
    return torch.cuda.is_available()


def fused_int4_available() -> bool:
    """Triton is there and the kernel has not failed to build on this machine."""
    return _importable() and not _state["refused"]


def fused_int4_dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    out: torch.Tensor,
) -> torch.Tensor | None:
    """``out`` (N, K) = code * scale + offset per group, from packed (N, K/2) uint8 codes and
    ``scales``/``offsets`` (N, groups) already in ``out``'s dtype; all on one CUDA device.
    None if the kernel failed to build on its first use (then it is not tried again)."""
    triton, tl, kernel = _kernel()
    rows, half_cols = packed.shape
    dtypes = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
    grid = (rows, triton.cdiv(half_cols, BLOCK))
    try:
        kernel[grid](
            packed.contiguous(), scales.contiguous(), offsets.contiguous(), out,
            half_cols, 2 * half_cols, scales.shape[1], group_size,
            out_dtype=dtypes[out.dtype], BLOCK=BLOCK,
        )  # fmt: skip
    except Exception as exc:
        if _state["proven"]:
            raise
        # It never ran here (an old GPU, a broken compiler): say so once and let the torch
        # version do the work from now on.
        _state["refused"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(
            f"the fused int4 kernel does not build on this machine ({_state['refused']}); "
            "dequantizing with torch instead (slower)",
            stacklevel=2,
        )
        return None
    _state["proven"] = True
    return out
