/* Register-blocked GEMM for many tokens (prefill): each 64-row block of the weights is unpacked once
 * into a panel of 8-bit codes and reused for every token, so the work per weight is one multiply-add
 * per token instead of an unpack per tile of 8 tokens.
 *
 * Panel layout (per thread, rows 64 * block .. + 63): for input quad k4 (inputs 4 * k4 .. 4 * k4 + 3) and
 * vector v (rows 16v .. 16v + 15), 64 bytes at panel + (k4 * PANEL_VECTORS + v) * 64: lane i holds the
 * four codes + 1 (0..2) of row 16v + i. A vpdpbusd-style multiply-add against the 4 activation bytes of
 * that quad, broadcast to every lane, then adds one quad of every row's dot product to its own lane:
 * no horizontal sums. */
#ifndef BITNET_CPU_GEMM_H
#define BITNET_CPU_GEMM_H

#include <stddef.h>
#include <stdint.h>

#define GEMM_ROWS 64
#define PANEL_VECTORS (GEMM_ROWS / 16)
/* Below this many tokens the tile kernels (which unpack per tile) are faster: best of 9 of one thread's CPU
 * time over a layer's 2B-4T projections on a Zen 4 (at 16 tokens the GEMM took 1.45x as long on AVX-512;
 * about equal from 48). AVX2, on a Zen 3 (int16 GEMM, transposing unpack): at 12 and 16 tokens the GEMM ran
 * at 123-220 GOP/s against the tiles' 94-168, at 8 tokens 76-120 against 95-106. A step of 8 decoding users
 * and a prefill chunk of 8-32 tokens lands in between. */
#define GEMM_MIN_TOKENS_AVX512 48
#define GEMM_MIN_TOKENS_AVX2 12

enum matmul_mode { MATMUL_INT32 = 0, MATMUL_STORE = 1, MATMUL_ADD = 2 };

struct gemm_job {
    const uint8_t *packed;   /* row-group layout (kernels.h) */
    const int8_t *x;         /* [m, x_stride] */
    const int32_t *x_sum;    /* [m] */
    const float *x_scale, *w_scale;
    void *out;               /* [m, n]: int32 (MATMUL_INT32) or fp32 */
    size_t x_stride;
    int n, m, blocks, mode;
};

/* Row blocks [block_begin, block_end) of GEMM_ROWS rows: a part for parallel_for. */
typedef void (*gemm_part_fn)(void *job, int block_begin, int block_end);

#if defined(__x86_64__) || defined(_M_X64)
void gemm_avx2(void *job, int block_begin, int block_end);
void gemm_avx512(void *job, int block_begin, int block_end);
#endif

#endif
