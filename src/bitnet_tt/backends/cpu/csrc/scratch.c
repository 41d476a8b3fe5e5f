#include "scratch.h"

#include <stdlib.h>

static _Thread_local void *buffers[SCRATCH_SLOTS];
static _Thread_local size_t sizes[SCRATCH_SLOTS];

void *thread_scratch(enum scratch_slot slot, size_t bytes) {
    if (sizes[slot] < bytes) {
        size_t rounded = (bytes + 63) / 64 * 64;
        free(buffers[slot]);
        buffers[slot] = aligned_alloc(64, rounded);
        if (!buffers[slot]) abort();
        sizes[slot] = rounded;
    }
    return buffers[slot];
}
