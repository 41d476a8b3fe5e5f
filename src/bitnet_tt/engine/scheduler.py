"""One step's plan: every decoding slot decodes once, and at most `prefill_chunk` prompt tokens are prefilled.

Long prompts thus advance chunk by chunk between decode steps instead of stalling every running user for
a whole prefill. A step in which nobody decodes has no stream to hold back: it takes up to `idle_chunk` prompt
tokens (at least prefill_chunk), as a chunk pays the step's fixed cost (every weight read once) again. With a
pacer (pacing.py), a step's prompt tokens are further limited by their measured cost while users decode, at
least one token a step. Prompt tokens go first come, first served: to requests already
prefilling, in the order they were admitted, then to waiting requests, which are admitted (given a slot) only
when the budget reaches them. So the head of the queue is admitted once the prompts ahead of it are prefilled
and a slot is free: within (their remaining prompt tokens) / prefill_chunk + 1 steps, and paced, within
(their remaining prompt tokens) + 1 steps plus one decode-only step after every pacing.DECODE_REFRESH.

A backend that cannot prefill into a slot that already holds context (`supports_prefix_prefill` false)
gets whole prompts, as many as fit the budget and always at least one, and no prefix reuse. A backend that
copies slots gives a request whose prompt equals one completed in the same step (the choices of an n > 1
request) a copy of that slot instead of a prefill, outside the budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .pacing import Pacer, TokenBudget
from .request import Request, RequestStatus
from .slots import SlotPool

# A step's prompt tokens when no user decodes. A lone 512-token prompt through the engine, 2B-4T shapes, cpu
# backend on a Zen 5 (2 cores): chunks of 16 took 2.03-2.08 s, one chunk 1.77-1.78 s (Backend.prefill alone:
# 1.74-1.77 s). It bounds how long such a step runs (a cancel or a new request waits for it).
IDLE_PREFILL_CHUNK = 512


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start, stop) of a request, to be appended to its slot."""

    request: Request
    start: int
    stop: int

    @property
    def completes_prompt(self) -> bool:
        """The chunk ends the prompt: its logits give the request's first token."""
        return self.stop == len(self.request.prompt_ids)


@dataclass
class StepPlan:
    admitted: list[Request] = field(default_factory=list)  # given a slot in this step (slot, cached_tokens set)
    prefill: list[PrefillChunk] = field(default_factory=list)
    copies: list[tuple[Request, Request]] = field(default_factory=list)  # (source, target): same prompt, one prefill
    decode: list[Request] = field(default_factory=list)

    @property
    def prefill_tokens(self) -> int:
        return sum(c.stop - c.start for c in self.prefill)


class Scheduler:
    def __init__(self, slots: SlotPool, prefill_chunk: int, prefix_prefill: bool, copies_slots: bool,
                 pacer: Pacer | None = None, idle_chunk: int = IDLE_PREFILL_CHUNK):
        """prefix_prefill: the backend prefills into a slot that holds context (chunks, prefix reuse);
        copies_slots: it copies one slot's context into another; pacer: sizes chunks by measured cost (only
        with prefix_prefill); idle_chunk: a step's prompt tokens when nobody decodes (at least prefill_chunk)."""
        self.slots, self.prefill_chunk, self.idle_chunk = slots, prefill_chunk, max(prefill_chunk, idle_chunk)
        self.prefix_prefill, self.copies_slots = prefix_prefill, copies_slots
        self.pacer = pacer if prefix_prefill else None

    def plan(self, waiting: deque[Request], running: list[Request]) -> StepPlan:
        """Plan one step; admitted requests leave `waiting` (running: in admission order)."""
        plan = StepPlan()
        decode_rows = sum(not request.prefilling for request in running)
        if not decode_rows:
            budget = TokenBudget(self.idle_chunk)
        else:
            budget = (self.pacer and self.pacer.budget(decode_rows, self.prefill_chunk)) or TokenBudget(self.prefill_chunk)
        for request in running:
            if request.prefilling:
                self._take_chunk(plan, request, budget)
            else:
                plan.decode.append(request)
        while waiting and self.slots.has_free:
            source = self._completed_twin(plan, waiting[0])
            if source is None and budget.exhausted:
                break
            request = waiting.popleft()
            reuse = source is None and self.prefix_prefill and request.params.cache_prompt
            request.slot, request.cached_tokens = self.slots.acquire(request.prompt_ids, reuse)
            request.prefilled = request.cached_tokens
            request.status = RequestStatus.RUNNING
            plan.admitted.append(request)
            if source is None:
                self._take_chunk(plan, request, budget)
            else:
                plan.copies.append((source, request))
        return plan

    def _completed_twin(self, plan: StepPlan, request: Request) -> Request | None:
        """A request whose prefill of the same prompt completes in this plan, if the backend copies slots."""
        if not self.copies_slots:
            return None
        return next((c.request for c in plan.prefill
                     if c.completes_prompt and c.request.prompt_ids == request.prompt_ids), None)

    def _take_chunk(self, plan: StepPlan, request: Request, budget) -> None:
        """Plan the request's next prompt tokens within `budget` (a TokenBudget or pacing.CostBudget), which
        they use up."""
        if budget.exhausted:
            return
        remaining = len(request.prompt_ids) - request.prefilled
        if self.prefix_prefill:
            count = budget.take(request.prefilled, remaining)
        else:  # whole prompts
            count, budget.tokens = remaining, budget.tokens - remaining
        if count:
            plan.prefill.append(PrefillChunk(request, request.prefilled, request.prefilled + count))
