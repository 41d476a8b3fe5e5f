/* AVX2 GEMM for many tokens (gemm.h), the same panel as gemm_avx512.c read as 8-row vectors: the micro-kernel
 * holds 2 row vectors x 4 tokens of int32 sums in 8 of the 16 registers. Each step multiplies the codes by 4
 * broadcast activation bytes with vpmaddubsw (a lane c0 * x0 + c1 * x1, codes 0..2: within [-512, 508], never
 * saturated) and vpmaddwd by ones (the quad's sum, int32): exact. */
#include <immintrin.h>
#include <string.h>

#include "gemm.h"
#include "kernels.h"
#include "scratch.h"

#define TOKENS_PER_STEP 4
#define VECTORS_PER_STEP 2
#define ROWS_PER_VECTOR 8
#define INLINE static inline __attribute__((always_inline))
#define UNROLLED _Pragma("GCC unroll 8")

/* As gemm_avx512.c's unpack_panel, 8 rows (2 row groups) per gather. */
static void unpack_panel(const struct gemm_job *job, int block, uint8_t *panel) {
    const __m256i mask = _mm256_set1_epi8(3);
    int groups = (job->n + ROWS_PER_GROUP - 1) / ROWS_PER_GROUP;
    size_t group_bytes = (size_t)job->blocks * GROUP_BLOCK_BYTES;
    int lane_offsets[ROWS_PER_VECTOR];
    for (int i = 0; i < ROWS_PER_VECTOR; i++) lane_offsets[i] = (int)((i / 4) * group_bytes + (i % 4) * CHUNK_BYTES);
    __m256i index = _mm256_loadu_si256((const __m256i *)lane_offsets);
    for (int v = 0; v < GEMM_ROWS / ROWS_PER_VECTOR; v++) {
        int first_group = block * (GEMM_ROWS / ROWS_PER_GROUP) + v * 2;
        int present = groups - first_group;
        __m256i lanes = _mm256_setr_epi32(-(present > 0), -(present > 0), -(present > 0), -(present > 0),
                                          -(present > 1), -(present > 1), -(present > 1), -(present > 1));
        const uint8_t *base = job->packed + (size_t)first_group * group_bytes;
        for (int b = 0; b < job->blocks; b++)
            for (int q = 0; q < CHUNK_BYTES / 4; q++) {
                __m256i words = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(),
                                                            (const int *)(base + (size_t)b * GROUP_BLOCK_BYTES + 4 * q),
                                                            index, lanes, 1);
                for (int f = 0; f < 4; f++) {
                    size_t k4 = (size_t)b * (BLOCK_INPUTS / 4) + 8 * f + q;
                    _mm256_store_si256((__m256i *)(panel + (k4 * GEMM_ROWS + (size_t)v * ROWS_PER_VECTOR) * 4),
                                       _mm256_and_si256(_mm256_srli_epi32(words, 2 * f), mask));
                }
            }
    }
}

/* acc + the quads of codes . x, one temporary register: written as asm because GCC computes all 8 products
 * of a step first and then spills the accumulators; the instructions are the same. */
INLINE __m256i multiply_add(__m256i acc, __m256i codes, __m256i x, __m256i ones) {
    __m256i pairs;
    __asm__("vpmaddubsw %[x], %[codes], %[pairs]\n\t"
            "vpmaddwd %[ones], %[pairs], %[pairs]\n\t"
            "vpaddd %[pairs], %[acc], %[acc]"
            : [acc] "+x"(acc), [pairs] "=&x"(pairs)
            : [codes] "x"(codes), [x] "x"(x), [ones] "x"(ones));
    return acc;
}

INLINE __m256i broadcast_quad(const int8_t *x) {
    int32_t quad;
    memcpy(&quad, x, sizeof quad);
    return _mm256_set1_epi32(quad);
}

/* Rows row0 .. row0 + 8V - 1 (V vectors from panel column `first_vector`) x T tokens; V, T constants after
 * inlining. */
INLINE void micro_tile(const struct gemm_job *job, const uint8_t *panel, int first_vector, int row0, int token0,
                       int V, int T) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[VECTORS_PER_STEP][TOKENS_PER_STEP];
    UNROLLED for (int v = 0; v < V; v++)
        UNROLLED for (int t = 0; t < T; t++) acc[v][t] = _mm256_setzero_si256();
    const int8_t *x = job->x + (size_t)token0 * job->x_stride;
    const uint8_t *column = panel + (size_t)first_vector * ROWS_PER_VECTOR * 4;
    int quads = job->blocks * (BLOCK_INPUTS / 4);
    for (int k4 = 0; k4 < quads; k4++) {
        __m256i w[VECTORS_PER_STEP];
        UNROLLED for (int v = 0; v < V; v++)
            w[v] = _mm256_load_si256((const __m256i *)(column + ((size_t)k4 * GEMM_ROWS + v * ROWS_PER_VECTOR) * 4));
        UNROLLED for (int t = 0; t < T; t++) {
            __m256i xs = broadcast_quad(x + t * job->x_stride + 4 * k4);
            UNROLLED for (int v = 0; v < V; v++)
                acc[v][t] = multiply_add(acc[v][t], w[v], xs, ones);
        }
    }
    UNROLLED for (int v = 0; v < V; v++) {
        int row = row0 + ROWS_PER_VECTOR * v;
        __m256i store = _mm256_cmpgt_epi32(_mm256_set1_epi32(job->n - row), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 w_scale = job->mode == MATMUL_INT32 ? _mm256_setzero_ps() : _mm256_maskload_ps(job->w_scale + row, store);
        UNROLLED for (int t = 0; t < T; t++) {
            int token = token0 + t;
            __m256i exact = _mm256_sub_epi32(acc[v][t], _mm256_set1_epi32(job->x_sum[token]));
            size_t at = (size_t)token * job->n + row;
            if (job->mode == MATMUL_INT32) {
                _mm256_maskstore_epi32((int *)job->out + at, store, exact);
                continue;
            }
            /* The golden model's order: int32 -> fp32, / activation scale, * weight scale. */
            __m256 y = _mm256_mul_ps(_mm256_div_ps(_mm256_cvtepi32_ps(exact), _mm256_set1_ps(job->x_scale[token])), w_scale);
            float *out = (float *)job->out + at;
            if (job->mode == MATMUL_ADD) y = _mm256_add_ps(_mm256_maskload_ps(out, store), y);
            _mm256_maskstore_ps(out, store, y);
        }
    }
}

#define TOKENS_CASES(V) \
    switch (tokens) { \
    case 1: micro_tile(job, panel, v0, row0, t0, V, 1); break; \
    case 2: micro_tile(job, panel, v0, row0, t0, V, 2); break; \
    case 3: micro_tile(job, panel, v0, row0, t0, V, 3); break; \
    default: micro_tile(job, panel, v0, row0, t0, V, 4); break; \
    }

void gemm_avx2(void *ctx, int block_begin, int block_end) {
    const struct gemm_job *job = ctx;
    uint8_t *panel = thread_scratch(SCRATCH_GEMM_PANEL, (size_t)job->blocks * BLOCK_INPUTS * GEMM_ROWS);
    for (int block = block_begin; block < block_end; block++) {
        unpack_panel(job, block, panel);
        int vectors = (job->n - block * GEMM_ROWS + ROWS_PER_VECTOR - 1) / ROWS_PER_VECTOR;
        vectors = vectors < GEMM_ROWS / ROWS_PER_VECTOR ? vectors : GEMM_ROWS / ROWS_PER_VECTOR;
        for (int v0 = 0; v0 < vectors; v0 += VECTORS_PER_STEP) {
            int row0 = block * GEMM_ROWS + v0 * ROWS_PER_VECTOR;
            for (int t0 = 0; t0 < job->m; t0 += TOKENS_PER_STEP) {
                int tokens = job->m - t0 < TOKENS_PER_STEP ? job->m - t0 : TOKENS_PER_STEP;
                if (vectors - v0 >= 2) {
                    TOKENS_CASES(2)
                } else {
                    TOKENS_CASES(1)
                }
            }
        }
    }
}
