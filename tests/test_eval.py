"""`bitnet-tt eval` on small random models: window plan, perplexity against a brute-force recomputation,
comparison figures, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bitnet_tt.backends.torch.backend import load_torch_backend
from bitnet_tt.errors import BitNetError
from bitnet_tt.eval import evaluate, windows
from test_cli import assert_one_line_error, run_cli


@pytest.mark.parametrize("n, context, stride", [(2, 8, 4), (100, 16, 8), (100, 16, 1), (101, 16, 15), (30, 64, 32)])
def test_every_token_after_the_first_is_scored_once_with_enough_context(n, context, stride):
    plan = windows(n, context, stride)
    scored = [p for w in plan for p in range(w.first_scored, w.end)]
    assert scored == list(range(1, n))
    for w in plan:
        assert w.end - w.start <= context and w.start < w.first_scored
        assert w.first_scored - w.start >= min(context - stride, w.first_scored)


@pytest.mark.parametrize("stride", [0, 16, 17])
def test_stride_must_leave_context(stride):
    with pytest.raises(BitNetError, match="stride"):
        windows(100, 16, stride)


def text_tokens(n: int, vocab: int = 300) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def test_perplexity_equals_a_fresh_prefill_per_token(model_factory):
    """Decoding windows in a batch of slots gives each token the probability a fresh prefill of exactly
    its window's preceding tokens gives (float64: only summation order differs)."""
    folder = model_factory("packed")
    tokens, context, stride = text_tokens(45), 16, 8
    batched = load_torch_backend(folder, max_slots=3, max_context=64, dtype="float64", progress=False)
    report = evaluate(batched, tokens, context, stride)

    alone = load_torch_backend(folder, max_slots=1, max_context=64, dtype="float64", progress=False)
    nll = []
    for w in windows(len(tokens), context, stride):
        for p in range(w.first_scored, w.end):
            alone.free(0)
            nll.append(-torch.log_softmax(alone.prefill(0, tokens[w.start : p]), -1)[tokens[p]].item())
    assert report["scored"] == len(tokens) - 1 == len(nll)
    assert report["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-12)


def test_a_backend_against_itself_agrees_fully(model_factory):
    folder = model_factory("packed")
    one, two = (load_torch_backend(folder, max_slots=4, max_context=64, dtype="float64", progress=False) for _ in "ab")
    report = evaluate(one, text_tokens(70), 32, 16, reference=two, greedy_prompts=3, greedy_tokens=8, prompt_tokens=5)
    ref = report["reference"]
    assert ref["perplexity"] == report["perplexity"]
    assert ref["kl_mean"] == ref["kl_p99"] == 0 and ref["top1_agreement"] == 1
    assert ref["greedy"]["matched"] == [8, 8, 8] and ref["greedy"]["prompt_starts"] == [0, 32, 65]


def test_bf16_is_compared_with_fp32(model_factory):
    folder = model_factory("packed")
    bf16, fp32 = (load_torch_backend(folder, max_slots=4, max_context=64, dtype=d, progress=False)
                  for d in ("bfloat16", "float32"))
    ref = evaluate(bf16, text_tokens(70), 32, 16, reference=fp32, greedy_prompts=2, greedy_tokens=8)["reference"]
    assert 0 < ref["kl_mean"] <= ref["kl_p99"]  # bf16 rounding shows; the figures are ordered
    assert ref["top1_agreement"] > 0.5


def test_cli_table_and_json(model_factory, tmp_path):
    folder = model_factory("packed")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    common = ["eval", "--model", folder, "--text", text, "--context", "32", "--quiet", "--greedy-tokens", "4"]
    table = run_cli(*common, "--reference-dtype", "float32")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "windows of 32 every 16" in lines[0] and "perplexity" in lines[1]
    assert lines[2].startswith("torch float32") and lines[3].startswith("cpu, LM head bf16")  # the default backend
    alone = run_cli(*common, "--json", "--max-tokens", "40", "--dtype", "float32")
    report = json.loads(alone.stdout)
    assert report["tokens"] == 40 and report["scored"] == 39 and report["reference"] is None
    assert report["perplexity"] > 1


@pytest.mark.parametrize("content, args, message", [
    (None, [], "no such file"),
    (b"\xff\xfe bad", [], "not UTF-8"),
    (b"  \n", [], "the text is empty"),
    (b"some text here", ["--context", "8", "--stride", "8"], "stride (8) must be"),
])
def test_cli_bad_input_is_one_line(model_factory, tmp_path, content, args, message):
    text = tmp_path / "text.txt"
    if content is not None:
        text.write_bytes(content)
    result = run_cli("eval", "--model", model_factory("packed"), "--text", text, "--quiet", *args)
    assert_one_line_error(result, message)


def test_eval_without_a_model_outside_a_clone(monkeypatch, tmp_path, capsys):
    from bitnet_tt import cli

    monkeypatch.setattr(cli, "TRAINED_MODEL", tmp_path / "absent")
    assert cli.main(["eval", "--quiet"]) == 2
    assert "comes only with a clone of the repository" in capsys.readouterr().err
