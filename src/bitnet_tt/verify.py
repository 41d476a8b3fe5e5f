"""`bitnet-tt verify`: a backend against the golden PyTorch backend on the same checkpoint.

Last-token logits over a fixed set of short and long prompts (PCC, top-1 and top-5 agreement), then
how many greedy tokens the two produce identically (each fed its own tokens) up to `greedy_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .backends.base import Backend

if TYPE_CHECKING:
    from .backends.base import Logits

PROMPT_LENGTHS = (1, 7, 33, 128, 300, 1000)
PCC_TARGET = 0.99  # the Tenstorrent backend's target against the PyTorch backend


@dataclass
class PromptResult:
    length: int
    pcc: float
    top1: bool
    top5_overlap: float


def pcc(a: Logits, b: Logits) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


def fixed_prompts(vocab: int, max_length: int) -> list[list[int]]:
    """Deterministic token prompts (the same on every machine), as long as the context allows."""
    gen = torch.Generator().manual_seed(2025)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS if n < max_length]


def compare_logits(candidate: Backend, reference: Backend, prompts: list[list[int]]) -> list[PromptResult]:
    results = []
    for ids in prompts:
        candidate.free(0)
        reference.free(0)
        got, want = torch.as_tensor(candidate.prefill(0, ids)), torch.as_tensor(reference.prefill(0, ids))
        top5 = set(got.topk(5).indices.tolist()) & set(want.topk(5).indices.tolist())
        results.append(PromptResult(len(ids), pcc(got, want), int(got.argmax()) == int(want.argmax()), len(top5) / 5))
    return results


def greedy_match_length(candidate: Backend, reference: Backend, prompt: list[int], steps: int) -> int:
    """Tokens generated identically from the start (each backend continues from its own choices)."""
    candidate.free(0)
    reference.free(0)
    a, b = int(candidate.prefill(0, prompt).argmax()), int(reference.prefill(0, prompt).argmax())
    matched = 0
    while a == b and matched < steps:
        matched += 1
        if matched == steps or candidate.slot_length(0) + 1 >= candidate.max_context:
            break
        a, b = int(candidate.decode([0], [a])[0].argmax()), int(reference.decode([0], [b])[0].argmax())
    return matched


def verify(candidate: Backend, reference: Backend, greedy_tokens: int = 128) -> dict:
    prompts = fixed_prompts(candidate.config.vocab_size, min(candidate.max_context, reference.max_context))
    results = compare_logits(candidate, reference, prompts)
    steps = min(greedy_tokens, candidate.max_context - len(prompts[1]) - 1)
    matched = greedy_match_length(candidate, reference, prompts[1], steps)
    return {
        "prompts": [r.__dict__ for r in results],
        "min_pcc": min(r.pcc for r in results),
        "top1_agreement": sum(r.top1 for r in results) / len(results),
        "top5_overlap": sum(r.top5_overlap for r in results) / len(results),
        "greedy_match": matched,
        "greedy_steps": steps,
        "passed": min(r.pcc for r in results) >= PCC_TARGET,
    }


def per_op_report(candidate: Backend, folder) -> tuple[list[str], bool]:
    """The ttnn backend's first prefill and decode step, op by op, against the host stand-in fed the same
    inputs (tools/tt_host/per_op.py, in a clone of the repository): report lines, and whether all agree."""
    from .checkpoint import load_weights
    from .errors import BitNetError

    try:
        from tools.tt_host.per_op import compare_per_op, describe, stand_in_twin
    except ImportError:
        raise BitNetError("--per-op needs the host stand-in in tools/ of a clone of bitnet-tt: run it from the "
                          "repository root") from None
    prompt = fixed_prompts(candidate.config.vocab_size, candidate.max_context)[2]
    report = compare_per_op(candidate, stand_in_twin(candidate, load_weights(folder, progress=False)), prompt)
    return describe(report), report.first_wrong is None


def print_report(report: dict, candidate: str, reference: str) -> None:
    print(f"comparing {candidate} (candidate) with {reference} (reference)")
    print(f"{'prompt tokens':>13} {'PCC':>9} {'top-1':>6} {'top-5':>6}")
    for r in report["prompts"]:
        print(f"{r['length']:>13} {r['pcc']:>9.5f} {'yes' if r['top1'] else 'no':>6} {r['top5_overlap']:>6.2f}")
    print(f"min PCC {report['min_pcc']:.5f} (target {PCC_TARGET}); top-1 {report['top1_agreement']:.2f}; "
          f"top-5 overlap {report['top5_overlap']:.2f}; greedy match {report['greedy_match']}/{report['greedy_steps']} tokens")
    print(f"{'PASSED' if report['passed'] else 'FAILED'}: {candidate} against {reference}")
