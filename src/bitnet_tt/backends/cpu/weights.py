"""The CPU backend's weights: ternary projections in the kernels' 2-bit layout, the embedding mapped from
the safetensors file, the LM head in bf16 (as stored) or int8 per row.

Layers are read one at a time: a converted or packed checkpoint's 2-bit codes are repacked without ever
becoming int8 (a packed one's bytes are first rearranged into the converted layout); bf16 master weights
are quantised one projection at a time (checkpoint.PROJECTION_READERS, in torch: only that format imports
it).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...config import ModelConfig
from ...errors import BitNetError, CheckpointError
from ...tensorfiles import FLOAT_DTYPES, TensorFiles, check_scale, float32, open_model, packed_projection, read_header
from .kernels import PackedTernary, aligned_array, quantize_head

LM_HEAD_DTYPES = ("bf16", "int8")
# Projections that share an input run as one matmul; their rows are concatenated in this order.
FUSED = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


@dataclass
class Projection:
    weight: PackedTernary
    scale: np.ndarray  # fp32 [out]: each output row's weight scale


@dataclass
class Layer:
    norms: dict[str, np.ndarray]  # HF module path -> fp32 [width]
    projections: dict[str, Projection]  # FUSED key -> projection


@dataclass
class CPUWeights:
    config: ModelConfig
    embed: np.ndarray  # [vocab, hidden]: bf16 bits as uint16 (memory-mapped) or fp32
    head: np.ndarray  # [vocab, hidden]: like embed, or int8 codes
    head_scales: np.ndarray | None  # fp32 [vocab] for an int8 head
    final_norm: np.ndarray
    layers: list[Layer]
    embed_rows: TableRows | None = None  # reads embedding rows when the head is not the embedding (int8)

    def code_bytes(self) -> int:
        return sum(p.weight.data.nbytes for layer in self.layers for p in layer.projections.values())


def load_cpu_weights(folder: Path, lm_head: str = "bf16", progress: bool = True, threads: int = 1) -> CPUWeights:
    if lm_head not in LM_HEAD_DTYPES:
        raise BitNetError(f"unknown LM head dtype {lm_head!r} (choose from {', '.join(LM_HEAD_DTYPES)})")
    config, files, fmt = open_model(folder)  # every tensor read or mapped is checked (check_stored)
    shape = (config.vocab_size, config.hidden_size)
    with ThreadPoolExecutor(max_workers=1) as background:  # checking the mapped tables overlaps reading the layers
        checks = []
        check = lambda name: checks.append(background.submit(files.check_stored, name))
        embed = mapped_table(files, "model.embed_tokens.weight", shape, check)
        head = embed if "lm_head.weight" not in files and config.tie_word_embeddings else None
        if head is None:
            if "lm_head.weight" not in files:
                raise CheckpointError(f"{folder}: no lm_head.weight and tie_word_embeddings is false; the LM head is missing")
            head = mapped_table(files, "lm_head.weight", shape, check)
        head_scales = None
        if lm_head == "int8":
            head, head_scales = int8_head(head, threads)
        embed_rows = TableRows.of(embed, files.file_of["model.embed_tokens.weight"]) if head is not embed else None
        staging = np.empty(max(fused_codes_bytes(config).values()), np.uint8) if fmt != "bf16-master" else None
        layers = []
        for i in tqdm(range(config.num_layers), desc=f"loading {fmt} weights", unit="layer",
                      disable=not progress or None, leave=False):
            layers.append(read_layer(files, fmt, config, f"model.layers.{i}.", threads, staging))
        final_norm = float_vector(files, "model.norm.weight", config.hidden_size)
        for done in checks:
            done.result()  # raises the check's CheckpointError
    files.check_all_read()
    return CPUWeights(config, embed, head, head_scales, final_norm, layers, embed_rows)


def fused_codes_bytes(config: ModelConfig) -> dict[str, int]:
    """Bytes of each fused projection's 2-bit codes in the converted layout (inputs padded to 4)."""
    shapes = config.projection_shapes()
    return {key: sum(shapes[n][0] * -(-shapes[n][1] // 4) for n in names) for key, names in FUSED.items()}


def read_layer(files: TensorFiles, fmt: str, config: ModelConfig, prefix: str, threads: int,
               staging: np.ndarray | None) -> Layer:
    """One layer; a converted or packed checkpoint's codes pass through `staging` (reused for every projection)."""
    shapes = config.projection_shapes()
    norms = {name: float_vector(files, prefix + name + ".weight", width) for name, width in config.norm_shapes().items()}
    projections = {}
    for key, names in FUSED.items():
        k = shapes[names[0]][1]
        if fmt == "bf16-master":
            from ...checkpoint import PROJECTION_READERS  # torch, for this format only

            read = [PROJECTION_READERS[fmt](files, prefix + n, shapes[n], config) for n in names]
            scales = [float(w.scale) for w in read]
            weight = PackedTernary.from_codes(np.concatenate([w.codes.numpy() for w in read]), threads)
        else:  # 2-bit codes in the converted layout, rows of the fused projection in order
            at, scales = 0, []
            for n in names:
                out, inp = shapes[n]
                flat = staging[at: at + out * -(-inp // 4)]
                if fmt == "converted":
                    files.get(prefix + n + ".packed", (out, inp // 4), ("U8",), into=flat)
                    scales.append(float(files.get(prefix + n + ".scale", (), ("F32",))))
                else:
                    packed, scale = packed_projection(files, prefix + n, shapes[n], config.linear_class)
                    hf_to_2bit(packed, flat.reshape(out, -1))
                    scales.append(float(scale))
                at += flat.size
            weight = PackedTernary.from_2bit(staging[:at].reshape(-1, -(-k // 4)), threads, k=k)
        for n, s in zip(names, scales):
            check_scale(files, prefix + n, s)
        rows = [shapes[n][0] for n in names]
        scale = np.concatenate([np.full(r, s, dtype=np.float32) for r, s in zip(rows, scales)])
        projections[key] = Projection(weight, scale)
    return Layer(norms, projections)


def hf_to_2bit(packed: np.ndarray, rows: np.ndarray) -> None:
    """Hugging Face's packed bytes [out/4, in] into the converted layout `rows` [out, ceil(in/4)] (byte q of a
    row: inputs 4q..4q+3 in bits 0, 2, 4, 6; missing inputs padded with code + 1 = 1, a zero weight). Read as
    little-endian words of 4 inputs, field s of every byte is gathered from bits 8t..8t+1 into bits 2t..2t+1:
    a few whole-array operations instead of expanding 4 codes per byte."""
    quarter, inputs = packed.shape
    if inputs % 4:
        packed = np.pad(packed, ((0, 0), (0, -inputs % 4)), constant_values=0x55)
    words = np.ascontiguousarray(packed).view("<u4")
    fields, moved = np.empty_like(words), np.empty_like(words)
    for s in range(4):
        np.right_shift(words, 2 * s, out=fields)
        np.bitwise_and(fields, 0x03030303, out=fields)
        for shift in (6, 12):  # bits 8, 16, 24 -> 2, (10), 18 -> 2, 4, 6
            np.right_shift(fields, shift, out=moved)
            np.bitwise_or(fields, moved, out=fields)
        np.copyto(rows[s * quarter:(s + 1) * quarter], fields, casting="unsafe")  # the low byte


def float_vector(files: TensorFiles, name: str, width: int) -> np.ndarray:
    return float32(files.get(name, (width,), FLOAT_DTYPES))


def mapped_table(files: TensorFiles, name: str, shape: tuple[int, int], check: Callable[[str], None]) -> np.ndarray:
    """A [vocab, hidden] table: bf16 (as uint16) or fp32 mapped from the file with random-access advice, so
    that only the rows tokens touch become resident (its checks handed to `check`); fp16 is read and widened
    to fp32."""
    if name not in files:
        raise CheckpointError(f"{files.folder}: tensor '{name}' is missing")
    path = files.file_of[name]
    data_start, header = read_header(path)
    entry = header.get(name)
    dtype = {"BF16": np.uint16, "F32": np.float32}.get(entry["dtype"]) if entry else None
    if dtype is None:
        return float32(files.get(name, shape, ("F16",)))
    begin, end = entry["data_offsets"]
    if list(entry["shape"]) != list(shape) or end - begin != shape[0] * shape[1] * np.dtype(dtype).itemsize:
        raise CheckpointError(f"{path}: tensor '{name}' has shape {entry['shape']}, expected {list(shape)}")
    check(name)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mapping.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapping, dtype=dtype, count=shape[0] * shape[1], offset=data_start + begin).reshape(shape)


def int8_head(table: np.ndarray, threads: int = 1, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The LM head as int8 rows, quantised a chunk at a time; a mapped table's pages are dropped after each
    chunk (clean file pages, read again if a token's row is needed), so the bf16 head is never resident whole."""
    codes, scales = aligned_array(table.shape, np.int8), np.empty(table.shape[0], np.float32)
    mapping = mapping_of(table)
    for start in range(0, table.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        codes[rows], scales[rows] = quantize_head(table[rows], threads=threads)
        if mapping is not None:
            drop_pages(mapping, table[rows])
    return codes, scales


class TableRows:
    """A mapped table's rows read with file reads: a page fault on the mapping maps a whole folio of the page
    cache (up to 2 MB, hundreds of rows: 128 random tokens faulted 0.24 GB in before their pages were dropped)."""

    def __init__(self, path: Path, offset: int, row_bytes: int):
        self.file = open(path, "rb", buffering=0)
        self.offset, self.row_bytes = offset, row_bytes

    @classmethod
    def of(cls, table: np.ndarray, path: Path) -> TableRows | None:
        """Rows of a table mapped from `path` (None for one in the process's own memory)."""
        mapping = mapping_of(table)
        if mapping is None:
            return None
        offset = table.ctypes.data - np.frombuffer(mapping, np.uint8, count=1).ctypes.data  # mapped from 0
        return cls(path, offset, table.strides[0])

    def read(self, tokens: Sequence[int], out: np.ndarray) -> np.ndarray:
        """The tokens' rows into `out` [len(tokens), width] (the table's dtype)."""
        for row, token in zip(out, tokens):
            if os.preadv(self.file.fileno(), [row], self.offset + int(token) * self.row_bytes) != self.row_bytes:
                raise CheckpointError(f"{self.file.name}: the embedding table is truncated")
        return out[: len(tokens)]


def mapping_of(table: np.ndarray) -> mmap.mmap | None:
    """The file mapping a table views, or None for a table in the process's own memory."""
    base = table.base
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base


def drop_pages(mapping: mmap.mmap, rows: np.ndarray) -> None:
    start = rows.ctypes.data - np.frombuffer(mapping, np.uint8, count=1).ctypes.data
    aligned = start - start % mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, aligned, start + rows.nbytes - aligned)
