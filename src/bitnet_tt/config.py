"""Model dimensions read from a Hugging Face BitNet config.json, validated once, derived values here."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from typing_extensions import TypedDict

from .errors import ConfigError

SUPPORTED_LINEAR_CLASSES = ("autobitlinear", "bitlinear")

# Upper bounds far above any released model; beyond them a config is damaged, not large.
MAX_VOCAB = 1 << 22
MAX_WIDTH = 1 << 18
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_POSITIONS = 1 << 20


def _bounded_int(high: int):
    return Annotated[int, Field(ge=1, le=high)]


def _as_list(value):
    """eos_token_id may be one id or a list of ids."""
    return [] if value is None else value if isinstance(value, list) else [value]


TokenId = Annotated[int, Field(ge=0, le=MAX_VOCAB)]
TokenIds = Annotated[list[TokenId], BeforeValidator(_as_list)]
RopeTheta = Annotated[float, Field(gt=1, le=1e12, allow_inf_nan=False)]


class _RopeParameters(TypedDict, total=False):
    rope_type: str
    type: str  # the older spelling of rope_type
    rope_theta: RopeTheta


class _QuantizationConfig(TypedDict, total=False):
    linear_class: Literal[SUPPORTED_LINEAR_CLASSES]
    use_rms_norm: Literal[False]


class HFConfigSchema(BaseModel):
    """The fields of config.json that bitnet-tt reads, with their types and ranges; other fields pass unchecked."""

    model_config = ConfigDict(strict=True, extra="allow")

    hidden_act: Literal["relu2"] = "relu2"
    attention_bias: Literal[False] = False
    mlp_bias: Literal[False] = False
    vocab_size: _bounded_int(MAX_VOCAB)
    hidden_size: _bounded_int(MAX_WIDTH)
    intermediate_size: _bounded_int(MAX_WIDTH)
    num_hidden_layers: _bounded_int(MAX_LAYERS)
    num_attention_heads: _bounded_int(MAX_HEADS)
    num_key_value_heads: _bounded_int(MAX_HEADS) | None = None
    head_dim: _bounded_int(MAX_WIDTH) | None = None
    rms_norm_eps: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 1e-6
    rope_theta: RopeTheta = 10000.0
    rope_parameters: _RopeParameters | None = None  # transformers 5
    rope_scaling: _RopeParameters | None = None  # transformers 4.x
    max_position_embeddings: _bounded_int(MAX_POSITIONS) = 2048
    tie_word_embeddings: bool = False
    bos_token_id: TokenId | None = None
    eos_token_id: TokenIds = []
    quantization_config: _QuantizationConfig | None = None


def validate_schema(schema: type[BaseModel], raw: dict, source: str, error: type[Exception] = ConfigError):
    """`raw` checked against a pydantic schema; the first problem as a one-line `error`."""
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{source}: {describe_problems(exc)}") from None


def describe_problems(error: ValidationError) -> str:
    problems = error.errors(include_url=False)
    first = problems[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    if first["type"] == "missing":
        text = f"missing required field '{where}'"
    else:
        got = repr(first["input"])
        got = got if len(got) <= 60 else got[:57] + "..."
        text = f"{where} {first['msg'].removeprefix('Input ').removeprefix('Value error, ')}, got {got}"
    return text + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # How a packed checkpoint's weight_scale is meant: "autobitlinear" multiplies, "bitlinear" divides.
    linear_class: str = "autobitlinear"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of every ternary projection in a decoder layer, keyed by HF module path."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "self_attn.q_proj": (self.q_size, h),
            "self_attn.k_proj": (self.kv_size, h),
            "self_attn.v_proj": (self.kv_size, h),
            "self_attn.o_proj": (h, self.q_size),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }

    def norm_shapes(self) -> dict[str, int]:
        """Width of every RMSNorm weight in a decoder layer, keyed by HF module path."""
        return {
            "input_layernorm": self.hidden_size,
            "post_attention_layernorm": self.hidden_size,
            "self_attn.attn_sub_norm": self.q_size,
            "mlp.ffn_sub_norm": self.intermediate_size,
        }

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
        """Build from the contents of a Hugging Face BitNet config.json; raise ConfigError if unsupported."""
        model_type = raw.get("model_type")
        if model_type != "bitnet":
            raise ConfigError(f"{source}: model_type is {model_type!r}, not 'bitnet'; this is not a BitNet b1.58 model")
        c = validate_schema(HFConfigSchema, raw, source)
        heads = c.num_attention_heads
        kv_heads = c.num_key_value_heads or heads
        head_dim = c.head_dim or c.hidden_size // heads
        if not head_dim:
            raise ConfigError(f"{source}: hidden_size {c.hidden_size} is smaller than num_attention_heads {heads}")
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim {head_dim} must be even for RoPE")
        for name, token_id in [("bos_token_id", c.bos_token_id), *(("eos_token_id", e) for e in c.eos_token_id)]:
            if token_id is not None and token_id >= c.vocab_size:
                raise ConfigError(f"{source}: {name} {token_id} is outside the vocabulary of {c.vocab_size} tokens")
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=c.rms_norm_eps,
            rope_theta=_rope_theta(c, source),
            max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=c.tie_word_embeddings,
            bos_token_id=c.bos_token_id,
            eos_token_ids=tuple(c.eos_token_id),
            linear_class=(c.quantization_config or {}).get("linear_class", "autobitlinear"),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        return cls.from_hf_dict(read_config_json(folder), str(Path(folder) / "config.json"))

    def to_dict(self) -> dict:
        return asdict(self)


def read_config_json(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    raw = read_json_object(path)
    if raw is None:
        raise ConfigError(f"{path}: not found; a model folder needs a config.json")
    return raw


def read_json_object(path: Path, error: type[Exception] = ConfigError) -> dict | None:
    """The JSON object in `path`, or None when there is no such file; anything else unreadable raises `error`."""
    text = read_text(path, error)
    if text is None:
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object")
    return raw


def read_text(path: Path, error: type[Exception] = ConfigError) -> str | None:
    """The UTF-8 text of `path`, or None when there is no such file; anything else unreadable raises `error`."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:  # permission denied, a folder, an I/O error
        raise error(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _rope_theta(c: HFConfigSchema, source: str) -> float:
    """transformers 5 writes rope_parameters; 4.x and the official repos write rope_theta."""
    params = c.rope_parameters or c.rope_scaling or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{source}: RoPE type {rope_type!r} is not supported (only 'default')")
    return params.get("rope_theta", c.rope_theta)
