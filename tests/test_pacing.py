"""Paced prefill (engine/pacing.py): chunks sized by a fit of measured step costs. The engine-level tests replace
the measured seconds with a synthetic cost of each step's plan, so that what they check does not depend on the
machine's speed or load."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from bitnet_tt.backends.cpu.backend import CPUBackend
from bitnet_tt.engine import Engine
from bitnet_tt.engine.pacing import DECODE_REFRESH, DECODE_WINDOW, PROBE_TOKENS, ChunkCostFit, Pacer, non_negative_fit
from bitnet_tt.errors import RequestError
from bitnet_tt.sampling import SamplingParams

DECODE, PER_ROW, PER_PAIR = 0.1, 0.002, 1e-5  # synthetic seconds: a decode step, a chunk's row, attention pair


def chunk_work(start: int, count: int) -> tuple[float, float]:
    return count, count * start + count * (count + 1) / 2


def synthetic_seconds(decode_rows: int, chunks: list[tuple[int, int]]) -> float:
    """A step's cost: a fixed decode step, plus each chunk's rows and attention pairs."""
    return DECODE * bool(decode_rows) + sum(PER_ROW * rows + PER_PAIR * pairs
                                            for rows, pairs in (chunk_work(*c) for c in chunks))


def measured_pacer(limit: float = 1.5) -> Pacer:
    pacer = Pacer(chunk_work, limit)
    for _ in range(3):
        pacer.observe(8, [], DECODE)
    for start, count in ((0, 8), (100, 4), (300, 6)):
        pacer.observe(8, [(start, count)], synthetic_seconds(8, [(start, count)]))
    return pacer


def test_the_fit_recovers_a_linear_cost():
    fit = measured_pacer().fit
    assert np.allclose(fit.coefficients, (0, PER_ROW, PER_PAIR))


def test_the_fit_never_has_a_negative_coefficient():
    # extra falls as pairs rise: the unconstrained fit's per-pair cost would be negative
    rows_pairs = np.array([[4.0, 10.0], [4.0, 1000.0], [8.0, 20.0]])
    coefficients = non_negative_fit(rows_pairs, np.array([0.02, 0.01, 0.04]))
    assert coefficients[1] == 0 and coefficients[0] > 0


def test_a_budget_takes_the_most_tokens_that_fit_and_fewer_later_in_a_prompt():
    pacer = measured_pacer(limit=1.5)
    extra = 0.5 * DECODE
    counts = []
    for start in (0, 500, 1000, 2000):
        count = pacer.budget(8, max_tokens=64).take(start, 1000)
        assert synthetic_seconds(8, [(start, count)]) - DECODE <= extra
        assert count == 64 or synthetic_seconds(8, [(start, count + 1)]) - DECODE > extra
        counts.append(count)
    assert counts[0] > counts[1] > counts[2] > counts[3] >= 1


def test_a_budget_gives_one_token_when_none_fits_and_then_none():
    pacer = measured_pacer()
    budget = pacer.budget(8, max_tokens=64)
    assert budget.take(100_000, 50) == 1  # progress: the step's first chunk gets a token
    assert budget.take(0, 50) == 0 and budget.exhausted


def test_where_the_fixed_cost_of_mixing_exceeds_the_budget_a_chunk_gets_one_token():
    pacer = Pacer(chunk_work, limit=1.5)
    pacer.observe(8, [], DECODE)
    fixed = 0.6 * DECODE  # more than the 0.5 decode step the limit leaves
    for start, count in ((0, 8), (100, 4), (300, 6), (40, 12)):
        pacer.observe(8, [(start, count)], DECODE + fixed + PER_ROW * count)
    assert np.allclose(pacer.fit.coefficients, (fixed, PER_ROW, 0))
    assert pacer.budget(8, max_tokens=64).take(1000, 1000) == 1


def test_after_a_run_of_mixed_steps_a_step_measures_a_decode_step_afresh():
    pacer = measured_pacer()
    for _ in range(DECODE_REFRESH - 3):  # measured_pacer observed 3 mixed steps
        assert pacer.budget(8, 64).take(0, 1000) > 0
        pacer.observe(8, [(0, 4)], synthetic_seconds(8, [(0, 4)]))
    refresh = pacer.budget(8, 64)
    assert refresh.take(0, 1000) == 0 and refresh.exhausted
    slower = 2 * DECODE  # the users' contexts grew
    for _ in range(DECODE_WINDOW):
        pacer.observe(8, [], slower)
    assert statistics.median(pacer.decode_seconds) == slower and pacer.budget(8, 64).take(0, 1000) > 0


def test_without_decoding_users_or_a_measured_decode_step_there_is_no_cost_budget():
    pacer = measured_pacer()
    assert pacer.budget(0, 64) is None
    assert Pacer(chunk_work).budget(8, 64) is None


def test_until_the_fit_has_data_chunks_are_probes():
    pacer = Pacer(chunk_work)
    pacer.observe(8, [], DECODE)
    assert pacer.budget(8, 64).take(0, 1000) == PROBE_TOKENS
    assert ChunkCostFit().coefficients is None


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 290, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def synthetic_engine(tiny, tokenizer, chunk: int, limit: float | None = 1.5) -> Engine:
    """A cpu-backend engine whose pacer sees each step's synthetic cost instead of its measured time."""
    engine = Engine(CPUBackend(tiny, max_slots=5, max_context=512, progress=False), tokenizer, prefill_chunk=chunk,
                    mixed_step_limit=limit)
    if engine.pacer:
        observe = engine.pacer.observe
        engine.pacer.observe = lambda rows, chunks, _seconds: observe(rows, chunks, synthetic_seconds(rows, chunks))
    return engine


def serve(engine: Engine) -> tuple[list[list[int]], list]:
    """Four users decode while a 400-token prompt arrives; every request's tokens and each step's plan."""
    users = [engine.submit(prompt(n, seed), greedy(60)) for seed, n in enumerate((3, 9, 17, 5))]
    while not all(u.output_ids for u in users):
        engine.step()
    for _ in range(3):
        engine.step()
    arriving = engine.submit(prompt(400, 7), greedy(5))
    plans = []
    while not arriving.output_ids:
        engine.step()
        plans.append(engine.last_plan)
    engine.run()
    return [r.output_ids for r in users + [arriving]], plans


def test_paced_chunks_keep_every_mixed_step_within_the_limit_and_change_no_output(tiny, tokenizer):
    outputs, plans = serve(synthetic_engine(tiny, tokenizer, chunk=64))
    fixed_outputs, fixed_plans = serve(synthetic_engine(tiny, tokenizer, chunk=64, limit=None))
    assert outputs == fixed_outputs
    assert sum(p.prefill_tokens for p in plans) == 400 == sum(p.prefill_tokens for p in fixed_plans)
    paced = [(c.start, c.stop - c.start) for p in plans for c in p.prefill]
    assert all(len(p.decode) == 4 and len(p.prefill) <= 1 for p in plans)  # every user decodes every step
    mixed_runs = "".join("m" if p.prefill else "d" for p in plans).split("d")  # a decode-only step re-measures
    assert max(map(len, mixed_runs)) <= DECODE_REFRESH and len(mixed_runs) > 1
    # after the probes, each mixed step's cost stays within 1.5 decode steps, and chunks shrink along the prompt
    measured = [c for c in paced if c[1] != PROBE_TOKENS][1:]
    assert all(synthetic_seconds(4, [c]) <= 1.5 * DECODE + 1e-12 for c in measured)
    assert measured[0][1] > measured[-1][1] >= 1 and max(count for _, count in paced) <= 64
    assert max(synthetic_seconds(4, [(start, 64)]) for start, _ in paced) > 2 * DECODE  # fixed chunks would not


def test_a_mixed_step_limit_must_exceed_one_decode_step(tiny, tokenizer):
    with pytest.raises(RequestError, match="mixed_step_limit must be above 1"):
        synthetic_engine(tiny, tokenizer, chunk=16, limit=1.0)
