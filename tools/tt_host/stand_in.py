"""A host stand-in for the `ttnn` module: runs the ttnn backend's own call sequence and computes numbers.

FOR VERIFICATION ONLY (tests and benchmarks); never used by the library. No Tenstorrent card is at
hand and a mock device computes nothing, so this module implements, in PyTorch, every ttnn call the
backend makes, with ttnn's observable semantics:

- tensors keep a logical shape, a dtype with its rounding (bf16 here; bfloat8_b/bfloat4_b through
  ttnn's real host conversion when `block_float` is given), a layout and a memory config; sharded
  configs are checked against the tensor they hold; deallocated tensors cannot be used;
- placement: a sharded tensor knows which core holds each shard. Each op writes its output on the
  cores the real op uses (ttnn 0.81.1, as the mock device reports them), and the ops whose kernels read
  shards by core position read them that way (see PLACEMENT below): a layout the kernel would misread
  gives wrong numbers (NaN where the kernel would read memory no shard owns), as it would on a card;
- the program cache: an op run with a new signature while a trace exists compiles a program whose
  buffers may land in memory the trace uses, so replaying that trace afterwards raises;
- ops compute in fp32 and round their output to the output dtype, as the device does; matmuls multiply
  at their math fidelity (`fidelity_matmul`);
- trace capture records the op sequence without effect on device state and rejects allocations;
  replay re-runs it on the current contents of the input tensors.

`exact=True` turns all rounding off (every float tensor stays fp32): the "fp32-equivalent" setting.
`kernel_placement=False` computes what each op means, wherever its shards lie: the reference that a
device's (or this stand-in's) op outputs are compared with, op by op (tools/tt_host/per_op.py).
"""

from __future__ import annotations

import itertools
import types
import weakref
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

TILE = 32
FLOAT_DTYPES = ("bfloat16", "float32", "bfloat8_b", "bfloat4_b")
BYTES = {"bfloat16": 2.0, "float32": 4.0, "bfloat8_b": 1088 / 1024, "bfloat4_b": 576 / 1024, "uint32": 4.0, "int32": 4.0,
         "uint16": 2.0}
INT_DTYPES = ("uint32", "int32", "uint16")
PHASES = {"LoFi": 1, "HiFi2": 2, "HiFi3": 3, "HiFi4": 4}  # the matrix unit's passes per math fidelity
# Arguments an op's program takes at run time, not at compile time (the mock device's program cache
# does not grow with them): op name -> (positional indices, keyword names)
RUNTIME_ARGUMENTS = {"fill_cache": ({2}, {"batch_idx", "update_idx"})}


# --- small value types ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryConfig:
    buffer: str  # "DRAM" or "L1"
    layout: str = "INTERLEAVED"  # INTERLEAVED, HEIGHT_SHARDED, WIDTH_SHARDED
    shard_shape: tuple[int, int] | None = None
    cores: int | None = None
    grid: tuple[int, int] | None = None  # (x, y) of a rectangular core grid, where one was given
    placement: tuple[tuple[int, int], ...] | None = None  # the core (x, y) of each shard, in shard order

    @property
    def sharded(self) -> bool:
        return self.layout != "INTERLEAVED"

    def placed(self, placement) -> MemoryConfig:
        return replace(self, placement=tuple(placement), cores=len(placement))


@dataclass(frozen=True)
class CoreCoord:
    x: int
    y: int


@dataclass(frozen=True)
class CoreGrid:
    y: int
    x: int

    @property
    def num_cores(self) -> int:
        return self.x * self.y


@dataclass
class Config:
    """Program and kernel configs are carried, not interpreted: the stand-in computes in fp32."""

    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CoreRange:
    start: CoreCoord
    end: CoreCoord

    @property
    def num_cores(self) -> int:
        return (self.end.x - self.start.x + 1) * (self.end.y - self.start.y + 1)

    @property
    def cores(self) -> list[tuple[int, int]]:
        return [(x, y) for y in range(self.start.y, self.end.y + 1) for x in range(self.start.x, self.end.x + 1)]


def core_range_set(ranges) -> tuple[CoreRange, ...]:
    """A CoreRangeSet: its ranges in (y, x) order of their first core, as ttnn orders them."""
    return tuple(sorted(ranges, key=lambda r: (r.start.y, r.start.x)))


def cores_of(ranges) -> tuple[tuple[int, int], ...]:
    """Shard order over a CoreRangeSet (ROW_MAJOR orientation): range by range, each row by row."""
    return tuple(core for r in core_range_set(ranges) for core in r.cores)


def rectangle(x: int, y: int) -> tuple[tuple[int, int], ...]:
    return tuple((i % x, i // x) for i in range(x * y))


def row_major(count: int, grid: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """ttnn.num_cores_to_corerangeset(count, grid, row_wise=True): the first `count` cores, row by row."""
    if count > grid[0] * grid[1]:
        raise RuntimeError(f"{count} cores do not fit a {grid[0]}x{grid[1]} grid")
    return tuple((i % grid[0], i // grid[0]) for i in range(count))


def is_rectangle(placement) -> bool:
    """Cores forming a full rectangle, in row-major order (the only layout a bounding-box walk reads right)."""
    xs, ys = [c[0] for c in placement], [c[1] for c in placement]
    x0, y0 = min(xs), min(ys)
    width, height = max(xs) - x0 + 1, max(ys) - y0 + 1
    return tuple(placement) == tuple((x0 + i % width, y0 + i // width) for i in range(width * height))


@dataclass(frozen=True)
class ShardSpec:
    grid: tuple
    shape: tuple
    orientation: str = "ROW_MAJOR"

    @property
    def num_cores(self) -> int:
        return sum(r.num_cores for r in self.grid)


def _config_class(name: str):
    return type(name, (Config,), {"__init__": lambda self, **kwargs: Config.__init__(self, kwargs)})


class Shape(tuple):
    def __new__(cls, dims):
        return super().__new__(cls, (int(d) for d in dims))


def _padded(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) < 2:
        return tuple(shape)
    return (*shape[:-2], -(-shape[-2] // TILE) * TILE, -(-shape[-1] // TILE) * TILE)


# --- tensors ---------------------------------------------------------------------------------------


class HostTensor:
    def __init__(self, host: HostTT, data: torch.Tensor, dtype: str, layout: str, memory_config: MemoryConfig | None, on_device: bool):
        self._host, self._data = host, data
        self.dtype, self.layout, self._memory_config, self.on_device = dtype, layout, memory_config, on_device
        self.deallocated = False

    @property
    def data(self) -> torch.Tensor:
        if self.deallocated:
            raise RuntimeError("tensor was deallocated")
        return self._data

    @property
    def shape(self) -> Shape:
        return Shape(self._data.shape)

    @property
    def padded_shape(self) -> Shape:
        return Shape(_padded(tuple(self._data.shape)) if self.layout == "TILE" else self._data.shape)

    def memory_config(self) -> MemoryConfig | None:
        return self._memory_config


# --- the module ----------------------------------------------------------------------------------------


class HostTT:
    """Drop-in for the parts of `ttnn` the backend uses. One instance per test: it holds the trace state."""

    def __init__(self, exact: bool = False, block_float=None, grid=(13, 10), dram_banks=(8, 4_277_141_376), l1_bank=1_461_120,
                 kernel_placement: bool = True):
        self.exact, self.block_float, self.kernel_placement = exact, block_float, kernel_placement
        self.grid, self.dram_banks, self.l1_bank = grid, dram_banks, l1_bank
        self._traces: dict[int, list] = {}
        self._stale_traces: set[int] = set()
        self._programs: set[tuple] = set()  # signatures of the ops run so far (ttnn's program cache)
        self._capturing: list | None = None
        self._ids = itertools.count()
        self._live: weakref.WeakSet[HostTensor] = weakref.WeakSet()  # device tensors, for the memory view
        self.ops_run = 0
        self.warnings: list[str] = []  # what ttnn would log as a warning ("Mismatch between computed MemoryConfig")
        self._prng: dict[int, torch.Generator] = {}  # per sampling core (user), as ttnn.manual_seed sets them

        for name in FLOAT_DTYPES + INT_DTYPES:
            setattr(self, name, name)
        self.TILE_LAYOUT, self.ROW_MAJOR_LAYOUT = "TILE", "ROW_MAJOR"
        self.DRAM_MEMORY_CONFIG = MemoryConfig("DRAM")
        self.L1_MEMORY_CONFIG = MemoryConfig("L1")
        self.L1_HEIGHT_SHARDED_MEMORY_CONFIG = MemoryConfig("L1", "HEIGHT_SHARDED")
        self.BufferType = types.SimpleNamespace(DRAM="DRAM", L1="L1")
        self.ShardStrategy = types.SimpleNamespace(HEIGHT="HEIGHT_SHARDED", WIDTH="WIDTH_SHARDED")
        self.MathFidelity = types.SimpleNamespace(LoFi="LoFi", HiFi2="HiFi2", HiFi3="HiFi3", HiFi4="HiFi4")
        self.UnaryOpType = types.SimpleNamespace(RELU="RELU", SQUARE="SQUARE", MUL_UNARY_SFPU="MUL_UNARY_SFPU")
        self.UnaryWithParam = lambda op, param: (op, float(param))
        self.CoreCoord, self.CoreGrid, self.Shape = CoreCoord, CoreGrid, Shape
        self.TensorMemoryLayout = types.SimpleNamespace(
            INTERLEAVED="INTERLEAVED", HEIGHT_SHARDED="HEIGHT_SHARDED", WIDTH_SHARDED="WIDTH_SHARDED")
        self.ShardOrientation = types.SimpleNamespace(ROW_MAJOR="ROW_MAJOR")
        self.CoreRange, self.CoreRangeSet = CoreRange, core_range_set
        self.ShardSpec = lambda grid, shape, orientation="ROW_MAJOR": ShardSpec(core_range_set(grid), tuple(shape), orientation)
        self.MemoryConfig = self._memory_config
        for name in ("WormholeComputeKernelConfig", "SDPAProgramConfig", "LayerNormShardedMultiCoreProgramConfig",
                     "MatmulMultiCoreReuseMultiCast1DProgramConfig"):
            setattr(self, name, _config_class(name))
        self.experimental = types.SimpleNamespace(
            nlp_create_qkv_heads_decode=self._op(self._nlp_create_qkv_heads_decode),
            nlp_concat_heads_decode=self._op(self._nlp_concat_heads_decode),
            nlp_create_qkv_heads=self._op(self._nlp_create_qkv_heads),
            nlp_concat_heads=self._op(self._nlp_concat_heads),
            rotary_embedding_hf=self._op(self._rotary_embedding_hf),
            paged_update_cache=self._op(self._paged_update_cache, in_place=True),
        )
        self.transformer = types.SimpleNamespace(
            scaled_dot_product_attention=self._op(self._sdpa),
            scaled_dot_product_attention_decode=self._op(self._sdpa_decode),
            chunked_scaled_dot_product_attention=self._op(self._chunked_sdpa),
        )
        for name in ("embedding", "unsqueeze", "rms_norm", "linear", "abs", "max", "maximum", "reciprocal", "multiply",
                     "round", "divide", "add", "mul", "slice", "to_memory_config", "square", "mean", "rsqrt", "typecast",
                     "to_layout", "argmax", "concat", "topk", "untilize", "manual_seed", "sampling"):
            setattr(self, name, self._op(getattr(self, "_" + name)))
        self.fill_cache = self._op(self._fill_cache, in_place=True)

    # -- rounding and construction -----------------------------------------------------------------------

    def round_to(self, data: torch.Tensor, dtype: str) -> torch.Tensor:
        if dtype in INT_DTYPES:
            return data.to(torch.int64)
        data = data.float()
        if self.exact or dtype == "float32":
            return data
        if dtype == "bfloat16":
            return data.to(torch.bfloat16).float()
        if self.block_float is None:
            raise RuntimeError(f"{dtype} needs the real ttnn host conversion (block_float)")
        return self.block_float(data, dtype)

    def _new(self, data, dtype="bfloat16", layout="TILE", memory_config=None, on_device=True) -> HostTensor:
        tensor = HostTensor(self, self.round_to(data, dtype), dtype, layout, memory_config or self.DRAM_MEMORY_CONFIG, on_device)
        if on_device:
            self._live.add(tensor)
        return tensor

    def _like(self, source: HostTensor, data, memory_config=None, dtype=None) -> HostTensor:
        kept = source.dtype in ("bfloat16", "float32", *INT_DTYPES)  # block floats compute into bf16
        return self._new(data, dtype or (source.dtype if kept else "bfloat16"), source.layout,
                         memory_config or source.memory_config())

    def _allocating(self, what: str) -> None:
        if self._capturing is not None:
            raise RuntimeError(f"{what} allocates device memory inside a trace capture")

    def from_torch(self, tensor, dtype="bfloat16", layout="ROW_MAJOR", device=None, memory_config=None, **_):
        if device is not None:
            self._allocating("from_torch")
        return self._new(tensor.detach().clone(), dtype, layout, memory_config, on_device=device is not None)

    def as_tensor(self, tensor, dtype="bfloat16", layout="ROW_MAJOR", device=None, memory_config=None, cache_file_name=None):
        return self.from_torch(tensor, dtype=dtype, layout=layout, device=device, memory_config=memory_config)

    def allocate_tensor_on_device(self, shape, dtype, layout, device, memory_config=None):
        self._allocating("allocate_tensor_on_device")
        return self._new(torch.zeros(tuple(shape)), dtype, layout, memory_config)

    def zeros(self, shape, dtype="bfloat16", layout="TILE", device=None, memory_config=None):
        self._allocating("zeros")
        return self._new(torch.zeros(tuple(shape)), dtype, layout, memory_config, on_device=device is not None)

    def to_torch(self, tensor: HostTensor) -> torch.Tensor:
        data = tensor.data
        if tensor.dtype in INT_DTYPES:
            return data.to(torch.int32)
        return data.to(torch.bfloat16) if tensor.dtype == "bfloat16" and not self.exact else data.clone()

    def copy_host_to_device_tensor(self, host: HostTensor, device_tensor: HostTensor, cq_id=None):
        if tuple(host.shape) != tuple(device_tensor.shape) or host.dtype != device_tensor.dtype:
            raise RuntimeError(f"copy_host_to_device_tensor: {host.dtype}{tuple(host.shape)} into "
                               f"{device_tensor.dtype}{tuple(device_tensor.shape)}")
        device_tensor.data.copy_(host.data)

    def deallocate(self, tensor: HostTensor) -> None:
        tensor.deallocated = True

    def num_cores_to_corerangeset(self, cores, grid, row_wise=True):
        placement = row_major(cores, (grid.x, grid.y))
        full_rows, rest = divmod(cores, grid.x)
        ranges = [CoreRange(CoreCoord(0, 0), CoreCoord(grid.x - 1, full_rows - 1))] if full_rows else []
        if rest:
            ranges.append(CoreRange(CoreCoord(0, full_rows), CoreCoord(rest - 1, full_rows)))
        assert cores_of(ranges) == placement
        return core_range_set(ranges)

    def create_sharded_memory_config(self, shape, core_grid, strategy, use_height_and_width_as_shard_shape=True, **_):
        return MemoryConfig("L1", strategy, tuple(shape), core_grid.num_cores, (core_grid.x, core_grid.y),
                            rectangle(core_grid.x, core_grid.y))

    def _memory_config(self, layout, buffer, shard_spec=None):
        if shard_spec is None:
            return MemoryConfig(buffer, layout)
        placement = cores_of(shard_spec.grid) if buffer == "L1" else None
        return MemoryConfig(buffer, layout, shard_spec.shape, shard_spec.num_cores, placement=placement)

    # -- device facts ---------------------------------------------------------------------------------

    def GetNumAvailableDevices(self):  # noqa: N802 - ttnn's name
        return 1

    def get_memory_view(self, device, buffer_type):
        banks, bank_bytes = self.dram_banks if buffer_type == "DRAM" else (self.grid[0] * self.grid[1], self.l1_bank)
        used = sum(t.data.numel() * BYTES[t.dtype] for t in list(self._live)
                   if not t.deallocated and t.memory_config().buffer == buffer_type)
        return types.SimpleNamespace(num_banks=banks, total_bytes_per_bank=bank_bytes,
                                     total_bytes_allocated_per_bank=int(used / banks))

    def device(self):
        grid = types.SimpleNamespace(x=self.grid[0], y=self.grid[1])
        return types.SimpleNamespace(compute_with_storage_grid_size=lambda: grid, arch=lambda: "Arch.HOST_STAND_IN",
                                     num_program_cache_entries=lambda: len(self._programs))

    # -- trace ------------------------------------------------------------------------------------------

    def begin_trace_capture(self, device, cq_id=None):
        if self._capturing is not None:
            raise RuntimeError("a trace capture is already active")
        self._capturing = []
        return next(self._ids)

    def end_trace_capture(self, device, trace_id, cq_id=None):
        recorded, self._capturing = self._capturing, None
        for _, _, _, outputs, restore in recorded:
            for tensor, before in restore:  # capture records; it does not change device state
                tensor.data.copy_(before)
            for out in outputs:  # outputs hold nothing meaningful until the trace runs
                if out.dtype not in INT_DTYPES:
                    out.data.fill_(float("nan"))
        self._traces[trace_id] = recorded

    def execute_trace(self, device, trace_id, cq_id=None, blocking=True):
        if trace_id in self._stale_traces:
            raise RuntimeError(f"trace {trace_id} replayed after new programs were compiled while it was live: their "
                               "buffers may lie where the trace writes (ttnn: 'Allocating device buffers is "
                               "potentially unsafe due to the existence of an active trace')")
        for fn, args, kwargs, outputs, _ in self._traces[trace_id]:
            result = fn(*args, **kwargs)
            for out, new in zip(outputs, _as_tuple(result)):
                out._data = new.data

    def is_trace_capture_active(self, device) -> bool:
        return self._capturing is not None

    def release_trace(self, device, trace_id):
        del self._traces[trace_id]
        self._stale_traces.discard(trace_id)

    def _compile(self, name: str, args, kwargs) -> None:
        """The program cache: an op with a new signature builds a program (and may allocate buffers kept
        with it), which a trace capture rejects and which makes every live trace unsafe to replay."""
        positional, keywords = RUNTIME_ARGUMENTS.get(name, ((), ()))
        signature = (name, *(_signature(a) for i, a in enumerate(args) if i not in positional),
                     *((k, _signature(v)) for k, v in sorted(kwargs.items()) if k not in keywords))
        if signature in self._programs:
            return
        if self._capturing is not None:
            raise RuntimeError(f"{name}: a new program is compiled inside a trace capture (run it once before capturing)")
        self._programs.add(signature)
        self._stale_traces.update(self._traces)

    def _op(self, fn, in_place: bool = False):
        """Wrap an op: check its tensor arguments, and record it while a trace is being captured."""

        def run(*args, **kwargs):
            tensors = [a for a in itertools.chain(args, kwargs.values()) if isinstance(a, HostTensor)]
            for t in tensors:
                if not t.on_device:
                    raise RuntimeError(f"{fn.__name__[1:]}: operand is not on the device")
                t.data  # raises if deallocated  # noqa: B018
            restore = [(args[0], args[0].data.clone())] if in_place and self._capturing is not None else []
            self._compile(run.__name__, args, kwargs)
            result = fn(*args, **kwargs)
            self.ops_run += 1
            if self._capturing is not None:
                self._capturing.append((fn, args, kwargs, _as_tuple(result), restore))
            return result

        run.__name__ = fn.__name__.lstrip("_")
        return run

    # -- elementwise and reductions ---------------------------------------------------------------------------

    def _computed(self, op: str, asked: MemoryConfig | None, placement) -> MemoryConfig:
        """The output config an op computes; like ttnn, warn when it differs from the one asked for."""
        if asked.placement is not None and asked.placement != tuple(placement):
            self.warnings.append(f"{op}: Mismatch between computed MemoryConfig (shards on {tuple(placement)}) "
                                 f"and the one asked for (on {asked.placement})")
        return asked.placed(placement)

    def _binary(self, a, b, op, memory_config=None):
        if isinstance(b, HostTensor) and a.memory_config().sharded and b.memory_config().sharded \
                and _shard_layout(a.memory_config()) != _shard_layout(b.memory_config()):
            raise RuntimeError(f"binary op on differently sharded operands: {a.memory_config()} and {b.memory_config()}")
        if memory_config is not None:
            _check_shard(a, memory_config)
        other = b.data if isinstance(b, HostTensor) else b
        return self._like(a, op(a.data, other), memory_config)

    def _add(self, a, b, memory_config=None, input_tensor_b_activations=(), **_):
        scale = 1.0
        for op, param in input_tensor_b_activations:
            if op != "MUL_UNARY_SFPU":
                raise RuntimeError(f"add: the stand-in does not implement the activation {op}")
            scale *= param
        return self._binary(a, b, lambda x, y: x + y * scale, memory_config)

    def _multiply(self, a, b, memory_config=None, **_):
        return self._binary(a, b, torch.mul, memory_config)

    def _divide(self, a, b, memory_config=None, **_):
        return self._binary(a, b, torch.div, memory_config)

    def _maximum(self, a, b, memory_config=None, **_):
        return self._binary(a, b, lambda x, y: torch.maximum(x, torch.as_tensor(y, dtype=x.dtype)), memory_config)

    def _mul(self, a, b, input_tensor_a_activations=(), **_):
        def activated_product(x, y):
            for activation in input_tensor_a_activations:
                x = {"RELU": F.relu, "SQUARE": torch.square}[activation](x)
            return x * y

        return self._binary(a, b, activated_product)

    def _typecast(self, x, dtype, **_):
        return self._like(x, x.data, dtype=dtype)

    def _abs(self, x, **_):
        return self._like(x, x.data.abs())

    def _reciprocal(self, x, **_):
        return self._like(x, x.data.reciprocal())

    def _round(self, x, decimals=0, **_):
        return self._like(x, torch.round(x.data, decimals=decimals))

    def _square(self, x, **_):
        return self._like(x, x.data.square())

    def _rsqrt(self, x, **_):
        return self._like(x, x.data.rsqrt())

    def _max(self, x, dim, keepdim=False, **_):
        return self._like(x, x.data.amax(dim=dim, keepdim=keepdim))

    def _mean(self, x, dim, keepdim=False, **_):
        return self._like(x, x.data.mean(dim=dim, keepdim=keepdim))

    # -- shapes and memory ---------------------------------------------------------------------------------

    def _unsqueeze(self, x, dim):
        return self._like(x, x.data.unsqueeze(dim))

    def _slice(self, x, starts, ends, **_):
        index = tuple(slice(s, e) for s, e in zip(starts, ends))
        return self._like(x, x.data[index].clone())

    def _concat(self, tensors, dim, memory_config=None, **_):
        if len({t.dtype for t in tensors}) != 1 or len({t.layout for t in tensors}) != 1:
            raise RuntimeError("concat needs inputs of one dtype and layout")
        return self._like(tensors[0], torch.cat([t.data for t in tensors], dim=dim), memory_config)

    def _to_memory_config(self, x, memory_config, **_):
        _check_shard(x, memory_config)
        return self._like(x, x.data.clone(), memory_config)

    def _to_layout(self, x, layout, **_):
        return self._new(x.data.clone(), x.dtype, layout, x.memory_config())

    def _argmax(self, x, dim=None, keepdim=False, **_):
        if x.layout != "ROW_MAJOR":
            raise RuntimeError("argmax needs a ROW_MAJOR input")
        return self._new(x.data.argmax(dim=dim, keepdim=keepdim), "uint32", "ROW_MAJOR", x.memory_config())

    def _topk(self, x, k=32, dim=-1, largest=True, sorted=True, **_):
        # the k largest along the last dim; ids are 16-bit unless the padded width needs 32 (as on the device)
        if x.layout != "TILE" or x.dtype != "bfloat16" or dim not in (-1, len(x.shape) - 1):
            raise RuntimeError("topk needs a bfloat16 TILE input, reduced along its last dimension")
        values, indices = x.data.topk(k, dim=-1, largest=largest, sorted=sorted)
        index_dtype = "uint32" if x.padded_shape[-1] > 65536 else "uint16"
        return self._like(x, values), self._new(indices, index_dtype, "TILE", x.memory_config())

    def _untilize(self, x, **_):
        if x.layout != "TILE":
            raise RuntimeError("untilize needs a TILE input")
        return self._new(x.data.clone(), x.dtype, "ROW_MAJOR", x.memory_config())

    def _manual_seed(self, seeds, device=None, user_ids=None, sub_core_grids=None):
        # seeds the PRNG of each listed user's sampling core (one core per user)
        if seeds.dtype != "uint32" or user_ids is None or user_ids.dtype != "uint32" or sub_core_grids is None:
            raise RuntimeError("manual_seed (per user) needs uint32 seeds and user_ids tensors and the sampling cores")
        for user, seed in zip(user_ids.data.tolist(), seeds.data.tolist()):
            self._prng[int(user)] = torch.Generator().manual_seed(int(seed))

    def _sampling(self, values, indices, k, p, temp, seed=0, sub_core_grids=None, output_tensor=None):
        """Per user (row): softmax(values * temp), its k largest, cut to the smallest set reaching p, one
        draw from the user's core PRNG. Returns the drawn entries of `indices`, uint32 [1, 1, 1, users]."""
        users, width = values.shape[-2], values.shape[-1]
        checks = [
            (values.dtype == "bfloat16" and values.layout == "TILE", "values must be bfloat16 TILE"),
            (indices.dtype in ("uint32", "int32") and indices.layout == "ROW_MAJOR", "indices must be 32-bit ROW_MAJOR"),
            (tuple(indices.shape) == tuple(values.shape), "indices and values differ in shape"),
            (1 <= users <= 32 and width % TILE == 0 and (width // TILE) & (width // TILE - 1) == 0,
             "users must be 1..32 and the width a power-of-two number of tiles"),
            (k.dtype in ("uint32", "int32") and p.dtype == temp.dtype == "bfloat16"
             and all(t.layout == "ROW_MAJOR" and tuple(t.shape) == (users,) for t in (k, p, temp)),
             "k (32-bit), p and temp (bfloat16) must be ROW_MAJOR [users]"),
            (sub_core_grids is None or sum(r.num_cores for r in sub_core_grids) >= users, "too few sampling cores"),
            (not any(t.memory_config().sharded for t in (values, indices, k, p, temp)), "inputs must be interleaved"),
        ]
        for ok, message in checks:
            if not ok:
                raise RuntimeError(f"sampling: {message}")
        tokens = torch.zeros(1, 1, 1, users, dtype=torch.int64)
        for user in range(users):
            top_k = int(k.data[user])
            if not 0 < top_k <= 32:
                raise RuntimeError("sampling: k must be in (0, 32]")
            scaled, order = (values.data[0, 0, user] * temp.data[user]).sort(descending=True)
            probs = scaled[:top_k].softmax(-1)
            keep = (probs.cumsum(-1) - probs) < float(p.data[user])  # the smallest prefix reaching p; the first stays
            probs = probs * keep
            generator = self._prng.setdefault(user, torch.Generator().manual_seed(seed))
            draw = float(torch.rand(1, generator=generator)) * float(probs.sum())
            choice = min(int(torch.searchsorted(probs.cumsum(-1), torch.tensor([draw]), right=True)), top_k - 1)
            tokens[0, 0, 0, user] = indices.data[0, 0, user, order[choice]]
        result = self._new(tokens, "uint32", "ROW_MAJOR", values.memory_config())
        if output_tensor is not None:
            output_tensor.data.copy_(result.data)
            return output_tensor
        return result

    def _embedding(self, ids, table, layout="ROW_MAJOR", **_):
        if ids.dtype != "uint32" or table.layout != "ROW_MAJOR":
            raise RuntimeError("embedding needs uint32 ids and a ROW_MAJOR table")
        return self._new(table.data[ids.data.long()], "bfloat16", layout)

    # -- matmul and norm ----------------------------------------------------------------------------------

    def _linear(self, a, b, memory_config=None, program_config=None, compute_kernel_config=None, **_):
        if a.shape[-1] != b.shape[-2]:
            raise RuntimeError(f"linear: a_shape[-1] ({a.shape[-1]}) != b_shape[-2] ({b.shape[-2]})")
        x = a.data
        if type(program_config).__name__ == "MatmulMultiCoreReuseMultiCast1DProgramConfig":
            x, memory_config = self._matmul_1d(a, b, memory_config, program_config.kwargs)
        fidelity = compute_kernel_config.kwargs.get("math_fidelity") if compute_kernel_config is not None else None
        y = x @ b.data if self.exact or fidelity is None else fidelity_matmul(x, b.data, fidelity)
        return self._new(y, "bfloat16", "TILE", memory_config)

    def _matmul_1d(self, a, b, asked, program):
        """The 1D multicast matmul (mcast_in0): the weight interleaved; x interleaved, or width-sharded with
        shard k read from the k-th of the first cores of the program grid, row by row (its program factory
        makes those the senders, and the reader walks their bounding box); per_core_N output tiles on each
        of the first cores of the program grid, row by row. Returns what the kernel reads as x, and the
        output's memory config."""
        grid = (program["compute_with_storage_grid_size"].x, program["compute_with_storage_grid_size"].y)
        per_core_n, block_w = program["per_core_N"], program["in0_block_w"]
        x, config = a.data, a.memory_config()
        if b.memory_config().sharded:
            raise RuntimeError("1D matmul: the stand-in reads only an interleaved weight")
        if (a.shape[-1] // TILE) % block_w:
            raise RuntimeError(f"1D matmul: K ({a.shape[-1] // TILE} tiles) must be divisible by in0_block_w ({block_w})")
        if config.sharded:
            if config.layout != "WIDTH_SHARDED" or config.buffer != "L1" or (config.shard_shape[1] // TILE) % block_w:
                raise RuntimeError(f"1D matmul: x {config} is not width-sharded in L1 in whole in0 blocks")
            if self.kernel_placement:
                x = _width_shards_read_from(a, row_major(config.cores, grid))
        output_cores = -(-b.shape[-1] // (TILE * per_core_n))
        if output_cores > grid[0] * grid[1]:
            raise RuntimeError(f"1D matmul: {output_cores} output blocks on a {grid[0]}x{grid[1]} grid")
        if asked is not None and asked.sharded:
            if asked.layout != "WIDTH_SHARDED" or asked.shard_shape[1] != per_core_n * TILE or asked.cores != output_cores:
                raise RuntimeError(f"1D matmul: output {asked} is not {output_cores} width shards of {per_core_n} tiles")
            asked = self._computed("linear", asked, row_major(output_cores, grid))
        return x, asked

    def _rms_norm(self, x, epsilon=1e-12, weight=None, memory_config=None, program_config=None, **_):
        if memory_config is not None and memory_config.sharded:
            _check_shard(x, memory_config)
        data = x.data
        y = data * torch.rsqrt(data.pow(2).mean(-1, keepdim=True) + epsilon)
        if weight is not None:
            y = y * weight.data.reshape(-1)
        if self.kernel_placement and program_config is not None and x.memory_config().sharded:
            # the sharded norm reads each shard from the L1 of its own program core
            grid = program_config.kwargs["compute_with_storage_grid_size"]
            if x.memory_config().placement != rectangle(grid.x, grid.y):
                self.warnings.append(f"rms_norm: input shards on {x.memory_config().placement}, program on {grid}")
                y = torch.full_like(y, float("nan"))
        return self._like(x, y, memory_config or x.memory_config())

    # -- attention pieces -----------------------------------------------------------------------------------

    def _nlp_create_qkv_heads_decode(self, qkv, num_heads, num_kv_heads, memory_config=None, overlap_qk_coregrid=True, **_):
        # [1, 1, B, (H + 2K) D] (width-sharded or interleaved) -> q [1, B, H, D], k and v [1, B, K, D]
        # (heads padded to 32 rows), height-sharded one user per core
        users = qkv.shape[2]
        head_dim = qkv.shape[3] // (num_heads + 2 * num_kv_heads)
        if not overlap_qk_coregrid:
            raise RuntimeError("nlp_create_qkv_heads_decode: the stand-in reads only with overlap_qk_coregrid")
        if self.kernel_placement and qkv.memory_config().sharded:
            q, k, v = _qkv_heads_bounding_box_walk(qkv, num_heads, num_kv_heads, head_dim)
        else:
            parts = qkv.data[0, 0].view(users, num_heads + 2 * num_kv_heads, head_dim)
            q, k, v = parts.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
        asked = memory_config.placement if memory_config is not None else None
        if asked is not None and len(asked) != users:
            raise RuntimeError(f"nlp_create_qkv_heads_decode: {len(asked)} output cores for {users} users")
        config = MemoryConfig("L1", "HEIGHT_SHARDED", (TILE, head_dim)).placed(asked or row_major(users, self.grid))
        return tuple(self._like(qkv, t[None].clone(), config) for t in (q, k, v))

    def _nlp_concat_heads_decode(self, x, num_heads, **_):
        # [1, B, H, D] height-sharded -> [1, 1, 32, H*D]: the device always writes 32 user rows
        if x.memory_config().layout != "HEIGHT_SHARDED":
            raise RuntimeError("nlp_concat_heads_decode needs a height-sharded input")
        if self.kernel_placement and not is_rectangle(x.memory_config().placement):  # the mock: "bad optional access"
            raise RuntimeError(f"nlp_concat_heads_decode: input cores {x.memory_config().placement} are not a rectangle")
        users, heads, dim = x.shape[1:]
        out = torch.zeros(1, 1, TILE, num_heads * dim)
        out[0, 0, :users] = x.data[0, :, :num_heads].reshape(users, num_heads * dim)
        config = MemoryConfig("L1", "WIDTH_SHARDED", (TILE, dim)).placed(row_major(num_heads, self.grid))
        return self._like(x, out, config)

    def _nlp_create_qkv_heads(self, qkv, num_heads, num_kv_heads, transpose_k_heads=True, memory_config=None, **_):
        # [1, 1, S, (H + 2K) D] -> q [1, H, S, D], k [1, K, S, D] (or [1, K, D, S]), v [1, K, S, D]
        seq = qkv.shape[2]
        head_dim = qkv.shape[3] // (num_heads + 2 * num_kv_heads)
        parts = qkv.data[0, 0].view(seq, num_heads + 2 * num_kv_heads, head_dim).transpose(0, 1)
        q, k, v = parts.split([num_heads, num_kv_heads, num_kv_heads], dim=0)
        if transpose_k_heads:
            k = k.transpose(-1, -2)
        return tuple(self._like(qkv, t[None].contiguous(), memory_config) for t in (q, k, v))

    def _nlp_concat_heads(self, x, memory_config=None, **_):
        _, heads, seq, dim = x.shape
        return self._like(x, x.data[0].transpose(0, 1).reshape(1, 1, seq, heads * dim), memory_config)

    def _rotary_embedding_hf(self, x, cos, sin, is_decode_mode=False, **_):
        """HF half-split RoPE: x * cos + rotate_half(x) * sin. Decode: x [1, B, H, D] with cos [1, B, 1, D],
        all height-sharded; prefill: x [1, H, S, D] with cos [1, 1, S, D]."""
        if is_decode_mode and not (x.memory_config().layout == cos.memory_config().layout == "HEIGHT_SHARDED"):
            raise RuntimeError("rotary_embedding_hf (decode) needs height-sharded x, cos and sin")
        if is_decode_mode and cos.shape[1] != x.shape[1]:
            raise RuntimeError("Cos batch dim must match input")
        half = x.shape[-1] // 2
        data = x.data
        rotated = torch.cat((-data[..., half:], data[..., :half]), dim=-1)
        if is_decode_mode and self.kernel_placement:  # each core rotates its user's heads with the cos/sin in its L1
            cos_data, sin_data = (_on_cores_of(t, x.memory_config().placement, dim=1) for t in (cos, sin))
        else:
            cos_data, sin_data = cos.data, sin.data
        return self._like(x, data * cos_data + rotated * sin_data)

    def _paged_update_cache(self, cache, x, update_idxs_tensor=None, **_):
        # cache [B, K, S, D]; x [1, B, K, D]; each user b writes its K heads at position update_idxs[b]
        positions = update_idxs_tensor.data.long()
        if x.shape[1] != cache.shape[0] or positions.numel() != cache.shape[0]:
            raise RuntimeError("paged_update_cache: users in x, positions and cache differ")
        if int(positions.max()) >= cache.shape[2]:
            raise RuntimeError("paged_update_cache: position past the end of the cache")
        users = torch.arange(cache.shape[0])
        cache.data[users, :, positions] = self.round_to(x.data[0], cache.dtype)

    def _fill_cache(self, cache, x, batch_idx, update_idx=0, **_):
        # cache [B, K, S, D]; x [1, K, S', D] written at [batch_idx, :, update_idx:update_idx + S']
        seq = x.shape[2]
        if update_idx % TILE:  # the mock: "args.update_idx % TILE_HEIGHT == 0"
            raise RuntimeError(f"fill_cache: update_idx {update_idx} is not a whole number of tiles")
        if update_idx + seq > cache.shape[2]:
            raise RuntimeError("fill_cache: input longer than the cache")
        cache.data[batch_idx, :, update_idx : update_idx + seq] = self.round_to(x.data[0], cache.dtype)

    def _sdpa(self, q, k, v, is_causal=True, scale=None, **_):
        heads, kv_heads = q.shape[1], k.shape[1]
        out = F.scaled_dot_product_attention(q.data, k.data, v.data, is_causal=is_causal, scale=scale,
                                             enable_gqa=heads != kv_heads)
        return self._like(q, out)

    def _chunked_sdpa(self, q, k, v, page_table, chunk_start_idx=None, chunk_start_idx_tensor=None, scale=None,
                      program_config=None, memory_config=None, **_):
        """Q [b, H, Sq, D] holds positions start .. start + Sq - 1 of each user; the caches k, v [blocks, K, block, D]
        are read through page_table [b, pages] (user b's virtual page i is block page_table[b, i]); query i
        attends to positions 0 .. start + i. The checks are ttnn 0.81.1's, as the mock device reports them."""
        _check_chunked_sdpa(q, k, v, page_table, chunk_start_idx, chunk_start_idx_tensor, scale, program_config)
        start = int(chunk_start_idx_tensor.data[0]) if chunk_start_idx_tensor is not None else chunk_start_idx
        config = program_config.kwargs if program_config is not None else {}
        if start % config.get("q_chunk_size", TILE) or start % config.get("k_chunk_size", TILE):
            raise RuntimeError(f"chunked SDPA: chunk_start_idx {start} is not a multiple of q_chunk_size and k_chunk_size")
        users, kv_heads, block, dim = q.shape[0], k.shape[1], k.shape[2], k.shape[3]
        pages = page_table.shape[1]
        seq = q.shape[2]
        if start + seq > pages * block:
            raise RuntimeError(f"chunked SDPA: kv_length {pages * block} < q length {seq} + chunk_start_idx {start}")
        table = page_table.data.long()
        if int(table.min()) < 0 or int(table.max()) >= k.shape[0]:
            raise RuntimeError("chunked SDPA: a page table entry names no block of the cache")

        def gathered(cache):  # [b, pages, K, block, D] -> [b, K, start + Sq, D]
            return cache.data[table].transpose(1, 2).reshape(users, kv_heads, pages * block, dim)[:, :, : start + seq]

        visible = torch.arange(start + seq)[None, :] <= start + torch.arange(seq)[:, None]
        out = F.scaled_dot_product_attention(q.data, gathered(k), gathered(v), attn_mask=visible, scale=scale,
                                             enable_gqa=True)
        return self._like(q, out, memory_config)

    def _sdpa_decode(self, q, k, v, cur_pos_tensor=None, scale=None, memory_config=None, program_config=None, **_):
        # q [1, B, H, D]; cache k/v [B, K, S, D]; user b attends to positions 0..cur_pos[b]
        positions = cur_pos_tensor.data.long()
        users, heads = q.shape[1], q.shape[2]
        kv_heads = k.shape[1]
        if heads % kv_heads:
            raise RuntimeError(f"GQA expects Q to have a multiple of K heads, but got {heads} and {kv_heads}")
        grid = program_config.kwargs["compute_with_storage_grid_size"] if program_config else CoreCoord(*self.grid)
        query = q.data[0]
        if self.kernel_placement and q.memory_config().sharded:  # user b's Q is read from the L1 of its output core b
            query = _on_cores_of(q, row_major(users, (grid.x, grid.y)), dim=1)[0]
        mask = torch.arange(k.shape[2])[None, :] <= positions[:, None]  # [B, S]
        out = F.scaled_dot_product_attention(query[:, :, None], k.data, v.data, attn_mask=mask[:, None, None, :],
                                             scale=scale, enable_gqa=True)[:, :, 0]
        if self.kernel_placement:
            max_cores = program_config.kwargs.get("max_cores_per_head_batch", 16) if program_config else 16
            _blank_uncomputed_heads(out, kv_heads, sdpa_decode_computed_heads(users, kv_heads, grid.x * grid.y, max_cores))
        return self._like(q, out[None], memory_config)


def fidelity_matmul(x: torch.Tensor, w: torch.Tensor, fidelity: str) -> torch.Tensor:
    """x @ w as the matrix unit computes it at `fidelity` (float32 accumulation).

    A matmul unpacks in1 (the weights) to SrcA and in0 (the activations) to SrcB (the wheel's
    tt-llk/tt_llk_blackhole/llk_lib/llk_unpack_AB_matmul.h). The multiplier takes 5 significant bits of
    SrcA (implicit 1 + 4 mantissa bits) and 7 of SrcB; phase p multiplies SrcA's high (p bit 0 clear) or
    low part by SrcB's high (p bit 1 clear) or low part, and LoFi..HiFi4 run phases 0..n-1
    (llk_math_matmul.h counts the phase up from 0; the split is as jasondavies/tt-isa-documentation,
    MVMUL.md, describes it)."""

    def split(t, mask):
        high = (t.float().view(torch.int32) & torch.tensor(mask, dtype=torch.int64).to(torch.int32)).view(torch.float32)
        return high, t.float() - high

    a_high, a_low = split(w, SRC_A_HIGH)
    b_high, b_low = split(x, SRC_B_HIGH)
    parts = [(b_high, a_high), (b_high, a_low), (b_low, a_high), (b_low, a_low)]
    return sum(b @ a for b, a in parts[:PHASES[fidelity]])


SRC_A_HIGH, SRC_B_HIGH = 0xFFF80000, 0xFFFE0000  # float32 masks: sign, exponent, the bits the multiplier takes


def real_block_float(ttnn):
    """bfloat8_b / bfloat4_b rounding through ttnn's own host conversion (see tools.tt_mock.harness.host_ttnn)."""

    def convert(data: torch.Tensor, dtype: str) -> torch.Tensor:
        tensor = ttnn.from_torch(data, dtype=getattr(ttnn, dtype), layout=ttnn.TILE_LAYOUT)
        return ttnn.to_torch(tensor).float().reshape(data.shape)

    return convert


def _signature(value):
    """What a program is compiled for: tensor shapes, dtypes, layouts and memory configs, and other arguments."""
    if isinstance(value, HostTensor):
        return tuple(value.shape), value.dtype, value.layout, value.memory_config()
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    return "device" if isinstance(value, types.SimpleNamespace) else repr(value)


def _as_tuple(result):
    if result is None:
        return ()
    return result if isinstance(result, tuple) else (result,)


# --- PLACEMENT: how the kernels find their shards (ttnn 0.81.1) -----------------------------------------------


def _shard_at(x: HostTensor, core) -> int | None:
    placement = x.memory_config().placement or ()
    return placement.index(core) if core in placement else None


def _on_cores_of(x: HostTensor, cores, dim: int) -> torch.Tensor:
    """What each core in `cores` finds in its own L1 at x's address: the shard x keeps there (one user per
    shard along `dim`), or NaN where x has no shard (stale L1)."""
    if not x.memory_config().sharded:
        raise RuntimeError("expected a height-sharded tensor, one user per core")
    parts = []
    for core in cores:
        index = _shard_at(x, core)
        part = x.data.select(dim, index) if index is not None else torch.full_like(x.data.select(dim, 0), float("nan"))
        parts.append(part)
    return torch.stack(parts, dim=dim)


def _width_shards_read_from(x: HostTensor, cores) -> torch.Tensor:
    """x's columns as a reader finds them that takes width shard k from the L1 of cores[k]: the shard x
    keeps on that core, or NaN where x has none there (stale L1)."""
    width = x.memory_config().shard_shape[1]
    parts = []
    for core in cores:
        index = _shard_at(x, core)
        parts.append(x.data[..., index * width:(index + 1) * width] if index is not None
                     else torch.full_like(x.data[..., :width], float("nan")))
    return torch.cat(parts, dim=-1)[..., :x.shape[-1]]


def _qkv_heads_bounding_box_walk(qkv: HostTensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """nlp_create_qkv_heads_decode's sharded reader (overlap_qk_coregrid, the default): it walks the cores
    from (0, 0) to the far corner of the input's shard grid, row by row, and takes tiles(width) / (those
    cores) tiles from each core's L1 for Q, then K, then V, whether or not a shard of the input lives
    there (reader_tm_tile_layout_nlp_create_qkv_heads_decode.cpp; num_x, num_y from the bounding box in
    its sharded program factory)."""
    placement = qkv.memory_config().placement
    users, width = qkv.shape[2], qkv.shape[3]
    shard_tiles = qkv.memory_config().shard_shape[1] // TILE
    box_x, box_y = max(c[0] for c in placement) + 1, max(c[1] for c in placement) + 1
    box = rectangle(box_x, box_y)
    per_core = (width // TILE) // len(box)
    tiles = qkv.data[0, 0].reshape(users, width // TILE, TILE)
    stale = torch.full((users, TILE), float("nan"))
    walk, core, offset = [], 0, 0
    for _ in range(width // TILE):
        index = placement.index(box[core]) if core < len(box) and box[core] in placement else None
        walk.append(tiles[:, index * shard_tiles + offset] if index is not None and offset < shard_tiles else stale)
        offset += 1
        if offset == per_core:
            core, offset = core + 1, 0
    heads = torch.stack(walk, dim=1).reshape(users, -1, head_dim)
    return heads.split([num_heads, num_kv_heads, num_kv_heads], dim=1)


def _blank_uncomputed_heads(out: torch.Tensor, kv_heads: int, computed) -> None:
    """NaN where SDPA decode computes nothing (out [users, heads, dim]); all of it when a core strays past the end."""
    if computed is None:
        out.fill_(float("nan"))
        return
    group = out.shape[1] // kv_heads
    for user, head in itertools.product(range(out.shape[0]), range(kv_heads)):
        if (user, head) not in computed:
            out[user, head * group:(head + 1) * group] = float("nan")


def sdpa_decode_computed_heads(users: int, kv_heads: int, cores: int, max_cores_per_head: int):
    """The (user, KV head) pairs SDPA decode computes completely on `cores` cores: its program factory gives
    each user cores // users cores, splits them over the KV heads (several heads per core when too few),
    and reduces each head over its group of cores. None when an active core is handed a user or head past
    the end (it reads and writes out of bounds)."""
    per_user = min(cores, max_cores_per_head * users * kv_heads) // users
    if per_user == 0:
        raise RuntimeError(f"Cores available ({cores}) must be >= batch size ({users})")
    per_head = max(1, per_user // kv_heads)
    heads_per_core = max(1, -(-kv_heads // per_user))
    active = per_head * kv_heads * users // heads_per_core
    groups: dict[tuple[int, int], set[int]] = {}
    for core in range(active):
        user, group = core // per_user, core % per_user // per_head
        if user >= users or group * heads_per_core >= kv_heads:
            return None
        groups.setdefault((user, group), set()).add(core % per_head)
    return {(user, head) for (user, group), members in groups.items() if len(members) == per_head
            for head in range(group * heads_per_core, min(kv_heads, (group + 1) * heads_per_core))}


def _check_chunked_sdpa(q, k, v, page_table, start, start_tensor, scale, program_config) -> None:
    """What ttnn 0.81.1 refuses in chunked SDPA (binding, device operation and program factory, on the mock)."""
    checks = [
        # the binding takes scale as a C++ float and rejects a Python float it cannot hold exactly
        (scale is None or float(torch.tensor(scale, dtype=torch.float32)) == scale, "incompatible function arguments "
         "(scale is not a float32 value)"),
        ((start is None) != (start_tensor is None), "pass one of chunk_start_idx and chunk_start_idx_tensor"),
        (start_tensor is None or (start_tensor.dtype == "int32" and tuple(start_tensor.shape) == (1,)),
         "chunk_start_idx tensor must be int32 [1]"),
        (page_table.dtype == "int32" and page_table.layout == "ROW_MAJOR" and len(page_table.shape) == 2
         and page_table.shape[0] == q.shape[0], "page table must be int32 ROW_MAJOR [b, pages]"),
        # the start read from device memory: the page table row is read as one stick of a multiple of 32 bytes
        (start_tensor is None or page_table.shape[1] * 4 % 32 == 0, "p.page_table_stick_size % 32 == 0"),
        (q.shape[1] % k.shape[1] == 0, f"GQA expects Q to have a multiple of K heads, but got {q.shape[1]} and {k.shape[1]}"),
        (tuple(k.shape) == tuple(v.shape) and k.shape[3] == q.shape[3], "K and V caches must match Q's head_dim"),
        (all(t.layout == "TILE" for t in (q, k, v)), "Q, K and V must be TILE"),
        # the readers fetch pages and Q chunks by id from interleaved buffers
        (not any(t.memory_config().sharded for t in (q, k, v, page_table)), "inputs must be interleaved"),
    ]
    for ok, message in checks:
        if not ok:
            raise RuntimeError(f"chunked SDPA: {message}")


def _shard_layout(config: MemoryConfig) -> tuple:
    """How a sharded tensor is cut, wherever its shards lie (binary ops reshard a misplaced operand)."""
    return config.buffer, config.layout, config.shard_shape, config.cores


def _check_shard(x: HostTensor, config: MemoryConfig) -> None:
    """A sharded config must cover the tensor, rows (padded to tiles) by width, with no empty shard
    (the last shard may be partly filled, as ttnn allows)."""
    if not config.sharded or config.shard_shape is None or config.cores is None:
        return
    height, width = config.shard_shape
    padded = _padded(tuple(x.shape))
    rows = 1
    for d in padded[:-1]:
        rows *= d

    def covers(size: int, shard: int) -> bool:
        return shard * (config.cores - 1) < size <= shard * config.cores

    if config.layout == "WIDTH_SHARDED":
        ok = covers(padded[-1], width) and rows <= height
    else:
        ok = padded[-1] == width and covers(rows, height)
    if not ok:
        raise RuntimeError(f"shard spec {config.shard_shape} x {config.cores} cores ({config.layout}) does not fit a "
                           f"tensor of padded shape {list(padded)}")
