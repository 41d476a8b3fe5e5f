"""BitNet b1.58 as a sequence of ttnn calls: decode (many users, one token each) and prefill (one user).

`tt` is the ttnn module, passed in rather than imported, so that the very same call sequence can run
on a card, on a mock device, or on a host stand-in for ttnn that computes the numbers (verification).

Shape names carry their layout: x_11BH is [1, 1, users, hidden]; q_1BHD is [1, users, heads, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import SAMPLING_TOP_K, TILE, TTPlan, largest_divisor
from .weights import LayerOnDevice, ModelOnDevice


@dataclass(frozen=True)
class PrefillWindow:
    """Where a prefill runs: cache row `slot` from position `first` (a whole number of tiles), also held on the
    device for chunked SDPA: first_1 int32 [1] and page_table_1P int32 [1, PAGE_TABLE_ENTRIES] (the slot)."""

    slot: int
    first: int
    first_1: object
    page_table_1P: object


class TTModel:
    def __init__(self, tt, device, plan: TTPlan, weights: ModelOnDevice, kv_cache: list[tuple[object, object]]):
        self.tt, self.device, self.plan, self.w, self.kv_cache = tt, device, plan, weights, kv_cache
        m = plan.model
        self.num_heads, self.num_kv_heads, self.head_dim = m.num_heads, m.num_kv_heads, m.head_dim
        self.eps = m.rms_norm_eps
        self.hifi = tt.WormholeComputeKernelConfig(
            math_fidelity=tt.MathFidelity.HiFi4, math_approx_mode=False, fp32_dest_acc_en=True, packer_l1_acc=True)
        self.hifi_bf16_acc = tt.WormholeComputeKernelConfig(
            math_fidelity=tt.MathFidelity.HiFi4, math_approx_mode=False, fp32_dest_acc_en=False, packer_l1_acc=False)
        self.matmul_kernel = tt.WormholeComputeKernelConfig(  # the LM head's (not ternary)
            math_fidelity=tt.MathFidelity.HiFi2, math_approx_mode=False, fp32_dest_acc_en=True, packer_l1_acc=True)
        # The ternary codes at LoFi: the multiplier's one pass takes the weight's sign, exponent and top 4
        # mantissa bits, all a code in {-1, 0, +1} has, so LoFi gives HiFi2's products bit for bit
        # (tests/test_ttnn_perf.py and test_ttnn_host.py prove it with ttnn's own block-float conversion).
        self.ternary_kernel = tt.WormholeComputeKernelConfig(
            math_fidelity=tt.MathFidelity.LoFi, math_approx_mode=False, fp32_dest_acc_en=True, packer_l1_acc=True)
        gx, gy = plan.head_grid()
        self.heads_memcfg = tt.create_sharded_memory_config(
            shape=(TILE, self.head_dim), core_grid=tt.CoreGrid(y=gy, x=gx), strategy=tt.ShardStrategy.HEIGHT,
            use_height_and_width_as_shard_shape=True)
        self._norm_configs = {}
        self._matmul_configs = {}
        sdpa_x, sdpa_y = plan.sdpa_decode_grid()
        self.sdpa_decode_config = tt.SDPAProgramConfig(
            compute_with_storage_grid_size=tt.CoreCoord(sdpa_x, sdpa_y), q_chunk_size=0, k_chunk_size=0)
        # a prefill window starts on any tile (plan.prefill_window), which chunked SDPA allows with chunks of one tile
        self.chunked_sdpa_config = tt.SDPAProgramConfig(
            compute_with_storage_grid_size=tt.CoreCoord(*plan.chunked_sdpa_grid()), q_chunk_size=TILE, k_chunk_size=TILE)
        # ttnn.sampling draws each user's token on its own core of this rectangle (the head grid's; the
        # first cores of a 13-wide grid, row by row, are not one); manual_seed must seed the same cores
        self.sampling_cores = tt.CoreRangeSet({tt.CoreRange(tt.CoreCoord(0, 0), tt.CoreCoord(gx - 1, gy - 1))})
        # decode's residual stream: width-sharded on the grid the matmuls read it from and o_proj and
        # down_proj write to (plan.norms_feed_matmuls), else rows in L1
        self.residual_memcfg = (self._decode_matmul_configs(plan.decode_matmuls()["wqkv"])[0]
                                if plan.norms_feed_matmuls else tt.L1_MEMORY_CONFIG)

    # -- shared pieces ------------------------------------------------------------------------------

    def norm(self, x, weight, eps: float, weight_row=None):
        """Prefill: interleaved rows; rows too wide for one core's L1 take the composite form, which
        needs the weight as a TILE row [1, 1, 1, width] (`weight_row`)."""
        tt = self.tt
        mode = self.plan.interleaved_norm(list(x.shape)[-1])
        if mode == "composite":
            inv_rms = tt.rsqrt(tt.add(tt.mean(tt.square(x), dim=-1, keepdim=True), eps))
            return tt.multiply(tt.multiply(x, inv_rms), weight_row)
        kernel = self.hifi if mode == "fp32" else self.hifi_bf16_acc
        return tt.rms_norm(x, epsilon=eps, weight=weight, compute_kernel_config=kernel)

    def norm_decode(self, x_11BW, weight, eps: float, feeds: str | None = None, in_place: bool = False):
        """Decode: the 32-row tile width-sharded over a grid and normalised there. With `feeds` (the decode
        matmul that reads the result) it runs on that matmul's input grid and its output stays sharded
        there (plan.norms_feed_matmuls); otherwise the output returns to L1 rows. `in_place`: x already
        lies on that grid (the residual stream, gate/up's product)."""
        tt = self.tt
        memory_config, program_config = self._sharded_norm(list(x_11BW.shape)[-1], feeds)
        if not in_place:
            x_11BW = tt.to_memory_config(x_11BW, memory_config)
        y_11BW = tt.rms_norm(x_11BW, epsilon=eps, weight=weight, program_config=program_config,
                             memory_config=memory_config, compute_kernel_config=self.hifi)
        return y_11BW if feeds and self.plan.norms_feed_matmuls else tt.to_memory_config(y_11BW, tt.L1_MEMORY_CONFIG)

    def _sharded_norm(self, width: int, feeds: str | None):
        layout = self.plan.decode_norm_layout(width, feeds)
        if layout not in self._norm_configs:
            tt = self.tt
            x, y, block_w = layout
            memory_config = self._width_sharded(width // (x * y), x, y)
            program_config = tt.LayerNormShardedMultiCoreProgramConfig(
                compute_with_storage_grid_size=tt.CoreCoord(x, y), subblock_w=largest_divisor(block_w, 4),
                block_h=1, block_w=block_w, inplace=False)
            self._norm_configs[layout] = memory_config, program_config
        return self._norm_configs[layout]

    def _width_sharded(self, shard_width: int, x: int, y: int):
        """One 32-row tile split by width over an x-by-y core grid."""
        tt = self.tt
        return tt.create_sharded_memory_config(shape=(TILE, shard_width), core_grid=tt.CoreGrid(y=y, x=x),
                                               strategy=tt.ShardStrategy.WIDTH, use_height_and_width_as_shard_shape=True)

    def matmul_decode(self, x_11BK, weight, spec, kernel, sharded_output: bool, memory_config=None):
        """One tile of rows times an interleaved weight, 1D multicast: x width-sharded on spec.in0 (a norm's
        output) or in rows; the output left in its shards (`sharded_output`, on the rectangle the next op
        reads) or written as rows to `memory_config` (L1 by default)."""
        tt = self.tt
        _, out_config, program_config = self._decode_matmul_configs(spec)
        return tt.linear(x_11BK, weight, program_config=program_config, compute_kernel_config=kernel,
                         memory_config=out_config if sharded_output else memory_config or tt.L1_MEMORY_CONFIG)

    def _decode_matmul_configs(self, spec):
        """x's layout, the output's sharded layout (where it is a rectangle) and the program config."""
        if spec not in self._matmul_configs:
            tt = self.tt
            (in_x, in_y), rectangle = spec.in0, spec.output_rectangle
            in0 = self._width_sharded(spec.k // spec.in0_cores, in_x, in_y)
            out = self._width_sharded(spec.per_core_n * TILE, *rectangle) if rectangle else None
            program = tt.MatmulMultiCoreReuseMultiCast1DProgramConfig(
                compute_with_storage_grid_size=tt.CoreCoord(*spec.grid), in0_block_w=spec.in0_block_w,
                out_subblock_h=1, out_subblock_w=largest_divisor(spec.per_core_n, 4), per_core_M=1,
                per_core_N=spec.per_core_n, fuse_batch=True, fused_activation=None, mcast_in0=True)
            self._matmul_configs[spec] = in0, out, program
        return self._matmul_configs[spec]

    def bitlinear(self, x, layer: LayerOnDevice, name: str, decoding: bool):
        """x @ the layer's `name` codes, with HF's per-token int8 absmax quantisation of x when enabled.

        Integer activations times ternary codes accumulate exactly in the fp32 destination; the
        per-token 1/s is applied after the matmul, the per-tensor scale by the caller's folds.
        """
        tt = self.tt
        quantise = self.plan.options.activation_quant
        if quantise:
            # In fp32: bf16 cannot hold x*s finely enough to round it (steps of 0.5 above 64).
            x = tt.typecast(x, tt.float32)
            absmax = tt.max(tt.abs(x), dim=-1, keepdim=True)
            scale = tt.multiply(tt.reciprocal(tt.maximum(absmax, 1e-5)), 127.0)
            x = tt.typecast(tt.round(tt.multiply(x, scale)), tt.bfloat16)  # integers |q| <= 127: exact in bf16
        if decoding:
            y = self.matmul_decode(x, getattr(layer, name), self.plan.decode_matmuls()[name], self.ternary_kernel,
                                   self.plan.keeps_output_sharded(name))
        else:
            y = tt.linear(x, getattr(layer, name), memory_config=tt.DRAM_MEMORY_CONFIG, compute_kernel_config=self.ternary_kernel)
        return tt.divide(y, scale) if quantise else y

    def mlp(self, x, layer: LayerOnDevice, decoding: bool):
        # x [.., S, hidden] -> [.., S, hidden], without the down projection's scale (add_scaled applies it)
        tt = self.tt
        gate, up = self.bitlinear(x, layer, "wgate", decoding), self.bitlinear(x, layer, "wup", decoding)
        # relu(gate)^2 * up, on gate's and up's shards (decode: the grid ffn_sub_norm and down_proj read)
        hidden = tt.mul(gate, up, input_tensor_a_activations=[tt.UnaryOpType.RELU, tt.UnaryOpType.SQUARE])
        eps = layer.folds.ffn_sub_norm_eps
        hidden = (self.norm_decode(hidden, layer.ffn_sub_norm, eps, feeds="wdown",
                                   in_place=self.plan.keeps_output_sharded("wgate")) if decoding
                  else self.norm(hidden, layer.ffn_sub_norm, eps, layer.ffn_sub_norm_row))
        return self.bitlinear(hidden, layer, "wdown", decoding)

    def add_scaled(self, x, y, scale: float, memory_config=None):
        """The residual add x + scale * y in one op: o_proj's and down_proj's per-tensor weight scale rides
        on the add as an activation of its second input."""
        tt = self.tt
        return tt.add(x, y, input_tensor_b_activations=[tt.UnaryWithParam(tt.UnaryOpType.MUL_UNARY_SFPU, scale)],
                      memory_config=memory_config)

    def lm_head(self, x_11TH):
        """Logits of one tile of rows (decode users: the final norm's shards; the prefill tile holding the
        last token: rows), as rows in DRAM: one 1D matmul over the program grid."""
        return self.matmul_decode(x_11TH, self.w.lm_head, self.plan.lm_head_matmul(), self.matmul_kernel, False,
                                  self.tt.DRAM_MEMORY_CONFIG)

    # -- decode -------------------------------------------------------------------------------------

    def forward_decode(self, tokens_1B, positions_B, position_rows_1B):
        """One token for every user row. tokens_1B uint32 [1, B] ROW_MAJOR; positions_B int32 [B] (cache
        writes and attention lengths); position_rows_1B uint32 [1, B] (RoPE rows).
        Returns logits [1, 1, B, vocab], left on the device for pick_greedy or pick_sampled."""
        tt = self.tt
        x_11BH = tt.unsqueeze(tt.embedding(tokens_1B, self.w.embedding, layout=tt.TILE_LAYOUT), 0)
        residual, sharded = self.residual_memcfg, self.plan.norms_feed_matmuls
        if sharded:
            x_11BH = tt.to_memory_config(x_11BH, residual)
        cos_1B1D = self._rope_rows(self.w.rope_cos_rows, position_rows_1B)
        sin_1B1D = self._rope_rows(self.w.rope_sin_rows, position_rows_1B)
        for index, layer in enumerate(self.w.layers):
            attn_in = self.norm_decode(x_11BH, layer.attn_norm, self.eps, feeds="wqkv", in_place=sharded)
            attn = self.attention_decode(attn_in, layer, index, cos_1B1D, sin_1B1D, positions_B)
            x_11BH = self.add_scaled(x_11BH, attn, layer.folds.o_scale, residual)
            mlp_in = self.norm_decode(x_11BH, layer.mlp_norm, self.eps, feeds="wgate", in_place=sharded)
            x_11BH = self.add_scaled(x_11BH, self.mlp(mlp_in, layer, True), layer.folds.down_scale, residual)
        return self.lm_head(self.norm_decode(x_11BH, self.w.final_norm, self.eps, feeds="lm_head", in_place=sharded))

    def pick_greedy(self, logits_11BV):
        """Each user's most likely token: uint32 [1, 1, B]. ROW_MAJOR drops the tile padding past the last id."""
        tt = self.tt
        return tt.argmax(tt.to_layout(logits_11BV, tt.ROW_MAJOR_LAYOUT), dim=-1)

    def pick_sampled(self, logits_11BV, top_k_B, top_p_B, inv_temperature_B, seeds_B, user_ids_B):
        """Each user's token drawn from softmax(logits * inv_temperature) over its top_k (<= 32) candidates,
        cut to top_p: uint32 [1, 1, 1, B]. The seeds are reloaded before every draw, so a replayed trace
        draws fresh numbers when the host writes fresh seeds."""
        tt = self.tt
        chunks = [self._top_candidates(logits_11BV, start, end) for start, end in self.plan.topk_chunks()]
        if len(chunks) == 1:
            values_11BK, indices_11BK = chunks[0]
        else:  # every chunk's candidates, merged: sampling ranks them again for each user's top_k
            values_11BK = tt.concat([values for values, _ in chunks], dim=-1)
            indices_11BK = tt.concat([indices for _, indices in chunks], dim=-1)
        tt.manual_seed(seeds_B, user_ids=user_ids_B, sub_core_grids=self.sampling_cores)
        return tt.sampling(values_11BK, tt.untilize(indices_11BK), k=top_k_B, p=top_p_B, temp=inv_temperature_B,
                           sub_core_grids=self.sampling_cores)

    def _top_candidates(self, logits_11BV, start: int, end: int):
        """The SAMPLING_TOP_K largest logits of columns start..end of each row, with their vocabulary ids (uint32)."""
        tt = self.tt
        rows = list(logits_11BV.shape)
        if (start, end) != (0, rows[-1]):
            logits_11BV = tt.slice(logits_11BV, [0, 0, 0, start], [*rows[:-1], end])
        values_11BK, indices_11BK = tt.topk(logits_11BV, k=SAMPLING_TOP_K, dim=-1)
        if indices_11BK.dtype != tt.uint32:  # topk gives 16-bit ids below 65536 columns; sampling reads 32-bit
            indices_11BK = tt.typecast(indices_11BK, tt.uint32)
        return values_11BK, tt.add(indices_11BK, start) if start else indices_11BK

    def _rope_rows(self, table, position_rows_1B):
        # [1, B] positions -> [1, B, 1, head_dim], one user per core as rotary_embedding_hf wants
        tt = self.tt
        rows_1BD = tt.embedding(position_rows_1B, table, layout=tt.TILE_LAYOUT)
        return tt.to_memory_config(tt.unsqueeze(rows_1BD, 2), self.heads_memcfg)

    def attention_decode(self, x_11BH, layer: LayerOnDevice, index: int, cos_1B1D, sin_1B1D, positions_B):
        tt = self.tt
        keys, values = self.kv_cache[index]
        # interleaved L1 rows: the head split's reader walks whole rows
        qkv_11BQ = self.bitlinear(x_11BH, layer, "wqkv", True)
        q_1BHD, k_1BKD, v_1BKD = tt.experimental.nlp_create_qkv_heads_decode(
            qkv_11BQ, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, memory_config=self.heads_memcfg)
        q_1BHD = tt.experimental.rotary_embedding_hf(q_1BHD, cos_1B1D, sin_1B1D, is_decode_mode=True)
        k_1BKD = tt.experimental.rotary_embedding_hf(k_1BKD, cos_1B1D, sin_1B1D, is_decode_mode=True)
        tt.experimental.paged_update_cache(keys, k_1BKD, update_idxs_tensor=positions_B)
        tt.experimental.paged_update_cache(values, v_1BKD, update_idxs_tensor=positions_B)
        attn_1BHD = tt.transformer.scaled_dot_product_attention_decode(
            q_1BHD, keys, values, cur_pos_tensor=positions_B, scale=layer.folds.attention_scale,
            program_config=self.sdpa_decode_config, memory_config=tt.DRAM_MEMORY_CONFIG, compute_kernel_config=self.hifi)
        # SDPA decode cannot write sharded output with GQA: the heads are resharded one user per core
        attn_11BQ = tt.experimental.nlp_concat_heads_decode(
            tt.to_memory_config(attn_1BHD, self.heads_memcfg), num_heads=self.num_heads)
        users = self.plan.decode_rows
        if list(attn_11BQ.shape)[2] != users:  # nlp_concat_heads_decode always yields 32 user rows
            attn_11BQ = tt.to_memory_config(attn_11BQ, tt.L1_MEMORY_CONFIG)
            attn_11BQ = tt.slice(attn_11BQ, [0, 0, 0, 0], [1, 1, users, self.plan.model.q_size])
        # else the sub-norm reshards the concatenated heads straight onto its grid
        attn_11BQ = self.norm_decode(attn_11BQ, layer.attn_sub_norm, layer.folds.attn_sub_norm_eps, feeds="wo")
        return self.bitlinear(attn_11BQ, layer, "wo", True)

    # -- prefill ------------------------------------------------------------------------------------

    def forward_prefill(self, tokens_1S, positions_1S, window: PrefillWindow, last_row: int):
        """One user's tokens at positions [window.first, window.first + S), padded to tiles: tokens_1S and
        positions_1S uint32 [1, S] ROW_MAJOR. Writes their K/V into the window's cache row from window.first
        on, attends to everything the row holds before them; returns logits [1, 1, 32, vocab] of the tile
        holding `last_row`."""
        tt = self.tt
        x_11SH = tt.unsqueeze(tt.embedding(tokens_1S, self.w.embedding, layout=tt.TILE_LAYOUT), 0)
        # RoPE rows looked up by position, as decode does: a slice at each window start would compile a program each
        cos_11SD = tt.unsqueeze(tt.embedding(positions_1S, self.w.rope_cos_rows, layout=tt.TILE_LAYOUT), 0)
        sin_11SD = tt.unsqueeze(tt.embedding(positions_1S, self.w.rope_sin_rows, layout=tt.TILE_LAYOUT), 0)
        for index, layer in enumerate(self.w.layers):
            attn = self.attention_prefill(self.norm(x_11SH, layer.attn_norm, self.eps), layer, index, cos_11SD, sin_11SD, window)
            x_11SH = self.add_scaled(x_11SH, attn, layer.folds.o_scale)
            x_11SH = self.add_scaled(x_11SH, self.mlp(self.norm(x_11SH, layer.mlp_norm, self.eps), layer, False),
                                     layer.folds.down_scale)
        tile_start = last_row // TILE * TILE
        last_11TH = tt.slice(x_11SH, [0, 0, tile_start, 0], [1, 1, tile_start + TILE, self.plan.model.hidden_size])
        return self.lm_head(self.norm(last_11TH, self.w.final_norm, self.eps))

    def attention_prefill(self, x_11SH, layer: LayerOnDevice, index: int, cos_11SD, sin_11SD, window: PrefillWindow):
        tt = self.tt
        keys, values = self.kv_cache[index]
        qkv_11SQ = self.bitlinear(x_11SH, layer, "wqkv", False)
        q_1HSD, k_1KSD, v_1KSD = tt.experimental.nlp_create_qkv_heads(
            qkv_11SQ, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, transpose_k_heads=False,
            memory_config=tt.DRAM_MEMORY_CONFIG)
        q_1HSD = tt.experimental.rotary_embedding_hf(q_1HSD, cos_11SD, sin_11SD, is_decode_mode=False)
        k_1KSD = tt.experimental.rotary_embedding_hf(k_1KSD, cos_11SD, sin_11SD, is_decode_mode=False)
        tt.fill_cache(keys, k_1KSD, window.slot, update_idx=window.first)
        tt.fill_cache(values, v_1KSD, window.slot, update_idx=window.first)
        # The cache read as a paged one, a page per slot: the window's queries attend causally to the slot's
        # positions up to their own, cached before this window or written just above. The start comes from a
        # device tensor, so one program serves every start (an int start compiles a program per start).
        attn_1HSD = tt.transformer.chunked_scaled_dot_product_attention(
            q_1HSD, keys, values, window.page_table_1P, chunk_start_idx_tensor=window.first_1,
            scale=layer.folds.attention_scale, program_config=self.chunked_sdpa_config, compute_kernel_config=self.hifi)
        attn_11SQ = tt.experimental.nlp_concat_heads(attn_1HSD, memory_config=tt.DRAM_MEMORY_CONFIG)
        attn_11SQ = self.norm(attn_11SQ, layer.attn_sub_norm, layer.folds.attn_sub_norm_eps)
        return self.bitlinear(attn_11SQ, layer, "wo", False)
