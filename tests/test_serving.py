"""Serving many users: chunked prefill between decode steps, the prefix cache, fairness and cancellation.

Exactness is checked in float64, where the PyTorch backend's logits do not depend on how a prompt is cut
into chunks or whether its positions were written by prefill or by decode steps (in float32 and bfloat16
the attention kernel's blocking depends on the query length, so the last bits can differ)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bitnet_tt import LLM
from bitnet_tt.backends.base import Backend
from bitnet_tt.backends.cpu.backend import CPUBackend
from bitnet_tt.backends.torch.backend import TorchBackend, load_torch_backend
from bitnet_tt.engine import Engine
from bitnet_tt.engine.slots import SlotPool
from bitnet_tt.errors import BitNetError
from bitnet_tt.sampling import SamplingParams
from bitnet_tt.server.protocol import ChatCompletionRequest

WHOLE = 10_000  # a prefill chunk longer than any prompt here: whole-prompt prefill


def greedy(n: int, **extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True, **extra)


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 290, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_engine(tiny, tokenizer, slots=2, chunk=WHOLE, dtype="float64", context=256, backend_type=TorchBackend,
                idle_chunk=1):
    """idle_chunk 1: chunks of `chunk` also in steps where nobody decodes (most tests here prefill alone)."""
    from bitnet_tt.checkpoint import load_weights

    backend = backend_type(load_weights(tiny, progress=False), max_slots=slots, max_context=context, dtype=dtype)
    return Engine(backend, tokenizer, prefill_chunk=chunk, idle_prefill_chunk=idle_chunk)


def record_prefill_logits(engine: Engine) -> dict[int, list[torch.Tensor]]:
    """Observe the logits the backend's prefill returns, per slot (the last chunk's are the first token's)."""
    seen: dict[int, list[torch.Tensor]] = {}
    prefill = engine.backend.prefill

    def recording(slot, token_ids):
        logits = prefill(slot, token_ids)
        seen.setdefault(slot, []).append(logits)
        return logits

    engine.backend.prefill = recording
    return seen


def steps_until(engine: Engine, done) -> list:
    """Step until done(); return each step's plan."""
    plans = []
    while not done():
        engine.step()
        plans.append(engine.last_plan)
    return plans


# --- chunked prefill ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 32, 64])
def test_chunked_prefill_equals_whole_prompt_prefill(tiny, tokenizer, chunk):
    prompts = [random_prompt(n, seed) for seed, n in enumerate((5, 40, 100))]
    whole = make_engine(tiny, tokenizer, 3)
    whole_logits = record_prefill_logits(whole)
    expected = [r.output_ids for r in whole.generate(prompts, greedy(10))]
    engine = make_engine(tiny, tokenizer, 3, chunk=chunk)
    chunked_logits = record_prefill_logits(engine)
    requests = [engine.submit(p, greedy(10)) for p in prompts]
    plans = steps_until(engine, lambda: not engine.has_work())
    assert [r.output_ids for r in requests] == expected
    for slot in range(len(prompts)):  # the first token's logits, bit for bit
        assert torch.equal(chunked_logits[slot][-1], whole_logits[slot][-1])
    assert max(p.prefill_tokens for p in plans) == min(chunk, 145)
    assert sum(p.prefill_tokens for p in plans) == 145  # every prompt token prefilled once


# --- one forward pass per step (cpu backend) -------------------------------------------------------------


class SeparateCalls(CPUBackend):
    """The cpu backend with the base class's step: a forward pass for each chunk and one for the decode rows."""

    step = Backend.step


def record_steps(engine: Engine) -> list:
    """Observe what each backend step returns."""
    results = []
    step = engine.backend.step

    def recording(*args):
        results.append(step(*args))
        return results[-1]

    engine.backend.step = recording
    return results


def serve_while_prompts_arrive(tiny, tokenizer, backend_type, chunk, params):
    """Three users start, then two prompts (one longer than the workspace's rows) arrive while they decode."""
    engine = Engine(backend_type(tiny, max_slots=5, max_context=512, progress=False), tokenizer, prefill_chunk=chunk,
                    mixed_step_limit=None)  # fixed chunks: both runs' steps alike
    results = record_steps(engine)
    users = [engine.submit(random_prompt(n, seed), params) for seed, n in enumerate((3, 11, 20))]
    for _ in range(2):
        engine.step()
    arriving = [engine.submit(random_prompt(n, 10 + n), params) for n in (40, 300)]
    plans = steps_until(engine, lambda: not engine.has_work())
    return [r.output_ids for r in users + arriving], results, plans


@pytest.mark.parametrize("chunk", [1, 7, 32, WHOLE])
@pytest.mark.parametrize("params", [greedy(24), SamplingParams(temperature=0.8, max_new_tokens=24, ignore_eos=True,
                                                                 seed=5)], ids=["greedy", "sampled"])
def test_one_forward_pass_per_step_equals_separate_calls(tiny, tokenizer, chunk, params):
    """Bit for bit: the prefill chunks' and the decode rows' logits (or greedy picks) of every step, on the cpu
    backend in fp32; a row at a wrong position or in a wrong slot would change them."""
    outputs, fused, plans = serve_while_prompts_arrive(tiny, tokenizer, CPUBackend, chunk, params)
    expected, separate, _ = serve_while_prompts_arrive(tiny, tokenizer, SeparateCalls, chunk, params)
    assert outputs == expected and len(fused) == len(separate)
    assert any(p.prefill and p.decode for p in plans)  # steps that prefill while users decode
    for a, b in zip(fused, separate):
        assert [x is None for x in a.prefill] == [y is None for y in b.prefill]
        assert all(np.array_equal(x, y) for x, y in zip(a.prefill, b.prefill) if x is not None)
        assert np.array_equal(a.decode, b.decode) if isinstance(a.decode, np.ndarray) else a.decode == b.decode
    # only a prompt's last chunk asks for logits (the others skip the LM head)
    wanted = [part is not None for result in fused for part in result.prefill]
    assert sum(wanted) == 5 and (chunk == WHOLE or not all(wanted))
    if params.temperature == 0:  # and as whole prompts prefilled alone
        assert outputs == serve_while_prompts_arrive(tiny, tokenizer, SeparateCalls, WHOLE, params)[0]


# --- scheduling, fairness, cancellation ------------------------------------------------------------------


def test_running_users_decode_every_step_while_a_long_prompt_arrives(tiny, tokenizer):
    chunk = 16
    engine = make_engine(tiny, tokenizer, slots=9, chunk=chunk, dtype="float32", context=512)
    users = [engine.submit(random_prompt(2, seed), greedy(400)) for seed in range(8)]
    steps_until(engine, lambda: all(u.output_ids for u in users))
    long = engine.submit(random_prompt(300, 99), greedy(3))
    before = [len(u.output_ids) for u in users]
    plans = steps_until(engine, lambda: bool(long.output_ids))
    assert len(plans) == math.ceil(300 / chunk)
    for plan in plans:  # each step: every running user decodes, and the prompt advances by at most one chunk
        assert plan.prefill_tokens <= chunk
        assert set(map(id, plan.decode)) == set(map(id, users))
    assert [len(u.output_ids) - b for u, b in zip(users, before)] == [len(plans)] * 8


def test_whole_prompt_prefill_holds_every_user_for_one_long_step(tiny, tokenizer):
    """The behaviour chunking replaces: one step prefills the whole prompt, however long."""
    engine = make_engine(tiny, tokenizer, slots=3, chunk=WHOLE, dtype="float32", context=512)
    users = [engine.submit(random_prompt(2, seed), greedy(50)) for seed in range(2)]
    engine.step()
    long = engine.submit(random_prompt(300, 99), greedy(3))
    engine.step()
    assert long.output_ids and engine.last_plan.prefill_tokens == 300 and len(engine.last_plan.decode) == 2


def test_the_queue_is_admitted_first_come_first_served_within_a_bounded_number_of_steps(tiny, tokenizer):
    chunk = 8
    engine = make_engine(tiny, tokenizer, slots=4, chunk=chunk, dtype="float32")
    lengths = [40, 3, 25, 1, 60, 9]
    requests = [engine.submit(random_prompt(n, seed), greedy(2)) for seed, n in enumerate(lengths)]
    admitted_at = {}
    for step in range(1, 100):
        engine.step()
        for request in engine.last_plan.admitted:
            admitted_at[request.id] = step
        if not engine.has_work():
            break
    order = sorted(requests, key=lambda r: admitted_at[r.id])
    assert order == requests  # first come, first served
    for i, request in enumerate(requests[:4]):  # slots for all four: only the prompts ahead delay them
        assert admitted_at[request.id] <= sum(lengths[:i]) // chunk + 1


def test_a_short_prompt_shares_the_step_budget_with_a_long_one(tiny, tokenizer):
    engine = make_engine(tiny, tokenizer, slots=2, chunk=16, dtype="float32")
    first = engine.submit(random_prompt(10, 0), greedy(2))
    second = engine.submit(random_prompt(30, 1), greedy(2))
    engine.step()
    assert [(c.request, c.start, c.stop) for c in engine.last_plan.prefill] == [(first, 0, 10), (second, 0, 6)]
    assert first.output_ids and not second.output_ids


def test_a_step_in_which_nobody_decodes_takes_up_to_the_idle_chunk(tiny, tokenizer):
    engine = make_engine(tiny, tokenizer, slots=3, chunk=8, dtype="float32", idle_chunk=40)
    first = engine.submit(random_prompt(30, 0), greedy(20))
    second = engine.submit(random_prompt(30, 1), greedy(20))
    engine.step()  # no stream to hold back
    assert [(c.request, c.start, c.stop) for c in engine.last_plan.prefill] == [(first, 0, 30), (second, 0, 10)]
    engine.step()  # the first user decodes: the chunk again
    assert engine.last_plan.decode == [first]
    assert [(c.request, c.start, c.stop) for c in engine.last_plan.prefill] == [(second, 10, 18)]
    idle = make_engine(tiny, tokenizer, chunk=64, idle_chunk=16)  # never below the chunk
    request = idle.submit(random_prompt(50, 2), greedy(1))
    idle.step()
    assert request.prefilled == 50


def test_cancelling_midway_through_a_prompt_frees_the_slot_for_the_next_request(tiny, tokenizer):
    engine = make_engine(tiny, tokenizer, slots=1, chunk=8, dtype="float32")
    long = engine.submit(random_prompt(100, 0), greedy(5))
    queued = engine.submit(random_prompt(3, 1), greedy(2))
    for _ in range(3):
        engine.step()
    assert long.prefilled == 24 and engine.backend.slot_length(0) == 24 and queued.slot is None
    engine.cancel(long.id)
    outputs = engine.step()
    assert long.finish_reason == "cancelled" and any(o.request is long and o.finished for o in outputs)
    assert engine.last_plan.admitted == [queued] and queued.slot == 0 and engine.backend.slot_length(0) == 3
    engine.run()
    assert queued.finish_reason == "length" and not engine.has_work()


def test_requests_with_one_prompt_share_its_chunked_prefill(tiny, tokenizer):
    """n > 1 choices: the first request's prompt is prefilled in chunks, the others copy its slot when it completes."""
    engine = make_engine(tiny, tokenizer, slots=3, chunk=16)
    prefilled = record_prefill_logits(engine)
    prompt = random_prompt(100, 0)
    requests = [engine.submit(prompt, greedy(5)) for _ in range(3)]
    plans = steps_until(engine, lambda: all(r.output_ids for r in requests))
    assert len(plans) == math.ceil(100 / 16) and all(p.prefill_tokens <= 16 for p in plans)
    assert [(s.id, t.id) for s, t in plans[-1].copies] == [(requests[0].id, r.id) for r in requests[1:]]
    assert list(prefilled) == [requests[0].slot]  # one prefill, in chunks
    engine.run()
    [alone] = make_engine(tiny, tokenizer, slots=1).generate([prompt], greedy(5))
    assert [r.output_ids for r in requests] == [alone.output_ids] * 3


class WholePromptBackend(TorchBackend):
    """The ttnn backend's contract: a prompt is prefilled whole, into an empty slot."""

    supports_prefix_prefill = False

    def prefill(self, slot, token_ids):
        assert self.slot_length(slot) == 0, "prefill into a slot that holds context"
        return super().prefill(slot, token_ids)


def test_a_backend_without_prefix_prefill_gets_whole_prompts_and_no_reuse(tiny, tokenizer):
    engine = make_engine(tiny, tokenizer, slots=2, chunk=16, dtype="float32", backend_type=WholePromptBackend)
    shared = random_prompt(40, 0)
    first = engine.submit(shared, greedy(4))
    second = engine.submit(shared + [5, 6], greedy(4))
    engine.step()  # the first prompt alone exceeds the budget: one whole prompt per step
    assert [(c.start, c.stop) for c in engine.last_plan.prefill] == [(0, 40)] and first.output_ids
    engine.run()
    third = engine.submit(shared + [5, 6], greedy(4))
    engine.run()
    assert second.cached_tokens == third.cached_tokens == 0
    assert third.output_ids == second.output_ids
    assert all(engine.backend.slot_length(s) == 0 for s in range(2))  # nothing kept for later


# --- the prefix cache ----------------------------------------------------------------------------------


def test_a_reused_prefix_gives_the_logits_of_a_fresh_run(tiny, tokenizer):
    engine = make_engine(tiny, tokenizer, slots=2, chunk=7)
    cached_logits = record_prefill_logits(engine)
    history = random_prompt(60, 0)
    [turn] = engine.generate([history], greedy(9))
    # The slot holds the prompt and every generated token but the last (it was never fed back).
    follow_up = history + turn.output_ids + random_prompt(20, 1)
    [reused] = engine.generate([follow_up], greedy(6))
    assert reused.slot == turn.slot and reused.cached_tokens == 60 + 9 - 1

    fresh_engine = make_engine(tiny, tokenizer, slots=1)
    fresh_logits = record_prefill_logits(fresh_engine)
    [fresh] = fresh_engine.generate([follow_up], greedy(6))
    assert torch.equal(cached_logits[reused.slot][-1], fresh_logits[0][-1])
    assert reused.output_ids == fresh.output_ids


def test_the_prefix_cache_never_reuses_past_the_first_differing_token(tiny, tokenizer):
    engine = make_engine(tiny, tokenizer, slots=2)
    logits = record_prefill_logits(engine)
    first = random_prompt(50, 0)
    engine.generate([first], greedy(3))
    diverging = first[:30] + [(first[30] + 1) % 290] + first[31:]
    [request] = engine.generate([diverging], greedy(3))
    assert request.cached_tokens == 30

    fresh = make_engine(tiny, tokenizer, slots=1)
    fresh_logits = record_prefill_logits(fresh)
    fresh.generate([diverging], greedy(3))
    assert torch.equal(logits[request.slot][-1], fresh_logits[0][-1])


def test_an_identical_prompt_reuses_all_but_its_last_token(tiny, tokenizer):
    engine = make_engine(tiny, tokenizer, slots=1)
    prompt = random_prompt(30, 0)
    [first] = engine.generate([prompt], greedy(4))
    [again] = engine.generate([prompt], greedy(4))
    assert again.cached_tokens == 29 and again.output_ids == first.output_ids


def test_cache_prompt_false_neither_reuses_nor_leaves_a_prefix(tiny, tokenizer):
    engine = make_engine(tiny, tokenizer, slots=1)
    prompt = random_prompt(30, 0)
    engine.generate([prompt], greedy(4))
    [opted_out] = engine.generate([prompt], greedy(4, cache_prompt=False))
    assert opted_out.cached_tokens == 0 and engine.backend.slot_length(0) == 0
    [after] = engine.generate([prompt], greedy(4))
    assert after.cached_tokens == 0 and after.output_ids == opted_out.output_ids


def test_the_slot_pool_evicts_the_least_recently_released_prefix():
    pool = SlotPool(3)
    for prompt in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        slot, reused = pool.acquire(prompt, reuse=True)
        pool.release(slot, prompt)
    assert pool.acquire([4, 5, 7], reuse=True) == (1, 2)  # the longest common prefix wins
    assert pool.acquire([10, 11], reuse=True) == (0, 0)  # no match: the least recently released goes
    assert pool.acquire([7, 8, 9], reuse=True) == (2, 2)  # one prompt token is always left to prefill
    assert not pool.has_free


def test_chat_second_turn_reuses_the_first_through_the_api(tiny):
    with LLM(tiny, max_batch=2, max_context=256, dtype="float32", prefill_chunk=16) as llm:
        messages = [{"role": "system", "content": "You are a helpful assistant. " * 6},
                    {"role": "user", "content": "Hello! How are you today?"}]
        params = SamplingParams(temperature=0.0, max_new_tokens=8)
        first = llm.finish(llm.submit_chat(messages, params))
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And tomorrow?"}]
        second = llm.finish(llm.submit_chat(messages, params))
        # The first turn's prompt is the second's prefix but for its last token(s), where the reply's
        # text may be tokenised together with "Assistant: ".
        assert len(first.prompt_ids) - 3 <= second.cached_tokens < len(second.prompt_ids)
        assert second.result()["cached_prompt_tokens"] == second.cached_tokens


def test_without_a_chunk_the_engine_takes_the_backends_default(tiny, tokenizer):
    class SmallChunks(TorchBackend):
        default_prefill_chunk = 5

    engine = make_engine(tiny, tokenizer, chunk=None, backend_type=SmallChunks)
    request = engine.submit(random_prompt(12, 1), greedy(1))
    plans = steps_until(engine, lambda: request.finished)
    assert [c.stop - c.start for p in plans for c in p.prefill] == [5, 5, 2]
    with LLM(tiny, backend="cpu", max_batch=1) as llm:
        assert llm.engine.scheduler.prefill_chunk == 16  # the cpu backend's, by measurement (README)


def test_prefill_chunk_and_cache_prompt_options_are_checked(tiny):
    with pytest.raises(BitNetError, match="prefill_chunk must be at least 1"):
        LLM(tiny, prefill_chunk=0)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "cache_prompt": False}
    assert ChatCompletionRequest.model_validate(body).sampling_params(4).cache_prompt is False
    assert ChatCompletionRequest.model_validate({**body, "cache_prompt": True}).sampling_params(4).cache_prompt


def test_a_bad_prefill_chunk_is_a_one_line_error(tiny):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "bitnet_tt.cli", "generate", "--model", str(tiny),
                             "--prefill-chunk", "0", "hi"], capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "argument --prefill-chunk: must be at least 1" in lines[0]
