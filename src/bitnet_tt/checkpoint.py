"""BitNet checkpoints: find a model, read its safetensors, and turn any supported format into ternary weights.

Formats (see README):
- "bf16-master": HF latent weights (bf16/fp16/fp32), ternarised at load with the absmean rule;
- "packed":      HF offline checkpoint, uint8 [out/4, in] codes + `weight_scale` per projection;
- "converted":   ours (`bitnet-tt convert`), uint8 [out, in/4] codes + fp32 scale, in one file.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import ModelConfig, read_config_json
from .errors import CheckpointError
from .folders import partial_folder, publish, remove_stale_partials
from .tensorfiles import (
    CHECKSUMS_KEY,
    CONVERTED_FILE,
    CONVERTED_FORMAT,
    FLOAT_DTYPES,
    SIDE_FILES,
    TensorFiles,
    check_scale,
    detect_format,
    open_model,
    packed_projection,
    read_header,
    read_optional_bytes,
)
from .ternary import TernaryWeight, holds_unused_code, pack_2bit, ternarize_absmean, unpack_2bit, unpack_hf

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
# Reading tensors (tensorfiles.py reads them as numpy arrays)

TORCH_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def torch_tensor(files: TensorFiles, name: str, shape: tuple[int, ...] | None = None,
                 dtypes: tuple[str, ...] | None = None) -> torch.Tensor:
    """files.get() as a torch tensor (bfloat16 as itself, not its bits), read into memory torch allocates:
    numpy's allocations, freed between long-lived tensors, raised the torch backend's peak by 0.5 GB."""
    buffer = torch.empty(files.nbytes(name, shape, dtypes), dtype=torch.uint8)
    array = files.get(name, shape, dtypes, into=buffer.numpy())
    return buffer.view(TORCH_DTYPES[files.stored_dtype(name)]).reshape(array.shape)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (hashlib releases the GIL on large buffers)."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading


def load_weights(folder: Path, progress: bool = True) -> BitNetWeights:
    """Read a BitNet model folder in any supported format into ternary weights.

    Every value is checked (finite floats, positive scales, codes in range, no tensor too many or too few);
    a converted model must also match the checksums recorded when it was written.
    """
    config, files, fmt = open_model(folder)
    read_projection = PROJECTION_READERS[fmt]

    h, vocab = config.hidden_size, config.vocab_size
    embed = torch_tensor(files, "model.embed_tokens.weight", (vocab, h), FLOAT_DTYPES)
    weights = BitNetWeights(
        config=config,
        embed=embed,
        final_norm=torch_tensor(files, "model.norm.weight", (h,), FLOAT_DTYPES),
        lm_head=_read_lm_head(files, config),
        source_format=fmt,
    )
    bar = tqdm(range(config.num_layers), desc=f"loading {fmt} weights", unit="layer", disable=not progress or None, leave=False)
    for i in bar:
        prefix = f"model.layers.{i}."
        norms = {name: torch_tensor(files, prefix + name + ".weight", (width,), FLOAT_DTYPES) for name, width in config.norm_shapes().items()}
        projections = {name: _checked_scale(files, prefix + name, read_projection(files, prefix + name, shape, config))
                       for name, shape in config.projection_shapes().items()}
        weights.layers.append(LayerWeights(norms, projections))
    files.check_all_read()
    return weights


def _checked_scale(files: TensorFiles, name: str, weight: TernaryWeight) -> TernaryWeight:
    check_scale(files, name, float(weight.scale))
    release_freed_memory()
    return weight


def release_freed_memory() -> None:
    """Give the heap's freed temporaries back to the system. A projection's unpacking temporaries lie between
    the codes kept from earlier ones, so glibc cannot shrink its heap past them and keeps them otherwise:
    without this per projection the torch backend's peak RSS at 2B-4T shapes varied from 3.8 to 5.3 GB
    between machines (1.1-1.7 GB of freed temporaries); with it, 3.4 GB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _read_lm_head(files: TensorFiles, config: ModelConfig) -> torch.Tensor | None:
    if "lm_head.weight" in files:
        return torch_tensor(files, "lm_head.weight", (config.vocab_size, config.hidden_size), FLOAT_DTYPES)
    if config.tie_word_embeddings:
        return None
    raise CheckpointError(f"{files.folder}: no lm_head.weight and tie_word_embeddings is false; the LM head is missing")


def _read_master(files: TensorFiles, name: str, shape, config: ModelConfig) -> TernaryWeight:
    return ternarize_absmean(torch_tensor(files, name + ".weight", shape, FLOAT_DTYPES))


def _read_packed(files: TensorFiles, name: str, shape, config: ModelConfig) -> TernaryWeight:
    buffer = torch.empty(files.nbytes(name + ".weight"), dtype=torch.uint8)  # torch's memory: see torch_tensor
    packed, scale = packed_projection(files, name, shape, config.linear_class, into=buffer.numpy())
    return TernaryWeight(unpack_hf(torch.from_numpy(packed)), torch.from_numpy(np.asarray(scale, np.float32)))


def _read_converted(files: TensorFiles, name: str, shape, config: ModelConfig) -> TernaryWeight:
    out, inp = shape
    packed = torch_tensor(files, name + ".packed", (out, inp // 4), ("U8",))
    scale = torch_tensor(files, name + ".scale", (), ("F32",))
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
