"""Shared fixtures: small random BitNet checkpoints in the real formats, and HF's model as the golden reference."""

from __future__ import annotations

import contextlib
import io
import os
import shutil

# HF wraps ActQuant/WeightQuant in torch.compile; eager runs the same math without compile time.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch

from bitnet_tt.config import ModelConfig
from bitnet_tt.tokenizer import Tokenizer
from bitnet_tt.synthetic import hf_config, write_random_model
from bitnet_tt.verify import pcc  # noqa: F401 - the tests import it from here

# Tiny shapes with the real architecture: 4:1 GQA, an odd number of layers, vocab not a multiple of 32.
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """model_factory(fmt, **config overrides) -> folder; cached per arguments for the session."""
    made = {}

    def make(fmt: str = "packed", seed: int = 0, **overrides):
        key = (fmt, seed, tuple(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"model-{fmt}")
            made[key] = write_random_model(folder, hf_config(**{**TINY, **overrides}), fmt=fmt, seed=seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny(model_factory):
    """The default small random model: packed 2-bit checkpoint, TINY shapes."""
    return model_factory("packed")


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return Tokenizer(tiny, ModelConfig.from_folder(tiny))


# Two fp64 runs of the same model that differ only in the order of sums (batching, chunking, kernels) agree to
# about n * 2**-53 per sum of n terms; relative to the largest logit, 1e-12 leaves a factor of 30 over that for
# propagation through the layers. fp32 runs cannot promise this on every CPU (see test_torch_golden.py).
FP64_BOUND = 1e-12


def load_hf_golden(folder, dtype=torch.float32):
    """HF BitNetForCausalLM through its BitNet quantizer, in `dtype`.

    A packed model cannot be loaded in fp32 directly (its weights unpack to bf16), so it is loaded in
    bf16 and every floating tensor is cast; RoPE's inv_freq is recomputed so that it is not bf16-rounded.
    """
    from transformers import BitNetForCausalLM

    model = BitNetForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.dtype.is_floating_point:
            tensor.data = tensor.data.to(dtype)
    rope = model.model.rotary_emb
    inv_freq, _ = rope.compute_default_rope_parameters(model.config)
    rope.inv_freq.data = inv_freq
    return model.eval()


def needs_tt(prepare):
    """Run `prepare()` for a ttnn test: without the tt extra the test fails in CI (none may be skipped
    there) and is skipped elsewhere."""
    from tools.tt_mock.harness import MockUnavailable

    try:
        return prepare()
    except MockUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"ttnn tests must run in CI: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def host_ttnn():
    """The real ttnn for host conversions and golden functions (mock cluster descriptor, no device)."""
    from tools.tt_mock.harness import host_ttnn as load

    return needs_tt(load)


# ---------------------------------------------------------------------------------------------
# Hostile-input checks shared by the CLI, file and conversion tests


def run_main(*argv) -> tuple[int, str]:
    """bitnet-tt's main() on argv: (exit code, stderr). An exception escaping main is a traceback: it fails here."""
    from bitnet_tt.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def assert_one_line_error(code: int, stderr: str, fragment: str) -> None:
    assert code not in (0, None), stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert fragment in lines[0], lines[0]


def without_file_override() -> list[str]:
    """A command prefix under which mode 000 files cannot be read, or a skip when this machine cannot do that."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a file unreadable to the CLI")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]
