/* Shared declarations of the CPU backend's kernels.
 *
 * Packed ternary layout ("row-group layout"): output rows in groups of 4, inputs in blocks of 128.
 * For group g and block b the 4 rows' 32-byte chunks are stored one after another:
 *     chunk(g, b, r) = packed + ((g * blocks + b) * 4 + r) * 32
 * Byte j of a chunk holds, in bits 2f..2f+1, the code of input 128b + 32f + j, stored as code + 1
 * (0, 1, 2 for -1, 0, +1). Padding rows and inputs hold 1 (a zero weight).
 *
 * Activations are int8, one row of `padded_k` bytes per token (zeros past K). A kernel computes
 * sum_k (code + 1) * x and subtracts the row's activation sum: the exact int32 product.
 */
#ifndef BITNET_CPU_KERNELS_H
#define BITNET_CPU_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define ROWS_PER_GROUP 4
#define BLOCK_INPUTS 128
#define CHUNK_BYTES 32
#define GROUP_BLOCK_BYTES (ROWS_PER_GROUP * CHUNK_BYTES)
/* The most tokens one call of a tile kernel handles. */
#define MAX_TILE_TOKENS 8

/* One call of a tile kernel: rows [4g, 4g+4) of a group times `tokens` (1..MAX_TILE_TOKENS) activation
 * rows; writes the raw sums sum_k (code + 1) * x into out[t * 4 + r]. */
typedef void (*tile_kernel)(const uint8_t *group, int blocks, const int8_t *x, size_t x_stride, int tokens,
                            int32_t *out);

void tile_scalar(const uint8_t *group, int blocks, const int8_t *x, size_t x_stride, int tokens, int32_t *out);
/* The AVX-512 tile for an even number of tokens, from the tokens in pairs (pair_activations in layers.c): pair
 * p of the tile's tokens at pairs + p * pair_stride; for block b and field f, 64 bytes at b * 256 + 64 * f:
 * token 2p's activations of inputs 128b + 32f .. + 31, then token 2p + 1's. */
#if defined(__x86_64__) || defined(_M_X64)
void tile_avx512_pairs(const uint8_t *group, int blocks, const int8_t *pairs, size_t pair_stride, int tokens,
                       int32_t *out);
void tile_avx2(const uint8_t *group, int blocks, const int8_t *x, size_t x_stride, int tokens, int32_t *out);
void tile_avx512(const uint8_t *group, int blocks, const int8_t *x, size_t x_stride, int tokens, int32_t *out);
#endif
#if defined(__aarch64__)
void tile_neon(const uint8_t *group, int blocks, const int8_t *x, size_t x_stride, int tokens, int32_t *out);
void tile_neondot(const uint8_t *group, int blocks, const int8_t *x, size_t x_stride, int tokens, int32_t *out);
#endif

#endif
