"""Hostile input and faults below the server: stop strings in linear time, one request's failure staying its
own in the engine, tiny sampling values through the CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from bitnet_tt import cli
from bitnet_tt.api import LLM
from bitnet_tt.backends import create_backend
from bitnet_tt.backends.base import StepResult
from bitnet_tt.backends.torch.backend import load_torch_backend
from bitnet_tt.config import ModelConfig
from bitnet_tt.engine import Engine
from bitnet_tt.engine.engine import MAX_BACKEND_FAILURES_IN_A_ROW, BackendBroken
from bitnet_tt.engine.stops import StopScanner
from bitnet_tt.errors import GenerationError
from bitnet_tt.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams
from bitnet_tt.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, max_new_tokens=8, ignore_eos=True, seed=7)


# --- stop strings -------------------------------------------------------------------------------------


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the text is cut: before the stop string that completes first (the longest if several do)."""
    ends = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if not ends:
        return None
    end, minus_length = min(ends)
    return end + minus_length


def longest_held(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def test_the_scanner_cuts_and_holds_back_as_a_plain_search_would():
    rng = random.Random(0)
    for _ in range(400):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 30)))
        scanner, shown, stopped, fed = StopScanner(tuple(stops)), "", False, ""
        pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
        for piece in pieces:
            fed += piece
            released, stopped = scanner.feed(piece)
            shown += released
            if stopped:
                break
            assert len(fed) - len(shown) == longest_held(fed, stops), (stops, fed)
        cut = first_stop(fed, stops)
        if cut is None:
            assert not stopped
            shown += scanner.feed("", final=True)[0]
            assert shown == fed
        else:
            assert stopped and shown == fed[:cut], (stops, fed, shown)


def test_stop_matching_work_does_not_grow_with_the_stop_strings():
    """The attack: long stop strings that almost match at every character. The old matcher compared every
    prefix of every stop string for every token (quadratic in their length); each matcher steps at most twice
    per character."""
    stops = tuple("a" * (MAX_STOP_CHARS - 1 - i) + "b" for i in range(MAX_STOP_STRINGS))
    scanner = StopScanner(stops)
    text = "a" * 5000 + "c"
    for start in range(0, len(text), 7):
        released, stopped = scanner.feed(text[start:start + 7])
        assert not stopped and len(scanner.held) < MAX_STOP_CHARS
    assert scanner.moves <= 2 * MAX_STOP_STRINGS * len(text)
    assert scanner.held == "" and scanner.feed("", final=True) == ("", False)


def test_a_bare_stop_string_stops_at_its_first_occurrence():
    scanner = StopScanner(("the end of the story",))
    assert scanner.feed("And that was the end of the") == ("And that was ", False)
    assert scanner.feed(" story, really.") == ("", True)


# --- faults ---------------------------------------------------------------------------------------------


def make_engine(folder, slots: int = 2) -> Engine:
    backend = load_torch_backend(folder, max_slots=slots, max_context=64, dtype="float64", progress=False)
    return Engine(backend, Tokenizer(folder, ModelConfig.from_folder(folder)))


def alone(folder, prompt: str, params: SamplingParams) -> list[int]:
    engine = make_engine(folder)
    request = engine.submit(prompt, params)
    engine.run()
    return request.output_ids


def spoil_slot(backend, slot: int, bad: float, method: str = "decode") -> None:
    """The backend's `method` returns `bad` logits for `slot` from now on (a numerical fault in one row)."""
    real = getattr(backend, method)

    def spoiled(slots, token_ids):
        logits = real(slots, token_ids).clone()
        if slot in slots:
            logits[list(slots).index(slot)] = bad
        return logits

    setattr(backend, method, spoiled)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_non_finite_logits_fail_their_request_only(tiny, params):
    engine = make_engine(tiny)
    victim, other = engine.submit("first", params), engine.submit("second", params)
    engine.step()  # both prefilled, in slots 0 and 1
    spoil_slot(engine.backend, victim.slot, float("nan"))
    engine.run()
    assert victim.finish_reason == "error" and "non-finite logits" in victim.error
    assert len(victim.output_ids) == 1  # the token from its prefill; no token from NaN logits
    assert other.finish_reason == "length" and other.output_ids == alone(tiny, "second", params)
    assert engine.backend.slot_length(victim.slot) == 0  # its slot is free again, and serves as before
    del engine.backend.decode
    again = engine.submit("second", params)
    engine.run()
    assert again.output_ids == other.output_ids


def test_a_failed_backend_call_fails_its_requests_and_the_engine_goes_on(tiny):
    engine = make_engine(tiny)
    real = engine.backend.prefill
    calls = iter([RuntimeError("flaky device")])

    def prefill_failing_once(slot, token_ids):
        if (error := next(calls, None)) is not None:
            raise error
        return real(slot, token_ids)

    engine.backend.prefill = prefill_failing_once
    failed, served = engine.submit("first", GREEDY), engine.submit("second", GREEDY)
    engine.run()
    assert failed.finish_reason == "error" and "flaky device" not in failed.error  # the text goes to the log only
    assert served.output_ids == alone(tiny, "second", GREEDY)


@pytest.mark.parametrize("method", ["prefill", "decode"])
def test_a_backend_method_that_keeps_failing_stops_the_engine(tiny, method):
    """Successes of another method (prefill before a failing decode) do not hide it."""
    engine = make_engine(tiny, slots=1)

    def lost(*args):
        raise RuntimeError("device lost")

    setattr(engine.backend, method, lost)
    requests = [engine.submit(f"prompt {i}", GREEDY) for i in range(MAX_BACKEND_FAILURES_IN_A_ROW)]
    with pytest.raises(BackendBroken, match="failed 3 times in a row"):
        for _ in range(2 * MAX_BACKEND_FAILURES_IN_A_ROW):
            engine.step()
    assert all(r.finish_reason == "error" for r in requests)


def test_a_failed_step_of_one_forward_pass_fails_its_requests_and_the_engine_goes_on(tiny):
    """The cpu backend runs a step's prompt chunk and decode rows in one forward pass: when it raises, every
    request of the step fails (their slots are in an unknown state); later requests are served as before, and a
    step that keeps failing stops the engine."""
    engine = Engine(create_backend("cpu", tiny, 2, max_context=64, progress=False),
                    Tokenizer(tiny, ModelConfig.from_folder(tiny)))
    decoding = engine.submit("first", GREEDY)
    engine.step()
    arriving = engine.submit("second", GREEDY)
    model = engine.backend.model
    forward, failures = model.forward, iter([RuntimeError("flaky device")])

    def forward_failing(*args):
        if (error := next(failures, None)) is not None:
            raise error
        return forward(*args)

    model.forward = forward_failing
    engine.step()
    assert decoding.finish_reason == arriving.finish_reason == "error" and len(decoding.output_ids) == 1
    again = engine.submit("second", GREEDY)
    engine.run()
    served_alone = Engine(create_backend("cpu", tiny, 1, max_context=64, progress=False), engine.tokenizer)
    assert again.output_ids == served_alone.generate(["second"], GREEDY)[0].output_ids
    failures = iter([RuntimeError("device lost")] * MAX_BACKEND_FAILURES_IN_A_ROW)
    for i in range(2 * MAX_BACKEND_FAILURES_IN_A_ROW):  # each step admits two
        engine.submit(f"prompt {i}", GREEDY)
    with pytest.raises(BackendBroken, match="step failed 3 times in a row"):
        for _ in range(MAX_BACKEND_FAILURES_IN_A_ROW):
            engine.step()


def test_the_api_raises_a_one_line_error_for_a_failed_request(tiny):
    with LLM(tiny, max_batch=1, max_context=64, dtype="float32") as llm:
        real = llm.backend.step  # the prompt's logits come back infinite
        llm.backend.step = lambda *args: StepResult([np.full_like(x, np.inf) for x in real(*args).prefill], None)
        with pytest.raises(GenerationError, match="non-finite logits"):
            llm.generate("Hello", max_new_tokens=4)


CLI_TINY_SETTINGS = [["--top-p", "1e-300"], ["--top-p", "1e-46"], ["--top-p", "5e-324"], ["--temperature", "1e-40"],
                     ["--temperature", "1e-45"], ["--temperature", "5e-324"], ["--repetition-penalty", "1e-300"],
                     ["--repetition-penalty", "1e-40"], ["--top-k", "1", "--top-p", "1e-300"]]


def refuse_non_finite(name: str):
    raise AssertionError(f"bare {name} in JSON output")


@pytest.mark.parametrize("options", CLI_TINY_SETTINGS, ids=" ".join)
def test_tiny_sampling_settings_through_the_cli(tiny, options, capsys):
    argv = ["generate", "--model", str(tiny), "--max-new-tokens", "3", "--json", "--logprobs", "2", *options, "Hi"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads(out, parse_constant=refuse_non_finite)
    assert len(result["token_ids"]) >= 1 and "Traceback" not in err
