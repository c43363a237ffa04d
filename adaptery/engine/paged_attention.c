#include <math.h>
/* Decode attention straight from the paged KV cache: one query token per sequence, its keys and values read in
   place from the sequence's blocks (no gathered copy of the context, no padding to the longest sequence).
   Built into the same library as the LoRA kernel (lora_kernel.py appends this file to lora_kernel.c), so it
   shares bf2f/f2bf and omp.h from there. */

/* One (sequence, kv head) task: the `group` query heads sharing that kv head, each scored against every key of
   the sequence, softmax in fp32 (max subtracted, as SDPA does), then the probabilities times the values.
   q: the group's query rows (head stride hd); keys/values: the pool, row (token) stride kvh * hd, this head's
   columns at h * hd; table: the sequence's block ids; len: its context length. scores: group * len floats,
   acc: group * hd floats of scratch. */
static void decode_task(const void *q, const void *keys, const void *values, const int64_t *table, int64_t len,
                        int64_t block_size, int64_t kvh, int64_t h, int64_t group, int64_t hd, float scale,
                        void *out, int bf16, float *qf, float *scores, float *acc) {
    const int64_t row = kvh * hd;
    for (int64_t g = 0; g < group; g++) {
        for (int64_t d = 0; d < hd; d++)
            qf[g * hd + d] = bf16 ? bf2f(((const uint16_t *)q)[g * hd + d]) : ((const float *)q)[g * hd + d];
    }
    for (int64_t t = 0; t < len; t++) {
        const int64_t at = (table[t / block_size] * block_size + t % block_size) * row + h * hd;
        for (int64_t g = 0; g < group; g++) {
            const float *qg = qf + g * hd;
            float sum = 0.f;
            if (bf16) {
                const uint16_t *k = (const uint16_t *)keys + at;
                #pragma omp simd reduction(+ : sum)
                for (int64_t d = 0; d < hd; d++) sum += qg[d] * bf2f(k[d]);
            } else {
                const float *k = (const float *)keys + at;
                #pragma omp simd reduction(+ : sum)
                for (int64_t d = 0; d < hd; d++) sum += qg[d] * k[d];
            }
            scores[g * len + t] = sum * scale;
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * len, top = s[0], total = 0.f;
        for (int64_t t = 1; t < len; t++) top = s[t] > top ? s[t] : top;
        for (int64_t t = 0; t < len; t++) {
            s[t] = expf(s[t] - top);
            total += s[t];
        }
        const float norm = 1.f / total;
        for (int64_t t = 0; t < len; t++) s[t] *= norm;
    }
    for (int64_t i = 0; i < group * hd; i++) acc[i] = 0.f;
    for (int64_t t = 0; t < len; t++) {
        const int64_t at = (table[t / block_size] * block_size + t % block_size) * row + h * hd;
        for (int64_t g = 0; g < group; g++) {
            const float p = scores[g * len + t];
            float *a = acc + g * hd;
            if (bf16) {
                const uint16_t *v = (const uint16_t *)values + at;
                #pragma omp simd
                for (int64_t d = 0; d < hd; d++) a[d] += p * bf2f(v[d]);
            } else {
                const float *v = (const float *)values + at;
                #pragma omp simd
                for (int64_t d = 0; d < hd; d++) a[d] += p * v[d];
            }
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
    const int64_t tasks = b * kvh, es = bf16 ? 2 : 4;
    int64_t longest = 0;
    for (int64_t i = 0; i < b; i++) longest = lengths[i] > longest ? lengths[i] : longest;
    if (tasks <= 0) return;
    if (threads > tasks) threads = (int)tasks;
    if (threads < 1) threads = 1;
    #pragma omp parallel num_threads(threads) if (tasks > 1)
    {
        float *qf = (float *)malloc(sizeof(float) * (size_t)(group * hd));
        float *scores = (float *)malloc(sizeof(float) * (size_t)(group * longest));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(group * hd));
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t i = task / kvh, h = task % kvh;
            const char *qg = (const char *)q + (i * qs + h * group * hd) * es;
            char *og = (char *)out + (i * kvh + h) * group * hd * es;
            decode_task(qg, keys, values, blocks + i * max_blocks, lengths[i], block_size, kvh, h, group, hd, scale,
                        og, bf16, qf, scores, acc);
        }
        free(qf);
        free(scores);
        free(acc);
    }
}
