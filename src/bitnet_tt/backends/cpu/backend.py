"""The CPU backend: the fast path on any x86-64 or ARM CPU, behind the engine's Backend interface."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import BitNetError, CapacityError
from ..base import Backend
from . import kernels
from .model import CPUModel, Segment
from .weights import LM_HEAD_DTYPES, load_cpu_weights

PREFILL_CHUNK = 256  # prompt tokens per forward pass: bounds the workspaces


@dataclass(frozen=True)
class CPUOptions:
    threads: int | None = None  # None: the physical cores this process may run on
    lm_head: str = "bf16"  # "bf16" (HF's numerics) or "int8" (per-row scaled: less memory traffic)
    path: str | None = None  # instruction-set path (kernels.paths()); None: the best here

    def __post_init__(self):
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise BitNetError(f"threads must be a positive integer, got {self.threads!r}")
        if self.lm_head not in LM_HEAD_DTYPES:
            raise BitNetError(f"unknown LM head dtype {self.lm_head!r} (choose from {', '.join(LM_HEAD_DTYPES)})")


class CPUBackend(Backend):
    copies_slots = True
    # benchmarks/serving.py on a quiet 2-core EPYC: chunks of 32 give 0.78x whole-prompt prefill's throughput
    # with running streams at 5x a decode step (p99) while a long prompt arrives (16: 0.71x and 3.5x); README,
    # "Serving many users"
    default_prefill_chunk = 32

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
        self.model = CPUModel(weights, max_slots, self.max_context, max(PREFILL_CHUNK, max_slots), path, self.threads)

    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        if len(token_ids) == 0:
            raise ValueError("prefill needs at least one token")
        start = self._reserve(slot, len(token_ids))
        self._check_tokens(token_ids)
        for offset in range(0, len(token_ids), PREFILL_CHUNK):
            chunk = token_ids[offset : offset + PREFILL_CHUNK]
            logits = self.model.forward(chunk, [Segment(slot, start + offset, len(chunk))])
        self._advance(slot, len(token_ids))
        return logits[0]

    def copy_slot(self, source: int, target: int, length: int) -> None:
        if not 0 < length <= self.slot_length(source) or self.slot_length(target) != 0 or source == target:
            raise CapacityError(f"cannot copy {length} positions of slot {source} into slot {target}")
        cache = self.model.cache  # [layer, slot, key/value, kv head, position, head dim]
        cache[:, target, :, :, :length] = cache[:, source, :, :, :length]
        self._advance(target, length)

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        if len(slots) != len(token_ids) or len(set(slots)) != len(slots) or not slots:
            raise ValueError("decode needs one token for each of distinct slots")
        segments = [Segment(s, self._reserve(s, 1), 1) for s in slots]
        self._check_tokens(token_ids)
        logits = self.model.forward(token_ids, segments)
        for s in slots:
            self._advance(s, 1)
        return logits

    def decode_greedy(self, slots: Sequence[int], token_ids: Sequence[int]) -> list[int]:
        """The base class's contract in numpy (this backend never imports torch; its reductions over the logits
        also cost more than a layer here: its own thread pool wakes up and competes with the kernels')."""
        logits = self.decode(slots, token_ids)
        picks = logits.argmax(-1)
        picks[~(np.isfinite(logits.max(-1)) & np.isfinite(logits.min(-1)))] = -1  # max/min propagate NaN
        return picks.tolist()

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
