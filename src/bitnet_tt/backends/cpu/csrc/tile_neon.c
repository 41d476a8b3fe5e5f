/* ARM NEON tile kernel (built on aarch64 only): widening multiplies of the unsigned codes (0..2) by int8
 * activations into int16, pairwise-added into int32 per block. Built a second time with the dot-product
 * extension (TILE_NAME tile_neondot), where sdot (codes are 0..2, so reading them as signed is exact)
 * accumulates straight into int32. Written for aarch64 but not run: no ARM machine was available. */
#include <arm_neon.h>

#include "kernels.h"

static inline int32x4_t block_dot(int32x4_t acc, uint8x16_t codes, int8x16_t xs) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, vreinterpretq_s8_u8(codes), xs);
#else
    int8x16_t c = vreinterpretq_s8_u8(codes);
    int16x8_t lo = vmull_s8(vget_low_s8(c), vget_low_s8(xs));
    int16x8_t hi = vmull_s8(vget_high_s8(c), vget_high_s8(xs));
    return vpadalq_s16(vpadalq_s16(acc, lo), hi);
#endif
}

void TILE_NAME(const uint8_t *group, int blocks, const int8_t *x, size_t x_stride, int tokens, int32_t *out) {
    const uint8x16_t mask = vdupq_n_u8(3);
    for (int t = 0; t < tokens; t++) {
        const int8_t *xt = x + t * x_stride;
        for (int r = 0; r < ROWS_PER_GROUP; r++) {
            int32x4_t acc = vdupq_n_s32(0);
            for (int b = 0; b < blocks; b++) {
                const uint8_t *chunk = group + ((size_t)b * ROWS_PER_GROUP + r) * CHUNK_BYTES;
                const int8_t *xb = xt + (size_t)b * BLOCK_INPUTS;
                for (int half = 0; half < 2; half++) {
                    uint8x16_t v = vld1q_u8(chunk + 16 * half);
                    acc = block_dot(acc, vandq_u8(v, mask), vld1q_s8(xb + 16 * half));
                    acc = block_dot(acc, vandq_u8(vshrq_n_u8(v, 2), mask), vld1q_s8(xb + 32 + 16 * half));
                    acc = block_dot(acc, vandq_u8(vshrq_n_u8(v, 4), mask), vld1q_s8(xb + 64 + 16 * half));
                    acc = block_dot(acc, vshrq_n_u8(v, 6), vld1q_s8(xb + 96 + 16 * half));
                }
            }
            out[t * ROWS_PER_GROUP + r] = vaddvq_s32(acc);
        }
    }
}
