"""The CPU backend's compiled kernels: exact integer products on every instruction-set path this machine
has (the scalar fallback always), float kernels against PyTorch, packing and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitnet_tt.backends.cpu import kernels
from bitnet_tt.backends.torch.model import quantize_activations
from bitnet_tt.config import ModelConfig
from bitnet_tt.errors import BitNetError
from bitnet_tt.synthetic import config_2b4t
from bitnet_tt.ternary import pack_2bit


@pytest.fixture(scope="module", autouse=True)
def built():
    if not kernels.available():
        kernels.build_in_place()


def all_paths():
    if not kernels.available():
        kernels.build_in_place()
    return kernels.paths()


def exact_product(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    # float64 holds every partial sum exactly (|sum| <= 128 * 6912 < 2**53) and runs through BLAS.
    return (x.astype(np.float64) @ codes.astype(np.float64).T).astype(np.int64)


def int_product(codes: np.ndarray, x: np.ndarray, path: str, threads: int = 2) -> np.ndarray:
    acts = kernels.Activations(len(x), codes.shape[1])
    acts.q[:, : codes.shape[1]] = x
    acts.sum[:] = x.sum(axis=1, dtype=np.int64)
    w = kernels.PackedTernary.from_codes(codes)
    return kernels.matmul(w, acts, len(x), path=kernels.path_index(path), threads=threads)


SHAPES_2B4T = sorted(set(ModelConfig.from_hf_dict(config_2b4t()).projection_shapes().values()) | {(3840, 2560), (13824, 2560)})


@pytest.mark.parametrize("path", all_paths())
@pytest.mark.parametrize("shape", SHAPES_2B4T, ids=lambda s: f"{s[0]}x{s[1]}")
# 1-8: every tile size; 11: tiles of 8 and 3; 48, 53: the GEMM on AVX2 and AVX-512 (gemm.h), in full
# micro-tiles of 6 tokens and with a tile of 5
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 6, 7, 8, 11, 48, 53])
def test_ternary_product_is_exact_at_2b4t_shapes(path, shape, tokens):
    rng = np.random.default_rng(hash((shape, tokens)) % 2**32)
    codes = rng.integers(-1, 2, shape, dtype=np.int8)
    x = rng.integers(-128, 128, (tokens, shape[1]), dtype=np.int8)
    assert np.array_equal(int_product(codes, x, path), exact_product(x, codes))


EDGES = {
    "all -128 x all +1": (-128, 1), "all 127 x all +1": (127, 1), "all -128 x all -1": (-128, -1),
    "all 127 x all -1": (127, -1), "zero activations": (0, 1), "zero weights": (-128, 0),
}


@pytest.mark.parametrize("path", all_paths())
@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("shape", [(2560, 6912), (13, 200), (5, 4), (9, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 48, 53])
def test_ternary_product_is_exact_at_the_edges(path, edge, shape, tokens):
    """Extremes of the int16 partial sums (6912 inputs: 54 blocks, several int16 stretches; the AVX2 GEMM's
    stretches of 64 quads reach -32768 with all -128) and of the AVX-512 tile's scaled sums (its layouts differ
    with the token count; 48 and 53 tokens take the GEMM), and shapes whose
    rows are not a multiple of 4 and inputs not a multiple of 128 (padded with zero weights)."""
    value, weight = EDGES[edge]
    codes = np.full(shape, weight, dtype=np.int8)
    x = np.full((tokens, shape[1]), value, dtype=np.int8)
    assert np.array_equal(int_product(codes, x, path), exact_product(x, codes))


@pytest.mark.parametrize("tokens", [9, 19, 48])  # tiles; AVX2's GEMM with an edge tile, AVX-512's tiles; the GEMM
def test_every_path_and_thread_count_gives_the_same_integers(tokens):
    rng = np.random.default_rng(1)
    codes = rng.integers(-1, 2, (37, 300), dtype=np.int8)
    x = rng.integers(-128, 128, (tokens, 300), dtype=np.int8)
    results = [int_product(codes, x, path, threads) for path in kernels.paths() for threads in (1, 2, 3)]
    assert all(np.array_equal(r, results[0]) for r in results)


@pytest.mark.parametrize("path", all_paths())
@pytest.mark.parametrize("shape", [(10, 260), (6912, 2560), (8, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_repacking_the_converted_2bit_layout_equals_packing_the_codes(path, shape):
    """Full blocks go through the path's repacking (AVX-512 VBMI where present), the rest field by field."""
    codes = np.random.default_rng(2).integers(-1, 2, shape, dtype=np.int8)
    from_2bit = kernels.PackedTernary.from_2bit(pack_2bit(torch.from_numpy(codes)).numpy(), path=kernels.path_index(path))
    assert np.array_equal(from_2bit.data, kernels.PackedTernary.from_codes(codes).data)


@pytest.mark.parametrize("path", all_paths())
@pytest.mark.parametrize("column", [0, 127, 128, 259])
def test_the_unused_code_is_caught_in_every_block_on_every_path(path, column):
    packed = pack_2bit(torch.zeros((5, 260), dtype=torch.int8)).numpy()
    packed[3, column // 4] |= 3 << (2 * (column % 4))
    with pytest.raises(BitNetError, match="2-bit field 3"):
        kernels.PackedTernary.from_2bit(packed, path=kernels.path_index(path))


def test_unused_code_and_unknown_path_are_one_line_errors():
    with pytest.raises(BitNetError, match="2-bit field 3"):
        kernels.PackedTernary.from_2bit(np.full((4, 8), 0xFF, dtype=np.uint8))
    with pytest.raises(BitNetError, match="not available here"):
        kernels.path_index("sse9")


@pytest.mark.parametrize("gated", [False, True])
def test_norm_and_quantisation_match_the_golden_model(gated):
    from bitnet_tt.backends.torch.model import RMSNorm

    rng = np.random.default_rng(3)
    k = 300
    x = rng.standard_normal((6, 2 * k if gated else k)).astype(np.float32) * 3
    weight = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    acts = kernels.Activations(6, k)
    acts.quantize(x, 6, weight, 1e-5, gated=gated)
    xt = torch.from_numpy(x)
    h = torch.square(F.relu(xt[:, :k])) * xt[:, k:] if gated else xt
    codes, scale = quantize_activations(RMSNorm(torch.from_numpy(weight), 1e-5)(h))
    # The sum of squares runs in another order than PyTorch's: a code may differ by one at a rounding tie.
    diff = np.abs(acts.q[:, :k].astype(int) - codes.numpy())
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2
    assert np.allclose(acts.scale, scale[:, 0].numpy(), rtol=1e-6)
    assert np.array_equal(acts.sum, acts.q.sum(axis=1, dtype=np.int64))
    assert not acts.q[:, k:].any()


@pytest.mark.parametrize("gated", [False, True])
def test_norm_and_quantisation_are_identical_on_every_path_and_thread_count(gated):
    rng = np.random.default_rng(6)
    k = 2560 + 37  # vector lanes and a tail
    x = rng.standard_normal((3, 2 * k if gated else k)).astype(np.float32) * 4
    x[0, :3] = [0.0, 1e-9, -1e-9]
    weight = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    results = []
    for path in kernels.paths():
        for threads in (1, 2):
            acts = kernels.Activations(3, k)
            acts.quantize(x, 3, weight, 1e-6, gated=gated, path=kernels.path_index(path), threads=threads)
            results.append((acts.q, acts.scale, acts.sum))
    for q, scale, total in results[1:]:
        assert np.array_equal(q, results[0][0]) and np.array_equal(scale, results[0][1])
        assert np.array_equal(total, results[0][2])


def test_quantisation_without_norm_is_bit_exact():
    x = np.random.default_rng(4).standard_normal((5, 256)).astype(np.float32)
    x[0, :4] = [0.5, -0.5, 1.5, 2.5]  # ties round half to even, as torch.round
    codes, scale = quantize_activations(torch.from_numpy(x))
    for path in kernels.paths():
        acts = kernels.Activations(5, 256)
        acts.quantize(x, 5, path=kernels.path_index(path))
        assert np.array_equal(acts.q, codes.numpy()) and np.array_equal(acts.scale, scale[:, 0].numpy())


@pytest.mark.parametrize("k", [1100, 2560])  # 2B-4T's hidden size; and blocks of 32 and 64 with a tail
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_lm_head_matches_torch_and_is_identical_on_every_path(dtype, k):
    rng = np.random.default_rng(5)
    table = torch.from_numpy(rng.standard_normal((301, k)).astype(np.float32))
    x = rng.standard_normal((9, k)).astype(np.float32)  # 9 tokens: a full pass of 8 (4 on AVX2) and more
    if dtype == "bf16":
        weights, reference_table = table.bfloat16().view(torch.uint16).numpy(), table.bfloat16().float()
    else:
        weights, reference_table = table.numpy(), table
    reference = torch.from_numpy(x) @ reference_table.T
    outs = [kernels.head(weights, x, 9, np.empty((9, 301), np.float32), None, kernels.path_index(p), 2)
            for p in kernels.paths()]
    assert all(np.array_equal(o, outs[0]) for o in outs)
    assert torch.allclose(torch.from_numpy(outs[0]), reference, rtol=1e-5, atol=1e-4)
    for p in kernels.paths():  # a token's logits do not depend on the batch it is in
        for m in (1, 2, 3):
            alone = np.empty((m, 301), np.float32)
            kernels.head(weights, x[2 : 2 + m], m, alone, None, kernels.path_index(p), 2)
            assert np.array_equal(alone, outs[0][2 : 2 + m])


def int8_head_reference(codes: np.ndarray, scales: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The int8 head's definition: x quantised per token as HF's ActQuant (s = 127 / absmax, codes rounded half
    to even), the exact integer product with the codes, then / s * the row's scale, in fp32."""
    s = np.float32(127) / np.maximum(np.abs(x).max(axis=1, keepdims=True), np.float32(1e-5))
    q = np.clip(np.rint(x * s), -128, 127).astype(np.int64)
    dots = (q @ codes.astype(np.int64).T).astype(np.float32)
    return dots / s * scales


@pytest.mark.parametrize("k", [100, 1100, 2560])
def test_int8_lm_head_is_exact_on_every_path(k):
    rng = np.random.default_rng(6)
    table = rng.standard_normal((67, k)).astype(np.float32)
    codes, scales = kernels.quantize_head(table)
    assert np.abs(codes.astype(np.float32) * scales[:, None] - table).max() <= scales.max() / 2 + 1e-6
    x = rng.standard_normal((11, k)).astype(np.float32)
    reference = int8_head_reference(codes, scales, x)
    for p in kernels.paths():
        for m in (1, 2, 3, 8, 11):
            out = kernels.head(codes, x[:m], m, np.empty((m, 67), np.float32), scales, kernels.path_index(p), 2)
            assert np.array_equal(out, reference[:m]), (p, m)


def test_int8_lm_head_edge_values_are_exact():
    """Codes of -128 and 127 against activations at +-127 (AVX2's maddubs pairs reach 2 x 128 x 127)."""
    k = 640
    codes = np.empty((4, k), np.int8)
    codes[0], codes[1], codes[2], codes[3] = -128, 127, np.tile([-128, 127], k // 2), np.tile([127, -128], k // 2)
    scales = np.full(4, 0.5, np.float32)
    x = np.stack([np.full(k, 3.0), np.full(k, -3.0), np.tile([3.0, -3.0], k // 2)]).astype(np.float32)
    reference = int8_head_reference(codes, scales, x)
    assert np.isclose(reference[0, 0], -128 * 3.0 * k * 0.5)  # dot -128 x 127 x k, / (127 / 3), x 0.5
    for p in kernels.paths():
        out = kernels.head(codes, x, 3, np.empty((3, 4), np.float32), scales, kernels.path_index(p))
        assert np.array_equal(out, reference), p


def attention_step(qkv, heads, kv_heads, dim, tables, spans, cache, path, threads=2):
    out = np.empty((len(qkv), heads * dim), np.float32)
    return kernels.attention_step(qkv, len(qkv), heads, kv_heads, dim, *tables, np.array(spans, np.int64), cache,
                                  dim**-0.5, out, kernels.path_index(path), threads)


# 9+ tokens take the prefill kernel (attention_prefill.c): several tokens and heads of a kv head per task;
# head sizes whose output rows fit in registers (64, 128) and others (48); more heads per kv head than a task's rows;
# decode tasks of two heads (even groups) and of one (a group of 3).
@pytest.mark.parametrize("start,tokens", [(0, 1), (0, 7), (9, 1), (5, 4), (0, 9), (0, 32), (3, 21)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (20, 5, 128), (40, 1, 48), (12, 4, 64)])
def test_attention_matches_sdpa_and_is_identical_on_every_path(start, tokens, heads, kv_heads, dim):
    positions = 32
    rng = np.random.default_rng(6)
    qkv = rng.standard_normal((tokens, (heads + 2 * kv_heads) * dim)).astype(np.float32)
    past = rng.standard_normal((1, 2, kv_heads, positions, dim)).astype(np.float32)
    no_rotation = np.ones((positions, dim), np.float32), np.zeros((positions, dim), np.float32)
    outs, caches = [], []
    for path in kernels.paths():
        caches.append(past.copy())
        outs.append(attention_step(qkv.copy(), heads, kv_heads, dim, no_rotation, [(0, start, tokens)], caches[-1], path))
    assert all(np.array_equal(o, outs[0]) for o in outs)
    cache = caches[0]
    new = qkv[:, heads * dim :].reshape(tokens, 2, kv_heads, dim).transpose(1, 2, 0, 3)
    assert np.array_equal(cache[0, :, :, start : start + tokens], new)  # this step's keys and values are cached
    length = start + tokens
    qt = torch.from_numpy(qkv[:, : heads * dim]).view(tokens, heads, dim).transpose(0, 1)[None]
    kt, vt = (torch.from_numpy(c[:, :length])[None] for c in (cache[0, 0], cache[0, 1]))
    mask = torch.arange(length) <= (start + torch.arange(tokens))[:, None]
    ref = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(torch.from_numpy(outs[0]), ref[0].transpose(0, 1).reshape(tokens, -1), atol=2e-6)


def test_attention_of_several_slots_in_one_step_equals_one_call_per_slot():
    """Decode rows, a short chunk and a prefill chunk of 9+ tokens (the prefill kernel, as alone) in one step."""
    from bitnet_tt.backends.torch.model import rope_tables

    cfg = ModelConfig.from_hf_dict({**config_2b4t(), "hidden_size": 256, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "max_position_embeddings": 16})
    heads, kv_heads, dim, positions = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16
    tables = tuple(t.numpy() for t in rope_tables(cfg, positions, torch.float32, "cpu"))
    rng = np.random.default_rng(8)
    spans = [(1, 3, 1), (3, 2, 11), (0, 0, 2), (2, 5, 1)]
    qkv = rng.standard_normal((15, (heads + 2 * kv_heads) * dim)).astype(np.float32)
    past = rng.standard_normal((4, 2, kv_heads, positions, dim)).astype(np.float32)
    together_cache = past.copy()
    together = attention_step(qkv.copy(), heads, kv_heads, dim, tables, spans, together_cache, kernels.paths()[0])
    alone_cache, row = past.copy(), 0
    for span in spans:
        rows = qkv[row : row + span[2]].copy()
        alone = attention_step(rows, heads, kv_heads, dim, tables, [span], alone_cache, kernels.paths()[-1], threads=1)
        assert np.array_equal(alone, together[row : row + span[2]])
        row += span[2]
    assert np.array_equal(alone_cache, together_cache)


def test_attention_segments_outside_the_cache_are_one_line_errors():
    qkv, cache = np.zeros((2, 4 * 8), np.float32), np.zeros((1, 2, 1, 4, 8), np.float32)
    tables = np.ones((4, 8), np.float32), np.zeros((4, 8), np.float32)
    for spans, message in (([(0, 3, 2)], "outside the cache"), ([(1, 0, 2)], "outside the cache"),
                           ([(0, 0, 1)], "segments hold 1 rows")):
        with pytest.raises(ValueError, match=message):
            attention_step(qkv, 2, 1, 8, tables, spans, cache, "scalar")


def test_building_without_a_c_compiler_is_a_one_line_error(tmp_path):
    """The build stops with one line naming what to install (here the compiler does not exist)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CC": str(tmp_path / "no-such-cc")}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "temp")], cwd=kernels.REPOSITORY, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("bitnet-tt: building the CPU kernels needs a C compiler")
