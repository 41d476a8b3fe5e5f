/* AVX2 tile kernel: maddubs of the unsigned codes (0..2) against int8 activations into int16 sums.
 * A block adds at most 4 * 2 * 2 * 128 = 2048 in magnitude to an int16 lane, so 16 blocks stay exact
 * (|sum| <= 32768, the negative end reached only by all -128 activations); then the sums widen to int32. */
#include <immintrin.h>

#include "kernels.h"

#define INT16_BLOCKS 16
#define PREFETCH_BYTES 2048

static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* Rows [first, first + R) of the group times T tokens; R and T are constants after inlining. */
static inline __attribute__((always_inline)) void rows_tokens(const uint8_t *group, int blocks, const int8_t *x,
                                                              size_t x_stride, int first, int R, int T, int32_t *out) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i wide[4][MAX_TILE_TOKENS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) wide[r][t] = _mm256_setzero_si256();
    for (int start = 0; start < blocks; start += INT16_BLOCKS) {
        int end = start + INT16_BLOCKS < blocks ? start + INT16_BLOCKS : blocks;
        __m256i acc[4][MAX_TILE_TOKENS];
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_si256();
        for (int b = start; b < end; b++) {
            const uint8_t *chunks = group + (size_t)b * GROUP_BLOCK_BYTES;
            _mm_prefetch((const char *)chunks + PREFETCH_BYTES, _MM_HINT_T0);
            _mm_prefetch((const char *)chunks + PREFETCH_BYTES + 64, _MM_HINT_T0);
            for (int r = 0; r < R; r++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(chunks + (first + r) * CHUNK_BYTES));
                for (int f = 0; f < 4; f++) {
                    __m256i codes = _mm256_and_si256(_mm256_srli_epi16(v, 2 * f), mask);
                    for (int t = 0; t < T; t++) {
                        const __m256i *xb = (const __m256i *)(x + t * x_stride + (size_t)b * BLOCK_INPUTS + 32 * f);
                        acc[r][t] = _mm256_add_epi16(acc[r][t], _mm256_maddubs_epi16(codes, _mm256_loadu_si256(xb)));
                    }
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) wide[r][t] = _mm256_add_epi32(wide[r][t], _mm256_madd_epi16(acc[r][t], ones));
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[t * ROWS_PER_GROUP + first + r] = hsum_epi32(wide[r][t]);
}

#define ONE_ROW_CASE(T) \
    case T: \
        for (int r = 0; r < ROWS_PER_GROUP; r++) rows_tokens(group, blocks, x, x_stride, r, 1, T, out); \
        break;

void tile_avx2(const uint8_t *group, int blocks, const int8_t *x, size_t x_stride, int tokens, int32_t *out) {
    switch (tokens) {
    case 1: rows_tokens(group, blocks, x, x_stride, 0, 4, 1, out); break;
    ONE_ROW_CASE(2) ONE_ROW_CASE(3) ONE_ROW_CASE(4) ONE_ROW_CASE(5) ONE_ROW_CASE(6) ONE_ROW_CASE(7) ONE_ROW_CASE(8)
    default: break;
    }
}
