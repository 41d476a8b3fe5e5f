"""Continuous batching over a backend's slots: each step decodes every running slot and prefills the next
prompt chunks (scheduler.py) in one backend call, reusing cached prompt prefixes (slots.py); it streams text
and cancels."""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..backends.base import Backend, PrefillPart, StepResult
from ..errors import BitNetError, CapacityError, GenerationError, RequestError
from ..grammar import GrammarCompiler, TokenConstraint
from ..sampling import (
    NON_FINITE_LOGITS,
    DeviceDraw,
    SamplingParams,
    TokenChoice,
    device_draw,
    device_sampleable,
    sample_token,
)
from ..tokenizer import ChatMessage, StreamDecoder, Tokenizer
from .pacing import MIXED_STEP_LIMIT, Pacer
from .request import Request, RequestOutput, RequestStatus
from .scheduler import IDLE_PREFILL_CHUNK, PrefillChunk, Scheduler, StepPlan
from .slots import SlotPool
from .stops import StopScanner

if TYPE_CHECKING:
    from ..backends.base import Logits

logger = logging.getLogger("bitnet_tt.engine")
PROMPT_OVERFLOW = ("error", "truncate")  # what to do with a prompt that does not fit the context
# Failures of one backend method (step, or the prefill, decode, ... a step made) with no success of it between
# them, before the engine gives up (raises BackendBroken from step()) instead of failing request after request
# on a broken backend.
MAX_BACKEND_FAILURES_IN_A_ROW = 3


@dataclass
class EngineStats:
    steps: int = 0
    step_seconds: float = 0.0
    backend_seconds: float = 0.0
    generated_tokens: int = 0
    decode_step_seconds: list[float] = field(default_factory=list)

    @property
    def overhead_fraction(self) -> float:
        """Share of step time spent outside the backend (scheduling, sampling, detokenising)."""
        return 1.0 - self.backend_seconds / self.step_seconds if self.step_seconds else 0.0


@dataclass
class _TextState:
    """Per-request streaming state: the detokeniser and the stop-string scanner (it holds back text that may
    start a stop string)."""

    decoder: StreamDecoder
    stops: StopScanner


class BackendBroken(Exception):
    """A backend method failed MAX_BACKEND_FAILURES_IN_A_ROW calls in a row: the engine cannot go on."""


class Engine:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, prompt_overflow: str = "error",
                 prefill_chunk: int | None = None, mixed_step_limit: float | None = MIXED_STEP_LIMIT,
                 idle_prefill_chunk: int = IDLE_PREFILL_CHUNK):
        """prefill_chunk: prompt tokens prefilled per step at most while users decode (None: the backend's
        default_prefill_chunk); mixed_step_limit: on a backend that paces prefill, a step with prompt tokens costs
        at most this many decode-only steps by measurement (pacing.py; None: fixed chunks of prefill_chunk);
        idle_prefill_chunk: prompt tokens of a step in which nobody decodes (at least prefill_chunk)."""
        if prompt_overflow not in PROMPT_OVERFLOW:
            raise RequestError(f"prompt_overflow must be one of {PROMPT_OVERFLOW}")
        prefill_chunk = backend.default_prefill_chunk if prefill_chunk is None else prefill_chunk
        for name, value in (("prefill_chunk", prefill_chunk), ("idle_prefill_chunk", idle_prefill_chunk)):
            if not isinstance(value, int) or value < 1:
                raise RequestError(f"{name} must be a positive number of tokens, got {value!r}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.prompt_overflow = prompt_overflow
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Request] = {}  # slot -> request, in admission order
        self._text: dict[str, _TextState] = {}
        self._cancelled: set[str] = set()
        self._ids = itertools.count()
        self.slots = SlotPool(backend.max_slots)
        if mixed_step_limit is not None and not mixed_step_limit > 1:
            raise RequestError(f"mixed_step_limit must be above 1 (decode steps), got {mixed_step_limit!r}")
        paced = backend.paces_prefill and mixed_step_limit is not None
        self.pacer = Pacer(backend.chunk_work, mixed_step_limit) if paced else None
        self.scheduler = Scheduler(self.slots, prefill_chunk, prefix_prefill=backend.supports_prefix_prefill,
                                   copies_slots=backend.copies_slots, pacer=self.pacer, idle_chunk=idle_prefill_chunk)
        self.last_plan = StepPlan()  # what the latest step ran (tests and benchmarks read it)
        self._backend_failures: Counter = Counter()  # per backend method: failures since its last success
        self._grammar: GrammarCompiler | None = None  # built on first use (it converts the tokenizer)
        self._grammar_lock = threading.Lock()  # not self._lock: the engine thread need not wait for the build

    # -- submitting ------------------------------------------------------------------------------

    def submit(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None,
        on_output: Callable[[RequestOutput], None] | None = None, request_id: str | None = None,
    ) -> Request:
        """Queue a request (text or token ids); thread-safe. Raises CapacityError/RequestError on bad input."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        ids = self._fit_prompt(ids)
        self._check_token_ids(params)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        request = Request(
            id=request_id or f"req-{next(self._ids)}", prompt_ids=ids, params=params, on_output=on_output,
            generator=np.random.default_rng(seed), constraint=self._constraint(params),
        )
        with self._lock:
            self._text[request.id] = _TextState(StreamDecoder(self.tokenizer), StopScanner(params.stop))
            self._waiting.append(request)
        return request

    def submit_chat(self, messages: Sequence[ChatMessage], params: SamplingParams | None = None, **kwargs) -> Request:
        return self.submit(self.tokenizer.encode_chat(list(messages)), params, **kwargs)

    def cancel(self, request_id: str) -> None:
        """Stop a request (also midway through its prompt); its slot is freed at the start of the next step.
        Thread-safe."""
        with self._lock:
            self._cancelled.add(request_id)

    def _constraint(self, params: SamplingParams) -> TokenConstraint | None:
        if params.json_schema is None:
            return None
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarCompiler(self.tokenizer, self.backend.config.vocab_size)
        return self._grammar.constraint(params.json_schema)

    def _check_token_ids(self, params: SamplingParams) -> None:
        vocab = self.backend.config.vocab_size
        if any(token >= vocab for token, _ in params.logit_bias):
            raise RequestError(f"logit_bias token ids must be in [0, {vocab})")

    def _fit_prompt(self, ids: list[int]) -> list[int]:
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.backend.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        room = self.backend.max_context - 1  # at least one position left for generated tokens
        if len(ids) > room:
            if self.prompt_overflow == "error":
                raise CapacityError(
                    f"the prompt has {len(ids)} tokens but the context holds {self.backend.max_context} "
                    f"(at most {room} prompt tokens)"
                )
            ids = ids[-room:]
        return ids

    # -- running ----------------------------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    @property
    def slots_in_use(self) -> int:
        """Slots serving a request (free slots may still hold a cached prompt)."""
        return len(self._running)

    def step(self) -> list[RequestOutput]:
        """Decode every decoding slot once and prefill the next prompt chunks (admitting waiting requests).

        An error fails the requests it concerns (a sampling error its request, a failed backend call the
        requests of that call), never the others; when one backend method has failed
        MAX_BACKEND_FAILURES_IN_A_ROW times in a row it raises BackendBroken."""
        started = time.perf_counter()
        outputs: list[RequestOutput] = []
        self._apply_cancellations(outputs)
        with self._lock:
            plan = self.scheduler.plan(self._waiting, list(self._running.values()))
        for request in plan.admitted:
            self._running[request.slot] = request
            self.backend.keep_prefix(request.slot, request.cached_tokens)
        called = time.perf_counter()
        greedy = all(r.params.plain_greedy for r in plan.decode)  # no logits needed: the backend picks the tokens
        draws = None if greedy else self._device_draws(plan.decode)  # the backend samples on its device
        result = self._backend_step(plan, greedy, draws, outputs)  # None: it failed, and so have its requests
        if self.pacer and result is not None:
            self.pacer.observe(len(plan.decode), [(c.start, c.stop - c.start) for c in plan.prefill],
                               time.perf_counter() - called)
        completed = [] if result is None else [(c.request, logits) for c, part in zip(plan.prefill, result.prefill)
                                               if (logits := self._prefilled(c, part, outputs)) is not None]
        completed += self._copy_prefills(plan.copies, completed, outputs)
        # Every prompt is in its slot before any first token is accepted: one that ends at once frees its slot.
        for request, logits in completed:
            self._contained([request], outputs, self._accept, request, logits, outputs)
        if plan.decode:
            if result is not None:
                self._decoded(plan.decode, greedy, draws, result.decode, outputs)
            self.stats.decode_step_seconds.append(time.perf_counter() - called)
        self.last_plan = plan
        self.stats.steps += 1
        self.stats.step_seconds += time.perf_counter() - started
        self._deliver(outputs)
        method, failures = max(self._backend_failures.items(), key=lambda item: item[1], default=(None, 0))
        if failures >= MAX_BACKEND_FAILURES_IN_A_ROW:
            raise BackendBroken(f"the backend's {method} failed {failures} times in a row")
        return outputs

    def _backend_step(self, plan: StepPlan, greedy: bool, draws: list[DeviceDraw] | None,
                      outputs: list[RequestOutput]) -> StepResult | None:
        """One backend call for the step's prefill chunks and decode rows; if it raises, every request of the
        step fails, and the result is None."""
        if not plan.prefill and not plan.decode:
            return StepResult([], None)
        now = time.perf_counter()
        for chunk in plan.prefill:
            if chunk.start == chunk.request.cached_tokens:
                chunk.request.stats.prefill_started = now
        prefills = [PrefillPart(c.request.slot, c.request.prompt_ids[c.start : c.stop], c.completes_prompt)
                    for c in plan.prefill]
        slots, last = [r.slot for r in plan.decode], [r.output_ids[-1] for r in plan.decode]
        requests = [c.request for c in plan.prefill] + plan.decode
        return self._backend_call(requests, outputs, "step", self.backend.step, prefills, slots, last, greedy, draws)

    def _prefilled(self, chunk: PrefillChunk, part, outputs: list[RequestOutput]) -> Logits | None:
        """Record the chunk's prefill; return the first token's logits when it completes the prompt (None
        otherwise, or when the prefill failed, and so has the request)."""
        if self._failed([chunk.request], outputs, "prefill", part):
            return None
        chunk.request.prefilled = chunk.stop
        return part if chunk.completes_prompt else None

    def _decoded(self, decoding: list[Request], greedy: bool, draws, part, outputs: list[RequestOutput]) -> None:
        """Accept each decoding request's token: picked by the backend (greedy, or drawn on its device) or
        sampled here from its logits."""
        method = "decode_sampled" if draws else "decode_greedy" if greedy else "decode"
        if self._failed(decoding, outputs, method, part):
            return
        accept = self._accept if method == "decode" else self._accept_token
        for request, row in zip(decoding, part):
            self._contained([request], outputs, accept, request, row, outputs)

    def _failed(self, requests: list[Request], outputs: list[RequestOutput], method: str, part) -> bool:
        """Whether a part of the step's result is the error its call raised (then `requests` fail); counts the
        method's failures in a row."""
        failed = isinstance(part, Exception)
        self._backend_failures[method] = self._backend_failures[method] + 1 if failed else 0
        if failed:
            self._fail(requests, part, outputs)
        return failed

    def _copy_prefills(self, copies, completed, outputs) -> list[tuple[Request, Logits]]:
        """Requests with the same prompt as one prefilled in this step (the choices of an n > 1 request) get a
        copy of its slot's context and its logits; a copy whose source failed is prefilled in later steps."""
        logits_of = {id(request): logits for request, logits in completed}
        copied = []
        for source, target in copies:
            if id(source) in logits_of:
                target.stats.prefill_started = time.perf_counter()
                logits = self._backend_call([target], outputs, "copy_slot", self._copy_prefill, source, target,
                                            logits_of[id(source)])
                if logits is not None:
                    target.prefilled = len(target.prompt_ids)
                    copied.append((target, logits))
        return copied

    def _copy_prefill(self, source: Request, target: Request, logits: Logits) -> Logits:
        """Give `target` the context `source`'s prefill left in its slot; return that prefill's logits."""
        self.backend.copy_slot(source.slot, target.slot, len(target.prompt_ids))
        return logits

    def _backend_call(self, requests: list[Request], outputs: list[RequestOutput], method: str, fn, *args):
        """fn(*args), timed; if it raises, the requests it served fail (they hold slots of unknown state)."""
        result = self._contained(requests, outputs, self._timed, fn, *args)
        self._backend_failures[method] = 0 if result is not None else self._backend_failures[method] + 1
        return result

    def _contained(self, requests: list[Request], outputs: list[RequestOutput], fn, *args):
        """fn(*args), or None after failing `requests` with the error it raised."""
        try:
            return fn(*args)
        except Exception as exc:
            self._fail(requests, exc, outputs)
            return None

    def _fail(self, requests: list[Request], exc: Exception, outputs: list[RequestOutput]) -> None:
        if isinstance(exc, BitNetError):
            message = str(exc)
        else:
            logger.error("generating %s failed", ", ".join(r.id for r in requests), exc_info=exc)
            message = "internal error while generating (details are in the log)"
        for request in requests:
            if not request.finished:
                self._finish(request, "error", outputs, error=message)

    def _device_draws(self, decoding: list[Request]) -> list[DeviceDraw] | None:
        """Each request's draw for the backend's device sampler, or None when any of them needs the logits."""
        limit = self.backend.device_top_k_limit
        if not limit or not all(device_sampleable(r.params, limit) for r in decoding):
            return None
        return [device_draw(r.params, r.generator) for r in decoding]

    def _accept_token(self, request: Request, token: int, outputs: list[RequestOutput]) -> None:
        """A token the backend picked; -1 where its logits were not finite (Backend.decode_greedy)."""
        if not 0 <= token < self.backend.config.vocab_size:
            raise GenerationError(NON_FINITE_LOGITS if token == -1 else f"the backend picked token id {token}")
        self._accept_choice(request, TokenChoice(int(token)), outputs)

    @staticmethod
    def _deliver(outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if output.request.on_output:
                try:
                    output.request.on_output(output)
                except Exception:  # one consumer's failure must not cost the other requests their outputs
                    logger.exception("on_output callback of %s failed", output.request.id)

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.has_work():
            self.step()

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None) -> list[Request]:
        requests = [self.submit(p, params) for p in prompts]
        self.run()
        return requests

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text pieces of one request as they are produced (drives the engine itself)."""
        request = self.submit(prompt, params)
        while not request.finished:
            for output in self.step():
                if output.request is request and output.text:
                    yield output.text
        return request

    def _timed(self, fn, *args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.stats.backend_seconds += time.perf_counter() - started

    def _apply_cancellations(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [r for r in self._waiting if r.id in cancelled]
            for request in waiting:
                self._waiting.remove(request)
        for request in waiting + [r for r in self._running.values() if r.id in cancelled]:
            self._finish(request, "cancelled", outputs)

    # -- one sampled token --------------------------------------------------------------------------

    def _accept(self, request: Request, logits: Logits, outputs: list[RequestOutput]) -> None:
        constraint = request.constraint
        allowed = constraint.allowed() if constraint else None
        choice = sample_token(logits, request.params, request.prompt_ids, request.output_ids, request.generator,
                              allowed)
        if constraint:
            constraint.accept(choice.token_id)
        self._accept_choice(request, choice, outputs)

    def _accept_choice(self, request: Request, choice: TokenChoice, outputs: list[RequestOutput]) -> None:
        params = request.params
        now = time.perf_counter()
        request.stats.first_token = request.stats.first_token or now
        request.stats.token_times.append(now)
        request.output_ids.append(choice.token_id)
        request.choices.append(choice)
        self.stats.generated_tokens += 1
        state = self._text[request.id]
        if choice.token_id in self.tokenizer.stop_ids and not params.ignore_eos:  # an end id: its text is not shown
            text, _ = state.stops.feed(state.decoder.flush(), final=True)
            self._finish(request, "stop", outputs, [choice.token_id], text)
            return
        text, hit_stop = state.stops.feed(state.decoder.add(choice.token_id))
        complete = request.constraint is not None and request.constraint.complete  # the grammar's output is whole
        if not hit_stop and (complete or len(request.output_ids) >= params.max_new_tokens
                             or self._context_full(request)):
            tail, hit_stop = state.stops.feed(state.decoder.flush(), final=True)
            text += tail
            if not hit_stop:
                self._finish(request, "stop" if complete else "length", outputs, [choice.token_id], text)
                return
        if hit_stop:
            self._finish(request, "stop", outputs, [choice.token_id], text)
        else:
            request.text += text
            outputs.append(RequestOutput(request, text, [choice.token_id], False))

    def _context_full(self, request: Request) -> bool:
        # The sampled token still has to be written by the next decode step.
        return self.backend.slot_length(request.slot) + 1 > self.backend.max_context

    def _finish(self, request: Request, reason: str, outputs, token_ids=(), text: str = "",
                error: str | None = None) -> None:
        """End a request with its last text piece (or an error), free its slot, and report it."""
        self._text.pop(request.id, None)
        request.text += text
        request.finish_reason = reason
        request.error = error
        request.status = RequestStatus.FINISHED
        request.stats.finished = time.perf_counter()
        if request.slot is not None and self._running.get(request.slot) is request:
            del self._running[request.slot]
            self._release_slot(request)
        outputs.append(RequestOutput(request, text, list(token_ids), True))

    def _release_slot(self, request: Request) -> None:
        """Return the request's slot to the pool, its KV cache kept for later prompts unless it opted out or
        failed (a failed backend call leaves the slot in an unknown state)."""
        kept = []
        if self.scheduler.prefix_prefill and request.params.cache_prompt and request.finish_reason != "error":
            fed = request.prompt_ids + request.output_ids  # the order the tokens went into the slot
            kept = fed[: self.backend.slot_length(request.slot)]
        if not kept:
            self.backend.free(request.slot)
        self.slots.release(request.slot, kept)
