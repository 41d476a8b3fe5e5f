/* AVX-512 VNNI tile kernel: one 64-byte load holds two rows' chunks of a block; vpdpbusd multiplies the
 * unsigned codes (0..2) by int8 activations broadcast to both halves and accumulates exactly in int32. */
#include <immintrin.h>

#include "kernels.h"

#define PREFETCH_BYTES 2048

static inline int32_t hsum_half(__m512i v, int upper) {
    __m256i h = upper ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* S accumulator sets (fields f with f % S == s): with few tokens, independent chains hide vpdpbusd's latency. */
static inline __attribute__((always_inline)) void group_tokens(const uint8_t *group, int blocks, const int8_t *x,
                                                               size_t x_stride, int T, int32_t *out) {
    enum { MAX_SETS = 4 };
    const int S = T == 1 ? 4 : T == 2 ? 2 : 1;
    const __m512i mask = _mm512_set1_epi8(3);
    __m512i acc[MAX_SETS][2][MAX_TILE_TOKENS];
    for (int s = 0; s < S; s++)
        for (int t = 0; t < T; t++) acc[s][0][t] = acc[s][1][t] = _mm512_setzero_si512();
    for (int b = 0; b < blocks; b++) {
        const uint8_t *chunks = group + (size_t)b * GROUP_BLOCK_BYTES;
        _mm_prefetch((const char *)chunks + PREFETCH_BYTES, _MM_HINT_T0);
        _mm_prefetch((const char *)chunks + PREFETCH_BYTES + 64, _MM_HINT_T0);
        __m512i pair0 = _mm512_loadu_si512(chunks), pair1 = _mm512_loadu_si512(chunks + 64);
        for (int f = 0; f < 4; f++) {
            __m512i codes0 = _mm512_and_si512(_mm512_srli_epi16(pair0, 2 * f), mask);
            __m512i codes1 = _mm512_and_si512(_mm512_srli_epi16(pair1, 2 * f), mask);
            for (int t = 0; t < T; t++) {
                const __m256i *xb = (const __m256i *)(x + t * x_stride + (size_t)b * BLOCK_INPUTS + 32 * f);
                __m512i xs = _mm512_broadcast_i64x4(_mm256_loadu_si256(xb));
                acc[f % S][0][t] = _mm512_dpbusd_epi32(acc[f % S][0][t], codes0, xs);
                acc[f % S][1][t] = _mm512_dpbusd_epi32(acc[f % S][1][t], codes1, xs);
            }
        }
    }
    for (int s = 1; s < S; s++)
        for (int t = 0; t < T; t++)
            for (int p = 0; p < 2; p++) acc[0][p][t] = _mm512_add_epi32(acc[0][p][t], acc[s][p][t]);
    for (int t = 0; t < T; t++)
        for (int r = 0; r < ROWS_PER_GROUP; r++) out[t * ROWS_PER_GROUP + r] = hsum_half(acc[0][r / 2][t], r % 2);
}

#define TOKENS_CASE(T) case T: group_tokens(group, blocks, x, x_stride, T, out); break;

void tile_avx512(const uint8_t *group, int blocks, const int8_t *x, size_t x_stride, int tokens, int32_t *out) {
    switch (tokens) {
    TOKENS_CASE(1) TOKENS_CASE(2) TOKENS_CASE(3) TOKENS_CASE(4) TOKENS_CASE(5) TOKENS_CASE(6) TOKENS_CASE(7)
    TOKENS_CASE(8)
    default: break;
    }
}
