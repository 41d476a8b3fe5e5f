/* Portable repacking of a converted checkpoint's 2-bit rows (pack.h): the reference for the vector copy. */
#include <string.h>

#include "kernels.h"
#include "pack.h"

/* SPREAD[byte]: the byte's four 2-bit fields, field i in byte i of the word. */
static uint32_t SPREAD[256];

void init_spread(void) {
    for (int b = 0; b < 256; b++)
        SPREAD[b] = (uint32_t)(b & 3) | (uint32_t)((b >> 2) & 3) << 8 | (uint32_t)((b >> 4) & 3) << 16 |
                    (uint32_t)((b >> 6) & 3) << 24;
}

int spread_rows_generic(const uint8_t *src, int blocks, uint8_t *chunks) {
    int bad = 0;
    for (int b = 0; b < blocks; b++) {
        const uint8_t *block = src + (size_t)b * (BLOCK_INPUTS / 4);
        uint32_t words[CHUNK_BYTES / 4] = {0};
        for (int f = 0; f < 4; f++)
            for (int q = 0; q < CHUNK_BYTES / 4; q++) {
                uint8_t byte = block[8 * f + q];
                bad |= (byte & (byte >> 1) & 0x55) != 0;
                words[q] |= SPREAD[byte] << (2 * f);
            }
        memcpy(chunks + (size_t)b * GROUP_BLOCK_BYTES, words, CHUNK_BYTES);
    }
    return bad;
}
