/* exp(x) for x <= 0 within 2 ulp, in plain float arithmetic so that it vectorises: 2^n * p(r).
 * Shared by the attention kernels (float_ops.c, attention_prefill.c): the same softmax weights in both. */
#ifndef BITNET_CPU_FAST_EXP_H
#define BITNET_CPU_FAST_EXP_H

#include <stdint.h>
#include <string.h>

/* exp's steps after the clamp to [-87, 0], for x a float or a GCC vector of floats (the same operations in
 * every lane): n = round(x / ln 2) and p(r) = exp(x - n ln 2), r within +-ln 2 / 2. */
#define EXP_NONPOSITIVE_STEPS(x, n, p)                                                            \
    do {                                                                                         \
        const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */ \
        n = (x * 1.44269504f + round_magic) - round_magic;                                       \
        __typeof__(x) r = (x - n * 0.693145752f) - n * 1.42860677e-6f;                           \
        p = 1.0f / 5040 + r * (1.0f / 40320);                                                    \
        p = 1.0f / 720 + r * p;                                                                  \
        p = 1.0f / 120 + r * p;                                                                  \
        p = 1.0f / 24 + r * p;                                                                   \
        p = 1.0f / 6 + r * p;                                                                    \
        p = 0.5f + r * p;                                                                        \
        p = 1.0f + r * p;                                                                        \
        p = 1.0f + r * p;                                                                        \
    } while (0)

static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n, p;
    EXP_NONPOSITIVE_STEPS(x, n, p);
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

#endif
