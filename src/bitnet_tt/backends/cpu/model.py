"""The BitNet b1.58 forward pass on the CPU kernels, over preallocated buffers.

The golden model's arithmetic (backends/torch/model.py in fp32) step by step: every ternary product is
exact in int32 and scaled as there (int32 -> fp32, / activation scale, * weight scale); norms, RoPE and
the residual adds are fp32 in the same order. What differs is float summation order: RMSNorm's sum of
squares, attention (fp32 dot products, softmax with a polynomial exp within 2 ulp) and the LM head (fp32
sums of bf16 or int8 weights). Each fused step does what the golden model does in several:
norm + int8 quantisation, relu(gate)^2 * up + norm + quantisation, projection + residual add.

A step's decoder layers run as one native call (csrc/layers.c `layer`), each layer in this order:
    attention block: x_q = quantise(input_layernorm(x));  qkv = qkv_proj(x_q)
                     attention = attend(rope(q, k), cache <- k, v)     (kernels.attention_step)
                     x += o_proj(quantise(attn_sub_norm(attention)))
    MLP block:       [gate | up] = gate_up_proj(quantise(post_attention_layernorm(x)))
                     x += down_proj(quantise(ffn_sub_norm(relu(gate)^2 * up)))
Each step is one of the kernels this module also exposes (Activations.quantize, matmul, attention_step),
with the same arguments: the layers give the same floats as those calls made one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...config import ModelConfig
from . import kernels
from .kernels import Activations, aligned_array
from .weights import CPUWeights, Layer


def rope_tables(config: ModelConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """fp32 cos/sin [length, head_dim] for HF's half-split RoPE, in numpy (the cpu backend runs without torch).
    The frequencies are HF's fp32 ones (its fp32 power agrees with float64's rounded); cos and sin are rounded
    from float64, so they may differ from torch's fp32 ones by 1 ulp (tests/test_cpu_backend.py)."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = np.float32(1.0) / (config.rope_theta ** exponents.astype(np.float64)).astype(np.float32)
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
    angles = np.concatenate((freqs, freqs), axis=-1).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@dataclass(frozen=True)
class Segment:
    """Consecutive rows of a step that belong to one slot, at positions start .. start + count - 1."""

    slot: int
    start: int
    count: int


class Workspace:
    """Every buffer a step of up to `rows` tokens writes, allocated once (pages are mapped as they are first
    used): no allocation per step, so no page faults once warm."""

    def __init__(self, weights: CPUWeights, rows: int):
        cfg = weights.config
        qkv_width = cfg.q_size + 2 * cfg.kv_size
        self.x = aligned_array((rows, cfg.hidden_size), np.float32, zeros=True)  # the residual stream
        self.qkv = aligned_array((rows, qkv_width), np.float32, zeros=True)
        self.attention = aligned_array((rows, cfg.q_size), np.float32, zeros=True)
        self.gate_up = aligned_array((rows, 2 * cfg.intermediate_size), np.float32, zeros=True)
        self.final = aligned_array((rows, cfg.hidden_size), np.float32, zeros=True)
        self.hidden_acts = Activations(rows, cfg.hidden_size)
        self.attention_acts = Activations(rows, cfg.q_size)
        self.mlp_acts = Activations(rows, cfg.intermediate_size)
        self.tokens = np.zeros(rows, np.int64)
        self.embed_rows = np.zeros((rows, cfg.hidden_size), weights.embed.dtype) if weights.embed_rows else None

    def layer_buffers(self) -> tuple[np.ndarray, ...]:
        """What the native layers write, in kernels.layer_stack's order."""
        return (self.x, self.qkv, self.attention, self.gate_up,
                *(array for acts in (self.hidden_acts, self.attention_acts, self.mlp_acts)
                  for array in (acts.q, acts.scale, acts.sum)))


def layer_weights(layer: Layer) -> tuple[np.ndarray, ...]:
    """A layer's weights in kernels.layer_stack's order: the norms, then each projection's codes and scales."""
    norms = [layer.norms[name] for name in ("input_layernorm", "self_attn.attn_sub_norm", "post_attention_layernorm",
                                             "mlp.ffn_sub_norm")]
    projections = [layer.projections[kind] for kind in ("qkv", "o_proj", "gate_up", "down")]
    return (*norms, *(array for p in projections for array in (p.weight.data, p.scale)))


class CPUModel:
    def __init__(self, weights: CPUWeights, max_slots: int, max_context: int, max_rows: int, path: int, threads: int):
        cfg = self.config = weights.config
        self.weights = weights
        self.path, self.threads = path, threads
        # [layer, slot, key/value, kv head, position, head dim]; zero pages stay unmapped until written.
        self.cache = aligned_array((cfg.num_layers, max_slots, 2, cfg.num_kv_heads, max_context, cfg.head_dim), np.float32,
                                   zeros=True)
        self.rope_cos, self.rope_sin = rope_tables(cfg, max_context)
        self.work = Workspace(weights, max_rows)
        self.layers = kernels.layer_stack(cfg, max_rows, self.work.layer_buffers(), self.rope_cos, self.rope_sin,
                                          self.cache, [layer_weights(layer) for layer in weights.layers])
        # None, or fp64 [len(kernels.layer_components()), 3] that the layers add their time to (a profile's)
        self.timings: np.ndarray | None = None

    def forward(self, tokens: Sequence[int], segments: Sequence[Segment], logits_of: Sequence[bool]) -> np.ndarray:
        """Run the rows (segments in order) through the model; return fp32 logits of the last row of each segment
        flagged in logits_of, [flagged, vocab] (the LM head runs for those rows only)."""
        cfg, w, work = self.config, self.weights, self.work
        rows = len(tokens)
        work.tokens[:rows] = tokens
        spans = np.array([(seg.slot, seg.start, seg.count) for seg in segments], np.int64)
        x = work.x[:rows]
        self._embed(rows, x)
        kernels.layers(self.layers, rows, spans, self.path, self.threads, self.timings)
        last = (np.cumsum([seg.count for seg in segments]) - 1)[np.asarray(logits_of, bool)]
        for i, row in enumerate(last):
            kernels.norm(x[row : row + 1], 1, w.final_norm, cfg.rms_norm_eps, work.final[i : i + 1])
        logits = np.empty((len(last), cfg.vocab_size), np.float32)
        if len(last) == 0:
            return logits
        return kernels.head(w.head, work.final[: len(last)], len(last), logits, w.head_scales, self.path, self.threads)

    def _embed(self, rows: int, x: np.ndarray) -> None:
        """The tokens' embeddings into x. A mapped embedding that is not also the LM head is read a few rows per
        step, with file reads (weights.TableRows): its pages would stay resident, and each fault maps many."""
        table, tokens, vocab = self.weights.embed, self.work.tokens, self.config.vocab_size
        if self.weights.embed_rows is not None:
            table = self.weights.embed_rows.read(tokens[:rows], self.work.embed_rows)
            tokens, vocab = np.arange(rows, dtype=np.int64), rows
        kernels.require().embed(table, kernels.weight_dtype(table), vocab, self.config.hidden_size, tokens, rows, x)
