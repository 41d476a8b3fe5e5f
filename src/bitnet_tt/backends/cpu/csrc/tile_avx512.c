/* AVX-512 VNNI tile kernel: one 64-byte load holds two rows' chunks of a block; vpdpbusd multiplies the
 * unsigned codes by int8 activations broadcast to both halves and accumulates exactly in int32.
 *
 * At one token, unpacking a field (a shift and a mask) costs two instructions per multiply-add. With few
 * tokens the kernel keeps S accumulator sets and leaves field f in place in bits 2s..2s+1 (s = f % S), so
 * fields 0..S-1 need no shift: set s sums 4^s times the codes, and the epilogue shifts it back (exactly:
 * the sum is a multiple of 4^s; a lane of set 3 holds at most 64 * 2 * 128 * K / 32 in magnitude, within
 * int32 below 4 million inputs). S = 4 (no shifts at all) for 1-2 tokens, 2 (one shift per load) for 3-4,
 * 1 for more, where the accumulators of every set would not fit the 32 registers; the sets also give
 * vpdpbusd independent chains to hide its latency when there are few tokens.
 *
 * Software prefetch only from 4 tokens on: with fewer, a block is so little work that the out-of-order
 * window reaches far enough ahead in the stream, and prefetching measured 5-25% slower (Zen 4, one thread,
 * weights from memory); with 8 tokens, leaving it out measured 25% slower. 8 KB ahead rather than 2: one
 * thread over a 13824 x 2560 matrix from memory (Zen 5), 8 tokens (pair_tokens) 10.9 -> 10.5 ns a block,
 * 7 tokens 10.0-10.1 -> 9.6-9.7. */
#include <immintrin.h>

#include "kernels.h"
#include "vnni_avx512.h"

#define PREFETCH_MIN_TOKENS 4
#define PREFETCH_BYTES 8192

/* The 4 row sums of a token: pair0 holds rows 0 and 1 (8 lanes each), pair1 rows 2 and 3. */
static inline void store_row_sums(__m512i pair0, __m512i pair1, int32_t *out) {
    /* 128-bit lane r: 4 partial sums of row r */
    __m512i s = _mm512_add_epi32(_mm512_shuffle_i64x2(pair0, pair1, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_i64x2(pair0, pair1, _MM_SHUFFLE(3, 1, 3, 1)));
    s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_BADC));
    s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_CDAB));
    __m512i firsts = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), s);
    _mm_storeu_si128((__m128i *)out, _mm512_castsi512_si128(firsts));
}

static inline __attribute__((always_inline)) void group_tokens(const uint8_t *group, int blocks, const int8_t *x,
                                                               size_t x_stride, int T, int32_t *out) {
    enum { MAX_SETS = 4 };
    const int S = T <= 2 ? 4 : T <= 4 ? 2 : 1;
    __m512i mask[MAX_SETS], acc[MAX_SETS][2][MAX_TILE_TOKENS];
    for (int s = 0; s < S; s++) {
        mask[s] = _mm512_set1_epi8((char)(3 << (2 * s)));
        for (int t = 0; t < T; t++) acc[s][0][t] = acc[s][1][t] = _mm512_setzero_si512();
    }
    for (int b = 0; b < blocks; b++) {
        const uint8_t *chunks = group + (size_t)b * GROUP_BLOCK_BYTES;
        if (T >= PREFETCH_MIN_TOKENS) {
            _mm_prefetch((const char *)chunks + PREFETCH_BYTES, _MM_HINT_T0);
            _mm_prefetch((const char *)chunks + PREFETCH_BYTES + 64, _MM_HINT_T0);
        }
        __m512i pair0 = _mm512_loadu_si512(chunks), pair1 = _mm512_loadu_si512(chunks + 64);
        for (int f = 0; f < 4; f++) {
            int s = f % S, shift = 2 * (f - s);
            __m512i codes0 = _mm512_and_si512(shift ? _mm512_srli_epi16(pair0, shift) : pair0, mask[s]);
            __m512i codes1 = _mm512_and_si512(shift ? _mm512_srli_epi16(pair1, shift) : pair1, mask[s]);
            for (int t = 0; t < T; t++) {
                const __m256i *xb = (const __m256i *)(x + t * x_stride + (size_t)b * BLOCK_INPUTS + 32 * f);
                __m512i xs = _mm512_broadcast_i64x4(_mm256_loadu_si256(xb));
                acc[s][0][t] = multiply_add(acc[s][0][t], codes0, xs);
                acc[s][1][t] = multiply_add(acc[s][1][t], codes1, xs);
            }
        }
    }
    for (int s = 1; s < S; s++)
        for (int t = 0; t < T; t++)
            for (int p = 0; p < 2; p++)
                acc[0][p][t] = _mm512_add_epi32(acc[0][p][t], _mm512_srai_epi32(acc[s][p][t], 2 * s));
    for (int t = 0; t < T; t++) store_row_sums(acc[0][0][t], acc[0][1][t], out + t * ROWS_PER_GROUP);
}

/* The 4 row sums of two tokens from one accumulator per row: token 2p in the low 8 lanes, 2p + 1 in the high. */
static inline void store_pair_sums(const __m512i rows[ROWS_PER_GROUP], int32_t *first, int32_t *second) {
    __m256i low[ROWS_PER_GROUP], high[ROWS_PER_GROUP];
    for (int r = 0; r < ROWS_PER_GROUP; r++) {
        low[r] = _mm512_castsi512_si256(rows[r]);
        high[r] = _mm512_extracti64x4_epi64(rows[r], 1);
    }
    for (int h = 0; h < 2; h++) {
        const __m256i *half = h ? high : low;
        __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(half[0], half[1]), _mm256_hadd_epi32(half[2], half[3]));
        _mm_storeu_si128((__m128i *)(h ? second : first), _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
    }
}

/* Token pairs (kernels.h, tile_avx512_pairs): each row's 32-byte chunk is broadcast to both halves once a
 * block, and one plain 64-byte load of a pair's field serves all 4 rows, where group_tokens loads each token's
 * field with a 256-bit broadcast for every 2 rows; 64 vpdpbusd a block at 8 tokens either way. One thread over
 * a 13824 x 2560 matrix from memory (Zen 5), prefetching 2 KB ahead: 8 tokens 10.9 ns a block against 11.6,
 * 4 tokens 5.4-5.5 against 5.6-5.8. An odd count would pair a token with zeros (3 tokens 5.2-5.5 against
 * 4.8-4.9), so odd tiles stay with group_tokens. The same sets of accumulators (S) as group_tokens. */
static inline __attribute__((always_inline)) void pair_tokens(const uint8_t *group, int blocks, const int8_t *pairs,
                                                              size_t pair_stride, int P, int32_t *out) {
    enum { MAX_SETS = 4, MAX_PAIRS = MAX_TILE_TOKENS / 2 };
    const int S = P == 1 ? 4 : P == 2 ? 2 : 1;
    __m512i mask[MAX_SETS], acc[MAX_SETS][MAX_PAIRS][ROWS_PER_GROUP];
    for (int s = 0; s < S; s++) {
        mask[s] = _mm512_set1_epi8((char)(3 << (2 * s)));
        for (int p = 0; p < P; p++)
            for (int r = 0; r < ROWS_PER_GROUP; r++) acc[s][p][r] = _mm512_setzero_si512();
    }
    for (int b = 0; b < blocks; b++) {
        const uint8_t *chunks = group + (size_t)b * GROUP_BLOCK_BYTES;
        if (2 * P >= PREFETCH_MIN_TOKENS) {
            _mm_prefetch((const char *)chunks + PREFETCH_BYTES, _MM_HINT_T0);
            _mm_prefetch((const char *)chunks + PREFETCH_BYTES + 64, _MM_HINT_T0);
        }
        __m512i rows[ROWS_PER_GROUP];
        for (int r = 0; r < ROWS_PER_GROUP; r++)
            rows[r] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(chunks + r * CHUNK_BYTES)));
        for (int f = 0; f < 4; f++) {
            int s = f % S, shift = 2 * (f - s);
            __m512i codes[ROWS_PER_GROUP];
            for (int r = 0; r < ROWS_PER_GROUP; r++)
                codes[r] = _mm512_and_si512(shift ? _mm512_srli_epi16(rows[r], shift) : rows[r], mask[s]);
            for (int p = 0; p < P; p++) {
                __m512i xs = _mm512_loadu_si512(pairs + p * pair_stride + (size_t)b * 2 * BLOCK_INPUTS + 2 * CHUNK_BYTES * f);
                for (int r = 0; r < ROWS_PER_GROUP; r++) acc[s][p][r] = multiply_add(acc[s][p][r], codes[r], xs);
            }
        }
    }
    for (int s = 1; s < S; s++)
        for (int p = 0; p < P; p++)
            for (int r = 0; r < ROWS_PER_GROUP; r++)
                acc[0][p][r] = _mm512_add_epi32(acc[0][p][r], _mm512_srai_epi32(acc[s][p][r], 2 * s));
    for (int p = 0; p < P; p++)
        store_pair_sums(acc[0][p], out + 2 * p * ROWS_PER_GROUP, out + (2 * p + 1) * ROWS_PER_GROUP);
}

#define PAIRS_CASE(P) case P: pair_tokens(group, blocks, pairs, pair_stride, P, out); break;

void tile_avx512_pairs(const uint8_t *group, int blocks, const int8_t *pairs, size_t pair_stride, int tokens,
                       int32_t *out) {
    switch (tokens / 2) {
    PAIRS_CASE(1) PAIRS_CASE(2) PAIRS_CASE(3) PAIRS_CASE(4)
    default: break;
    }
}

#define TOKENS_CASE(T) case T: group_tokens(group, blocks, x, x_stride, T, out); break;

void tile_avx512(const uint8_t *group, int blocks, const int8_t *x, size_t x_stride, int tokens, int32_t *out) {
    switch (tokens) {
    TOKENS_CASE(1) TOKENS_CASE(2) TOKENS_CASE(3) TOKENS_CASE(4) TOKENS_CASE(5) TOKENS_CASE(6) TOKENS_CASE(7)
    TOKENS_CASE(8)
    default: break;
    }
}
