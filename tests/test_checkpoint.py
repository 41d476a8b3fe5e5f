"""Checkpoint formats: packing layouts, format equivalence, conversion, and errors on bad input."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet_tt.backends.torch.backend import load_torch_backend
from bitnet_tt.checkpoint import convert_checkpoint, load_weights
from bitnet_tt.tensorfiles import resolve_model
from bitnet_tt.errors import CheckpointError, ConfigError, ModelNotFoundError
from bitnet_tt.ternary import pack_2bit, pack_hf, ternarize_absmean, unpack_2bit, unpack_hf
from conftest import FP64_BOUND, load_hf_golden


def random_codes(out=16, inp=12, seed=0):
    return torch.randint(-1, 2, (out, inp), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def test_hf_packing_matches_transformers():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    codes = random_codes()
    assert torch.equal(pack_hf(codes), pack_weights(codes.clone().to(torch.int32)))
    assert torch.equal(unpack_hf(pack_hf(codes)), unpack_weights(pack_hf(codes), torch.int8))


def test_our_packing_round_trips():
    codes = random_codes(8, 24)
    packed = pack_2bit(codes)
    assert packed.shape == (8, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_2bit(packed), codes)


def test_absmean_matches_hf_weight_quant():
    from transformers.integrations.bitnet import WeightQuant

    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    t = ternarize_absmean(w)
    assert torch.equal(t.codes.float() * t.scale, WeightQuant.forward(None, w))


def copy_with_ternary_master(packed_folder, dst):
    """A bf16-master checkpoint whose absmean ternarisation gives exactly the packed model's weights."""
    shutil.copytree(packed_folder, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        prefix = name.removesuffix("_scale")
        codes = unpack_hf(tensors.pop(prefix))
        # Latent weights = codes * c with every code nonzero: mean|W| = c, so the codes and scale survive.
        codes[codes == 0] = 1
        scale = tensors.pop(name).float()
        tensors[prefix] = (codes.float() * scale).to(torch.bfloat16)
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["quantization_mode"] = "online"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_master_and_packed_of_same_ternary_weights_agree(model_factory, tmp_path):
    packed = model_factory("packed")
    master = copy_with_ternary_master(packed, tmp_path / "master")
    # Rewrite the packed model with those same (all-nonzero) codes, so both hold one ternary model.
    tensors = load_file(str(packed / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        codes = unpack_hf(tensors[name.removesuffix("_scale")])
        codes[codes == 0] = 1
        tensors[name.removesuffix("_scale")] = pack_hf(codes)
    same_packed = tmp_path / "packed"
    shutil.copytree(packed, same_packed)
    save_file(tensors, str(same_packed / "model.safetensors"))

    a, b = load_weights(master, progress=False), load_weights(same_packed, progress=False)
    assert (a.source_format, b.source_format) == ("bf16-master", "packed")
    for la, lb in zip(a.layers, b.layers):
        for name in la.projections:
            assert torch.equal(la.projections[name].codes, lb.projections[name].codes)
            # The master path reproduces HF's 1 / (1 / mean|W|) in fp32: equal to the stored scale within an ulp.
            torch.testing.assert_close(la.projections[name].scale, lb.projections[name].scale, rtol=2**-23, atol=0)
    ids = list(range(10, 50))
    # float64: the scales differ by an ulp, so which activation ties flip is set by the weights, not the CPU.
    logits_a = load_torch_backend(master, dtype="float64", progress=False).prefill(0, ids)
    logits_b = load_torch_backend(same_packed, dtype="float64", progress=False).prefill(0, ids)
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=1e-5 * logits_b.abs().max().item())
    assert logits_a.argmax() == logits_b.argmax()


@pytest.mark.parametrize("fmt", ["master", "packed"])
def test_convert_round_trips_exactly(model_factory, tmp_path, fmt):
    src = model_factory(fmt)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    dst = convert_checkpoint(src, tmp_path / "converted", progress=False)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # input untouched
    a, b = load_weights(src, progress=False), load_weights(dst, progress=False)
    assert b.source_format == "converted"
    assert torch.equal(a.embed, b.embed) and torch.equal(a.final_norm, b.final_norm)
    for la, lb in zip(a.layers, b.layers):
        for name in la.projections:
            assert torch.equal(la.projections[name].codes, lb.projections[name].codes)
            assert torch.equal(la.projections[name].scale.float(), lb.projections[name].scale)
        for name in la.norms:
            assert torch.equal(la.norms[name], lb.norms[name])
    ids = [5, 6, 7, 8]
    assert torch.equal(load_torch_backend(src, dtype="float32", progress=False).prefill(0, ids),
                       load_torch_backend(dst, dtype="float32", progress=False).prefill(0, ids))
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_convert_is_deterministic_and_refuses_to_overwrite(model_factory, tmp_path):
    src = model_factory("master")
    one = convert_checkpoint(src, tmp_path / "one", progress=False)
    two = convert_checkpoint(src, tmp_path / "two", progress=False)
    digest = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}  # noqa: E731
    assert digest(one) == digest(two)
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(src, one, progress=False)
    with pytest.raises(CheckpointError, match="must not be the source folder, be inside it or contain it"):
        convert_checkpoint(src, src, progress=False)
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a converted model"):
        convert_checkpoint(src, keep, force=True, progress=False)
    assert (keep / "notes.txt").read_text() == "mine"
    convert_checkpoint(src, one, force=True, progress=False)
    assert digest(one) == digest(two)


def test_interrupted_conversion_leaves_nothing_loadable(model_factory, tmp_path, monkeypatch):
    import bitnet_tt.checkpoint as ckpt

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "write_safetensors", explode)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(model_factory("packed"), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_sharded_checkpoint_and_untied_head(model_factory, tmp_path):
    src = model_factory("master", tie_word_embeddings=False)
    tensors = load_file(str(src / "model.safetensors"))
    assert "lm_head.weight" in tensors
    dst = tmp_path / "sharded"
    dst.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(dst / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    ids = [3, 1, 4, 1, 5]
    with torch.no_grad():
        exact = load_hf_golden(dst, torch.float64)(torch.tensor([ids])).logits[0, -1]
    ours = load_torch_backend(dst, dtype="float64", progress=False).prefill(0, ids)
    assert torch.allclose(ours, exact, atol=FP64_BOUND * exact.abs().max().item(), rtol=0)


def test_untied_config_without_head_is_an_error(model_factory, tmp_path):
    dst = shutil.copytree(model_factory("packed"), tmp_path / "m")
    config = json.loads((dst / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="LM head is missing"):
        load_weights(dst, progress=False)


# --- bad input: one clear error naming the file and the problem -------------------------------


def break_model(model_factory, tmp_path, how):
    dst = shutil.copytree(model_factory("packed"), tmp_path / "m")
    weights, config = dst / "model.safetensors", dst / "config.json"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        weights.write_bytes(b"\x00\x01not a safetensors file at all")
    elif how == "not-bitnet":
        raw = json.loads(config.read_text())
        raw["model_type"] = "llama"
        config.write_text(json.dumps(raw))
    elif how == "bad-json":
        config.write_text("{ nope")
    elif how in ("wrong-shape", "wrong-dtype"):
        tensors = load_file(str(weights))
        name = "model.layers.1.self_attn.k_proj.weight"
        tensors[name] = tensors[name][:, :-4].contiguous() if how == "wrong-shape" else tensors[name].to(torch.int32)
        save_file(tensors, str(weights))
    elif how == "missing-tensor":
        tensors = load_file(str(weights))
        del tensors["model.norm.weight"]
        save_file(tensors, str(weights))
    return dst


@pytest.mark.parametrize("how, error, pattern", [
    ("truncated", CheckpointError, r"model\.safetensors: not a readable safetensors file"),
    ("garbage", CheckpointError, r"model\.safetensors: not a readable safetensors file"),
    ("not-bitnet", ConfigError, r"config\.json: model_type is 'llama', not 'bitnet'"),
    ("bad-json", ConfigError, r"config\.json: not valid JSON"),
    ("wrong-shape", CheckpointError, r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' has shape"),
    ("wrong-dtype", CheckpointError, r"model\.safetensors: tensor '.*k_proj\.weight' has unsupported dtype int32"),
    ("missing-tensor", CheckpointError, r"tensor 'model\.norm\.weight' is missing"),
])
def test_bad_checkpoints_raise_one_line_errors(model_factory, tmp_path, how, error, pattern):
    folder = break_model(model_factory, tmp_path, how)
    with pytest.raises(error, match=pattern) as info:
        load_weights(folder, progress=False)
    assert "\n" not in str(info.value)


def test_missing_folder_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        resolve_model(tmp_path / "nowhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="could not be fetched from the Hugging Face hub"):
        resolve_model("microsoft/bitnet-b1.58-2B-4T")
