"""The Tenstorrent backend behind the engine's Backend interface: host-side preparation, persistent
device inputs, the KV cache, and decode trace capture/replay. The math lives in model.py.

NOT YET RUN ON A CARD. Verified here: every op's arguments, shapes, shards and memory on mock
Blackhole P150 and Wormhole N150 devices (tests marked tt_mock).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ...checkpoint import BitNetWeights, load_weights
from ...config import ModelConfig
from ...errors import CapacityError
from ..base import Backend
from .config import TILE, TTOptions, make_plan
from .device import device_facts, import_ttnn, open_tt_device
from .model import TTModel
from .weights import Placer, place_model


class TTNNBackend(Backend):
    def __init__(
        self, config: ModelConfig, weights: BitNetWeights | None, tt, device, max_slots: int = 1,
        max_context: int | None = None, options: TTOptions | None = None, cache_dir: Path | None = None,
    ):
        """`weights=None` allocates the weights without values: for contract runs on a mock device."""
        max_context = max_context or config.max_position_embeddings
        super().__init__(config, max_slots, max_context)
        self.tt, self.device = tt, device
        self.plan = make_plan(config, device_facts(tt, device), options or TTOptions(), max_slots, max_context)
        on_device = place_model(self.plan, weights, Placer(tt, device, cache_dir, allocate_only=weights is None))
        self.model = TTModel(tt, device, self.plan, on_device, self._allocate_kv_cache())
        self.inputs = self._allocate_decode_inputs()
        self.outputs = None  # (logits, greedy tokens) written by the captured trace
        self.trace_id = None
        self.ops_per_decode_step: int | None = None

    def _allocate_kv_cache(self):
        tt, m = self.tt, self.config
        # One spare position past the context: rows that do not decode in a step still write somewhere harmless.
        shape = [self.max_slots, m.num_kv_heads, self.plan.cache_context, m.head_dim]
        return [tuple(tt.zeros(shape, dtype=tt.bfloat16, layout=tt.TILE_LAYOUT, device=self.device,
                               memory_config=tt.DRAM_MEMORY_CONFIG) for _ in range(2)) for _ in range(m.num_layers)]

    def _allocate_decode_inputs(self) -> dict:
        """Device tensors that every decode step overwrites in place (a trace replays on them)."""
        tt, users = self.tt, self.max_slots
        return {
            "tokens": tt.allocate_tensor_on_device(tt.Shape([1, users]), tt.uint32, tt.ROW_MAJOR_LAYOUT, self.device),
            "positions": tt.allocate_tensor_on_device(tt.Shape([users]), tt.int32, tt.ROW_MAJOR_LAYOUT, self.device),
            "position_rows": tt.allocate_tensor_on_device(tt.Shape([1, users]), tt.uint32, tt.ROW_MAJOR_LAYOUT, self.device),
        }

    # -- prefill --------------------------------------------------------------------------------------

    def prefill(self, slot: int, token_ids: Sequence[int]) -> torch.Tensor:
        if len(token_ids) == 0:
            raise ValueError("prefill needs at least one token")
        if self._reserve(slot, len(token_ids)) != 0:
            raise CapacityError("the ttnn backend prefills a whole prompt into an empty slot")
        tt = self.tt
        padded = torch.zeros(1, self.plan.prefill_length(len(token_ids)), dtype=torch.int32)
        padded[0, : len(token_ids)] = torch.as_tensor(list(token_ids), dtype=torch.int32)
        tokens = tt.from_torch(padded, dtype=tt.uint32, layout=tt.ROW_MAJOR_LAYOUT, device=self.device)
        last = len(token_ids) - 1
        logits = self.model.forward_prefill(tokens, slot, last)
        self._advance(slot, len(token_ids))
        return self._to_host(logits)[0, 0, last % TILE].float()

    # -- decode ---------------------------------------------------------------------------------------

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        logits, _ = self._decode_step(slots, token_ids)
        return self._to_host(logits)[0, 0, list(slots)].float()

    def decode_greedy(self, slots: Sequence[int], token_ids: Sequence[int]) -> list[int]:
        """The next token of each slot, picked on the device: B token ids cross to the host, not B x vocab logits."""
        _, greedy = self._decode_step(slots, token_ids)
        return self.tt.to_torch(greedy).reshape(-1)[list(slots)].tolist()

    def _decode_step(self, slots: Sequence[int], token_ids: Sequence[int]):
        if len(slots) != len(token_ids) or len(set(slots)) != len(slots) or not slots:
            raise ValueError("decode needs one token for each of distinct slots")
        for s in slots:
            self._reserve(s, 1)
        tokens = torch.zeros(1, self.max_slots, dtype=torch.int32)
        tokens[0, list(slots)] = torch.as_tensor(list(token_ids), dtype=torch.int32)
        # Every row writes its cache at its own length: rows that are not decoding write past their
        # context, where their next real token will overwrite it before anything reads it.
        positions = torch.tensor(self._lengths, dtype=torch.int32)
        self._copy_inputs(tokens, positions)
        outputs = self._run_decode()
        for s in slots:
            self._advance(s, 1)
        return outputs

    def _copy_inputs(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        tt = self.tt
        host = {
            "tokens": tt.from_torch(tokens, dtype=tt.uint32, layout=tt.ROW_MAJOR_LAYOUT),
            "positions": tt.from_torch(positions, dtype=tt.int32, layout=tt.ROW_MAJOR_LAYOUT),
            "position_rows": tt.from_torch(positions[None], dtype=tt.uint32, layout=tt.ROW_MAJOR_LAYOUT),
        }
        for name, tensor in host.items():
            tt.copy_host_to_device_tensor(tensor, self.inputs[name])

    def _run_decode(self):
        """Capture the decode step once (after a first, counted run) and replay it; or run it op by op.
        Returns (logits, greedy tokens) on the device."""
        tt, i = self.tt, self.inputs
        if self.ops_per_decode_step is None:  # the first step: count the ttnn calls it makes (it also compiles)
            calls = []
            self.model.tt = TTCallHook(tt, lambda name, call: calls.append(name) or call())
            try:
                outputs = self.model.forward_decode(i["tokens"], i["positions"], i["position_rows"])
            finally:
                self.model.tt = tt
            self.ops_per_decode_step = len(calls)
            if not self.plan.options.use_trace:
                return outputs
        if not self.plan.options.use_trace:
            return self.model.forward_decode(i["tokens"], i["positions"], i["position_rows"])
        if self.trace_id is None:
            # The counted step above compiled every program and made argmax's first-call host writes,
            # which a trace capture would reject.
            self.trace_id = tt.begin_trace_capture(self.device, cq_id=0)
            self.outputs = self.model.forward_decode(i["tokens"], i["positions"], i["position_rows"])
            tt.end_trace_capture(self.device, self.trace_id, cq_id=0)
        tt.execute_trace(self.device, self.trace_id, cq_id=0, blocking=False)
        return self.outputs

    def _to_host(self, tensor) -> torch.Tensor:
        return self.tt.to_torch(tensor)[..., : self.config.vocab_size]

    def describe(self) -> dict[str, str]:
        plan, m, tt = self.plan, self.config, self.tt
        dram = tt.get_memory_view(self.device, tt.BufferType.DRAM)
        kv_per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2  # K and V, bf16
        return {
            "device": f"{plan.device.arch}, {plan.device.grid_x}x{plan.device.grid_y} worker grid, "
                      f"{plan.device.dram_banks} DRAM banks",
            "device DRAM in use": f"{dram.total_bytes_allocated_per_bank * dram.num_banks / 2**30:.2f} GiB "
                                  f"(weights {plan.weight_bytes() / 2**30:.2f} GiB, KV cache {plan.kv_cache_bytes() / 2**30:.2f} GiB)",
            "bytes read per decode step": f"weights {plan.weight_bytes() / 2**30:.2f} GiB + KV cache "
                                          f"{kv_per_token / 1024:.0f} KiB per token of context per user",
            "ttnn calls per decode step": str(self.ops_per_decode_step) if self.ops_per_decode_step else "not measured yet",
            "decode": "trace replay" if plan.options.use_trace else "op by op",
        }

    def close(self) -> None:
        if self.trace_id is not None:
            self.tt.release_trace(self.device, self.trace_id)
            self.trace_id = None


def weight_cache_dir(folder: Path, options: TTOptions) -> Path:
    """Converted device weights, kept per model folder and options so a restart does not re-convert."""
    base = Path(os.environ.get("BITNET_TT_CACHE", Path.home() / ".cache" / "bitnet-tt"))
    key = hashlib.sha256(f"{Path(folder).resolve()}|{options}".encode()).hexdigest()[:16]
    return base / "ttnn-weights" / key


def load_ttnn_backend(folder: Path, max_slots: int = 1, max_context: int | None = None, progress: bool = True,
                      options: TTOptions | None = None) -> TTNNBackend:
    """Open the first Tenstorrent card and load a model folder onto it. Needs a card: not run here."""
    tt = import_ttnn()
    options = options or TTOptions()
    device = open_tt_device(tt)
    weights = load_weights(folder, progress=progress)
    cache = weight_cache_dir(folder, options)
    cache.mkdir(parents=True, exist_ok=True)
    return TTNNBackend(weights.config, weights, tt, device, max_slots, max_context, options, cache)


class TTCallHook:
    """Stands in for the ttnn module and passes every call through `around(name, call)`: for counting
    or inspecting the calls of one step without touching the model's code."""

    SUBMODULES = ("experimental", "transformer")

    def __init__(self, module, around, prefix: str = ""):
        self._module, self._around, self._prefix = module, around, prefix

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if name in self.SUBMODULES:
            return TTCallHook(attr, self._around, f"{self._prefix}{name}.")
        if not callable(attr) or isinstance(attr, type) or name.startswith("graph"):
            return attr
        return lambda *args, **kwargs: self._around(f"{self._prefix}{name}", lambda: attr(*args, **kwargs))
