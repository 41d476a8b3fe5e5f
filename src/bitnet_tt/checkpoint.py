"""BitNet checkpoints: find a model, read its safetensors, and turn any supported format into ternary weights.

Formats (see README):
- "bf16-master": HF latent weights (bf16/fp16/fp32), ternarised at load with the absmean rule;
- "packed":      HF offline checkpoint, uint8 [out/4, in] codes + `weight_scale` per projection;
- "converted":   ours (`bitnet-tt convert`), uint8 [out, in/4] codes + fp32 scale, in one file.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .config import ModelConfig, read_config_json, read_json_object, validate_schema
from .errors import CheckpointError, ModelNotFoundError
from .folders import partial_folder, publish, remove_stale_partials
from .ternary import TernaryWeight, holds_unused_code, pack_2bit, ternarize_absmean, unpack_2bit, unpack_hf

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
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _shard_name(name: str) -> str:
    """An index may name files in the model folder only, never a path elsewhere."""
    if Path(name).name != name or not name.endswith(".safetensors"):
        raise ValueError("should be the name of a .safetensors file in the model folder")
    return name


class SafetensorsIndex(BaseModel):
    """model.safetensors.index.json: which file holds each tensor."""

    model_config = ConfigDict(strict=True, extra="allow")
    weight_map: dict[str, Annotated[str, AfterValidator(_shard_name)]]


@dataclass
class LayerWeights:
    norms: dict[str, torch.Tensor]  # HF module path -> [width]
    projections: dict[str, TernaryWeight]  # HF module path -> ternary weight


@dataclass
class BitNetWeights:
    config: ModelConfig
    embed: torch.Tensor  # [vocab, hidden]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor | None  # [vocab, hidden]; None when tied to the embedding
    layers: list[LayerWeights] = field(default_factory=list)
    source_format: str = ""


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


class TensorFiles:
    """Name -> tensor over one or several safetensors files; every error names the file.

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
                handle = safe_open(str(path), framework="pt")
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

    def get(self, name: str, shape: tuple[int, ...] | None = None, dtypes=None, into: np.ndarray | None = None) -> torch.Tensor:
        """A checked tensor, in its own memory or, with `into` (a uint8 buffer reused from call to call, so that
        no fresh pages are touched per tensor), in the front of that buffer."""
        if name not in self.file_of:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing")
        path = self.file_of[name]
        self._open(path)
        data_start, header = self._headers[path]
        if name not in header:
            raise CheckpointError(f"{path}: tensor '{name}' is missing (the index lists it here)")
        entry = header[name]
        dtype = STORED_DTYPES.get(entry["dtype"])
        if shape is not None and tuple(entry["shape"]) != tuple(shape):
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(entry['shape'])}, expected {list(shape)}")
        if dtype is None or (dtypes is not None and dtype not in dtypes):
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes or STORED_DTYPES.values())
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype "
                                  f"{str(dtype or entry['dtype']).removeprefix('torch.')} (expected {names})")
        if into is None:
            tensor = torch.empty(entry["shape"], dtype=dtype)
        else:  # sized by the shape: read_tensor refuses data offsets that disagree with it
            size = math.prod(entry["shape"]) * dtype.itemsize
            tensor = torch.from_numpy(into[:size]).view(dtype).reshape(entry["shape"])
        read_tensor(path, name, data_start, entry, tensor)
        self.read_names.add(name)
        if self.expected_sha256 is not None and tensor_sha256(tensor) != self.expected_sha256.get(name):
            raise CheckpointError(f"{path}: tensor '{name}' does not match the checksum recorded when it was "
                                  "converted; the file has been modified")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(f"{path}: tensor '{name}' holds NaN or infinite values")
        return tensor

    def check_stored(self, name: str, chunk_bytes: int = 1 << 21) -> None:
        """The checks get() makes (recorded checksum, finite values), for a tensor that is used straight from
        the file (memory-mapped) instead of read: plain reads a chunk at a time into one buffer (cache-sized,
        so hashing reads it from cache), so the file's pages never count as ours."""
        path = self.file_of[name]
        self._open(path)
        data_start, header = self._headers[path]
        entry = header[name]
        dtype = STORED_DTYPES.get(entry["dtype"])
        start, end = entry["data_offsets"]
        digest, finite = hashlib.sha256(), True
        # An anonymous mapping, not malloc: freeing a large malloc'd block raises glibc's mmap threshold, and
        # the loader's later mid-sized allocations would then stay resident in the heap after they are freed.
        chunk, scratch = (np.frombuffer(mmap.mmap(-1, min(chunk_bytes, end - start)), np.uint8) for _ in range(2))
        with open(path, "rb", buffering=0) as f:
            f.seek(data_start + start)
            for offset in range(start, end, chunk_bytes):  # a multiple of every element size
                size = min(chunk_bytes, end - offset)
                if f.readinto(memoryview(chunk)[:size]) != size:
                    raise CheckpointError(f"{path}: tensor '{name}' is truncated")
                digest.update(chunk[:size])
                finite = finite and (not dtype.is_floating_point or all_finite_bits(chunk[:size], dtype, scratch))
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


STORED_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}
DTYPE_NAMES = {dtype: name for name, dtype in STORED_DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


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


def read_tensor(path: Path, name: str, data_start: int, entry: dict, tensor: torch.Tensor) -> None:
    """One tensor's bytes read with plain file reads into `tensor` (its size).

    Not through safetensors' memory map: every page read from a mapped file stays counted in the
    process's memory while the map lives, which raises the peak while a checkpoint loads.
    """
    start, end = entry["data_offsets"]
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    with open(path, "rb", buffering=0) as f:
        f.seek(data_start + start)
        if raw.nbytes != end - start or f.readinto(raw) != end - start:
            raise CheckpointError(f"{path}: tensor '{name}' is truncated")


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (hashlib releases the GIL on large buffers)."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity anywhere: min and max propagate both, and cost a tenth of isfinite().all()."""
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def all_finite_bits(chunk: np.ndarray, dtype: torch.dtype, scratch: np.ndarray) -> bool:
    """all_finite of a chunk of stored bytes, in numpy with no temporary but `scratch` (as large as the chunk):
    PyTorch's reductions start its thread pool, which crawls on a busy machine, and the mapped tables' checks
    cover a whole table chunk by chunk."""
    if dtype == torch.bfloat16:  # not finite: all exponent bits set
        bits = chunk.view(np.uint16)
        return int(np.bitwise_and(bits, 0x7FFF, out=scratch.view(np.uint16)[: len(bits)]).max(initial=0)) < 0x7F80
    values = chunk.view({torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[dtype])
    return bool(np.isfinite(values.min(initial=0)) and np.isfinite(values.max(initial=0)))


# ---------------------------------------------------------------------------------------------
# Loading


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


def load_weights(folder: Path, progress: bool = True) -> BitNetWeights:
    """Read a BitNet model folder in any supported format into ternary weights.

    Every value is checked (finite floats, positive scales, codes in range, no tensor too many or too few);
    a converted model must also match the checksums recorded when it was written.
    """
    config, files, fmt = open_model(folder)
    read_projection = PROJECTION_READERS[fmt]

    h, vocab = config.hidden_size, config.vocab_size
    embed = files.get("model.embed_tokens.weight", (vocab, h), FLOAT_DTYPES)
    weights = BitNetWeights(
        config=config,
        embed=embed,
        final_norm=files.get("model.norm.weight", (h,), FLOAT_DTYPES),
        lm_head=_read_lm_head(files, config),
        source_format=fmt,
    )
    bar = tqdm(range(config.num_layers), desc=f"loading {fmt} weights", unit="layer", disable=not progress or None, leave=False)
    for i in bar:
        prefix = f"model.layers.{i}."
        norms = {name: files.get(prefix + name + ".weight", (width,), FLOAT_DTYPES) for name, width in config.norm_shapes().items()}
        projections = {name: _checked_scale(files, prefix + name, read_projection(files, prefix + name, shape, config))
                       for name, shape in config.projection_shapes().items()}
        weights.layers.append(LayerWeights(norms, projections))
    files.check_all_read()
    return weights


def _checked_scale(files: TensorFiles, name: str, weight: TernaryWeight) -> TernaryWeight:
    check_scale(files, name, float(weight.scale))
    return weight


def check_scale(files: TensorFiles, name: str, scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{files.folder}: '{name}' has the scale {scale}; a scale must be finite and positive")


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


def _read_lm_head(files: TensorFiles, config: ModelConfig) -> torch.Tensor | None:
    if "lm_head.weight" in files:
        return files.get("lm_head.weight", (config.vocab_size, config.hidden_size), FLOAT_DTYPES)
    if config.tie_word_embeddings:
        return None
    raise CheckpointError(f"{files.folder}: no lm_head.weight and tie_word_embeddings is false; the LM head is missing")


def _read_master(files: TensorFiles, name: str, shape, config: ModelConfig) -> TernaryWeight:
    return ternarize_absmean(files.get(name + ".weight", shape, FLOAT_DTYPES))


def _read_packed(files: TensorFiles, name: str, shape, config: ModelConfig) -> TernaryWeight:
    out, inp = shape
    if out % 4:
        raise CheckpointError(f"{files.folder}: '{name}' has {out} output rows, not a multiple of 4, so it cannot be packed")
    packed = files.get(name + ".weight", (out // 4, inp), (torch.uint8, torch.int8))
    stored = files.get(name + ".weight_scale", (1,), FLOAT_DTYPES).float().reshape(())
    packed = packed.view(torch.uint8)
    if holds_unused_code(packed):
        raise CheckpointError(f"{files.file_of[name + '.weight']}: '{name}.weight' holds the unused 2-bit code 3")
    codes = unpack_hf(packed)
    # autobitlinear multiplies by weight_scale; bitlinear divides by it (see notes on checkpoints).
    scale = stored if config.linear_class == "autobitlinear" else 1.0 / stored
    return TernaryWeight(codes, scale)


def _read_converted(files: TensorFiles, name: str, shape, config: ModelConfig) -> TernaryWeight:
    out, inp = shape
    packed = files.get(name + ".packed", (out, inp // 4), (torch.uint8,))
    scale = files.get(name + ".scale", (), (torch.float32,))
    if holds_unused_code(packed):
        raise CheckpointError(f"{files.file_of[name + '.packed']}: '{name}.packed' holds the unused 2-bit code 3")
    return TernaryWeight(unpack_2bit(packed), scale)


# format -> read_projection(files, name, [out, in], config) -> TernaryWeight (the CPU backend reads layer by layer)
PROJECTION_READERS = {"bf16-master": _read_master, "packed": _read_packed, "converted": _read_converted}


# ---------------------------------------------------------------------------------------------
# Converting


def convert_checkpoint(src: Path, dst: Path, force: bool = False, progress: bool = True) -> Path:
    """Write SRC as our compact format in DST, atomically: DST appears only once complete.

    The same input always gives byte-identical output. SRC is only read. DST is published in one step that
    fails if another conversion got there first, or (force) swaps an earlier conversion out in one step.
    Partial folders that killed conversions left beside DST are removed first.
    """
    src, dst = Path(src), Path(dst)
    _check_destination(src, dst, force)
    remove_stale_partials(dst)
    _check_inner_dims(ModelConfig.from_folder(src), src)
    weights = load_weights(src, progress=progress)
    side_files = {name: data for name in SIDE_FILES if (data := read_optional_bytes(src / name)) is not None}
    try:
        partial = partial_folder(dst)
        try:
            _write_converted(weights, side_files, partial)
            publish(partial, dst, replaceable=is_converted_model if force else None)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # the new model if it was not published, else the old one
    except FileExistsError:
        problem = ("exists and is not a converted model; refusing to replace it" if force else
                   "already exists (another conversion finished first?); pass --force to replace an earlier conversion")
        raise CheckpointError(f"{dst}: {problem}") from None
    except OSError as exc:
        raise CheckpointError(f"{dst}: cannot write the converted model ({exc.strerror or exc})") from None
    return dst


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    """DST may replace nothing but an earlier conversion, and may neither hold nor lie inside the source."""
    try:  # a hub snapshot's files are links into the cache's blob store: where they point counts as the source
        sources = [src.resolve(), *(f.resolve() for f in src.iterdir())]
    except OSError:
        sources = [src.resolve()]  # unreadable: loading it reports the problem
    target = dst.resolve()
    if any(target == s or target in s.parents or s in target.parents for s in sources):
        raise CheckpointError(f"{dst}: overlaps the source {src}; the destination must not be the source folder, "
                              "be inside it or contain it")
    if dst.is_symlink():
        raise CheckpointError(f"{dst}: is a symbolic link; give the folder it points to")
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists (pass --force to replace it)")
    if dst.exists() and not is_converted_model(dst):
        raise CheckpointError(f"{dst}: exists and is not a converted model; refusing to replace it")


def is_converted_model(folder: Path) -> bool:
    """Whether `folder` holds a model written by `bitnet-tt convert` (any version): what --force may replace."""
    try:
        metadata = read_header(folder / CONVERTED_FILE)[1].get("__metadata__")
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and str(metadata.get("format", "")).startswith("bitnet-tt-ternary-")


def _write_converted(weights: BitNetWeights, side_files: dict[str, bytes], partial: Path) -> None:
    """The tensors in one safetensors file whose metadata records the sha256 of every tensor and copied file."""
    for name, data in side_files.items():
        (partial / name).write_bytes(data)
    tensors = _converted_tensors(weights)
    checksums = {"tensors": {name: tensor_sha256(t) for name, t in tensors.items()},
                 "files": {name: hashlib.sha256(data).hexdigest() for name, data in side_files.items()}}
    metadata = {"format": CONVERTED_FORMAT, CHECKSUMS_KEY: json.dumps(checksums, sort_keys=True)}
    write_safetensors(partial / CONVERTED_FILE, tensors, metadata)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written byte for byte the same every time (the library orders metadata by hash).

    Widest dtypes first, after a header padded to 8 bytes: every tensor starts aligned to its element size.
    """
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in names:
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())


def _check_inner_dims(config: ModelConfig, src: Path) -> None:
    for name, (_, inp) in config.projection_shapes().items():
        if inp % 4:
            raise CheckpointError(f"{src}: '{name}' has {inp} inputs, not a multiple of 4; cannot convert")


def _converted_tensors(weights: BitNetWeights) -> dict[str, torch.Tensor]:
    tensors = {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.final_norm}
    if weights.lm_head is not None:
        tensors["lm_head.weight"] = weights.lm_head
    for i, layer in enumerate(weights.layers):
        prefix = f"model.layers.{i}."
        for name, norm in layer.norms.items():
            tensors[prefix + name + ".weight"] = norm
        for name, proj in layer.projections.items():
            tensors[prefix + name + ".packed"] = pack_2bit(proj.codes)
            tensors[prefix + name + ".scale"] = proj.scale.float().reshape(()).clone()
    return {k: v.contiguous() for k, v in tensors.items()}


def describe_folder(folder: Path) -> dict:
    """What a model folder holds, for `bitnet-tt info`."""
    folder = Path(folder)
    raw = read_config_json(folder)
    config = ModelConfig.from_hf_dict(raw, str(folder / "config.json"))
    files = TensorFiles(folder)
    weight_files = sorted({p for p in files.file_of.values()})
    return {
        "folder": str(folder),
        "format": detect_format(files),
        "config": config.to_dict(),
        "quantization_config": raw.get("quantization_config"),
        "weight_files": {p.name: p.stat().st_size for p in weight_files if p.exists()},
        "tensors": len(files.file_of),
        "tokenizer": [n for n in ("tokenizer.json", "tokenizer_config.json") if (folder / n).is_file()],
    }
