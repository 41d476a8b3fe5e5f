"""Model dimensions read from a Hugging Face BitNet config.json, validated once, derived values here."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError

SUPPORTED_LINEAR_CLASSES = ("autobitlinear", "bitlinear")


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

        def need(key: str):
            if key not in raw:
                raise ConfigError(f"{source}: missing required field '{key}'")
            return raw[key]

        model_type = raw.get("model_type")
        if model_type != "bitnet":
            raise ConfigError(f"{source}: model_type is {model_type!r}, not 'bitnet'; this is not a BitNet b1.58 model")
        act = raw.get("hidden_act", "relu2")
        if act != "relu2":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (BitNet b1.58 uses 'relu2')")
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise ConfigError(f"{source}: biases are not supported (BitNet b1.58 has none)")

        hidden = _positive_int(need("hidden_size"), "hidden_size", source)
        heads = _positive_int(need("num_attention_heads"), "num_attention_heads", source)
        kv_heads = _positive_int(raw.get("num_key_value_heads", heads), "num_key_value_heads", source)
        head_dim = _positive_int(raw.get("head_dim") or hidden // heads, "head_dim", source)
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim {head_dim} must be even for RoPE")

        quant = raw.get("quantization_config") or {}
        linear_class = quant.get("linear_class", "autobitlinear")
        if linear_class not in SUPPORTED_LINEAR_CLASSES:
            raise ConfigError(f"{source}: quantization_config.linear_class {linear_class!r} is not supported")
        if quant.get("use_rms_norm"):
            raise ConfigError(f"{source}: quantization_config.use_rms_norm is not supported")

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=_positive_int(need("vocab_size"), "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_positive_int(need("intermediate_size"), "intermediate_size", source),
            num_layers=_positive_int(need("num_hidden_layers"), "num_hidden_layers", source),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(raw, source),
            max_position_embeddings=_positive_int(
                raw.get("max_position_embeddings", 2048), "max_position_embeddings", source
            ),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            linear_class=linear_class,
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        return cls.from_hf_dict(read_config_json(folder), str(Path(folder) / "config.json"))

    def to_dict(self) -> dict:
        return asdict(self)


def read_config_json(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a model folder needs a config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


def _positive_int(value, name: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}")
    return value


def _rope_theta(raw: dict, source: str) -> float:
    """transformers 5 writes rope_parameters; 4.x and the official repos write rope_theta."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{source}: RoPE type {rope_type!r} is not supported (only 'default')")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
