"""`bitnet-tt bench`: per-user and aggregate decode throughput at several batch sizes, and engine overhead."""

from __future__ import annotations

import time

import torch

from .engine import Engine
from .sampling import SamplingParams


def run_engine_bench(engine: Engine, batch_sizes: list[int], prompt_tokens: int, new_tokens: int,
                     ttft_lengths: list[int] = (), temperature: float = 0.0, top_k: int = 0) -> list[dict]:
    """Fill `batch` slots with random prompts, decode `new_tokens` each (greedy, or sampled with the given
    temperature and top_k), print one row per batch size.

    Overhead is the share of a decode step spent outside the backend (scheduling, sampling, detokenising).
    Prefill runs until every user has its first token, the engine's prefill chunk per step: when the batch's
    prompts exceed one chunk, the first users already decode in those steps.
    """
    config = engine.backend.config
    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, top_k=top_k, seed=0, ignore_eos=True)
    picking = f"sampled (temperature {temperature}, top_k {top_k or 'off'})" if temperature else "greedy"
    print(f"model: {config.num_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}; "
          f"prompt {prompt_tokens} tokens, {new_tokens} new tokens per user, {picking}; threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s/user':>18} {'aggregate tok/s':>16} "
          f"{'ITL p50 ms':>11} {'overhead %':>11}")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch in batch_sizes:
        prompts = [torch.randint(0, config.vocab_size, (prompt_tokens,), generator=gen).tolist() for _ in range(batch)]
        requests = [engine.submit(p, params) for p in prompts]
        stats = engine.stats
        prefill_started = time.perf_counter()
        while not all(r.output_ids for r in requests):  # admit and prefill every request (batch <= slots)
            engine.step()
        prefill_s = time.perf_counter() - prefill_started
        steps_before, step_s_before, backend_s_before = stats.steps, stats.step_seconds, stats.backend_seconds
        decode_started = time.perf_counter()
        engine.run()
        decode_s = time.perf_counter() - decode_started
        step_s = stats.step_seconds - step_s_before
        overhead = 1 - (stats.backend_seconds - backend_s_before) / step_s if step_s else 0.0
        per_user = (new_tokens - 1) / decode_s
        itl = sorted(stats.decode_step_seconds[-(stats.steps - steps_before):])
        row = {"batch": batch, "prefill_tokens_per_s": batch * prompt_tokens / prefill_s,
               "decode_tokens_per_s_per_user": per_user, "aggregate_tokens_per_s": per_user * batch,
               "itl_p50_ms": 1000 * itl[len(itl) // 2], "overhead_pct": 100 * overhead}
        rows.append(row)
        assert all(r.finished for r in requests)
        print(f"{batch:>5} {row['prefill_tokens_per_s']:>14.1f} {per_user:>18.2f} {row['aggregate_tokens_per_s']:>16.2f} "
              f"{row['itl_p50_ms']:>11.2f} {row['overhead_pct']:>11.2f}")
    room = engine.backend.max_context - 1  # one position stays free for the first generated token
    for length in ttft_lengths:
        cut = f" (cut from {length}: the context holds {engine.backend.max_context})" if length > room else ""
        length = min(length, room)
        print(f"time to first token, {length}-token prompt{cut}: "
              f"{1000 * time_to_first_token(engine, length, gen):.1f} ms")
    for name, value in engine.backend.describe().items():
        print(f"{name}: {value}")
    return rows


def time_to_first_token(engine: Engine, length: int, gen: torch.Generator) -> float:
    prompt = torch.randint(0, engine.backend.config.vocab_size, (length,), generator=gen).tolist()
    [request] = engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True))
    return request.stats.first_token - request.stats.submitted
