"""Stop strings found as the text streams in, in time linear in the text whatever the stop strings are.

An Aho-Corasick automaton over a request's stop strings: its state is the longest end of the text so far
that begins some stop string, so that is exactly the text to hold back, and each new character costs O(1)
amortised (one move, plus failure moves that never exceed the moves made before them).
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache


class StopAutomaton:
    def __init__(self, stops: tuple[str, ...]):
        self.children: list[dict[str, int]] = [{}]
        self.fallback = [0]  # the node of the longest proper suffix that is also in the trie
        self.depth = [0]
        self.match = [0]  # length of the longest stop string that ends here (0: none)
        for stop in stops:
            self._insert(stop)
        self._link()

    def _insert(self, stop: str) -> None:
        node = 0
        for char in stop:
            if char not in self.children[node]:
                self.children.append({})
                self.fallback.append(0)
                self.depth.append(self.depth[node] + 1)
                self.match.append(0)
                self.children[node][char] = len(self.children) - 1
            node = self.children[node][char]
        self.match[node] = len(stop)

    def _link(self) -> None:
        queue = deque(self.children[0].values())  # depth 1 falls back to the root
        while queue:
            node = queue.popleft()
            for char, child in self.children[node].items():
                self.fallback[child] = self.next(self.fallback[node], char)[0]
                self.match[child] = self.match[child] or self.match[self.fallback[child]]
                queue.append(child)

    def next(self, node: int, char: str) -> tuple[int, int]:
        """(the node after `char`, how many moves that took)."""
        moves = 1
        while char not in self.children[node] and node:
            node = self.fallback[node]
            moves += 1
        return self.children[node].get(char, 0), moves


@lru_cache(maxsize=64)
def automaton(stops: tuple[str, ...]) -> StopAutomaton:
    return StopAutomaton(stops)


class StopScanner:
    """One request's text as it streams: what may be shown, and where the first stop string ends it."""

    def __init__(self, stops: tuple[str, ...]):
        self.automaton = automaton(stops) if stops else None
        self.node = 0
        self.held = ""  # text that may be the start of a stop string
        self.moves = 0  # automaton moves so far: linear in the text fed, whatever the stop strings

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to show, whether a stop string ended it). The text is cut where a stop string first
        completes (the longest one, when several end at the same character), before that stop string. On
        `final` nothing more follows, so nothing is held back."""
        pending = self.held + text
        if self.automaton is None:
            self.held = ""
            return pending, False
        automaton = self.automaton
        for end in range(len(self.held), len(pending)):
            self.node, moves = automaton.next(self.node, pending[end])
            self.moves += moves
            if automaton.match[self.node]:
                self.held = ""
                return pending[: end + 1 - automaton.match[self.node]], True
        keep = 0 if final else automaton.depth[self.node]
        self.held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False
