/* The steps of a decoder layer and the stack of layers (layers.h). */
#include "layers.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attention_prefill.h"
#include "float_ops.h"
#include "paths.h"
#include "pool.h"
#include "scratch.h"

/* ---------------------------------------------------------------------------------------------
 * Ternary matmul */

/* The many-token GEMM of a path for m tokens, or NULL where the tile kernel serves them. */
static gemm_part_fn gemm_for(int path, int m) {
#if defined(__x86_64__)
    if (path == PATH_AVX512 && m >= GEMM_MIN_TOKENS_AVX512) return gemm_avx512;
    if (path == PATH_AVX2 && m >= GEMM_MIN_TOKENS_AVX2) return gemm_avx2;
#endif
    (void)path, (void)m;
    return NULL;
}

static tile_kernel tile_for(int path) {
    switch (path) {
#if defined(__x86_64__)
    case PATH_AVX2: return tile_avx2;
    case PATH_AVX512: return tile_avx512;
#endif
#if defined(__aarch64__)
    case PATH_NEON: return tile_neon;
    case PATH_NEONDOT: return tile_neondot;
#endif
    default: return tile_scalar;
    }
}

struct matmul_job {
    const struct gemm_job *args;
    tile_kernel tile;
    const int8_t *pairs;  /* the tokens in pairs for tile_avx512_pairs (kernels.h), or NULL; odd tiles: `tile` */
    size_t pair_stride;
};

static void matmul_part(void *ctx, int group_begin, int group_end) {
    const struct matmul_job *tiles = ctx;
    const struct gemm_job *job = tiles->args;
    size_t group_bytes = (size_t)job->blocks * GROUP_BLOCK_BYTES;
    int32_t raw[MAX_TILE_TOKENS * ROWS_PER_GROUP];
    for (int g = group_begin; g < group_end; g++) {
        for (int m0 = 0; m0 < job->m; m0 += MAX_TILE_TOKENS) {
            int tokens = job->m - m0 < MAX_TILE_TOKENS ? job->m - m0 : MAX_TILE_TOKENS;
            const uint8_t *group = job->packed + g * group_bytes;
#if defined(__x86_64__)
            if (tiles->pairs && tokens % 2 == 0)
                tile_avx512_pairs(group, job->blocks, tiles->pairs + (size_t)m0 / 2 * tiles->pair_stride, tiles->pair_stride,
                                  tokens, raw);
            else
#endif
                tiles->tile(group, job->blocks, job->x + m0 * job->x_stride, job->x_stride, tokens, raw);
            for (int t = 0; t < tokens; t++)
                for (int r = 0; r < ROWS_PER_GROUP; r++) {
                    int row = g * ROWS_PER_GROUP + r, token = m0 + t;
                    if (row >= job->n) break;
                    int32_t exact = raw[t * ROWS_PER_GROUP + r] - job->x_sum[token];
                    size_t at = (size_t)token * job->n + row;
                    if (job->mode == MATMUL_INT32) {
                        ((int32_t *)job->out)[at] = exact;
                    } else {
                        /* The golden model's order: int32 -> fp32, / activation scale, * weight scale. */
                        float y = (float)exact / job->x_scale[token] * job->w_scale[row];
                        float *out = (float *)job->out + at;
                        *out = job->mode == MATMUL_ADD ? *out + y : y;
                    }
                }
        }
    }
}

/* The first 2 * (m / 2) tokens of x in pairs (kernels.h, tile_avx512_pairs). */
static void pair_activations(const int8_t *x, size_t x_stride, int m, int blocks, int8_t *pairs, size_t pair_stride) {
    for (int t = 0; t < m / 2 * 2; t++)
        for (int field = 0; field < blocks * (BLOCK_INPUTS / CHUNK_BYTES); field++)
            memcpy(pairs + (size_t)(t / 2) * pair_stride + (size_t)(2 * field + t % 2) * CHUNK_BYTES,
                   x + t * x_stride + (size_t)field * CHUNK_BYTES, CHUNK_BYTES);
}

void ternary_matmul(const struct gemm_job *job, int path, int threads) {
    gemm_part_fn gemm = gemm_for(path, job->m);
    struct matmul_job tiles = {.args = job, .tile = tile_for(path)};
    if (!gemm && path == PATH_AVX512 && job->m > 1) {  /* this thread's scratch, read by all during the call */
        tiles.pair_stride = (size_t)job->blocks * 2 * BLOCK_INPUTS;
        int8_t *pairs = thread_scratch(SCRATCH_TOKEN_PAIRS, (size_t)(job->m / 2) * tiles.pair_stride);
        pair_activations(job->x, job->x_stride, job->m, job->blocks, pairs, tiles.pair_stride);
        tiles.pairs = pairs;
    }
    if (gemm)
        parallel_for(gemm, (void *)job, (job->n + GEMM_ROWS - 1) / GEMM_ROWS, threads);
    else
        parallel_for(matmul_part, &tiles, row_groups(job->n), threads);
}

/* ---------------------------------------------------------------------------------------------
 * Norm and activation quantisation */

static void rows_part(void *ctx, int begin, int end) {
    const struct rows_job *job = ctx;
    float *row = job->q ? thread_scratch(SCRATCH_ROW, (size_t)job->k * sizeof *row) : NULL;
    int kp = padded_inputs(job->k);
    for (int i = begin; i < end; i++) {
        ISA_COPY(job->path, prepare_row)(job->x + i * job->ld, job->k, job->gated, job->norm_w, job->eps,
                                         job->q ? row : job->out + (size_t)i * job->k);
        if (job->q) ISA_COPY(job->path, quantize_row)(row, job->k, kp, job->q + (size_t)i * kp, job->scale + i, job->sum + i);
    }
}

void prepare_rows(const struct rows_job *job, int threads) { parallel_for(rows_part, (void *)job, job->m, threads); }

/* ---------------------------------------------------------------------------------------------
 * Attention */

typedef void (*attention_fn)(const struct attention_args *, int, int, float *, size_t);

/* HF's half-split rotation of `heads` vectors of `dim` floats in place, with one position's cos/sin rows. */
static void rotate(float *x, int heads, int dim, const float *c, const float *s) {
    int half = dim / 2;
    for (int h = 0; h < heads; h++, x += dim)
        for (int d = 0; d < half; d++) {
            float lo = x[d], hi = x[d + half];
            x[d] = lo * c[d] + (-hi) * s[d];
            x[d + half] = hi * c[d + half] + lo * s[d + half];
        }
}

/* One step's attention over its short segments (one slot's consecutive rows each, fewer than
 * PREFILL_ATTENTION_MIN_TOKENS): a segment's tasks (token, heads: float_ops.h) come after the previous
 * segments' in task numbering; a long segment has none (the prefill kernel serves it). */
struct attention_job {
    attention_fn fn;
    struct attention_args *segments;
    int *first_task;  /* [segments + 1] */
    int count, positions;
};

static void attention_part(void *ctx, int begin, int end) {
    const struct attention_job *job = ctx;
    size_t stride = (size_t)(job->positions + 15) / 16 * 16;
    float *scores = thread_scratch(SCRATCH_ATTENTION, MAX_HEADS_PER_TASK * stride * sizeof *scores);
    for (int s = 0; s < job->count && begin < end; s++) {
        int lo = job->first_task[s], hi = job->first_task[s + 1];
        if (lo == hi || end <= lo || begin >= hi) continue;
        int from = begin > lo ? begin : lo, to = end < hi ? end : hi;
        job->fn(&job->segments[s], from - lo, to - lo, scores, stride);
    }
}

int attention_step(const struct attention_step_job *a, int path, int threads) {
    int heads = a->heads, kv_heads = a->kv_heads, dim = a->head_dim, width = (heads + 2 * kv_heads) * dim;
    size_t head_stride = (size_t)a->positions * dim, kv_floats = (size_t)kv_heads * head_stride;
    struct attention_args *segments = malloc((size_t)a->count * sizeof *segments);
    int *first_task = malloc((size_t)(a->count + 1) * sizeof *first_task);
    if (!segments || !first_task) {
        free(segments), free(first_task);
        return -1;
    }
    first_task[0] = 0;
    for (int s = 0, row = 0; s < a->count; s++) {
        int slot = (int)a->segments[3 * s], start = (int)a->segments[3 * s + 1], n = (int)a->segments[3 * s + 2];
        float *keys = a->cache + (size_t)slot * 2 * kv_floats, *values = keys + kv_floats;
        for (int i = 0; i < n; i++) {
            float *q = a->qkv + (size_t)(row + i) * width, *k = q + heads * dim, *v = k + kv_heads * dim;
            const float *c = a->cos + (size_t)(start + i) * dim, *sn = a->sin + (size_t)(start + i) * dim;
            rotate(q, heads, dim, c, sn);
            rotate(k, kv_heads, dim, c, sn);
            for (int h = 0; h < kv_heads; h++) {
                size_t at = h * head_stride + (size_t)(start + i) * dim;
                memcpy(keys + at, k + h * dim, (size_t)dim * sizeof *k);
                memcpy(values + at, v + h * dim, (size_t)dim * sizeof *v);
            }
        }
        segments[s] = (struct attention_args){
            .q = a->qkv + (size_t)row * width, .keys = keys, .values = values, .out = a->out + (size_t)row * heads * dim,
            .q_stride = (size_t)width, .head_stride = head_stride, .heads = heads, .group = heads / kv_heads,
            .head_dim = dim, .start = start, .scale = a->scale,
        };
        int short_segment = n < PREFILL_ATTENTION_MIN_TOKENS;
        first_task[s + 1] = first_task[s] + (short_segment ? n * heads / attention_heads_per_task(heads / kv_heads, path) : 0);
        row += n;
    }
    /* Decode rows and short chunks share the per-token kernel; each prefill chunk of many tokens takes the
     * prefill kernel, whatever else the step holds (the same arithmetic as a step of that chunk alone). */
    struct attention_job job = {.fn = ISA_COPY(path, attention_tasks), .segments = segments, .first_task = first_task,
                                .count = a->count, .positions = a->positions};
    if (first_task[a->count]) parallel_for_each(attention_part, &job, first_task[a->count], threads);
    for (int s = 0; s < a->count; s++) {
        int n = (int)a->segments[3 * s + 2];
        struct prefill_attention_job prefill = {.args = segments[s], .tokens = n, .positions = a->positions};
        if (n >= PREFILL_ATTENTION_MIN_TOKENS)
            parallel_for(ISA_COPY(path, attention_prefill), &prefill, prefill_attention_tasks(&prefill), threads);
    }
    free(segments), free(first_task);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The layer stack */

const char *const LAYER_COMPONENT_NAMES[LAYER_COMPONENTS] = {"norm + quantise", "qkv", "RoPE + attention", "o_proj",
                                                             "gate_up", "down"};

/* What a layer's steps share: the stack, the step's rows and how to run them. */
struct step {
    const struct layer_stack *stack;
    const int64_t *segments;
    int rows, count, path, threads;
    double *timings;
};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void timed(const struct step *s, enum layer_component component, double since, size_t bytes) {
    if (!s->timings) return;
    double *t = s->timings + 3 * component;
    t[0] += now() - since, t[1] += 1, t[2] += (double)bytes;
}

/* x (width k, or [gate | up] of width 2k when gated), normed with norm_w, into acts. */
static void norm_quantise(const struct step *s, const float *x, int k, int gated, const float *norm_w,
                          const struct activations *acts) {
    double start = s->timings ? now() : 0;
    struct rows_job job = {.x = x, .norm_w = norm_w, .ld = (size_t)(gated ? 2 * k : k), .m = s->rows, .k = k,
                           .gated = gated, .path = s->path, .eps = s->stack->eps, .q = acts->q, .scale = acts->scale,
                           .sum = acts->sum};
    prepare_rows(&job, s->rows > 1 ? s->threads : 1);
    timed(s, TIME_NORM_QUANTISE, start, 0);
}

/* out [rows, n] = acts @ w^T, scaled as the golden model; set, or added to out (the residual) when `add`. */
static void project(const struct step *s, const struct projection *w, int n, int k, const struct activations *acts,
                    float *out, int add, enum layer_component component) {
    double start = s->timings ? now() : 0;
    struct gemm_job job = {.packed = w->packed, .x = acts->q, .x_sum = acts->sum, .x_scale = acts->scale,
                           .w_scale = w->scale, .out = out, .x_stride = (size_t)padded_inputs(k), .n = n, .m = s->rows,
                           .blocks = padded_inputs(k) / BLOCK_INPUTS, .mode = add ? MATMUL_ADD : MATMUL_STORE};
    ternary_matmul(&job, s->path, s->threads);
    timed(s, component, start, packed_bytes(n, k));
}

/* RoPE, KV-cache write and attention of layer `index`; bytes read: keys and values up to each segment's end. */
static int attend(const struct step *s, int index) {
    const struct layer_stack *st = s->stack;
    double start = s->timings ? now() : 0;
    size_t layer_cache = (size_t)st->slots * 2 * st->kv_heads * st->positions * st->head_dim, bytes = 0;
    struct attention_step_job job = {
        .qkv = st->qkv, .cache = st->cache + index * layer_cache, .out = st->attention, .cos = st->cos, .sin = st->sin,
        .segments = s->segments, .count = s->count, .rows = s->rows, .heads = st->heads, .kv_heads = st->kv_heads,
        .head_dim = st->head_dim, .positions = st->positions, .scale = st->attention_scale,
    };
    if (attention_step(&job, s->path, s->threads)) return -1;
    for (int i = 0; i < s->count; i++)
        bytes += (size_t)2 * st->kv_heads * st->head_dim * sizeof(float) * (size_t)(s->segments[3 * i + 1] + s->segments[3 * i + 2]);
    timed(s, TIME_ATTENTION, start, bytes);
    return 0;
}

/* One decoder layer, in the golden model's order (backends/torch/model.py DecoderLayer):
 * x += o_proj(quantise(sub_norm(attention(rope(qkv(quantise(input_norm(x))))))))
 * x += down(quantise(ffn_sub_norm(relu(gate)^2 * up))), [gate | up] = gate_up(quantise(post_norm(x))) */
static int layer(const struct step *s, int index) {
    const struct layer_stack *st = s->stack;
    const struct layer_weights *w = &st->weights[index];
    int q_size = st->heads * st->head_dim, qkv_width = q_size + 2 * st->kv_heads * st->head_dim;
    norm_quantise(s, st->x, st->hidden, 0, w->input_norm, &st->hidden_acts);
    project(s, &w->qkv, qkv_width, st->hidden, &st->hidden_acts, st->qkv, 0, TIME_QKV);
    if (attend(s, index)) return -1;
    norm_quantise(s, st->attention, q_size, 0, w->attention_norm, &st->attention_acts);
    project(s, &w->o_proj, st->hidden, q_size, &st->attention_acts, st->x, 1, TIME_O_PROJ);

    norm_quantise(s, st->x, st->hidden, 0, w->post_attention_norm, &st->hidden_acts);
    project(s, &w->gate_up, 2 * st->intermediate, st->hidden, &st->hidden_acts, st->gate_up, 0, TIME_GATE_UP);
    norm_quantise(s, st->gate_up, st->intermediate, 1, w->mlp_norm, &st->mlp_acts);
    project(s, &w->down, st->hidden, st->intermediate, &st->mlp_acts, st->x, 1, TIME_DOWN);
    return 0;
}

int run_layers(const struct layer_stack *stack, int rows, const int64_t *segments, int count, int path, int threads,
               double *timings) {
    struct step s = {.stack = stack, .segments = segments, .rows = rows, .count = count, .path = path,
                     .threads = threads, .timings = timings};
    for (int i = 0; i < stack->layers; i++)
        if (layer(&s, i)) return -1;
    return 0;
}
