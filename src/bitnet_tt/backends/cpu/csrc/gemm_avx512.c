/* AVX-512 VNNI GEMM for many tokens (gemm.h): a 64-row panel of unpacked codes, reused by every token;
 * the micro-kernel holds 4 row vectors x 6 tokens of int32 sums in 24 registers, so each step of 4 inputs
 * is 4 panel loads, 6 activation broadcasts and 24 vpdpbusd. Sums are exact int32 (|sum| <= 2 * 128 * K). */
#include <immintrin.h>
#include <string.h>

#include "gemm.h"
#include "kernels.h"
#include "scratch.h"
#include "vnni_avx512.h"

#define TOKENS_PER_STEP 6
#define INLINE static inline __attribute__((always_inline))
#define UNROLLED _Pragma("GCC unroll 8")

/* Unpack rows 64 * block .. + 63 into the panel: for each vector of 16 rows (4 row groups), gather dword q of
 * every row's 32-byte chunk of a block; field f of its bytes holds inputs 32f + 4q .. + 3 of the block. */
static void unpack_panel(const struct gemm_job *job, int block, uint8_t *panel) {
    const __m512i mask = _mm512_set1_epi8(3);
    int groups = (job->n + ROWS_PER_GROUP - 1) / ROWS_PER_GROUP;
    size_t group_bytes = (size_t)job->blocks * GROUP_BLOCK_BYTES;
    int lane_offsets[16];
    for (int i = 0; i < 16; i++) lane_offsets[i] = (int)((i / 4) * group_bytes + (i % 4) * CHUNK_BYTES);
    __m512i index = _mm512_loadu_si512(lane_offsets);
    for (int v = 0; v < PANEL_VECTORS; v++) {
        int first_group = block * (GEMM_ROWS / ROWS_PER_GROUP) + v * 4;
        int present = groups - first_group;
        __mmask16 lanes = present >= 4 ? 0xffff : present <= 0 ? 0 : (__mmask16)((1u << (4 * present)) - 1);
        const uint8_t *base = job->packed + (size_t)first_group * group_bytes;
        for (int b = 0; b < job->blocks; b++)
            for (int q = 0; q < CHUNK_BYTES / 4; q++) {
                __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, index,
                                                            base + (size_t)b * GROUP_BLOCK_BYTES + 4 * q, 1);
                for (int f = 0; f < 4; f++) {
                    size_t k4 = (size_t)b * (BLOCK_INPUTS / 4) + 8 * f + q;
                    _mm512_store_si512(panel + (k4 * PANEL_VECTORS + v) * 64,
                                       _mm512_and_si512(_mm512_srli_epi32(words, 2 * f), mask));
                }
            }
    }
}

INLINE __m512i broadcast_quad(const int8_t *x) {
    int32_t quad;
    memcpy(&quad, x, sizeof quad);
    return _mm512_set1_epi32(quad);
}

/* Sums of V row vectors x T tokens (constants after inlining) over all inputs, then the epilogue. */
INLINE void micro_tile(const struct gemm_job *job, const uint8_t *panel, int row0, int token0, int V, int T) {
    __m512i acc[PANEL_VECTORS][TOKENS_PER_STEP];
    UNROLLED for (int v = 0; v < V; v++)
        UNROLLED for (int t = 0; t < T; t++) acc[v][t] = _mm512_setzero_si512();
    const int8_t *x = job->x + (size_t)token0 * job->x_stride;
    int quads = job->blocks * (BLOCK_INPUTS / 4);
    for (int k4 = 0; k4 < quads; k4++) {
        __m512i w[PANEL_VECTORS];
        UNROLLED for (int v = 0; v < V; v++) w[v] = _mm512_load_si512(panel + ((size_t)k4 * PANEL_VECTORS + v) * 64);
        UNROLLED for (int t = 0; t < T; t++) {
            __m512i xs = broadcast_quad(x + t * job->x_stride + 4 * k4);
            UNROLLED for (int v = 0; v < V; v++) acc[v][t] = multiply_add(acc[v][t], w[v], xs);
        }
    }
    UNROLLED for (int v = 0; v < V; v++) {
        int row = row0 + 16 * v;
        __mmask16 store = job->n - row >= 16 ? 0xffff : (__mmask16)((1u << (job->n - row)) - 1);
        __m512 w_scale = job->mode == MATMUL_INT32 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(store, job->w_scale + row);
        UNROLLED for (int t = 0; t < T; t++) {
            int token = token0 + t;
            __m512i exact = _mm512_sub_epi32(acc[v][t], _mm512_set1_epi32(job->x_sum[token]));
            size_t at = (size_t)token * job->n + row;
            if (job->mode == MATMUL_INT32) {
                _mm512_mask_storeu_epi32((int32_t *)job->out + at, store, exact);
                continue;
            }
            /* The golden model's order: int32 -> fp32, / activation scale, * weight scale. */
            __m512 y = _mm512_mul_ps(_mm512_div_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(job->x_scale[token])), w_scale);
            float *out = (float *)job->out + at;
            if (job->mode == MATMUL_ADD) y = _mm512_add_ps(_mm512_maskz_loadu_ps(store, out), y);
            _mm512_mask_storeu_ps(out, store, y);
        }
    }
}

#define TOKENS_CASES(V) \
    switch (tokens) { \
    case 1: micro_tile(job, panel, row0, t0, V, 1); break; \
    case 2: micro_tile(job, panel, row0, t0, V, 2); break; \
    case 3: micro_tile(job, panel, row0, t0, V, 3); break; \
    case 4: micro_tile(job, panel, row0, t0, V, 4); break; \
    case 5: micro_tile(job, panel, row0, t0, V, 5); break; \
    default: micro_tile(job, panel, row0, t0, V, 6); break; \
    }

void gemm_avx512(void *ctx, int block_begin, int block_end) {
    const struct gemm_job *job = ctx;
    uint8_t *panel = thread_scratch(SCRATCH_GEMM_PANEL, (size_t)job->blocks * BLOCK_INPUTS * GEMM_ROWS);
    for (int block = block_begin; block < block_end; block++) {
        unpack_panel(job, block, panel);
        int row0 = block * GEMM_ROWS, vectors = (job->n - row0 + 15) / 16;
        for (int t0 = 0; t0 < job->m; t0 += TOKENS_PER_STEP) {
            int tokens = job->m - t0 < TOKENS_PER_STEP ? job->m - t0 : TOKENS_PER_STEP;
            switch (vectors) {
            case 1: TOKENS_CASES(1) break;
            case 2: TOKENS_CASES(2) break;
            case 3: TOKENS_CASES(3) break;
            default: TOKENS_CASES(4) break;
            }
        }
    }
}
