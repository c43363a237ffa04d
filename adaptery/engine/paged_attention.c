#include <math.h>
/* Decode attention straight from the paged KV cache: one query token per sequence, its keys and values read in
   place from the sequence's blocks (no gathered copy of the context, no padding to the longest sequence).
   Built into the same library as the LoRA kernel (lora_kernel.py appends this file to lora_kernel.c and
   step_ops.c), so it shares bf2f/f2bf and omp.h from the first and the vectors and exponential of the second. */

#define PA_AHEAD 2  /* tokens ahead that the score loop prefetches (whole rows for a first head: 2, 4, 8, 16 alike) */
#define GROUP_MAX 8 /* query heads per kv head done together; larger groups run in passes */

/* Vectors of 8 a head may hold for the value pass: the sums of `group` heads times this, plus the loaded values, stay
   within the registers (32 vector registers with AVX-512VL, 16 without) */
#if defined(__AVX512VL__)
#define PA_REGS 16
#else
#define PA_REGS 8
#endif
#define PA_CHUNK(group) ((group) >= PA_REGS ? 1 : PA_REGS / (group) > 8 ? 8 : PA_REGS / (group))

/* acc[g * hd + c] = sum over the context of scores[g * len + t] * values[t][col + c], c < 8 * nv: each value row's
   chunk loaded once for every head. group and nv are constants at every call site (the sums stay in registers). */
static inline __attribute__((always_inline)) void value_chunk(const void *values, const int64_t *table, int64_t len,
                        int64_t block_size, int64_t row, int64_t col, int64_t group, int64_t nv, int bf16,
                        const float *scores, float *acc, int64_t hd) {
    ops_v8f sum[GROUP_MAX][8];
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < nv; c++) sum[g][c] = (ops_v8f){0};
    for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, b++) {
        const int64_t n = len - t0 < block_size ? len - t0 : block_size;
        for (int64_t j = 0; j < n; j++) {
            const int64_t at = (table[b] * block_size + j) * row + col;
            ops_v8f v[8];
            for (int64_t c = 0; c < nv; c++) v[c] = ops_load(values, at + 8 * c, bf16);
            for (int64_t g = 0; g < group; g++) {
                const float s = scores[g * len + t0 + j];
                for (int64_t c = 0; c < nv; c++) sum[g][c] += s * v[c];
            }
        }
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < nv; c++) __builtin_memcpy(acc + g * hd + 8 * c, &sum[g][c], sizeof sum[g][c]);
}

/* One (sequence, kv head) task, for `group` (<= GROUP_MAX) of the query heads sharing that kv head: each scored
   against every key of the sequence (each key row loaded once for all of them, one independent sum per head),
   softmax in fp32 (max subtracted, as SDPA does), then the probabilities times the values (each value row once).
   q: the group's query rows (head stride hd); keys/values: the pool, row (token) stride kvh * hd, this head's
   columns at h * hd; table: the sequence's block ids; len: its context length. scores: group * len floats,
   acc: group * hd floats of scratch. */
static inline __attribute__((always_inline)) void decode_task(const void *q, const void *keys, const void *values, const int64_t *table, int64_t len,
                        int64_t block_size, int64_t kvh, int64_t h, int64_t group, int64_t hd, float scale,
                        void *out, int bf16, float *qf, float *scores, float *acc) {
    const int64_t row = kvh * hd, vec = hd / 8 * 8, es = bf16 ? 2 : 4;
    for (int64_t i = 0; i < group * hd; i++) qf[i] = ops_load1(q, i, bf16);
    for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, b++) {
        const int64_t n = len - t0 < block_size ? len - t0 : block_size;
        for (int64_t j = 0; j < n; j++) {
            const int64_t at = (table[b] * block_size + j) * row + h * hd;
            /* Memory bound: a head's rows are kvh * hd apart and a sequence's blocks lie anywhere in the pool, so
               the hardware prefetcher loses the thread at every block. Fetch the key and value rows PA_AHEAD tokens
               ahead (the values are read in the next phase, from cache): a call at batch 32 (16 heads over 4,
               contexts 16-256, blocks scattered over a 16 MB pool, fp32, one thread, a 2-core AVX-512 Xeon) took
               1044 us against 1117 (median of 4 alternating runs; 2 tokens ahead beat 4, 8 and 16). */
            const int64_t next = t0 + j + PA_AHEAD;
            if (next < len) {  /* the first head's task fetches every head's columns: the next heads find them in L2 */
                const int64_t ahead = (table[next / block_size] * block_size + next % block_size) * row + (h ? h * hd : 0);
                for (int64_t line = 0; line < (h ? hd : row) * es; line += 64) {
                    __builtin_prefetch((const char *)keys + ahead * es + line);
                    __builtin_prefetch((const char *)values + ahead * es + line);
                }
            }
            ops_v8f sum[GROUP_MAX] = {0};
            for (int64_t d = 0; d < vec; d += 8) {
                const ops_v8f k = ops_load(keys, at + d, bf16);
                for (int64_t g = 0; g < group; g++) sum[g] += ops_load(qf, g * hd + d, 0) * k;
            }
            for (int64_t g = 0; g < group; g++) {
                float total = ops_sum8(sum[g]);
                for (int64_t d = vec; d < hd; d++) total += qf[g * hd + d] * ops_load1(keys, at + d, bf16);
                scores[g * len + t0 + j] = total * scale;
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {  /* eight exponentials at a time (step_ops.c's; libm's expf, one by one,
                                              took half of a call) */
        float *s = scores + g * len, top = s[0], total = 0.f;
        for (int64_t t = 1; t < len; t++) top = s[t] > top ? s[t] : top;
        int64_t t = 0;
        ops_v8f sums = {0};
        for (; t + 8 <= len; t += 8) {
            ops_v8f v;
            __builtin_memcpy(&v, s + t, sizeof v);
            v -= top;  /* <= 0; below -87.3 e^v is ~1e-38 instead of 0, nothing beside the top's 1 */
            v = (ops_v8f)(((ops_v8i)(v < -87.3f) & (ops_v8i)((ops_v8f){0} - 87.3f)) | (~(ops_v8i)(v < -87.3f) & (ops_v8i)v));
            v = ops_exp8(v);
            __builtin_memcpy(s + t, &v, sizeof v);
            sums += v;
        }
        total = ops_sum8(sums);
        for (; t < len; t++) {
            s[t] = expf(s[t] - top);
            total += s[t];
        }
        const float norm = 1.f / total;
        for (t = 0; t < len; t++) s[t] *= norm;
    }
    for (int64_t i = 0; i < group * hd; i++) acc[i] = 0.f;
    /* the values: columns in chunks of 8 * PA_CHUNK(group), every head's sums for a chunk held in registers, one walk
       of the context a chunk (was one walk per 8 columns: at head size 64, eight walks over blocks scattered in the
       pool, each taking half of every cache line it touched) */
    const int64_t wide = 8 * PA_CHUNK(group);
    int64_t d = 0;
    for (; d + wide <= vec; d += wide) value_chunk(values, table, len, block_size, row, h * hd + d, group, PA_CHUNK(group), bf16, scores, acc + d, hd);
    for (; d < vec; d += 8) value_chunk(values, table, len, block_size, row, h * hd + d, group, 1, bf16, scores, acc + d, hd);
    for (int64_t t0 = 0, b = 0; t0 < len && vec < hd; t0 += block_size, b++) {
        const int64_t n = len - t0 < block_size ? len - t0 : block_size;
        for (int64_t j = 0; j < n; j++) {
            const int64_t at = (table[b] * block_size + j) * row + h * hd;
            for (int64_t g = 0; g < group; g++)
                for (int64_t d = vec; d < hd; d++) acc[g * hd + d] += scores[g * len + t0 + j] * ops_load1(values, at + d, bf16);
        }
    }
    for (int64_t i = 0; i < group * hd; i++) {
        if (bf16) ((uint16_t *)out)[i] = f2bf(acc[i]);
        else ((float *)out)[i] = acc[i];
    }
}

/* b sequences, one query token each. q: (b, kvh * group, hd), row stride qs elements, heads adjacent;
   keys, values: the layer's pool (blocks * block_size, kvh, hd), contiguous; blocks: (b, max_blocks) block ids,
   row i's first ceil(lengths[i] / block_size) valid; lengths[i] >= 1; out: (b, kvh * group, hd) contiguous.
   bf16 != 0: q, keys, values and out are bfloat16 (else float32); scores and sums are fp32 either way. */
void paged_decode(int64_t b, const void *q, int64_t qs, const void *keys, const void *values, const int64_t *blocks,
                  int64_t max_blocks, const int64_t *lengths, int64_t block_size, int64_t kvh, int64_t group,
                  int64_t hd, float scale, void *out, int bf16, int threads) {
    const int64_t passes = (group + GROUP_MAX - 1) / GROUP_MAX, tasks = b * kvh * passes, es = bf16 ? 2 : 4;
    int64_t longest = 0;
    for (int64_t i = 0; i < b; i++) longest = lengths[i] > longest ? lengths[i] : longest;
    if (tasks <= 0) return;
    if (threads < 1) threads = 1;
    /* A unit of work: a whole sequence (its heads one after the other: the first head's walk prefetches every head's
       columns, so the others read L2, not scattered rows of memory) when there are sequences enough to share out;
       else one (sequence, kv head, pass) */
    const int64_t per_unit = b >= 2 * (int64_t)threads ? kvh * passes : 1, units = tasks / per_unit;
    if (threads > units) threads = (int)units;
    #pragma omp parallel num_threads(threads) if (units > 1)
    {
        float *qf = (float *)malloc(sizeof(float) * (size_t)(GROUP_MAX * hd));
        float *scores = (float *)malloc(sizeof(float) * (size_t)(GROUP_MAX * longest));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(GROUP_MAX * hd));
        #pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < units; unit++) {
          for (int64_t task = unit * per_unit; task < (unit + 1) * per_unit; task++) {
            const int64_t i = task / (kvh * passes), h = task / passes % kvh, first = task % passes * GROUP_MAX;
            const int64_t heads = group - first < GROUP_MAX ? group - first : GROUP_MAX;
            const char *qg = (const char *)q + (i * qs + (h * group + first) * hd) * es;
            char *og = (char *)out + ((i * kvh + h) * group + first) * hd * es;
            /* the head count a constant in each case: the per-head sums stay in registers */
#define DECODE_TASK(G) decode_task(qg, keys, values, blocks + i * max_blocks, lengths[i], block_size, kvh, h, G, hd, \
                                   scale, og, bf16, qf, scores, acc)
            switch (heads) {
                case 1: DECODE_TASK(1); break; case 2: DECODE_TASK(2); break; case 3: DECODE_TASK(3); break;
                case 4: DECODE_TASK(4); break; case 5: DECODE_TASK(5); break; case 6: DECODE_TASK(6); break;
                case 7: DECODE_TASK(7); break; default: DECODE_TASK(8); break;
            }
          }
#undef DECODE_TASK
        }
        free(qf);
        free(scores);
        free(acc);
    }
}
