"""The interface every backend implements and the engine relies on; nothing more.

A backend owns a fixed pool of KV-cache slots (one per concurrent user), each with its own context
of up to `max_context` tokens. The engine prefills prompts into slots, decodes one token for many
slots at once, and frees slots when requests finish; each engine step is one `step` call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from ..config import ModelConfig
from ..errors import CapacityError

if TYPE_CHECKING:  # torch is imported by the backends that compute in it, never for the cpu backend
    import numpy as np
    import torch

    from ..sampling import DeviceDraw

    Logits = np.ndarray | torch.Tensor  # fp32 on the CPU: np.asarray views either without a copy


class PrefillPart(NamedTuple):
    """Prompt tokens to append to a slot in a step. A chunk before the prompt's last needs no logits (a backend
    may then skip the LM head: in a long prompt's chunks it costs as much as the layers of a small model)."""

    slot: int
    token_ids: Sequence[int]
    wants_logits: bool = True


@dataclass
class StepResult:
    """What Backend.step computed. An exception in place of a part: the separate call that computed it raised
    (its slots are in an unknown state; the other parts stand)."""

    prefill: list[Logits | None | Exception]  # each chunk's last-token logits, fp32 [vocab]; None: not wanted
    decode: Logits | list[int] | Exception | None  # logits [slots, vocab] or picked token ids; None: no slots


class Backend(ABC):
    config: ModelConfig
    max_slots: int
    max_context: int
    # The largest top_k that decode_sampled draws from on the device; 0: this backend has no device sampler.
    device_top_k_limit: int = 0
    # Whether prefill appends to a slot that already holds context (chunked prefill, prefix reuse); when
    # false the engine only prefills whole prompts into empty slots.
    supports_prefix_prefill: bool = True
    # Prompt tokens the engine prefills per step unless told otherwise, chosen by measurement per backend
    # (benchmarks/serving.py; README, "Serving many users"): small enough that a step with a chunk keeps the
    # running users' inter-token latency near a decode step's, large enough to keep the prefill rate.
    default_prefill_chunk: int = 64
    # Whether the engine sizes prompt chunks by measured step times (engine/pacing.py) while users decode: for a
    # backend whose step time grows with a chunk's rows and attention pairs (chunk_work), by amounts that vary
    # from machine to machine; default_prefill_chunk is then the most a step takes.
    paces_prefill: bool = False
    # Whether copy_slot works: requests with the same prompt then share one prefill.
    copies_slots: bool = False

    def __init__(self, config: ModelConfig, max_slots: int, max_context: int | None):
        """max_context None: the model's maximum."""
        max_context = max_context or config.max_position_embeddings
        if max_slots < 1 or not 1 <= max_context <= config.max_position_embeddings:
            raise CapacityError(
                f"need at least 1 slot and a context between 1 and the model's "
                f"{config.max_position_embeddings} positions (got {max_slots} slots, context {max_context})"
            )
        self.config = config
        self.max_slots = max_slots
        self.max_context = max_context
        self._lengths = [0] * max_slots

    @abstractmethod
    def prefill(self, slot: int, token_ids: Sequence[int]) -> Logits:
        """Append `token_ids` to the slot's context; return fp32 logits of the last token, [vocab]."""

    @abstractmethod
    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> Logits:
        """Append one token to each slot, each at its own position; return fp32 logits [len(slots), vocab]."""

    def decode_greedy(self, slots: Sequence[int], token_ids: Sequence[int]) -> list[int]:
        """Like decode, but return each slot's most likely next token; a device backend picks it on the
        device and sends back token ids instead of logits. -1 marks a slot whose logits are not finite
        (the engine fails its request); a device pick cannot tell (not checked on a card)."""
        import torch  # the backends that rely on this method compute in torch

        logits = torch.as_tensor(self.decode(slots, token_ids))
        return logits.argmax(-1).masked_fill(~torch.isfinite(logits).all(-1), -1).tolist()

    def decode_sampled(self, slots: Sequence[int], token_ids: Sequence[int], draws: Sequence[DeviceDraw]) -> list[int]:
        """Like decode, but draw each slot's next token on the device (only when device_top_k_limit > 0)."""
        raise NotImplementedError(f"{type(self).__name__} has no device sampler (device_top_k_limit is 0)")

    def step(self, prefills: Sequence[PrefillPart], slots: Sequence[int], token_ids: Sequence[int],
             greedy: bool = False, draws: Sequence[DeviceDraw] | None = None) -> StepResult:
        """One engine step: append each prefill part's tokens to its slot, and one token to each of `slots` (as
        decode_greedy when `greedy`, decode_sampled with `draws`, else decode); all slots distinct.

        Here the chunks and the decode rows are separate calls, each one's error kept in its place; a backend
        that runs them in one forward pass (one fixed cost per step) overrides this, and then an error fails
        the whole step."""
        prefilled = []
        for part in prefills:
            logits = _attempt(self.prefill, part.slot, part.token_ids)
            prefilled.append(logits if part.wants_logits or isinstance(logits, Exception) else None)
        if not slots:
            return StepResult(prefilled, None)
        if draws is not None:
            return StepResult(prefilled, _attempt(self.decode_sampled, slots, token_ids, draws))
        return StepResult(prefilled, _attempt(self.decode_greedy if greedy else self.decode, slots, token_ids))

    def chunk_work(self, start: int, count: int) -> tuple[float, float]:
        """What prefilling positions start .. start + count - 1 adds to a step, in the two units the engine's
        cost fit is linear in (paces_prefill): rows through the projections, and query-key pairs of attention."""
        return count, count * start + count * (count + 1) / 2

    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Make the empty `target` slot's context the first `length` positions of `source`'s (only when
        copies_slots): the same state a prefill of those tokens into `target` would leave."""
        raise NotImplementedError(f"{type(self).__name__} cannot copy slots (copies_slots is False)")

    def free(self, slot: int) -> None:
        """Forget the slot's context so that it can serve another request."""
        self._check_slot(slot)
        self._lengths[slot] = 0

    def keep_prefix(self, slot: int, length: int) -> None:
        """Forget all but the first `length` positions of the slot's context (a prompt reuses them)."""
        self._check_slot(slot)
        if not 0 <= length <= self._lengths[slot]:
            raise ValueError(f"slot {slot} holds {self._lengths[slot]} positions, cannot keep {length}")
        self._lengths[slot] = length

    def slot_length(self, slot: int) -> int:
        """Tokens currently held in the slot's context."""
        self._check_slot(slot)
        return self._lengths[slot]

    def close(self) -> None:
        """Release devices and memory held by the backend."""

    def describe(self) -> dict[str, str]:
        """Facts for benchmark output (device, memory, work per step); empty when there is nothing to add."""
        return {}

    # Helpers for implementations: validate a request against capacity before touching the cache.

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise CapacityError(f"slot {slot} does not exist (the backend has {self.max_slots} slots)")

    def _reserve(self, slot: int, count: int) -> int:
        """Check that `count` more tokens fit in the slot; return the position of the first."""
        self._check_slot(slot)
        start = self._lengths[slot]
        if start + count > self.max_context:
            raise CapacityError(
                f"slot {slot} would hold {start + count} tokens, more than the context of {self.max_context}"
            )
        return start

    def _advance(self, slot: int, count: int) -> None:
        self._lengths[slot] += count


def _attempt(fn, *args):
    """fn(*args), or the exception it raised."""
    try:
        return fn(*args)
    except Exception as exc:
        return exc
