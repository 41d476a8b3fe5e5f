/* Prefill attention (attention_prefill.h), compiled once per instruction set (ISA_SUFFIX names the copy)
 * with GCC's vector extensions, contraction off: every copy gives the same floats. Against the per-token
 * kernel only the dot products' summation order differs (here each score sums its head_dim products in
 * order; there in 16 partial sums); the softmax (fast_exp.h) and the weighted sum of values are the same.
 *
 * A task's query rows (its tokens x the heads of its kv head) are transposed once, so that each score tile
 * multiplies 8 rows' values of one dimension (a vector) by one key's value (a broadcast): keys are read in
 * their cache layout, once per task, and the scores land column-wise, [key][row]. The softmax then runs
 * across 8 rows at a time (each row's sums still in key order), and the values are weighed in chunks of keys
 * that stay in L1 while every row and dimension of the task passes over them. */
#include <math.h>
#include <string.h>

#include "attention_prefill.h"
#include "fast_exp.h"
#include "scratch.h"

#define LANES 8
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define NAME(base) CAT(base, ISA_SUFFIX)
#define INLINE static inline __attribute__((always_inline))

typedef float lanes_f32 __attribute__((vector_size(LANES * 4)));
typedef int32_t lanes_i32 __attribute__((vector_size(LANES * 4)));

/* score tile: 4 x 8 rows x KEYS_PER_STEP keys in 8 registers, 16 where AVX-512 gives 32 (fewer loads per
 * multiply: 1.10-1.25x on a Zen 5, 512 tokens from 0 and 16 at 2,000; the sums are the same) */
#define ROW_VECTORS 4
#if defined(__AVX512F__)
#define KEYS_PER_STEP 4
#else
#define KEYS_PER_STEP 2
#endif
#define VALUE_ROWS 4    /* weigh tile: 4 rows x VALUE_VECTORS x 8 dimensions in 8 registers */
#define VALUE_VECTORS 2
#define KEY_CHUNK 64    /* keys whose values (32 KB at head_dim 128) every tile of a task weighs in turn */

static inline lanes_f32 load_lanes(const float *p) {
    lanes_f32 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store_lanes(float *p, lanes_f32 v) { memcpy(p, &v, sizeof v); }

/* Where a task's rows are: row r is token t0 + r / group and head kv * group + r % group. */
struct task_rows {
    const struct attention_args *a;
    int kv, t0, rows, pitch;  /* pitch: rows rounded up to LANES, the transposed layouts' row count */
};

static const float *query_row(const struct task_rows *task, int r) {
    const struct attention_args *a = task->a;
    return a->q + (size_t)(task->t0 + r / a->group) * a->q_stride + (size_t)(task->kv * a->group + r % a->group) * a->head_dim;
}

static float *output_row(const struct task_rows *task, int r) {
    const struct attention_args *a = task->a;
    return a->out + ((size_t)(task->t0 + r / a->group) * a->heads + task->kv * a->group + r % a->group) * a->head_dim;
}

static int row_length(const struct task_rows *task, int r) { return task->a->start + task->t0 + r / task->a->group + 1; }

/* q_t[d][r] = the rows' queries, zeros in the padding rows. */
static void transpose_queries(const struct task_rows *task, float *q_t) {
    int dim = task->a->head_dim;
    for (int r = 0; r < task->pitch; r++) {
        const float *q = r < task->rows ? query_row(task, r) : NULL;
        for (int d = 0; d < dim; d++) q_t[(size_t)d * task->pitch + r] = q ? q[d] : 0.0f;
    }
}

/* scores[j][8 * rv ...] for keys j0 .. j0 + J - 1 and row vectors rv0 .. rv0 + RV - 1 (RV, J constants after
 * inlining): each sums its head_dim products in order, then is scaled. */
INLINE void score_tile(const struct task_rows *task, const float *q_t, const float *keys, int j0, int rv0, int RV,
                       int J, float *scores) {
    int dim = task->a->head_dim;
    lanes_f32 acc[ROW_VECTORS][KEYS_PER_STEP] = {{{0}}};
    const float *q = q_t + (size_t)rv0 * LANES, *k = keys + (size_t)j0 * dim;
    for (int d = 0; d < dim; d++) {
        lanes_f32 qd[ROW_VECTORS];
        for (int rv = 0; rv < RV; rv++) qd[rv] = load_lanes(q + (size_t)d * task->pitch + rv * LANES);
        for (int j = 0; j < J; j++) {
            float kd = k[(size_t)j * dim + d];
            for (int rv = 0; rv < RV; rv++) acc[rv][j] += qd[rv] * kd;
        }
    }
    for (int j = 0; j < J; j++)
        for (int rv = 0; rv < RV; rv++)
            store_lanes(scores + (size_t)(j0 + j) * task->pitch + (rv0 + rv) * LANES, acc[rv][j] * task->a->scale);
}

#define ROW_CASES(J) \
    switch (task->pitch / LANES - rv0 < ROW_VECTORS ? task->pitch / LANES - rv0 : ROW_VECTORS) { \
    case 1: score_tile(task, q_t, keys, j0, rv0, 1, J, scores); break; \
    case 2: score_tile(task, q_t, keys, j0, rv0, 2, J, scores); break; \
    case 3: score_tile(task, q_t, keys, j0, rv0, 3, J, scores); break; \
    default: score_tile(task, q_t, keys, j0, rv0, 4, J, scores); break; \
    }

static void score_rows(const struct task_rows *task, const float *q_t, const float *keys, int longest, float *scores) {
    for (int j0 = 0; j0 < longest; j0 += KEYS_PER_STEP)
        for (int rv0 = 0; rv0 < task->pitch / LANES; rv0 += ROW_VECTORS) {
            switch (longest - j0 < KEYS_PER_STEP ? longest - j0 : KEYS_PER_STEP) {
            case 1: ROW_CASES(1) break;
#if KEYS_PER_STEP == 4
            case 3: ROW_CASES(3) break;
            case 4: ROW_CASES(4) break;
#endif
            default: ROW_CASES(2) break;
            }
        }
}

/* where mask: a, elsewhere b (mask lanes all ones or zeros, as vector comparisons give). */
static inline lanes_f32 select_lanes(lanes_i32 mask, lanes_f32 a, lanes_f32 b) {
    return (lanes_f32)((mask & (lanes_i32)a) | (~mask & (lanes_i32)b));
}

/* fast_exp.h's exp_nonpositive in every lane. */
static inline lanes_f32 exp_nonpositive_lanes(lanes_f32 x) {
    const lanes_f32 floor = {-87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f};
    x = select_lanes(x < floor, floor, x);
    lanes_f32 n, p;
    EXP_NONPOSITIVE_STEPS(x, n, p);
    return p * (lanes_f32)((__builtin_convertvector(n, lanes_i32) + 127) << 23);
}

/* Each row's softmax over its own length, 8 rows (a column of the layout) at a time: as float_ops.c's
 * (p = exp_nonpositive(s - max) * (1 / total), the total summed in key order); past a row's length, p = 0. */
static void softmax_columns(const struct task_rows *task, int longest, float *scores) {
    const lanes_f32 zero = {0};
    for (int r0 = 0; r0 < task->pitch; r0 += LANES) {
        lanes_i32 length;
        lanes_f32 top, total = zero;
        for (int l = 0; l < LANES; l++) {
            length[l] = r0 + l < task->rows ? row_length(task, r0 + l) : 0;
            top[l] = -INFINITY;
        }
        for (int j = 0; j < longest; j++) {
            lanes_f32 s = load_lanes(scores + (size_t)j * task->pitch + r0);
            top = select_lanes((j < length) & (s > top), s, top);
        }
        for (int j = 0; j < longest; j++) {
            float *at = scores + (size_t)j * task->pitch + r0;
            lanes_f32 e = select_lanes(j < length, exp_nonpositive_lanes(load_lanes(at) - top), zero);
            store_lanes(at, e);
            total += e;
        }
        lanes_f32 inv = 1.0f / total;
        for (int j = 0; j < longest; j++) {
            float *at = scores + (size_t)j * task->pitch + r0;
            store_lanes(at, load_lanes(at) * inv);
        }
    }
}

/* Rows r0 .. r0 + R - 1, dimensions 8 * c0 .. + 8C - 1 (R, C constants after inlining) over keys j0 .. j1 - 1:
 * o += p[j][r] * value_j, the sums continued in memory from the previous chunk (first: from zero). */
INLINE void weigh_tile(const struct task_rows *task, const float *p, const float *values, float *const *o, int r0,
                       int c0, int j0, int j1, int R, int C) {
    int dim = task->a->head_dim;
    lanes_f32 acc[VALUE_ROWS][VALUE_VECTORS] = {{{0}}};
    if (j0 > 0)
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) acc[r][c] = load_lanes(o[r] + (c0 + c) * LANES);
    for (int j = j0; j < j1; j++) {
        const float *v = values + (size_t)j * dim + c0 * LANES;
        lanes_f32 vc[VALUE_VECTORS];
        for (int c = 0; c < C; c++) vc[c] = load_lanes(v + c * LANES);
        for (int r = 0; r < R; r++) {
            float pr = p[(size_t)j * task->pitch + r0 + r];
            for (int c = 0; c < C; c++) acc[r][c] += pr * vc[c];
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) store_lanes(o[r] + (c0 + c) * LANES, acc[r][c]);
}

#define VALUE_ROW_CASES(C) \
    switch (task->rows - r0 < VALUE_ROWS ? task->rows - r0 : VALUE_ROWS) { \
    case 1: weigh_tile(task, p, values, o + r0, r0, c0, j0, j1, 1, C); break; \
    case 2: weigh_tile(task, p, values, o + r0, r0, c0, j0, j1, 2, C); break; \
    case 3: weigh_tile(task, p, values, o + r0, r0, c0, j0, j1, 3, C); break; \
    default: weigh_tile(task, p, values, o + r0, r0, c0, j0, j1, 4, C); break; \
    }

/* Dimensions past the last multiple of 8, one row at a time, in the same order. */
static void weigh_tail(const struct task_rows *task, const float *p, const float *values, float *const *o, int longest) {
    int dim = task->a->head_dim;
    for (int r = 0; r < task->rows; r++)
        for (int d = dim / LANES * LANES; d < dim; d++) {
            float sum = 0.0f;
            for (int j = 0; j < longest; j++) sum += p[(size_t)j * task->pitch + r] * values[(size_t)j * dim + d];
            o[r][d] = sum;
        }
}

static void weigh_rows(const struct task_rows *task, const float *p, const float *values, float *const *o, int longest) {
    int vectors = task->a->head_dim / LANES;
    for (int j0 = 0; j0 < longest; j0 += KEY_CHUNK) {
        int j1 = longest - j0 < KEY_CHUNK ? longest : j0 + KEY_CHUNK;
        for (int c0 = 0; c0 < vectors; c0 += VALUE_VECTORS)
            for (int r0 = 0; r0 < task->rows; r0 += VALUE_ROWS) {
                if (vectors - c0 >= 2) {
                    VALUE_ROW_CASES(2)
                } else {
                    VALUE_ROW_CASES(1)
                }
            }
    }
    weigh_tail(task, p, values, o, longest);
}

void NAME(attention_prefill)(void *ctx, int task_begin, int task_end) {
    const struct prefill_attention_job *job = ctx;
    const struct attention_args *a = &job->args;
    int per_task = prefill_tokens_per_task(a->group), kv_heads = a->heads / a->group;
    int most_rows = per_task * a->group, pitch = (most_rows + LANES - 1) / LANES * LANES;
    float *q_t = thread_scratch(SCRATCH_ATTENTION, ((size_t)a->head_dim + (size_t)job->positions) * pitch * sizeof(float) +
                                                       (size_t)most_rows * sizeof(float *));
    float *scores = q_t + (size_t)a->head_dim * pitch;
    float **o = (float **)(scores + (size_t)job->positions * pitch);
    for (int task = task_begin; task < task_end; task++) {
        int kv = task % kv_heads, t0 = task / kv_heads * per_task;
        int tokens = job->tokens - t0 < per_task ? job->tokens - t0 : per_task, rows = tokens * a->group;
        struct task_rows rows_of = {.a = a, .kv = kv, .t0 = t0, .rows = rows, .pitch = (rows + LANES - 1) / LANES * LANES};
        int longest = a->start + t0 + tokens;
        for (int r = 0; r < rows; r++) o[r] = output_row(&rows_of, r);
        transpose_queries(&rows_of, q_t);
        score_rows(&rows_of, q_t, a->keys + (size_t)kv * a->head_stride, longest, scores);
        softmax_columns(&rows_of, longest, scores);
        weigh_rows(&rows_of, scores, a->values + (size_t)kv * a->head_stride, o, longest);
    }
}
