"""The slot pool: which KV-cache slots are free, and which tokens a free slot's cache still holds.

A finished request leaves its tokens in its slot (the prefix cache): a later prompt that starts with
them takes that slot and skips prefilling the common prefix. Matching is on token ids; a free slot
whose tokens match nothing is reused least recently released first, so recent contexts live longest.
"""

from __future__ import annotations

from collections.abc import Sequence


class SlotPool:
    def __init__(self, size: int):
        self._held: list[list[int]] = [[] for _ in range(size)]  # tokens in each free slot's KV cache
        self._released = [-1] * size  # when each slot was last released (-1: never used)
        self._clock = 0
        self._free = set(range(size))

    @property
    def has_free(self) -> bool:
        return bool(self._free)

    def acquire(self, prompt_ids: Sequence[int], reuse: bool) -> tuple[int, int]:
        """Take a free slot for `prompt_ids`; return it and how many leading prompt tokens its cache holds.

        With `reuse`, the slot holding the longest prefix of the prompt wins (at least one prompt token
        is left to prefill, for the logits); ties, and every slot when not reusing, go to the least
        recently released."""
        def score(slot: int) -> tuple[int, int]:
            return (common_prefix(self._held[slot], prompt_ids, len(prompt_ids) - 1) if reuse else 0,
                    -self._released[slot])

        slot = max(sorted(self._free), key=score)
        self._free.remove(slot)
        reused = score(slot)[0]
        self._held[slot] = []
        return slot, reused

    def release(self, slot: int, held: Sequence[int]) -> None:
        """Return a slot whose KV cache holds `held` (token ids from position 0; empty: nothing kept)."""
        assert slot not in self._free, f"slot {slot} released twice"
        self._clock += 1
        self._held[slot], self._released[slot] = list(held), self._clock
        self._free.add(slot)


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    count = 0
    for x, y in zip(a, b):
        if x != y or count == limit:
            break
        count += 1
    return count
