/* vpdpbusd for the AVX-512 kernels (tile_avx512.c, gemm_avx512.c). */
#ifndef BITNET_CPU_VNNI_AVX512_H
#define BITNET_CPU_VNNI_AVX512_H

#include <immintrin.h>

/* acc + codes . x by 4-byte groups (codes unsigned, x signed). Written as asm because GCC copies and spills
 * the accumulators around the intrinsic (its tied operand); the instruction is the same. */
static inline __attribute__((always_inline)) __m512i multiply_add(__m512i acc, __m512i codes, __m512i x) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(codes), "v"(x));
    return acc;
}

#endif
