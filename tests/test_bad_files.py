"""Hostile model folders: every damaged or unreadable file is one line on stderr and a non-zero exit.

The attack inputs of issue 11 (item 4) are kept here: each value once crashed the CLI with a traceback.
The CLI runs in this process (its `main`, as the console script calls it) so that the many cases stay
fast; the permission cases need a process without root's file-access override and run as subprocesses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import assert_one_line_error, run_main, without_file_override


@pytest.fixture
def folder(model_factory, tmp_path):
    """A private copy of the tiny packed model to damage."""
    return shutil.copytree(model_factory("packed"), tmp_path / "model")


def edit_json(path, **changes):
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def generate(folder):
    return run_main("generate", "--model", folder, "--max-new-tokens", "1", "--quiet", "hi")


CONFIG_ATTACKS = [
    ("rms_norm_eps", "abc", "rms_norm_eps should be a valid number, got 'abc'"),
    ("rms_norm_eps", None, "rms_norm_eps should be a valid number, got None"),
    ("rms_norm_eps", -1, "rms_norm_eps should be greater than 0, got -1"),
    ("rms_norm_eps", 1e309, "rms_norm_eps should be a finite number"),  # json writes Infinity
    ("rope_theta", "abc", "rope_theta should be a valid number, got 'abc'"),
    ("rope_theta", 0, "rope_theta should be greater than 1, got 0"),
    ("rope_parameters", "default", "rope_parameters should be a valid dictionary, got 'default'"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": "x"}, "rope_parameters.rope_theta should be a valid number"),
    ("rope_scaling", [1, 2], "rope_scaling should be a valid dictionary, got [1, 2]"),
    ("quantization_config", "bitnet", "quantization_config should be a valid dictionary, got 'bitnet'"),
    ("quantization_config", {"linear_class": "fancy"}, "quantization_config.linear_class should be 'autobitlinear' or 'bitlinear'"),
    ("eos_token_id", "x", "eos_token_id[0] should be a valid integer, got 'x'"),
    ("eos_token_id", [None], "eos_token_id[0] should be a valid integer, got None"),
    ("eos_token_id", {}, "eos_token_id[0] should be a valid integer, got {}"),
    ("eos_token_id", 10**6, "eos_token_id 1000000 is outside the vocabulary of 300 tokens"),
    ("bos_token_id", -1, "bos_token_id should be greater than or equal to 0, got -1"),
    ("max_position_embeddings", 1e12, "max_position_embeddings should be a valid integer, got 1000000000000.0"),
    ("max_position_embeddings", 10**12, "max_position_embeddings should be less than or equal to 1048576"),
    ("vocab_size", True, "vocab_size should be a valid integer, got True"),
    ("hidden_size", "64", "hidden_size should be a valid integer, got '64'"),
    ("num_hidden_layers", 0, "num_hidden_layers should be greater than or equal to 1, got 0"),
    ("num_key_value_heads", 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings should be a valid boolean, got 'yes'"),
    ("hidden_act", "silu", "hidden_act should be 'relu2', got 'silu'"),
]


@pytest.mark.parametrize("field, value, message", CONFIG_ATTACKS, ids=[f"{f}={v!r}" for f, v, _ in CONFIG_ATTACKS])
def test_config_field_of_wrong_type_or_range(folder, field, value, message):
    edit_json(folder / "config.json", **{field: value})
    assert_one_line_error(*generate(folder), f"config.json: {message}")


@pytest.mark.parametrize("weight_map, message", [
    ([], "weight_map should be a valid dictionary, got []"),
    (None, "weight_map should be a valid dictionary, got None"),
    ({"model.norm.weight": 1}, "weight_map.model.norm.weight should be a valid string, got 1"),
    ({"model.norm.weight": "../elsewhere.safetensors"}, "weight_map.model.norm.weight should be the name of a .safetensors file in the model folder"),
])
def test_index_with_a_broken_weight_map(folder, weight_map, message):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_one_line_error(*generate(folder), f"model.safetensors.index.json: {message}")


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer_config.json", {"bos_token": 5}, "tokenizer_config.json: bos_token should be a valid string, got 5"),
    ("tokenizer_config.json", {"bos_token": {"content": []}}, "bos_token should be a valid string, got []"),
    ("generation_config.json", {"eos_token_id": "x"}, "generation_config.json: eos_token_id[0] should be a valid integer"),
    ("config.json", [1, 2], "config.json: expected a JSON object"),
    ("tokenizer.json", b"\xff\xfe not text", "tokenizer.json: not valid UTF-8"),
    ("config.json", b'{"model_type": "bitnet\xff"}', "config.json: not valid UTF-8"),
])
def test_settings_files_of_the_wrong_shape(folder, name, content, message):
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    assert_one_line_error(*generate(folder), message)


def test_a_tokenizer_larger_than_the_model_is_refused(folder, model_factory):
    larger = model_factory("packed", vocab_size=400)
    shutil.copyfile(larger / "tokenizer.json", folder / "tokenizer.json")  # 323 tokens
    assert_one_line_error(*generate(folder), "323 tokens, more than the model's vocabulary of 300")


# ---------------------------------------------------------------------------------------------
# Unreadable files: a process that file permissions apply to (root bypasses them unless it drops the capability)


@pytest.mark.parametrize("target, message", [
    ("config.json", "config.json: cannot read it (Permission denied)"),
    ("tokenizer.json", "tokenizer.json: cannot read it (Permission denied)"),
    ("tokenizer_config.json", "tokenizer_config.json: cannot read it (Permission denied)"),
    ("model.safetensors", "model.safetensors: not a readable safetensors file"),
    (".", "config.json: cannot read it (Permission denied)"),
])
def test_unreadable_file_or_folder(folder, target, message):
    prefix = without_file_override()
    path = folder / target
    path.chmod(0)
    try:
        probe = subprocess.run([*prefix, "cat", str(folder / "config.json" if target == "." else path)],
                               capture_output=True)
        if probe.returncode == 0:
            pytest.skip("this machine ignores file permissions for the test's user")
        result = subprocess.run([*prefix, sys.executable, "-m", "bitnet_tt.cli", "generate", "--model", str(folder),
                                 "--max-new-tokens", "1", "--quiet", "hi"], capture_output=True, text=True, timeout=300)
    finally:
        path.chmod(0o755 if target == "." else 0o644)
    assert_one_line_error(result.returncode, result.stderr, message)
