/* A small persistent thread pool: parallel_for splits [0, tasks) into chunks that the caller and the
 * workers claim one at a time.
 *
 * Claiming (rather than a fixed part per thread) keeps a job going when a worker is descheduled on a
 * busy machine: the other threads take its chunks. Workers spin briefly after each job (a decode step
 * issues hundreds of short jobs back to back) and then sleep on a condition variable. Its own pthreads,
 * not OpenMP: PyTorch brings its own OpenMP runtime, and two runtimes in one process compete for cores.
 *
 * One 64-bit word holds the job's generation, the next unclaimed chunk and the chunk count, so that a
 * claim (compare-and-swap on the whole word) can only succeed for the job a thread has read.
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
#define CHUNKS_PER_THREAD 4
#define MAX_CHUNKS 0xffff

#define WORD(gen, next, total) (((uint64_t)(gen) << 32) | ((uint64_t)(next) << 16) | (uint64_t)(total))
#define GEN(word) ((uint32_t)((word) >> 32))
#define NEXT(word) ((int)(((word) >> 16) & 0xffff))
#define TOTAL(word) ((int)((word) & 0xffff))

static struct {
    pthread_mutex_t call_lock, lock;
    pthread_cond_t wake;
    _Atomic uint64_t word;
    atomic_int done;
    /* the current job, written before its word is published */
    part_fn fn;
    void *ctx;
    int tasks, participants;
    int workers;
    uint32_t started_at[MAX_WORKERS + 1];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* Claim and run chunks of the job of generation `gen` until none is left. */
static void work(uint32_t gen) {
    uint64_t word = atomic_load_explicit(&pool.word, memory_order_acquire);
    while (GEN(word) == gen && NEXT(word) < TOTAL(word)) {
        part_fn fn = pool.fn;
        void *ctx = pool.ctx;
        int tasks = pool.tasks;
        if (!atomic_compare_exchange_weak_explicit(&pool.word, &word, word + (1u << 16), memory_order_acquire,
                                                   memory_order_acquire))
            continue;
        int chunk = NEXT(word), total = TOTAL(word);
        int begin = (int)((int64_t)tasks * chunk / total), end = (int)((int64_t)tasks * (chunk + 1) / total);
        if (begin < end) fn(ctx, begin, end);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
        word = atomic_load_explicit(&pool.word, memory_order_acquire);
    }
}

static uint32_t next_generation(uint32_t seen) {
    uint32_t now;
    for (int spin = 0; spin < WORKER_SPINS; spin++) {
        if ((now = GEN(atomic_load_explicit(&pool.word, memory_order_acquire))) != seen) return now;
        CPU_RELAX();
    }
    pthread_mutex_lock(&pool.lock);
    while ((now = GEN(atomic_load_explicit(&pool.word, memory_order_acquire))) == seen)
        pthread_cond_wait(&pool.wake, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    return now;
}

static void *worker_main(void *arg) {
    int index = (int)(intptr_t)arg;
    uint32_t seen = pool.started_at[index];
    for (;;) {
        seen = next_generation(seen);
        /* participants is read before claiming; a stale value only makes this worker join or sit out. */
        if (index < pool.participants) work(seen);
    }
    return NULL;
}

/* Start workers 1 .. count; called with call_lock held, before the next job is published. */
static void ensure_workers(int count) {
    while (pool.workers < count && pool.workers < MAX_WORKERS) {
        int index = pool.workers + 1;
        pool.started_at[index] = GEN(atomic_load(&pool.word));
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)index);
        pthread_attr_destroy(&attr);
        if (failed) return;  /* fewer workers: the caller claims their chunks */
        pool.workers = index;
    }
}

/* fn over [0, tasks) in `total` chunks (at most tasks, MAX_CHUNKS) that the threads claim. */
static void run_chunks(part_fn fn, void *ctx, int tasks, int threads, int total) {
    if (threads > tasks) threads = tasks;
    if (threads <= 1) {
        if (tasks > 0) fn(ctx, 0, tasks);
        return;
    }
    total = total > tasks ? tasks : total > MAX_CHUNKS ? MAX_CHUNKS : total;
    pthread_mutex_lock(&pool.call_lock);
    ensure_workers(threads - 1);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.tasks = tasks;
    pool.participants = threads;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    uint32_t gen = GEN(atomic_load(&pool.word)) + 1;
    pthread_mutex_lock(&pool.lock);
    atomic_store_explicit(&pool.word, WORD(gen, 0, total), memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    work(gen);
    for (long spin = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < total; spin++) {
        if (spin < WORKER_SPINS) CPU_RELAX();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool.call_lock);
}

void parallel_for(part_fn fn, void *ctx, int tasks, int threads) {
    run_chunks(fn, ctx, tasks, threads, threads * CHUNKS_PER_THREAD);
}

void parallel_for_each(part_fn fn, void *ctx, int tasks, int threads) { run_chunks(fn, ctx, tasks, threads, tasks); }
