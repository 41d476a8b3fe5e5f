"""Biased and grammar-constrained requests: the engine samples them on the host, whatever the backend offers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bitnet_tt.backends.torch.backend import load_torch_backend
from bitnet_tt.config import ModelConfig
from bitnet_tt.engine import Engine
from bitnet_tt.errors import RequestError
from bitnet_tt.sampling import SamplingParams
from bitnet_tt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine(model_factory):
    """A torch backend that claims a device sampler whose token pickers fail: only host sampling works."""
    tiny = model_factory("packed")
    backend = load_torch_backend(tiny, max_slots=4, max_context=128, dtype="float32", progress=False)
    backend.device_top_k_limit = 32

    def on_the_device(*args):
        raise AssertionError("a request that needs the logits was picked on the device")

    backend.decode_greedy = backend.decode_sampled = on_the_device
    return Engine(backend, Tokenizer(tiny, ModelConfig.from_folder(tiny)))


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (0.8, 8)])
def test_biased_and_constrained_requests_sample_on_the_host(engine, temperature, top_k):
    sampling = dict(temperature=temperature, top_k=top_k, max_new_tokens=40, seed=3)
    favourite = engine.tokenizer.encode("fox", add_bos=False)[0]
    biased = engine.submit("Hi", SamplingParams(**sampling, logit_bias={favourite: 100.0}, ignore_eos=True))
    constrained = engine.submit("Hi", SamplingParams(**sampling, json_schema=json.dumps(
        {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3})))
    engine.run()
    assert biased.output_ids == [favourite] * 40
    assert constrained.finish_reason == "stop" and 1 <= len(json.loads(constrained.text)) <= 3


def test_a_schema_llguidance_rejects_is_a_request_error(engine):
    for schema in ('{"type": "objectx"}', "[1, 2]", "{not json"):
        with pytest.raises(RequestError, match="schema"):
            engine.submit("Hi", SamplingParams(json_schema=schema))
    with pytest.raises(RequestError, match="logit_bias"):
        engine.submit("Hi", SamplingParams(logit_bias={10**6: 1.0}))


def test_a_constraint_starts_without_torch_compile(model_factory):
    """llguidance.torch wraps a kernel in torch.compile: importing it cost ~10 s on the first constrained request
    (here, outside the tests' TORCHDYNAMO_DISABLE). The masks are unpacked without it."""
    folder = model_factory("packed")
    script = (
        "import json, sys\n"
        "from bitnet_tt.config import ModelConfig\n"
        "from bitnet_tt.grammar import GrammarCompiler\n"
        "from bitnet_tt.tokenizer import Tokenizer\n"
        f"folder = {str(folder)!r}\n"
        "config = ModelConfig.from_folder(folder)\n"
        "constraint = GrammarCompiler(Tokenizer(folder, config), config.vocab_size).constraint('{\"type\": \"object\"}')\n"
        "assert constraint.allowed().sum() >= 1\n"
        "print(sorted(m for m in ('llguidance.torch', 'torch._dynamo') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
