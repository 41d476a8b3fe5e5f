"""The golden BitNet b1.58 model in PyTorch, numerically equivalent to HF `BitNetForCausalLM`.

Ternary weights stay int8 codes; every projection quantises its input per token to int8 (absmax),
multiplies integers exactly, and scales the int32 result: y = (x_q @ codes^T) / s_x * w_scale.

In float64 (the verification dtype) a projection follows HF's own arithmetic instead: HF de-quantises
the activations in fp32 (x_q / s_x, rounded per element) before a float matmul, and in fp64 that
per-element rounding is part of HF's result. Reproducing it leaves summation order (~1e-16) as the
only difference from HF evaluated in fp64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoint import BitNetWeights, LayerWeights, release_freed_memory
from ...config import ModelConfig
from ...ternary import TernaryWeight
from .kv_cache import KVCache


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 absmax quantisation, as HF's ActQuant (in fp32): returns int8 codes and fp32 s [.., 1]."""
    x = x.float()
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-5)
    codes = (x * scale).round_().clamp_(-128, 127).to(torch.int8)
    return codes, scale


def int8_matmul(a: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ codes^T for int8 a [N, in] and int8 codes [out, in]."""
    if a.device.type == "cpu":
        return torch._int_mm(a, codes.t())
    # |sum| <= 127 * in_features < 2**24 for BitNet's widths, so an fp32 product is exact (TF32 stays off).
    return (a.float() @ codes.float().t()).to(torch.int32)


class BitLinear(nn.Module):
    """One or several ternary projections that share an input, fused into one integer matmul."""

    def __init__(self, weights: list[TernaryWeight], device: torch.device):
        super().__init__()
        self.split_sizes = [w.shape[0] for w in weights]
        self.register_buffer("codes", torch.cat([w.codes for w in weights]).to(device))
        scales = [w.scale.float().expand(w.shape[0]) for w in weights]
        self.register_buffer("scale", torch.cat(scales).to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        # x: [..., in] -> [..., out] (or a tuple split like the fused projections)
        lead = x.shape[:-1]
        codes, act_scale = quantize_activations(x.reshape(-1, x.shape[-1]))
        if x.dtype == torch.float64:
            y = (codes.float() / act_scale).double() @ self.codes.double().t() * self.scale.double()
        else:
            y = (int8_matmul(codes, self.codes).float() / act_scale * self.scale).to(x.dtype)
        y = y.reshape(*lead, -1)
        return y.split(self.split_sizes, dim=-1) if len(self.split_sizes) > 1 else y


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: HF's order.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(config: ModelConfig, length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, head_dim] for HF's half-split RoPE, computed in fp32 like HF, then cast."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(length).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: LayerWeights, cast: dict):
        super().__init__()
        self.config = config
        p = layer.projections
        self.qkv = BitLinear([p["self_attn.q_proj"], p["self_attn.k_proj"], p["self_attn.v_proj"]], cast["device"])
        self.sub_norm = RMSNorm(layer.norms["self_attn.attn_sub_norm"].to(**cast), config.rms_norm_eps)
        self.o_proj = BitLinear([p["self_attn.o_proj"]], cast["device"])

    def forward(self, x, cos, sin, cache: KVCache, layer_idx: int, slots, positions, mask):
        # x [B, T, hidden]; cos/sin [B, T, head_dim]; positions [B, T]; mask [B, 1, T, L]
        cfg = self.config
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(batch, seq, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(batch, seq, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(batch, seq, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        cache.write(layer_idx, slots, positions, k, v)
        keys, values = cache.read(layer_idx, slots, mask.shape[-1])
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=cfg.head_dim**-0.5, enable_gqa=cfg.group_size > 1
        )
        out = out.transpose(1, 2).reshape(batch, seq, cfg.q_size)
        return self.o_proj(self.sub_norm(out))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: LayerWeights, cast: dict):
        super().__init__()
        p = layer.projections
        self.gate_up = BitLinear([p["mlp.gate_proj"], p["mlp.up_proj"]], cast["device"])
        self.sub_norm = RMSNorm(layer.norms["mlp.ffn_sub_norm"].to(**cast), config.rms_norm_eps)
        self.down = BitLinear([p["mlp.down_proj"]], cast["device"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down(self.sub_norm(torch.square(F.relu(gate)) * up))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: LayerWeights, cast: dict):
        super().__init__()
        self.attn_norm = RMSNorm(layer.norms["input_layernorm"].to(**cast), config.rms_norm_eps)
        self.attn = Attention(config, layer, cast)
        self.mlp_norm = RMSNorm(layer.norms["post_attention_layernorm"].to(**cast), config.rms_norm_eps)
        self.mlp = MLP(config, layer, cast)

    def forward(self, x, cos, sin, cache, layer_idx, slots, positions, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer_idx, slots, positions, mask)
        return x + self.mlp(self.mlp_norm(x))


class BitNetModel(nn.Module):
    def __init__(self, weights: BitNetWeights, cache: KVCache, dtype: torch.dtype, device):
        super().__init__()
        cfg = self.config = weights.config
        self.cache = cache
        # Norm weights and the embedding take the compute dtype (HF casts the whole model).
        cast = {"dtype": dtype, "device": device}
        self.register_buffer("embed", weights.embed.to(**cast))
        lm_head = weights.lm_head
        self.register_buffer("lm_head", self.embed if lm_head is None else lm_head.to(**cast))
        # Consume the loaded layers one by one so that only one copy of the codes is alive at a time, and give
        # each layer's freed codes back at once (the fused copies land between them otherwise).
        self.layers = nn.ModuleList()
        while weights.layers:
            self.layers.append(DecoderLayer(cfg, weights.layers.pop(0), cast))
            release_freed_memory()
        self.norm = RMSNorm(weights.final_norm.to(**cast), cfg.rms_norm_eps)
        cos, sin = rope_tables(cfg, cache.max_context, dtype, device)
        self.register_buffer("rope_cos", cos)
        self.register_buffer("rope_sin", sin)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, last_only: bool = True):
        # tokens [B, T] at positions starts[b] + t of slot slots[b]; returns logits [B, vocab] or [B, T, vocab],
        # fp32 (fp64 in the verification dtype)
        seq = tokens.shape[1]
        positions = starts[:, None] + torch.arange(seq, device=tokens.device)
        length = int(positions.max()) + 1
        mask = (torch.arange(length, device=tokens.device) <= positions[..., None]).unsqueeze(1)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = F.embedding(tokens, self.embed)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, self.cache, i, slots, positions, mask)
        if last_only:
            x = x[:, -1]
        logits = F.linear(self.norm(x), self.lm_head)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))
