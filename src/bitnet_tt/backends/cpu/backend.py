"""The CPU backend: the fast path on any x86-64 or ARM CPU, behind the engine's Backend interface."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import BitNetError, CapacityError
from ...sampling import DeviceDraw
from ..base import Backend, PrefillPart, StepResult
from . import kernels
from .model import CPUModel, Segment
from .weights import LM_HEAD_DTYPES, load_cpu_weights

PREFILL_CHUNK = 256  # prompt tokens per forward pass besides the decode rows: bounds the workspaces


@dataclass(frozen=True)
class CPUOptions:
    threads: int | None = None  # None: the physical cores this process may run on
    lm_head: str = "bf16"  # "bf16" (HF's numerics) or "int8" (per-row codes x int8 activations: less traffic)
    path: str | None = None  # instruction-set path (kernels.paths()); None: the best here

    def __post_init__(self):
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise BitNetError(f"threads must be a positive integer, got {self.threads!r}")
        if self.lm_head not in LM_HEAD_DTYPES:
            raise BitNetError(f"unknown LM head dtype {self.lm_head!r} (choose from {', '.join(LM_HEAD_DTYPES)})")


class CPUBackend(Backend):
    copies_slots = True
    paces_prefill = True
    # benchmarks/serving.py on a quiet 2-core EPYC (load 1.7-1.9), a step as one pass: chunks of 16 keep running
    # streams at 1.85-1.94x a decode step (p99) while a 2,048-token prompt arrives, at 0.87-0.98x whole-prompt
    # prefill's throughput; chunks of 32: 4.64x at 0.93x. README, "Serving many users"
    default_prefill_chunk = 16

    def __init__(self, folder: Path, max_slots: int = 1, max_context: int | None = None,
                 options: CPUOptions | None = None, progress: bool = True):
        options = options or CPUOptions()
        kernels.require()
        path = kernels.path_index(options.path)
        threads = options.threads or physical_cores()
        weights = load_cpu_weights(folder, options.lm_head, progress, threads)
        config = weights.config
        super().__init__(config, max_slots, max_context)
        self.options = options
        self.threads = threads
        self.path_name = kernels.paths()[0] if options.path is None else options.path
        self.max_rows = PREFILL_CHUNK + max_slots  # a step's decode rows and a chunk fit in one pass
        self.model = CPUModel(weights, max_slots, self.max_context, self.max_rows, path, self.threads)

    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        if len(token_ids) == 0:
            raise ValueError("prefill needs at least one token")
        return self._forward([PrefillPart(slot, token_ids)])[0]

    def step(self, prefills: Sequence[PrefillPart], slots: Sequence[int], token_ids: Sequence[int],
             greedy: bool = False, draws: Sequence[DeviceDraw] | None = None) -> StepResult:
        """The decode rows and the prefill chunks in one forward pass: a pass has a fixed cost (reading every
        weight once, waking the threads) that a separate chunk pass would pay again."""
        if draws is not None:  # no device sampler: the base class keeps decode_sampled's error in its place
            return super().step(prefills, slots, token_ids, greedy, draws)
        if len(slots) != len(token_ids) or any(len(part.token_ids) == 0 for part in prefills):
            raise ValueError("a step needs one token for each decoding slot and at least one for each prefill")
        # The chunks first: a chunk cut by the workspace's size is cut where its prefill alone would be.
        logits = self._forward(list(prefills) + [PrefillPart(s, [t]) for s, t in zip(slots, token_ids)])
        wanted = sum(part.wants_logits for part in prefills)
        rows = iter(logits[:wanted])
        prefilled = [next(rows) if part.wants_logits else None for part in prefills]
        decoded = logits[wanted:]
        return StepResult(prefilled, None if not slots else greedy_picks(decoded) if greedy else decoded)

    def copy_slot(self, source: int, target: int, length: int) -> None:
        if not 0 < length <= self.slot_length(source) or self.slot_length(target) != 0 or source == target:
            raise CapacityError(f"cannot copy {length} positions of slot {source} into slot {target}")
        cache = self.model.cache  # [layer, slot, key/value, kv head, position, head dim]
        cache[:, target, :, :, :length] = cache[:, source, :, :, :length]
        self._advance(target, length)

    def decode_greedy(self, slots: Sequence[int], token_ids: Sequence[int]) -> list[int]:
        return greedy_picks(self.decode(slots, token_ids))

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        if len(slots) != len(token_ids) or not slots:
            raise ValueError("decode needs one token for each of distinct slots")
        return self._forward([PrefillPart(s, [t]) for s, t in zip(slots, token_ids)])

    def _forward(self, parts: list[PrefillPart]) -> np.ndarray:
        """Append each part's tokens to its slot (distinct slots) in as few forward passes as the workspaces
        allow; return fp32 logits of the last token of each part that wants them, [such parts, vocab]."""
        if len({part.slot for part in parts}) != len(parts):
            raise ValueError("a step appends to each slot once (got a slot twice)")
        starts = [self._reserve(part.slot, len(part.token_ids)) for part in parts]
        self._check_tokens([t for part in parts for t in part.token_ids])
        logits = [self.model.forward(*forward_pass) for forward_pass in self._passes(parts, starts)]
        for part in parts:
            self._advance(part.slot, len(part.token_ids))
        return logits[0] if len(logits) == 1 else np.concatenate(logits)

    def _passes(self, parts: list[PrefillPart], starts: list[int]) -> list[tuple]:
        """The parts' rows cut into forward passes of at most max_rows: (tokens, segments, and for each segment
        whether it needs logits: it ends a part that wants them); a part cut in two continues in the next pass,
        over its positions cached. The passes' logits, in order, are the parts'."""
        passes, room = [([], [], [])], self.max_rows
        for part, start in zip(parts, starts):
            offset, tokens = 0, part.token_ids
            while offset < len(tokens):
                if room == 0:
                    passes.append(([], [], []))
                    room = self.max_rows
                piece = tokens[offset : offset + room]
                rows, segments, logits_of = passes[-1]
                rows += piece
                segments.append(Segment(part.slot, start + offset, len(piece)))
                offset += len(piece)
                logits_of.append(part.wants_logits and offset == len(tokens))
                room -= len(piece)
        return passes

    def _check_tokens(self, token_ids: Sequence[int]) -> None:
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise CapacityError(f"token ids must be in 0..{vocab - 1}")

    def describe(self) -> dict[str, str]:
        w = self.model.weights
        return {
            "cpu kernels": f"{self.path_name} path, {self.threads} threads, LM head {self.options.lm_head}",
            "weights in memory": f"{w.code_bytes() / 1e6:.0f} MB of 2-bit codes, "
                                 f"{w.head.nbytes / 1e6:.0f} MB LM head ({w.head.dtype}), embedding mapped from the file",
        }


def greedy_picks(logits: np.ndarray) -> list[int]:
    """Backend.decode_greedy's picks in numpy (this backend never imports torch; its reductions over the logits
    also cost more than a layer here: its own thread pool wakes up and competes with the kernels')."""
    picks = logits.argmax(-1)
    picks[~(np.isfinite(logits.max(-1)) & np.isfinite(logits.min(-1)))] = -1  # max/min propagate NaN
    return picks.tolist()


def physical_cores() -> int:
    """Cores (not hardware threads) this process may run on; the usable CPU count when topology is unknown."""
    usable = os.sched_getaffinity(0)
    cores = set()
    for cpu in usable:
        try:
            base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add(((base / "physical_package_id").read_text().strip(), (base / "core_id").read_text().strip()))
        except OSError:
            return len(usable)
    return max(1, len(cores))


def load_cpu_backend(folder: Path, max_slots: int = 1, max_context: int | None = None,
                     options: CPUOptions | None = None, progress: bool = True) -> CPUBackend:
    return CPUBackend(folder, max_slots, max_context, options, progress)
