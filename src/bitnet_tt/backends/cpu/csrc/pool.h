/* parallel_for over a persistent pool of pthreads (pool.c). */
#ifndef BITNET_CPU_POOL_H
#define BITNET_CPU_POOL_H

typedef void (*part_fn)(void *ctx, int begin, int end);

/* Run fn(ctx, begin, end) over [0, tasks) on up to `threads` threads, which claim contiguous chunks of it (4 per
 * thread); returns when all are done. */
void parallel_for(part_fn fn, void *ctx, int tasks, int threads);

/* The same, the threads claiming one task at a time: for tasks of very different cost (attention of tokens at
 * different positions), where a few chunks of equal task counts can leave one thread all the work. */
void parallel_for_each(part_fn fn, void *ctx, int tasks, int threads);

#endif
