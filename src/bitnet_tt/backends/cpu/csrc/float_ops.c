/* Float kernels of the CPU backend: the LM head, attention, norms and activation quantisation.
 *
 * This one source is compiled once per instruction set (ISA_SUFFIX names the copy). Dot products keep
 * LANES = 16 fp32 partial sums (one AVX-512 register, two AVX2 ones, four SSE/NEON ones: `lanes` holds
 * them in registers of the native width), added in the same order by every copy; contraction into FMA is
 * off (-ffp-contract=off): all copies give bit-identical floats.
 */
#include <math.h>
#include <string.h>

#include "fast_exp.h"
#include "float_ops.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define LANES 16
#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#elif defined(__AVX2__)
#define VECTOR_BYTES 32
#else
#define VECTOR_BYTES 16
#endif
#define WIDTH (VECTOR_BYTES / 4)  /* fp32 lanes per register */
#define PARTS (LANES / WIDTH)

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define NAME(base) CAT(base, ISA_SUFFIX)

typedef float vector_f32 __attribute__((vector_size(VECTOR_BYTES)));
typedef uint32_t vector_u32 __attribute__((vector_size(VECTOR_BYTES)));
typedef uint16_t vector_u16 __attribute__((vector_size(VECTOR_BYTES / 2)));
typedef int8_t vector_i8 __attribute__((vector_size(VECTOR_BYTES / 4)));
typedef int32_t vector_i32 __attribute__((vector_size(VECTOR_BYTES)));

/* LANES fp32 partial sums: lane l is part[l / WIDTH][l % WIDTH]. (GCC's own code for one 64-byte vector
 * type on AVX2 goes through the stack.) */
typedef struct {
    vector_f32 part[PARTS];
} lanes;

#define INLINE static inline __attribute__((always_inline))

INLINE float lane_at(const lanes *v, int l) { return v->part[l / WIDTH][l % WIDTH]; }

typedef float vector_f32x4 __attribute__((vector_size(16)));
typedef float vector_f32x8 __attribute__((vector_size(32)));

/* The sum of the lanes in a fixed tree, the same on every path: pairs[l] = lane l + lane l + 8, quads[l] =
 * pairs[l] + pairs[l + 4], then (quads 0 + 2) + (quads 1 + 3); as halves of registers, not lane by lane. */
INLINE float lane_total(lanes acc) {
    vector_f32x4 low, high;
#if WIDTH == 16
    vector_f32x8 half[2], pairs;
    memcpy(half, &acc.part[0], sizeof half);
    pairs = half[0] + half[1];
    memcpy(&low, &pairs, sizeof low), memcpy(&high, (const float *)&pairs + 4, sizeof high);
#elif WIDTH == 8
    vector_f32 pairs = acc.part[0] + acc.part[1];
    memcpy(&low, &pairs, sizeof low), memcpy(&high, (const float *)&pairs + 4, sizeof high);
#else
    low = acc.part[0] + acc.part[2], high = acc.part[1] + acc.part[3];
#endif
    vector_f32x4 quads = low + high;
    return (quads[0] + quads[2]) + (quads[1] + quads[3]);
}

INLINE lanes load_f32(const float *at) {
    lanes v;
    for (int p = 0; p < PARTS; p++) memcpy(&v.part[p], at + p * WIDTH, sizeof v.part[p]);
    return v;
}

/* acc += a * b, lane by lane (a multiply and an add: no FMA). */
INLINE void multiply_add(lanes *acc, const lanes *a, const lanes *b) {
    for (int p = 0; p < PARTS; p++) acc->part[p] += a->part[p] * b->part[p];
}

/* WIDTH weights from w[at ..] as fp32: bf16 is the top half of an fp32, int8 converts exactly. */
INLINE vector_f32 load_weight_part(const void *w, int dtype, size_t at) {
#if defined(__AVX512F__)
    if (dtype == WEIGHT_BF16)
        return (vector_f32)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)((const uint16_t *)w + at))), 16);
    if (dtype == WEIGHT_INT8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)((const int8_t *)w + at))));
#elif defined(__AVX2__)
    if (dtype == WEIGHT_BF16)
        return (vector_f32)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)((const uint16_t *)w + at))), 16);
    if (dtype == WEIGHT_INT8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const void *)((const int8_t *)w + at))));
#else
    if (dtype == WEIGHT_BF16) {
        vector_u16 h;
        memcpy(&h, (const uint16_t *)w + at, sizeof h);
        return (vector_f32)(__builtin_convertvector(h, vector_u32) << 16);
    }
    if (dtype == WEIGHT_INT8) {
        vector_i8 c;
        memcpy(&c, (const int8_t *)w + at, sizeof c);
        return __builtin_convertvector(__builtin_convertvector(c, vector_i32), vector_f32);
    }
#endif
    vector_f32 v;
    memcpy(&v, (const float *)w + at, sizeof v);
    return v;
}

INLINE lanes load_weights(const void *w, int dtype, size_t at) {
    lanes v;
    for (int p = 0; p < PARTS; p++) v.part[p] = load_weight_part(w, dtype, at + (size_t)p * WIDTH);
    return v;
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

/* Tokens per pass over the head's weights: 2 x HEAD_PASS_TOKENS accumulators stay in registers. */
#if defined(__AVX512F__)
#define HEAD_PASS_TOKENS 8
#else
#define HEAD_PASS_TOKENS 4
#endif

/* With more than 2 tokens a block of rows goes over the inputs a chunk at a time, so that the tokens'
 * chunk of x (8 x 256 fp32: 8 KB) stays in L1 while the block's rows use it; the partial sums wait in
 * memory between chunks. With 1 or 2 tokens x fits whole and each row streams in one go (one stream at a
 * time: interleaving rows' streams measured slower). */
#define HEAD_BLOCK_ROWS 8
#define HEAD_CHUNK_INPUTS(M) ((M) <= 2 ? 1 << 30 : 256)

/* A row's partial sums for one token: two sets of LANES, for even and odd steps of LANES inputs (two
 * independent chains of adds); the logit is lane_total(even + odd). */
typedef struct {
    lanes even, odd;
} head_sums;

/* acc[m] += W[v, k] * x[m, k] over inputs [k_begin, k_end) (whole pairs of LANES steps from an even
 * step) for M tokens (a constant after inlining): each weight vector is widened once for all tokens. */
INLINE void head_tile(const void *w, int dtype, int v, int k_begin, int k_end, int K, const float *x, int M,
                      head_sums *acc) {
    head_sums sums[HEAD_PASS_TOKENS];
    for (int m = 0; m < M; m++) sums[m] = acc[m];
    const size_t row = (size_t)v * K;
    for (int k = k_begin; k < k_end; k += 2 * LANES) {
        lanes even = load_weights(w, dtype, row + k), odd = load_weights(w, dtype, row + k + LANES);
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            lanes x_even = load_f32(x + (size_t)m * K + k), x_odd = load_f32(x + (size_t)m * K + k + LANES);
            multiply_add(&sums[m].even, &even, &x_even);
            multiply_add(&sums[m].odd, &odd, &x_odd);
        }
    }
    for (int m = 0; m < M; m++) acc[m] = sums[m];
}

/* out[m * V + v] = sum_k W[v, k] * x[m, k] * scale for rows v_begin .. v_end. Each lane of each set is
 * summed in input order whatever the blocking, so a logit depends neither on the batch nor on the
 * instruction set. */
INLINE void head_span(const void *w, int dtype, const float *scales, int K, const float *x, int M, int V, int v_begin,
                      int v_end, float *out) {
    const int pairs = K / (2 * LANES) * 2 * LANES;
    head_sums acc[HEAD_BLOCK_ROWS][HEAD_PASS_TOKENS];
    for (int v0 = v_begin; v0 < v_end; v0 += HEAD_BLOCK_ROWS) {
        int rows = v_end - v0 < HEAD_BLOCK_ROWS ? v_end - v0 : HEAD_BLOCK_ROWS;
        memset(acc, 0, sizeof acc);
        for (int k0 = 0; k0 < pairs; k0 += HEAD_CHUNK_INPUTS(M)) {
            int k1 = pairs - k0 < HEAD_CHUNK_INPUTS(M) ? pairs : k0 + HEAD_CHUNK_INPUTS(M);
            for (int r = 0; r < rows; r++) head_tile(w, dtype, v0 + r, k0, k1, K, x, M, acc[r]);
        }
        for (int r = 0; r < rows; r++) {
            size_t base = (size_t)(v0 + r) * K;
            for (int m = 0; m < M; m++) {
                lanes *even = &acc[r][m].even, *odd = &acc[r][m].odd;
                for (int l = 0; pairs + l < K; l++)  /* the tail: even lanes, then odd ones */
                    (l < LANES ? even : odd)->part[l % LANES / WIDTH][l % WIDTH] +=
                        weight_at(w, dtype, base + pairs + l) * x[(size_t)m * K + pairs + l];
                for (int p = 0; p < PARTS; p++) even->part[p] += odd->part[p];
                out[(size_t)m * V + v0 + r] = lane_total(*even) * (scales ? scales[v0 + r] : 1.0f);
            }
        }
    }
}

#define HEAD_TOKENS_CASE(DT, MM) \
    case MM: head_span(w, DT, scales, K, xm, MM, V, v_begin, v_end, om); break;

#if HEAD_PASS_TOKENS == 8
#define HEAD_DTYPE(DT) \
    switch (tokens) { \
    HEAD_TOKENS_CASE(DT, 1) HEAD_TOKENS_CASE(DT, 2) HEAD_TOKENS_CASE(DT, 3) HEAD_TOKENS_CASE(DT, 4) \
    HEAD_TOKENS_CASE(DT, 5) HEAD_TOKENS_CASE(DT, 6) HEAD_TOKENS_CASE(DT, 7) default: HEAD_TOKENS_CASE(DT, 8) \
    }
#else
#define HEAD_DTYPE(DT) \
    switch (tokens) { \
    HEAD_TOKENS_CASE(DT, 1) HEAD_TOKENS_CASE(DT, 2) HEAD_TOKENS_CASE(DT, 3) default: HEAD_TOKENS_CASE(DT, 4) \
    }
#endif

/* Up to HEAD_PASS_TOKENS tokens per pass over the weights. */
void NAME(head_rows)(const void *w, int dtype, const float *scales, int K, const float *x, int M, int V,
                     int v_begin, int v_end, float *out) {
    for (int m0 = 0; m0 < M; m0 += HEAD_PASS_TOKENS) {
        int tokens = M - m0 < HEAD_PASS_TOKENS ? M - m0 : HEAD_PASS_TOKENS;
        const float *xm = x + (size_t)m0 * K;
        float *om = out + (size_t)m0 * V;
        switch (dtype) {
        case WEIGHT_BF16: HEAD_DTYPE(WEIGHT_BF16) break;
        case WEIGHT_F32: HEAD_DTYPE(WEIGHT_F32) break;
        default: HEAD_DTYPE(WEIGHT_INT8) break;
        }
    }
}

/* scores[i * stride + n] = q_i . key_n for H heads' q (dim floats apart) and N keys (H, N constants after
 * inlining), each in LANES partial sums added by lane_total: each key load serves every head. */
#define KEYS_PER_PASS 2
INLINE void dots(const float *q, int H, const float *keys, int N, int dim, float *scores, size_t stride) {
    lanes acc[MAX_HEADS_PER_TASK][KEYS_PER_PASS];
    memset(acc, 0, sizeof acc);
    int k = 0;
    for (; k + LANES <= dim; k += LANES) {
        lanes qv[MAX_HEADS_PER_TASK];
        for (int i = 0; i < H; i++) qv[i] = load_f32(q + (size_t)i * dim + k);
        for (int n = 0; n < N; n++) {
            lanes kv = load_f32(keys + (size_t)n * dim + k);
            for (int i = 0; i < H; i++) multiply_add(&acc[i][n], &qv[i], &kv);
        }
    }
    for (int i = 0; i < H; i++)
        for (int n = 0; n < N; n++) {
            for (int l = 0; k + l < dim; l++)
                acc[i][n].part[l / WIDTH][l % WIDTH] += q[(size_t)i * dim + k + l] * keys[(size_t)n * dim + k + l];
            scores[i * stride + n] = lane_total(acc[i][n]);
        }
}

/* o_i = sum_j p_i[j] * values[j] in j order from zero, for H heads (p rows `stride` apart, o rows dim apart)
 * and V vectors of LANES (H, V constants after inlining): the sums stay in registers, each value load
 * serves every head. */
INLINE void weigh(const float *values, const float *p, size_t stride, int length, int H, int V, float *o, int dim) {
    lanes acc[MAX_HEADS_PER_TASK][8];
    memset(acc, 0, sizeof acc);
    for (int j = 0; j < length; j++)
        for (int c = 0; c < V; c++) {
            lanes v = load_f32(values + ((size_t)j * V + c) * LANES);
            for (int i = 0; i < H; i++) {
                lanes pj;
                for (int w = 0; w < PARTS; w++) pj.part[w] = (vector_f32){0} + p[i * stride + j];
                multiply_add(&acc[i][c], &pj, &v);
            }
        }
    for (int i = 0; i < H; i++) memcpy(o + (size_t)i * dim, acc[i], (size_t)V * sizeof acc[i][0]);
}

/* A row's softmax over its first `length` scores, in place: p = exp_nonpositive(s - max) * (1 / total). */
INLINE void softmax(float *scores, int length) {
    float top = -INFINITY;
    for (int j = 0; j < length; j++) top = scores[j] > top ? scores[j] : top;
    for (int j = 0; j < length; j++) scores[j] = exp_nonpositive(scores[j] - top);
    float total = 0.0f;
    for (int j = 0; j < length; j++) total += scores[j];
    float inv = 1.0f / total;
    for (int j = 0; j < length; j++) scores[j] *= inv;
}

#define HEADS_CASE(H, call) \
    if (heads == 1) { const int H = 1; call; } else { const int H = 2; call; }

/* Task = (token, heads_per_task heads of one kv head): their scores, softmax and weighted sum of values. */
void NAME(attention_tasks)(const struct attention_args *a, int task_begin, int task_end, float *scores,
                           size_t stride) {
    const int dim = a->head_dim, heads = attention_heads_per_task(a->group), tasks_per_token = a->heads / heads;
    for (int task = task_begin; task < task_end; task++) {
        int t = task / tasks_per_token, h = task % tasks_per_token * heads;
        int length = a->start + t + 1;  /* causal: token t sees positions 0 .. start + t */
        const float *q = a->q + (size_t)t * a->q_stride + (size_t)h * dim;
        const float *keys = a->keys + (size_t)(h / a->group) * a->head_stride;
        const float *values = a->values + (size_t)(h / a->group) * a->head_stride;
        int j = 0;
        for (; j + KEYS_PER_PASS <= length; j += KEYS_PER_PASS)
            HEADS_CASE(H, dots(q, H, keys + (size_t)j * dim, KEYS_PER_PASS, dim, scores + j, stride))
        for (; j < length; j++) HEADS_CASE(H, dots(q, H, keys + (size_t)j * dim, 1, dim, scores + j, stride))
        for (int i = 0; i < heads; i++) {
            float *row = scores + i * stride;
            for (j = 0; j < length; j++) row[j] *= a->scale;
            softmax(row, length);
        }
        float *o = a->out + ((size_t)t * a->heads + h) * dim;
        if (dim == 64) {
            HEADS_CASE(H, weigh(values, scores, stride, length, H, 4, o, dim))
        } else if (dim == 128) {
            HEADS_CASE(H, weigh(values, scores, stride, length, H, 8, o, dim))
        } else {
            for (int i = 0; i < heads; i++) {
                float *oi = o + (size_t)i * dim, *p = scores + i * stride;
                for (int d = 0; d < dim; d++) oi[d] = 0.0f;
                for (j = 0; j < length; j++)
                    for (int d = 0; d < dim; d++) oi[d] += p[j] * values[(size_t)j * dim + d];
            }
        }
    }
}

INLINE float sum_of_squares(const float *x, int k) {
    lanes acc;
    memset(&acc, 0, sizeof acc);
    int i = 0;
    for (; i + LANES <= k; i += LANES) {
        lanes v = load_f32(x + i);
        multiply_add(&acc, &v, &v);
    }
    for (int l = 0; i + l < k; l++) acc.part[l / WIDTH][l % WIDTH] += x[i + l] * x[i + l];
    float total = 0.0f;
    for (int l = 0; l < LANES; l++) total += lane_at(&acc, l);
    return total;
}

/* WIDTH lanes at a time, the tail one by one with the same per-element arithmetic: every copy gives the
 * same floats whatever its width. Comparisons give lane masks (all ones or zeros); select(m, a, b) is
 * m ? a : b lane by lane. */
INLINE vector_f32 load_vector(const float *at) {
    vector_f32 v;
    memcpy(&v, at, sizeof v);
    return v;
}

INLINE vector_f32 select(vector_i32 mask, vector_f32 a, vector_f32 b) {
    return (vector_f32)(((vector_i32)a & mask) | ((vector_i32)b & ~mask));
}

/* One row's input to a projection: relu(gate)^2 * up when gated (row = [gate | up]), else the row; then,
 * with a norm weight, HF's RMSNorm: w * (x * rsqrt(mean(x^2) + eps)), all in fp32. */
void NAME(prepare_row)(const float *row, int k, int gated, const float *norm_w, float eps, float *y) {
    int i = 0;
    if (gated) {
        for (; i + WIDTH <= k; i += WIDTH) {
            vector_f32 gate = load_vector(row + i), g = select(gate > 0.0f, gate, (vector_f32){0});
            vector_f32 out = g * g * load_vector(row + k + i);
            memcpy(y + i, &out, sizeof out);
        }
        for (; i < k; i++) {
            float g = row[i] > 0.0f ? row[i] : 0.0f;
            y[i] = g * g * row[k + i];
        }
    } else {
        memcpy(y, row, (size_t)k * sizeof *y);
    }
    if (!norm_w) return;
    float inv = 1.0f / sqrtf(sum_of_squares(y, k) / (float)k + eps);
    for (i = 0; i + WIDTH <= k; i += WIDTH) {
        vector_f32 out = load_vector(norm_w + i) * (load_vector(y + i) * inv);
        memcpy(y + i, &out, sizeof out);
    }
    for (; i < k; i++) y[i] = norm_w[i] * (y[i] * inv);
}

/* Round half to even of |v| < 2^22 in the default rounding mode, as nearbyintf: adding 1.5 * 2^23 leaves
 * no fraction bits. (Without -ffast-math the compiler keeps the add and the subtract.) */
#define ROUNDING_SHIFT 12582912.0f

INLINE float clamp_code(float v) { return v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v); }

/* HF's ActQuant: s = 127 / max(absmax, 1e-5), q = clamp(round_half_even(y * s), -128, 127). Clamping before
 * rounding gives the same codes (the bounds are integers) and keeps the rounding trick's range. */
void NAME(quantize_row)(const float *y, int k, int kp, int8_t *q, float *scale, int32_t *sum) {
    const vector_i32 magnitude = (vector_i32){0} + 0x7fffffff;
    vector_f32 tops = {0};
    int i = 0;
    for (; i + WIDTH <= k; i += WIDTH) {
        vector_f32 a = (vector_f32)((vector_i32)load_vector(y + i) & magnitude);
        tops = select(a > tops, a, tops);
    }
    float top = 0.0f;  /* the largest magnitude, whatever the order (NaN never wins a comparison) */
    for (int l = 0; l < WIDTH; l++) top = tops[l] > top ? tops[l] : top;
    for (int j = i; j < k; j++) top = fabsf(y[j]) > top ? fabsf(y[j]) : top;
    float s = 127.0f / (top > 1e-5f ? top : 1e-5f);
    vector_i32 totals = {0};
    for (i = 0; i + WIDTH <= k; i += WIDTH) {
        vector_f32 v = load_vector(y + i) * s;
        v = select(v < -128.0f, (vector_f32){0} - 128.0f, select(v > 127.0f, (vector_f32){0} + 127.0f, v));
        vector_i32 codes = __builtin_convertvector((v + ROUNDING_SHIFT) - ROUNDING_SHIFT, vector_i32);
        vector_i8 narrow = __builtin_convertvector(codes, vector_i8);
        memcpy(q + i, &narrow, sizeof narrow);
        totals += codes;
    }
    int32_t total = 0;
    for (int l = 0; l < WIDTH; l++) total += totals[l];
    for (; i < k; i++) {
        q[i] = (int8_t)((clamp_code(y[i] * s) + ROUNDING_SHIFT) - ROUNDING_SHIFT);
        total += q[i];
    }
    memset(q + k, 0, (size_t)(kp - k));
    *scale = s;
    *sum = total;
}
