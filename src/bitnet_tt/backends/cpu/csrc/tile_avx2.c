/* AVX2 tile kernel: maddubs of the unsigned codes (0..2) against int8 activations into int16 sums.
 * A block adds at most 4 * 2 * 2 * 128 = 2048 in magnitude to an int16 lane, so 16 blocks stay exact
 * (|sum| <= 32768, the negative end reached only by all -128 activations); then the sums widen to int32.
 *
 * One token: the 4 rows together (a block's 4 activation loads serve all of them). More tokens: one row
 * at a time with every token, so that a field is unpacked once for all tokens (8 tokens: 8 accumulators,
 * 4 unpacks per 32 maddubs), and, for each stretch of 16 blocks, the rows one after another so that the
 * stretch's activations (16 KB at 8 tokens) stay in L1 for all 4 rows.
 *
 * The empty asm after each add keeps every accumulator's adds in program order: without it GCC
 * reassociates a block's int16 adds into trees over all its maddubs, which needs more than the 16 ymm
 * registers at 4+ tokens and spilled (8 tokens: 1.26x the time; exactness is unaffected either way, the
 * sums being exact integers). */
#include <immintrin.h>

#include "kernels.h"

#define INT16_BLOCKS 16
#define PREFETCH_BYTES 2048

/* The 4 rows' int32 sums of one token, in row order. */
static inline __m128i row_sums(const __m256i *rows) {
    __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(rows[0], rows[1]), _mm256_hadd_epi32(rows[2], rows[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

/* Rows [first, first + R) times T tokens over blocks [start, end) (at most INT16_BLOCKS), added to the
 * int32 sums wide[t * 4 + row]; R and T are constants after inlining. */
static inline __attribute__((always_inline)) void stretch(const uint8_t *group, int start, int end, const int8_t *x,
                                                          size_t x_stride, int first, int R, int T, __m256i *wide) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc[ROWS_PER_GROUP][MAX_TILE_TOKENS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_si256();
    for (int b = start; b < end; b++) {
        const uint8_t *chunks = group + (size_t)b * GROUP_BLOCK_BYTES;
        if (first == 0) {
            _mm_prefetch((const char *)chunks + PREFETCH_BYTES, _MM_HINT_T0);
            _mm_prefetch((const char *)chunks + PREFETCH_BYTES + 64, _MM_HINT_T0);
        }
        __m256i v[ROWS_PER_GROUP];
        for (int r = 0; r < R; r++) v[r] = _mm256_loadu_si256((const __m256i *)(chunks + (first + r) * CHUNK_BYTES));
        for (int f = 0; f < 4; f++) {
            __m256i codes[ROWS_PER_GROUP];
            for (int r = 0; r < R; r++) codes[r] = _mm256_and_si256(_mm256_srli_epi16(v[r], 2 * f), mask);
            for (int t = 0; t < T; t++) {
                __m256i xs = _mm256_loadu_si256((const __m256i *)(x + t * x_stride + (size_t)b * BLOCK_INPUTS + 32 * f));
                for (int r = 0; r < R; r++) {
                    acc[r][t] = _mm256_add_epi16(acc[r][t], _mm256_maddubs_epi16(codes[r], xs));
                    __asm__("" : "+x"(acc[r][t]));
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            __m256i *sum = &wide[t * ROWS_PER_GROUP + first + r];
            *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(acc[r][t], ones));
        }
}

/* The group's 4 rows, R at a time, times T tokens. */
static inline __attribute__((always_inline)) void group_tokens(const uint8_t *group, int blocks, const int8_t *x,
                                                               size_t x_stride, int R, int T, int32_t *out) {
    __m256i wide[MAX_TILE_TOKENS * ROWS_PER_GROUP];
    for (int i = 0; i < T * ROWS_PER_GROUP; i++) wide[i] = _mm256_setzero_si256();
    for (int start = 0; start < blocks; start += INT16_BLOCKS) {
        int end = start + INT16_BLOCKS < blocks ? start + INT16_BLOCKS : blocks;
        for (int first = 0; first < ROWS_PER_GROUP; first += R)
            stretch(group, start, end, x, x_stride, first, R, T, wide);
    }
    for (int t = 0; t < T; t++)
        _mm_storeu_si128((__m128i *)(out + t * ROWS_PER_GROUP), row_sums(wide + t * ROWS_PER_GROUP));
}

#define ONE_ROW_CASE(T) case T: group_tokens(group, blocks, x, x_stride, 1, T, out); break;

void tile_avx2(const uint8_t *group, int blocks, const int8_t *x, size_t x_stride, int tokens, int32_t *out) {
    switch (tokens) {
    case 1: group_tokens(group, blocks, x, x_stride, ROWS_PER_GROUP, 1, out); break;
    ONE_ROW_CASE(2) ONE_ROW_CASE(3) ONE_ROW_CASE(4) ONE_ROW_CASE(5) ONE_ROW_CASE(6) ONE_ROW_CASE(7) ONE_ROW_CASE(8)
    default: break;
    }
}
