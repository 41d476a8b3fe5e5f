"""`bitnet-tt eval`: the perplexity of a text, and how far a backend or dtype is from a reference run.

Perplexity (as llama.cpp's llama-perplexity and HF's strided recipe): the text is tokenised once, with
BOS, and read through windows of `context` tokens that start every `stride` tokens. Each window scores
only the tokens the previous one did not, so every token but the first is scored once, with at least
`context - stride` tokens before it (the first window's tokens: all that precede them).

A window runs on the generation paths themselves: its unscored head is prefilled (the last logits
predict the first scored token), then the scored tokens are decoded one at a time, many windows at
once in the backend's slots. Against a reference backend fed the same tokens: KL(reference ‖ candidate)
of each next-token distribution (mean and 99th percentile), how often the top-1 tokens agree, and how
many greedy tokens the two generate identically from prompts taken from the text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .backends.base import Backend
from .errors import BitNetError
from .verify import greedy_match_length


@dataclass(frozen=True)
class Window:
    start: int  # first token fed
    first_scored: int  # first token whose probability counts
    end: int  # one past the last token


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    if not 1 <= stride < context:
        raise BitNetError(f"the stride ({stride}) must be at least 1 and less than the context ({context})")
    if n_tokens < 2:
        raise BitNetError("the text is too short: it needs at least one token after BOS")
    result, scored_up_to = [], 1
    for start in range(0, n_tokens, stride):
        end = min(start + context, n_tokens)
        result.append(Window(start, scored_up_to, end))
        scored_up_to = end
        if end == n_tokens:
            break
    return result


def next_token_logits(backend: Backend, tokens: Sequence[int],
                      batch: Sequence[Window]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits [k, vocab], targets [k]) step by step for a batch of windows, one slot each."""
    for slot, w in enumerate(batch):
        backend.free(slot)
    heads = [torch.as_tensor(backend.prefill(slot, tokens[w.start : w.first_scored])) for slot, w in enumerate(batch)]
    yield torch.stack(heads), torch.tensor([tokens[w.first_scored] for w in batch])
    for offset in range(1, max(w.end - w.first_scored for w in batch)):
        active = [(slot, w.first_scored + offset) for slot, w in enumerate(batch) if w.first_scored + offset < w.end]
        logits = torch.as_tensor(backend.decode([s for s, _ in active], [tokens[p - 1] for _, p in active]))
        yield logits, torch.tensor([tokens[p] for _, p in active])


@dataclass
class Totals:
    nll: float = 0.0
    count: int = 0

    def add(self, log_probs: torch.Tensor, targets: torch.Tensor) -> None:
        self.nll -= log_probs.gather(-1, targets[:, None]).sum().item()
        self.count += len(targets)

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.nll / self.count, dtype=torch.float64).exp())


def evaluate(candidate: Backend, tokens: Sequence[int], context: int, stride: int, reference: Backend | None = None,
             greedy_prompts: int = 4, greedy_tokens: int = 64, prompt_tokens: int = 16) -> dict:
    """Perplexity of `tokens` on the candidate (and on the reference, with the comparison figures)."""
    backends = [candidate] + ([reference] if reference else [])
    context = min(context, *(b.max_context for b in backends))
    plan = windows(len(tokens), context, stride)
    slots = min(b.max_slots for b in backends)
    totals = [Totals() for _ in backends]
    kl, top1 = [], []
    for i in range(0, len(plan), slots):
        batch = plan[i : i + slots]
        for steps in zip(*(next_token_logits(b, tokens, batch) for b in backends)):
            log_probs = [torch.log_softmax(logits.double(), -1) for logits, _ in steps]
            targets = steps[0][1]
            for total, lp in zip(totals, log_probs):
                total.add(lp, targets)
            if reference:
                got, want = log_probs
                kl.append((want.exp() * (want - got)).sum(-1))
                top1.append(got.argmax(-1) == want.argmax(-1))
    report = {"tokens": len(tokens), "scored": totals[0].count, "context": context, "stride": stride,
              "perplexity": totals[0].perplexity}
    if reference:
        kl_all = torch.cat(kl)
        report["reference"] = {
            "perplexity": totals[1].perplexity,
            "kl_mean": kl_all.mean().item(),
            "kl_p99": torch.quantile(kl_all, 0.99).item(),
            "top1_agreement": torch.cat(top1).double().mean().item(),
            "greedy": greedy_agreement(candidate, reference, tokens, greedy_prompts, greedy_tokens, prompt_tokens),
        }
    return report


def greedy_agreement(candidate: Backend, reference: Backend, tokens: Sequence[int], prompts: int, steps: int,
                     prompt_tokens: int) -> dict:
    """Greedy tokens generated identically (each backend continuing from its own) after `prompts` prompts
    of `prompt_tokens` tokens, taken at even spacing from the text."""
    prompt_tokens = min(prompt_tokens, len(tokens))
    steps = min(steps, candidate.max_context - prompt_tokens - 1, reference.max_context - prompt_tokens - 1)
    last_start = len(tokens) - prompt_tokens
    starts = sorted({last_start * k // max(prompts - 1, 1) for k in range(prompts)})
    matched = [greedy_match_length(candidate, reference, list(tokens[s : s + prompt_tokens]), steps) for s in starts]
    return {"steps": steps, "prompt_tokens": prompt_tokens, "prompt_starts": starts, "matched": matched}


def print_table(report: dict, candidate: str, reference: str | None, text: str) -> None:
    print(f"{text}: {report['tokens']} tokens, {report['scored']} scored, windows of {report['context']} "
          f"every {report['stride']}")
    width = max(len(candidate), len(reference or ""), 7)
    print(f"{'run':<{width}} {'perplexity':>10} {'KL mean':>9} {'KL p99':>9} {'top-1':>7}  greedy agreement")
    if reference is None:
        print(f"{candidate:<{width}} {report['perplexity']:>10.3f}")
        return
    ref = report["reference"]
    greedy = ref["greedy"]
    matched = " ".join(f"{m}/{greedy['steps']}" for m in greedy["matched"])
    print(f"{reference:<{width}} {ref['perplexity']:>10.3f} {'(ref)':>9} {'':>9} {'':>7}")
    print(f"{candidate:<{width}} {report['perplexity']:>10.3f} {ref['kl_mean']:>9.2e} {ref['kl_p99']:>9.2e} "
          f"{ref['top1_agreement']:>7.2%}  {matched}")
