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
#define ISA_PATH PATH_AVX512  /* the path this copy serves (the generic copy: every path but AVX-512's) */
#define VECTOR_BYTES 64
#elif defined(__AVX2__)
#define ISA_PATH PATH_AVX2
#define VECTOR_BYTES 32
#else
#define ISA_PATH PATH_SCALAR
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

INLINE vector_f32 load_vector(const float *at) {
    vector_f32 v;
    memcpy(&v, at, sizeof v);
    return v;
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

/* ---------------------------------------------------------------------------------------------
 * The LM head: out[m * V + v] = x[m] . W[v] (times the row's scale), rows v_begin .. v_end.
 *
 * bf16 / fp32 rows, in fp32 arithmetic. A row is read in blocks of HEAD_FLOAT_BLOCK inputs, each as two
 * sets of LANES weights: for bf16 the two halves of each 32-bit word (inputs 2l and 2l + 1 of the block:
 * a shift and a mask widen them, where widening 16-bit lanes took shuffles), for fp32 inputs l and
 * LANES + l. head_prepare lays each token's x out the same way (zero-padded to whole blocks). Lane l of a
 * logit's sum adds (first * x_first + second * x_second) block after block; the logit is lane_total of
 * the LANES sums times the row's scale: the same order on every path, whatever the batch.
 *
 * int8 rows: each token's x is quantised as HF's ActQuant (codes q, s = 127 / absmax) and dotted with a
 * row's codes in exact int32 on every path (AVX-512 VNNI: vpdpbusd of q + 128 minus 128 x the row's code
 * sum; AVX2: maddubs of |w| and q with w's sign, pairs <= 2 x 128 x 127; scalar); the logit is
 * dot / s * the row's scale.
 *
 * The tokens of a pass over the weights lie interleaved block by block (head_at): one pointer and constant
 * offsets reach every token's block, where a pointer per token ran out of general registers (spills in
 * the inner loop).
 */

_Static_assert(HEAD_FLOAT_BLOCK == 2 * LANES, "a head block is two sets of LANES weights");

/* Tokens per pass over the weights and rows per tile (their sums stay in registers together). */
#define HEAD_FLOAT_TOKENS 8
#define HEAD_INT8_TOKENS 8
#if defined(__AVX512F__)
#define HEAD_MAX_TILE_ROWS 2
#else
#define HEAD_MAX_TILE_ROWS 1
#endif
/* One row at a time for 1 or 2 tokens: streaming two rows at once measured 2x slower from memory. */
#define HEAD_TILE_ROWS(M) ((M) <= 2 ? 1 : HEAD_MAX_TILE_ROWS)

/* With more than 2 tokens a block of rows goes over the inputs a chunk of HEAD_CHUNK_BLOCKS at a time, so
 * that the tokens' chunk of x (8 x 256 fp32: 8 KB) stays in L1 while the block's rows use it; the sums wait
 * in memory between chunks. With 1 or 2 tokens each row streams whole. A tile adds all parts of the lanes
 * at once where the tokens' sums fit in 8 registers, else one part (WIDTH lanes) at a time: 8 tokens' sums
 * fit in AVX2's registers (all parts at once: 10% faster from memory at 3 and 4 tokens on a Zen 3). */
#define HEAD_BLOCK_ROWS 8
#define HEAD_CHUNK_BLOCKS(M) ((M) <= 2 ? 1 << 30 : 8)
#define HEAD_TILE_PARTS(M) ((M) * PARTS <= 8 ? PARTS : 1)

/* Where input k of token m lies in head_prepare's layout of a pass of T tokens (block: the head's block). */
INLINE size_t head_at(int k, int m, int T, int block) { return ((size_t)(k / block) * T + m) * block + k % block; }

INLINE int pass_tokens(int M, int m0, int pass) { return M - m0 < pass ? M - m0 : pass; }

void NAME(head_prepare)(int dtype, const float *x, int K, int M, void *prepared) {
    int kp = head_padded_k(dtype, K);
    if (dtype == WEIGHT_INT8) {
        int8_t *q = prepared, *codes = q + (size_t)M * (kp + 4);  /* one token's codes in order, then spread */
        float *scales = (float *)(q + (size_t)M * kp);
        for (int m = 0; m < M; m++) {
            int m0 = m - m % HEAD_INT8_TOKENS, tokens = pass_tokens(M, m0, HEAD_INT8_TOKENS);
            int32_t sum;
            NAME(quantize_row)(x + (size_t)m * K, K, kp, codes, &scales[m], &sum);
            for (int k = 0; k < kp; k += HEAD_INT8_BLOCK)
                memcpy(q + (size_t)m0 * kp + head_at(k, m - m0, tokens, HEAD_INT8_BLOCK), codes + k, HEAD_INT8_BLOCK);
        }
        return;
    }
    float *xp = prepared;
    for (int m = 0; m < M; m++) {
        int m0 = m - m % HEAD_FLOAT_TOKENS, tokens = pass_tokens(M, m0, HEAD_FLOAT_TOKENS);
        for (int k = 0; k < kp; k++) {
            int block = k - k % HEAD_FLOAT_BLOCK, lane = k % LANES, second = k % HEAD_FLOAT_BLOCK >= LANES;
            int source = block + (dtype == WEIGHT_BF16 ? 2 * lane + second : second * LANES + lane);
            xp[(size_t)m0 * kp + head_at(k, m - m0, tokens, HEAD_FLOAT_BLOCK)] =
                source < K ? x[(size_t)m * K + source] : 0.0f;
        }
    }
}

/* Part p of block b of a bf16 or fp32 row: the WIDTH weights of its first and of its second set. */
INLINE void load_head_part(const void *row, int dtype, int b, int p, vector_f32 *first, vector_f32 *second) {
    if (dtype == WEIGHT_BF16) {
        vector_u32 words;
        memcpy(&words, (const uint32_t *)row + (size_t)b * LANES + p * WIDTH, sizeof words);
        *first = (vector_f32)(words << 16);
        *second = (vector_f32)(words & 0xffff0000u);
    } else {
        const float *at = (const float *)row + (size_t)b * HEAD_FLOAT_BLOCK + p * WIDTH;
        memcpy(first, at, sizeof *first);
        memcpy(second, at + LANES, sizeof *second);
    }
}

/* sum += first * x_first + second * x_second for part p of a token's block xb of x (multiplies and adds:
 * no FMA). */
INLINE void add_head_part(vector_f32 *sum, vector_f32 first, vector_f32 second, const float *xb, int p) {
    *sum += first * load_vector(xb + p * WIDTH) + second * load_vector(xb + LANES + p * WIDTH);
}

/* Parts [p, p + P) of acc[r][m] over blocks [b_begin, b_end) of rows v .. v + R for M tokens (R, M, P
 * constants after inlining): each part of a block of weights is widened once for all tokens, each token's
 * part of x loaded once for all rows. */
INLINE void float_tile(const char *w, int dtype, size_t row_bytes, int v, int R, int p, int P, int b_begin,
                       int b_end, const float *x, int M, lanes acc[][HEAD_FLOAT_TOKENS], const char *ahead) {
    /* ahead: a row to prefetch block by block alongside (NULL: none) */
    vector_f32 sums[HEAD_MAX_TILE_ROWS][HEAD_FLOAT_TOKENS][PARTS];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++)
            for (int i = 0; i < P; i++) sums[r][m][i] = acc[r][m].part[p + i];
    for (int b = b_begin; b < b_end; b++) {
        const float *xb = x + (size_t)b * M * HEAD_FLOAT_BLOCK;
        vector_f32 first[HEAD_MAX_TILE_ROWS][PARTS], second[HEAD_MAX_TILE_ROWS][PARTS];
        if (ahead) {  /* the block's bytes in the row ahead: one line of bf16, two of fp32 */
            const size_t block_bytes = (size_t)HEAD_FLOAT_BLOCK * (dtype == WEIGHT_BF16 ? 2 : 4);
            for (size_t at = 0; at < block_bytes; at += 64) __builtin_prefetch(ahead + b * block_bytes + at, 0, 3);
        }
        for (int r = 0; r < R; r++)
            for (int i = 0; i < P; i++)
                load_head_part(w + (size_t)(v + r) * row_bytes, dtype, b, p + i, &first[r][i], &second[r][i]);
#pragma GCC unroll 8
        for (int m = 0; m < M; m++)
            for (int r = 0; r < R; r++)
                for (int i = 0; i < P; i++)
                    add_head_part(&sums[r][m][i], first[r][i], second[r][i], xb + m * HEAD_FLOAT_BLOCK, p + i);
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++)
            for (int i = 0; i < P; i++) acc[r][m].part[p + i] = sums[r][m][i];
}

/* Asks for the chunk that rows v .. v + R read next (after blocks [.., b_end): the next chunk of each, or
 * after the last one the first chunk of the row HEAD_BLOCK_ROWS on) while their tiles work on this one:
 * with a block's rows each read a chunk at a time, the hardware prefetchers fell behind (AVX2 Zen 3,
 * 8 tokens: 2x slower from memory without). */
INLINE void prefetch_next_chunk(const void *w, size_t row_bytes, size_t block_bytes, int v, int R, int b_end,
                                int blocks, int chunk, int v_end) {
    if (b_end >= blocks) v += HEAD_BLOCK_ROWS, b_end = 0;
    int end = blocks - b_end < chunk ? blocks : b_end + chunk;
    for (int r = 0; r < R && v + r < v_end; r++) {
        const char *row = (const char *)w + (size_t)(v + r) * row_bytes;
        for (size_t at = (size_t)b_end * block_bytes; at < (size_t)end * block_bytes; at += 64) __builtin_prefetch(row + at, 0, 3);
    }
}

/* With 1 or 2 tokens a tile streams one row; it asks for the row FLOAT_PREFETCH_ROWS on as it goes (one
 * thread from memory, bf16: AVX-512 Zen 5 22.3 -> 24.1-26.9 GB/s, AVX2 path there 32.2 -> 35.5-38.3). With more
 * tokens prefetch_next_chunk does. */
#define FLOAT_PREFETCH_ROWS 4

INLINE void float_span(const void *w, int dtype, const float *scales, int K, const float *x, int M, int V,
                       int v_begin, int v_end, float *out) {
    const int blocks = K / HEAD_FLOAT_BLOCK, size = dtype == WEIGHT_BF16 ? 2 : 4, R = HEAD_TILE_ROWS(M);
    const int P = HEAD_TILE_PARTS(M);
    const size_t row_bytes = (size_t)K * size, block_bytes = (size_t)HEAD_FLOAT_BLOCK * size;
    lanes acc[HEAD_BLOCK_ROWS][HEAD_FLOAT_TOKENS];
    for (int v0 = v_begin; v0 < v_end; v0 += HEAD_BLOCK_ROWS) {
        int rows = v_end - v0 < HEAD_BLOCK_ROWS ? v_end - v0 : HEAD_BLOCK_ROWS;
        memset(acc, 0, sizeof acc);
        for (int b0 = 0; b0 < blocks; b0 += HEAD_CHUNK_BLOCKS(M)) {
            int b1 = blocks - b0 < HEAD_CHUNK_BLOCKS(M) ? blocks : b0 + HEAD_CHUNK_BLOCKS(M), r = 0;
            for (; r + R <= rows; r += R) {
                if (M > 2) prefetch_next_chunk(w, row_bytes, block_bytes, v0 + r, R, b1, blocks, HEAD_CHUNK_BLOCKS(M), v_end);
                const int ahead_row = v0 + r + FLOAT_PREFETCH_ROWS;
                const char *ahead = M <= 2 && ahead_row < v_end ? (const char *)w + (size_t)ahead_row * row_bytes : NULL;
                for (int p = 0; p < PARTS; p += P) float_tile(w, dtype, row_bytes, v0 + r, R, p, P, b0, b1, x, M, acc + r, ahead);
            }
            for (; r < rows; r++)
                for (int p = 0; p < PARTS; p += P) float_tile(w, dtype, row_bytes, v0 + r, 1, p, P, b0, b1, x, M, acc + r, NULL);
        }
        for (int r = 0; r < rows; r++) {
            const int whole = blocks * HEAD_FLOAT_BLOCK;
            if (whole < K) {  /* the last, partial block: zero-padded like x */
                float padded[HEAD_FLOAT_BLOCK] = {0};
                memcpy(padded, (const char *)w + (size_t)(v0 + r) * row_bytes + (size_t)whole * size,
                       (size_t)(K - whole) * size);
                for (int p = 0; p < PARTS; p++) {
                    vector_f32 first, second;
                    load_head_part(padded, dtype, 0, p, &first, &second);
                    for (int m = 0; m < M; m++)
                        add_head_part(&acc[r][m].part[p], first, second, x + ((size_t)blocks * M + m) * HEAD_FLOAT_BLOCK, p);
                }
            }
            for (int m = 0; m < M; m++)
                out[(size_t)m * V + v0 + r] = lane_total(acc[r][m]) * (scales ? scales[v0 + r] : 1.0f);
        }
    }
}

/* dots[r * M + m] = exact int32 sum over inputs [0, K) of rows v .. v + R (R, M constants after inlining)
 * times each token's codes q (a pass of M tokens): the vector loop covers whole HEAD_INT8_BLOCKs, the rest
 * is added in C. */
INLINE void int8_tile(const int8_t *w, int K, int v, int R, const int8_t *q, int M, int32_t *dots,
                      const int8_t *ahead) {
#if defined(__AVX512VNNI__) || defined(__AVX2__)
    const int vector_k = K / HEAD_INT8_BLOCK * HEAD_INT8_BLOCK;
#else
    const int vector_k = 0;
#endif
#if defined(__AVX512VNNI__)
    /* vpdpbusd's latency would bound one chain of sums per row and token: 1 or 2 tokens keep 4 chains, on
     * successive 64-byte steps. */
    enum { CHAINS = 4 };
    const int chains = M <= 2 ? CHAINS : 1;
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    __m512i sums[HEAD_MAX_TILE_ROWS][HEAD_INT8_TOKENS][CHAINS], offsets[HEAD_MAX_TILE_ROWS][CHAINS];
    for (int c = 0; c < chains; c++)
        for (int r = 0; r < R; r++) {
            offsets[r][c] = _mm512_setzero_si512();
            for (int m = 0; m < M; m++) sums[r][m][c] = _mm512_setzero_si512();
        }
    for (int k = 0; k < vector_k; k += 64 * chains)
        for (int c = 0; c < chains && k + 64 * c < vector_k; c++) {
            __m512i codes[HEAD_MAX_TILE_ROWS];
            for (int r = 0; r < R; r++) {
                if (ahead) __builtin_prefetch(ahead + (size_t)r * K + k + 64 * c, 0, 3);
                codes[r] = _mm512_loadu_si512(w + (size_t)(v + r) * K + k + 64 * c);
                offsets[r][c] = _mm512_dpbusd_epi32(offsets[r][c], bias, codes[r]);  /* 128 x the codes' sum */
            }
            for (int m = 0; m < M; m++) {
                const int8_t *at = q + head_at(k + 64 * c, m, M, HEAD_INT8_BLOCK);
                __m512i shifted = _mm512_xor_si512(_mm512_loadu_si512(at), bias);  /* q + 128 as unsigned */
                for (int r = 0; r < R; r++) sums[r][m][c] = _mm512_dpbusd_epi32(sums[r][m][c], shifted, codes[r]);
            }
        }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            __m512i total = _mm512_sub_epi32(sums[r][m][0], offsets[r][0]);
            for (int c = 1; c < chains; c++)
                total = _mm512_add_epi32(total, _mm512_sub_epi32(sums[r][m][c], offsets[r][c]));
            dots[r * M + m] = _mm512_reduce_add_epi32(total);
        }
#elif defined(__AVX2__)
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i sums[HEAD_MAX_TILE_ROWS][HEAD_INT8_TOKENS];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) sums[r][m] = _mm256_setzero_si256();
    for (int kb = 0; kb < vector_k; kb += HEAD_INT8_BLOCK)
        for (int k = kb; k < kb + HEAD_INT8_BLOCK; k += 32) {
            const int8_t *xk = q + (size_t)kb * M + (k - kb);  /* token 0's codes from k */
            __m256i codes[HEAD_MAX_TILE_ROWS], magnitudes[HEAD_MAX_TILE_ROWS];
            for (int r = 0; r < R; r++) {
                if (ahead && k % 64 == 0) __builtin_prefetch(ahead + (size_t)r * K + k, 0, 3);
                codes[r] = _mm256_loadu_si256((const void *)(w + (size_t)(v + r) * K + k));
                magnitudes[r] = _mm256_abs_epi8(codes[r]);
            }
            for (int m = 0; m < M; m++) {
                __m256i x = _mm256_loadu_si256((const void *)(xk + m * HEAD_INT8_BLOCK));
                for (int r = 0; r < R; r++) {
                    __m256i pairs = _mm256_maddubs_epi16(magnitudes[r], _mm256_sign_epi8(x, codes[r]));
                    sums[r][m] = _mm256_add_epi32(sums[r][m], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sums[r][m]), _mm256_extracti128_si256(sums[r][m], 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
            dots[r * M + m] = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
        }
#else
    for (int i = 0; i < R * M; i++) dots[i] = 0;
#endif
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            const int8_t *row = w + (size_t)(v + r) * K;
            int32_t total = 0;
            for (int k = vector_k; k < K; k++) total += row[k] * q[head_at(k, m, M, HEAD_INT8_BLOCK)];
            dots[r * M + m] += total;
        }
}

/* With more than 2 tokens a tile works on its rows long enough that the hardware prefetchers fell behind
 * (AVX-512 Zen 5, 8 tokens, one thread: 10.4 GB/s from memory against 24.9 from L2): the tile asks for the
 * rows INT8_PREFETCH_ROWS on as it reads its own. */
#define INT8_PREFETCH_ROWS 4

INLINE void int8_span(const int8_t *w, const float *scales, int K, const int8_t *q, const float *x_scales, int M,
                      int V, int v_begin, int v_end, float *out) {
    int32_t dots[HEAD_MAX_TILE_ROWS * HEAD_INT8_TOKENS];
    for (int v = v_begin; v < v_end; v += HEAD_TILE_ROWS(M)) {
        int rows = v_end - v < HEAD_TILE_ROWS(M) ? v_end - v : HEAD_TILE_ROWS(M);
        const int8_t *ahead = M > 2 && v + INT8_PREFETCH_ROWS + rows <= v_end ? w + (size_t)(v + INT8_PREFETCH_ROWS) * K : NULL;
        if (rows == HEAD_TILE_ROWS(M)) int8_tile(w, K, v, HEAD_TILE_ROWS(M), q, M, dots, ahead);
        else
            for (int r = 0; r < rows; r++) int8_tile(w, K, v + r, 1, q, M, dots + r * M, NULL);
        for (int r = 0; r < rows; r++)
            for (int m = 0; m < M; m++)
                out[(size_t)m * V + v + r] = (float)dots[r * M + m] / x_scales[m] * scales[v + r];
    }
}

#define TOKEN_CASES(SPAN) \
    case 1: SPAN(1); break; case 2: SPAN(2); break; case 3: SPAN(3); break; case 4: SPAN(4); break; \
    case 5: SPAN(5); break; case 6: SPAN(6); break; case 7: SPAN(7); break; default: SPAN(8);

/* prepared: head_prepare's layout of M tokens; up to a pass of tokens per pass over the weights. */
void NAME(head_rows)(const void *w, int dtype, const float *scales, int K, const void *prepared, int M, int V,
                     int v_begin, int v_end, float *out) {
    const int kp = head_padded_k(dtype, K), pass = dtype == WEIGHT_INT8 ? HEAD_INT8_TOKENS : HEAD_FLOAT_TOKENS;
    for (int m0 = 0; m0 < M; m0 += pass) {
        int tokens = pass_tokens(M, m0, pass);
        float *om = out + (size_t)m0 * V;
        if (dtype == WEIGHT_INT8) {
            const int8_t *q = (const int8_t *)prepared + (size_t)m0 * kp;
            const float *x_scales = (const float *)((const int8_t *)prepared + (size_t)M * kp) + m0;
#define INT8_SPAN(MM) int8_span(w, scales, K, q, x_scales, MM, V, v_begin, v_end, om)
            switch (tokens) { TOKEN_CASES(INT8_SPAN) }
        } else {
            const float *x = (const float *)prepared + (size_t)m0 * kp;
#define BF16_SPAN(MM) float_span(w, WEIGHT_BF16, scales, K, x, MM, V, v_begin, v_end, om)
#define F32_SPAN(MM) float_span(w, WEIGHT_F32, scales, K, x, MM, V, v_begin, v_end, om)
            if (dtype == WEIGHT_BF16) {
                switch (tokens) { TOKEN_CASES(BF16_SPAN) }
            } else {
                switch (tokens) { TOKEN_CASES(F32_SPAN) }
            }
        }
    }
}

/* From memory the hardware prefetchers fell behind the attention's streams of keys and values (one thread,
 * AVX-512 Zen 5: 11.4 GB/s against 28 from L3): each step asks for the rows this many ahead. */
#define ATTENTION_PREFETCH_ROWS 16

/* Prefetch rows [first, first + rows) of `dim` floats of `base`, those below `length`. */
INLINE void prefetch_rows(const float *base, int first, int rows, int dim, int length) {
    for (int r = first; r < first + rows && r < length; r++)
        for (int d = 0; d < dim; d += 16) __builtin_prefetch(base + (size_t)r * dim + d, 0, 3);
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
 * and vectors [c0, c0 + C) of LANES of each value row (V in all; H, V, C constants after inlining): the sums
 * stay in registers, each value load serves every head. */
INLINE void weigh_columns(const float *values, const float *p, size_t stride, int length, int H, int V, int c0,
                          int C, float *o, int dim) {
    lanes acc[MAX_HEADS_PER_TASK][8];
    memset(acc, 0, sizeof acc);
    for (int j = 0; j < length; j++) {
        if (j + ATTENTION_PREFETCH_ROWS < length)  /* a vector of LANES floats is one 64-byte line */
            for (int c = 0; c < C; c++) __builtin_prefetch(values + ((size_t)(j + ATTENTION_PREFETCH_ROWS) * V + c0 + c) * LANES, 0, 3);
        for (int c = 0; c < C; c++) {
            lanes v = load_f32(values + ((size_t)j * V + c0 + c) * LANES);
            for (int i = 0; i < H; i++) {
                lanes pj;
                for (int w = 0; w < PARTS; w++) pj.part[w] = (vector_f32){0} + p[i * stride + j];
                multiply_add(&acc[i][c], &pj, &v);
            }
        }
    }
    for (int i = 0; i < H; i++) memcpy(o + (size_t)i * dim + (size_t)c0 * LANES, acc[i], (size_t)C * sizeof acc[i][0]);
}

/* All V vectors of each value row; 4 heads' sums of a 128-wide row would take every register: two halves. */
INLINE void weigh(const float *values, const float *p, size_t stride, int length, int H, int V, float *o, int dim) {
    if (H * V > 16) {
        weigh_columns(values, p, stride, length, H, V, 0, V / 2, o, dim);
        weigh_columns(values, p, stride, length, H, V, V / 2, V - V / 2, o, dim);
    } else {
        weigh_columns(values, p, stride, length, H, V, 0, V, o, dim);
    }
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
    if (heads == 1) { const int H = 1; call; } else if (heads == 2) { const int H = 2; call; } else { const int H = 4; call; }

/* Task = (token, heads_per_task heads of one kv head): their scores, softmax and weighted sum of values. */
void NAME(attention_tasks)(const struct attention_args *a, int task_begin, int task_end, float *scores,
                           size_t stride) {
    const int dim = a->head_dim, heads = attention_heads_per_task(a->group, ISA_PATH), tasks_per_token = a->heads / heads;
    for (int task = task_begin; task < task_end; task++) {
        int t = task / tasks_per_token, h = task % tasks_per_token * heads;
        int length = a->start + t + 1;  /* causal: token t sees positions 0 .. start + t */
        const float *q = a->q + (size_t)t * a->q_stride + (size_t)h * dim;
        const float *keys = a->keys + (size_t)(h / a->group) * a->head_stride;
        const float *values = a->values + (size_t)(h / a->group) * a->head_stride;
        int j = 0;
        for (; j + KEYS_PER_PASS <= length; j += KEYS_PER_PASS) {
            prefetch_rows(keys, j + ATTENTION_PREFETCH_ROWS, KEYS_PER_PASS, dim, length);
            HEADS_CASE(H, dots(q, H, keys + (size_t)j * dim, KEYS_PER_PASS, dim, scores + j, stride))
        }
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

/* A bf16 or fp32 table's WIDTH values from index `at`. */
INLINE vector_f32 table_vector(const void *table, int dtype, size_t at) {
    if (dtype == WEIGHT_BF16) {
        vector_u16 bits;
        memcpy(&bits, (const uint16_t *)table + at, sizeof bits);
        return (vector_f32)(__builtin_convertvector(bits, vector_u32) << 16);
    }
    return load_vector((const float *)table + at);
}

/* Rounds value / scale to a code (|value / scale| <= 127 + rounding: no clamp needed). */
INLINE vector_i32 head_code(vector_f32 value, float scale) {
    return __builtin_convertvector(((value / scale) + ROUNDING_SHIFT) - ROUNDING_SHIFT, vector_i32);
}

/* 4 x WIDTH codes in [-128, 127] as bytes, in order (GCC narrows a vector_i32 to bytes one lane at a time on
 * AVX2: two saturating packs and a lane permute instead). */
INLINE void store_codes(int8_t *at, const vector_i32 codes[4]) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    __m256i low = _mm256_packs_epi32((__m256i)codes[0], (__m256i)codes[1]);
    __m256i high = _mm256_packs_epi32((__m256i)codes[2], (__m256i)codes[3]);
    __m256i bytes = _mm256_packs_epi16(low, high);  /* 4-byte groups 0-3 of each 128-bit half, in each half */
    _mm256_storeu_si256((void *)at, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
    for (int j = 0; j < 4; j++) {
        vector_i8 narrow = __builtin_convertvector(codes[j], vector_i8);
        memcpy(at + j * WIDTH, &narrow, sizeof narrow);
    }
#endif
}

/* Rows [v_begin, v_end) of a bf16 or fp32 LM head as int8: scale = absmax / 127 (1 for a zero row), code =
 * round half to even of value / scale (a division, as nearbyintf(value / scale); |code| <= 127), 4 x WIDTH
 * values at a time and the tail one by one: the same codes on every path. */
void NAME(quantize_head_rows)(const void *table, int dtype, int k, int v_begin, int v_end, int8_t *q, float *scales) {
    const vector_i32 magnitude = (vector_i32){0} + 0x7fffffff;
    for (int v = v_begin; v < v_end; v++) {
        const size_t row = (size_t)v * k;
        vector_f32 tops = {0};
        int i = 0;
        for (; i + WIDTH <= k; i += WIDTH) {
            vector_f32 a = (vector_f32)((vector_i32)table_vector(table, dtype, row + i) & magnitude);
            tops = select(a > tops, a, tops);
        }
        float top = 0.0f;
        for (int l = 0; l < WIDTH; l++) top = fmaxf(top, tops[l]);
        for (int j = i; j < k; j++) top = fmaxf(top, fabsf(table_value(table, dtype, row + j)));
        const float scale = top > 0.0f ? top / 127.0f : 1.0f;
        for (i = 0; i + 4 * WIDTH <= k; i += 4 * WIDTH) {
            vector_i32 codes[4];
            for (int j = 0; j < 4; j++) codes[j] = head_code(table_vector(table, dtype, row + i + j * WIDTH), scale);
            store_codes(q + row + i, codes);
        }
        for (; i < k; i++) q[row + i] = (int8_t)nearbyintf(table_value(table, dtype, row + i) / scale);
        scales[v] = scale;
    }
}
