/* A small persistent thread pool: parallel_for splits [0, tasks) into contiguous parts, one per thread.
 *
 * Workers spin briefly after each job (a decode step issues hundreds of short jobs back to back) and then
 * sleep on a condition variable. Its own pthreads, not OpenMP: PyTorch brings its own OpenMP runtime,
 * and two runtimes in one process compete for the cores.
 */
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#define MAX_WORKERS 255
#define WORKER_SPINS 20000

static struct {
    pthread_mutex_t call_lock, lock;
    pthread_cond_t wake;
    atomic_uint generation;
    atomic_int pending;
    part_fn fn;
    void *ctx;
    int tasks, parts, workers;
    unsigned started_at[MAX_WORKERS + 1];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static void run_part(int index) {
    int begin = (int)((int64_t)pool.tasks * index / pool.parts);
    int end = (int)((int64_t)pool.tasks * (index + 1) / pool.parts);
    if (begin < end) pool.fn(pool.ctx, begin, end);
}

static unsigned next_generation(unsigned seen) {
    unsigned now;
    for (int spin = 0; spin < WORKER_SPINS; spin++) {
        if ((now = atomic_load_explicit(&pool.generation, memory_order_acquire)) != seen) return now;
        CPU_RELAX();
    }
    pthread_mutex_lock(&pool.lock);
    while ((now = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen)
        pthread_cond_wait(&pool.wake, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    return now;
}

static void *worker_main(void *arg) {
    int index = (int)(intptr_t)arg;
    unsigned seen = pool.started_at[index];
    for (;;) {
        seen = next_generation(seen);
        if (index < pool.parts) run_part(index);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

/* Start workers 1 .. count; called with call_lock held, before the next generation is published. */
static int ensure_workers(int count) {
    while (pool.workers < count) {
        int index = pool.workers + 1;
        pool.started_at[index] = atomic_load(&pool.generation);
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)index);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.workers = index;
    }
    return pool.workers + 1;
}

void parallel_for(part_fn fn, void *ctx, int tasks, int threads) {
    if (threads > tasks) threads = tasks;
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    if (threads <= 1) {
        if (tasks > 0) fn(ctx, 0, tasks);
        return;
    }
    pthread_mutex_lock(&pool.call_lock);
    int available = ensure_workers(threads - 1);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.tasks = tasks;
    pool.parts = threads < available ? threads : available;
    atomic_store_explicit(&pool.pending, pool.workers, memory_order_relaxed);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    run_part(0);
    for (long spin = 0; atomic_load_explicit(&pool.pending, memory_order_acquire) > 0; spin++) {
        if (spin < WORKER_SPINS) CPU_RELAX();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool.call_lock);
}
