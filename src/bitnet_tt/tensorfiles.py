"""A model folder: found (local or on the hub), its safetensors files' tensors as checked numpy arrays, its format.

No torch here: the cpu backend loads, prefills and decodes without it (importing torch alone costs ~0.5 GB
of memory); checkpoint.py turns these arrays into torch tensors for the torch and ttnn backends.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints
from safetensors import SafetensorError, safe_open

from .config import ModelConfig, read_json_object, validate_schema
from .errors import CheckpointError, ModelNotFoundError

CONVERTED_FILE = "bitnet-tt.safetensors"
CONVERTED_FORMAT = "bitnet-tt-ternary-v2"  # v2 records checksums
UNCHECKED_FORMAT = "bitnet-tt-ternary-v1"
CHECKSUMS_KEY = "sha256"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files copied next to a converted checkpoint so that it is a complete model folder.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
# Stored dtype -> numpy dtype of the arrays read (numpy has no bfloat16: its bits come as uint16, which no
# other stored dtype maps to) and the name errors give.
STORED_DTYPES = {
    "BF16": (np.uint16, "bfloat16"), "F16": (np.float16, "float16"), "F32": (np.float32, "float32"),
    "F64": (np.float64, "float64"), "U8": (np.uint8, "uint8"), "I8": (np.int8, "int8"), "I16": (np.int16, "int16"),
    "I32": (np.int32, "int32"), "I64": (np.int64, "int64"),
}
FLOAT_DTYPES = ("BF16", "F16", "F32")  # what a model's float tensors may be stored as
FLOATING = ("BF16", "F16", "F32", "F64")  # what must hold finite values
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
FINITE_CHUNK_BYTES = 1 << 21  # finite checks of bfloat16 bits go a cache-sized chunk at a time
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Finding the model


def resolve_model(model: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or taken from the cache) with huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path}: is a file; --model expects a model folder or a hub id")
    text = str(model)
    if not HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{path}: no such model folder")
    return _download_from_hub(text)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # network, auth and cache errors all mean the same thing to the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelNotFoundError(
            f"{repo_id}: not a local folder, and it could not be fetched from the Hugging Face hub "
            f"(offline and not cached?): {reason}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Reading tensors


def _shard_name(name: str) -> str:
    """An index may name files in the model folder only, never a path elsewhere."""
    if Path(name).name != name or not name.endswith(".safetensors"):
        raise ValueError("should be the name of a .safetensors file in the model folder")
    return name


class SafetensorsIndex(BaseModel):
    """model.safetensors.index.json: which file holds each tensor."""

    model_config = ConfigDict(strict=True, extra="allow")
    weight_map: dict[str, Annotated[str, AfterValidator(_shard_name)]]


class TensorFiles:
    """Name -> array over one or several safetensors files; every error names the file.

    Every floating tensor read must be finite; with `expect_sha256`, every tensor read must match its checksum.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self.file_of = self._map_names()
        self.expected_sha256: dict[str, str] | None = None
        self.read_names: set[str] = set()

    def _map_names(self) -> dict[str, Path]:
        converted, index, single = (self.folder / n for n in (CONVERTED_FILE, INDEX_FILE, SINGLE_FILE))
        if converted.is_file():
            return {name: converted for name in self._open(converted).keys()}
        if index.is_file():
            raw = read_json_object(index, CheckpointError) or {}
            weight_map = validate_schema(SafetensorsIndex, raw, str(index), CheckpointError).weight_map
            return {name: self.folder / fname for name, fname in weight_map.items()}
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        raise CheckpointError(f"{self.folder}: no weights found (expected {SINGLE_FILE}, {INDEX_FILE} or {CONVERTED_FILE})")

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise CheckpointError(f"{path}: weights file listed in the index is missing")
            try:
                handle = safe_open(str(path), framework="numpy")  # names and metadata only: tensors are read below
                self._headers[path] = read_header(path)
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
            self._handles[path] = handle
        return self._handles[path]

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def metadata(self) -> dict:
        path = next(iter(self.file_of.values()), None)
        return (self._open(path).metadata() or {}) if path else {}

    def stored_dtype(self, name: str) -> str:
        """The tensor's dtype as the file names it ("BF16", "U8", ...)."""
        return self._checked_entry(name)[2]["dtype"]

    def nbytes(self, name: str, shape: tuple[int, ...] | None = None, dtypes: tuple[str, ...] | None = None) -> int:
        """The bytes get() reads for the tensor, after the checks of its header entry that get() makes."""
        entry = self._checked_entry(name, shape, dtypes)[2]
        return math.prod(entry["shape"]) * np.dtype(STORED_DTYPES[entry["dtype"]][0]).itemsize

    def _checked_entry(self, name: str, shape: tuple[int, ...] | None = None,
                       dtypes: tuple[str, ...] | None = None) -> tuple[Path, int, dict]:
        """(file, offset of its data, header entry) of a tensor there, of `shape` and one of `dtypes` if given."""
        if name not in self.file_of:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing")
        path = self.file_of[name]
        self._open(path)
        data_start, header = self._headers[path]
        if name not in header:
            raise CheckpointError(f"{path}: tensor '{name}' is missing (the index lists it here)")
        entry = header[name]
        stored = entry["dtype"]
        if shape is not None and tuple(entry["shape"]) != tuple(shape):
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(entry['shape'])}, expected {list(shape)}")
        if stored not in STORED_DTYPES or (dtypes is not None and stored not in dtypes):
            names = ", ".join(STORED_DTYPES[d][1] for d in dtypes or STORED_DTYPES)
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype "
                                  f"{STORED_DTYPES.get(stored, (None, stored))[1]} (expected {names})")
        return path, data_start, entry

    def get(self, name: str, shape: tuple[int, ...] | None = None, dtypes: tuple[str, ...] | None = None,
            into: np.ndarray | None = None) -> np.ndarray:
        """A checked array (bfloat16 as its uint16 bits), of one of the stored `dtypes` ("U8", FLOAT_DTYPES, ...),
        in its own memory or, with `into` (a uint8 buffer reused from call to call, so that no fresh pages are
        touched per tensor), in the front of that buffer."""
        path, data_start, entry = self._checked_entry(name, shape, dtypes)
        stored = entry["dtype"]
        dtype = np.dtype(STORED_DTYPES[stored][0])
        if into is None:
            array = np.empty(entry["shape"], dtype)
        else:  # sized by the shape: read_into refuses data offsets that disagree with it
            array = into[: math.prod(entry["shape"]) * dtype.itemsize].view(dtype).reshape(entry["shape"])
        read_into(path, name, data_start, entry, array)
        self.read_names.add(name)
        if self.expected_sha256 is not None and array_sha256(array) != self.expected_sha256.get(name):
            raise CheckpointError(f"{path}: tensor '{name}' does not match the checksum recorded when it was "
                                  "converted; the file has been modified")
        if stored in FLOATING and not all_finite(array):
            raise CheckpointError(f"{path}: tensor '{name}' holds NaN or infinite values")
        return array

    def check_stored(self, name: str, chunk_bytes: int = FINITE_CHUNK_BYTES) -> None:
        """The checks get() makes (recorded checksum, finite values), for a tensor that is used straight from
        the file (memory-mapped) instead of read: plain reads a chunk at a time into one buffer (cache-sized,
        so hashing reads it from cache), so the file's pages never count as ours."""
        path = self.file_of[name]
        self._open(path)
        data_start, header = self._headers[path]
        entry = header[name]
        dtype = np.dtype(STORED_DTYPES[entry["dtype"]][0])
        start, end = entry["data_offsets"]
        digest, finite = hashlib.sha256(), True
        chunk = np.frombuffer(mmap.mmap(-1, min(chunk_bytes, end - start)), np.uint8)  # not malloc: see all_finite
        with open(path, "rb", buffering=0) as f:
            f.seek(data_start + start)
            for offset in range(start, end, chunk_bytes):  # a multiple of every element size
                size = min(chunk_bytes, end - offset)
                if f.readinto(memoryview(chunk)[:size]) != size:
                    raise CheckpointError(f"{path}: tensor '{name}' is truncated")
                digest.update(chunk[:size])
                finite = finite and (entry["dtype"] not in FLOATING or all_finite(chunk[:size].view(dtype)))
        self.read_names.add(name)
        if self.expected_sha256 is not None and digest.hexdigest() != self.expected_sha256.get(name):
            raise CheckpointError(f"{path}: tensor '{name}' does not match the checksum recorded when it was "
                                  "converted; the file has been modified")
        if not finite:
            raise CheckpointError(f"{path}: tensor '{name}' holds NaN or infinite values")

    def check_all_read(self) -> None:
        """Tensors nobody asked for mean a different model (or a damaged one): refuse them."""
        unread = sorted(set(self.file_of) - self.read_names)
        if unread:
            more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
            raise CheckpointError(f"{self.folder}: holds tensors this model does not have: {', '.join(unread[:3])}{more}")


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data, the JSON header) of a safetensors file."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_HEADER_BYTES:
            raise ValueError(f"a header of {header_len} bytes")
        header = json.loads(f.read(header_len))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return 8 + header_len, header


def read_into(path: Path, name: str, data_start: int, entry: dict, array: np.ndarray) -> None:
    """One tensor's bytes read with plain file reads into `array` (its size).

    Not through safetensors' memory map: every page read from a mapped file stays counted in the
    process's memory while the map lives, which raises the peak while a checkpoint loads.
    """
    start, end = entry["data_offsets"]
    raw = array.reshape(-1).view(np.uint8)
    with open(path, "rb", buffering=0) as f:
        f.seek(data_start + start)
        if raw.nbytes != end - start or f.readinto(raw) != end - start:
            raise CheckpointError(f"{path}: tensor '{name}' is truncated")


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's bytes as stored (hashlib releases the GIL on large buffers)."""
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity anywhere in a float array or bfloat16 bits (uint16), with no temporary larger than
    a chunk: min and max propagate NaN; bfloat16 is not finite when all its exponent bits are set."""
    if array.dtype != np.uint16:
        return bool(np.isfinite(array.min(initial=0)) and np.isfinite(array.max(initial=0)))
    bits, step = array.reshape(-1), FINITE_CHUNK_BYTES // 2
    # An anonymous mapping, not malloc: freeing a large malloc'd block raises glibc's mmap threshold, and
    # the loader's later mid-sized allocations would then stay resident in the heap after they are freed.
    scratch = np.frombuffer(mmap.mmap(-1, max(1, min(step, len(bits))) * 2), np.uint16)
    return all(int(np.bitwise_and(bits[i : i + step], 0x7FFF, out=scratch[: len(bits[i : i + step])]).max()) < 0x7F80
               for i in range(0, len(bits), step))


def float32(array: np.ndarray) -> np.ndarray:
    """A float array, or bfloat16 bits (uint16), as fp32 (exact)."""
    if array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def packed_projection(files: TensorFiles, name: str, shape: tuple[int, int], linear_class: str,
                      into: np.ndarray | None = None) -> tuple[np.ndarray, np.float32]:
    """Hugging Face's packed ternary projection `name` [out, in]: its bytes uint8 [out/4, in] (bits 2s..2s+1 of
    byte [r, i] hold row s * out/4 + r, input i, as code + 1) and the multiplier of its codes: autobitlinear
    multiplies by weight_scale, bitlinear divides by it (in fp32; a tiny scale overflows to inf, which
    check_scale refuses). `into`: as for TensorFiles.get."""
    out, inp = shape
    if out % 4:
        raise CheckpointError(f"{files.folder}: '{name}' has {out} output rows, not a multiple of 4, so it cannot be packed")
    packed = files.get(name + ".weight", (out // 4, inp), ("U8", "I8"), into=into).view(np.uint8)
    if holds_code_3(packed):
        raise CheckpointError(f"{files.file_of[name + '.weight']}: '{name}.weight' holds the unused 2-bit code 3")
    stored = float32(files.get(name + ".weight_scale", (1,), FLOAT_DTYPES)).reshape(())
    with np.errstate(over="ignore", divide="ignore"):
        return packed, stored if linear_class == "autobitlinear" else np.float32(1.0) / stored


def holds_code_3(packed: np.ndarray, piece: int = 1 << 16) -> bool:
    """Whether any 2-bit field of the bytes is 3, checked in pieces: whole-tensor temporaries raised glibc's mmap
    threshold, and the torch backend's peak RSS at 2B-4T shapes from 3.46 to 5.36 GB."""
    flat = packed.reshape(-1)
    return any((part & (part >> 1) & 0x55).any() for part in (flat[i:i + piece] for i in range(0, flat.size, piece)))


def check_scale(files: TensorFiles, name: str, scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{files.folder}: '{name}' has the scale {scale}; a scale must be finite and positive")


# ---------------------------------------------------------------------------------------------
# A model folder's format and recorded checksums


def detect_format(files: TensorFiles) -> str:
    if CONVERTED_FILE in {p.name for p in files.file_of.values()}:
        fmt = files.metadata().get("format")
        if fmt == UNCHECKED_FORMAT:
            raise CheckpointError(f"{files.folder}: converted by an earlier bitnet-tt that recorded no checksums; "
                                  "convert the model again")
        if fmt != CONVERTED_FORMAT:
            raise CheckpointError(f"{files.folder / CONVERTED_FILE}: format tag {fmt!r}, expected {CONVERTED_FORMAT!r}")
        return "converted"
    if "model.layers.0.self_attn.q_proj.weight_scale" in files:
        return "packed"
    return "bf16-master"


def open_model(folder: Path) -> tuple[ModelConfig, TensorFiles, str]:
    """A model folder's config, tensors and format; a converted model's files are checked against their
    recorded checksums here, and its tensors as they are read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such model folder")
    config = ModelConfig.from_folder(folder)
    files = TensorFiles(folder)
    fmt = detect_format(files)
    if fmt == "converted":
        files.expected_sha256 = verify_recorded_files(files)
    return config, files, fmt


Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class RecordedChecksums(BaseModel):
    """The sha256 of every tensor and every copied file, in a converted model's safetensors metadata."""

    model_config = ConfigDict(strict=True, extra="forbid")
    tensors: dict[str, Sha256]
    files: dict[str, Sha256]


def verify_recorded_files(files: TensorFiles) -> dict[str, str]:
    """Check a converted model's copied files against their recorded checksums; the tensors' checksums."""
    path = files.folder / CONVERTED_FILE
    try:
        raw = json.loads(files.metadata().get(CHECKSUMS_KEY, "null"))
    except json.JSONDecodeError:
        raw = None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: its recorded checksums are missing or damaged")
    recorded = validate_schema(RecordedChecksums, raw, f"{path} (recorded checksums)", CheckpointError)
    if set(recorded.tensors) != set(files.file_of):
        raise CheckpointError(f"{path}: its tensors are not the ones recorded when it was converted")
    for name in SIDE_FILES:
        side = files.folder / name
        data = read_optional_bytes(side)
        if data is None and name in recorded.files:
            raise CheckpointError(f"{side}: missing; it was part of the converted model")
        if data is not None and name not in recorded.files:
            raise CheckpointError(f"{side}: was not part of the converted model (no checksum recorded); remove it")
        if data is not None and hashlib.sha256(data).hexdigest() != recorded.files[name]:
            raise CheckpointError(f"{side}: does not match the checksum recorded when the model was converted; "
                                  "the file has been modified")
    return recorded.tensors


def read_optional_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None
