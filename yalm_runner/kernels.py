"""Fused kernels (Triton), used on a CUDA device when Triton is there: 4-bit weight
dequantization, and the expansion of compressed KV records.

The torch version of ``quant.dequantize_int4`` makes four passes over the output matrix (low
nibbles, high nibbles, scale, offset); for YaLM-100B's 27308 x 10240 matrices that is ~2.6 ms
of a layer's compute, next to ~0.25 ms for the matmul that follows. ``fused_int4_dequantize``
reads each packed byte and its group's scale and offset once, and writes both values in one
store (0.467 -> 0.407 ms for a 27308 x 10240 matrix on the H200 against its earlier form, which
stored every other element and loaded the scale for each: same bits).

The torch version of ``kvformat.decode_kv`` likewise makes several passes (mask, shift, cast,
scale, offset, two strided writes) over every slot of every live row of a layer, at every decode
step: with 4-bit KV at 512 rows it ran at ~54e9 elements a second on the H200, and that, not the
link, set the 13B shape's step. ``fused_kv_decode`` reads each record once and writes each value
once, in any of the caches' layouts (rows and slots have their own strides).

Both round exactly where the torch versions do (the product to the output dtype, then the sum),
so either path gives the same bits: a store or a KV cache reads the same on any path, and a
resumed batch computes what the uninterrupted one did. Without Triton (CPU-only installs, CI)
the ``*_available`` functions are False and callers keep the torch versions; a kernel that fails
to build on its first use says so once and is not tried again.
"""

from __future__ import annotations

import functools
import warnings

import torch

BLOCK = 1024  # packed bytes per program
KV_BLOCK = 1024  # a row's code bytes per program
MOVE_BLOCK = 2048  # elements per program of a move to or from pinned memory


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
        # A byte's two columns share their group (group sizes are even): its scale and offset
        # are loaded once, and the two values stored side by side in one store.
        group = row * groups + (2 * j) // group_size
        scale = tl.load(scales + group, mask=inside, other=0.0).to(tl.float32)
        offset = tl.load(offsets + group, mask=inside, other=0.0).to(tl.float32)
        low, high = (byte & 0xF).to(tl.float32), (byte >> 4).to(tl.float32)
        if out_dtype == tl.float32:
            low, high = low * scale + offset, high * scale + offset
        else:  # round the product, then the sum, to nearest even: torch's two steps
            low = (low * scale).to(out_dtype, fp_downcast_rounding="rtne").to(tl.float32)
            high = (high * scale).to(out_dtype, fp_downcast_rounding="rtne").to(tl.float32)
            low = (low + offset).to(out_dtype, fp_downcast_rounding="rtne")
            high = (high + offset).to(out_dtype, fp_downcast_rounding="rtne")
        values = tl.reshape(tl.join(low, high), (2 * BLOCK,))  # low0, high0, low1, ...
        column = tl.reshape(tl.join(2 * j, 2 * j + 1), (2 * BLOCK,))
        kept = tl.reshape(tl.join(inside, inside), (2 * BLOCK,))
        tl.store(out + row * cols + column, values, mask=kept)

    return triton, tl, int4_dequantize


_state = {"proven": False, "refused": ""}
_kv_state = {"proven": False, "refused": ""}
_move_state = {"proven": False, "refused": ""}


@functools.cache
def _kv_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kv_decode(
        record, out, slots, heads, codes, record_bytes, in_row, in_slot, out_row, out_slot,
        BITS: tl.constexpr, out_dtype: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK code bytes of one row's (slot, head) records, in order.
        row = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = j < slots * heads * codes
        vector = j // codes  # slot * heads + head
        k = j - vector * codes
        slot = vector // heads
        head = vector - slot * heads
        base = row * in_row + slot * in_slot + head * record_bytes
        byte = tl.load(record + base + k, mask=inside, other=0)
        # The scale (and the minimum) follow the codes, 16-bit little-endian.
        s0 = tl.load(record + base + codes, mask=inside, other=0).to(tl.uint16)
        s1 = tl.load(record + base + codes + 1, mask=inside, other=0).to(tl.uint16)
        scale = (s0 | (s1 << 8)).to(out_dtype, bitcast=True).to(tl.float32)
        if BITS == 4:
            target = row * out_row + slot * out_slot + head * (2 * codes) + 2 * k
            m0 = tl.load(record + base + codes + 2, mask=inside, other=0).to(tl.uint16)
            m1 = tl.load(record + base + codes + 3, mask=inside, other=0).to(tl.uint16)
            low = (m0 | (m1 << 8)).to(out_dtype, bitcast=True).to(tl.float32)
            for nibble in tl.static_range(2):
                code = ((byte >> (4 * nibble)) & 0xF).to(tl.float32)
                product = (code * scale).to(out_dtype, fp_downcast_rounding="rtne")
                value = (product.to(tl.float32) + low).to(out_dtype, fp_downcast_rounding="rtne")
                tl.store(out + target + nibble, value, mask=inside)
        else:
            target = row * out_row + slot * out_slot + head * codes + k
            code = byte.to(tl.int8, bitcast=True).to(tl.float32)
            value = (code * scale).to(out_dtype, fp_downcast_rounding="rtne")
            tl.store(out + target, value, mask=inside)

    return triton, tl, kv_decode


@functools.cache
def _move_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def move(source, out, count, BLOCK: tl.constexpr):
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = j < count
        values = tl.load(source + j, mask=inside)
        tl.store(out + j, values.to(out.dtype.element_ty), mask=inside)

    return triton, move


class _Mapped:
    """A pinned host tensor passed to a kernel as a pointer: Triton asks the driver for its
    address on the device (registered memory is mapped there), so the kernel's loads or stores
    cross the link themselves, on no copy engine."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._tensor = tensor

    def data_ptr(self) -> int:
        return self._tensor.data_ptr()


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


def fused_kv_available() -> bool:
    """Triton is there and the KV kernel has not failed to build on this machine."""
    return _importable() and not _kv_state["refused"]


def pinned_moves_available() -> bool:
    """Triton is there and the move kernel has not failed to run on this machine."""
    return _importable() and not _move_state["refused"]


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


def fused_kv_decode(record: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor | None:
    """``kvformat.decode_kv`` in one kernel: ``record`` (rows, slots, heads, record bytes) uint8
    and ``out`` (rows, slots, heads, head size) in bf16 or fp16, on one CUDA device, each with
    its heads and bytes contiguous (rows and slots may have any strides: a slice of a cache, or
    a slot-major staging area transposed). None when the shapes are not that (the caller keeps
    the torch version) or the kernel failed to build on its first use."""
    if bits not in (4, 8) or out.dtype not in (torch.bfloat16, torch.float16):
        return None
    if record.dim() != 4 or out.dim() != 4 or record.shape[:3] != out.shape[:3]:
        return None
    rows, slots, heads, record_bytes = record.shape
    head_dim = out.shape[3]
    codes = head_dim // 2 if bits == 4 else head_dim
    if record_bytes != codes + (4 if bits == 4 else 2):
        return None
    if record.stride(3) != 1 or record.stride(2) != record_bytes:
        return None
    if out.stride(3) != 1 or out.stride(2) != head_dim:
        return None
    if rows == 0 or slots == 0:
        return out
    triton, tl, kernel = _kv_kernel()
    dtypes = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    grid = (rows, triton.cdiv(slots * heads * codes, KV_BLOCK))
    try:
        kernel[grid](
            record, out, slots, heads, codes, record_bytes, record.stride(0), record.stride(1),
            out.stride(0), out.stride(1), BITS=bits, out_dtype=dtypes[out.dtype], BLOCK=KV_BLOCK,
        )  # fmt: skip
    except Exception as exc:
        if _kv_state["proven"]:
            raise
        refuse_fused_kv(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
    _kv_state["proven"] = True
    return out


def move_pinned(source: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """``out.copy_(source)`` (with a cast) between pinned host memory and the device, by a
    kernel that reads or writes the host memory itself; both contiguous and the same size,
    queued on the current stream (the host must not touch the pinned side until it has run).

    Why not a copy: a copy from the host queues on a copy engine behind the weights' copy in
    flight (a whole layer, ~12 ms at YaLM-100B's envelope), so attention on the host waited for
    the next layer's weights to arrive before its output could reach the device. A kernel's
    loads cross the link beside that copy. None if the kernel failed to build on its first use
    (then it is not tried again; the caller copies)."""
    if _move_state["refused"]:
        return None
    assert source.is_contiguous() and out.is_contiguous() and source.numel() == out.numel()
    triton, kernel = _move_kernel()
    count = source.numel()
    source_arg = _Mapped(source) if source.device.type == "cpu" else source
    out_arg = _Mapped(out) if out.device.type == "cpu" else out
    try:
        kernel[(triton.cdiv(count, MOVE_BLOCK),)](source_arg, out_arg, count, BLOCK=MOVE_BLOCK)
    except Exception as exc:
        if _move_state["proven"]:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        _move_state["refused"] = f"{type(exc).__name__}: {first}"
        warnings.warn(
            f"the host-memory move kernel does not run on this machine "
            f"({_move_state['refused']}); copying instead",
            stacklevel=2,
        )
        return None
    _move_state["proven"] = True
    return out


def refuse_fused_kv(reason: str) -> None:
    """Stop using the fused KV kernel in this process, and say why once."""
    _kv_state["refused"] = reason
    warnings.warn(
        f"the fused KV kernel is not used on this machine ({reason}); expanding the KV cache "
        "with torch instead (slower)",
        stacklevel=3,
    )
