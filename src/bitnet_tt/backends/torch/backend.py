"""The PyTorch backend: the golden model behind the engine's Backend interface."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ...checkpoint import BitNetWeights, load_weights, release_freed_memory
from ...errors import BitNetError, CapacityError
from ..base import Backend
from .kv_cache import KVCache
from .model import BitNetModel

# float64 is for verification: it reproduces HF evaluated in fp64 (see model.py).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class TorchBackend(Backend):
    copies_slots = True

    def __init__(
        self,
        weights: BitNetWeights,
        max_slots: int = 1,
        max_context: int | None = None,
        dtype: str = "bfloat16",
        device: str = "cpu",
        prefill_chunk: int = 256,
    ):
        config = weights.config
        super().__init__(config, max_slots, max_context)
        if dtype not in DTYPES:
            raise BitNetError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        try:
            self.device = torch.device(device)
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as exc:
            raise BitNetError(f"device {device!r} is not usable here ({str(exc).splitlines()[0]})") from None
        self.dtype = DTYPES[dtype]
        self.prefill_chunk = prefill_chunk
        cache = KVCache(config, max_slots, self.max_context, self.dtype, self.device)
        self.model = BitNetModel(weights, cache, self.dtype, self.device)
        release_freed_memory()

    def prefill(self, slot: int, token_ids: Sequence[int]) -> torch.Tensor:
        if len(token_ids) == 0:
            raise ValueError("prefill needs at least one token")
        start = self._reserve(slot, len(token_ids))
        tokens = torch.as_tensor(list(token_ids), dtype=torch.long, device=self.device)
        slots = torch.tensor([slot], device=self.device)
        for offset in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[offset : offset + self.prefill_chunk]
            starts = torch.tensor([start + offset], device=self.device)
            logits = self.model(chunk[None], slots, starts)
        self._advance(slot, len(tokens))
        return logits[0].cpu()

    def copy_slot(self, source: int, target: int, length: int) -> None:
        if not 0 < length <= self.slot_length(source) or self.slot_length(target) != 0 or source == target:
            raise CapacityError(f"cannot copy {length} positions of slot {source} into slot {target}")
        self.model.cache.copy(source, target, length)
        self._advance(target, length)

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        if len(slots) != len(token_ids) or len(set(slots)) != len(slots) or not slots:
            raise ValueError("decode needs one token for each of distinct slots")
        starts = torch.tensor([self._reserve(s, 1) for s in slots], device=self.device)
        tokens = torch.as_tensor(list(token_ids), dtype=torch.long, device=self.device)[:, None]
        logits = self.model(tokens, torch.tensor(list(slots), device=self.device), starts)
        for s in slots:
            self._advance(s, 1)
        return logits.cpu()


def load_torch_backend(
    folder: Path, max_slots: int = 1, max_context: int | None = None, dtype: str = "bfloat16",
    device: str = "cpu", progress: bool = True,
) -> TorchBackend:
    return TorchBackend(load_weights(folder, progress=progress), max_slots, max_context, dtype, device)
