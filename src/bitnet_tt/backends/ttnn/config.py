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
# Output tiles per core of a DRAM-sharded matmul: its circular buffers take about 64 KB per output tile
# on each core (mock allocator: 101 tiles asked for 6.5 MB), and a core has 1.5 MB of L1.
MAX_DECODE_TILES_PER_CORE = 16
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
    # Decode matmuls read weights WIDTH_SHARDED over the DRAM banks (tt_transformers' decode layout).
    # Prefill cannot read that layout in ttnn 0.81.1 (the DRAM-sharded matmul takes one tile of rows),
    # so the ternary weights are held twice.
    dram_sharded_decode: bool = True
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
class DramShardedMatmul:
    """A decode matmul x[32, k] @ w[k, n] with w width-sharded over the DRAM banks (n padded to fit them)
    and x split over a grid of cores."""

    k: int
    n: int
    n_padded: int
    grid_x: int
    grid_y: int
    in0_block_w: int
    per_core_n: int  # output tiles per core

    @property
    def cores(self) -> int:
        return self.grid_x * self.grid_y

    @property
    def output_shards(self) -> int:
        """The op writes per_core_n tiles per output shard, on as many cores as that takes (not its input's)."""
        return -(-tiles(self.n_padded) // self.per_core_n)


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

    def output_cores(self, spec: DramShardedMatmul) -> tuple[int, int] | None:
        """(x, y) of the rectangle a DRAM-sharded matmul writes its output shards on, or None when they are
        not a rectangle: the op puts them on the first cores of the whole grid, row by row (the mock
        device reports {[0-0 - 12-2],[0-3 - 0-3]} for 40 shards on a 13-wide grid)."""
        width, shards = self.device.grid_x, spec.output_shards
        if shards <= width:
            return shards, 1
        return (width, shards // width) if shards % width == 0 else None

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

    def sharded_norm_layout(self, width: int) -> tuple[int, int, int]:
        """(x, y, tiles per core) for a width-sharded decode RMSNorm: at most 32 cores, at most 8 wide,
        so the same layout fits every board; an interleaved norm of a 6912-wide row needs most of a core's L1."""
        x, y = self.core_rectangle(tiles(width), 32, 8)
        return x, y, tiles(width) // (x * y)

    @property
    def norms_feed_matmuls(self) -> bool:
        """Decode norms run on the next matmul's input grid and hand it their sharded output, saving a
        reshard each way; not when activations are quantised in between (a per-row absmax needs whole rows)."""
        return self.options.dram_sharded_decode and not self.options.activation_quant

    def evenly_sharded_output(self, name: str) -> bool:
        """Whether decode matmul `name` leaves exactly its output width in equal whole-tile shards: then its
        output can be used where it lies instead of being gathered back into rows."""
        spec = self.decode_matmuls()[name]
        return self.norms_feed_matmuls and spec.n_padded == spec.n and spec.per_core_n * spec.output_shards == tiles(spec.n)

    @property
    def residual_sharded(self) -> bool:
        """The decode residual stream stays width-sharded on the grid of the matmuls that read the hidden
        state (QKV, gate/up), when o_proj writes its output shards on exactly that rectangle: the two
        norms that read the stream and the add after attention then need no reshard (Wormhole's 8-wide
        grid; on a wider Blackhole grid o_proj's 40 shards are not a rectangle)."""
        reads, writes = self.decode_matmuls()["wqkv"], self.decode_matmuls()["wo"]
        return self.evenly_sharded_output("wo") and self.output_cores(writes) == (reads.grid_x, reads.grid_y)

    def keeps_output_sharded(self, name: str) -> bool:
        """Decode matmuls whose even output shards are used where they lie: o_proj's by the residual add
        (residual_sharded), the fused QKV's by nlp_create_qkv_heads_decode when they form a rectangle (its
        reader walks the bounding box of the input cores row by row, tiles(qkv) / box cores from each;
        otherwise it gets interleaved rows, as in tt_transformers)."""
        if name == "wo":
            return self.residual_sharded
        return name == "wqkv" and self.evenly_sharded_output(name) and self.output_cores(self.decode_matmuls()[name]) is not None

    def decode_norm_layout(self, width: int, feeds: str | None = None) -> tuple[int, int, int]:
        """(x, y, tiles per core) of a decode norm; `feeds` names the decode matmul that reads its output."""
        if feeds and self.norms_feed_matmuls:
            spec = self.decode_matmuls()[feeds]
            return spec.grid_x, spec.grid_y, tiles(width) // spec.cores
        return self.sharded_norm_layout(width)

    def dram_sharded_matmul(self, k: int, n: int) -> DramShardedMatmul:
        """tt_transformers' decode layout: n padded to 32 x DRAM banks, x split over up to 64 cores."""
        n_padded = round_up(n, TILE * self.device.dram_banks)
        x, y = self.core_rectangle(tiles(k), 64, self.device.grid_x)
        cores = x * y
        return DramShardedMatmul(k, n, n_padded, x, y, largest_divisor(tiles(k) // cores, 8),
                                 -(-tiles(n_padded) // cores))

    @property
    def sampling_top_k(self) -> int:
        """The largest top_k drawn on the device; 0 when the vocabulary does not fill whole tiles, since
        topk would then also rank the tile padding past the last token id."""
        return SAMPLING_TOP_K if self.model.vocab_size % TILE == 0 else 0

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

    def decode_matmuls(self) -> dict[str, DramShardedMatmul]:
        """The four fused projections of a layer, by their LayerOnDevice names."""
        m = self.model
        return {"wqkv": self.dram_sharded_matmul(m.hidden_size, self.qkv_width),
                "wo": self.dram_sharded_matmul(m.q_size, m.hidden_size),
                "wgate_up": self.dram_sharded_matmul(m.hidden_size, 2 * m.intermediate_size),
                "wdown": self.dram_sharded_matmul(m.intermediate_size, m.hidden_size)}

    def lm_head_chunks(self) -> list[DramShardedMatmul]:
        """The LM head as column chunks, each a DRAM-sharded matmul whose circular buffers fit in L1; empty
        when the head stays interleaved. Prefill uses them too: it runs the head on the one tile of rows
        that holds the last token, a decode-shaped input."""
        if not self.options.dram_sharded_decode:
            return []
        m = self.model
        bank_step = TILE * self.device.dram_banks
        cores = self.dram_sharded_matmul(m.hidden_size, bank_step).cores  # the grid depends on k alone
        width = max(bank_step, MAX_DECODE_TILES_PER_CORE * cores * TILE // bank_step * bank_step)
        return [self.dram_sharded_matmul(m.hidden_size, min(width, m.vocab_size - start))
                for start in range(0, m.vocab_size, width)]

    def lm_head_columns(self) -> int:
        """Columns of the LM head on the device, bank padding included."""
        return sum(c.n_padded for c in self.lm_head_chunks()) or self.model.vocab_size

    def layer_weight_elements(self, decode_layout: bool) -> int:
        """Ternary weight elements of one layer: as prefill's interleaved matmuls hold them, or in the
        decode copy's DRAM-sharded layout (output widths padded to the banks)."""
        if decode_layout:
            return sum(s.k * s.n_padded for s in self.decode_matmuls().values())
        return sum(out * inp for out, inp in self.model.projection_shapes().values())

    def weight_bytes(self) -> int:
        m, o = self.model, self.options
        linear = self.layer_weight_elements(False) * m.num_layers
        if o.dram_sharded_decode:  # a second, padded copy in the decode layout
            linear += self.layer_weight_elements(True) * m.num_layers
        norms = (2 * m.hidden_size + m.q_size + m.intermediate_size) * m.num_layers * 2
        # The embedding is a bf16 ROW_MAJOR table (ttnn.embedding reads rows; block floats need tiles),
        # and the LM head its own TILE copy [hidden, vocab (padded)] in the head dtype, tied or not.
        embed = m.vocab_size * m.hidden_size
        head = m.hidden_size * self.lm_head_columns()
        return int(linear * BYTES_PER_ELEMENT[o.weight_dtype] + norms
                   + embed * BYTES_PER_ELEMENT["bfloat16"] + head * BYTES_PER_ELEMENT[o.lm_head_dtype])

    def decode_read_bytes(self) -> dict[str, int]:
        """DRAM bytes one decode step reads: the layers' weights (in the decode layout), the LM head, and
        the KV cache per token each user holds; against the device's bandwidth they bound tokens/s."""
        m, o = self.model, self.options
        return {"layers": int(self.layer_weight_elements(o.dram_sharded_decode) * m.num_layers * BYTES_PER_ELEMENT[o.weight_dtype]),
                "lm_head": int(self.lm_head_columns() * m.hidden_size * BYTES_PER_ELEMENT[o.lm_head_dtype]),
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
