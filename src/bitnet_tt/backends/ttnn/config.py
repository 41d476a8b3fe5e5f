"""Every device-side choice in one place, derived from the model's dimensions and the device itself.

Nothing here hard-codes a board: grids, DRAM banks and sizes are read from the open device, so the
same code serves Blackhole p150a, Wormhole n150 and any smaller BitNet config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ModelConfig
from ...errors import CapacityError, ConfigError

TILE = 32
# Bytes per element on the device, including block-float exponents (1088 B / 576 B per 32x32 tile).
BYTES_PER_ELEMENT = {"bfloat16": 2.0, "bfloat8_b": 1088 / 1024, "bfloat4_b": 576 / 1024}
WEIGHT_DTYPES = ("bfloat4_b", "bfloat8_b", "bfloat16")  # ternary codes are exact in all three
HEAD_DTYPES = ("bfloat16", "bfloat8_b", "bfloat4_b")  # the LM head; the embedding table is always bf16
MAX_USERS = 32  # decode rows are one tile high
HEAD_GRID_WIDTH = 8  # cores per row of the one-user-per-core head grid (tt_transformers' CoreGrid(y=4, x=8))
SDPA_MAX_CORES_PER_HEAD = 16  # SDPAProgramConfig's max_cores_per_head_batch default
# DRAM kept for the captured decode traces (the forward pass, about 30 ops per layer, and the pickers).
# tt_transformers' Llama-8B needs 25-38 MB; the prior art's BitNet 2B-4T decode, about 1000 ops on a p150a,
# needed 200 MB; 64 MB was a guess. A capture that outgrows it stops with a CapacityError (trace.py).
TRACE_REGION_BYTES = 256 * 2**20
SAMPLING_TOP_K = 32  # candidates per user that ttnn.topk hands to ttnn.sampling
# The widest vocabulary chunk topk ranks at once: 16-bit ids, as tt_transformers splits the vocabulary.
TOPK_CHUNK_COLUMNS = 65536
# Decode matmuls are 1D multicast matmuls whose program grid is this wide (at most): the op puts x's
# width shards and its output shards on the first cores of its grid, row by row, which form rectangles
# (as the norms that feed and read them need) on a grid 8 wide, not on a 13- or 11-wide Blackhole grid.
MATMUL_GRID_WIDTH = 8
# The most cores a decode activation is width-sharded over: each shard is one block the matmul multicasts
# in turn, so fewer, wider shards mean fewer multicasts per matmul.
MAX_ACTIVATION_CORES = 32
# L1 for one matmul's weight blocks on each core (double-buffered in0_block_w x per_core_N tiles).
MATMUL_WEIGHT_CB_BYTES = 512 * 1024
TILE_BYTES = {"bfloat16": 2048, "bfloat8_b": 1088, "bfloat4_b": 576}
NORM_CB_BYTES_PER_ELEMENT = {"fp32": 287, "bf16": 221}
# Chunked SDPA with its start read from a device tensor needs a page table row of a multiple of 32 bytes
# (sdpa_program_factory.cpp: page_table_stick_size % 32 == 0): 8 int32 entries. The KV cache is one page
# per slot (block size = the whole context), so every entry names the slot and only the first is read.
PAGE_TABLE_ENTRIES = 8


@dataclass(frozen=True)
class TTOptions:
    """What a user can choose; everything else is derived."""

    weight_dtype: str = "bfloat4_b"  # the smallest format that holds {-1, 0, +1} exactly
    lm_head_dtype: str = "bfloat8_b"
    # HF's per-token int8 absmax before every BitLinear. Off by default: with bf16 activations on the
    # device it agrees less with the reference than skipping it, and costs 10 ops per projection
    # (benchmarks/ttnn_dtypes.py prints the figures).
    activation_quant: bool = False
    # Capture the decode step once and replay it. One trace serves every batch size: up to 32 users fill
    # the same one-tile-high rows, and rows without a request cost only their (empty) attention.
    use_trace: bool = True
    # ttnn's and tt-metal's warnings on stderr (silenced otherwise), among them "Mismatch between computed
    # MemoryConfig": an op placing its output elsewhere than asked. Not part of the weight cache key.
    debug_log: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"weight dtype {self.weight_dtype!r} not supported (choose from {', '.join(WEIGHT_DTYPES)})")
        if self.lm_head_dtype not in HEAD_DTYPES:
            raise ConfigError(f"LM head dtype {self.lm_head_dtype!r} not supported (choose from {', '.join(HEAD_DTYPES)})")


@dataclass(frozen=True)
class DeviceFacts:
    """What the open device reports; read once by device.py."""

    arch: str
    grid_x: int
    grid_y: int
    dram_banks: int
    dram_bank_bytes: int
    l1_bank_bytes: int

    @property
    def dram_bytes(self) -> int:
        return self.dram_banks * self.dram_bank_bytes


def tiles(n: int) -> int:
    return -(-n // TILE)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


@dataclass(frozen=True)
class DecodeMatmul:
    """A decode matmul x[32, k] @ w[k, n], 1D multicast over `grid`: w interleaved in DRAM (the one copy
    prefill reads too); x width-sharded on the rectangle `in0` (its shard k on the k-th core of the grid,
    row by row, where the op's reader looks for it) or interleaved; per_core_n output tiles on each of the
    first `output_cores` cores of the grid, row by row."""

    k: int
    n: int
    in0: tuple[int, int]  # (x, y): the cores x's width shards lie on, from core (0, 0)
    grid: tuple[int, int]  # the program grid (compute_with_storage_grid_size)
    per_core_n: int  # output tiles per core
    in0_block_w: int  # K tiles per multicast block: divides a shard's width

    @property
    def in0_cores(self) -> int:
        return self.in0[0] * self.in0[1]

    @property
    def output_cores(self) -> int:
        return -(-tiles(self.n) // self.per_core_n)

    @property
    def output_rectangle(self) -> tuple[int, int] | None:
        """(x, y) of the output cores when they form a rectangle from (0, 0) and hold exactly n, else None."""
        cores, width = self.output_cores, self.grid[0]
        if cores * self.per_core_n != tiles(self.n):
            return None
        if cores <= width:
            return cores, 1
        return (width, cores // width) if cores % width == 0 else None


@dataclass(frozen=True)
class TTPlan:
    """Derived shapes and budgets for one model on one device."""

    model: ModelConfig
    device: DeviceFacts
    options: TTOptions
    max_users: int
    max_context: int

    @property
    def qkv_width(self) -> int:
        return self.model.q_size + 2 * self.model.kv_size

    @property
    def cache_context(self) -> int:
        """The KV cache's sequence length: the context plus one spare position, in whole tiles."""
        return round_up(self.max_context + 1, TILE)

    @property
    def decode_rows(self) -> int:
        """User rows of a decode step on the device: the users, rounded up to whole rows of the head grid
        past one row, so that one user per core always fills a rectangle (17 users take 24 rows)."""
        users = self.max_users
        return users if users <= HEAD_GRID_WIDTH else round_up(users, HEAD_GRID_WIDTH)

    def head_grid(self) -> tuple[int, int]:
        """(x, y) of the rectangle holding one user per core for the height-sharded heads, cos/sin rows and
        SDPA's Q: at most 8 wide, as tt_transformers lays them out on every board. rotary_embedding_hf reads
        cos/sin from the L1 of q's cores and SDPA decode reads user b's Q from its output core b (row-major
        over its own grid), so all three must share this one layout."""
        rows = self.decode_rows
        x = min(rows, HEAD_GRID_WIDTH)
        return x, rows // x

    def sdpa_decode_grid(self) -> tuple[int, int]:
        """(x, y) of SDPA decode's program grid: 8 wide, so that its output core b (b % 8, b // 8) is the core
        that holds user b's Q; as tall as helps, among the heights whose cores the program factory can
        divide: it gives each user cores // users cores and splits them over the KV heads, and only a
        split into whole heads (or whole groups of heads) covers every (user, KV head) exactly."""
        rows, kv = self.decode_rows, self.model.num_kv_heads
        x = HEAD_GRID_WIDTH
        best = None
        for y in range(-(-rows // x), min(8, self.device.grid_y) + 1):
            busy = sdpa_decode_busy_cores(rows, kv, x * y)
            if busy and (best is None or busy > best[0]):
                best = busy, (x, y)
        if best is None:
            raise ConfigError(f"no SDPA decode grid divides {rows} users x {kv} KV heads on this device")
        return best[1]

    def interleaved_norm(self, width: int) -> str:
        """How a prefill RMSNorm of this row width runs: rms_norm keeps whole rows in circular buffers,
        about 287 B per element with fp32 accumulation and 221 B with bf16 (measured on the mock
        allocator at width 6912: 1,979,520 B and 1,527,136 B). Rows too wide for one core's L1 use
        the composite form (square, mean, rsqrt, multiply), which streams tiles."""
        if width * NORM_CB_BYTES_PER_ELEMENT["fp32"] <= self.device.l1_bank_bytes:
            return "fp32"
        if width * NORM_CB_BYTES_PER_ELEMENT["bf16"] <= self.device.l1_bank_bytes:
            return "bf16"
        return "composite"

    def core_rectangle(self, row_tiles: int, max_cores: int, max_x: int) -> tuple[int, int]:
        """(x, y): the most cores, at most max_cores and max_x wide, whose count divides row_tiles."""
        for cores in range(min(max_cores, row_tiles), 0, -1):
            if row_tiles % cores:
                continue
            x = largest_divisor(cores, min(max_x, self.device.grid_x))
            if cores // x <= self.device.grid_y:
                return x, cores // x
        raise ConfigError(f"no core grid divides {row_tiles} tiles")

    @property
    def norms_feed_matmuls(self) -> bool:
        """Decode activations stay width-sharded between the ops (the residual stream, each norm's output
        on the grid its matmul reads, matmul outputs on the grid the next op reads); not when activations
        are quantised before each matmul (a per-row absmax needs whole rows), which keeps them in L1 rows."""
        return not self.options.activation_quant

    def keeps_output_sharded(self, name: str) -> bool:
        """Decode matmuls whose output shards are used where they lie: o_proj's and down_proj's by the
        residual add (on the residual's cores), gate's and up's by their multiply and ffn_sub_norm. QKV
        and the LM head write interleaved rows (the head split and the pickers read rows)."""
        return self.norms_feed_matmuls and name in ("wo", "wgate", "wup", "wdown")

    def activation_grid(self, width: int) -> tuple[int, int]:
        """(x, y) of the rectangle a decode activation of this width is width-sharded on: the most cores, at
        most MAX_ACTIVATION_CORES, that split its tiles evenly and are the first cores of the matmul grid
        row by row (at most one row of it, or whole rows)."""
        grid_x, grid_y = self.matmul_grid()
        for cores in range(min(MAX_ACTIVATION_CORES, tiles(width)), 0, -1):
            if tiles(width) % cores == 0 and (cores <= grid_x or (cores % grid_x == 0 and cores // grid_x <= grid_y)):
                return (cores, 1) if cores <= grid_x else (grid_x, cores // grid_x)
        raise ConfigError(f"no core grid splits a row of {width}")

    def matmul_grid(self) -> tuple[int, int]:
        return min(MATMUL_GRID_WIDTH, self.device.grid_x), self.device.grid_y

    def decode_norm_layout(self, width: int, feeds: str | None = None) -> tuple[int, int, int]:
        """(x, y, tiles per core) of a decode norm; `feeds` names the decode matmul that reads its output."""
        if feeds and self.norms_feed_matmuls:
            x, y = self.activation_grid(width)
        else:
            x, y = self.core_rectangle(tiles(width), 32, 8)
        return x, y, tiles(width) // (x * y)

    def decode_matmul(self, k: int, n: int, weight_dtype: str, output_on: int | None = None) -> DecodeMatmul:
        """x[32, k] @ w[k, n]: x on its activation grid; the output on the activation grid of width
        `output_on` (its shards then hold exactly that many tiles each), or spread over the whole program
        grid as interleaved rows."""
        grid = self.matmul_grid()
        in0 = self.activation_grid(k)
        if output_on is not None:
            out_x, out_y = self.activation_grid(output_on)
            per_core_n = tiles(n) // (out_x * out_y)
        else:
            per_core_n = -(-tiles(n) // (grid[0] * grid[1]))
        shard_tiles = tiles(k) // (in0[0] * in0[1])
        block_w = max(d for d in range(1, shard_tiles + 1) if shard_tiles % d == 0
                      and 2 * d * per_core_n * TILE_BYTES[weight_dtype] <= MATMUL_WEIGHT_CB_BYTES or d == 1)
        return DecodeMatmul(k, n, in0, grid, per_core_n, block_w)

    def decode_matmuls(self) -> dict[str, DecodeMatmul]:
        """The five projections of a layer, by their LayerOnDevice names."""
        m, dtype = self.model, self.options.weight_dtype
        h, i = m.hidden_size, m.intermediate_size
        return {"wqkv": self.decode_matmul(h, self.qkv_width, dtype),
                "wo": self.decode_matmul(m.q_size, h, dtype, output_on=h),
                "wgate": self.decode_matmul(h, i, dtype, output_on=i),
                "wup": self.decode_matmul(h, i, dtype, output_on=i),
                "wdown": self.decode_matmul(i, h, dtype, output_on=h)}

    def lm_head_matmul(self) -> DecodeMatmul:
        """The LM head: one 1D matmul over the whole program grid (decode users, or prefill's last tile)."""
        return self.decode_matmul(self.model.hidden_size, self.model.vocab_size, self.options.lm_head_dtype)

    @property
    def sampling_top_k(self) -> int:
        """The largest top_k drawn on the device; 0 when the vocabulary does not fill whole tiles, since
        topk would then also rank the tile padding past the last token id."""
        return SAMPLING_TOP_K if self.model.vocab_size % TILE == 0 else 0

    def topk_chunks(self) -> list[tuple[int, int]]:
        """(start, end) columns of the vocabulary chunks topk ranks apart (tt_transformers' pattern: at
        most 65,536 columns each, so ids fit 16 bits), a power-of-two count of them, so that the merged
        candidates (SAMPLING_TOP_K per chunk) fill a power-of-two number of tiles as ttnn.sampling needs."""
        vocab = self.model.vocab_size
        count = 1 << (-(-vocab // TOPK_CHUNK_COLUMNS) - 1).bit_length()
        width = round_up(-(-vocab // count), TILE)
        return [(start, min(start + width, vocab)) for start in range(0, vocab, width)]

    def prefill_length(self, tokens: int) -> int:
        """Prefill windows are padded to a power-of-two number of tiles (at most the cache): few lengths, so
        few programs to compile, and each compile with a live trace costs a recapture (trace.py). Causal
        attention keeps the padding from touching real tokens."""
        return min(TILE * 2 ** (tiles(tokens) - 1).bit_length(), self.cache_context)

    def prefill_window(self, held: int, count: int) -> tuple[int, int]:
        """(first position, padded length) of the prefill that appends `count` tokens to a slot holding `held`.
        It starts on the tile that holds position `held`: fill_cache writes whole tiles (update_idx % 32 == 0)
        and chunked SDPA starts on a multiple of its chunk sizes (one tile), so the held tokens of that tile
        are computed again. Where the padded window would run past the cache it starts earlier instead (more
        held tokens computed again), so that its length stays one of the few padded lengths."""
        first = held // TILE * TILE
        length = self.prefill_length(held + count - first)
        return min(first, self.cache_context - length), length

    def chunked_sdpa_grid(self) -> tuple[int, int]:
        """(x, y) of prefill attention's program grid: the whole device (it splits heads x query chunks)."""
        return self.device.grid_x, self.device.grid_y

    # -- memory ----------------------------------------------------------------------------------

    def layer_weight_elements(self) -> int:
        """Ternary weight elements of one layer (held once, interleaved, read by prefill and decode)."""
        return sum(out * inp for out, inp in self.model.projection_shapes().values())

    def weight_bytes(self) -> int:
        m, o = self.model, self.options
        linear = self.layer_weight_elements() * m.num_layers
        norms = (2 * m.hidden_size + m.q_size + m.intermediate_size) * m.num_layers * 2
        # The embedding is a bf16 ROW_MAJOR table (ttnn.embedding reads rows; block floats need tiles),
        # and the LM head its own TILE copy [hidden, vocab (padded)] in the head dtype, tied or not.
        embed = m.vocab_size * m.hidden_size
        head = m.hidden_size * round_up(m.vocab_size, TILE)
        return int(linear * BYTES_PER_ELEMENT[o.weight_dtype] + norms
                   + embed * BYTES_PER_ELEMENT["bfloat16"] + head * BYTES_PER_ELEMENT[o.lm_head_dtype])

    def decode_read_bytes(self) -> dict[str, int]:
        """DRAM bytes one decode step reads: the layers' weights (in the decode layout), the LM head, and
        the KV cache per token each user holds; against the device's bandwidth they bound tokens/s."""
        m, o = self.model, self.options
        return {"layers": int(self.layer_weight_elements() * m.num_layers * BYTES_PER_ELEMENT[o.weight_dtype]),
                "lm_head": int(round_up(m.vocab_size, TILE) * m.hidden_size * BYTES_PER_ELEMENT[o.lm_head_dtype]),
                "kv_cache_per_token": self.kv_bytes_per_token}

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token of one user, bf16."""
        m = self.model
        return 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2

    def kv_cache_bytes(self) -> int:
        return self.kv_bytes_per_token * self.decode_rows * self.cache_context

    def activation_bytes(self) -> int:
        """The largest prefill intermediates (gate/up and the LM-head tile) with a factor for temporaries."""
        m = self.model
        seq = self.prefill_length(self.max_context)
        gate_up = seq * 2 * m.intermediate_size * 2
        scores = m.num_heads * seq * TILE * 2
        return 4 * (gate_up + scores + TILE * m.vocab_size * 2)

    def check_memory(self) -> None:
        need = self.weight_bytes() + self.kv_cache_bytes() + self.activation_bytes() + TRACE_REGION_BYTES
        have = self.device.dram_bytes
        if need > have:
            raise CapacityError(
                f"{self.max_users} users x {self.max_context} tokens do not fit on this {self.device.arch} device: "
                f"weights {self.weight_bytes() / 2**30:.2f} GiB + KV cache {self.kv_cache_bytes() / 2**30:.2f} GiB + "
                f"activations {self.activation_bytes() / 2**30:.2f} GiB + trace region {TRACE_REGION_BYTES / 2**30:.2f} GiB "
                f"> {have / 2**30:.2f} GiB of DRAM; "
                f"lower --max-batch or --max-context"
            )


def sdpa_decode_busy_cores(users: int, kv_heads: int, cores: int) -> int:
    """Cores SDPA decode computes on with `cores` in its grid, or 0 when its split misses a (user, KV head):
    each user gets cores // users cores (at most 16 per head), split into groups of cores per head, or into
    groups of heads per core when there are fewer cores than heads (sdpa_decode_program_factory.cpp)."""
    per_user = min(cores, SDPA_MAX_CORES_PER_HEAD * users * kv_heads) // users
    if per_user == 0:
        return 0
    if per_user >= kv_heads and (users == 1 or per_user % kv_heads == 0):
        return per_user // kv_heads * kv_heads * users  # whole groups of cores per head
    return per_user * users if kv_heads % per_user == 0 else 0  # whole groups of heads per core


def make_plan(model: ModelConfig, device: DeviceFacts, options: TTOptions, max_users: int, max_context: int) -> TTPlan:
    if not 1 <= max_users <= MAX_USERS:
        raise CapacityError(f"the ttnn backend serves 1 to {MAX_USERS} users at once, not {max_users}")
    if not 1 <= max_context <= model.max_position_embeddings:
        raise CapacityError(f"context {max_context} must be between 1 and the model's {model.max_position_embeddings}")
    for name, value in (("hidden_size", model.hidden_size), ("intermediate_size", model.intermediate_size),
                        ("head_dim", model.head_dim)):
        if value % TILE:
            raise ConfigError(f"the ttnn backend needs {name} ({value}) to be a multiple of {TILE}")
    if model.head_dim != 32 and model.head_dim % 64:
        raise ConfigError(f"rotary_embedding_hf needs head_dim 32 or a multiple of 64, not {model.head_dim}")
    plan = TTPlan(model, device, options, max_users, max_context)
    plan.check_memory()
    return plan
