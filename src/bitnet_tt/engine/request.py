"""A generation request, its lifecycle, and the statistics kept for it."""

from __future__ import annotations

import enum
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..grammar import TokenConstraint
from ..sampling import SamplingParams, TokenChoice


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for a free slot
    RUNNING = "running"  # holds a slot: prefilling its prompt chunk by chunk, then decoding
    FINISHED = "finished"


@dataclass
class RequestStats:
    submitted: float = field(default_factory=time.perf_counter)
    prefill_started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)

    def summary(self, prompt_tokens: int) -> dict:
        """Time to first token, prefill and decode rates, inter-token latency percentiles (seconds)."""
        gaps = [b - a for a, b in zip(self.token_times, self.token_times[1:])]
        prefill_s = (self.first_token or 0) - (self.prefill_started or 0)
        decode_s = self.token_times[-1] - self.token_times[0] if len(self.token_times) > 1 else 0.0
        return {
            "time_to_first_token_s": (self.first_token - self.submitted) if self.first_token else None,
            "prefill_tokens_per_s": prompt_tokens / prefill_s if prefill_s > 0 else None,
            "decode_tokens_per_s": len(gaps) / decode_s if decode_s > 0 else None,
            "inter_token_latency_p50_s": percentile(gaps, 50),
            "inter_token_latency_p90_s": percentile(gaps, 90),
        }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""

    request: Request
    text: str  # new text since the last output
    token_ids: list[int]  # new token ids since the last output
    finished: bool


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[RequestOutput], None] | None = None
    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None
    cached_tokens: int = 0  # leading prompt tokens whose KV the slot already held (prefix cache)
    prefilled: int = 0  # prompt tokens in the slot so far, cached ones included
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    choices: list[TokenChoice] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None  # with finish_reason "error": what went wrong, in one line
    stats: RequestStats = field(default_factory=RequestStats)
    generator: np.random.Generator | None = None
    constraint: TokenConstraint | None = None  # the grammar its output must follow (response_format)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)

    def result(self) -> dict:
        return {
            "id": self.id,
            "text": self.text,
            "prompt_token_ids": self.prompt_ids,
            "token_ids": self.output_ids,
            "finish_reason": self.finish_reason,
            "cached_prompt_tokens": self.cached_tokens,
            "logprobs": [c.logprob for c in self.choices] if self.params.logprobs else None,
            "stats": self.stats.summary(len(self.prompt_ids) - self.cached_tokens),  # the tokens prefilled
        }
