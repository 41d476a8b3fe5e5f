/* Prefill attention (attention_prefill.h), compiled once per instruction set (ISA_SUFFIX names the copy)
 * with GCC's vector extensions, contraction off: every copy gives the same floats. Against the per-token
 * kernel only the dot products' summation order differs (here each score sums its head_dim products in
 * order; there in 16 partial sums); the softmax (fast_exp.h) and the weighted sum of values are the same. */
#include <math.h>
#include <string.h>

#include "attention_prefill.h"
#include "fast_exp.h"
#include "scratch.h"

#define LANES 16
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define NAME(base) CAT(base, ISA_SUFFIX)

typedef float lanes_f32 __attribute__((vector_size(LANES * 4)));

static inline lanes_f32 load_lanes(const float *p) {
    lanes_f32 v;
    memcpy(&v, p, sizeof v);
    return v;
}

#define INLINE static inline __attribute__((always_inline))
#define SCORE_ROWS 4
#define VALUE_ROWS 2
#define MAX_VECTORS 8  /* head_dim up to 128 keeps a row's output in registers */

/* Rows [r0, r0 + R) of the task (R a constant after inlining) against the transposed key block: each key
 * vector is loaded once for all of them. */
INLINE void score_block(const struct attention_args *a, const float *const *q, int R, const float *key_block,
                        float *out, size_t stride) {
    lanes_f32 acc[SCORE_ROWS] = {{0}};
    for (int d = 0; d < a->head_dim; d++) {
        lanes_f32 k = load_lanes(key_block + d * LANES);
        for (int r = 0; r < R; r++) acc[r] += k * q[r][d];
    }
    for (int r = 0; r < R; r++) {
        lanes_f32 scaled = acc[r] * a->scale;
        memcpy(out + r * stride, &scaled, sizeof scaled);
    }
}

/* scores[r][j] = q_r . key_j * scale for the task's rows and keys 0 .. longest - 1, 16 keys at a time. */
static void score_rows(const struct attention_args *a, const float *keys, int kv, int t0, int rows, int longest,
                       float *key_block, float *scores, size_t stride) {
    int dim = a->head_dim;
    for (int j0 = 0; j0 < longest; j0 += LANES) {
        int count = longest - j0 < LANES ? longest - j0 : LANES;
        for (int i = 0; i < count; i++)
            for (int d = 0; d < dim; d++) key_block[d * LANES + i] = keys[(size_t)(j0 + i) * dim + d];
        for (int i = count; i < LANES; i++)
            for (int d = 0; d < dim; d++) key_block[d * LANES + i] = 0.0f;
        for (int r0 = 0; r0 < rows; r0 += SCORE_ROWS) {
            const float *q[SCORE_ROWS];
            int n = rows - r0 < SCORE_ROWS ? rows - r0 : SCORE_ROWS;
            for (int r = 0; r < n; r++)
                q[r] = a->q + (size_t)(t0 + (r0 + r) / a->group) * a->q_stride + (size_t)(kv * a->group + (r0 + r) % a->group) * dim;
            float *out = scores + r0 * stride + j0;
            switch (n) {
            case 1: score_block(a, q, 1, key_block, out, stride); break;
            case 2: score_block(a, q, 2, key_block, out, stride); break;
            case 3: score_block(a, q, 3, key_block, out, stride); break;
            default: score_block(a, q, 4, key_block, out, stride); break;
            }
        }
    }
}

/* A row's softmax over its first `length` scores, in place, normalised (p = e / total), as float_ops.c. */
static void softmax(float *scores, int length) {
    float top = -INFINITY;
    for (int j = 0; j < length; j++) top = scores[j] > top ? scores[j] : top;
    float total = 0.0f;
    for (int j = 0; j < length; j++) {
        scores[j] = exp_nonpositive(scores[j] - top);
        total += scores[j];
    }
    float inv = 1.0f / total;
    for (int j = 0; j < length; j++) scores[j] *= inv;
}

/* o_r = sum_j p_r[j] * value_j for R rows of the same length (R, V = head_dim / 16 constants after
 * inlining): the outputs stay in registers and each value vector is loaded once for all rows. */
INLINE void weigh_block(const float *values, const float *const *p, int length, float *const *o, int R, int V) {
    lanes_f32 acc[VALUE_ROWS][MAX_VECTORS] = {{{0}}};
    for (int j = 0; j < length; j++) {
        const float *v = values + (size_t)j * V * LANES;
        for (int c = 0; c < V; c++) {
            lanes_f32 vc = load_lanes(v + c * LANES);
            for (int r = 0; r < R; r++) acc[r][c] += p[r][j] * vc;
        }
    }
    for (int r = 0; r < R; r++) memcpy(o[r], acc[r], (size_t)V * sizeof acc[r][0]);
}

/* Other head sizes: one row at a time through memory, as float_ops.c. */
static void weigh_row(const float *values, const float *p, int length, float *o, int dim) {
    for (int d = 0; d < dim; d++) o[d] = 0.0f;
    for (int j = 0; j < length; j++)
        for (int d = 0; d < dim; d++) o[d] += p[j] * values[(size_t)j * dim + d];
}

#define VECTOR_CASES(R) \
    switch (dim / LANES) { \
    case 1: weigh_block(values, p, length, o, R, 1); break; \
    case 2: weigh_block(values, p, length, o, R, 2); break; \
    case 4: weigh_block(values, p, length, o, R, 4); break; \
    case 6: weigh_block(values, p, length, o, R, 6); break; \
    default: weigh_block(values, p, length, o, R, 8); break; \
    }

/* Rows of the same token (the heads of one kv head) share their length: weighed two at a time. */
static void weigh_rows(const float *values, float *const *p_rows, float *const *o_rows, int n, int length, int dim) {
    int fast = dim % LANES == 0 && (dim / LANES <= 2 || dim / LANES == 4 || dim / LANES == 6 || dim / LANES == 8);
    for (int r0 = 0; r0 < n; r0 += VALUE_ROWS) {
        const float *const *p = (const float *const *)p_rows + r0;
        float *const *o = o_rows + r0;
        if (!fast) {
            for (int r = 0; r < n - r0 && r < VALUE_ROWS; r++) weigh_row(values, p[r], length, o[r], dim);
        } else if (n - r0 >= VALUE_ROWS) {
            VECTOR_CASES(2)
        } else {
            VECTOR_CASES(1)
        }
    }
}

void NAME(attention_prefill)(void *ctx, int task_begin, int task_end) {
    const struct prefill_attention_job *job = ctx;
    const struct attention_args *a = &job->args;
    int per_task = prefill_tokens_per_task(a->group), kv_heads = a->heads / a->group;
    size_t stride = (size_t)(job->positions + LANES - 1) / LANES * LANES;
    float *key_block = thread_scratch(SCRATCH_ATTENTION, ((size_t)a->head_dim * LANES + (size_t)per_task * a->group * stride) * sizeof(float));
    float *scores = key_block + (size_t)a->head_dim * LANES;
    for (int task = task_begin; task < task_end; task++) {
        int kv = task % kv_heads, t0 = task / kv_heads * per_task;
        int tokens = job->tokens - t0 < per_task ? job->tokens - t0 : per_task, rows = tokens * a->group;
        const float *keys = a->keys + (size_t)kv * a->head_stride, *values = a->values + (size_t)kv * a->head_stride;
        score_rows(a, keys, kv, t0, rows, a->start + t0 + tokens, key_block, scores, stride);
        for (int t = t0; t < t0 + tokens; t++)
            for (int i0 = 0; i0 < a->group; i0 += PREFILL_QUERY_ROWS) {
                float *p[PREFILL_QUERY_ROWS], *o[PREFILL_QUERY_ROWS];
                int length = a->start + t + 1, n = a->group - i0 < PREFILL_QUERY_ROWS ? a->group - i0 : PREFILL_QUERY_ROWS;
                for (int i = 0; i < n; i++) {
                    p[i] = scores + ((size_t)(t - t0) * a->group + i0 + i) * stride;
                    o[i] = a->out + ((size_t)t * a->heads + kv * a->group + i0 + i) * a->head_dim;
                    softmax(p[i], length);
                }
                weigh_rows(values, p, o, n, length, a->head_dim);
            }
    }
}
