"""Stop strings found as the text streams in, in time linear in the text whatever their length.

Each stop string is followed by a Knuth-Morris-Pratt matcher: its state is how much of the stop string the
text so far ends with, and each new character costs O(1) amortised (a step forward, plus fallbacks that
never exceed the steps made before them). The longest such state is the text to hold back. With at most
MAX_STOP_STRINGS stop strings, a character costs at most that many amortised steps; each request holds one
table of ints per stop string (no trie of dicts).
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=256)
def fallback_table(stop: str) -> tuple[int, ...]:
    """table[k]: the length of the longest proper prefix of stop[:k + 1] that is also its suffix."""
    table = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        if stop[i] == stop[k]:
            k += 1
        table[i] = k
    return tuple(table)


class StopScanner:
    """One request's text as it streams: what may be shown, and where the first stop string ends it."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.tables = [fallback_table(stop) for stop in stops]
        self.matched = [0] * len(stops)  # per stop string: how much of it the text ends with
        self.held = ""  # text that may be the start of a stop string
        self.moves = 0  # matcher steps so far: at most 2 per character per stop string

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to show, whether a stop string ended it). The text is cut where a stop string first
        completes (the longest one, when several end at the same character), before that stop string. On
        `final` nothing more follows, so nothing is held back."""
        pending = self.held + text
        for end in range(len(self.held), len(pending)):
            completed = max((len(self.stops[i]) for i in range(len(self.stops)) if self._step(i, pending[end])),
                            default=0)
            if completed:
                self.held = ""
                return pending[: end + 1 - completed], True
        keep = 0 if final else max(self.matched, default=0)
        self.held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def _step(self, i: int, char: str) -> bool:
        """Advance stop string i's matcher by one character; whether the stop string is now complete."""
        stop, table, k = self.stops[i], self.tables[i], self.matched[i]
        self.moves += 1
        while k and stop[k] != char:
            k = table[k - 1]
            self.moves += 1
        if stop[k] == char:
            k += 1
        complete = k == len(stop)
        self.matched[i] = table[k - 1] if complete else k  # a complete match is also a partial one
        return complete
