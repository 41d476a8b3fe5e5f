/* parallel_for over a persistent pool of pthreads (pool.c). */
#ifndef BITNET_CPU_POOL_H
#define BITNET_CPU_POOL_H

typedef void (*part_fn)(void *ctx, int begin, int end);

/* Run fn(ctx, begin, end) over [0, tasks) split into `threads` contiguous parts; returns when all are done. */
void parallel_for(part_fn fn, void *ctx, int tasks, int threads);

#endif
