"""Requests with the same prompt admitted in one step share one prefill (n > 1 choices): the copied KV cache
gives exactly what a prefill of each would."""

from __future__ import annotations


import pytest
import torch

from bitnet_tt.backends.torch.backend import load_torch_backend
from bitnet_tt.config import ModelConfig
from bitnet_tt.engine import Engine
from bitnet_tt.errors import CapacityError
from bitnet_tt.sampling import SamplingParams
from bitnet_tt.tokenizer import Tokenizer

PROMPTS = ["Tell me about the sea", "Tell me about the sea", "A fox", "Tell me about the sea"]


def run(tiny, copies_slots: bool, params: list[SamplingParams]):
    backend = load_torch_backend(tiny, max_slots=4, max_context=96, dtype="float32", progress=False)
    backend.copies_slots = copies_slots
    prefills = []
    prefill = backend.prefill
    backend.prefill = lambda slot, ids: prefills.append(slot) or prefill(slot, ids)
    engine = Engine(backend, Tokenizer(tiny, ModelConfig.from_folder(tiny)))
    requests = [engine.submit(prompt, p) for prompt, p in zip(PROMPTS, params)]
    engine.run()
    return [(r.output_ids, [c.logprob for c in r.choices]) for r in requests], prefills


@pytest.mark.parametrize("params", [
    [SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True, logprobs=True)] * 4,
    [SamplingParams(temperature=1.0, seed=s, max_new_tokens=10, ignore_eos=True, logprobs=True) for s in range(4)],
])
def test_a_copied_prefill_generates_what_a_prefill_would(tiny, params):
    shared, shared_prefills = run(tiny, True, params)
    separate, separate_prefills = run(tiny, False, params)
    assert (shared_prefills, separate_prefills) == ([0, 2], [0, 1, 2, 3])  # the same prompt is prefilled once
    assert shared == separate


def test_a_choice_that_ends_at_its_first_token_leaves_the_copy_intact(tiny):
    first_only = SamplingParams(temperature=0.0, max_new_tokens=1)
    longer = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, logprobs=True)
    params = [first_only, longer, longer, first_only]
    assert run(tiny, True, params) == (run(tiny, False, params)[0], [0, 2])


def test_copy_slot_checks_its_slots(tiny):
    backend = load_torch_backend(tiny, max_slots=3, max_context=32, dtype="float32", progress=False)
    backend.prefill(0, [1, 2, 3])
    backend.prefill(1, [4])
    for source, target, length in ((0, 1, 3), (0, 2, 4), (0, 0, 3), (2, 1, 1), (0, 5, 1)):
        with pytest.raises(CapacityError):
            backend.copy_slot(source, target, length)
    backend.copy_slot(0, 2, 2)
    assert backend.slot_length(2) == 2
    keys = backend.model.cache.keys
    assert torch.equal(keys[:, 2, :, :2], keys[:, 0, :, :2]) and not keys[:, 2, :, 2:].any()
