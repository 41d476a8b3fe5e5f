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
from ...sampling import DeviceDraw
from ..base import Backend
from .config import PAGE_TABLE_ENTRIES, TILE, DeviceFacts, TTOptions, make_plan
from .device import device_facts, import_ttnn, open_tt_device
from .model import PrefillWindow, TTModel
from .trace import TracedSteps
from .weights import Placer, place_model


class TTNNBackend(Backend):
    def __init__(
        self, config: ModelConfig, weights: BitNetWeights | None, tt, device, max_slots: int = 1,
        max_context: int | None = None, options: TTOptions | None = None, cache_dir: Path | None = None,
        progress: bool = False,
    ):
        """`weights=None` allocates the weights without values: for contract runs on a mock device."""
        super().__init__(config, max_slots, max_context)
        self.tt, self.device = tt, device
        self.plan = make_plan(config, device_facts(tt, device), options or TTOptions(), max_slots, self.max_context)
        on_device = place_model(self.plan, weights, Placer(tt, device, cache_dir, allocate_only=weights is None), progress)
        self.model = TTModel(tt, device, self.plan, on_device, self._allocate_kv_cache())
        self.inputs = self._allocate_decode_inputs()
        # the token at each position of each slot: a prefill computes the held tokens of its first tile again
        self._held: list[list[int]] = [[] for _ in range(max_slots)]
        self._draw_settings: dict[str, torch.Tensor] = {}  # the sampling settings last copied to the device
        self.steps = TracedSteps(tt, device, self.model, self.plan.options.use_trace)
        self.device_top_k_limit = self.plan.sampling_top_k

    def _allocate_kv_cache(self):
        tt, m = self.tt, self.config
        # One spare position past the context: rows that do not decode in a step still write somewhere harmless.
        # One row per decode row: rows past max_slots pad the head grid to a rectangle and hold no user.
        shape = [self.plan.decode_rows, m.num_kv_heads, self.plan.cache_context, m.head_dim]
        return [tuple(tt.zeros(shape, dtype=tt.bfloat16, layout=tt.TILE_LAYOUT, device=self.device,
                               memory_config=tt.DRAM_MEMORY_CONFIG) for _ in range(2)) for _ in range(m.num_layers)]

    def _allocate_decode_inputs(self) -> dict:
        """Device tensors that every decode step overwrites in place (a trace replays on them)."""
        tt, users = self.tt, self.plan.decode_rows

        def rows(shape, dtype):
            return tt.allocate_tensor_on_device(tt.Shape(shape), dtype, tt.ROW_MAJOR_LAYOUT, self.device)

        user_ids = tt.from_torch(torch.arange(users, dtype=torch.int32), dtype=tt.uint32, layout=tt.ROW_MAJOR_LAYOUT,
                                 device=self.device)
        return {"tokens": rows([1, users], tt.uint32), "positions": rows([users], tt.int32),
                "position_rows": rows([1, users], tt.uint32),
                # where a prefill window starts, and its slot as a page table (model.PrefillWindow)
                "prefill_first": rows([1], tt.int32), "page_table": rows([1, PAGE_TABLE_ENTRIES], tt.int32),
                # sampling settings: ttnn.sampling multiplies the logits by inv_temperature
                "top_k": rows([users], tt.uint32), "top_p": rows([users], tt.bfloat16),
                "inv_temperature": rows([users], tt.bfloat16), "seeds": rows([users], tt.uint32), "user_ids": user_ids}

    # -- prefill --------------------------------------------------------------------------------------

    def prefill(self, slot: int, token_ids: Sequence[int]) -> torch.Tensor:
        """Append the tokens to the slot's context, at any length it holds (plan.prefill_window)."""
        if len(token_ids) == 0:
            raise ValueError("prefill needs at least one token")
        held = self._reserve(slot, len(token_ids))
        first, length = self.plan.prefill_window(held, len(token_ids))
        window_ids = self._held[slot][first:held] + list(token_ids)
        tt = self.tt
        padded = torch.zeros(1, length, dtype=torch.int32)
        padded[0, : len(window_ids)] = torch.as_tensor(window_ids, dtype=torch.int32)
        positions = torch.arange(first, first + length, dtype=torch.int32)[None]
        tokens, position_rows = (tt.from_torch(t, dtype=tt.uint32, layout=tt.ROW_MAJOR_LAYOUT, device=self.device)
                                 for t in (padded, positions))
        self._copy_inputs({"prefill_first": tt.from_torch(torch.tensor([first], dtype=torch.int32), dtype=tt.int32,
                                                          layout=tt.ROW_MAJOR_LAYOUT),
                           "page_table": tt.from_torch(torch.full((1, PAGE_TABLE_ENTRIES), slot, dtype=torch.int32),
                                                       dtype=tt.int32, layout=tt.ROW_MAJOR_LAYOUT)})
        window = PrefillWindow(slot, first, self.inputs["prefill_first"], self.inputs["page_table"])
        last = len(window_ids) - 1
        logits = self.steps.op_by_op(lambda: self.model.forward_prefill(tokens, position_rows, window, last))
        self._held[slot][held:] = token_ids
        self._advance(slot, len(token_ids))
        return self._to_host(logits)[0, 0, last % TILE].float()

    # -- decode ---------------------------------------------------------------------------------------

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        logits = self._to_host(self._decode_step(slots, token_ids))[0, 0, list(slots)].float()
        self._advance_all(slots, token_ids)
        return logits

    def decode_greedy(self, slots: Sequence[int], token_ids: Sequence[int]) -> list[int]:
        """The next token of each slot, picked on the device: B token ids cross to the host, not B x vocab logits."""
        logits = self._decode_step(slots, token_ids)
        tokens = self._token_ids(self.steps.run("greedy", lambda: self.model.pick_greedy(logits)), slots)
        self._advance_all(slots, token_ids)
        return tokens

    def decode_sampled(self, slots: Sequence[int], token_ids: Sequence[int], draws: Sequence[DeviceDraw]) -> list[int]:
        """The next token of each slot, drawn on the device (top-k <= 32, top-p, temperature, a seed per step).
        Rows with top_k 1 take the argmax, as decode_greedy does, so ties break the same way in any batch."""
        if not self.device_top_k_limit:
            return super().decode_sampled(slots, token_ids, draws)
        if len(draws) != len(slots) or not all(0 < d.top_k <= self.device_top_k_limit and 0 < d.top_p <= 1
                                               and d.temperature > 0 for d in draws):
            raise ValueError(f"decode_sampled needs one draw per slot, each with top_k in 1..{self.device_top_k_limit}, "
                             "top_p in (0, 1] and a positive temperature")
        logits = self._decode_step(slots, token_ids, draws)
        i = self.inputs
        sampled, greedy = self.steps.run("sampled", lambda: (
            self.model.pick_sampled(logits, i["top_k"], i["top_p"], i["inv_temperature"], i["seeds"], i["user_ids"]),
            self.model.pick_greedy(logits)))
        drawn, best = self._token_ids(sampled, slots), self._token_ids(greedy, slots)
        self._advance_all(slots, token_ids)
        return [b if d.top_k == 1 else t for t, b, d in zip(drawn, best, draws)]

    def _decode_step(self, slots: Sequence[int], token_ids: Sequence[int], draws: Sequence[DeviceDraw] = ()):
        """Run the forward pass for one token in each of `slots` (copying their draws' settings too, for a
        sampling step that follows); return the logits left on the device. The caller advances the slots
        once it has its tokens."""
        if len(slots) != len(token_ids) or len(set(slots)) != len(slots) or not slots:
            raise ValueError("decode needs one token for each of distinct slots")
        for s in slots:
            self._reserve(s, 1)
        rows = self.plan.decode_rows
        tokens = torch.zeros(1, rows, dtype=torch.int32)
        tokens[0, list(slots)] = torch.as_tensor(list(token_ids), dtype=torch.int32)
        # Every row writes its cache at its own length: rows that are not decoding write past their
        # context, where their next real token will overwrite it before anything reads it.
        positions = torch.zeros(rows, dtype=torch.int32)
        positions[: self.max_slots] = torch.tensor(self._lengths, dtype=torch.int32)
        tt = self.tt
        self._copy_inputs({
            "tokens": tt.from_torch(tokens, dtype=tt.uint32, layout=tt.ROW_MAJOR_LAYOUT),
            "positions": tt.from_torch(positions, dtype=tt.int32, layout=tt.ROW_MAJOR_LAYOUT),
            "position_rows": tt.from_torch(positions[None], dtype=tt.uint32, layout=tt.ROW_MAJOR_LAYOUT),
            **(self._draw_inputs(slots, draws) if draws else {}),
        })
        i = self.inputs
        return self.steps.run("forward", lambda: self.model.forward_decode(i["tokens"], i["positions"], i["position_rows"]))

    def _advance_all(self, slots: Sequence[int], token_ids: Sequence[int]) -> None:
        for s, token in zip(slots, token_ids):
            self._held[s][self._lengths[s]:] = [token]
            self._advance(s, 1)

    def _draw_inputs(self, slots: Sequence[int], draws: Sequence[DeviceDraw]) -> dict:
        """Host tensors of the sampling settings per row (rows without a request take top_k 1): the
        fresh seeds, and whichever settings changed since the last sampling step."""
        tt, users = self.tt, self.plan.decode_rows
        top_k, top_p = torch.ones(users, dtype=torch.int32), torch.ones(users)
        inv_temperature, seeds = torch.ones(users), torch.zeros(users, dtype=torch.int32)
        for slot, draw in zip(slots, draws):
            top_k[slot], top_p[slot], inv_temperature[slot], seeds[slot] = draw.top_k, draw.top_p, 1.0 / draw.temperature, draw.seed
        settings = {"top_k": top_k, "top_p": top_p, "inv_temperature": inv_temperature}
        changed = {name: values for name, values in settings.items()
                   if name not in self._draw_settings or not torch.equal(values, self._draw_settings[name])}
        self._draw_settings.update(changed)
        host = {name: tt.from_torch(values, dtype=tt.uint32 if name == "top_k" else tt.bfloat16, layout=tt.ROW_MAJOR_LAYOUT)
                for name, values in changed.items()}
        host["seeds"] = tt.from_torch(seeds, dtype=tt.uint32, layout=tt.ROW_MAJOR_LAYOUT)
        return host

    def _copy_inputs(self, host: dict) -> None:
        for name, tensor in host.items():
            self.tt.copy_host_to_device_tensor(tensor, self.inputs[name])

    def _token_ids(self, tokens, slots: Sequence[int]) -> list[int]:
        return self.tt.to_torch(tokens).reshape(-1)[list(slots)].tolist()

    def _to_host(self, tensor) -> torch.Tensor:
        return self.tt.to_torch(tensor)[..., : self.config.vocab_size]

    def describe(self) -> dict[str, str]:
        plan, tt = self.plan, self.tt
        dram = tt.get_memory_view(self.device, tt.BufferType.DRAM)
        read = plan.decode_read_bytes()
        return {
            "device": f"{plan.device.arch}, {plan.device.grid_x}x{plan.device.grid_y} worker grid, "
                      f"{plan.device.dram_banks} DRAM banks",
            "device DRAM in use": f"{dram.total_bytes_allocated_per_bank * dram.num_banks / 2**30:.2f} GiB "
                                  f"(weights {plan.weight_bytes() / 2**30:.2f} GiB, KV cache {plan.kv_cache_bytes() / 2**30:.2f} GiB)",
            "bytes read per decode step": f"layer weights {read['layers'] / 2**30:.3f} GiB + LM head "
                                          f"{read['lm_head'] / 2**30:.3f} GiB + KV cache "
                                          f"{read['kv_cache_per_token'] / 1024:.0f} KiB per token held by each user",
            "ttnn calls per decode step": self._calls_per_step(),
            "predicted decode speed, BitNet 2B-4T": predicted_speed(),
            "decode": "trace replay" if plan.options.use_trace else "op by op",
            "sampling": f"on the device for top_k <= {self.device_top_k_limit}" if self.device_top_k_limit
                        else "on the host (the vocabulary does not fill whole tiles)",
        }

    def _calls_per_step(self) -> str:
        calls = self.steps.calls
        if "forward" not in calls:
            return "not measured yet"
        pickers = ", ".join(f"+ {calls[name]} to {what}" for name, what in (("greedy", "pick greedily"), ("sampled", "sample"))
                            if name in calls)
        return f"{calls['forward']} to logits" + (f" ({pickers})" if pickers else "")

    def close(self) -> None:
        self.steps.release()


WEIGHT_LAYOUT_VERSION = 2  # bumped whenever a cached tensor's shape or layout changes (2: a padded, sharded LM head)


# What the performance model PREDICTS for BitNet 2B-4T's decode step (board, users, t/s in all, device ops
# per step): `python -m tools.tt_mock.perf --board p150|n150 --users N` (context 256) costs the op list the
# mock device records with constants fitted to published figures. Not measured on a card;
# tests/test_ttnn_perf.py checks that the tool still prints these figures.
PREDICTED_2B4T = (("p150a", 1, 84.6, 703), ("p150a", 32, 1570, 643), ("n150", 1, 56.7, 703))
CARD_TARGETS = "100 t/s at 1 user, 1,500 t/s in all at 32 users"


def predicted_speed() -> str:
    figures = "; ".join(f"{board} {tps:,.0f} t/s at {users} user{'s' * (users > 1)} ({ops} ops per step)"
                        for board, users, tps, ops in PREDICTED_2B4T)
    return f"{figures} (PREDICTED by the performance model, not measured; card targets: {CARD_TARGETS})"


def weight_cache_dir(folder: Path, options: TTOptions, device: DeviceFacts) -> Path:
    """Converted device weights, kept per model folder, options and device (DRAM-sharded layouts depend on
    its banks and grid) so a restart does not re-convert; ttnn loads a cached file without checking its shape."""
    base = Path(os.environ.get("BITNET_TT_CACHE", Path.home() / ".cache" / "bitnet-tt"))
    key = hashlib.sha256(f"{Path(folder).resolve()}|{options}|{device}|{WEIGHT_LAYOUT_VERSION}".encode()).hexdigest()[:16]
    return base / "ttnn-weights" / key


def load_ttnn_backend(folder: Path, max_slots: int = 1, max_context: int | None = None, progress: bool = True,
                      options: TTOptions | None = None) -> TTNNBackend:
    """Open the first Tenstorrent card and load a model folder onto it. Needs a card: not run here."""
    options = options or TTOptions()
    tt = import_ttnn(options.debug_log)
    device = open_tt_device(tt)
    weights = load_weights(folder, progress=progress)
    cache = weight_cache_dir(folder, options, device_facts(tt, device))
    cache.mkdir(parents=True, exist_ok=True)
    return TTNNBackend(weights.config, weights, tt, device, max_slots, max_context, options, cache, progress)

