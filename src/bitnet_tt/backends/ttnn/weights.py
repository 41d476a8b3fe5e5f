"""Ternary weights on the device: exact codes in block-float, scales folded where the algebra is exact.

Each projection is stored as its *unscaled* codes {-1, 0, +1}, transposed to [in, out] for x @ W.
The per-tensor scales never touch the device weights; they are folded (see `ScaleFolds`):
- q and k scales multiply the attention scale (RoPE and q.k are linear in each);
- the v scale moves into attn_sub_norm's epsilon: RMSNorm(c*x, eps) = RMSNorm(x, eps / c^2);
- gate and up: relu(sg*g)^2 * (su*u) = sg^2*su * relu(g)^2*u, so ffn_sub_norm's eps / (sg^2*su)^2;
- o and down scales are applied where their outputs join the residual (model.add_scaled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ...checkpoint import BitNetWeights, LayerWeights
from ..torch.model import rope_tables
from .config import TILE, TTPlan


@dataclass(frozen=True)
class ScaleFolds:
    attention_scale: float  # head_dim^-0.5 * s_q * s_k, rounded to float32 (chunked SDPA's binding takes no other)
    attn_sub_norm_eps: float  # eps / s_v^2
    o_scale: float
    ffn_sub_norm_eps: float  # eps / (s_gate^2 * s_up)^2
    down_scale: float

    def __post_init__(self):
        object.__setattr__(self, "attention_scale", float(torch.tensor(self.attention_scale, dtype=torch.float32)))

    @classmethod
    def from_layer(cls, layer: LayerWeights, head_dim: int, eps: float) -> ScaleFolds:
        s = {name.split(".")[-1]: float(w.scale) for name, w in layer.projections.items()}
        if min(s.values()) <= 0:
            raise ValueError("scale folding needs positive per-tensor scales")
        return cls(
            attention_scale=head_dim**-0.5 * s["q_proj"] * s["k_proj"],
            attn_sub_norm_eps=eps / s["v_proj"] ** 2,
            o_scale=s["o_proj"],
            ffn_sub_norm_eps=eps / (s["gate_proj"] ** 2 * s["up_proj"]) ** 2,
            down_scale=s["down_proj"],
        )

    @classmethod
    def neutral(cls, head_dim: int, eps: float) -> ScaleFolds:
        """Unit scales: for contract runs that allocate weights without reading a checkpoint."""
        return cls(head_dim**-0.5, eps, 1.0, eps, 1.0)


@dataclass
class LayerOnDevice:
    attn_norm: object
    wqkv: object  # [hidden, q + 2 kv] codes
    attn_sub_norm: object
    wo: object  # [q, hidden]
    mlp_norm: object
    wgate: object  # [hidden, intermediate]
    wup: object  # [hidden, intermediate]
    ffn_sub_norm: object
    ffn_sub_norm_row: object  # [1, 1, 1, intermediate] TILE, for the composite norm of wide rows
    wdown: object  # [intermediate, hidden]
    folds: ScaleFolds


@dataclass
class ModelOnDevice:
    embedding: object  # [vocab, hidden] ROW_MAJOR (ttnn.embedding reads rows)
    lm_head: object  # [hidden, vocab] TILE
    final_norm: object
    rope_cos_rows: object  # [context, head_dim] ROW_MAJOR: decode and prefill look rows up by position
    rope_sin_rows: object
    layers: list[LayerOnDevice]


class Placer:
    """Creates device tensors: converted from torch (cached on disk by ttnn), or only allocated.

    Allocation alone is for contract runs on a mock device, where values are never computed.
    """

    def __init__(self, tt, device, cache_dir: Path | None = None, allocate_only: bool = False):
        self.tt, self.device, self.cache_dir, self.allocate_only = tt, device, cache_dir, allocate_only

    def __call__(self, name: str, make: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: str,
                 row_major: bool = False, memory_config=None):
        tt = self.tt
        layout = tt.ROW_MAJOR_LAYOUT if row_major else tt.TILE_LAYOUT
        memory_config = memory_config or tt.DRAM_MEMORY_CONFIG
        if self.allocate_only:
            return tt.allocate_tensor_on_device(tt.Shape(list(shape)), getattr(tt, dtype), layout, self.device, memory_config)
        tensor = make()
        assert tuple(tensor.shape) == tuple(shape), (name, tuple(tensor.shape), shape)
        cache = str(self.cache_dir / f"{name}.{dtype}") if self.cache_dir else None
        return tt.as_tensor(tensor, dtype=getattr(tt, dtype), layout=layout, device=self.device,
                            memory_config=memory_config if self.device is not None else None, cache_file_name=cache)


def norm_rows(weight: torch.Tensor) -> torch.Tensor:
    """rms_norm takes its gamma as ROW_MAJOR [1, 1, width / 32, 32]."""
    return weight.to(torch.bfloat16).reshape(1, 1, -1, TILE)


def codes_in_out(*projections) -> torch.Tensor:
    """Fused [in, out] codes as bf16 (exact), ready for conversion to the weight dtype."""
    return torch.cat([p.codes for p in projections]).t().contiguous().to(torch.bfloat16)


def place_model(plan: TTPlan, weights: BitNetWeights | None, place: Placer, progress: bool = False) -> ModelOnDevice:
    """Every weight on the device, converted once and read from the cache afterwards (a bar shows the layers)."""
    m = plan.model
    h, v, ctx = m.hidden_size, m.vocab_size, plan.cache_context
    cos, sin = rope_tables(m, ctx, torch.float32, "cpu")
    head = (weights.lm_head if weights is not None and weights.lm_head is not None else
            weights.embed if weights is not None else None)
    bar = tqdm(range(m.num_layers), desc="placing weights on the device", unit="layer", disable=not progress or None,
               leave=False)
    layers = [place_layer(plan, k, weights.layers[k] if weights else None, place) for k in bar]
    return ModelOnDevice(
        embedding=place("embedding", lambda: weights.embed, (v, h), "bfloat16", row_major=True),
        lm_head=place("lm_head", lambda: head.t().contiguous().to(torch.bfloat16), (h, v), plan.options.lm_head_dtype),
        final_norm=place("final_norm", lambda: norm_rows(weights.final_norm), (1, 1, h // TILE, TILE), "bfloat16", row_major=True),
        # fp32 tables: the conversion to the device dtype does the one rounding
        rope_cos_rows=place(f"rope_cos_rows_{ctx}", lambda: cos, (ctx, m.head_dim), "bfloat16", row_major=True),
        rope_sin_rows=place(f"rope_sin_rows_{ctx}", lambda: sin, (ctx, m.head_dim), "bfloat16", row_major=True),
        layers=layers,
    )


def place_layer(plan: TTPlan, k: int, layer: LayerWeights | None, place: Placer) -> LayerOnDevice:
    m, dtype = plan.model, plan.options.weight_dtype
    h, i = m.hidden_size, m.intermediate_size
    p = layer.projections if layer else {}
    norms = layer.norms if layer else {}

    def norm(name: str, width: int):
        return place(f"layers.{k}.{name}", lambda: norm_rows(norms[name]), (1, 1, width // TILE, TILE), "bfloat16", row_major=True)

    folds = ScaleFolds.from_layer(layer, m.head_dim, m.rms_norm_eps) if layer else ScaleFolds.neutral(m.head_dim, m.rms_norm_eps)
    fused = {
        "wqkv": lambda: codes_in_out(p["self_attn.q_proj"], p["self_attn.k_proj"], p["self_attn.v_proj"]),
        "wo": lambda: codes_in_out(p["self_attn.o_proj"]),
        "wgate": lambda: codes_in_out(p["mlp.gate_proj"]),
        "wup": lambda: codes_in_out(p["mlp.up_proj"]),
        "wdown": lambda: codes_in_out(p["mlp.down_proj"]),
    }
    shapes = plan.decode_matmuls()  # [k, n] of each projection
    interleaved = {name: place(f"layers.{k}.{name}", make, (shapes[name].k, shapes[name].n), dtype)
                   for name, make in fused.items()}
    return LayerOnDevice(
        attn_norm=norm("input_layernorm", h),
        wqkv=interleaved["wqkv"],
        attn_sub_norm=norm("self_attn.attn_sub_norm", m.q_size),
        wo=interleaved["wo"],
        mlp_norm=norm("post_attention_layernorm", h),
        wgate=interleaved["wgate"],
        wup=interleaved["wup"],
        ffn_sub_norm=norm("mlp.ffn_sub_norm", i),
        ffn_sub_norm_row=place(f"layers.{k}.mlp.ffn_sub_norm.row", lambda: norms["mlp.ffn_sub_norm"].to(torch.bfloat16).reshape(1, 1, 1, i),
                               (1, 1, 1, i), "bfloat16"),
        wdown=interleaved["wdown"],
        folds=folds,
    )
