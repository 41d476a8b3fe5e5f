"""Sampling options change the distribution as they should (fixed seeds, statistical checks); torch tensors give
the expected figures, and logits may come as either."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bitnet_tt.errors import GenerationError, RequestError
from bitnet_tt.sampling import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    SamplingParams,
    device_draw,
    device_sampleable,
    filter_logits,
    sample_token,
)

LOGITS = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0])


def draw(params: SamplingParams, n: int = 2000, logits=LOGITS, output_ids=(), prompt_ids=(), allowed=None):
    gen = np.random.default_rng(1234)
    return torch.tensor([sample_token(logits, params, list(prompt_ids), list(output_ids), gen, allowed).token_id
                         for _ in range(n)])


def test_temperature_zero_is_greedy():
    assert set(draw(SamplingParams(temperature=0.0), n=50).tolist()) == {0}


def test_top_k_never_leaves_the_top_k():
    tokens = draw(SamplingParams(temperature=1.5, top_k=3))
    assert set(tokens.tolist()) == {0, 1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS.softmax(-1)
    # the first two tokens hold less than 0.8 of the mass, the first three more
    assert probs[:2].sum() < 0.8 < probs[:3].sum()
    assert set(draw(SamplingParams(top_p=0.8)).tolist()) == {0, 1, 2}


def test_min_p_drops_unlikely_tokens():
    probs = LOGITS.softmax(-1)
    allowed = {i for i, p in enumerate(probs) if p >= 0.2 * probs.max()}
    assert set(draw(SamplingParams(min_p=0.2)).tolist()) == allowed


def test_temperature_sharpens_and_flattens():
    cold = (draw(SamplingParams(temperature=0.3)) == 0).float().mean()
    warm = (draw(SamplingParams(temperature=3.0)) == 0).float().mean()
    expected_warm = (LOGITS / 3.0).softmax(-1)[0]
    assert cold > 0.75 and abs(warm - expected_warm) < 0.04


def test_sampling_frequencies_follow_softmax():
    tokens = draw(SamplingParams(temperature=1.0), n=4000)
    freq = torch.bincount(tokens, minlength=8).float() / 4000
    assert (freq - LOGITS.softmax(-1)).abs().max() < 0.03


def test_seed_reproduces_and_differs():
    a = draw(SamplingParams(temperature=1.0), n=100)
    b = draw(SamplingParams(temperature=1.0), n=100)
    assert torch.equal(a, b)
    gen = np.random.default_rng(99)
    c = torch.tensor([sample_token(LOGITS, SamplingParams(), [], [], gen).token_id for _ in range(100)])
    assert not torch.equal(a, c)


def test_penalties_push_away_repeated_tokens():
    greedy_repeat = SamplingParams(temperature=0.0, presence_penalty=1.0)
    assert draw(greedy_repeat, n=1, output_ids=[0])[0] == 1  # 3.0 - 1.0 < 2.5
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.3)
    assert draw(freq, n=1, output_ids=[0, 0])[0] == 1  # 3.0 - 0.6 < 2.5
    assert draw(freq, n=1, output_ids=[0])[0] == 0  # 3.0 - 0.3 > 2.5
    rep = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    assert draw(rep, n=1, prompt_ids=[0])[0] == 1  # 3.0 / 1.5 < 2.5
    negative = torch.tensor([-1.0, -1.2])
    assert draw(rep, n=1, logits=negative, prompt_ids=[0])[0] == 1  # -1.5 < -1.2


def test_logit_bias_adds_to_the_logits_before_sampling():
    assert draw(SamplingParams(temperature=0.0, logit_bias={0: -100.0}), n=1)[0] == 1  # the argmax is banned
    assert draw(SamplingParams(temperature=0.0, logit_bias={7: 4.5}), n=1)[0] == 0  # -2 + 4.5 < 3
    assert draw(SamplingParams(temperature=0.0, logit_bias={7: 5.5}), n=1)[0] == 7  # -2 + 5.5 > 3
    sampled = draw(SamplingParams(temperature=1.0, logit_bias={5: 100.0, 6: 100.0}), n=500)
    assert set(sampled.tolist()) == {5, 6}  # +100 leaves only the biased tokens a chance
    gen = np.random.default_rng(0)
    choice = sample_token(LOGITS, SamplingParams(temperature=0.0, logprobs=True, logit_bias={3: 50.0}), [], [], gen)
    assert choice.token_id == 3 and math.isclose(choice.logprob, float(LOGITS.log_softmax(-1)[3]), rel_tol=1e-6)


def test_a_token_mask_leaves_only_the_allowed_tokens():
    allowed = torch.zeros(len(LOGITS), dtype=torch.bool)
    allowed[[4, 6]] = True
    assert draw(SamplingParams(temperature=0.0), n=1, allowed=allowed)[0] == 4
    assert set(draw(SamplingParams(temperature=2.0), n=300, allowed=allowed).tolist()) == {4, 6}


def test_logprobs_are_the_model_distribution():
    gen = np.random.default_rng(0)
    choice = sample_token(LOGITS, SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3), [], [], gen)
    expected = LOGITS.log_softmax(-1)
    assert math.isclose(choice.logprob, float(expected[0]), rel_tol=1e-6)
    assert [t for t, _ in choice.top] == [0, 1, 2]


def test_filter_marks_removed_tokens_minus_inf():
    out = filter_logits(LOGITS.numpy(), SamplingParams(top_k=2))
    assert np.isinf(out[2:]).all() and np.isfinite(out[:2]).all()


@pytest.mark.parametrize("kwargs", [
    {"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 2.0},
    {"max_new_tokens": 0}, {"repetition_penalty": 0}, {"presence_penalty": 5}, {"top_logprobs": 100},
    {"stop": ("",)}, {"seed": -1}, {"stop": ("x",) * (MAX_STOP_STRINGS + 1)}, {"stop": ("x" * (MAX_STOP_CHARS + 1),)},
    {"stop": ("x" * 1_040_000,)}, {"logit_bias": {3: 100.5}}, {"logit_bias": {-1: 1.0}},
])
def test_invalid_parameters_are_rejected(kwargs):
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)


def test_device_sampleable_only_where_a_32_candidate_sampler_is_exact():
    assert device_sampleable(SamplingParams(temperature=0.0), 32)
    assert device_sampleable(SamplingParams(temperature=0.7, top_k=32, top_p=0.9), 32)
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_k=33),
                   SamplingParams(temperature=0.7, top_k=5, min_p=0.1), SamplingParams(temperature=0.0, logprobs=True),
                   SamplingParams(temperature=0.7, top_k=5, presence_penalty=0.5),
                   SamplingParams(temperature=0.0, logit_bias={3: 1.0}),
                   SamplingParams(temperature=0.0, json_schema='{"type": "object"}')):
        assert not device_sampleable(params, 32), params
    assert not device_sampleable(SamplingParams(temperature=0.7, top_k=5), 0)


def test_device_draws_repeat_for_a_seed():
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9)
    first, second = (device_draw(params, np.random.default_rng(3)) for _ in range(2))
    assert first == second and (first.top_k, first.top_p, first.temperature) == (5, 0.9, 0.7)
    generator = np.random.default_rng(3)
    seeds = {device_draw(params, generator).seed for _ in range(20)}
    assert len(seeds) == 20 and all(0 <= s < 2**31 for s in seeds)  # a fresh seed every step
    assert device_draw(SamplingParams(temperature=0.0), None).top_k == 1


# Accepted values that underflow or overflow in fp32 (each once disabled the server). The sampler must give
# what the limit of the setting gives: the most likely token, or for a vanishing repetition penalty the
# seen token with the largest positive logit (divided by the penalty it outgrows every other).
TINY_SETTINGS = [
    ({"top_p": 1e-300}, 0), ({"top_p": 1e-46}, 0), ({"top_p": 5e-324}, 0),
    ({"temperature": 1e-40}, 0), ({"temperature": 1e-45}, 0), ({"temperature": 5e-324}, 0),
    ({"repetition_penalty": 1e-300}, 2), ({"repetition_penalty": 1e-40}, 2),
    ({"top_k": 1, "top_p": 1e-300}, 0),
]


@pytest.mark.parametrize("kwargs, expected", TINY_SETTINGS)
def test_tiny_settings_sample_their_limit(kwargs, expected):
    assert set(draw(SamplingParams(**kwargs), n=200, prompt_ids=[2, 6]).tolist()) == {expected}
    filtered = filter_logits(LOGITS.double().numpy(), SamplingParams(**kwargs))
    assert not np.isnan(filtered).any()


def test_a_penalty_beyond_float64_keeps_the_seen_tokens_first():
    """2.5 / 5e-324 overflows float64: such logits are held at its largest value, tied, never inf or NaN."""
    tokens = draw(SamplingParams(repetition_penalty=5e-324), n=300, prompt_ids=[1, 2])
    assert set(tokens.tolist()) == {1, 2}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_are_an_error_not_a_token(bad):
    logits = LOGITS.clone()
    logits[3] = bad
    for params in (SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(temperature=0.0, logprobs=True)):
        with pytest.raises(GenerationError, match="non-finite logits"):
            sample_token(logits, params, [], [], np.random.default_rng(0))


def test_the_device_sampler_gets_no_setting_it_may_round_to_zero_or_infinity():
    assert device_sampleable(SamplingParams(temperature=0.7, top_k=5, top_p=0.5), 32)
    for tiny in ({"temperature": 1e-40}, {"top_p": 1e-300}):
        assert not device_sampleable(SamplingParams(**{"temperature": 0.7, "top_k": 5, **tiny}), 32), tiny
