/* Float kernels of the CPU backend: the LM head and attention.
 *
 * This one source is compiled once per instruction set (ISA_SUFFIX names the copy). Dot products use GCC's
 * vector extensions (16 fp32 lanes: one AVX-512 register, two AVX2 ones, four SSE ones), so every copy sums
 * in the same LANES partial sums added in the same order; contraction into FMA is off (-ffp-contract=off):
 * all copies give bit-identical floats.
 */
#include <math.h>
#include <string.h>

#include "fast_exp.h"
#include "float_ops.h"

#define LANES 16

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define NAME(base) CAT(base, ISA_SUFFIX)

typedef float lanes_f32 __attribute__((vector_size(LANES * 4)));
typedef uint32_t lanes_u32 __attribute__((vector_size(LANES * 4)));
typedef uint16_t lanes_u16 __attribute__((vector_size(LANES * 2)));
typedef int8_t lanes_i8 __attribute__((vector_size(LANES)));
typedef int32_t lanes_i32 __attribute__((vector_size(LANES * 4)));

#define INLINE static inline __attribute__((always_inline))

INLINE float lane_total(lanes_f32 acc) {
    float pairs[LANES / 2];
    for (int l = 0; l < LANES / 2; l++) pairs[l] = acc[l] + acc[l + LANES / 2];
    float quads[LANES / 4];
    for (int l = 0; l < LANES / 4; l++) quads[l] = pairs[l] + pairs[l + LANES / 4];
    return (quads[0] + quads[2]) + (quads[1] + quads[3]);
}

INLINE lanes_f32 load_f32(const float *p) {
    lanes_f32 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* LANES weights from w[at ..] as fp32 (bf16 is the top half of an fp32). */
INLINE lanes_f32 load_weights(const void *w, int dtype, size_t at) {
    if (dtype == WEIGHT_BF16) {
        lanes_u16 h;
        memcpy(&h, (const uint16_t *)w + at, sizeof h);
        return (lanes_f32)(__builtin_convertvector(h, lanes_u32) << 16);
    }
    if (dtype == WEIGHT_INT8) {
        lanes_i8 c;
        memcpy(&c, (const int8_t *)w + at, sizeof c);
        return __builtin_convertvector(__builtin_convertvector(c, lanes_i32), lanes_f32);
    }
    return load_f32((const float *)w + at);
}

INLINE float weight_at(const void *w, int dtype, size_t i) {
    if (dtype == WEIGHT_BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    return dtype == WEIGHT_INT8 ? (float)((const int8_t *)w)[i] : ((const float *)w)[i];
}

#define HEAD_TOKENS 4

/* out[m * V + row] = sum_k W[row, k] * x[m, k] * scale for M (<= HEAD_TOKENS, a constant after inlining)
 * tokens: each weight vector is widened once for all of them; one LANES accumulator per token, so a token's
 * logits do not depend on the batch it is in. */
INLINE void head_row(const void *w, int dtype, size_t row, int K, const float *x, int M, float scale, float *out,
                     int V) {
    lanes_f32 acc[HEAD_TOKENS] = {{0}};
    size_t base = row * (size_t)K;
    int k = 0;
    for (; k + LANES <= K; k += LANES) {
        lanes_f32 wv = load_weights(w, dtype, base + k);
        for (int m = 0; m < M; m++) acc[m] += wv * load_f32(x + (size_t)m * K + k);
    }
    for (int m = 0; m < M; m++) {
        for (int l = 0; k + l < K; l++) acc[m][l] += weight_at(w, dtype, base + k + l) * x[(size_t)m * K + k + l];
        out[(size_t)m * V + row] = lane_total(acc[m]) * scale;
    }
}

#define HEAD_TILE(DT, MM) \
    for (int v = v_begin; v < v_end; v++) head_row(w, DT, v, K, xm, MM, scales ? scales[v] : 1.0f, om, V);

#define HEAD_ROWS(DT) \
    switch (tokens) { \
    case 1: HEAD_TILE(DT, 1) break; \
    case 2: HEAD_TILE(DT, 2) break; \
    case 3: HEAD_TILE(DT, 3) break; \
    default: HEAD_TILE(DT, 4) break; \
    }

void NAME(head_rows)(const void *w, int dtype, const float *scales, int K, const float *x, int M, int V,
                     int v_begin, int v_end, float *out) {
    for (int m0 = 0; m0 < M; m0 += HEAD_TOKENS) {
        int tokens = M - m0 < HEAD_TOKENS ? M - m0 : HEAD_TOKENS;
        const float *xm = x + (size_t)m0 * K;
        float *om = out + (size_t)m0 * V;
        switch (dtype) {
        case WEIGHT_BF16: HEAD_ROWS(WEIGHT_BF16) break;
        case WEIGHT_F32: HEAD_ROWS(WEIGHT_F32) break;
        default: HEAD_ROWS(WEIGHT_INT8) break;
        }
    }
}

INLINE float dot(const float *a, const float *b, int n) {
    lanes_f32 acc = {0};
    int k = 0;
    for (; k + LANES <= n; k += LANES) acc += load_f32(a + k) * load_f32(b + k);
    for (int l = 0; k + l < n; l++) acc[l] += a[k + l] * b[k + l];
    return lane_total(acc);
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
