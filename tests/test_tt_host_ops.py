"""The host stand-in's ops against ttnn's own golden functions, and, for ops that ship none, pinned to
the behaviour their ttnn docstrings describe and the backend relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tools.tt_host.stand_in import HostTT

pytestmark = pytest.mark.tt_host
GEN = torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def golden(host_ttnn):
    """golden("transformer.scaled_dot_product_attention") -> ttnn's CPU reference for that op."""

    def of(path: str):
        op = host_ttnn
        for part in path.split("."):
            op = getattr(op, part)
        return host_ttnn.get_golden_function(op)

    return of


@pytest.fixture
def tt():
    return HostTT(exact=True)  # no rounding: the comparison is about what each op computes


def on_device(tt, data, dtype="float32", layout="TILE", memory_config=None):
    return tt.from_torch(data, dtype=dtype, layout=layout, device=tt.device(), memory_config=memory_config)


def randn(*shape):
    return torch.randn(*shape, generator=GEN)


def close(ours, expected):
    torch.testing.assert_close(ours.data.float(), expected.float().reshape(ours.data.shape), rtol=1e-5, atol=1e-5)


def test_rms_norm(tt, golden):
    x, w = randn(1, 1, 32, 256), randn(256)
    ours = tt.rms_norm(on_device(tt, x), epsilon=1e-5, weight=on_device(tt, w.reshape(1, 1, 8, 32), layout="ROW_MAJOR"))
    close(ours, golden("rms_norm")(x, w, epsilon=1e-5))


def test_linear(tt, golden):
    a, b = randn(1, 1, 64, 96), randn(96, 160)
    close(tt.linear(on_device(tt, a), on_device(tt, b)), golden("linear")(a, b))


def test_embedding(tt, golden):
    ids, table = torch.randint(0, 300, (1, 32), generator=GEN), randn(300, 64)
    ours = tt.embedding(on_device(tt, ids, "uint32", "ROW_MAJOR"), on_device(tt, table, layout="ROW_MAJOR"))
    close(ours, golden("embedding")(ids, table))


@pytest.mark.parametrize("op, args", [("abs", ()), ("reciprocal", ()), ("round", ()), ("rsqrt", ()), ("square", ())])
def test_unary(tt, golden, op, args):
    x = randn(1, 1, 32, 64).abs() + 0.1  # positive, so that reciprocal and rsqrt are defined
    close(getattr(tt, op)(on_device(tt, x * 50)), golden(op)(x * 50))


@pytest.mark.parametrize("op", ["add", "multiply", "divide", "maximum"])
def test_binary_and_scalar(tt, golden, op):
    a, b = randn(1, 1, 32, 64), randn(1, 1, 32, 1).abs() + 0.5
    close(getattr(tt, op)(on_device(tt, a), on_device(tt, b)), golden(op)(a, b))
    close(getattr(tt, op)(on_device(tt, a), 0.25), golden(op)(a, 0.25))


@pytest.mark.parametrize("op", ["max", "mean"])
def test_reductions(tt, golden, op):
    x = randn(1, 1, 32, 96)
    close(getattr(tt, op)(on_device(tt, x), dim=-1, keepdim=True), golden(op)(x, dim=-1, keepdim=True))


def test_argmax(tt, golden):
    x = randn(1, 1, 32, 300)
    ours = tt.argmax(on_device(tt, x, layout="ROW_MAJOR"), dim=-1)
    assert torch.equal(ours.data, golden("argmax")(x, dim=-1).to(ours.data.dtype))


def test_fill_cache(tt, golden):
    cache, x = torch.zeros(4, 2, 64, 32), randn(1, 2, 32, 32)
    ours = on_device(tt, cache.clone())
    tt.fill_cache(ours, on_device(tt, x), 2)
    close(ours, golden("fill_cache")(cache.clone(), x, 2))


def test_sdpa_prefill(tt, golden):
    q, k, v = randn(1, 4, 64, 32), randn(1, 4, 64, 32), randn(1, 4, 64, 32)
    ours = tt.transformer.scaled_dot_product_attention(on_device(tt, q), on_device(tt, k), on_device(tt, v),
                                                       is_causal=True, scale=0.2)
    close(ours, golden("transformer.scaled_dot_product_attention")(q, k, v, is_causal=True, scale=0.2))


def chunked_sdpa_inputs(tt, start: int, pages: int = 8):
    """Q of 64 positions from `start`, 4 query heads over 1 KV head, caches of 6 blocks of 64 positions, the
    user's pages scattered over them; the start as a device tensor."""
    q, k, v = randn(1, 4, 64, 32), randn(6, 1, 64, 32), randn(6, 1, 64, 32)
    table = torch.tensor([[4, 0, 5, 2, 1, 3, 0, 0][:pages]], dtype=torch.int32)
    device = [on_device(tt, t) for t in (q, k, v)]
    device.append(on_device(tt, table, "int32", "ROW_MAJOR"))
    start_1 = on_device(tt, torch.tensor([start], dtype=torch.int32), "int32", "ROW_MAJOR")
    return (q, k, v, table), device, start_1


def test_chunked_sdpa_reads_the_paged_cache_from_the_start(tt, golden):
    config = tt.SDPAProgramConfig(compute_with_storage_grid_size=tt.CoreCoord(8, 8), q_chunk_size=32, k_chunk_size=32)
    for start in (0, 96, 192):
        host, device, start_1 = chunked_sdpa_inputs(tt, start)
        ours = tt.transformer.chunked_scaled_dot_product_attention(*device, chunk_start_idx_tensor=start_1, scale=0.25,
                                                                   program_config=config)
        close(ours, golden("transformer.chunked_scaled_dot_product_attention")(*host, start, scale=0.25))


@pytest.mark.parametrize("problem, call", [
    ("scale is not a float32 value", dict(scale=0.1)),
    ("not a multiple of q_chunk_size", dict(start=48)),
    ("page_table_stick_size", dict(pages=4)),
])
def test_chunked_sdpa_refuses_what_ttnn_refuses(tt, problem, call):
    """As ttnn 0.81.1 on the mock device: the binding takes scale as a C++ float; the start must be a multiple of
    the chunk sizes; a start read from a device tensor needs a page-table row of a multiple of 32 bytes."""
    _, device, start_1 = chunked_sdpa_inputs(tt, call.get("start", 64), call.get("pages", 8))
    config = tt.SDPAProgramConfig(compute_with_storage_grid_size=tt.CoreCoord(8, 8), q_chunk_size=32, k_chunk_size=32)
    with pytest.raises(RuntimeError, match=problem):
        tt.transformer.chunked_scaled_dot_product_attention(*device, chunk_start_idx_tensor=start_1,
                                                            scale=call.get("scale", 0.25), program_config=config)


def test_fill_cache_at_a_tile_with_the_slot_and_start_as_run_time_arguments(tt):
    """update_idx must be a whole number of tiles (the mock: update_idx % TILE_HEIGHT == 0); the slot and the
    start do not compile new programs (the mock's program cache does not grow with them)."""
    cache, x = on_device(tt, torch.zeros(4, 2, 128, 32)), on_device(tt, randn(1, 2, 32, 32))
    tt.fill_cache(cache, x, 2, update_idx=32)
    assert torch.equal(cache.data[2, :, 32:64], x.data[0]) and not cache.data[2, :, :32].any()
    programs = tt.device().num_program_cache_entries()
    tt.fill_cache(cache, x, 1, update_idx=96)
    assert tt.device().num_program_cache_entries() == programs
    with pytest.raises(RuntimeError, match="not a whole number of tiles"):
        tt.fill_cache(cache, x, 1, update_idx=33)


def test_sdpa_decode_with_gqa_and_per_user_positions(tt, golden):
    q, k, v = randn(1, 3, 8, 32), randn(3, 2, 64, 32), randn(3, 2, 64, 32)
    positions = torch.tensor([0, 17, 63], dtype=torch.int32)
    ours = tt.transformer.scaled_dot_product_attention_decode(
        on_device(tt, q), on_device(tt, k), on_device(tt, v), cur_pos_tensor=on_device(tt, positions, "int32", "ROW_MAJOR"),
        scale=0.3)
    expected = golden("transformer.scaled_dot_product_attention_decode")(q, k, v, cur_pos_tensor=positions, scale=0.3)
    close(ours, expected)


# --- ops with no golden function: the behaviours the backend relies on ------------------------------------


def test_rotary_embedding_hf_is_hf_half_split_rope(tt):
    """Docstring: HF-style (half-split) rotation; prefill x [1, H, S, D] with cos/sin [1, 1, S, D]."""
    x, angles = randn(1, 4, 32, 64), randn(1, 1, 32, 32)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    ours = tt.experimental.rotary_embedding_hf(on_device(tt, x), on_device(tt, cos), on_device(tt, sin))
    from transformers.models.bitnet.modeling_bitnet import apply_rotary_pos_emb

    expected, _ = apply_rotary_pos_emb(x, x, cos[0], sin[0], unsqueeze_dim=0)
    close(ours, expected)


def test_rotary_embedding_hf_decode_needs_height_sharding(tt):
    x = on_device(tt, randn(1, 4, 2, 64))
    with pytest.raises(RuntimeError, match="height-sharded"):
        tt.experimental.rotary_embedding_hf(x, x, x, is_decode_mode=True)


def test_paged_update_cache_writes_each_user_at_its_position(tt):
    cache = on_device(tt, torch.zeros(3, 2, 16, 32))
    x, positions = randn(1, 3, 2, 32), torch.tensor([0, 5, 15], dtype=torch.int32)
    tt.experimental.paged_update_cache(cache, on_device(tt, x), update_idxs_tensor=on_device(tt, positions, "int32", "ROW_MAJOR"))
    for user, position in enumerate(positions.tolist()):
        assert torch.equal(cache.data[user, :, position], x[0, user])
    assert int((cache.data != 0).any(-1).sum()) == 3 * 2  # nothing else was written
    with pytest.raises(RuntimeError, match="past the end"):
        tt.experimental.paged_update_cache(cache, on_device(tt, x), update_idxs_tensor=on_device(
            tt, torch.tensor([0, 1, 16], dtype=torch.int32), "int32", "ROW_MAJOR"))


def test_qkv_heads_decode_split_and_concat(tt):
    """[1, 1, B, (H + 2K) D] -> q [1, B, H, D], k, v [1, B, K, D]; concat writes 32 user rows back."""
    users, heads, kv, dim = 5, 4, 2, 32
    qkv = randn(1, 1, users, (heads + 2 * kv) * dim)
    sharded = tt.create_sharded_memory_config((32, qkv.shape[-1] // 4), tt.CoreGrid(y=1, x=4), tt.ShardStrategy.WIDTH)
    q, k, v = tt.experimental.nlp_create_qkv_heads_decode(on_device(tt, qkv, memory_config=sharded),
                                                          num_heads=heads, num_kv_heads=kv)
    parts = qkv[0, 0].view(users, heads + 2 * kv, dim)
    assert torch.equal(q.data[0], parts[:, :heads]) and torch.equal(v.data[0], parts[:, heads + kv:])
    joined = tt.experimental.nlp_concat_heads_decode(q, num_heads=heads)
    assert list(joined.shape) == [1, 1, 32, heads * dim]
    assert torch.equal(joined.data[0, 0, :users], qkv[0, 0, :, : heads * dim])
    q, _, _ = tt.experimental.nlp_create_qkv_heads_decode(on_device(tt, qkv), num_heads=heads, num_kv_heads=kv)
    assert torch.equal(q.data[0], parts[:, :heads])  # interleaved rows are read by position, not by core


def test_qkv_heads_prefill_split_and_concat(tt):
    seq, heads, kv, dim = 64, 4, 1, 32
    qkv = randn(1, 1, seq, (heads + 2 * kv) * dim)
    q, k, v = tt.experimental.nlp_create_qkv_heads(on_device(tt, qkv), num_heads=heads, num_kv_heads=kv,
                                                   transpose_k_heads=False)
    assert [list(t.shape) for t in (q, k, v)] == [[1, heads, seq, dim], [1, kv, seq, dim], [1, kv, seq, dim]]
    assert torch.equal(k.data[0, 0], qkv[0, 0, :, heads * dim : (heads + 1) * dim])
    assert torch.equal(tt.experimental.nlp_concat_heads(q).data, qkv[..., : heads * dim])


def test_mul_applies_relu_squared_to_the_first_input(tt):
    a, b = randn(1, 1, 32, 64), randn(1, 1, 32, 64)
    ours = tt.mul(on_device(tt, a), on_device(tt, b), input_tensor_a_activations=[tt.UnaryOpType.RELU, tt.UnaryOpType.SQUARE])
    close(ours, F.relu(a) ** 2 * b)


def test_trace_replays_on_new_inputs_and_rejects_allocation(tt):
    x = on_device(tt, torch.ones(1, 1, 32, 32))
    tt.multiply(tt.add(x, 1.0), 3.0)  # compiles the programs; a capture rejects compiling
    trace = tt.begin_trace_capture(None)
    y = tt.multiply(tt.add(x, 1.0), 3.0)
    tt.end_trace_capture(None, trace)
    assert torch.isnan(y.data).all()  # nothing ran yet
    tt.copy_host_to_device_tensor(tt.from_torch(torch.full((1, 1, 32, 32), 2.0), dtype="float32", layout="TILE"), x)
    tt.execute_trace(None, trace)
    assert torch.equal(y.data, torch.full((1, 1, 32, 32), 9.0))
    tt.begin_trace_capture(None)
    with pytest.raises(RuntimeError, match="inside a trace capture"):
        on_device(tt, torch.zeros(2))


def test_deallocated_tensors_are_unusable(tt):
    x = on_device(tt, randn(1, 1, 32, 32))
    tt.deallocate(x)
    with pytest.raises(RuntimeError, match="deallocated"):
        tt.add(x, 1.0)


def test_bf16_rounding_is_the_device_dtype():
    x = torch.tensor([1.0 + 2**-10])
    assert HostTT().round_to(x, "bfloat16").item() == 1.0
    assert HostTT(exact=True).round_to(x, "bfloat16").item() == 1.0 + 2**-10


def test_a_new_program_compiled_while_a_trace_is_live_makes_it_unsafe_to_replay(tt):
    x = on_device(tt, torch.ones(1, 1, 32, 32))
    tt.add(x, 1.0)
    with pytest.raises(RuntimeError, match="inside a trace capture"):
        trace = tt.begin_trace_capture(None)
        try:
            tt.multiply(x, 2.0)
        finally:
            tt.end_trace_capture(None, trace)
    trace = tt.begin_trace_capture(None)
    tt.add(x, 1.0)
    tt.end_trace_capture(None, trace)
    entries = tt.device().num_program_cache_entries()
    tt.add(x, 1.0)  # a cached program: nothing is allocated
    tt.execute_trace(None, trace)
    tt.multiply(x, 5.0)  # a new program
    assert tt.device().num_program_cache_entries() == entries + 1
    with pytest.raises(RuntimeError, match="new programs were compiled while it was live"):
        tt.execute_trace(None, trace)


# --- placement: shards on the cores the real ops use, read the way the kernels read them -----------------

from tools.tt_host.stand_in import rectangle, row_major, sdpa_decode_computed_heads  # noqa: E402

USERS, HEADS, KV, DIM = 32, 20, 5, 128  # BitNet 2B-4T's attention at 32 users
BLACKHOLE = (13, 10)


def placed(tt, data, placement, strategy, shard):
    config = tt.create_sharded_memory_config(shard, tt.CoreGrid(y=1, x=1), strategy).placed(placement)
    return on_device(tt, data, memory_config=config)


def matmul_1d(tt, x, w, program_grid, per_core_n, memory_config=None):
    program = tt.MatmulMultiCoreReuseMultiCast1DProgramConfig(
        compute_with_storage_grid_size=tt.CoreCoord(*program_grid), in0_block_w=5, out_subblock_h=1, out_subblock_w=1,
        per_core_M=1, per_core_N=per_core_n, fuse_batch=True, fused_activation=None, mcast_in0=True)
    return tt.linear(x, w, program_config=program, memory_config=memory_config)


@pytest.mark.parametrize("program_grid, warned", [((8, 10), False), (BLACKHOLE, True)])
def test_1d_matmul_output_lands_on_the_first_cores_of_its_program_grid(tt, program_grid, warned):
    """As the mock P150 reports: 16 output shards asked for on an 8x2 rectangle land there when the program
    grid is 8 wide, and on {[0-0 - 12-0],[0-1 - 2-1]} (ttnn: "Mismatch between computed MemoryConfig")
    when it is the whole 13-wide grid."""
    x, w = on_device(tt, randn(1, 1, 32, 2560)), on_device(tt, randn(2560, 2560))
    asked = tt.create_sharded_memory_config((32, 160), tt.CoreGrid(y=2, x=8), tt.ShardStrategy.WIDTH)
    y = matmul_1d(tt, x, w, program_grid, 5, asked)
    assert y.memory_config().placement == row_major(16, program_grid)
    assert bool(tt.warnings) == warned
    close(y.data, x.data @ w.data)


@pytest.mark.parametrize("program_grid, exact", [((8, 10), True), (BLACKHOLE, False)])
def test_1d_matmul_reads_x_shard_k_from_the_kth_core_of_its_program_grid(tt, program_grid, exact):
    """x width-sharded on an 8x2 rectangle: the op multicasts shard k from the k-th of the first 16 cores of
    its program grid, row by row; on the 13-wide grid those include cores that hold no shard of x."""
    x = on_device(tt, randn(1, 1, 32, 2560), memory_config=tt.create_sharded_memory_config(
        (32, 160), tt.CoreGrid(y=2, x=8), tt.ShardStrategy.WIDTH))
    w = on_device(tt, randn(2560, 3840))
    y = matmul_1d(tt, x, w, program_grid, 2, tt.L1_MEMORY_CONFIG)
    assert not y.memory_config().sharded
    if exact:
        close(y.data, x.data @ w.data)
    else:
        assert torch.isnan(y.data).all()


@pytest.mark.parametrize("layout, exact", [("rectangle 8x5", True), ("row-major over 13 columns", False),
                                           ("interleaved", True)])
def test_qkv_head_split_walks_the_bounding_box_of_its_input(tt, layout, exact):
    """The reader takes tiles(3840) / (box cores) tiles from each core of the input's bounding box: right for
    a rectangle, scrambled for 40 shards on 13-wide rows (box 13x4 = 52 cores: 2 tiles each, not 3)."""
    qkv = randn(1, 1, USERS, (HEADS + 2 * KV) * DIM)
    if layout == "interleaved":
        tensor = on_device(tt, qkv, memory_config=tt.L1_MEMORY_CONFIG)
    else:
        placement = rectangle(8, 5) if layout.startswith("rectangle") else row_major(40, BLACKHOLE)
        tensor = placed(tt, qkv, placement, tt.ShardStrategy.WIDTH, (32, 96))
    heads = tt.create_sharded_memory_config((32, DIM), tt.CoreGrid(y=4, x=8), tt.ShardStrategy.HEIGHT)
    q, k, v = tt.experimental.nlp_create_qkv_heads_decode(tensor, num_heads=HEADS, num_kv_heads=KV, memory_config=heads)
    want = qkv[0, 0].view(USERS, HEADS + 2 * KV, DIM).split([HEADS, KV, KV], dim=1)
    assert all(torch.equal(got.data[0], w) for got, w in zip((q, k, v), want)) == exact
    assert q.memory_config().placement == rectangle(8, 4)


def test_qkv_head_split_without_an_output_grid_uses_the_first_cores_row_by_row(tt):
    qkv = on_device(tt, randn(1, 1, USERS, (HEADS + 2 * KV) * DIM), memory_config=tt.L1_MEMORY_CONFIG)
    q, _, _ = tt.experimental.nlp_create_qkv_heads_decode(qkv, num_heads=HEADS, num_kv_heads=KV,
                                                          memory_config=tt.L1_HEIGHT_SHARDED_MEMORY_CONFIG)
    assert q.memory_config().placement == row_major(USERS, BLACKHOLE)  # the mock: {[0-0 - 12-1],[0-2 - 5-2]}


@pytest.mark.parametrize("q_cores, exact", [(rectangle(8, 4), True), (row_major(USERS, BLACKHOLE), False)])
def test_rope_decode_reads_cos_and_sin_on_the_cores_of_x(tt, q_cores, exact):
    """rotary_embedding_hf binds cos/sin on x's cores: with x on 13-wide rows and cos/sin on 8x4, user 8
    finds user 13's rows, or none."""
    x, angles = randn(1, USERS, HEADS, DIM), randn(1, USERS, 1, DIM // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rows_8x4 = [placed(tt, t, rectangle(8, 4), tt.ShardStrategy.HEIGHT, (32, DIM)) for t in (cos, sin)]
    ours = tt.experimental.rotary_embedding_hf(placed(tt, x, q_cores, tt.ShardStrategy.HEIGHT, (32, DIM)), *rows_8x4,
                                               is_decode_mode=True)
    half = torch.cat((-x[..., DIM // 2:], x[..., : DIM // 2]), -1)
    assert torch.allclose(ours.data, x * cos + half * sin, atol=1e-6) == exact
    assert torch.allclose(ours.data[:, :8], (x * cos + half * sin)[:, :8], atol=1e-6)  # the first row agrees anyway


def sdpa_decode(tt, q_cores, grid):
    q, k, v = randn(1, USERS, HEADS, DIM), randn(USERS, KV, 64, DIM), randn(USERS, KV, 64, DIM)
    positions = torch.arange(USERS, dtype=torch.int32) + 20
    ours = tt.transformer.scaled_dot_product_attention_decode(
        placed(tt, q, q_cores, tt.ShardStrategy.HEIGHT, (32, DIM)), on_device(tt, k), on_device(tt, v),
        cur_pos_tensor=on_device(tt, positions, "int32", "ROW_MAJOR"), scale=0.1,
        program_config=tt.SDPAProgramConfig(compute_with_storage_grid_size=tt.CoreCoord(*grid), q_chunk_size=0,
                                            k_chunk_size=0))
    return ours.data, ttnn_golden_sdpa_decode(q, k, v, positions)


def ttnn_golden_sdpa_decode(q, k, v, positions):
    mask = torch.arange(k.shape[2])[None, :] <= positions[:, None]
    return F.scaled_dot_product_attention(q[0][:, :, None], k, v, attn_mask=mask[:, None, None, :], scale=0.1,
                                          enable_gqa=True)[:, :, 0][None]


def test_sdpa_decode_reads_user_b_q_from_its_output_core_b(tt):
    got, want = sdpa_decode(tt, rectangle(8, 4), (8, 4))
    torch.testing.assert_close(got, want)
    got, want = sdpa_decode(tt, row_major(USERS, BLACKHOLE), (8, 4))  # Q on 13-wide rows, SDPA 8 wide
    torch.testing.assert_close(got[:, :8], want[:, :8])
    assert not torch.allclose(got[:, 8:], want[:, 8:], equal_nan=False)


def test_sdpa_decode_on_8x8_cores_leaves_users_uncomputed_at_32_users(tt):
    """64 cores / 32 users = 2 per user cannot split 5 KV heads: 3 heads per core on 53 cores."""
    got, want = sdpa_decode(tt, rectangle(8, 4), (8, 8))
    assert torch.allclose(got[0, :26], want[0, :26])
    assert torch.isnan(got[0, 26, 3 * 4:]).all() and torch.isnan(got[0, 27:]).all()  # user 26 gets KV heads 0-2 only
    assert sdpa_decode_computed_heads(USERS, KV, 64, 16) != {(u, h) for u in range(USERS) for h in range(KV)}


def test_plan_sdpa_decode_grids_are_split_completely_by_the_op():
    """Every grid size the plan accepts (busy cores > 0) is one where the op computes every (user, KV head)."""
    from bitnet_tt.backends.ttnn.config import sdpa_decode_busy_cores

    for users in range(1, 33):
        for kv in (1, 2, 4, 5, 8):
            for cores in range(1, 81):
                computed = sdpa_decode_computed_heads(users, kv, cores, 16) if cores >= users else None
                complete = computed == {(u, h) for u in range(users) for h in range(kv)}
                if sdpa_decode_busy_cores(users, kv, cores):
                    assert complete, (users, kv, cores)


@pytest.mark.parametrize("grid", [(13, 10), (12, 10), (11, 10), (8, 8)])
def test_plan_places_heads_cos_sin_and_sdpa_q_on_the_same_cores_for_every_user_count(grid):
    """2B-4T's decode layouts at 1-32 users on Blackhole (unharvested and harvested) and Wormhole grids:
    the head grid fits, SDPA decode's output core b is the core holding user b, and its split is complete
    (main b79e45c asked for a 1x17 head grid at 17 users and an 8x8 SDPA grid at 32)."""
    from bitnet_tt.backends.ttnn.config import DeviceFacts, TTOptions, make_plan
    from bitnet_tt.config import ModelConfig
    from bitnet_tt.synthetic import config_2b4t

    model = ModelConfig.from_hf_dict(config_2b4t())
    device = DeviceFacts("test", grid[0], grid[1], 8, 4_277_141_376, 1_461_120)
    for users in range(1, 33):
        plan = make_plan(model, device, TTOptions(), users, 256)
        (hx, hy), (sx, sy) = plan.head_grid(), plan.sdpa_decode_grid()
        rows = plan.decode_rows
        assert users <= rows == hx * hy and hx <= grid[0] and hy <= grid[1] and sx <= grid[0] and sy <= grid[1]
        assert rectangle(hx, hy)[:rows] == row_major(rows, (sx, sy)), users
        computed = sdpa_decode_computed_heads(rows, model.num_kv_heads, sx * sy, 16)
        assert computed == {(u, h) for u in range(rows) for h in range(model.num_kv_heads)}, users
