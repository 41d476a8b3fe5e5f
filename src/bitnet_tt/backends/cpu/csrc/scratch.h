/* Per-thread scratch memory of the kernels, kept between calls: it grows once to the largest size asked
 * and is then reused, so that a step allocates nothing (and faults no fresh pages) once warm. */
#ifndef BITNET_CPU_SCRATCH_H
#define BITNET_CPU_SCRATCH_H

#include <stddef.h>

enum scratch_slot { SCRATCH_GEMM_PANEL, SCRATCH_ATTENTION, SCRATCH_ROW, SCRATCH_HEAD_INPUTS, SCRATCH_TOKEN_PAIRS,
                    SCRATCH_SLOTS };

/* At least `bytes` bytes aligned to 64 for the calling thread's `slot`; aborts when memory runs out
 * (at most a few MB per thread: nothing sensible is left to do without them). */
void *thread_scratch(enum scratch_slot slot, size_t bytes);

#endif
