/* A step's decoder layers in one call (layers.c): the kernels composed in C, in the order of the golden
 * model's layer, so that a step makes one native call for the whole stack instead of nine per layer (each
 * of which crossed from Python and woke the thread pool). The three steps it composes (projection, norm +
 * quantisation, attention) are also the module's own entry points. */
#ifndef BITNET_CPU_LAYERS_H
#define BITNET_CPU_LAYERS_H

#include <stddef.h>
#include <stdint.h>

#include "gemm.h"
#include "kernels.h"

static inline int padded_inputs(int k) { return (k + BLOCK_INPUTS - 1) / BLOCK_INPUTS * BLOCK_INPUTS; }
static inline int row_groups(int n) { return (n + ROWS_PER_GROUP - 1) / ROWS_PER_GROUP; }
static inline size_t packed_bytes(int n, int k) { return (size_t)row_groups(n) * padded_inputs(k) / 4 * ROWS_PER_GROUP; }

/* The ternary product of a job (gemm.h) on a path: the many-token GEMM or the tile kernels. */
void ternary_matmul(const struct gemm_job *job, int path, int threads);

/* Rows of x (ld floats apart; [gate | up] when gated): relu(gate)^2 * up when gated, RMS-normed when
 * norm_w is given, then quantised per token into q/scale/sum, or written as fp32 into out when q is NULL. */
struct rows_job {
    const float *x, *norm_w;
    size_t ld;
    int m, k, gated, path;
    float eps;
    int8_t *q;  /* [m, padded k] */
    float *scale;
    int32_t *sum;
    float *out;  /* [m, k] */
};
void prepare_rows(const struct rows_job *job, int threads);

/* One layer's attention for a step: RoPE on the q and k heads of qkv (fp32 rows of [q | k | v], in
 * place), k and v written into the cache (fp32 [slots, 2, kv heads, positions, head dim]), then causal
 * attention of every row into out [rows, heads * head dim]. segments: (slot, start, rows) triples in row
 * order (checked by the caller); row i of a segment is at position start + i. Returns 0, or -1 when out
 * of memory. */
struct attention_step_job {
    float *qkv, *cache, *out;
    const float *cos, *sin;  /* [positions, head dim] */
    const int64_t *segments;
    int count, rows, heads, kv_heads, head_dim, positions;
    float scale;
};
int attention_step(const struct attention_step_job *job, int path, int threads);

struct projection {
    const uint8_t *packed;  /* row-group layout */
    const float *scale;     /* [n] */
};

struct layer_weights {
    const float *input_norm, *attention_norm, *post_attention_norm, *mlp_norm;
    struct projection qkv, o_proj, gate_up, down;
};

struct activations {
    int8_t *q;  /* [rows, padded k] */
    float *scale;
    int32_t *sum;
};

/* The model's dimensions, its layers' weights and the buffers a step of up to max_rows rows writes. */
struct layer_stack {
    int layers, hidden, heads, kv_heads, head_dim, intermediate, slots, positions, max_rows;
    float eps, attention_scale;
    float *x;          /* [rows, hidden]: the residual stream, read and updated in place */
    float *qkv;        /* [rows, (heads + 2 kv heads) * head dim] */
    float *attention;  /* [rows, heads * head dim] */
    float *gate_up;    /* [rows, 2 intermediate] */
    struct activations hidden_acts, attention_acts, mlp_acts;
    const float *cos, *sin;  /* [positions, head dim] */
    float *cache;            /* [layers, slots, 2, kv heads, positions, head dim] */
    const struct layer_weights *weights;  /* [layers] */
};

/* Where a step's time goes, per component (timings: [LAYER_COMPONENTS][3] of seconds, calls, bytes read). */
enum layer_component { TIME_NORM_QUANTISE, TIME_QKV, TIME_ATTENTION, TIME_O_PROJ, TIME_GATE_UP, TIME_DOWN, LAYER_COMPONENTS };
extern const char *const LAYER_COMPONENT_NAMES[LAYER_COMPONENTS];

/* Every layer of the stack over rows 0 .. rows - 1 of x; timings NULL or added to. Returns 0, or -1 when
 * out of memory. */
int run_layers(const struct layer_stack *stack, int rows, const int64_t *segments, int count, int path, int threads,
               double *timings);

#endif
