"""The compiled kernels (csrc/, built by setup.py) behind a small interface on numpy arrays.

Why a plain-C CPython extension on the buffer protocol: it needs no build-time dependency beyond a C
compiler (not PyTorch, not numpy, not pybind11/nanobind or CMake), one setuptools build covers every
instruction set, and each call checks its buffers' sizes in C before releasing the GIL. numpy arrays
(and torch tensors through .numpy(), without a copy) pass straight in.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import BitNetError

try:
    from . import _kernels
except ImportError:  # a source checkout that was never built, or a failed build
    _kernels = None

BLOCK_INPUTS = 128  # inputs per block of the row-group layout (csrc/kernels.h)
ROWS_PER_GROUP = 4
CACHE_LINE = 64
WEIGHT_DTYPES = {np.dtype("uint16"): 0, np.dtype("float32"): 1, np.dtype("int8"): 2}  # bf16 travels as uint16
REPOSITORY = Path(__file__).resolve().parents[4]


class KernelsUnavailable(BitNetError):
    """The compiled CPU kernels are not importable."""


def available() -> bool:
    return _kernels is not None


def require():
    if _kernels is None:
        raise KernelsUnavailable(
            "the CPU backend's compiled kernels are not built: reinstall with a C compiler "
            "('pip install -e .' or ./run), or use --backend torch"
        )
    return _kernels


def paths() -> list[str]:
    """Instruction-set paths this CPU and build can run, best first (the last is always "scalar")."""
    return require().available_paths()


def path_index(path: str | None) -> int:
    """The module's number for a path name; None picks the best one here."""
    names = paths()
    name = names[0] if path is None else path
    if name not in names:
        raise BitNetError(f"instruction-set path {name!r} is not available here (available: {', '.join(names)})")
    return ["scalar", "avx2", "avx512", "neon", "neondot"].index(name)


def path_number(path: int | None) -> int:
    """A path_index() number as the module's functions take it; None: the best path here."""
    return path_index(None) if path is None else path


def build_in_place() -> None:
    """Compile the extension into this source tree (a checkout used without 'pip install')."""
    global _kernels
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=REPOSITORY, check=True,
                   capture_output=True)
    from . import _kernels as built

    _kernels = built


def aligned_array(shape: int | tuple[int, ...], dtype, zeros: bool = False) -> np.ndarray:
    """np.empty (np.zeros: lazily zeroed pages) starting on a 64-byte cache line. glibc places large blocks
    16 bytes past a page start, so every 64-byte vector load of such an array spans two lines: on an
    AVX-512 Zen 5, one thread streaming a bf16 LM head from memory read 27 GB/s instead of 34."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = (np.zeros if zeros else np.empty)(nbytes + CACHE_LINE, np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def padded(k: int) -> int:
    return -(-k // BLOCK_INPUTS) * BLOCK_INPUTS


class PackedTernary:
    """A ternary matrix [n, k] in the kernels' row-group layout: 2 bits per weight, rows padded to 4 and
    inputs to 128 with zero weights."""

    def __init__(self, source: np.ndarray, n: int, k: int, from_2bit: bool, threads: int = 1, path: int | None = None):
        self.n, self.k = n, k
        self.data = aligned_array(-(-n // ROWS_PER_GROUP) * padded(k), np.uint8)
        path = path_number(path)
        try:
            require().pack(np.ascontiguousarray(source), n, k, self.data, from_2bit, path, threads)
        except ValueError as exc:
            raise BitNetError(f"cannot pack ternary weights: {exc}") from None

    @classmethod
    def from_codes(cls, codes: np.ndarray, threads: int = 1) -> PackedTernary:
        """int8 codes [n, k] in {-1, 0, 1}."""
        return cls(codes.astype(np.int8, copy=False), *codes.shape, from_2bit=False, threads=threads)

    @classmethod
    def from_2bit(cls, packed: np.ndarray, threads: int = 1, path: int | None = None, k: int | None = None) -> PackedTernary:
        """The converted checkpoint's uint8 [n, k/4] (ternary.pack_2bit), repacked without expanding to int8
        (path: path_index()'s number, None: the best here). k: the inputs when fewer than the bytes hold (the
        last byte's spare fields must hold 1, a zero weight: the layout pads with zero weights anyway)."""
        stored = packed.shape[1] * 4
        k = stored if k is None else k
        if not stored - 4 < k <= stored:
            raise ValueError(f"{k} inputs do not fit rows of {packed.shape[1]} bytes")
        matrix = cls(packed, packed.shape[0], stored, from_2bit=True, threads=threads, path=path)
        matrix.k = k
        return matrix


class Activations:
    """Preallocated int8 activations of up to `rows` tokens: codes [rows, padded k], scale and code sum per row."""

    def __init__(self, rows: int, k: int):
        self.k = k
        self.q = aligned_array((rows, padded(k)), np.int8, zeros=True)
        self.scale = np.zeros(rows, dtype=np.float32)
        self.sum = np.zeros(rows, dtype=np.int32)

    def quantize(self, x: np.ndarray, m: int, norm_weight: np.ndarray | None = None, eps: float = 0.0,
                 gated: bool = False, path: int | None = None, threads: int = 1) -> None:
        """Rows 0..m of x (fp32; [gate | up] halves when gated: relu(gate)^2 * up), RMS-normed with
        norm_weight when given, quantised per token as HF's ActQuant. path: path_index()'s number (None: the
        best here; every path and thread count gives identical results)."""
        path = path_number(path)
        _kernels.quantize(x, x.shape[-1], m, self.k, gated, norm_weight, eps, self.q, self.scale, self.sum, path, threads)


def matmul(w: PackedTernary, acts: Activations, m: int, out: np.ndarray | None = None, weight_scale=None,
           accumulate: bool = False, path: int | None = None, threads: int = 1) -> np.ndarray:
    """Exact int32 acts @ w^T [m, n]; with weight_scale (fp32 [n]) the golden model's fp32
    int32 / activation scale * weight scale instead, written into out or added to it. path: path_index()'s
    number (None: the best here)."""
    path = path_number(path)
    mode = 0 if weight_scale is None else 2 if accumulate else 1
    if out is None:
        out = np.empty((m, w.n), dtype=np.int32 if mode == 0 else np.float32)
    _kernels.matmul(w.data, w.n, w.k, acts.q, acts.sum, m, out, mode, acts.scale, weight_scale, path, threads)
    return out


def attention_step(qkv: np.ndarray, rows: int, heads: int, kv_heads: int, head_dim: int, cos: np.ndarray,
                   sin: np.ndarray, segments: np.ndarray, cache: np.ndarray, scale: float, out: np.ndarray,
                   path: int | None = None, threads: int = 1) -> np.ndarray:
    """One layer's attention for a step, in one call: RoPE on the q and k heads of qkv (fp32 rows of
    [q | k | v], in place), k and v written into the cache (fp32 [slots, 2, kv heads, positions, head dim]),
    then causal attention of every row into out [rows, heads * head_dim]. segments: int64 [n, 3] of
    (slot, start, rows) in row order; row i of a segment is at position start + i."""
    path = path_number(path)
    slots, positions = cache.shape[0], cache.shape[3]
    _kernels.attention_step(qkv, rows, heads, kv_heads, head_dim, cos, sin, segments, len(segments), cache, slots,
                            positions, scale, out, path, threads)
    return out


def layer_stack(config, rows: int, workspace: Sequence[np.ndarray], cos: np.ndarray, sin: np.ndarray,
                cache: np.ndarray, weights: Sequence[Sequence[np.ndarray]]):
    """The model's decoder layers for layers(): the buffers of a step of up to `rows` rows (workspace: fp32 x,
    qkv, attention, gate_up, then the hidden, attention and MLP activations' codes, scales and sums), the RoPE
    tables, the KV cache [layers, slots, 2, kv heads, positions, head dim] and each layer's weights (norm
    weights: input, attention sub-, post-attention, MLP sub-norm; then packed weights and scales of qkv,
    o_proj, gate_up, down). The arrays stay referenced while it lives."""
    dims = (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.intermediate_size, cache.shape[1], cache.shape[4], rows)
    return require().layer_stack(dims, config.rms_norm_eps, config.head_dim**-0.5, tuple(workspace), cos, sin, cache,
                                 list(weights))


def layers(stack, rows: int, segments: np.ndarray, path: int, threads: int, timings: np.ndarray | None = None) -> None:
    """Every decoder layer of a step over rows 0 .. rows - 1 of the stack's x, in place (segments as
    attention_step's). timings: None, or fp64 [len(LAYER_COMPONENTS), 3] that each component's wall seconds,
    calls and bytes read are added to."""
    require().layers(stack, rows, segments, len(segments), path, threads, timings)


def layer_components() -> tuple[str, ...]:
    """The components layers() times, in the rows of its timings."""
    return require().LAYER_COMPONENTS


def norm(x: np.ndarray, m: int, weight: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    """HF's RMSNorm of rows 0..m of x into out, in fp32."""
    _kernels.norm(x, x.shape[-1], m, weight.shape[0], False, weight, eps, out)
    return out


def weight_dtype(table: np.ndarray) -> int:
    return WEIGHT_DTYPES[table.dtype]


def head(table: np.ndarray, x: np.ndarray, m: int, out: np.ndarray, scales: np.ndarray | None = None,
         path: int | None = None, threads: int = 1) -> np.ndarray:
    """out [m, vocab] = x [m, k] @ table^T; table bf16 (as uint16) or fp32, in fp32 arithmetic (the same bits
    on every path and batch size), or int8 rows times scales: then x is quantised per token as the BitNet
    activations (absmax to int8) and the products are exact integers, / x's scale * scales."""
    path = path_number(path)
    vocab, k = table.shape
    _kernels.head(table, weight_dtype(table), scales, vocab, k, x, m, out, path, threads)
    return out


def quantize_head(table: np.ndarray, path: int | None = None, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-row int8 LM head: codes [vocab, k] (round half to even of value / scale) and fp32 scales (row absmax
    / 127), the same on every path."""
    vocab, k = table.shape
    codes, scales = aligned_array((vocab, k), np.int8), np.empty(vocab, dtype=np.float32)
    _kernels.quantize_head(table, weight_dtype(table), vocab, k, codes, scales, path_number(path), threads)
    return codes, scales
