"""BitNet checkpoints: find a model, read its safetensors, and turn any supported format into ternary weights.

Formats (see README):
- "bf16-master": HF latent weights (bf16/fp16/fp32), ternarised at load with the absmean rule;
- "packed":      HF offline checkpoint, uint8 [out/4, in] codes + `weight_scale` per projection;
- "converted":   ours (`bitnet-tt convert`), uint8 [out, in/4] codes + fp32 scale, in one file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .config import ModelConfig, read_config_json, read_json_object, validate_schema
from .errors import CheckpointError, ModelNotFoundError
from .ternary import TernaryWeight, holds_unused_code, pack_2bit, ternarize_absmean, unpack_2bit, unpack_hf

CONVERTED_FILE = "bitnet-tt.safetensors"
CONVERTED_FORMAT = "bitnet-tt-ternary-v1"
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
    """Name -> tensor over one or several safetensors files; every error names the file."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self.file_of = self._map_names()

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
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
            self._handles[path] = handle
            self._headers[path] = read_header(path)
        return self._handles[path]

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def metadata(self) -> dict:
        path = next(iter(self.file_of.values()), None)
        return (self._open(path).metadata() or {}) if path else {}

    def get(self, name: str, shape: tuple[int, ...] | None = None, dtypes=None) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing")
        path = self.file_of[name]
        handle = self._open(path)
        if name not in handle.keys():
            raise CheckpointError(f"{path}: tensor '{name}' is missing (the index lists it here)")
        data_start, header = self._headers[path]
        tensor = read_tensor(path, name, data_start, header[name])
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(tensor.shape)}, expected {list(shape)}")
        if dtypes is not None and tensor.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {str(tensor.dtype).removeprefix('torch.')} (expected {names})")
        return tensor


STORED_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data, the JSON header) of a safetensors file that safe_open has validated."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return 8 + header_len, json.loads(f.read(header_len))


def read_tensor(path: Path, name: str, data_start: int, entry: dict) -> torch.Tensor:
    """One tensor read with plain file reads into its own memory.

    Not through safetensors' memory map: every page read from a mapped file stays counted in the
    process's memory while the map lives, which raises the peak while a checkpoint loads.
    """
    dtype = STORED_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {entry['dtype']}")
    start, end = entry["data_offsets"]
    tensor = torch.empty(entry["shape"], dtype=dtype)
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    with open(path, "rb") as f:
        f.seek(data_start + start)
        if raw.nbytes != end - start or f.readinto(raw) != end - start:
            raise CheckpointError(f"{path}: tensor '{name}' is truncated")
    return tensor


# ---------------------------------------------------------------------------------------------
# Loading


def detect_format(files: TensorFiles) -> str:
    if CONVERTED_FILE in {p.name for p in files.file_of.values()}:
        fmt = files.metadata().get("format")
        if fmt != CONVERTED_FORMAT:
            raise CheckpointError(f"{files.folder / CONVERTED_FILE}: format tag {fmt!r}, expected {CONVERTED_FORMAT!r}")
        return "converted"
    if "model.layers.0.self_attn.q_proj.weight_scale" in files:
        return "packed"
    return "bf16-master"


def load_weights(folder: Path, progress: bool = True) -> BitNetWeights:
    """Read a BitNet model folder in any supported format into ternary weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such model folder")
    config = ModelConfig.from_folder(folder)
    files = TensorFiles(folder)
    fmt = detect_format(files)
    read_projection = {"bf16-master": _read_master, "packed": _read_packed, "converted": _read_converted}[fmt]

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
        projections = {
            name: read_projection(files, prefix + name, shape, config) for name, shape in config.projection_shapes().items()
        }
        weights.layers.append(LayerWeights(norms, projections))
    return weights


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


# ---------------------------------------------------------------------------------------------
# Converting


def convert_checkpoint(src: Path, dst: Path, force: bool = False, progress: bool = True) -> Path:
    """Write SRC as our compact format in DST, atomically: DST appears only once complete.

    The same input always gives byte-identical output. SRC is only read.
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise CheckpointError(f"{dst}: the destination must not be the source folder or inside it")
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists (pass --force to replace it)")
    if dst.exists() and not (dst / CONVERTED_FILE).is_file():
        raise CheckpointError(f"{dst}: exists and is not a converted model; refusing to replace it")
    _check_inner_dims(ModelConfig.from_folder(src), src)
    weights = load_weights(src, progress=progress)

    partial = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        save_file(_converted_tensors(weights), str(partial / CONVERTED_FILE), metadata={"format": CONVERTED_FORMAT})
        os.chmod(partial / CONVERTED_FILE, partial.stat().st_mode & 0o666)  # as a new file under the umask
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, partial / name)
        _swap_into_place(partial, dst)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dst


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


def _swap_into_place(partial: Path, dst: Path) -> None:
    """Rename the finished folder to dst; an old dst is moved aside first and removed only afterwards."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        dst.rename(old)
    partial.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


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
