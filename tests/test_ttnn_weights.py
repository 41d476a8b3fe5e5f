"""The ttnn backend's weights: exact ternary codes in every device dtype (real ttnn host conversion),
and every scale fold checked against the PyTorch backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitnet_tt.backends.torch.kv_cache import KVCache
from bitnet_tt.backends.torch.model import BitNetModel, quantize_activations, rope_tables
from bitnet_tt.backends.ttnn.config import DeviceFacts, TTOptions, make_plan
from bitnet_tt.backends.ttnn.weights import Placer, ScaleFolds, codes_in_out, place_model
from bitnet_tt.checkpoint import load_weights

P150 = DeviceFacts("blackhole", 13, 10, 8, 4_277_141_376, 1_461_120)
TT_TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1)


@pytest.fixture(scope="module")
def folder(model_factory):
    return model_factory("packed", **TT_TINY)


@pytest.fixture(scope="module")
def reference(folder):
    """The golden model in fp64, so the comparison sees the folds and not rounding."""
    weights = load_weights(folder, progress=False)
    cache = KVCache(weights.config, 1, 64, torch.float64, "cpu")
    return BitNetModel(weights, cache, torch.float64, "cpu")


def unscaled_bitlinear(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """What the device computes: per-token int8 quantisation, integer codes, per-token 1/s; no weight scale."""
    q, s = quantize_activations(x)
    return (q.double() @ codes.double().t()) / s.double()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def layer_inputs(seq: int, hidden: int) -> torch.Tensor:
    return torch.randn(1, seq, hidden, generator=torch.Generator().manual_seed(seq), dtype=torch.float64)


def test_mlp_with_folded_scales_matches_reference(folder, reference):
    weights = load_weights(folder, progress=False)
    layer, module = weights.layers[1], reference.layers[1].mlp
    folds = ScaleFolds.from_layer(layer, weights.config.head_dim, weights.config.rms_norm_eps)
    p = layer.projections
    x = layer_inputs(9, weights.config.hidden_size)
    gate, up = unscaled_bitlinear(x, torch.cat([p["mlp.gate_proj"].codes, p["mlp.up_proj"].codes])).split(
        weights.config.intermediate_size, dim=-1)
    hidden = rms_norm(F.relu(gate) ** 2 * up, layer.norms["mlp.ffn_sub_norm"].double(), folds.ffn_sub_norm_eps)
    folded = unscaled_bitlinear(hidden, p["mlp.down_proj"].codes) * folds.down_scale
    expected = module(x)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_attention_with_folded_scales_matches_reference(folder, reference):
    weights = load_weights(folder, progress=False)
    cfg = weights.config
    layer, module = weights.layers[0], reference.layers[0].attn
    folds = ScaleFolds.from_layer(layer, cfg.head_dim, cfg.rms_norm_eps)
    p = layer.projections
    seq = 12
    x = layer_inputs(seq, cfg.hidden_size)
    cos, sin = rope_tables(cfg, seq, torch.float64, "cpu")
    positions = torch.arange(seq)[None]
    mask = (torch.arange(seq) <= positions[..., None]).unsqueeze(1)
    expected = module(x, cos[None], sin[None], reference.cache, 0, torch.tensor([0]), positions, mask)

    def heads(codes, count):
        return unscaled_bitlinear(x, codes).view(1, seq, count, cfg.head_dim).transpose(1, 2)

    def rope(t):
        half = cfg.head_dim // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

    q = rope(heads(p["self_attn.q_proj"].codes, cfg.num_heads))
    k = rope(heads(p["self_attn.k_proj"].codes, cfg.num_kv_heads)).repeat_interleave(cfg.group_size, 1)
    v = heads(p["self_attn.v_proj"].codes, cfg.num_kv_heads).repeat_interleave(cfg.group_size, 1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=folds.attention_scale)
    out = rms_norm(out.transpose(1, 2).reshape(1, seq, cfg.q_size), layer.norms["self_attn.attn_sub_norm"].double(),
                   folds.attn_sub_norm_eps)
    folded = unscaled_bitlinear(out, p["self_attn.o_proj"].codes) * folds.o_scale
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_folds_need_positive_scales(folder):
    layer = load_weights(folder, progress=False).layers[0]
    layer.projections["self_attn.v_proj"].scale = torch.tensor(-0.5)
    with pytest.raises(ValueError, match="positive"):
        ScaleFolds.from_layer(layer, 32, 1e-5)


# --- real ttnn host conversion (mock cluster descriptor, no device) ------------------------------------


@pytest.mark.tt_mock
@pytest.mark.parametrize("dtype", ["bfloat4_b", "bfloat8_b", "bfloat16"])
def test_device_weights_hold_exact_codes(host_ttnn, folder, dtype):
    weights = load_weights(folder, progress=False)
    reference = load_weights(folder, progress=False)
    plan = make_plan(weights.config, P150, TTOptions(weight_dtype=dtype), max_users=2, max_context=64)
    on_host = place_model(plan, weights, Placer(host_ttnn, None))
    to_torch = host_ttnn.to_torch
    for placed, layer in zip(on_host.layers, reference.layers):
        p = layer.projections
        expected = {
            "wqkv": codes_in_out(p["self_attn.q_proj"], p["self_attn.k_proj"], p["self_attn.v_proj"]),
            "wo": codes_in_out(p["self_attn.o_proj"]),
            "wgate": codes_in_out(p["mlp.gate_proj"]),
            "wup": codes_in_out(p["mlp.up_proj"]),
            "wdown": codes_in_out(p["mlp.down_proj"]),
        }
        for name, codes in expected.items():
            assert torch.equal(to_torch(getattr(placed, name)).float(), codes.float()), name
        assert torch.equal(to_torch(placed.attn_norm).flatten(), layer.norms["input_layernorm"].to(torch.bfloat16))
    assert torch.equal(to_torch(on_host.embedding), reference.embed.to(torch.bfloat16))


@pytest.mark.tt_mock
def test_converted_weights_are_cached_on_disk(host_ttnn, folder, tmp_path):
    """A restart reads the converted tensors back instead of converting again."""
    plan = make_plan(load_weights(folder, progress=False).config, P150, TTOptions(), max_users=1, max_context=64)
    first = place_model(plan, load_weights(folder, progress=False), Placer(host_ttnn, None, tmp_path))
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.startswith("layers.0.wqkv.bfloat4_b") for name in cached)
    again = place_model(plan, load_weights(folder, progress=False), Placer(host_ttnn, None, tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == cached  # nothing new was written
    for a, b in zip(first.layers, again.layers):
        assert torch.equal(host_ttnn.to_torch(a.wgate), host_ttnn.to_torch(b.wgate))


def test_bytes_read_per_decode_step_at_2b4t_shapes():
    from bitnet_tt.config import ModelConfig
    from bitnet_tt.synthetic import config_2b4t

    config = ModelConfig.from_hf_dict(config_2b4t())
    plan = make_plan(config, P150, TTOptions(), max_users=32, max_context=4096)
    read = plan.decode_read_bytes()
    ternary = 30 * 2560 * (3840 + 2560 + 2 * 6912) + 30 * 6912 * 2560  # fused QKV, O, gate, up, down
    assert read["layers"] == int(ternary * 576 / 1024)  # bfloat4_b, no padding: decode reads the interleaved copy
    embedding, head = 128256 * 2560 * 2, read["lm_head"]
    norms = 30 * (2 * 2560 + 2560 + 6912) * 2 + 2560 * 2
    assert plan.weight_bytes() <= read["layers"] + embedding + head + norms  # the codes are held once
    assert read["lm_head"] == int(128256 * 2560 * 1088 / 1024)  # bfloat8_b
    assert read["kv_cache_per_token"] == 2 * 30 * 5 * 128 * 2


def test_weight_cache_is_kept_per_device_and_options(folder, tmp_path, monkeypatch):
    from bitnet_tt.backends.ttnn.backend import weight_cache_dir

    monkeypatch.setenv("BITNET_TT_CACHE", str(tmp_path))
    n150 = DeviceFacts("wormhole_b0", 8, 8, 12, 1_073_741_824, 1_499_136)  # DRAM-sharded layouts follow the banks
    folders = {weight_cache_dir(folder, options, device) for options in (TTOptions(), TTOptions(lm_head_dtype="bfloat16"))
               for device in (P150, n150)}
    assert len(folders) == 4 and all(f.parent == tmp_path / "ttnn-weights" for f in folders)
    assert weight_cache_dir(folder, TTOptions(), P150) == weight_cache_dir(folder, TTOptions(), P150)
