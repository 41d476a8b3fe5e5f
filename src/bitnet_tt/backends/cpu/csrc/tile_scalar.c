/* Portable tile kernel: the reference every vector path must match integer for integer. */
#include "kernels.h"

void tile_scalar(const uint8_t *group, int blocks, const int8_t *x, size_t x_stride, int tokens, int32_t *out) {
    for (int t = 0; t < tokens; t++) {
        const int8_t *xt = x + t * x_stride;
        for (int r = 0; r < ROWS_PER_GROUP; r++) {
            int32_t sum = 0;
            for (int b = 0; b < blocks; b++) {
                const uint8_t *chunk = group + ((size_t)b * ROWS_PER_GROUP + r) * CHUNK_BYTES;
                const int8_t *xb = xt + (size_t)b * BLOCK_INPUTS;
                for (int f = 0; f < 4; f++)
                    for (int j = 0; j < CHUNK_BYTES; j++)
                        sum += ((chunk[j] >> (2 * f)) & 3) * xb[32 * f + j];
            }
            out[t * ROWS_PER_GROUP + r] = sum;
        }
    }
}
