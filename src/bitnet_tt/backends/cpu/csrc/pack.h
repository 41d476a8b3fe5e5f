/* Repacking a converted checkpoint's 2-bit rows (code + 1 of input 4q + i in bits 2i of byte q) into the
 * row-group layout (kernels.h), a row at a time. */
#ifndef BITNET_CPU_PACK_H
#define BITNET_CPU_PACK_H

#include <stdint.h>

/* The `blocks` full 128-input blocks of one source row into its chunks (GROUP_BLOCK_BYTES apart);
 * returns nonzero when a field holds the unused code 3. */
typedef int (*spread_rows_fn)(const uint8_t *src, int blocks, uint8_t *chunks);

void init_spread(void);  /* once, before spread_rows_generic */
int spread_rows_generic(const uint8_t *src, int blocks, uint8_t *chunks);
#if defined(__x86_64__) || defined(_M_X64)
int spread_rows_avx512vbmi(const uint8_t *src, int blocks, uint8_t *chunks);
#endif

#endif
