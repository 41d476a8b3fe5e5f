/* Causal attention of many query tokens (prefill) over one slot's cache: each task takes one kv head and a
 * few tokens, so every key and value is read once per task for all the task's query rows (tokens x the heads
 * sharing that kv head), scored as 8-row multiply-adds without a horizontal sum per key. */
#ifndef BITNET_CPU_ATTENTION_PREFILL_H
#define BITNET_CPU_ATTENTION_PREFILL_H

#include "float_ops.h"

/* Below this many tokens the per-(token, head) kernel (float_ops.c) serves. */
#define PREFILL_ATTENTION_MIN_TOKENS 9
#define PREFILL_QUERY_ROWS 32

struct prefill_attention_job {
    struct attention_args args;
    int tokens, positions;  /* query tokens; cache positions (bounds the scores) */
};

static inline int prefill_tokens_per_task(int group) { return group >= PREFILL_QUERY_ROWS ? 1 : PREFILL_QUERY_ROWS / group; }

static inline int prefill_attention_tasks(const struct prefill_attention_job *job) {
    int per_task = prefill_tokens_per_task(job->args.group);
    return job->args.heads / job->args.group * ((job->tokens + per_task - 1) / per_task);
}

/* Tasks [begin, end) of prefill_attention_tasks(job): a part for parallel_for. */
void attention_prefill_generic(void *job, int begin, int end);
#if defined(__x86_64__) || defined(_M_X64)
void attention_prefill_avx2(void *job, int begin, int end);
void attention_prefill_avx512(void *job, int begin, int end);
#endif

#endif
