"""A small fused multi-LoRA kernel in C, compiled on first use with the system compiler, via ctypes.

One call per projection site and layer: for every adapter row of the step, the shrink (x @ A, q/k/v or
gate/up sharing one concatenated A) and the expand (u @ B, written straight into the fused base
output) run together, accumulating in fp32, with the rows split across the cores by OpenMP. Adapter
weights may be fp32 or bf16 (bf16 halves the bytes each distinct adapter streams per step, the
limit with many adapters; ENGINE-NOTES). Rows of the same adapter are adjacent (the step sorts them),
so each thread reads an adapter's weights once per run of its rows and keeps them in L2.

No torch headers are needed (the library takes raw pointers), so compiling takes about a second.
When no compiler is present or the build fails, `load()` returns None and `lora.LoraBatch` uses its
pure-PyTorch path (`grouped_mm` / `bmm`), which is tested against PEFT the same way.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("adaptery.engine")

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

static inline float bf2f(uint16_t h) { union { uint32_t u; float f; } v; v.u = ((uint32_t)h) << 16; return v.f; }
static inline uint16_t f2bf(float f) {
    union { uint32_t u; float f; } v; v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 64u);  /* NaN stays NaN */
    v.u += 0x7fffu + ((v.u >> 16) & 1u);  /* round to nearest even, as torch does */
    return (uint16_t)(v.u >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 bf16x16_masked(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
/* One row with bf16 adapter weights: the shrink as dot products in fp32 registers, the expand with each
   16-column block of the output held in a register across the rank, added to the output once. x and out
   are bf16 (xr16/o16, x widened into xf first, the sum rounded once into out) or fp32 (xr32/o32: an fp32
   model holding its adapters in bf16, half the bytes streamed per distinct adapter). */
static void lora_row_wbf16_avx512(const uint16_t *xr16, uint16_t *o16, const float *xr32, float *o32, int32_t s,
                                  int64_t r, const void *A, int64_t as, const void *B, int64_t bs, int64_t R,
                                  int64_t P, int64_t d_in, const int64_t *off, float *xf, float *u) {
    const int64_t d_out = off[P];
    const float *x = xr32;
    if (xr16 != NULL) {
        int64_t i = 0;
        for (; i + 16 <= d_in; i += 16) _mm512_storeu_ps(xf + i, bf16x16(xr16 + i));
        for (; i < d_in; i++) xf[i] = bf2f(xr16[i]);
        x = xf;
    }
    for (int64_t k = 0; k < r; k++) {
        for (int64_t p = 0; p < P; p++) {
            const uint16_t *a = (const uint16_t *)A + s * as + (k * P + p) * d_in;
            __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
            int64_t j = 0;
            for (; j + 32 <= d_in; j += 32) {
                acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), bf16x16(a + j), acc0);
                acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j + 16), bf16x16(a + j + 16), acc1);
            }
            float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
            for (; j < d_in; j++) sum += x[j] * bf2f(a[j]);
            u[p * R + k] = sum;
        }
    }
    for (int64_t p = 0; p < P; p++) {
        const int64_t lo = off[p], hi = off[p + 1];
        const float *up = u + p * R;
        for (int64_t c = lo; c < hi; c += 16) {
            const int64_t left = hi - c;
            const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
            const uint16_t *b = (const uint16_t *)B + s * bs + c;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t k = 0; k < r; k++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(up[k]), bf16x16_masked(b + k * d_out, m), acc);
            if (o16 != NULL) {
                float tmp[16];
                _mm512_storeu_ps(tmp, _mm512_add_ps(acc, bf16x16_masked(o16 + c, m)));
                for (int64_t q = 0; q < 16 && q < left; q++) o16[c + q] = f2bf(tmp[q]);
            } else {
                _mm512_mask_storeu_ps(o32 + c, m, _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, o32 + c)));
            }
        }
    }
}
#endif

/* x: n rows (stride xs) of d_in; out: n rows (stride os) of off[P] columns, updated in place.
   slot[t]: the adapter slot of row t (< 0: skip the row); rank[s]: its rank (<= R).
   A: element (s, k, p, i) at A[s * as + (k * P + p) * d_in + i]  (shrink rows, projection p, rank k)
   B: element (s, k, c) at B[s * bs + k * off[P] + c]; column c belongs to the projection p with
      off[p] <= c < off[p + 1] and is fed by u[p][k].  bf16 != 0: x and out are bfloat16 (else float32);
   wbf16 != 0: A and B are bfloat16 (else float32). */
void lora_site(int64_t n, const void *x, int64_t xs, void *out, int64_t os, const int32_t *slot,
               const int32_t *rank, const void *A, int64_t as, const void *B, int64_t bs, int64_t R,
               int64_t P, int64_t d_in, const int64_t *off, int bf16, int wbf16, int threads) {
    const int64_t d_out = off[P];
    if (n <= 0) return;
    if (threads > n) threads = (int)n;
    #pragma omp parallel num_threads(threads)
    {
        float *xf = (float *)malloc(sizeof(float) * (size_t)d_in);
        float *acc = (float *)malloc(sizeof(float) * (size_t)d_out);
        float *u = (float *)malloc(sizeof(float) * (size_t)(R * P));
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < n; t++) {
            const int32_t s = slot[t];
            if (s < 0) continue;  /* a row the caller computes another way */
            const int64_t r = rank[s];
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
            if (wbf16) {
                if (bf16) lora_row_wbf16_avx512((const uint16_t *)x + t * xs, (uint16_t *)out + t * os, NULL, NULL,
                                                s, r, A, as, B, bs, R, P, d_in, off, xf, u);
                else lora_row_wbf16_avx512(NULL, NULL, (const float *)x + t * xs, (float *)out + t * os,
                                           s, r, A, as, B, bs, R, P, d_in, off, xf, u);
                continue;
            }
#endif
            if (bf16) {
                const uint16_t *xr = (const uint16_t *)x + t * xs;
                #pragma omp simd
                for (int64_t i = 0; i < d_in; i++) xf[i] = bf2f(xr[i]);
            } else {
                const float *xr = (const float *)x + t * xs;
                #pragma omp simd
                for (int64_t i = 0; i < d_in; i++) xf[i] = xr[i];
            }
            for (int64_t k = 0; k < r; k++) {
                for (int64_t p = 0; p < P; p++) {
                    float sum = 0.f;
                    if (wbf16) {
                        const uint16_t *a = (const uint16_t *)A + s * as + (k * P + p) * d_in;
                        #pragma omp simd reduction(+ : sum)
                        for (int64_t i = 0; i < d_in; i++) sum += xf[i] * bf2f(a[i]);
                    } else {
                        const float *a = (const float *)A + s * as + (k * P + p) * d_in;
                        #pragma omp simd reduction(+ : sum)
                        for (int64_t i = 0; i < d_in; i++) sum += xf[i] * a[i];
                    }
                    u[p * R + k] = sum;
                }
            }
            for (int64_t c = 0; c < d_out; c++) acc[c] = 0.f;
            for (int64_t p = 0; p < P; p++) {
                const int64_t lo = off[p], hi = off[p + 1];
                for (int64_t k = 0; k < r; k++) {
                    const float uk = u[p * R + k];
                    if (wbf16) {
                        const uint16_t *b = (const uint16_t *)B + s * bs + k * d_out;
                        #pragma omp simd
                        for (int64_t c = lo; c < hi; c++) acc[c] += uk * bf2f(b[c]);
                    } else {
                        const float *b = (const float *)B + s * bs + k * d_out;
                        #pragma omp simd
                        for (int64_t c = lo; c < hi; c++) acc[c] += uk * b[c];
                    }
                }
            }
            if (bf16) {
                uint16_t *o = (uint16_t *)out + t * os;
                for (int64_t c = 0; c < d_out; c++) o[c] = f2bf(bf2f(o[c]) + acc[c]);
            } else {
                float *o = (float *)out + t * os;
                #pragma omp simd
                for (int64_t c = 0; c < d_out; c++) o[c] += acc[c];
            }
        }
        free(xf);
        free(acc);
        free(u);
    }
}
"""

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_lock = threading.Lock()
_loaded: dict[str, object] = {}


def _cache_dir() -> Path:
    root = os.environ.get("ADAPTERY_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "adaptery", "kernels"
    )
    return Path(root)


def _cpu_key() -> str:
    try:  # -march=native: a library built on another CPU may not run here
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        return next((line for line in lines if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc) on this machine")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "lora_kernel.c"
        source.write_text(SOURCE, encoding="utf-8")
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent process sees the whole library or none


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (logged once) when it cannot be built; ADAPTERY_LORA_KERNEL=0 disables it."""
    if os.environ.get("ADAPTERY_LORA_KERNEL", "1").lower() in {"0", "false", "off", "no"}:
        return None
    digest = hashlib.sha256("\0".join([SOURCE, *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    with _lock:
        if digest in _loaded:
            return _loaded[digest]  # type: ignore[return-value]
        target = _cache_dir() / f"lora_kernel-{digest}.so"
        library = None
        try:
            if not target.exists():
                _build(target)
            library = ctypes.CDLL(str(target))
            fn = library.lora_site
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            fn.argtypes = [i64, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, ptr, ctypes.c_int,
                           ctypes.c_int, ctypes.c_int]  # fmt: skip
            fn.restype = None
        except Exception as exc:  # no compiler, a failed build, a library that does not load: PyTorch path
            log.warning("the fused LoRA kernel is unavailable, using the PyTorch path: %s", exc)
            library = None
        _loaded[digest] = library
        return library


def site(
    library: ctypes.CDLL,
    x: torch.Tensor,
    out: torch.Tensor,
    slots: torch.Tensor,
    ranks: torch.Tensor,
    shrink: torch.Tensor,
    expand: torch.Tensor,
    offsets: torch.Tensor,
) -> None:
    """out += LoRA(x) row by row. x (n, d_in) and out (n, d_out) share a dtype, shrink (S, R, P, d_in) and
    expand (S, R, d_out) share one (bf16 adapters may serve an fp32 model); slots (n,) int32, ranks (S,)
    int32, offsets (P + 1,) int64."""
    n, d_in = x.shape
    if n == 0:
        return
    assert x.stride(1) == 1 and out.stride(1) == 1 and shrink.is_contiguous() and expand.is_contiguous()
    assert x.dtype == out.dtype and x.dtype in (torch.float32, torch.bfloat16)
    assert shrink.dtype == expand.dtype and shrink.dtype in (torch.float32, torch.bfloat16)
    library.lora_site(
        n, x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), slots.data_ptr(), ranks.data_ptr(),
        shrink.data_ptr(), shrink.stride(0), expand.data_ptr(), expand.stride(0), shrink.shape[1], shrink.shape[2],
        d_in, offsets.data_ptr(), int(x.dtype == torch.bfloat16), int(shrink.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )  # fmt: skip
