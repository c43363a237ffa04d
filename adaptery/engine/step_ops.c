/* The step's elementwise work between the GEMMs, fused: each call replaces a chain of PyTorch operators (every one a
   dispatch, an output allocation and a pass over memory) with one pass over the rows. Built into the same library
   as the LoRA kernel (lora_kernel.py appends this file to lora_kernel.c), sharing bf2f/f2bf and omp.h from there;
   paged_attention.c, appended after it, uses its exponential.

   The arithmetic is PyTorch's, operation for operation, so outputs match the operators they replace: in bf16 every
   intermediate that PyTorch rounds to bf16 is rounded here too; in fp32 only the order of the squares' sum differs
   (and the compiler may fuse a multiply and an add of the rotation into one rounding). */
#include <math.h>

#define OPS_PARALLEL(n, width) ((n) * (width) >= (1 << 19))  /* decode rows stay on one thread: a second one costs more */

/* Eight floats in one vector (the compiler's vector extension: one source for AVX-512, AVX2 and SSE builds, two SSE
   registers where AVX is off); loads and stores through memcpy (unaligned, one vector instruction), bf16 widened or
   rounded as bf2f and f2bf do. paged_attention.c uses these too. */
typedef float ops_v8f __attribute__((vector_size(32)));
typedef int32_t ops_v8i __attribute__((vector_size(32)));
typedef uint16_t ops_v8h __attribute__((vector_size(16)));
typedef uint32_t ops_v8u __attribute__((vector_size(32)));
static inline ops_v8f ops_load(const void *p, int64_t i, int bf16) {
    ops_v8f out;
    if (bf16) {
        ops_v8h h;
        __builtin_memcpy(&h, (const uint16_t *)p + i, sizeof h);
        out = (ops_v8f)(__builtin_convertvector(h, ops_v8u) << 16);
    } else {
        __builtin_memcpy(&out, (const float *)p + i, sizeof out);
    }
    return out;
}
static inline ops_v8f ops_round(ops_v8f v, int bf16) {  /* v rounded to the dtype (bf16: nearest even, NaN quiet) */
    if (!bf16) return v;
    ops_v8u u = (ops_v8u)v;
    const ops_v8u nan = (u & 0x7fffffffu) > 0x7f800000u;
    const ops_v8u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    return (ops_v8f)((nan & ((u | 0x400000u) & 0xffff0000u)) | (~nan & rounded));
}
static inline void ops_store(void *p, int64_t i, ops_v8f v, int bf16) {  /* v must be rounded already in bf16 */
    if (bf16) {
        const ops_v8h h = __builtin_convertvector((ops_v8u)v >> 16, ops_v8h);
        __builtin_memcpy((uint16_t *)p + i, &h, sizeof h);
    } else {
        __builtin_memcpy((float *)p + i, &v, sizeof v);
    }
}
static inline float ops_sum8(ops_v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
static inline float ops_load1(const void *p, int64_t i, int bf16) {
    return bf16 ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void ops_store1(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = f2bf(v);
    else ((float *)p)[i] = v;
}

/* exp of eight floats for |x| <= 87.3 (callers clamp): Cephes' expf, x = n ln2 + r with n the nearest integer
   (|r| <= ln2 / 2), a degree-7 polynomial for e^r, 2^n put into the exponent; within 2 ulp of libm's expf there.
   Vector extensions: one source for every build, AVX-512, AVX2 or SSE. */
static inline ops_v8f ops_exp8(ops_v8f x) {
    const ops_v8f magic = (ops_v8f){0} + 12582912.f;  /* 1.5 * 2^23: adding it rounds to the nearest integer */
    const ops_v8f fn = (x * 1.44269504088896341f + magic) - magic;
    ops_v8f r = x - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    ops_v8f p = (ops_v8f){0} + 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.f;
    return p * (ops_v8f)((__builtin_convertvector(fn, ops_v8i) + 127) << 23);
}


/* Row by row: x += delta when delta is given (the residual add, rounded to x's dtype), then
   out = weight * (x * rsqrt(mean(x^2) + eps)) as native._rms computes it: the normalised row rounded to the dtype,
   then multiplied by the weight. x, delta, out: n rows of d, row strides xs, ds, os; weight: d. */
static inline __attribute__((always_inline)) void rms_row(void *x, const void *delta, const void *w, void *o,
                                                          int64_t d, float eps, const int bf16) {
    const int64_t vec = d / 8 * 8;
    ops_v8f squares = {0};
    float tail = 0.f;
    for (int64_t j = 0; j < vec; j += 8) {
        ops_v8f v = ops_load(x, j, bf16);
        if (delta) {
            v = ops_round(v + ops_load(delta, j, bf16), bf16);
            ops_store(x, j, v, bf16);
        }
        squares += v * v;
    }
    for (int64_t j = vec; j < d; j++) {
        float v = ops_load1(x, j, bf16);
        if (delta) {
            ops_store1(x, j, v + ops_load1(delta, j, bf16), bf16);
            v = ops_load1(x, j, bf16);
        }
        tail += v * v;
    }
    const float sum = ops_sum8(squares) + tail;
    const float r = 1.f / sqrtf(sum / (float)d + eps);
    for (int64_t j = 0; j < vec; j += 8)
        ops_store(o, j, ops_round(ops_load(w, j, bf16) * ops_round(ops_load(x, j, bf16) * r, bf16), bf16), bf16);
    for (int64_t j = vec; j < d; j++) {
        const float normalised = bf16 ? bf2f(f2bf(ops_load1(x, j, bf16) * r)) : ops_load1(x, j, bf16) * r;
        ops_store1(o, j, ops_load1(w, j, bf16) * normalised, bf16);
    }
}

void add_rms_norm(int64_t n, void *x, int64_t xs, const void *delta, int64_t ds, const void *weight, void *out,
                  int64_t os, int64_t d, float eps, int bf16, int threads) {
    const int64_t es = bf16 ? 2 : 4;
    #pragma omp parallel for num_threads(threads) if (threads > 1 && OPS_PARALLEL(n, d))
    for (int64_t i = 0; i < n; i++) {
        char *row = (char *)x + i * xs * es, *o = (char *)out + i * os * es;
        const char *add = delta ? (const char *)delta + i * ds * es : NULL;
        if (bf16) rms_row(row, add, weight, o, d, eps, 1);
        else rms_row(row, add, weight, o, d, eps, 0);
    }
}

/* Rotary position embedding in place, as native._rotate computes it (x * cos + rotate_half(x) * sin, each product
   rounded to the dtype before the sum): n rows of `heads` heads of hd (heads adjacent, row stride xs), row i rotated
   by cos[i] and sin[i] (hd each, row stride cs). */
static inline __attribute__((always_inline)) void rotary_row(void *x, int64_t heads, int64_t hd, const void *c,
                                                             const void *s, const int bf16) {
    const int64_t half = hd / 2, vec = half / 8 * 8;
    for (int64_t h = 0; h < heads; h++) {
        const int64_t at = h * hd;
        for (int64_t j = 0; j < vec; j += 8) {
            const ops_v8f a = ops_load(x, at + j, bf16), b = ops_load(x, at + j + half, bf16);
            const ops_v8f lo = ops_round(a * ops_load(c, j, bf16), bf16) + ops_round(-b * ops_load(s, j, bf16), bf16);
            const ops_v8f hi = ops_round(b * ops_load(c, j + half, bf16), bf16) +
                               ops_round(a * ops_load(s, j + half, bf16), bf16);
            ops_store(x, at + j, ops_round(lo, bf16), bf16);
            ops_store(x, at + j + half, ops_round(hi, bf16), bf16);
        }
        for (int64_t j = vec; j < half; j++) {
            const float a = ops_load1(x, at + j, bf16), b = ops_load1(x, at + j + half, bf16);
            float lo = a * ops_load1(c, j, bf16), lo2 = -b * ops_load1(s, j, bf16);
            float hi = b * ops_load1(c, j + half, bf16), hi2 = a * ops_load1(s, j + half, bf16);
            if (bf16) lo = bf2f(f2bf(lo)), lo2 = bf2f(f2bf(lo2)), hi = bf2f(f2bf(hi)), hi2 = bf2f(f2bf(hi2));
            ops_store1(x, at + j, lo + lo2, bf16);
            ops_store1(x, at + j + half, hi + hi2, bf16);
        }
    }
}

void rotary(int64_t n, void *x, int64_t xs, int64_t heads, int64_t hd, const void *cos, const void *sin, int64_t cs,
            int bf16, int threads) {
    const int64_t es = bf16 ? 2 : 4;
    #pragma omp parallel for num_threads(threads) if (threads > 1 && OPS_PARALLEL(n, heads * hd))
    for (int64_t i = 0; i < n; i++) {
        char *row = (char *)x + i * xs * es;
        const char *c = (const char *)cos + i * cs * es, *s = (const char *)sin + i * cs * es;
        if (bf16) rotary_row(row, heads, hd, c, s, 1);
        else rotary_row(row, heads, hd, c, s, 0);
    }
}

/* silu of eight floats: x / (1 + e^-x), e^-x clamped to [e^-87.3, e^87.3]: above, silu is x (1 + e^-x rounds to 1
   there too); below, 0 (PyTorch gives at most 1e-36 there) */
static inline ops_v8f ops_silu(ops_v8f g) {
    const ops_v8i low = g < -87.3f, high = g > 87.3f;
    const ops_v8f e = ops_exp8((ops_v8f)(~(low | high) & (ops_v8i)-g));
    const ops_v8f s = (ops_v8f)(~low & (ops_v8i)(g / (1.f + e)));
    return (ops_v8f)((high & (ops_v8i)g) | (~high & (ops_v8i)s));
}

/* out = silu(gate) * up row by row, as F.silu(gate) * up computes it (silu rounded to the dtype before the product):
   gate and up n rows of `width` (row strides gs, us: the two halves of the fused gate/up rows), out contiguous. */
static inline __attribute__((always_inline)) void silu_row(const void *gate, const void *up, void *out, int64_t width,
                                                           const int bf16) {
    const int64_t vec = width / 8 * 8;
    for (int64_t j = 0; j < vec; j += 8)
        ops_store(out, j, ops_round(ops_round(ops_silu(ops_load(gate, j, bf16)), bf16) * ops_load(up, j, bf16), bf16),
                  bf16);
    if (vec < width) {  /* the last few columns through one padded vector */
        float g[8] = {0}, u[8] = {0};
        for (int64_t j = vec; j < width; j++) g[j - vec] = ops_load1(gate, j, bf16), u[j - vec] = ops_load1(up, j, bf16);
        ops_v8f gv, uv;
        __builtin_memcpy(&gv, g, sizeof gv);
        __builtin_memcpy(&uv, u, sizeof uv);
        const ops_v8f r = ops_round(ops_round(ops_silu(gv), bf16) * uv, bf16);
        for (int64_t j = vec; j < width; j++) ops_store1(out, j, r[j - vec], bf16);
    }
}

void silu_mul(int64_t n, const void *gate, int64_t gs, const void *up, int64_t us, void *out, int64_t width, int bf16,
              int threads) {
    const int64_t es = bf16 ? 2 : 4;
    #pragma omp parallel for num_threads(threads) if (threads > 1 && OPS_PARALLEL(n, width))
    for (int64_t i = 0; i < n; i++) {
        const char *g = (const char *)gate + i * gs * es, *u = (const char *)up + i * us * es;
        char *o = (char *)out + i * width * es;
        if (bf16) silu_row(g, u, o, width, 1);
        else silu_row(g, u, o, width, 0);
    }
}

/* rows x cols of an adapter's weights into the engine's held layout, on the calling thread alone (the loader, beside
   the step): dst[i * ds + j] = src[i * rs + j * cs], times `scale` where `scaled` (in fp32, then rounded once), read as
   fp32 or bf16 and stored as fp32 or rounded to bf16 (nearest even, NaN kept quiet, as torch rounds); bf16 to bf16
   unscaled keeps its bits. One pass from the file's mapping into the prepared tensor (a transposed source is read
   with cs > 1), where numpy's transpose, scaling, rounding and slice assignment each made a pass and a temporary. */
void convert_weights(int64_t rows, int64_t cols, const void *src, int64_t rs, int64_t cs, int src_bf16, void *dst,
                     int64_t ds, int dst_bf16, int scaled, float scale) {
    const int64_t in_size = src_bf16 ? 2 : 4, out_size = dst_bf16 ? 2 : 4, vec = cols / 8 * 8;
    for (int64_t i = 0; i < rows; i++) {
        const char *s = (const char *)src + i * rs * in_size;
        char *d = (char *)dst + i * ds * out_size;
        if (cs == 1 && !scaled && src_bf16 == dst_bf16) {
            __builtin_memcpy(d, s, (size_t)(cols * in_size));
            continue;
        }
        for (int64_t j = 0; j < vec; j += 8) {
            ops_v8f v;
            if (cs == 1) v = ops_load(s, j, src_bf16);
            else for (int k = 0; k < 8; k++) v[k] = ops_load1(s, (j + k) * cs, src_bf16);
            if (scaled) v = v * scale;
            ops_store(d, j, ops_round(v, dst_bf16), dst_bf16);
        }
        for (int64_t j = vec; j < cols; j++) {
            float v = ops_load1(s, j * cs, src_bf16);
            ops_store1(d, j, scaled ? v * scale : v, dst_bf16);
        }
    }
}
