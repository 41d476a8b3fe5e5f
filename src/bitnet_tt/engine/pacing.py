"""Paced prefill: prompt chunks sized by measured step times, so that a step that also decodes costs at most
`limit` decode-only steps, whatever the CPU and kernels.

A chunk's cost grows with its tokens (the projections) and with the positions they attend to (attention over
the prompt so far): a late chunk of a 2,048-token prompt costs several times an early one of the same size, by
a ratio that differs from CPU to CPU and kernel to kernel, so no fixed chunk holds the running users' latency
everywhere. The engine measures it instead: a mixed step's backend time minus the recent decode-only steps'
(their median) is what its chunks cost; a least-squares fit of that over recent mixed steps,
extra = fixed + per_row * rows + per_pair * pairs (Backend.chunk_work: a chunk's rows and attention pairs),
predicts a candidate chunk's, and each prefilling request gets the most tokens that keep the step's predicted
extra within (limit - 1) decode steps. Every step still gives the first prefilling request at least one token
(progress), and no step more than the engine's prefill_chunk; until the fit has data, chunks are at most
PROBE_TOKENS.

A decode step's cost grows as the running users' contexts do, and a long prompt in small chunks takes hundreds
of steps: measured against decode steps from before it arrived, its chunks looked dearer step by step (on a
Zen 5, 8 users from position ~100 to ~1,300 during a 2,048-token prompt: a step of theirs from 4 to 9 ms, all of
it counted as the chunks' cost). So after DECODE_REFRESH mixed steps in a row a step decodes only, and measures
a decode step afresh.
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque
from collections.abc import Callable

import numpy as np

MIXED_STEP_LIMIT = 1.6  # a mixed step's target, in decode-only steps: a margin below the ITL goal's 2x for noise
DECODE_WINDOW = 5  # decode-only steps whose median is "a decode step"
DECODE_REFRESH = 16  # mixed steps in a row, then a decode-only step
FIT_WINDOW = 32  # mixed steps the fit uses: recent, so that it follows the machine's load
PROBE_TOKENS = 8  # a chunk's size while the fit has too few mixed steps to predict one

ChunkWork = Callable[[int, int], tuple[float, float]]  # (start, count) -> (rows, attention pairs)


class ChunkCostFit:
    """extra seconds = fixed + per_row * rows + per_pair * pairs, fit (non-negative) over recent mixed steps: fixed
    is what mixing any prompt tokens into a step costs (a backend that runs a chunk as a pass of its own)."""

    def __init__(self):
        self.samples: deque[tuple[float, float, float, float]] = deque(maxlen=FIT_WINDOW)
        self.coefficients: np.ndarray | None = None

    def add(self, rows: float, pairs: float, extra: float) -> None:
        self.samples.append((1.0, rows, pairs, extra))
        if len(self.samples) >= 2:
            data = np.array(self.samples)
            self.coefficients = non_negative_fit(data[:, :3], data[:, 3])

    def predict(self, rows: float, pairs: float) -> float:
        return float(self.coefficients @ (1.0, rows, pairs))


def non_negative_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares y ~ x @ c with c >= 0, for a few columns: the best of the fits on each subset of columns whose
    coefficients come out non-negative (the optimum is one of them: the others' bounds are active)."""
    scale = np.maximum(np.abs(x).max(axis=0), 1e-30)  # columns of ones, tokens and millions of pairs
    scaled, columns = x / scale, x.shape[1]
    best, best_error = np.zeros(columns), float(y @ y)
    subsets = (subset for k in range(1, columns + 1) for subset in itertools.combinations(range(columns), k))
    for subset in subsets:
        c = np.zeros(columns)
        c[list(subset)] = np.linalg.lstsq(scaled[:, subset], y, rcond=None)[0]
        error = float(np.sum((y - scaled @ c) ** 2))
        if (c >= 0).all() and error < best_error - 1e-15:
            best, best_error = c, error
    return best / scale


class Pacer:
    """Measures steps (observe) and hands out each step's prompt-token budget (budget)."""

    def __init__(self, chunk_work: ChunkWork, limit: float = MIXED_STEP_LIMIT):
        self.chunk_work, self.limit = chunk_work, limit
        self.decode_seconds: deque[float] = deque(maxlen=DECODE_WINDOW)
        self.mixed_in_a_row = 0
        self.fit = ChunkCostFit()

    def observe(self, decode_rows: int, chunks: list[tuple[int, int]], seconds: float) -> None:
        """A step's backend time: decode_rows decoding slots and chunks (start, count) of prompts."""
        if decode_rows and not chunks:
            self.decode_seconds.append(seconds)
            self.mixed_in_a_row = 0
        elif decode_rows and self.decode_seconds:
            rows, pairs = np.sum([self.chunk_work(start, count) for start, count in chunks], axis=0)
            self.fit.add(rows, pairs, seconds - statistics.median(self.decode_seconds))
            self.mixed_in_a_row += 1

    def budget(self, decode_rows: int, max_tokens: int) -> CostBudget | TokenBudget | None:
        """The budget of a step with decode_rows decoding slots; None: no decoding user to hold back (then only
        max_tokens bounds it) or no decode step measured yet; no tokens: a step that measures a decode step."""
        if not decode_rows or not self.decode_seconds:
            return None
        if self.mixed_in_a_row >= DECODE_REFRESH:
            return TokenBudget(0)
        extra = (self.limit - 1) * statistics.median(self.decode_seconds)
        probing = self.fit.coefficients is None
        return CostBudget(self, extra, min(max_tokens, PROBE_TOKENS) if probing else max_tokens)


class CostBudget:
    """A step's prompt tokens within `seconds` of predicted extra cost and `tokens` in all."""

    def __init__(self, pacer: Pacer, seconds: float, tokens: int):
        self.pacer, self.seconds, self.tokens, self.first = pacer, seconds, tokens, True

    @property
    def exhausted(self) -> bool:
        return self.tokens <= 0 or (self.seconds <= 0 and not self.first)

    def take(self, start: int, wanted: int) -> int:
        """Tokens granted to a chunk starting at position `start` that wants `wanted`: the most that fit, and at
        least one for the step's first chunk."""
        most = min(wanted, self.tokens)
        count = max(1 if self.first else 0, self._fitting(start, most))
        self.first = False
        self.tokens -= count
        if count == 0:
            self.seconds = 0.0  # not even one token fits: the requests after this one wait too (first come)
        elif self.pacer.fit.coefficients is not None:
            self.seconds -= self.pacer.fit.predict(*self.pacer.chunk_work(start, count))
        return count

    def _fitting(self, start: int, most: int) -> int:
        """The largest count <= most whose predicted cost fits (the cost grows with the count): binary search.
        Where nothing fits, none (the first chunk still gets one token), even when the fit's fixed cost alone is
        over the budget: the limit holds first."""
        fit = self.pacer.fit
        if fit.coefficients is None:
            return most
        low, high = 0, most
        while low < high:
            middle = (low + high + 1) // 2
            if fit.predict(*self.pacer.chunk_work(start, middle)) <= self.seconds:
                low = middle
            else:
                high = middle - 1
        return low


class TokenBudget:
    """A step's prompt tokens, `tokens` in all (fixed chunks)."""

    def __init__(self, tokens: int):
        self.tokens = tokens

    @property
    def exhausted(self) -> bool:
        return self.tokens <= 0

    def take(self, start: int, wanted: int) -> int:
        count = min(wanted, self.tokens)
        self.tokens -= count
        return count
