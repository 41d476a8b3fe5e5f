/* AVX2 GEMM for many tokens (gemm.h), the same panel as gemm_avx512.c read as 8-row vectors: the micro-kernel
 * holds 2 row vectors x 6 tokens of int16 sums in 12 of the 16 registers. Each step multiplies the codes by 4
 * broadcast activation bytes with vpmaddubsw (lane i of a row: c0 * x0 + c1 * x1 for its pair i % 2 of the
 * quad) and adds that to the int16 accumulator with vpaddw: one multiply-pipe op per 32 multiply-adds, half of
 * vpmaddubsw + vpmaddwd. Exact: with codes 0..2 and x in [-128, 127] a pair sum lies in [-512, 508], never
 * saturated, so a stretch of at most STRETCH_QUADS = 64 quads sums to [-32768, 32512] (all -128 activations
 * against codes 2 reach -32768 exactly), within int16 without wrapping. Each stretch's int16 sums are widened
 * (vpmaddwd by ones: the row's int32 quad sums) and added to int32 sums in memory. */
#include <immintrin.h>
#include <string.h>

#include "gemm.h"
#include "kernels.h"
#include "scratch.h"

#define TOKENS_PER_STEP 6
#define VECTORS_PER_STEP 2
#define STRETCH_QUADS 64
#define ROWS_PER_VECTOR 8
#define INLINE static inline __attribute__((always_inline))
#define UNROLLED _Pragma("GCC unroll 8")

/* Dword q of 8 rows' 32-byte chunks into lane i of out[q] (an 8 x 8 transpose of dwords). */
static inline void transpose_dwords(const __m256i rows[ROWS_PER_VECTOR], __m256i out[ROWS_PER_VECTOR]) {
    __m256i pairs[8], quads[8];
    for (int i = 0; i < 4; i++) {
        pairs[2 * i] = _mm256_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);      /* q 0, 1 | 4, 5 */
        pairs[2 * i + 1] = _mm256_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);  /* q 2, 3 | 6, 7 */
    }
    for (int h = 0; h < 2; h++)  /* rows 4h .. 4h + 3 */
        for (int i = 0; i < 2; i++) {
            quads[4 * h + 2 * i] = _mm256_unpacklo_epi64(pairs[4 * h + i], pairs[4 * h + 2 + i]);      /* q 2i | 2i + 4 */
            quads[4 * h + 2 * i + 1] = _mm256_unpackhi_epi64(pairs[4 * h + i], pairs[4 * h + 2 + i]);  /* q 2i + 1 | 2i + 5 */
        }
    for (int q = 0; q < 4; q++) {
        out[q] = _mm256_permute2x128_si256(quads[q], quads[4 + q], 0x20);
        out[q + 4] = _mm256_permute2x128_si256(quads[q], quads[4 + q], 0x31);
    }
}

/* The panel of rows 64 * block .. + 63, 8 rows (2 row groups) at a time: each block's 8 chunks are loaded and
 * transposed, so that vector q holds dword q of every row's chunk; field f of its bytes is the quad of inputs
 * 32f + 4q .. + 3 of the block. Rows of row groups past the weights get zeros (their sums are not stored). */
static void unpack_panel(const struct gemm_job *job, int block, uint8_t *panel) {
    const __m256i mask = _mm256_set1_epi8(3);
    int groups = (job->n + ROWS_PER_GROUP - 1) / ROWS_PER_GROUP;
    size_t group_bytes = (size_t)job->blocks * GROUP_BLOCK_BYTES;
    for (int b = 0; b < job->blocks; b++)  /* the block's 8 KB of the panel written whole, while in L1 */
        for (int v = 0; v < GEMM_ROWS / ROWS_PER_VECTOR; v++) {
            int first_group = block * (GEMM_ROWS / ROWS_PER_GROUP) + v * 2;
            const uint8_t *chunks = job->packed + (size_t)first_group * group_bytes + (size_t)b * GROUP_BLOCK_BYTES;
            __m256i rows[ROWS_PER_VECTOR], words[ROWS_PER_VECTOR];
            for (int i = 0; i < ROWS_PER_VECTOR; i++)
                rows[i] = first_group + i / 4 < groups
                              ? _mm256_loadu_si256((const __m256i *)(chunks + (i / 4) * group_bytes + (i % 4) * CHUNK_BYTES))
                              : _mm256_setzero_si256();
            transpose_dwords(rows, words);
            for (int q = 0; q < CHUNK_BYTES / 4; q++)
                for (int f = 0; f < 4; f++) {
                    size_t k4 = (size_t)b * (BLOCK_INPUTS / 4) + 8 * f + q;
                    _mm256_store_si256((__m256i *)(panel + (k4 * GEMM_ROWS + (size_t)v * ROWS_PER_VECTOR) * 4),
                                       _mm256_and_si256(_mm256_srli_epi32(words[q], 2 * f), mask));
                }
        }
}

/* acc16 + the pair sums of codes . x, written as asm because GCC computes all products of a step first and then
 * spills the accumulators (the edge tiles'; stretch_2x6 below does the full ones). */
INLINE __m256i multiply_add_pairs(__m256i acc16, __m256i codes, __m256i x) {
    __m256i pairs;
    __asm__("vpmaddubsw %[x], %[codes], %[pairs]\n\t"
            "vpaddw %[pairs], %[acc], %[acc]"
            : [acc] "+x"(acc16), [pairs] "=&x"(pairs)
            : [codes] "x"(codes), [x] "x"(x));
    return acc16;
}

/* *sum + the int32 sums of the int16 lane pairs of acc16, in memory: the int32 sums kept in registers as well
 * would push accumulators out of the micro-tile's 16 registers. */
INLINE void widen_add(__m256i *sum, __m256i acc16) {
    static const int16_t ones[16] __attribute__((aligned(32))) = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    __asm__("vpmaddwd %[ones], %[acc16], %[acc16]\n\t"
            "vpaddd %[sum], %[acc16], %[acc16]\n\t"
            "vmovdqa %[acc16], %[sum]"
            : [acc16] "+x"(acc16), [sum] "+m"(*sum)
            : [ones] "m"(ones));
}

/* One token of the 2 x 6 stretch below: broadcast its quad into ymm14, add its pair sums (ymm15 the product)
 * to both row vectors' lanes (codes in ymm12, ymm13). */
#define TOKEN_STEP(quad, a, b) \
    "vpbroadcastd " quad ", %%ymm14\n\t" \
    "vpmaddubsw %%ymm14, %%ymm12, %%ymm15\n\t" \
    "vpaddw %%ymm15, %[" a "], %[" a "]\n\t" \
    "vpmaddubsw %%ymm14, %%ymm13, %%ymm14\n\t" \
    "vpaddw %%ymm14, %[" b "], %[" b "]\n\t"

/* The full tile's stretch (2 row vectors x 6 tokens, `quads` > 0 quads) in asm: 12 accumulators, 2 code
 * vectors, the broadcast and a product take all 16 registers, which GCC's allocator does not manage (it spills
 * an accumulator to the stack every step). r11 points at the fourth token's activations. */
INLINE void stretch_2x6(__m256i acc16[VECTORS_PER_STEP][TOKENS_PER_STEP], const uint8_t *codes, const int8_t *x, size_t stride, int quads) {
    const uint8_t *end = codes + (size_t)quads * GEMM_ROWS * 4;
    __asm__("lea (%[x],%[stride],2), %%r11\n\t"
            "add %[stride], %%r11\n\t"
            "1:\n\t"
            "vmovdqa (%[codes]), %%ymm12\n\t"
            "vmovdqa 32(%[codes]), %%ymm13\n\t"
            TOKEN_STEP("(%[x])", "a0", "b0")
            TOKEN_STEP("(%[x],%[stride])", "a1", "b1")
            TOKEN_STEP("(%[x],%[stride],2)", "a2", "b2")
            TOKEN_STEP("(%%r11)", "a3", "b3")
            TOKEN_STEP("(%%r11,%[stride])", "a4", "b4")
            TOKEN_STEP("(%%r11,%[stride],2)", "a5", "b5")
            "add $256, %[codes]\n\t"
            "add $4, %[x]\n\t"
            "add $4, %%r11\n\t"
            "cmp %[end], %[codes]\n\t"
            "jne 1b"
            : [a0] "+x"(acc16[0][0]), [a1] "+x"(acc16[0][1]), [a2] "+x"(acc16[0][2]), [a3] "+x"(acc16[0][3]),
              [a4] "+x"(acc16[0][4]), [a5] "+x"(acc16[0][5]), [b0] "+x"(acc16[1][0]), [b1] "+x"(acc16[1][1]),
              [b2] "+x"(acc16[1][2]), [b3] "+x"(acc16[1][3]), [b4] "+x"(acc16[1][4]), [b5] "+x"(acc16[1][5]),
              [codes] "+r"(codes), [x] "+r"(x)
            : [stride] "r"(stride), [end] "r"(end)
            : "r11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
}

INLINE __m256i broadcast_quad(const int8_t *x) {
    int32_t quad;
    memcpy(&quad, x, sizeof quad);
    return _mm256_set1_epi32(quad);
}

/* Rows row0 .. row0 + 8V - 1 (V vectors from panel column `first_vector`) x T tokens; V, T constants after
 * inlining. The int16 pair sums of a stretch of STRETCH_QUADS quads are widened into int32 once per stretch. */
INLINE void micro_tile(const struct gemm_job *job, const uint8_t *panel, int first_vector, int row0, int token0,
                       int V, int T) {
    __m256i acc[VECTORS_PER_STEP][TOKENS_PER_STEP];
    UNROLLED for (int v = 0; v < V; v++)
        UNROLLED for (int t = 0; t < T; t++) acc[v][t] = _mm256_setzero_si256();
    const int8_t *x = job->x + (size_t)token0 * job->x_stride;
    const uint8_t *column = panel + (size_t)first_vector * ROWS_PER_VECTOR * 4;
    int quads = job->blocks * (BLOCK_INPUTS / 4);
    for (int s0 = 0; s0 < quads; s0 += STRETCH_QUADS) {
        int s1 = quads - s0 < STRETCH_QUADS ? quads : s0 + STRETCH_QUADS;
        __m256i acc16[VECTORS_PER_STEP][TOKENS_PER_STEP];
        UNROLLED for (int v = 0; v < V; v++)
            UNROLLED for (int t = 0; t < T; t++) acc16[v][t] = _mm256_setzero_si256();
        if (V == 2 && T == 6) {
            stretch_2x6(acc16, column + (size_t)s0 * GEMM_ROWS * 4, x + 4 * s0, job->x_stride, s1 - s0);
        } else {
            for (int k4 = s0; k4 < s1; k4++) {
                __m256i w[VECTORS_PER_STEP];
                UNROLLED for (int v = 0; v < V; v++)
                    w[v] = _mm256_load_si256((const __m256i *)(column + ((size_t)k4 * GEMM_ROWS + v * ROWS_PER_VECTOR) * 4));
                UNROLLED for (int t = 0; t < T; t++) {
                    __m256i xs = broadcast_quad(x + t * job->x_stride + 4 * k4);
                    UNROLLED for (int v = 0; v < V; v++) acc16[v][t] = multiply_add_pairs(acc16[v][t], w[v], xs);
                }
            }
        }
        UNROLLED for (int v = 0; v < V; v++)
            UNROLLED for (int t = 0; t < T; t++) widen_add(&acc[v][t], acc16[v][t]);
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
    case 4: micro_tile(job, panel, v0, row0, t0, V, 4); break; \
    case 5: micro_tile(job, panel, v0, row0, t0, V, 5); break; \
    default: micro_tile(job, panel, v0, row0, t0, V, 6); break; \
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
