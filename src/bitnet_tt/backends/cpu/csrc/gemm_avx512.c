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

/* vpermt2d indices of transpose_rows' stages (a lane's source: a lane of the first operand, or 16 + one of the
 * second). Stage 0 [h]: rows 4j .. 4j + 3 of z[2j], z[2j + 1], dwords 4h .. + 3, lane 4 * (dword - 4h) + row;
 * stage 1 [x]: 8 rows from two of those, dwords 2x, 2x + 1 of the 4, lane 8 * (dword - 2x) + row; stage 2 [y]:
 * 16 rows from two of those, the first (y = 0) or second dword. */
static const int32_t TRANSPOSE_INDEX[3][2][16] = {
    {{0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27}, {4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31}},
    {{0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23}, {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31}},
    {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}, {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
};

/* 16 rows' 32-byte chunks of a block (z[k]: rows 2k, 2k + 1, a row's 8 dwords in 8 lanes) -> out[q]: dword q
 * of row i in lane i. Three stages of vpermt2d, 24 in all, instead of a 16-lane gather per q (8): one thread,
 * a 13824 x 2560 product on a Zen 5, 48 tokens 6.1 -> 4.1 ms, 128 11.4 -> 9.7, 512 37.8 -> 36.1 (the unpack
 * is paid once per 64 rows, whatever the tokens). */
INLINE void transpose_rows(const __m512i z[8], const __m512i index[3][2], __m512i out[8]) {
    __m512i quarter[2][4], half[2][4];  /* [dwords 4h ..][rows 4j ..]; [h][rows 0-7 or 8-15 (+2), dword pair x] */
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++) quarter[h][j] = _mm512_permutex2var_epi32(z[2 * j], index[0][h], z[2 * j + 1]);
    for (int h = 0; h < 2; h++)
        for (int x = 0; x < 2; x++) {
            half[h][x] = _mm512_permutex2var_epi32(quarter[h][0], index[1][x], quarter[h][1]);
            half[h][2 + x] = _mm512_permutex2var_epi32(quarter[h][2], index[1][x], quarter[h][3]);
        }
    for (int q = 0; q < 8; q++)
        out[q] = _mm512_permutex2var_epi32(half[q / 4][q % 4 / 2], index[2][q % 2], half[q / 4][2 + q % 4 / 2]);
}

/* Unpack rows 64 * block .. + 63 into the panel: for each vector of 16 rows (4 row groups), dword q of every
 * row's 32-byte chunk of a block (transpose_rows); field f of its bytes holds inputs 32f + 4q .. + 3 of the
 * block. Rows of row groups past the weights get zeros (their sums are not stored). Not inlined: inlined into
 * gemm_avx512, it made the micro-kernels' loops slower (same thread, 512 tokens: 49 ms against 36). */
__attribute__((noinline)) static void unpack_panel(const struct gemm_job *job, int block, uint8_t *panel) {
    const __m512i mask = _mm512_set1_epi8(3);
    int groups = (job->n + ROWS_PER_GROUP - 1) / ROWS_PER_GROUP;
    size_t group_bytes = (size_t)job->blocks * GROUP_BLOCK_BYTES;
    __m512i index[3][2];
    for (int stage = 0; stage < 3; stage++)
        for (int i = 0; i < 2; i++) index[stage][i] = _mm512_loadu_si512(TRANSPOSE_INDEX[stage][i]);
    for (int v = 0; v < PANEL_VECTORS; v++) {
        int first_group = block * (GEMM_ROWS / ROWS_PER_GROUP) + v * 4;
        const uint8_t *base = job->packed + (size_t)first_group * group_bytes;
        for (int b = 0; b < job->blocks; b++) {
            __m512i z[8], words[8];
            for (int k = 0; k < 8; k++)  /* group k / 2's rows 2 (k % 2) .. + 1 */
                z[k] = first_group + k / 2 < groups
                           ? _mm512_loadu_si512(base + (k / 2) * group_bytes + (size_t)b * GROUP_BLOCK_BYTES + (k % 2) * 64)
                           : _mm512_setzero_si512();
            transpose_rows(z, index, words);
            for (int q = 0; q < CHUNK_BYTES / 4; q++)
                for (int f = 0; f < 4; f++) {
                    size_t k4 = (size_t)b * (BLOCK_INPUTS / 4) + 8 * f + q;
                    _mm512_store_si512(panel + (k4 * PANEL_VECTORS + v) * 64,
                                       _mm512_and_si512(_mm512_srli_epi32(words[q], 2 * f), mask));
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
