"""Static KV cache: one row per slot, allocated once at full size, written in place."""

from __future__ import annotations

import torch

from ...config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, max_slots: int, max_context: int, dtype: torch.dtype, device):
        shape = (config.num_layers, max_slots, config.num_kv_heads, max_context, config.head_dim)
        # torch.zeros maps fresh pages lazily, so memory is only touched as contexts grow.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_context = max_context

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # slots [B], positions [B, T], k/v [B, kv_heads, T, head_dim]
        rows = slots[:, None]
        self.keys[layer][rows, :, positions] = k.transpose(1, 2)
        self.values[layer][rows, :, positions] = v.transpose(1, 2)

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # -> keys, values [B, kv_heads, length, head_dim]; a view (no copy) when the slots are consecutive
        first = int(slots[0])
        if torch.equal(slots, torch.arange(first, first + slots.numel(), device=slots.device)):
            rows = slice(first, first + slots.numel())
            return self.keys[layer, rows, :, :length], self.values[layer, rows, :, :length]
        return self.keys[layer][slots, :, :length], self.values[layer][slots, :, :length]

    def copy(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target`, in every layer."""
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
