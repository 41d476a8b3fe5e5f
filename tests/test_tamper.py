"""Tampered or damaged models never load silently (issue 11, item 9).

A converted model records the sha256 of every tensor and copied file; each tamper class of the issue is
applied to one and must fail to load with a one-line error. Models in Hugging Face's formats carry no
checksums: their values are checked instead (finite floats, positive scales, codes in range, no extra tensor).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_one_line_error, run_main
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bitnet_tt.checkpoint import (
    CHECKSUMS_KEY,
    CONVERTED_FILE,
    convert_checkpoint,
    load_weights,
    read_header,
    write_safetensors,
)
from bitnet_tt.tensorfiles import UNCHECKED_FORMAT
from bitnet_tt.errors import CheckpointError
from bitnet_tt.ternary import pack_2bit, unpack_2bit

EMBED, NORM = "model.embed_tokens.weight", "model.norm.weight"
Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def converted(model_factory, tmp_path_factory):
    return convert_checkpoint(model_factory("packed"), tmp_path_factory.mktemp("converted") / "model", progress=False)


@pytest.fixture
def copy(converted, tmp_path):
    return shutil.copytree(converted, tmp_path / "model")


def stored(folder) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = folder / CONVERTED_FILE
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return {name: t.clone() for name, t in load_file(str(path)).items()}, metadata  # not views of the file


def rewrite(folder, change):
    """Apply change(tensors, metadata) and write the file again, recorded checksums as they were."""
    tensors, metadata = stored(folder)
    change(tensors, metadata)
    write_safetensors(folder / CONVERTED_FILE, tensors, metadata)


def flip_byte(folder, name, index=0):
    """One bit of a tensor's stored bytes flipped in place, as disk or transfer damage does."""
    path = folder / CONVERTED_FILE
    data_start, header = read_header(path)
    position = data_start + header[name]["data_offsets"][0] + index
    data = bytearray(path.read_bytes())
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


def set_value(name, value):
    def change(tensors, metadata):
        tensors[name] = torch.full_like(tensors[name], value)
    return change


def transpose_codes(tensors, metadata):
    tensors[Q + ".packed"] = pack_2bit(unpack_2bit(tensors[Q + ".packed"]).T.contiguous())


def edit_config(key, value):
    def edit(folder):
        raw = json.loads((folder / "config.json").read_text())
        if key == "linear_class":
            raw["quantization_config"][key] = value
        else:
            raw[key] = value
        (folder / "config.json").write_text(json.dumps(raw))
    return edit


def swap_tokenizer(folder):
    raw = json.loads((folder / "tokenizer.json").read_text())
    vocab = raw["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(raw))


CHANGED = "does not match the checksum recorded when"
TAMPERS = {
    "flipped embedding byte": (lambda f: flip_byte(f, EMBED, 1001), CHANGED),
    "flipped final norm byte": (lambda f: flip_byte(f, NORM, 3), CHANGED),
    "flipped scale byte": (lambda f: flip_byte(f, Q + ".scale", 2), CHANGED),
    "flipped code byte": (lambda f: flip_byte(f, Q + ".packed", 17), CHANGED),
    "NaN scale": (lambda f: rewrite(f, set_value(Q + ".scale", float("nan"))), CHANGED),
    "infinite scale": (lambda f: rewrite(f, set_value(Q + ".scale", float("inf"))), CHANGED),
    "negative scale": (lambda f: rewrite(f, set_value(Q + ".scale", -0.5)), CHANGED),
    "zero scale": (lambda f: rewrite(f, set_value(Q + ".scale", 0.0)), CHANGED),
    "zeroed norm": (lambda f: rewrite(f, set_value(NORM, 0.0)), CHANGED),
    "NaN embedding": (lambda f: rewrite(f, set_value(EMBED, float("nan"))), CHANGED),
    "transposed square weight": (lambda f: rewrite(f, transpose_codes), CHANGED),
    "extra tensor": (lambda f: rewrite(f, lambda t, m: t.update(extra=torch.zeros(4))),
                     "its tensors are not the ones recorded when it was converted"),
    "swapped tokenizer.json": (swap_tokenizer, "tokenizer.json: does not match the checksum"),
    "changed rope_theta": (edit_config("rope_theta", 10000.0), "config.json: does not match the checksum"),
    "changed rms_norm_eps": (edit_config("rms_norm_eps", 1e-6), "config.json: does not match the checksum"),
    "changed linear_class": (edit_config("linear_class", "bitlinear"), "config.json: does not match the checksum"),
    "added generation_config.json": (lambda f: (f / "generation_config.json").write_text('{"eos_token_id": 5}'),
                                     "generation_config.json: was not part of the converted model"),
    "removed tokenizer_config.json": (lambda f: (f / "tokenizer_config.json").unlink(),
                                      "tokenizer_config.json: missing; it was part of the converted model"),
    "checksums removed": (lambda f: rewrite(f, lambda t, m: m.pop(CHECKSUMS_KEY)),
                          "recorded checksums are missing or damaged"),
    "checksums and format tag of a checksum-free version": (
        lambda f: rewrite(f, lambda t, m: (m.pop(CHECKSUMS_KEY), m.update(format=UNCHECKED_FORMAT))),
        "recorded no checksums; convert the model again"),
}


def test_an_untouched_rewrite_is_byte_identical_and_loads(copy):
    before = (copy / CONVERTED_FILE).read_bytes()
    rewrite(copy, lambda tensors, metadata: None)
    assert (copy / CONVERTED_FILE).read_bytes() == before  # so each tamper below changes only what it says
    assert load_weights(copy, progress=False).source_format == "converted"


def load_cpu(folder, progress=False):
    from bitnet_tt.backends.cpu.weights import load_cpu_weights

    return load_cpu_weights(folder, progress=progress)


# Both loaders: the golden one reads every tensor, the CPU fast path maps the embedding and head from the file.
LOADERS = pytest.mark.parametrize("load", [load_weights, load_cpu], ids=["golden", "cpu"])


@LOADERS
@pytest.mark.parametrize("tamper, message", TAMPERS.values(), ids=TAMPERS.keys())
def test_a_tampered_converted_model_does_not_load(copy, tamper, message, load):
    tamper(copy)
    with pytest.raises(CheckpointError) as error:
        load(copy, progress=False)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_cli_reports_a_tampered_model_in_one_line(copy):
    flip_byte(copy, EMBED, 5)
    assert_one_line_error(*run_main("generate", "--model", copy, "--max-new-tokens", "1", "--quiet", "hi"),
                          f"tensor '{EMBED}' does not match the checksum recorded when it was converted")


# ---------------------------------------------------------------------------------------------
# Hugging Face formats: no checksums, so the values themselves are checked


def packed_with(model_factory, tmp_path, change, **config):
    folder = shutil.copytree(model_factory("packed", **config), tmp_path / "packed")
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def packed_value(name, value):
    return lambda tensors: tensors.__setitem__(name, torch.full_like(tensors[name], value))


@pytest.mark.parametrize("change, config, message", [
    (packed_value(Q + ".weight_scale", float("nan")), {}, f"'{Q}.weight_scale' holds NaN or infinite values"),
    (packed_value(Q + ".weight_scale", float("-inf")), {}, "holds NaN or infinite values"),
    (packed_value(Q + ".weight_scale", -0.25), {}, f"'{Q}' has the scale -0.25; a scale must be finite and positive"),
    (packed_value(Q + ".weight_scale", 0.0), {}, f"'{Q}' has the scale 0.0"),
    (packed_value(Q + ".weight_scale", 1e-40), {"linear_class": "bitlinear"}, "has the scale inf"),  # 1/scale overflows
    (packed_value(EMBED, float("nan")), {}, f"'{EMBED}' holds NaN or infinite values"),
    (packed_value("model.layers.0.input_layernorm.weight", float("inf")), {}, "holds NaN or infinite values"),
    (packed_value(Q + ".weight", 0xFF), {}, "holds the unused 2-bit code 3"),
    (lambda t: t.update(extra=torch.zeros(3)), {}, "holds tensors this model does not have: extra"),
], ids=["NaN scale", "-inf scale", "negative scale", "zero scale", "bitlinear tiny scale", "NaN embedding",
        "infinite norm", "code 3", "extra tensor"])
@LOADERS
def test_bad_values_in_a_packed_model_do_not_load(model_factory, tmp_path, change, config, message, load):
    folder = packed_with(model_factory, tmp_path, change, **config)
    with pytest.raises(CheckpointError) as error:
        load(folder, progress=False)
    assert message in str(error.value)


def test_a_master_weight_with_nan_does_not_load(model_factory, tmp_path):
    folder = shutil.copytree(model_factory("master"), tmp_path / "master")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors[Q + ".weight"][3, 5] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"'{Q}.weight' holds NaN or infinite values"):
        load_weights(folder, progress=False)
