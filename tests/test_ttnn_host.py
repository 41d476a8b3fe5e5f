"""The ttnn backend's own call sequence, run on a host stand-in for ttnn that computes the numbers,
checked against the PyTorch backend (issue: no card here, and a mock device computes nothing)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bitnet_tt.backends.torch.backend import TorchBackend
from bitnet_tt.backends.ttnn.backend import TTNNBackend
from bitnet_tt.backends.ttnn.config import TTOptions
from bitnet_tt.checkpoint import load_weights
from conftest import pcc
from tools.tt_host.stand_in import HostTT, real_block_float

pytestmark = pytest.mark.tt_host

CONFIGS = {
    "gqa4-head32": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1),
    "gqa2-head64": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2),
}
# fp32-equivalent: exact stand-in, bf16-valued weights and head, and HF's activation quantisation
EXACT = TTOptions(weight_dtype="bfloat16", lm_head_dtype="bfloat16", activation_quant=True, use_trace=True)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def folder(request, model_factory):
    return model_factory("packed", **CONFIGS[request.param])


@pytest.fixture(scope="module")
def block_float(host_ttnn):
    """bfloat8_b / bfloat4_b rounding through ttnn's real host conversion (mock cluster descriptor, no device)."""
    return real_block_float(host_ttnn)


def backends(folder, options: TTOptions, users: int = 1, exact: bool = False, block_float=None, patch=None):
    host = HostTT(exact=exact, block_float=block_float)
    weights = load_weights(folder, progress=False)
    tt = TTNNBackend(weights.config, weights, host, host.device(), users, 512, options)
    if patch:
        patch(tt)
    reference = TorchBackend(load_weights(folder, progress=False), max_slots=users, max_context=512, dtype="float32")
    return tt, reference


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 290, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("activation_quant", [False, True])
@pytest.mark.parametrize("length", [1, 33, 300])
def test_prefill_logits_with_device_dtypes(folder, block_float, length, activation_quant):
    # the defaults: bfloat4_b weights, bfloat8_b LM head, bf16 activations
    tt, reference = backends(folder, TTOptions(use_trace=False, activation_quant=activation_quant), block_float=block_float)
    ids = prompt(length, length)
    assert pcc(tt.prefill(0, ids), reference.prefill(0, ids)) >= 0.999


def greedy(backend, slots, prompts, steps):
    """Greedy continuations per slot, and the logits of every step ([steps] of [len(slots), vocab])."""
    first = {s: backend.prefill(s, p) for s, p in zip(slots, prompts)}
    last = {s: int(logits.argmax()) for s, logits in first.items()}
    tokens = {s: [t] for s, t in last.items()}
    history = [torch.stack([first[s] for s in slots])]
    for _ in range(steps - 1):
        logits = backend.decode(slots, [last[s] for s in slots])
        history.append(logits)
        for row, s in enumerate(slots):
            last[s] = int(logits[row].argmax())
            tokens[s].append(last[s])
    return tokens, history


def agreement(tt, reference, slots, prompts, steps):
    """(identical greedy tokens?, the lowest per-row logits PCC over all steps)."""
    (got, got_logits), (want, want_logits) = (greedy(b, slots, prompts, steps) for b in (tt, reference))
    lowest = min(pcc(g, w) for a, b in zip(got_logits, want_logits) for g, w in zip(a, b))
    return got == want, lowest


@pytest.mark.parametrize("length", [1, 33, 300])
def test_greedy_tokens_identical_in_fp32_settings_with_trace(folder, length):
    tt, reference = backends(folder, EXACT, exact=True)
    same_tokens, lowest_pcc = agreement(tt, reference, [0], [prompt(length, 7)], 32)
    assert same_tokens and lowest_pcc >= 0.999
    assert tt.trace_id is not None  # decode steps after the first were trace replays


def test_32_users_at_different_positions(folder):
    tt, reference = backends(folder, EXACT, users=32, exact=True)
    slots = list(range(32))
    prompts = [prompt(1 + 9 * s, s) for s in slots]  # lengths 1 .. 280
    same_tokens, lowest_pcc = agreement(tt, reference, slots, prompts, 32)
    assert same_tokens and lowest_pcc >= 0.999


def test_batched_decode_logits_with_device_dtypes(folder, block_float):
    tt, reference = backends(folder, TTOptions(), users=4, block_float=block_float)
    slots = [2, 0, 3]
    for s in slots:
        ids = prompt(5 + 20 * s, s)
        tt.prefill(s, ids)
        reference.prefill(s, ids)
    tokens = [11, 12, 13]
    for _ in range(3):
        got, want = tt.decode(slots, tokens), reference.decode(slots, tokens)
        assert min(pcc(g, w) for g, w in zip(got, want)) >= 0.999
        tokens = want.argmax(-1).tolist()


# --- the check has teeth: deliberately wrong backends fail it --------------------------------------------


def rope_backwards_in_decode(tt):
    """The prior art's bug: decode rotated by -theta while prefill rotated by +theta."""
    model = tt.model
    original = model._rope_rows

    def flipped(table, rows):
        rotation = original(table, rows)
        if table is model.w.rope_sin_rows:
            rotation._data = -rotation.data
        return rotation

    model._rope_rows = flipped


def cache_one_position_off(tt):
    original = tt._copy_inputs
    tt._copy_inputs = lambda tokens, positions: original(tokens, positions + 1)


@pytest.mark.parametrize("bug", [rope_backwards_in_decode, cache_one_position_off])
def test_broken_backend_fails_the_check(folder, bug):
    tt, reference = backends(folder, replace(EXACT, use_trace=False), users=2, exact=True, patch=bug)
    ids = prompt(40, 3)
    assert pcc(tt.prefill(0, ids), reference.prefill(0, ids)) >= 0.9999  # prefill is untouched
    # Random-weight models often repeat one token, so greedy tokens alone would miss it; the logits do not.
    _, lowest_pcc = agreement(tt, reference, [1], [prompt(33, 4)], 16)
    assert lowest_pcc < 0.999


def test_verify_report_and_benchmark_facts(folder):
    from bitnet_tt.verify import verify

    tt, reference = backends(folder, EXACT, exact=True)
    tt.max_context = reference.max_context = 400  # keep the fixed prompts short for the test
    report = verify(tt, reference, greedy_tokens=24)
    assert report["passed"] and report["min_pcc"] >= 0.999 and report["top1_agreement"] == 1.0
    assert report["greedy_match"] == report["greedy_steps"] == 24
    facts = tt.describe()
    assert int(facts["ttnn calls per decode step"]) > 10 * tt.config.num_layers
    assert facts["decode"] == "trace replay"


def test_engine_on_the_ttnn_backend_picks_greedy_tokens_on_device(folder):
    from bitnet_tt.engine import Engine
    from bitnet_tt.sampling import SamplingParams
    from bitnet_tt.tokenizer import Tokenizer

    tt, reference = backends(folder, EXACT, users=4, exact=True)
    picked = []
    original = tt.decode_greedy
    tt.decode_greedy = lambda slots, tokens: picked.append(len(slots)) or original(slots, tokens)
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    prompts = [prompt(n, n) for n in (3, 40, 17, 90, 5)]  # more requests than slots
    outputs = []
    for backend in (tt, reference):
        engine = Engine(backend, Tokenizer(folder, backend.config))
        outputs.append([r.output_ids for r in engine.generate(prompts, params)])
    assert outputs[0] == outputs[1]
    assert picked and max(picked) == 4  # batched decode steps took the on-device argmax path
