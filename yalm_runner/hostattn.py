"""Decode attention over a KV cache kept in RAM as 8- or 4-bit records, on the host's cores.

Issue 17's lever: if a decode step's attention runs where the cache lies, the cache never
crosses the link; only the new token's query, key and value go out and the attention's output
comes back. Torch's element-wise ops expand the records far too slowly for that (23-59x a
layer's time, benchmarks/RESULTS.md, session 5), so this module carries a small C kernel that
reads each record once and never materialises the expanded keys or values: with a record's
codes ``c``, scale ``s`` and minimum ``m`` (``kvformat``), ``q . k = s (q . c) + m sum(q)`` and
``sum_t p_t v_t = sum_t (p_t s_t) c_t + sum_t p_t m_t``.

The kernel is compiled on first use with the machine's C compiler (``cc``, or ``$CC``) for the
machine's own vector instructions, with OpenMP over rows and blocks of heads, and kept in a cache
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
/* A sum's eight lanes in one order, ((0+1)+(2+3))+((4+5)+(6+7)), alone or four at once. */
static inline float hsum(v8f v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}
#if defined(__AVX2__)
static inline void hsums4(const v8f *v, float *out) {  /* pairwise adds across four vectors */
    const __m256 ab = _mm256_hadd_ps((__m256)v[0], (__m256)v[1]);
    const __m256 cd = _mm256_hadd_ps((__m256)v[2], (__m256)v[3]);
    const __m256 abcd = _mm256_hadd_ps(ab, cd);  /* each sum's halves, low and high lanes */
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}
#else
static inline void hsums4(const v8f *v, float *out) {
    for (int i = 0; i < 4; i++) out[i] = hsum(v[i]);
}
#endif

/* exp(x) for eight scores less their maximum (x <= 0), to about an ulp: Cody and Waite's
   reduction by ln 2 and Cephes' expf polynomial. glibc's vector expf is declared to the
   compiler only under -ffast-math, so expf() would run a lane at a time (20% of a 4-bit
   layer's time). Below ln(FLT_MIN) the result is 0, as expf's underflow is: a masked slot
   (-10000) still weighs nothing. */
typedef int32_t v8s __attribute__((vector_size(32)));
static inline v8f select8(v8s mask, v8f yes, v8f no) {  /* C has no ?: over vectors */
    v8s a, b, c;
    memcpy(&a, &yes, 32); memcpy(&b, &no, 32);
    c = (a & mask) | (b & ~mask);
    v8f out; memcpy(&out, &c, 32); return out;
}
static inline v8f exp8(v8f x) {
    const float lowest = -87.336544f;  /* ln(FLT_MIN) */
    const v8s kept = x >= lowest;
    x = select8(kept, x, (v8f){0} + lowest);
    const v8f shift = (v8f){0} + 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    const v8f n = (x * 1.44269504088896341f + shift) - shift;
    const v8f r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    v8f e = (v8f){0} + 1.9875691500e-4f;
    e = e * r + 1.3981999507e-3f;
    e = e * r + 8.3334519073e-3f;
    e = e * r + 4.1665795894e-2f;
    e = e * r + 1.6666665459e-1f;
    e = e * r + 5.0000001201e-1f;
    e = e * (r * r) + r + 1.0f;
    const v8s bits = (__builtin_convertvector(n, v8s) + 127) << 23;
    v8f two_n;
    memcpy(&two_n, &bits, 32);
    return select8(kept, e * two_n, (v8f){0});
}

/* sc[0 .. count-1] = exp(sc[t] - top); returns their sum (eight lanes, then in a fixed order,
   so the bits depend on nothing but the scores). */
static inline float exp_sum(float *sc, int64_t count, float top) {
    v8f total = {0};
    int64_t t = 0;
    for (; t + 8 <= count; t += 8) {
        const v8f e = exp8(loadf(sc + t) - top);
        storef(sc + t, e);
        total += e;
    }
    if (t < count) {  /* the last few, padded with scores that weigh nothing */
        float last[8];
        for (int64_t i = 0; i < 8; i++) last[i] = t + i < count ? sc[t + i] - top : -1e30f;
        const v8f e = exp8(loadf(last));
        storef(last, e);
        for (int64_t i = 0; t + i < count; i++) sc[t + i] = last[i];
        total += e;
    }
    return hsum(total);
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

/* The same sums for several records at once, so that the FMAs of independent sums overlap
   (one record's chain of FMAs waits on itself); each sum's own order, and so its bits, is
   the one-record function's. ``dots4``/``dots8``: FOUR records' dots with one query. */
enum { FOUR = 4, TILE = 16 };

static inline void dots4(const float *a, const float *b, const uint8_t *const *r, int64_t codes,
                         float *out) {
    v8f acc[FOUR] = {{0}};
    int64_t j = 0;
    for (; j + 8 <= codes; j += 8) {
        const v8f qa = loadf(a + j), qb = loadf(b + j);
        for (int i = 0; i < FOUR; i++) {
            v8f low, high;
            nibble_floats(r[i] + j, &low, &high);
            acc[i] += qa * low + qb * high;
        }
    }
    hsums4(acc, out);
    for (int i = 0; i < FOUR; i++) {
        float rest = 0.0f;
        for (int64_t k = j; k < codes; k++)
            rest += a[k] * (float)(r[i][k] & 15) + b[k] * (float)(r[i][k] >> 4);
        out[i] += rest;
    }
}

static inline void dots8(const float *a, const uint8_t *const *r, int64_t codes, float *out) {
    v8f acc[FOUR] = {{0}};
    int64_t j = 0;
    for (; j + 8 <= codes; j += 8) {
        const v8f qa = loadf(a + j);
        for (int i = 0; i < FOUR; i++) acc[i] += qa * int8_floats(r[i] + j);
    }
    hsums4(acc, out);
    for (int i = 0; i < FOUR; i++) {
        float rest = 0.0f;
        for (int64_t k = j; k < codes; k++) rest += a[k] * (float)(int8_t)r[i][k];
        out[i] += rest;
    }
}

/* a (and b) += sum_i w[i] codes(r[i]), the records in order: each element gets its additions
   in the order one record at a time would give them, but four chunks of eight elements are
   summed side by side in registers, loaded and stored once for all n records. */
static inline void axpys4(float *a, float *b, const float *w, const uint8_t *const *r,
                          int64_t n, int64_t codes) {
    int64_t j = 0;
    for (; j + 8 * FOUR <= codes; j += 8 * FOUR) {
        v8f x[FOUR], y[FOUR];
        for (int k = 0; k < FOUR; k++) { x[k] = loadf(a + j + 8 * k); y[k] = loadf(b + j + 8 * k); }
        for (int64_t i = 0; i < n; i++) {
            for (int k = 0; k < FOUR; k++) {
                v8f low, high;
                nibble_floats(r[i] + j + 8 * k, &low, &high);
                x[k] = x[k] + w[i] * low;
                y[k] = y[k] + w[i] * high;
            }
        }
        for (int k = 0; k < FOUR; k++) { storef(a + j + 8 * k, x[k]); storef(b + j + 8 * k, y[k]); }
    }
    for (; j + 8 <= codes; j += 8) {
        v8f x = loadf(a + j), y = loadf(b + j);
        for (int64_t i = 0; i < n; i++) {
            v8f low, high;
            nibble_floats(r[i] + j, &low, &high);
            x = x + w[i] * low;
            y = y + w[i] * high;
        }
        storef(a + j, x); storef(b + j, y);
    }
    for (; j < codes; j++)
        for (int64_t i = 0; i < n; i++) {
            a[j] += w[i] * (float)(r[i][j] & 15);
            b[j] += w[i] * (float)(r[i][j] >> 4);
        }
}

static inline void axpys8(float *a, const float *w, const uint8_t *const *r, int64_t n,
                          int64_t codes) {
    int64_t j = 0;
    for (; j + 8 * FOUR <= codes; j += 8 * FOUR) {
        v8f x[FOUR];
        for (int k = 0; k < FOUR; k++) x[k] = loadf(a + j + 8 * k);
        for (int64_t i = 0; i < n; i++)
            for (int k = 0; k < FOUR; k++) x[k] = x[k] + w[i] * int8_floats(r[i] + j + 8 * k);
        for (int k = 0; k < FOUR; k++) storef(a + j + 8 * k, x[k]);
    }
    for (; j + 8 <= codes; j += 8) {
        v8f x = loadf(a + j);
        for (int64_t i = 0; i < n; i++) x = x + w[i] * int8_floats(r[i] + j);
        storef(a + j, x);
    }
    for (; j < codes; j++)
        for (int64_t i = 0; i < n; i++) a[j] += w[i] * (float)(int8_t)r[i][j];
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
   A task is one row and a block of `block` heads. It walks the slots a TILE at a time; in a
   tile, one head's records (a page apart), then the next head's beside them, still in the
   cache, each head's sums held in registers across the tile; the next tile's records are
   prefetched as this one's are read (measured on a Zen 4 core, 32 rows x 178 slots: 4-bit
   14.8 -> 11.3 ms, 8-bit 20.3 -> 12.4 ms, with the vector exp). */
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
            /* Scores, TILE slots at a time: a head's records in the tile (a page apart), then
               the next head's beside them, still in the cache. */
            const uint8_t *key_row = keys + rowmap[row] * rs + h0 * hs;
            for (int64_t t0 = 0; t0 < old; t0 += TILE) {
                const int64_t t1 = t0 + TILE < old ? t0 + TILE : old;
                for (int64_t h = 0; h < nh; h++) {
                    const float *a = qa + h * dim, *b = a + codes;
                    float *sc = scores + h * width;
                    const uint8_t *rec[TILE];
                    int64_t at[TILE], n = 0;
                    for (int64_t t = t0; t < t1; t++) {
                        if (t + TILE < old)  /* a tile's slots are pages apart: no hardware
                                                prefetcher follows them across */
                            __builtin_prefetch(key_row + (t + TILE) * ss + h * hs);
                        sc[t] = -10000.0f;
                        if (ok[t]) { rec[n] = key_row + t * ss + h * hs; at[n++] = t; }
                    }
                    float dot[TILE];
                    int64_t i = 0;
                    for (; i + FOUR <= n; i += FOUR) {
                        if (bits == 8) dots8(a, rec + i, codes, dot + i);
                        else dots4(a, b, rec + i, codes, dot + i);
                    }
                    for (; i < n; i++) dot[i] = bits == 8 ? dot8(a, rec[i], codes)
                                                         : dot4(a, b, rec[i], codes);
                    for (i = 0; i < n; i++) {
                        const uint8_t *r = rec[i];
                        if (bits == 8) {
                            sc[at[i]] = half_at(r + codes, half) * dot[i] * scale;
                        } else {
                            const float s = half_at(r + codes, half);
                            const float lo = half_at(r + codes + step, half);
                            sc[at[i]] = (s * dot[i] + lo * qsum[h]) * scale;
                        }
                    }
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
                total = exp_sum(sc, old + 1, top);
                const float norm = 1.0f / total;
                for (int64_t t = 0; t <= old; t++) sc[t] *= norm;
                lows[h] = 0.0f;
            }
            for (int64_t j = 0; j < nh * dim; j++) acc[j] = 0.0f;
            /* The values the same way: a tile's records of a head summed in registers. */
            const uint8_t *value_row = values + rowmap[row] * rs + h0 * hs;
            for (int64_t t0 = 0; t0 < old; t0 += TILE) {
                const int64_t t1 = t0 + TILE < old ? t0 + TILE : old;
                for (int64_t h = 0; h < nh; h++) {
                    const uint8_t *rec[TILE];
                    float w[TILE], low = lows[h];
                    int64_t n = 0;
                    for (int64_t t = t0; t < t1; t++) {
                        if (t + TILE < old)  /* this head's record a tile on, asked for now */
                            __builtin_prefetch(value_row + (t + TILE) * ss + h * hs);
                        const float p = scores[h * width + t];
                        if (p == 0.0f) continue;
                        const uint8_t *r = value_row + t * ss + h * hs;
                        rec[n] = r;
                        w[n++] = p * half_at(r + codes, half);
                        if (bits == 4) low += p * (half_at(r + codes + step, half));
                    }
                    lows[h] = low;
                    float *a = acc + h * dim;
                    if (bits == 8) axpys8(a, w, rec, n, codes);
                    else axpys4(a, a + codes, w, rec, n, codes);
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
                raise OSError(
                    f"{compiler} could not build the host attention kernel: "
                    f"{_why_it_failed(done.stderr)}"
                )
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


def _why_it_failed(stderr: str) -> str:
    """The compiler's line that says what is missing or wrong (its last line is often only
    "linker command failed"), with what to do when it is OpenMP's runtime."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()] or ["no message"]
    telling = [line for line in lines if "cannot find" in line or "fatal error" in line]
    said = (telling or lines)[-1]
    if "omp" in said:
        said += (
            " (the compiler's OpenMP runtime is missing: for clang install libomp-dev, or "
            "build with gcc: CC=gcc)"
        )
    return said


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
