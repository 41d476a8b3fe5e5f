/* Declarations of the float kernels (float_ops.c), one copy per instruction set. */
#ifndef BITNET_CPU_FLOAT_OPS_H
#define BITNET_CPU_FLOAT_OPS_H

#include <stddef.h>
#include <stdint.h>

enum weight_dtype { WEIGHT_BF16 = 0, WEIGHT_F32 = 1, WEIGHT_INT8 = 2 };

/* Causal attention of T query tokens at positions start .. start + T - 1 over one slot's cache. */
struct attention_args {
    const float *q;       /* token t, head h at q + t * q_stride + h * head_dim */
    const float *keys;    /* [kv_heads, positions, head_dim]; head_stride floats between kv heads */
    const float *values;
    float *out;           /* [T, heads, head_dim] */
    size_t q_stride, head_stride;
    int heads, group, head_dim, start;
    float scale;
};

/* A decode attention task: one token and this many heads of one kv head, which share each key and value
 * load (the task's scores take that many rows of `positions` floats). */
#define MAX_HEADS_PER_TASK 2
static inline int attention_heads_per_task(int group) { return group % 2 ? 1 : 2; }

#define FLOAT_OPS(suffix) \
    void head_rows##suffix(const void *w, int dtype, const float *scales, int K, const float *x, int M, int V, \
                           int v_begin, int v_end, float *out); \
    void attention_tasks##suffix(const struct attention_args *a, int task_begin, int task_end, float *scores, \
                                 size_t score_stride); \
    void prepare_row##suffix(const float *row, int k, int gated, const float *norm_w, float eps, float *y); \
    void quantize_row##suffix(const float *y, int k, int kp, int8_t *q, float *scale, int32_t *sum);

FLOAT_OPS(_generic)
#if defined(__x86_64__) || defined(_M_X64)
FLOAT_OPS(_avx2)
FLOAT_OPS(_avx512)
#endif

#endif
