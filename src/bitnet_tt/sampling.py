"""Sampling parameters and the pure functions that turn one row of logits into a token.

In numpy, not torch: the engine on the cpu backend then runs without importing torch (~0.5 GB of memory).
Logits may come as numpy arrays or CPU torch tensors (np.asarray views either).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .errors import GenerationError, RequestError

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, +100 all but forces it
MAX_STOP_STRINGS = 16  # as many as vLLM's and llama.cpp's clients commonly send; OpenAI takes 4
MAX_STOP_CHARS = 1000  # per stop string: bounds the text a request holds back while a stop string may start


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF style, over prompt and output; 1 means off
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # keep generating past end ids (benchmarks)
    cache_prompt: bool = True  # reuse a cached prompt prefix and leave this one for later requests (llama.cpp's name)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); a mapping is accepted too
    json_schema: str | None = None  # the output must be JSON matching this schema (JSON text); see grammar.py

    def __post_init__(self):
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (0.0 <= self.temperature <= 100.0, "temperature must be between 0 and 100"),
            (self.top_k >= 0, "top_k must be 0 (off) or positive"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]"),
            (len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings are accepted"),
            (all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
             f"stop strings must be non-empty strings of at most {MAX_STOP_CHARS} characters"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be a non-negative integer"),
            (all(isinstance(t, int) and t >= 0 and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS
                 for t, b in self.logit_bias),
             f"logit_bias maps token ids to biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def raw_logits_suffice(self) -> bool:
        """No penalties, biases or grammar reshape the logits and no log-probs are reported: the raw logits decide
        the token."""
        return (not (self.logprobs or self.top_logprobs or self.logit_bias) and self.json_schema is None
                and self.repetition_penalty == 1.0 and self.presence_penalty == 0.0 and self.frequency_penalty == 0.0)

    @property
    def plain_greedy(self) -> bool:
        """The next token is the argmax of the raw logits: a backend may pick it on its device."""
        return self.greedy and self.raw_logits_suffice


# The device sampler takes 1/temperature and top_p in bf16; below this floor they could round to inf or 0
# there (not verified on a card), so such requests are sampled on the host.
DEVICE_SAMPLER_FLOOR = 0.01


@dataclass(frozen=True)
class DeviceDraw:
    """One slot's draw for a backend that samples on its device: softmax(logits / temperature) over the
    top_k most likely tokens, cut to top_p, with a fresh seed each step. A seeded request repeats its
    tokens for the same batch mix; the device's random numbers differ from the host's, so whether a step
    samples on the device or on the host (it depends on every request in the step) changes the tokens."""

    top_k: int
    top_p: float
    temperature: float
    seed: int  # below 2**31, so that it fits any 32-bit integer tensor


def device_sampleable(params: SamplingParams, top_k_limit: int) -> bool:
    """Whether a device sampler limited to top_k_limit candidates draws from the same distribution as
    `sample_token` (up to the device's bf16 top_p and 1/temperature): no penalties, min-p or log-probs,
    and greedy or a top_k within the limit. Temperatures and top_p below DEVICE_SAMPLER_FLOOR are drawn on the
    host, whose float64 sampler is exact for any accepted value."""
    if params.greedy:
        return params.raw_logits_suffice
    return (params.raw_logits_suffice and params.min_p == 0.0 and 0 < params.top_k <= top_k_limit
            and min(params.temperature, params.top_p) >= DEVICE_SAMPLER_FLOOR)


def device_draw(params: SamplingParams, generator: np.random.Generator | None) -> DeviceDraw:
    """The request's next draw, its seed taken from the request's generator."""
    if params.greedy:
        return DeviceDraw(top_k=1, top_p=1.0, temperature=1.0, seed=0)
    seed = int((generator or np.random.default_rng()).integers(0, 2**31 - 1))
    return DeviceDraw(top_k=params.top_k, top_p=params.top_p, temperature=params.temperature, seed=seed)


@dataclass
class TokenChoice:
    token_id: int
    logprob: float | None = None  # under the model's distribution (raw logits)
    top: list[tuple[int, float]] = field(default_factory=list)


@np.errstate(over="ignore")  # held at the largest finite value below
def apply_penalties(logits: np.ndarray, params: SamplingParams, prompt_ids, output_ids) -> np.ndarray:
    """The penalties and the logit bias, in place; the result stays finite (a penalty as small as 5e-324 would
    overflow even float64: such logits are held at the dtype's largest value, which keeps them first)."""
    if params.repetition_penalty != 1.0:
        seen = np.array(sorted(set(prompt_ids) | set(output_ids)), dtype=np.int64)
        if len(seen):
            values = logits[seen]
            p = params.repetition_penalty
            logits[seen] = np.where(values > 0, values / p, values * p)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = Counter(output_ids)
        ids = np.array(list(counts), dtype=np.int64)
        freq = np.array(list(counts.values()), dtype=logits.dtype)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * freq
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits[list(ids)] += np.array(biases, dtype=logits.dtype)
    largest = np.finfo(logits.dtype).max
    return np.clip(logits, -largest, largest, out=logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


@np.errstate(over="ignore")  # a tiny temperature sends logits to -inf: meant
def filter_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, top-p and min-p: removed tokens get -inf. Finite logits give finite or -inf
    results for every accepted setting: the largest logit is subtracted before the division, so the top token
    scales to exactly 0 and a tiny temperature sends the others to -inf, never to NaN."""
    logits = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < logits.size:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if params.top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        probs = softmax(logits[order])
        # keep the smallest prefix whose mass reaches top_p; the most likely token stays however small top_p is
        drop = (np.cumsum(probs) - probs) >= params.top_p
        drop[0] = False
        logits = logits.copy()
        logits[order[drop]] = -np.inf
    if params.min_p > 0.0:
        probs = softmax(logits)
        logits = np.where(probs < params.min_p * probs.max(), -np.inf, logits)
    return logits


NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or infinity) for this request"


def check_finite(logits: np.ndarray) -> None:
    if not np.isfinite(logits).all():
        raise GenerationError(NON_FINITE_LOGITS)


def sample_token(
    logits, params: SamplingParams, prompt_ids, output_ids, generator: np.random.Generator | None,
    allowed: np.ndarray | None = None,
) -> TokenChoice:
    """Pick the next token from fp32 logits [vocab] (a numpy array or a CPU torch tensor) for one request; only
    where `allowed` (bool [vocab]) is True when given (a grammar's mask). The sampler works in float64, where the
    smallest accepted top_p, temperature and penalty (down to 5e-324) are representable; fp32 rounds them to 0.
    Non-finite logits raise GenerationError. Log-probs stay those of the model's own distribution."""
    raw = np.asarray(logits)
    check_finite(raw)
    logits = apply_penalties(raw.astype(np.float64), params, prompt_ids, output_ids)
    if allowed is not None:
        logits = np.where(allowed, logits, -np.inf)
    if params.greedy:
        token = int(logits.argmax())
    else:
        probs = softmax(filter_logits(logits, params))
        token = int((generator or np.random.default_rng()).choice(probs.size, p=probs))
    choice = TokenChoice(token)
    if params.logprobs or params.top_logprobs:
        logprobs = log_softmax(raw.astype(np.float32))
        choice.logprob = float(logprobs[token])
        if params.top_logprobs:
            count = min(params.top_logprobs, logprobs.size)
            top = np.argpartition(-logprobs, count - 1)[:count]
            top = top[np.argsort(-logprobs[top], kind="stable")]
            choice.top = [(int(t), float(logprobs[t])) for t in top]
    return choice
