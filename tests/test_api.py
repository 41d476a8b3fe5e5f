"""The Python API (`from bitnet_tt import LLM`) on the tiny synthetic model."""

from __future__ import annotations

import pytest

from bitnet_tt import LLM
from bitnet_tt.api import GENERATE_SAMPLING, sampling_params
from bitnet_tt.errors import BitNetError

PROMPTS = ["The quick brown fox", "BitNet is a model that", "Hello"]


@pytest.fixture(scope="module")
def llm(model_factory):
    # float64: a batch of prompts must equal each prompt alone, and in fp32 the batch's summation order
    # could flip an activation tie on some CPUs.
    with LLM(model_factory("packed"), max_batch=4, max_context=256, dtype="float64") as loaded:
        yield loaded


def test_generate_is_greedy_by_default_and_batches_like_single_prompts(llm):
    alone = [llm.generate(p, max_new_tokens=8) for p in PROMPTS]
    assert all(isinstance(text, str) for text in alone)
    assert llm.generate(PROMPTS[0], max_new_tokens=8) == alone[0]  # greedy: the same text again
    assert llm.generate(PROMPTS, max_new_tokens=8) == alone  # a list gives a list, each as if alone


def test_stream_pieces_make_the_generated_text(llm):
    pieces = list(llm.stream(PROMPTS[1], max_new_tokens=12))
    assert len(pieces) >= 1 and "".join(pieces) == llm.generate(PROMPTS[1], max_new_tokens=12)


def test_chat_answers_the_rendered_conversation(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = llm.engine.tokenizer.render_chat([llm_message(m) for m in messages])
    assert llm.chat(messages, temperature=0.0, max_new_tokens=8) == llm.generate(rendered, max_new_tokens=8)


def test_api_and_cli_share_sampling_defaults(llm, monkeypatch):
    from bitnet_tt.cli import build_parser

    submitted = []
    submit_chat = llm.submit_chat
    monkeypatch.setattr(llm, "submit_chat", lambda *args: submitted.append(submit_chat(*args)) or submitted[-1])
    llm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2)
    cli_chat = build_parser().parse_args(["chat"])
    assert (submitted[0].params.temperature, submitted[0].params.top_p) == (cli_chat.temperature, cli_chat.top_p)
    cli_generate = build_parser().parse_args(["generate", "x"])
    request = llm.finish(llm.submit("Hi", sampling_params(GENERATE_SAMPLING)))
    assert (request.params.temperature, request.params.max_new_tokens) == (cli_generate.temperature,
                                                                         cli_generate.max_new_tokens)


def test_sampling_parameters_are_checked(llm):
    with pytest.raises(BitNetError, match="unknown sampling parameter"):
        llm.generate("Hi", temprature=0.5)
    with pytest.raises(BitNetError, match="temperature must be between 0 and 100"):
        llm.generate("Hi", temperature=-1)
    with pytest.raises(BitNetError, match="the prompt is not valid UTF-8"):
        llm.generate("caf\udce9")  # a byte that was not UTF-8, as Python keeps it from argv
    with pytest.raises(BitNetError, match="needs 'role' and 'content'"):
        llm.chat([{"text": "Hi"}])


@pytest.mark.parametrize("options, message", [
    ({"max_context": 0}, "max_context must be at least 1"),
    ({"max_batch": 0}, "max_batch must be at least 1"),
    ({"device": "meta"}, "device 'meta' holds no data"),
    ({"backend": "nope"}, "unknown backend"),
])
def test_bad_options_are_refused(model_factory, options, message):
    with pytest.raises(BitNetError, match=message):
        LLM(model_factory("packed"), **options)


def test_closing_releases_the_backend(model_factory):
    released = []
    with LLM(model_factory("packed"), max_batch=1, max_context=64) as llm:
        llm.backend.close = lambda: released.append(True)  # observe the call the real backend gets
        assert llm.generate("Hi", max_new_tokens=2)
    assert released == [True] and llm.closed
    with pytest.raises(BitNetError, match="closed"):
        llm.generate("Hi")
    llm.close()  # a second close does nothing
    assert released == [True]


def llm_message(message: dict):
    from bitnet_tt.api import as_message

    return as_message(message)
