/* Declarations of the float kernels (float_ops.c), one copy per instruction set. */
#ifndef BITNET_CPU_FLOAT_OPS_H
#define BITNET_CPU_FLOAT_OPS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "paths.h"

enum weight_dtype { WEIGHT_BF16 = 0, WEIGHT_F32 = 1, WEIGHT_INT8 = 2 };

/* The LM head's tokens as its kernels read them (head_prepare), in passes of up to 8 tokens, each pass's
 * tokens interleaved block by block: for a bf16 or fp32 head each token's x, reordered to the weights'
 * lanes and zero-padded to whole blocks of HEAD_FLOAT_BLOCK; for an int8 head each token's int8 codes,
 * zero-padded to HEAD_INT8_BLOCK, then the tokens' fp32 scales, then room for one token's codes in order. */
#define HEAD_FLOAT_BLOCK 32
#define HEAD_INT8_BLOCK 64

/* Element i of a bf16 (as uint16 bits) or fp32 table, as fp32 (exact). */
static inline float table_value(const void *table, int dtype, size_t i) {
    if (dtype == WEIGHT_F32) return ((const float *)table)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)table)[i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline int head_padded_k(int dtype, int k) {
    int block = dtype == WEIGHT_INT8 ? HEAD_INT8_BLOCK : HEAD_FLOAT_BLOCK;
    return (k + block - 1) / block * block;
}

static inline size_t head_prepared_bytes(int dtype, int k, int m) {
    size_t kp = (size_t)head_padded_k(dtype, k);
    return dtype == WEIGHT_INT8 ? (size_t)m * (kp + 4) + kp : (size_t)m * kp * 4;
}

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
 * load (the task's scores take that many rows of `positions` floats). 4 where AVX-512's 32 registers hold
 * their sums: a kv head's keys and values are then read once per token (2B-4T: a group of 4), where two
 * tasks of 2 heads read them twice. */
#define MAX_HEADS_PER_TASK 4
static inline int attention_heads_per_task(int group, int path) {
    return path == PATH_AVX512 && group % 4 == 0 ? 4 : group % 2 ? 1 : 2;
}

#define FLOAT_OPS(suffix) \
    void head_prepare##suffix(int dtype, const float *x, int K, int M, void *prepared); \
    void head_rows##suffix(const void *w, int dtype, const float *scales, int K, const void *prepared, int M, int V, \
                           int v_begin, int v_end, float *out); \
    void attention_tasks##suffix(const struct attention_args *a, int task_begin, int task_end, float *scores, \
                                 size_t score_stride); \
    void prepare_row##suffix(const float *row, int k, int gated, const float *norm_w, float eps, float *y); \
    void quantize_row##suffix(const float *y, int k, int kp, int8_t *q, float *scale, int32_t *sum); \
    void quantize_head_rows##suffix(const void *table, int dtype, int k, int v_begin, int v_end, int8_t *q, float *scales);

FLOAT_OPS(_generic)
#if defined(__x86_64__) || defined(_M_X64)
FLOAT_OPS(_avx2)
FLOAT_OPS(_avx512)
#endif

#endif
