/* Float kernels of the CPU backend: the LM head and attention.
 *
 * This one source is compiled once per instruction set (ISA_SUFFIX names the copy) and left to the
 * compiler to vectorise. Every sum runs in LANES fixed partial sums added in a fixed order, and contraction
 * into FMA is off (-ffp-contract=off), so all copies give bit-identical floats.
 */
#include <math.h>
#include <string.h>

#include "float_ops.h"

#define LANES 16
#define HEAD_TILE 4

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define NAME(base) CAT(base, ISA_SUFFIX)

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float lane_total(const float *acc) {
    float pairs[LANES / 2];
    for (int l = 0; l < LANES / 2; l++) pairs[l] = acc[l] + acc[l + LANES / 2];
    float quads[LANES / 4];
    for (int l = 0; l < LANES / 4; l++) quads[l] = pairs[l] + pairs[l + LANES / 4];
    return (quads[0] + quads[2]) + (quads[1] + quads[3]);
}

static inline float weight_at(const void *w, int dtype, size_t i) {
    switch (dtype) {
    case WEIGHT_BF16: return bf16_to_f32(((const uint16_t *)w)[i]);
    case WEIGHT_F32: return ((const float *)w)[i];
    default: return (float)((const int8_t *)w)[i];
    }
}

/* out[m * V + v] = sum_k W[v, k] * x[m, k] for M (<= HEAD_TILE, a constant after inlining) tokens. */
static inline __attribute__((always_inline)) void head_row(const void *w, int dtype, size_t row, int K,
                                                           const float *x, int M, float scale, float *out, int V) {
    float acc[HEAD_TILE][LANES];
    for (int m = 0; m < M; m++)
        for (int l = 0; l < LANES; l++) acc[m][l] = 0.0f;
    size_t base = row * (size_t)K;
    int k = 0;
    for (; k + LANES <= K; k += LANES) {
        float wv[LANES];
        for (int l = 0; l < LANES; l++) wv[l] = weight_at(w, dtype, base + k + l);
        for (int m = 0; m < M; m++)
            for (int l = 0; l < LANES; l++) acc[m][l] += wv[l] * x[(size_t)m * K + k + l];
    }
    for (int l = 0; k + l < K; l++)
        for (int m = 0; m < M; m++) acc[m][l] += weight_at(w, dtype, base + k + l) * x[(size_t)m * K + k + l];
    for (int m = 0; m < M; m++) out[(size_t)m * V + row] = lane_total(acc[m]) * scale;
}

#define HEAD_CASE(DT, MM) \
    for (int v = v_begin; v < v_end; v++) head_row(w, DT, v, K, xm, MM, scales ? scales[v] : 1.0f, om, V);

#define HEAD_TOKENS(DT) \
    switch (tile) { \
    case 1: HEAD_CASE(DT, 1) break; \
    case 2: HEAD_CASE(DT, 2) break; \
    case 3: HEAD_CASE(DT, 3) break; \
    default: HEAD_CASE(DT, 4) break; \
    }

void NAME(head_rows)(const void *w, int dtype, const float *scales, int K, const float *x, int M, int V,
                     int v_begin, int v_end, float *out) {
    for (int m0 = 0; m0 < M; m0 += HEAD_TILE) {
        int tile = M - m0 < HEAD_TILE ? M - m0 : HEAD_TILE;
        const float *xm = x + (size_t)m0 * K;
        float *om = out + (size_t)m0 * V;
        switch (dtype) {
        case WEIGHT_BF16: HEAD_TOKENS(WEIGHT_BF16) break;
        case WEIGHT_F32: HEAD_TOKENS(WEIGHT_F32) break;
        default: HEAD_TOKENS(WEIGHT_INT8) break;
        }
    }
}

static inline float dot(const float *a, const float *b, int n) {
    float acc[LANES] = {0};
    int k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[k + l] * b[k + l];
    for (int l = 0; k + l < n; l++) acc[l] += a[k + l] * b[k + l];
    return lane_total(acc);
}

/* exp(x) for x <= 0 within 2 ulp, in plain float arithmetic so that it vectorises: 2^n * p(r). */
static inline float exp_nonpositive(float x) {
    const float round_magic = 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    x = x < -87.0f ? -87.0f : x;
    float n = (x * 1.44269504f + round_magic) - round_magic;
    float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.0f / 5040 + r * (1.0f / 40320);
    p = 1.0f / 720 + r * p;
    p = 1.0f / 120 + r * p;
    p = 1.0f / 24 + r * p;
    p = 1.0f / 6 + r * p;
    p = 0.5f + r * p;
    p = 1.0f + r * p;
    p = 1.0f + r * p;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

void NAME(attention_tasks)(const struct attention_args *a, int task_begin, int task_end, float *scores) {
    for (int task = task_begin; task < task_end; task++) {
        int t = task / a->heads, h = task % a->heads;
        int length = a->start + t + 1;  /* causal: token t sees positions 0 .. start + t */
        const float *q = a->q + (size_t)t * a->q_stride + (size_t)h * a->head_dim;
        const float *keys = a->keys + (size_t)(h / a->group) * a->head_stride;
        const float *values = a->values + (size_t)(h / a->group) * a->head_stride;
        float top = -INFINITY;
        for (int j = 0; j < length; j++) {
            scores[j] = dot(q, keys + (size_t)j * a->head_dim, a->head_dim) * a->scale;
            top = scores[j] > top ? scores[j] : top;
        }
        float total = 0.0f;
        for (int j = 0; j < length; j++) {
            scores[j] = exp_nonpositive(scores[j] - top);
            total += scores[j];
        }
        float *o = a->out + ((size_t)t * a->heads + h) * a->head_dim;
        for (int d = 0; d < a->head_dim; d++) o[d] = 0.0f;
        float inv = 1.0f / total;
        for (int j = 0; j < length; j++) {
            float p = scores[j] * inv;
            const float *v = values + (size_t)j * a->head_dim;
            for (int d = 0; d < a->head_dim; d++) o[d] += p * v[d];
        }
    }
}
