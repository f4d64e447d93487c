"""Compressed weights: int8 per output channel and 4-bit groups, made at convert time.

What is compressed: the five linear matrices of every transformer layer (``QUANTIZED_MATRICES``),
99.5% of YaLM-100B's bytes. Biases, LayerNorms, the word embedding and the head stay 16-bit: they
are 0.3% of the bytes, they stay resident rather than streamed (so compressing them saves no
transfer), and the word embedding is also the tied output matrix, whose error lands directly
on the logits.

Stored layout of a matrix ``X.weight`` of shape (N out, K in), in place of ``X.weight``:

- ``int8``: ``X.weight.q`` int8 (N, K) and ``X.weight.scale`` fp32 (N,); w = q * scale.
  Symmetric, one scale per output row (q in [-127, 127]).
- ``int4``: ``X.weight.q`` uint8 (N, K/2), two 4-bit codes per byte, element 2j in the low
  nibble and 2j+1 in the high one; ``X.weight.scale`` and ``X.weight.zero`` fp16 (N, ceil(K/g))
  for groups of g consecutive inputs of a row (the last group may be short);
  w = (q - 8) * scale + zero, zero being (8 - an integer zero point) * scale. This is the
  convention of torch's packed int4 matmul (``torch._weight_int4pack_mm``'s scales_and_zeros),
  so such a kernel can take the scales and zeros as they are.

Dequantizing is vectorised torch on whatever device the tensors are on (4-bit: one fused
Triton kernel on a CUDA device, ``kernels``). ``DequantizingWeights``
is the mapping the model's ``block`` reads a layer through: it dequantizes each matrix on
access into one reusable scratch buffer. This module knows the compressed format of one matrix
and nothing of stores or files: what a store keeps per part is ``checkpoint.stored_specs``, and
the resident weight source that reads a compressed store is ``offload.QuantizedResidentWeights``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from yalm_runner.config import ModelConfig
from yalm_runner.errors import ConfigError
from yalm_runner.kernels import fused_int4_available, fused_int4_dequantize

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 64
QUANTIZED_MATRICES = (
    "attention.query_key_value.weight",
    "attention.dense.weight",
    "mlp.dense_ffn_hidden.weight",
    "mlp.dense_ffn_gate.weight",
    "mlp.dense_ffn_output.weight",
)
INT8_MAX = 127
INT4_OFFSET = 8  # stored codes are 0..15; code - 8 is the signed value
INT8_SCALE_DTYPE = torch.float32
INT4_SCALE_DTYPE = torch.float16
FP16_MAX = 65504.0
# Rows are quantized and dequantized in chunks of about this many elements, so temporaries
# stay small next to the matrix (a 27308 x 10240 FFN matrix would need GBs in one go). On the
# CPU a chunk should fit the cache; on a GPU few, large chunks keep kernel launches down.
CHUNK_ELEMENTS = 1 << 22
CUDA_CHUNK_ELEMENTS = 1 << 26
# On a CUDA device with Triton, 4-bit matrices are dequantized by one fused kernel (same bits as
# the torch version); benchmarks turn it off to measure the difference.
USE_FUSED_KERNEL = True


def _rows_per_chunk(cols: int, device: torch.device) -> int:
    budget = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    return max(1, budget // max(cols, 1))


@dataclass(frozen=True)
class Quantization:
    """How a store's matrices are compressed; recorded in the manifest."""

    scheme: str
    group_size: int = DEFAULT_GROUP_SIZE  # int4 only

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"quantization scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.scheme == "int4" and (
            not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2
        ):
            raise ConfigError(
                f"int4 group size must be an even integer >= 2, got {self.group_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        if self.scheme == "int8":
            return {"scheme": "int8"}
        return {"scheme": "int4", "group_size": self.group_size, "zero_point": True}

    @classmethod
    def from_dict(cls, data: Any) -> Quantization:
        if not isinstance(data, dict) or "scheme" not in data:
            raise ConfigError(f"quantization must be a mapping with a scheme, got {data!r}")
        if data["scheme"] == "int4" and data.get("zero_point", True) is not True:
            raise ConfigError("int4 without a zero point is not a stored format")
        return cls(data["scheme"], data.get("group_size", DEFAULT_GROUP_SIZE))

    def stored_specs(
        self, name: str, shape: tuple[int, ...]
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The stored tensors (name -> shape, dtype) that replace the matrix ``name``."""
        rows, cols = shape
        if self.scheme == "int8":
            return {
                f"{name}.q": ((rows, cols), torch.int8),
                f"{name}.scale": ((rows,), INT8_SCALE_DTYPE),
            }
        if cols % 2:
            raise ConfigError(f"int4 needs an even input width; {name} has {cols} columns")
        groups = -(-cols // self.group_size)
        return {
            f"{name}.q": ((rows, cols // 2), torch.uint8),
            f"{name}.scale": ((rows, groups), INT4_SCALE_DTYPE),
            f"{name}.zero": ((rows, groups), INT4_SCALE_DTYPE),
        }


def matrix_of(stored_name: str) -> str | None:
    """``X.weight.q`` / ``.scale`` / ``.zero`` -> ``X.weight``; None for other names."""
    base, _, suffix = stored_name.rpartition(".")
    return base if suffix in ("q", "scale", "zero") and base in QUANTIZED_MATRICES else None


# -- int8 ------------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 codes (N, K) and fp32 scales (N,), symmetric per output row."""
    rows, cols = weight.shape
    codes = torch.empty((rows, cols), dtype=torch.int8, device=weight.device)
    scales = torch.empty(rows, dtype=INT8_SCALE_DTYPE, device=weight.device)
    step = _rows_per_chunk(cols, weight.device)
    for start in range(0, rows, step):
        block = weight[start : start + step].float()
        scale = block.abs().amax(dim=1) / INT8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row
        codes[start : start + step] = (
            (block / scale[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        )
        scales[start : start + step] = scale
    return codes, scales


def dequantize_int8(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """int8 (N, K) x fp32 scales (N,) -> (N, K) in ``dtype`` (into ``out`` when given)."""
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    # A copy then a same-dtype multiply: on the CPU 5-10x faster than one mixed-dtype
    # ``torch.mul(codes, scales, out=out)``; the scale's rounding to ``dtype`` is far below
    # int8's own error.
    scales_c = scales.to(dtype)
    step = _rows_per_chunk(codes.shape[1], codes.device)
    for start in range(0, codes.shape[0], step):
        target = out[start : start + step]
        target.copy_(codes[start : start + step])
        target.mul_(scales_c[start : start + step, None])
    return out


# -- int4 ------------------------------------------------------------------------------------


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (N, K) -> (N, K/2) bytes: element 2j low nibble, 2j+1 high nibble."""
    pairs = codes.view(codes.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: (N, K/2) bytes -> uint8 codes (N, K)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)


def _grouped(matrix: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(R, K) -> the full groups as (R, K // g, g) and the short last group (R, K % g) or None."""
    rows, cols = matrix.shape
    full = cols // group_size * group_size
    head = matrix[:, :full].view(rows, full // group_size, group_size)
    return head, (matrix[:, full:] if full < cols else None)


def _int4_group_params(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of (R, G, g) fp32 groups, rounded to the stored dtype.

    The range is the group's min..max widened to include 0, with an integer zero point, so a
    zero weight stays (almost exactly) zero. Measured against plain min/max: equal on Gaussian
    weights, and 2x smaller error on the small weights that share a group with an outlier
    (min/max puts 0 between grid points there; see tests/test_quant.py).
    """
    low = groups.amin(dim=-1).clamp(max=0)
    high = groups.amax(dim=-1).clamp(min=0)
    scale = ((high - low) / 15).to(INT4_SCALE_DTYPE)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    zero_point = (-low / scale.float()).round_().clamp_(0, 15)
    zero = ((INT4_OFFSET - zero_point) * scale.float()).to(INT4_SCALE_DTYPE)
    return scale, zero


def _int4_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    # Codes from the *stored* (rounded) scale and zero, so rounding them costs nothing extra.
    codes = (groups - zero.float()[..., None]) / scale.float()[..., None] + INT4_OFFSET
    return codes.round_().clamp_(0, 15).to(torch.uint8)


def quantize_int4(
    weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> packed codes uint8 (N, K/2), fp16 scales and zeros (N, ceil(K/g))."""
    rows, cols = weight.shape
    if cols % 2:
        raise ConfigError(f"int4 needs an even input width, got {cols}")
    num_groups = -(-cols // group_size)
    packed = torch.empty((rows, cols // 2), dtype=torch.uint8, device=weight.device)
    scales = torch.empty((rows, num_groups), dtype=INT4_SCALE_DTYPE, device=weight.device)
    zeros = torch.empty_like(scales)
    step = _rows_per_chunk(cols, weight.device)
    for start in range(0, rows, step):
        block = weight[start : start + step].float()
        codes = torch.empty(block.shape, dtype=torch.uint8, device=weight.device)
        head, tail = _grouped(block, group_size)
        head_codes, tail_codes = _grouped(codes, group_size)
        scale, zero = _int4_group_params(head)
        head_codes.copy_(_int4_codes(head, scale, zero))
        if tail is not None:
            tail_scale, tail_zero = _int4_group_params(tail[:, None, :])
            tail_codes.copy_(_int4_codes(tail[:, None, :], tail_scale, tail_zero)[:, 0])
            scale = torch.cat([scale, tail_scale], dim=1)
            zero = torch.cat([zero, tail_zero], dim=1)
        packed[start : start + step] = pack_nibbles(codes)
        scales[start : start + step] = scale
        zeros[start : start + step] = zero
    return packed, scales, zeros


def int4_scales_offsets(
    scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored scales and zeros as one multiply and one add per element, in ``dtype``:
    w = code * scale + (zero - 8 * scale), the offset computed in fp32."""
    offsets = zeros.to(torch.float32) - INT4_OFFSET * scales.to(torch.float32)
    return scales.to(dtype), offsets.to(dtype)


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed (N, K/2) with scales/zeros (N, ceil(K/g)) -> (N, K) in ``dtype`` (into ``out``)."""
    rows, cols = packed.shape[0], 2 * packed.shape[1]
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
    scales_c, offsets_c = int4_scales_offsets(scales, zeros, dtype)
    if USE_FUSED_KERNEL and out.is_cuda and out.is_contiguous() and fused_int4_available():
        fused = fused_int4_dequantize(packed, scales_c, offsets_c, group_size, out)
        if fused is not None:
            return fused
    step = _rows_per_chunk(cols, packed.device)
    for start in range(0, rows, step):
        target = out[start : start + step]
        pairs = target.view(target.shape[0], -1, 2)
        chunk = packed[start : start + step]
        pairs[..., 0].copy_(chunk & 0xF)
        pairs[..., 1].copy_(chunk >> 4)
        head, tail = _grouped(target, group_size)
        full_groups = head.shape[1]
        head.mul_(scales_c[start : start + step, :full_groups, None])
        head.add_(offsets_c[start : start + step, :full_groups, None])
        if tail is not None:
            tail.mul_(scales_c[start : start + step, full_groups:])
            tail.add_(offsets_c[start : start + step, full_groups:])
    return out


# -- whole matrices and parts ----------------------------------------------------------------


def quantize_matrix(
    name: str, weight: torch.Tensor, quantization: Quantization
) -> dict[str, torch.Tensor]:
    """``X.weight`` -> its stored tensors ``X.weight.q``, ``.scale`` (and ``.zero``)."""
    if quantization.scheme == "int8":
        codes, scales = quantize_int8(weight)
        return {f"{name}.q": codes, f"{name}.scale": scales}
    packed, scales, zeros = quantize_int4(weight, quantization.group_size)
    return {f"{name}.q": packed, f"{name}.scale": scales, f"{name}.zero": zeros}


def dequantize_matrix(
    stored: Mapping[str, torch.Tensor],
    name: str,
    quantization: Quantization,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The matrix ``name`` from its stored tensors, in ``dtype`` (into ``out`` when given)."""
    codes, scales = stored[f"{name}.q"], stored[f"{name}.scale"]
    if quantization.scheme == "int8":
        return dequantize_int8(codes, scales, dtype, out)
    zeros = stored[f"{name}.zero"]
    return dequantize_int4(codes, scales, zeros, quantization.group_size, dtype, out)


def dequantized_shape(stored: Mapping[str, torch.Tensor], name: str) -> tuple[int, int]:
    codes = stored[f"{name}.q"]
    if codes.dtype == torch.int8:
        return tuple(codes.shape)  # type: ignore[return-value]
    return codes.shape[0], 2 * codes.shape[1]


def quantize_part(
    tensors: Mapping[str, torch.Tensor], quantization: Quantization
) -> dict[str, torch.Tensor]:
    """A part's 16-bit tensors -> its stored tensors (matrices quantized, the rest as given)."""
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in QUANTIZED_MATRICES:
            stored.update(quantize_matrix(name, tensor, quantization))
        else:
            stored[name] = tensor
    return stored


def _max_abs(stored: Mapping[str, torch.Tensor], name: str) -> float:
    """An upper bound of |w| for the matrix ``name``, from its scales alone."""
    scales = stored[f"{name}.scale"].float()
    if stored[f"{name}.q"].dtype == torch.int8:
        return float(scales.abs().max()) * INT8_MAX
    zeros = stored[f"{name}.zero"].float()
    return float((zeros.abs() + INT4_OFFSET * scales.abs()).max())


def to_compute(tensor: torch.Tensor, dtype: torch.dtype, name: str, where: str) -> torch.Tensor:
    """Cast a 16-bit tensor to the compute dtype; refuse fp16 when it would overflow."""
    if dtype == torch.float16 and tensor.is_floating_point() and tensor.dtype != dtype:
        peak = float(tensor.abs().max()) if tensor.numel() else 0.0
        if peak > FP16_MAX:
            raise ConfigError(
                f"{where}: tensor {name} has |value| {peak:.4g} beyond fp16's range; "
                "run with --dtype bf16 or fp32"
            )
    return tensor.to(dtype)


class DequantizingWeights(Mapping[str, torch.Tensor]):
    """One layer's weights under their logical names, compressed matrices dequantized on access.

    Contract: ``self["X.weight"]`` of a compressed matrix returns a view of ``scratch`` that is
    valid only until the next compressed matrix is looked up; use it at once. ``model.block``
    does: each ``linear`` reads its weight, then its (uncompressed) bias, and multiplies before
    the next lookup; ``in`` is answered without dequantizing. On CUDA every step runs on the
    current stream, so the next dequantization is ordered after the matmul that reads the
    scratch. Other tensors are cast to ``dtype`` once, at construction.

    With ``dtype`` fp16, construction checks that no value overflows it, which reads values
    back (a device sync on CUDA); a source that builds one per layer per pass should check on
    the first pass and pass ``check_range=False`` after.
    """

    def __init__(
        self,
        stored: Mapping[str, torch.Tensor],
        quantization: Quantization,
        dtype: torch.dtype,
        scratch: torch.Tensor | None = None,
        where: str = "layer",
        check_range: bool = True,
    ):
        self.quantization = quantization
        self.dtype = dtype
        self._stored = stored
        self._matrices = {matrix_of(name) for name in stored} - {None}
        self._plain = {
            name: to_compute(tensor, dtype, name, where) if check_range else tensor.to(dtype)
            for name, tensor in stored.items()
            if matrix_of(name) is None
        }
        if dtype == torch.float16 and check_range:
            for matrix in self._matrices:
                if _max_abs(stored, matrix) > FP16_MAX:
                    raise ConfigError(
                        f"{where}: tensor {matrix} reaches beyond fp16's range; "
                        "run with --dtype bf16 or fp32"
                    )
        need = max((_numel(dequantized_shape(stored, m)) for m in self._matrices), default=0)
        if scratch is None:
            device = next(iter(stored.values())).device
            scratch = torch.empty(need, dtype=dtype, device=device)
        if scratch.dtype != dtype or scratch.numel() < need:
            raise ValueError(f"scratch must hold {need} {dtype} elements")
        self._scratch = scratch

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._plain:
            return self._plain[name]
        if name not in self._matrices:
            raise KeyError(name)
        shape = dequantized_shape(self._stored, name)
        out = self._scratch[: _numel(shape)].view(shape)
        return dequantize_matrix(self._stored, name, self.quantization, self.dtype, out)

    def __contains__(self, name: object) -> bool:
        return name in self._plain or name in self._matrices

    def __iter__(self) -> Iterator[str]:
        yield from self._plain
        yield from sorted(self._matrices)  # type: ignore[type-var]

    def __len__(self) -> int:
        return len(self._plain) + len(self._matrices)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def scratch_elements(config: ModelConfig) -> int:
    """Elements of the largest compressed matrix: the one scratch a weight source needs."""
    hidden, ffn = config.hidden_size, config.ffn_size
    return max(3 * hidden * hidden, ffn * hidden)
