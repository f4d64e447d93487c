"""Decode attention over a KV cache kept in RAM as 8- or 4-bit records, on the host's cores.

Issue 17's lever: if a decode step's attention runs where the cache lies, the cache never
crosses the link; only the new token's query, key and value go out and the attention's output
comes back. Torch's element-wise ops expand the records far too slowly for that (23-59x a
layer's time, benchmarks/RESULTS.md, session 5), so this module carries a small C kernel that
reads each record once and never materialises the expanded keys or values: with a record's
codes ``c``, scale ``s`` and minimum ``m`` (``kvformat``), ``q . k = s (q . c) + m sum(q)`` and
``sum_t p_t v_t = sum_t (p_t s_t) c_t + sum_t p_t m_t``.

The kernel is compiled on first use with the machine's C compiler (``cc``, or ``$CC``) for the
machine's own vector instructions, with OpenMP over (row, head) pairs, and kept in a cache
folder keyed by its source. Each (row, head) is summed in one fixed order by one thread, so
the result is the same bits whatever the thread count. Where there is no compiler,
``available()`` says why and nothing here is used.

The arithmetic is fp32 throughout (the GPU path computes scores in the compute dtype): outputs
agree with ``reference`` to fp32 rounding, and with the GPU's bf16 path within its rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from yalm_runner.kvformat import _fields

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>

static inline float bf16(const uint8_t *p) {
    uint32_t u = (uint32_t)p[0] << 16 | (uint32_t)p[1] << 24;
    float f; memcpy(&f, &u, 4); return f;
}

static inline float fp16(const uint8_t *p) {
    uint32_t h = (uint32_t)p[0] | (uint32_t)p[1] << 8;
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
    else if (exp) u = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) u = sign;
    else {  /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400u)) { man <<= 1; exp--; }
        u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    float f; memcpy(&f, &u, 4); return f;
}

static inline float half_at(const uint8_t *p, int64_t kind) {
    if (kind == 2) { float f; memcpy(&f, p, 4); return f; }
    return kind ? fp16(p) : bf16(p);
}

typedef float v8f __attribute__((vector_size(32)));
typedef uint8_t v8b __attribute__((vector_size(8)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8b load8(const uint8_t *p) { v8b v; memcpy(&v, p, 8); return v; }

/* Eight codes as floats: the 4-bit records' low and high nibbles of eight bytes, or eight int8
   codes. With AVX2 by intrinsics (one widening load, then 32-bit lanes), so that no compiler
   version's choices can turn them into a lane at a time; elsewhere by gcc's vector extensions
   in forms gcc 12 widens in one instruction (it widens a signed 8-byte vector, or an unsigned
   one straight from memory, a lane at a time). */
#if defined(__AVX2__)
#include <immintrin.h>
static inline void nibble_floats(const uint8_t *p, v8f *low, v8f *high) {
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *low = (v8f)_mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(15)));
    *high = (v8f)_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 4));
}
static inline v8f int8_floats(const uint8_t *p) {
    return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else
static inline void nibble_floats(const uint8_t *p, v8f *low, v8f *high) {
    v8b c = load8(p);
    *low = __builtin_convertvector(__builtin_convertvector(c & 15, v8i), v8f);
    *high = __builtin_convertvector(__builtin_convertvector(c >> 4, v8i), v8f);
}
static inline v8f int8_floats(const uint8_t *p) {
    v8i x = __builtin_convertvector(load8(p) ^ 128, v8i);  /* c ^ 128 = c + 128 as a byte */
    return __builtin_convertvector(x - 128, v8f);
}
#endif
static inline v8f loadf(const float *p) { v8f v; memcpy(&v, p, 32); return v; }
static inline void storef(float *p, v8f v) { memcpy(p, &v, 32); }
static inline float hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* q . codes over `codes` bytes, eight lanes at a time and the rest one by one: 4-bit records
   keep even elements in the low nibbles (a) and odd ones in the high (b); 8-bit ones are int8. */
static inline float dot4(const float *a, const float *b, const uint8_t *r, int64_t codes) {
    v8f acc = {0};
    int64_t j = 0;
    for (; j + 8 <= codes; j += 8) {
        v8f low, high;
        nibble_floats(r + j, &low, &high);
        acc += loadf(a + j) * low + loadf(b + j) * high;
    }
    float rest = 0.0f;
    for (; j < codes; j++) rest += a[j] * (float)(r[j] & 15) + b[j] * (float)(r[j] >> 4);
    return hsum(acc) + rest;
}

static inline float dot8(const float *a, const uint8_t *r, int64_t codes) {
    v8f acc = {0};
    int64_t j = 0;
    for (; j + 8 <= codes; j += 8) {
        acc += loadf(a + j) * int8_floats(r + j);
    }
    float rest = 0.0f;
    for (; j < codes; j++) rest += a[j] * (float)(int8_t)r[j];
    return hsum(acc) + rest;
}

static inline void axpy4(float *a, float *b, float w, const uint8_t *r, int64_t codes) {
    int64_t j = 0;
    for (; j + 8 <= codes; j += 8) {
        v8f low, high;
        nibble_floats(r + j, &low, &high);
        storef(a + j, loadf(a + j) + w * low);
        storef(b + j, loadf(b + j) + w * high);
    }
    for (; j < codes; j++) { a[j] += w * (float)(r[j] & 15); b[j] += w * (float)(r[j] >> 4); }
}

static inline void axpy8(float *a, float w, const uint8_t *r, int64_t codes) {
    int64_t j = 0;
    for (; j + 8 <= codes; j += 8) {
        storef(a + j, loadf(a + j) + w * int8_floats(r + j));
    }
    for (; j < codes; j++) a[j] += w * (float)(int8_t)r[j];
}

/* Which of the code paths above this build took (for a benchmark to print). */
const char *yalm_vector_path(void) {
#if defined(__AVX2__)
    return "AVX2 intrinsics";
#else
    return "generic vectors";
#endif
}

/* One decode step's attention for every (row, head).
   keys, values: records, element (row, slot, head) at row*rs + slot*ss + head*hs bytes, where
   row is rowmap[r] for the r-th row of the step.
   query, new_keys, new_values, out: fp32 (rows, heads, dim), contiguous.
   valid: (rows, old) bytes, 1 where an old slot may be seen; slots 0 .. old-1 are read.
   bits: 8 or 4; half: the scales' type, 0 bfloat16, 1 float16, 2 float32. Masked scores are
   -10000, as the model's are (a masked slot then weighs exp(-10000 - max) = 0 in fp32).
   new_records (2, rows, heads, record) bytes, unless NULL: the step's own keys' and values'
   records, written at slot `old` of each row (this step attends the new slot in full
   precision from new_keys/new_values; later steps read these records).
   A task is one row and a block of `block` heads: it walks the slots in order and, at each,
   the block's records, which lie side by side (a head at a time would jump a page a slot and
   wait on memory at every record). */
void yalm_attend(uint8_t *keys, uint8_t *values, int64_t rs, int64_t ss, int64_t hs,
                 const float *query, const float *new_keys, const float *new_values,
                 const uint8_t *valid, const int64_t *rowmap, float *out, int64_t rows,
                 int64_t heads, int64_t dim, int64_t old, int64_t bits, int64_t half,
                 float scale, int64_t block, int64_t threads, const uint8_t *new_records,
                 int64_t record) {
    const int64_t codes = bits == 8 ? dim : dim / 2, step = half == 2 ? 4 : 2;
    const int64_t blocks = (heads + block - 1) / block, width = old + 1;
    #pragma omp parallel num_threads((int)threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(block * width));
        float *qa = malloc(sizeof(float) * (size_t)(block * dim));
        float *acc = malloc(sizeof(float) * (size_t)(block * dim));
        float *qsum = malloc(sizeof(float) * (size_t)block);
        float *lows = malloc(sizeof(float) * (size_t)block);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < rows * blocks; task++) {
            const int64_t row = task / blocks, h0 = (task % blocks) * block;
            const int64_t nh = heads - h0 < block ? heads - h0 : block;
            const uint8_t *ok = valid + row * old;
            if (new_records) {  /* the new slot's records into the cache, for later steps */
                for (int64_t h = h0; h < h0 + nh; h++) {
                    const int64_t at = rowmap[row] * rs + old * ss + h * hs;
                    const int64_t from = (row * heads + h) * record;
                    memcpy(keys + at, new_records + from, (size_t)record);
                    memcpy(values + at, new_records + rows * heads * record + from,
                           (size_t)record);
                }
            }
            for (int64_t h = 0; h < nh; h++) {
                const float *q = query + (row * heads + h0 + h) * dim;
                float *a = qa + h * dim, *b = a + codes, sum = 0.0f;
                if (bits == 8) {
                    for (int64_t j = 0; j < dim; j++) { a[j] = q[j]; sum += q[j]; }
                } else {
                    for (int64_t j = 0; j < codes; j++) {
                        a[j] = q[2 * j]; b[j] = q[2 * j + 1]; sum += q[2 * j] + q[2 * j + 1];
                    }
                }
                qsum[h] = sum;
            }
            for (int64_t t = 0; t < old; t++) {
                const uint8_t *base = keys + rowmap[row] * rs + t * ss + h0 * hs;
                for (int64_t h = 0; h < nh; h++) {
                    float s = -10000.0f;
                    if (ok[t]) {
                        const uint8_t *r = base + h * hs;
                        const float *a = qa + h * dim, *b = a + codes;
                        if (bits == 8) {
                            float dot = dot8(a, r, codes);
                            s = half_at(r + codes, half) * dot * scale;
                        } else {
                            float dot = dot4(a, b, r, codes);
                            float sc = half_at(r + codes, half);
                            float lo = half_at(r + codes + step, half);
                            s = (sc * dot + lo * qsum[h]) * scale;
                        }
                    }
                    scores[h * width + t] = s;
                }
            }
            for (int64_t h = 0; h < nh; h++) {
                const int64_t at = (row * heads + h0 + h) * dim;
                const float *q = query + at, *nk = new_keys + at;
                float own = 0.0f, top, total = 0.0f, *sc = scores + h * width;
                for (int64_t j = 0; j < dim; j++) own += q[j] * nk[j];
                sc[old] = own * scale;
                top = sc[old];
                for (int64_t t = 0; t < old; t++) if (sc[t] > top) top = sc[t];
                #pragma omp simd reduction(+:total)
                for (int64_t t = 0; t <= old; t++) {
                    sc[t] = expf(sc[t] - top);
                    total += sc[t];
                }
                const float norm = 1.0f / total;
                for (int64_t t = 0; t <= old; t++) sc[t] *= norm;
                lows[h] = 0.0f;
            }
            for (int64_t j = 0; j < nh * dim; j++) acc[j] = 0.0f;
            for (int64_t t = 0; t < old; t++) {
                const uint8_t *base = values + rowmap[row] * rs + t * ss + h0 * hs;
                for (int64_t h = 0; h < nh; h++) {
                    const float p = scores[h * width + t];
                    if (p == 0.0f) continue;
                    const uint8_t *r = base + h * hs;
                    float *a = acc + h * dim, *b = a + codes;
                    const float w = p * half_at(r + codes, half);
                    if (bits == 8) {
                        axpy8(a, w, r, codes);
                    } else {
                        lows[h] += p * (half_at(r + codes + step, half));
                        axpy4(a, b, w, r, codes);
                    }
                }
            }
            for (int64_t h = 0; h < nh; h++) {
                const int64_t at = (row * heads + h0 + h) * dim;
                const float *nv = new_values + at, *a = acc + h * dim, *b = a + codes;
                const float pown = scores[h * width + old];
                float *o = out + at;
                if (bits == 8) {
                    for (int64_t j = 0; j < dim; j++) o[j] = a[j] + pown * nv[j];
                } else {
                    for (int64_t j = 0; j < codes; j++) {
                        o[2 * j] = a[j] + lows[h] + pown * nv[2 * j];
                        o[2 * j + 1] = b[j] + lows[h] + pown * nv[2 * j + 1];
                    }
                }
            }
        }
        free(scores); free(qa); free(acc); free(qsum); free(lows);
    }
}
"""

# -fno-math-errno lets the softmax's exponentials run as vector calls (libmvec).
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno")

_library: ctypes.CDLL | None = None
_why_not: str | None = None
_built_with = ""  # the compiler's first line of --version, and the options


def cache_folder() -> Path:
    """Where compiled kernels are kept: ``$YALM_CACHE_DIR/kernels``, else the user's cache
    folder's ``yalm_runner/kernels``."""
    if os.environ.get("YALM_CACHE_DIR"):
        return Path(os.environ["YALM_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "yalm_runner" / "kernels"


def _flags() -> tuple[str, ...]:
    """The compiler's options: ``FLAGS``, or ``$YALM_HOSTATTN_CFLAGS`` (space-separated) in
    their place, for trying other instruction sets on one machine (benchmarks); the options
    that make a shared library are added to either."""
    chosen = os.environ.get("YALM_HOSTATTN_CFLAGS")
    return (*(chosen.split() if chosen else FLAGS), "-shared", "-fPIC")


def _compile() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler (cc, gcc or $CC) on this machine")
    flags = _flags()
    key = hashlib.sha256((SOURCE + " ".join(flags) + compiler).encode()).hexdigest()[:16]
    target = cache_folder() / f"hostattn-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            source = Path(scratch) / "hostattn.c"
            source.write_text(SOURCE)
            built = Path(scratch) / "hostattn.so"
            done = subprocess.run(
                [compiler, *flags, str(source), "-o", str(built), "-lm"],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise OSError(f"{compiler} could not build the host attention kernel: {last}")
            os.replace(built, target)  # atomic: a concurrent process sees all of it or none
    library = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.yalm_attend.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
    library.yalm_attend.argtypes += [i64, i64, i64, i64, i64, i64, ctypes.c_float, i64, i64]
    library.yalm_attend.argtypes += [ptr, i64]
    library.yalm_attend.restype = None
    library.yalm_vector_path.restype = ctypes.c_char_p
    global _built_with
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    _built_with = f"{(version.splitlines() or [compiler])[0]}, {' '.join(flags)}"
    return library


def available() -> bool:
    """Whether the kernel is built and loaded (compiling it the first time)."""
    global _library, _why_not
    if _library is None and _why_not is None:
        try:
            _library = _compile()
        except OSError as error:
            _why_not = str(error)
    return _library is not None


def build_description() -> str:
    """The compiler, its options and the vector path the kernel was built with."""
    if not available():
        return f"unavailable: {_why_not}"
    assert _library is not None
    return f"{_library.yalm_vector_path().decode()}; {_built_with}"


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None while it is True or untried)."""
    return _why_not


SCALE_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def attend(
    keys: torch.Tensor,
    values: torch.Tensor,
    bits: int,
    scale_dtype: torch.dtype,
    query: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    valid: torch.Tensor,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    threads: int | None = None,
    new_records: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step's attention output, fp32 (B, NH, D), into ``out`` when given.

    ``keys``/``values``: uint8 records viewed as (rows, S, NH, R) in any layout whose last axis
    is contiguous (``host.permute(1, 0, 2, 3)`` for a slot-major cache); ``rows`` (int64, B)
    says which of their rows the step's rows are (all of them, in order, by default); slots
    ``0 .. old-1`` with ``old = valid.shape[1]`` are read. ``query``, ``new_keys``,
    ``new_values``: the step's (B, NH, D) after rotary, fp32, attended in full precision (the
    new slot is every row's last key). ``valid`` (B, old) says which old slots a row may see.
    ``scale_dtype`` is the records' scale type (the compute dtype they were encoded from).
    ``new_records`` (2, B, NH, R) uint8, when given: the step's keys' and values' records,
    written into slot ``old`` of each of the step's rows by the kernel's threads (no torch op
    on the host beside the kernel: torch's own thread pool would spin on the cores it needs).
    """
    if not available():
        raise RuntimeError(f"the host attention kernel is unavailable: {_why_not}")
    if bits not in (8, 4) or keys.dtype != torch.uint8 or keys.stride(-1) != 1:
        raise ValueError("host attention reads 8- or 4-bit uint8 records, last axis contiguous")
    if keys.stride() != values.stride() or keys.shape != values.shape:
        raise ValueError("keys and values must share one layout")
    if scale_dtype not in SCALE_KINDS:
        raise ValueError(f"records with {scale_dtype} scales are not supported here")
    batch, heads, dim = query.shape
    old = valid.shape[1]
    if rows is None:
        rows = torch.arange(batch, dtype=torch.int64)
    query, new_keys, new_values = (
        x.to(torch.float32).contiguous() for x in (query, new_keys, new_values)
    )
    valid, rows = valid.to(torch.uint8).contiguous(), rows.to(torch.int64).contiguous()
    if out is None:
        out = torch.empty((batch, heads, dim), dtype=torch.float32)
    threads = threads or torch.get_num_threads()
    # Blocks of heads, about sixteen tasks a thread, handed out as threads come free (a core
    # that something else holds for a while takes fewer); a block's records lie side by side
    # at each slot, so blocks of fewer than 16 heads read slower.
    block = min(heads, max(16, -(-heads * batch // (16 * threads))))
    record = keys.shape[-1]
    if new_records is not None:
        if new_records.shape != (2, batch, heads, record) or new_records.dtype != torch.uint8:
            raise ValueError(f"new records must be (2, {batch}, {heads}, {record}) uint8")
        if old >= keys.shape[1]:
            raise ValueError(f"slot {old} is past the cache's {keys.shape[1]} slots")
        new_records = new_records.contiguous()
    assert _library is not None
    _library.yalm_attend(
        keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2),
        query.data_ptr(), new_keys.data_ptr(), new_values.data_ptr(), valid.data_ptr(),
        rows.data_ptr(), out.data_ptr(), batch, heads, dim, old, bits, SCALE_KINDS[scale_dtype],
        dim**-0.5, block, threads, 0 if new_records is None else new_records.data_ptr(), record,
    )  # fmt: skip
    return out


def reference(
    keys: torch.Tensor,
    values: torch.Tensor,
    bits: int,
    scale_dtype: torch.dtype,
    query: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    valid: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attend``'s result the plain way, in fp32: expand the records (in fp32, not rounded to
    their scales' type as ``decode_kv`` does), then the model's masked softmax attention."""
    old = valid.shape[1]
    if rows is not None:
        keys, values = keys.index_select(0, rows), values.index_select(0, rows)
    keys, values = keys[:, :old], values[:, :old]
    dim = query.shape[-1]
    element = torch.empty((), dtype=scale_dtype).element_size()
    expanded = []
    for records in (keys, values):
        fields = [records[..., a:b].contiguous() for a, b in _fields(bits, dim, element)]
        scale = fields[1].view(scale_dtype).float()
        if bits == 8:
            expanded.append(fields[0].view(torch.int8).float() * scale)
        else:
            codes = torch.stack([fields[0] & 15, fields[0] >> 4], dim=-1).flatten(-2).float()
            expanded.append(codes * scale + fields[2].view(scale_dtype).float())
    k = torch.cat([expanded[0], new_keys.float()[:, None]], dim=1)  # (B, S+1, NH, D)
    v = torch.cat([expanded[1], new_values.float()[:, None]], dim=1)
    scores = torch.einsum("bhd,bshd->bhs", query.float(), k) * dim**-0.5
    seen = torch.cat([valid.bool(), torch.ones(valid.shape[0], 1, dtype=torch.bool)], dim=1)
    scores = scores.masked_fill(~seen[:, None, :], -10000.0)
    return torch.einsum("bhs,bshd->bhd", torch.softmax(scores, dim=-1), v)
