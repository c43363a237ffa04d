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

/* the tile's rows of x as fp32: bf16 rows widened into xf (a loop the compiler vectorises), fp32 rows as they are */
static inline void tile_rows_fp32(int tn, int bf16, const int64_t *rows, const void *x, int64_t xs, int64_t d_in,
                                  float *xf, const float **xr) {
    for (int t = 0; t < tn; t++) {
        if (bf16) {
            const uint16_t *src = (const uint16_t *)x + rows[t] * xs;
            float *dst = xf + t * d_in;
            for (int64_t i = 0; i < d_in; i++) dst[i] = bf2f(src[i]);
            xr[t] = dst;
        } else {
            xr[t] = (const float *)x + rows[t] * xs;
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define INLINE static inline __attribute__((always_inline))
INLINE __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
INLINE __m512 bf16x16_masked(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
/* 16 floats to bf16, rounded as f2bf does (nearest even, NaN kept quiet), stored under mask m */
INLINE void store_bf16x16(uint16_t *p, __m512 v, __mmask16 m) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
/* adapter weights: bf16 (wbf16) or fp32; a constant at every call site, so each row below is compiled twice */
INLINE __m512 wload(const void *w, int64_t i, const int wbf16) {
    return wbf16 ? bf16x16((const uint16_t *)w + i) : _mm512_loadu_ps((const float *)w + i);
}
INLINE __m512 wload_masked(const void *w, int64_t i, __mmask16 m, const int wbf16) {
    return wbf16 ? bf16x16_masked((const uint16_t *)w + i, m) : _mm512_maskz_loadu_ps(m, (const float *)w + i);
}
/* A tile: up to TILE rows of the same adapter (a decode is a tile of one row, a prefill chunk is cut into
   tiles), so each weight loaded serves every row of the tile. x and out are bf16 (each row widened into xf
   first, the sum rounded once into out) or fp32. tn, bf16 and wbf16 are constants at every call site: the
   compiler keeps the accumulators in registers.
   The shrink takes KB rows of A at a time against the tile's rows (tn x KB dot products in fp32 registers,
   16 columns a step: KB + tn loads feed tn x KB FMAs, where one row of A at a time took 2 tn + 2 loads for
   2 tn FMAs and prefill tiles ran at ~30 GFLOP/s on two cores), the expand CB 16-column blocks at a time, each
   block of each row held in a register across the rank and added to the output once (tn broadcasts and CB
   loads feed tn x CB FMAs). Widths that are not a multiple of 16 end in masked loads. */
#define TILE 4
/* Software prefetches: an adapter's rows are short streams (a row of A is 2-8 KiB, a tile reads KB of them side by
   side, then r rows of B 64 columns at a time), too short for the hardware prefetchers to ramp up before they end, and
   with many adapters in a step every one of them comes from memory (the base model's weights pass through the caches
   between two sites). Each row of A is fetched PF_SHRINK bytes ahead of its loads; the expand fetches each row of B
   PF_EXPAND_GROUPS column groups ahead. Measured (22 bf16 adapters, a 1 GiB read before each step:
   bench/lora_kernel.py's "from memory" column): 5.2 -> 4.3 ms a step, 19.5 -> 23.5 GB/s, where reading memory as
   fast as torch can is 27 GB/s; unchanged where the adapters stay in cache. */
#define PF_SHRINK 512
#define PF_EXPAND_GROUPS 2
INLINE void shrink_block512(const int tn, const int KB, const int wbf16, const float *const *xr, const char *a,
                            int64_t d_in, float *u, int64_t q, int64_t P, int64_t R) {
    const int64_t es = wbf16 ? 2 : 4, d16 = d_in & ~(int64_t)15;
    __m512 acc[TILE][8];
    for (int t = 0; t < tn; t++)
        for (int kb = 0; kb < KB; kb++) acc[t][kb] = _mm512_setzero_ps();
    for (int64_t j = 0; j < d16; j += 16) {
        __m512 xv[TILE];
        for (int t = 0; t < tn; t++) xv[t] = _mm512_loadu_ps(xr[t] + j);
        for (int kb = 0; kb < KB; kb++) {
            _mm_prefetch(a + (kb * d_in + j) * es + PF_SHRINK, _MM_HINT_T0);
            const __m512 w = wload(a + kb * d_in * es, j, wbf16);
            for (int t = 0; t < tn; t++) acc[t][kb] = _mm512_fmadd_ps(xv[t], w, acc[t][kb]);
        }
    }
    if (d16 < d_in) {
        const __mmask16 m = (__mmask16)((1u << (d_in - d16)) - 1u);
        __m512 xv[TILE];
        for (int t = 0; t < tn; t++) xv[t] = _mm512_maskz_loadu_ps(m, xr[t] + d16);
        for (int kb = 0; kb < KB; kb++) {
            const __m512 w = wload_masked(a + kb * d_in * es, d16, m, wbf16);
            for (int t = 0; t < tn; t++) acc[t][kb] = _mm512_fmadd_ps(xv[t], w, acc[t][kb]);
        }
    }
    for (int kb = 0; kb < KB; kb++) {
        const int64_t k = (q + kb) / P, p = (q + kb) % P;  /* A's row q + kb is (k, p) */
        for (int t = 0; t < tn; t++) u[(t * P + p) * R + k] = _mm512_reduce_add_ps(acc[t][kb]);
    }
}
INLINE void add_out16(const int bf16, void *out, int64_t at, __m512 v, __mmask16 m) {
    if (bf16) {
        uint16_t *o = (uint16_t *)out + at;
        store_bf16x16(o, _mm512_add_ps(v, bf16x16_masked(o, m)), m);
    } else {
        float *o = (float *)out + at;
        _mm512_mask_storeu_ps(o, m, _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, o)));
    }
}
/* columns c .. c + 16 CB (inside projection p, the last block masked by m) of the tile's rows
   += sum_k u[(t P + p) R + k] B[k, .] */
INLINE void expand_block512(const int tn, const int CB, const int bf16, const int wbf16, const int64_t *rows,
                            void *out, int64_t os, const void *b, int64_t d_out, int64_t r, const float *u, int64_t P,
                            int64_t R, int64_t p, int64_t c, __mmask16 m) {
    __m512 acc[TILE][4];
    const int64_t es = wbf16 ? 2 : 4, group = 16 * CB * es;
    for (int t = 0; t < tn; t++)
        for (int cb = 0; cb < CB; cb++) acc[t][cb] = _mm512_setzero_ps();
    for (int64_t k = 0; k < r; k++) {
        const char *ahead = (const char *)b + (k * d_out + c) * es + PF_EXPAND_GROUPS * group;
        for (int64_t line = 0; line < group; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        __m512 ub[TILE];
        for (int t = 0; t < tn; t++) ub[t] = _mm512_set1_ps(u[(t * P + p) * R + k]);
        for (int cb = 0; cb < CB; cb++) {
            const __m512 w = cb == CB - 1 ? wload_masked(b, k * d_out + c + 16 * cb, m, wbf16)
                                          : wload(b, k * d_out + c + 16 * cb, wbf16);
            for (int t = 0; t < tn; t++) acc[t][cb] = _mm512_fmadd_ps(ub[t], w, acc[t][cb]);
        }
    }
    for (int t = 0; t < tn; t++)
        for (int cb = 0; cb < CB; cb++)
            add_out16(bf16, out, rows[t] * os + c + 16 * cb, acc[t][cb], cb == CB - 1 ? m : (__mmask16)0xFFFF);
}
INLINE void lora_tile_avx512(const int tn, const int bf16, const int wbf16, const int64_t *rows, const void *x,
                             int64_t xs, void *out, int64_t os, int32_t s, int64_t r, const void *A, int64_t as,
                             const void *B, int64_t bs, int64_t R, int64_t P, int64_t d_in, const int64_t *off,
                             float *xf, float *u) {
    const int KB = tn == 1 ? 8 : tn == 2 ? 6 : 4, CB = 4;
    const int64_t d_out = off[P], es = wbf16 ? 2 : 4, rows_a = r * P;
    const float *xr[TILE];
    tile_rows_fp32(tn, bf16, rows, x, xs, d_in, xf, xr);
    /* the shrink: u[(t P + p) R + k] for A's rows q = k P + p (memory order), KB at a time */
    const char *a = (const char *)A + s * as * es;
    int64_t q = 0;
    for (; q + KB <= rows_a; q += KB) shrink_block512(tn, KB, wbf16, xr, a + q * d_in * es, d_in, u, q, P, R);
    for (; q < rows_a; q++) shrink_block512(tn, 1, wbf16, xr, a + q * d_in * es, d_in, u, q, P, R);
    const char *b = (const char *)B + s * bs * es;
    const __mmask16 all = (__mmask16)0xFFFF;
    for (int64_t p = 0; p < P; p++) {
        const int64_t hi = off[p + 1];
        int64_t c = off[p];
        for (; c + 16 * CB <= hi; c += 16 * CB)
            expand_block512(tn, CB, bf16, wbf16, rows, out, os, b, d_out, r, u, P, R, p, c, all);
        for (; c < hi; c += 16) {
            const int64_t left = hi - c;
            const __mmask16 m = left >= 16 ? all : (__mmask16)((1u << left) - 1u);
            expand_block512(tn, 1, bf16, wbf16, rows, out, os, b, d_out, r, u, P, R, p, c, m);
        }
    }
}
#define TILE_FN lora_tile_avx512
#define LORA_TILE TILE
#define LORA_TILED 1
#elif defined(__AVX2__) && defined(__FMA__)
/* The same tiles in AVX2 (8 floats a vector, 16 registers: CPUs without AVX-512, such as AMD's Zen 2
   and 3). Register blocks sized to 16 registers: the shrink takes KB = 8 / tn rows of A at a time
   (tn x KB accumulators, tn x vectors, one weight), the expand CB 8-column blocks (tn broadcasts, tn x
   CB accumulators, one weight). Tails (a width that is not a multiple of 8) run scalar. */
#include <immintrin.h>
#define INLINE static inline __attribute__((always_inline))
#define UNROLL _Pragma("GCC unroll 16")
#define TILE 4
#define PF_SHRINK 512  /* as in the AVX-512 tiles */
#define PF_EXPAND_GROUPS 2
INLINE __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
INLINE __m256 wload8(const void *w, int64_t i, const int wbf16) {
    return wbf16 ? bf16x8((const uint16_t *)w + i) : _mm256_loadu_ps((const float *)w + i);
}
INLINE float wget(const void *w, int64_t i, const int wbf16) {
    return wbf16 ? bf2f(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}
INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
/* u[t * us + kb] = x_t . (row kb of a), rows d_in elements apart, for kb < KB */
INLINE void shrink_block8(const int tn, const int KB, const int wbf16, const float *const *xr, const char *a,
                          int64_t d_in, float *u, int64_t us) {
    const int64_t es = wbf16 ? 2 : 4;
    __m256 acc[TILE][8];
    UNROLL for (int t = 0; t < tn; t++) UNROLL for (int kb = 0; kb < KB; kb++) acc[t][kb] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= d_in; j += 8) {
        __m256 xv[TILE];
        UNROLL for (int t = 0; t < tn; t++) xv[t] = _mm256_loadu_ps(xr[t] + j);
        UNROLL for (int kb = 0; kb < KB; kb++) {
            _mm_prefetch(a + (kb * d_in + j) * es + PF_SHRINK, _MM_HINT_T0);
            const __m256 w = wload8(a + kb * d_in * es, j, wbf16);
            UNROLL for (int t = 0; t < tn; t++) acc[t][kb] = _mm256_fmadd_ps(xv[t], w, acc[t][kb]);
        }
    }
    UNROLL for (int t = 0; t < tn; t++) UNROLL for (int kb = 0; kb < KB; kb++) {
        float sum = hsum8(acc[t][kb]);
        for (int64_t i = j; i < d_in; i++) sum += xr[t][i] * wget(a + kb * d_in * es, i, wbf16);
        u[t * us + kb] = sum;
    }
}
INLINE void add_row8(const int bf16, void *out, int64_t at, __m256 v) {
    if (bf16) {
        float add[8];
        uint16_t *o = (uint16_t *)out + at;
        _mm256_storeu_ps(add, v);
        for (int i = 0; i < 8; i++) o[i] = f2bf(bf2f(o[i]) + add[i]);
    } else {
        float *o = (float *)out + at;
        _mm256_storeu_ps(o, _mm256_add_ps(v, _mm256_loadu_ps(o)));
    }
}
/* columns c .. c + 8 CB (inside one projection) of the tile's rows += sum_k u[t * uts + k * uks] B[k, .] */
INLINE void expand_block8(const int tn, const int CB, const int bf16, const int wbf16, const int64_t *rows,
                          void *out, int64_t os, const void *b, int64_t d_out, int64_t r, const float *u,
                          int64_t uks, int64_t uts, int64_t c) {
    __m256 acc[TILE][8];
    const int64_t es = wbf16 ? 2 : 4, group = 8 * CB * es;
    UNROLL for (int t = 0; t < tn; t++) UNROLL for (int cb = 0; cb < CB; cb++) acc[t][cb] = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; k++) {
        const char *ahead = (const char *)b + (k * d_out + c) * es + PF_EXPAND_GROUPS * group;
        for (int64_t line = 0; line < group; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        __m256 ub[TILE];
        UNROLL for (int t = 0; t < tn; t++) ub[t] = _mm256_broadcast_ss(u + t * uts + k * uks);
        UNROLL for (int cb = 0; cb < CB; cb++) {
            const __m256 w = wload8(b, k * d_out + c + 8 * cb, wbf16);
            UNROLL for (int t = 0; t < tn; t++) acc[t][cb] = _mm256_fmadd_ps(ub[t], w, acc[t][cb]);
        }
    }
    UNROLL for (int t = 0; t < tn; t++) UNROLL for (int cb = 0; cb < CB; cb++)
        add_row8(bf16, out, rows[t] * os + c + 8 * cb, acc[t][cb]);
}
INLINE void lora_tile_avx2(const int tn, const int bf16, const int wbf16, const int64_t *rows, const void *x,
                           int64_t xs, void *out, int64_t os, int32_t s, int64_t r, const void *A, int64_t as,
                           const void *B, int64_t bs, int64_t R, int64_t P, int64_t d_in, const int64_t *off,
                           float *xf, float *u) {
    const int KB = tn == 1 ? 8 : tn == 2 ? 4 : 2, CB = tn == 1 ? 8 : tn == 2 ? 4 : tn == 3 ? 3 : 2;
    const int64_t es = wbf16 ? 2 : 4, rows_a = r * P, us = R * P, d_out = off[P];
    const float *xr[TILE];
    tile_rows_fp32(tn, bf16, rows, x, xs, d_in, xf, xr);
    /* the shrink: u[t * us + q] for the rows q = k P + p of A (memory order), KB at a time */
    const char *a = (const char *)A + s * as * es;
    int64_t q = 0;
    for (; q + KB <= rows_a; q += KB) shrink_block8(tn, KB, wbf16, xr, a + q * d_in * es, d_in, u + q, us);
    for (; q < rows_a; q++) shrink_block8(tn, 1, wbf16, xr, a + q * d_in * es, d_in, u + q, us);
    /* the expand: projection p's columns from u[t * us + k P + p] */
    const char *b = (const char *)B + s * bs * es;
    for (int64_t p = 0; p < P; p++) {
        const int64_t hi = off[p + 1];
        int64_t c = off[p];
        for (; c + 8 * CB <= hi; c += 8 * CB)
            expand_block8(tn, CB, bf16, wbf16, rows, out, os, b, d_out, r, u + p, P, us, c);
        for (; c + 8 <= hi; c += 8) expand_block8(tn, 1, bf16, wbf16, rows, out, os, b, d_out, r, u + p, P, us, c);
        for (; c < hi; c++) {
            for (int t = 0; t < tn; t++) {
                float sum = 0.f;
                for (int64_t k = 0; k < r; k++) sum += u[t * us + k * P + p] * wget(b, k * d_out + c, wbf16);
                if (bf16) {
                    uint16_t *o = (uint16_t *)out + rows[t] * os + c;
                    *o = f2bf(bf2f(*o) + sum);
                } else {
                    ((float *)out)[rows[t] * os + c] += sum;
                }
            }
        }
    }
}
#define TILE_FN lora_tile_avx2
#define LORA_TILE TILE
#define LORA_TILED 1
#else
#define LORA_TILE 1
#endif
#if defined(LORA_TILED)
/* the tile sizes and dtypes as constants, one compiled body each */
#define TILE_CASE(TN, BF, WBF) \
    TILE_FN(TN, BF, WBF, rows, x, xs, out, os, s, r, A, as, B, bs, R, P, d_in, off, xf, u)
#define TILE_SIZES(BF, WBF) \
    switch (tn) { case 1: TILE_CASE(1, BF, WBF); break; case 2: TILE_CASE(2, BF, WBF); break; \
                  case 3: TILE_CASE(3, BF, WBF); break; default: TILE_CASE(4, BF, WBF); break; }
static void lora_tile(int tn, int bf16, int wbf16, const int64_t *rows, const void *x, int64_t xs, void *out,
                      int64_t os, int32_t s, int64_t r, const void *A, int64_t as, const void *B, int64_t bs,
                      int64_t R, int64_t P, int64_t d_in, const int64_t *off, float *xf, float *u) {
    if (bf16 && wbf16) { TILE_SIZES(1, 1) }
    else if (bf16) { TILE_SIZES(1, 0) }
    else if (wbf16) { TILE_SIZES(0, 1) }
    else { TILE_SIZES(0, 0) }
}
#endif

#if !defined(LORA_TILED)
/* The same row without AVX-512 or AVX2 (any other CPU), the loops left to the compiler's vectoriser. */
static void lora_row_portable(const void *xr, void *orow, int bf16, int32_t s, int64_t r, const void *A, int64_t as,
                              const void *B, int64_t bs, int64_t R, int64_t P, int64_t d_in, const int64_t *off,
                              int wbf16, float *xf, float *acc, float *u) {
    const int64_t d_out = off[P];
    if (bf16) {
        #pragma omp simd
        for (int64_t i = 0; i < d_in; i++) xf[i] = bf2f(((const uint16_t *)xr)[i]);
    } else {
        #pragma omp simd
        for (int64_t i = 0; i < d_in; i++) xf[i] = ((const float *)xr)[i];
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
        uint16_t *o = (uint16_t *)orow;
        for (int64_t c = 0; c < d_out; c++) o[c] = f2bf(bf2f(o[c]) + acc[c]);
    } else {
        float *o = (float *)orow;
        #pragma omp simd
        for (int64_t c = 0; c < d_out; c++) o[c] += acc[c];
    }
}
#endif

/* x: n rows (stride xs) of d_in; out: n rows (stride os) of off[P] columns, updated in place.
   slot[t]: the adapter slot of row t (< 0: skip the row); rank[s]: its rank (<= R).
   A[s]: slot s's shrink rows (rank[s], P, d_in): element (k, p, i) at A[s][(k * P + p) * d_in + i]
   B[s]: slot s's expand rows (rank[s], off[P]): element (k, c) at B[s][k * off[P] + c]; column c belongs to the
      projection p with
      off[p] <= c < off[p + 1] and is fed by u[p][k].  bf16 != 0: x and out are bfloat16 (else float32);
   wbf16 != 0: A and B are bfloat16 (else float32).
   The rows are cut into tiles of consecutive rows of one adapter, handed to the threads as they free up
   (decode tiles of one row and prefill tiles of four mix in a step; a static split would be uneven). */
int lora_tile_rows(void) { return LORA_TILE; }

void lora_site(int64_t n, const void *x, int64_t xs, void *out, int64_t os, const int32_t *slot,
               const int32_t *rank, const void *const *A, const void *const *B, int64_t R, int64_t P,
               int64_t d_in, const int64_t *off, int bf16, int wbf16, int threads) {
    const int64_t d_out = off[P];
    if (n <= 0) return;
    int64_t *rows = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n + 1));  /* tile i: rows[first[i] .. first[i+1]) */
    int64_t m = 0, tiles = 0;
    for (int64_t t = 0; t < n; t++) {
        if (slot[t] < 0) continue;
        if (m == 0 || slot[t] != slot[rows[m - 1]] || m - first[tiles - 1] == LORA_TILE) first[tiles++] = m;
        rows[m++] = t;
    }
    first[tiles] = m;
    if (threads > tiles) threads = (int)tiles;
    if (threads < 1) threads = 1;
    #pragma omp parallel num_threads(threads) if (tiles > 1)
    {
        float *xf = (float *)malloc(sizeof(float) * (size_t)(LORA_TILE * d_in));
        float *acc = (float *)malloc(sizeof(float) * (size_t)d_out);
        float *u = (float *)malloc(sizeof(float) * (size_t)(LORA_TILE * R * P));
        #pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < tiles; i++) {
            const int64_t *tr = rows + first[i];
            const int tn = (int)(first[i + 1] - first[i]);
            const int32_t s = slot[tr[0]];
            const int64_t r = rank[s];
#if defined(LORA_TILED)
            lora_tile(tn, bf16, wbf16, tr, x, xs, out, os, 0, r, A[s], 0, B[s], 0, R, P, d_in, off, xf, u);
#else
            const int64_t es = bf16 ? 2 : 4, t = tr[0];
            (void)tn;
            lora_row_portable((const char *)x + t * xs * es, (char *)out + t * os * es, bf16, 0, r, A[s], 0, B[s], 0, R,
                              P, d_in, off, wbf16, xf, acc, u);
#endif
        }
        free(xf);
        free(acc);
        free(u);
    }
    free(rows);
    free(first);
}

/* One step's site, bound once (`SiteTable.bind`): what stays the same for the step's L calls (one a layer) is read
   from this block, so each call passes the layer, x and out only. shrink and expand: (layers, count) addresses,
   row strides shrink_rs / expand_rs. x and out point at the step's first adapter row (the caller skips the base
   rows). */
typedef struct {
    int64_t n, count, layers, shrink_rs, expand_rs, max_rank, parts, d_in;
    const int32_t *slot, *rank;
    const int64_t *shrink, *expand, *off;
    int32_t bf16, wbf16, threads;
} lora_bound_site;

void lora_site_bound(const lora_bound_site *s, int64_t layer, const void *x, int64_t xs, void *out, int64_t os) {
    if (layer < 0 || layer >= s->layers) return;  /* the caller refuses these; never read outside the table */
    lora_site(s->n, x, xs, out, os, s->slot, s->rank, (const void *const *)(s->shrink + layer * s->shrink_rs),
              (const void *const *)(s->expand + layer * s->expand_rs), s->max_rank, s->parts, s->d_in, s->off, s->bf16,
              s->wbf16, s->threads);
}
