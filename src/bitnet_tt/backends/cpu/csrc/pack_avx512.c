/* Repacking a converted checkpoint's 2-bit rows into the row-group layout with AVX-512 VBMI (load time).
 *
 * A 128-input block of a source row is 4 qwords; qword f holds inputs 32f .. 32f + 31, input 32f + i in bits
 * 2i..2i+1. Byte j of the output chunk holds input 32f + j in bits 2f..2f+1 (kernels.h), so for each f one
 * vpmultishiftqb picks, for every output byte j, the 8 source bits starting 2f below field j: the field lands
 * in bits 2f..2f+1, and a mask keeps it. */
#include <immintrin.h>
#include <string.h>

#include "kernels.h"
#include "pack.h"

int spread_rows_avx512vbmi(const uint8_t *src, int blocks, uint8_t *chunks) {
    __m256i control[4], keep[4];
    for (int f = 0; f < 4; f++) {
        uint8_t bytes[32];
        for (int j = 0; j < 32; j++) bytes[j] = (uint8_t)((2 * (j % 8) + 16 * (j / 8) - 2 * f) & 63);
        control[f] = _mm256_loadu_si256((const __m256i *)bytes);
        keep[f] = _mm256_set1_epi8((char)(3 << (2 * f)));
    }
    const __m256i low_bits = _mm256_set1_epi8(0x55);
    __mmask32 unused = 0;
    for (int b = 0; b < blocks; b++) {
        const uint8_t *block = src + (size_t)b * (BLOCK_INPUTS / 4);
        __m256i raw = _mm256_loadu_si256((const __m256i *)block);
        unused |= _mm256_test_epi8_mask(_mm256_and_si256(raw, _mm256_srli_epi16(raw, 1)), low_bits);
        __m256i chunk = _mm256_setzero_si256();
        for (int f = 0; f < 4; f++) {
            long long bits;
            memcpy(&bits, block + 8 * f, sizeof bits);
            __m256i quarter = _mm256_set1_epi64x(bits);
            /* chunk | (picked & keep): ternary-logic table 0xF8 for A | (B & C) */
            chunk = _mm256_ternarylogic_epi64(chunk, _mm256_multishift_epi64_epi8(control[f], quarter), keep[f], 0xF8);
        }
        _mm256_storeu_si256((__m256i *)(chunks + (size_t)b * GROUP_BLOCK_BYTES), chunk);
    }
    return unused != 0;
}
