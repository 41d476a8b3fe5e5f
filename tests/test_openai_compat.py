"""What real OpenAI clients send, through the official `openai` client against the app in-process (no socket).

Fields the model cannot use are accepted and ignored with one log line per name, as vLLM does; fields whose
effect this server cannot honour are a 400 that says why.
"""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient
from openai import BadRequestError, OpenAI

from bitnet_tt.backends.torch.backend import load_torch_backend
from bitnet_tt.engine import Engine
from bitnet_tt.server import create_app
from bitnet_tt.tokenizer import ChatMessage

MODEL = "tiny"
CONTEXT = 256
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def http(tiny, tokenizer):
    backend = load_torch_backend(tiny, max_slots=4, max_context=CONTEXT, dtype="float32", progress=False)
    with TestClient(create_app(Engine(backend, tokenizer), MODEL)) as http:
        yield http


@pytest.fixture(scope="module")
def client(http):
    return OpenAI(base_url=str(http.base_url) + "/v1", api_key="unused", http_client=http, max_retries=0)


def chat(client, messages=HI, max_tokens=4, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                          **{**GREEDY, **kwargs})


# --- accepted and ignored -------------------------------------------------------------------------------


def test_fields_the_model_cannot_use_are_ignored(client):
    plain = chat(client).choices[0].message.content
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    reply = chat(client, tools=tools, tool_choice="auto", parallel_tool_calls=False, store=False, user="u-1",
                 metadata={"run": "7"}, service_tier="auto", stream_options=None,
                 extra_body={**GREEDY["extra_body"], "chat_template_kwargs": {}})
    assert reply.choices[0].message.content == plain
    text = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, user="u-1", echo=False, best_of=1,
                                     suffix=None, **GREEDY)
    assert text.choices[0].finish_reason == "length"


def test_each_ignored_field_is_logged_once(client, caplog):
    with caplog.at_level(logging.WARNING, logger="bitnet_tt.server"):
        for _ in range(3):
            chat(client, extra_body={**GREEDY["extra_body"], "x_compat_probe": 1})
    lines = [r.getMessage() for r in caplog.records if "x_compat_probe" in r.getMessage()]
    assert len(lines) == 1 and "ignoring the request field 'x_compat_probe'" in lines[0]


def test_stream_options_include_usage_is_honoured(client):
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": False}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_developer_messages_are_system_messages(client, tokenizer):
    as_system = chat(client, [{"role": "system", "content": "Be brief."}, *HI], logprobs=True)
    as_developer = chat(client, [{"role": "developer", "content": "Be brief."}, *HI], logprobs=True)
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens == len(
        tokenizer.encode_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]))
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content


def test_assistant_content_may_be_null_and_content_a_list_of_text_parts(client, tokenizer):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": None, "refusal": None},
                {"role": "user", "content": "Go on"}]
    reply = chat(client, messages)
    expected = [ChatMessage("user", "Hello there"), ChatMessage("assistant", ""), ChatMessage("user", "Go on")]
    assert reply.usage.prompt_tokens == len(tokenizer.encode_chat(expected))


# --- refused with a clear 400 ---------------------------------------------------------------------------


@pytest.mark.parametrize("change, param, words", [
    (dict(tool_choice="required"), "tool_choice", "cannot call tools"),
    (dict(tool_choice={"type": "function", "function": {"name": "weather"}}), "tool_choice", "cannot call tools"),
    (dict(modalities=["text", "audio"]), "modalities", "text only"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages", "'image_url' are not supported"),
    (dict(messages=[{"role": "user", "content": None}]), "messages", "needs content"),
    (dict(messages=[{"role": "tool", "content": "42", "tool_call_id": "c1"}]), "messages", "role"),
])
def test_what_cannot_be_honoured_is_a_400(client, change, param, words):
    args = {"messages": HI, **change}
    with pytest.raises(BadRequestError) as error:
        client.chat.completions.create(model=MODEL, max_tokens=2, **args)
    body = error.value.body
    assert error.value.status_code == 400 and body["param"] == param and words in body["message"], body


@pytest.mark.parametrize("change, param", [(dict(echo=True), "echo"), (dict(suffix="end"), "suffix"),
                                           (dict(best_of=3), "best_of")])
def test_completion_options_we_cannot_honour_are_a_400(client, change, param):
    with pytest.raises(BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, **change)
    assert error.value.body["param"] == param


def test_wrong_types_are_still_a_400(http):
    for body in ({"model": MODEL, "messages": HI, "temperature": "0.5"},
                 {"model": MODEL, "messages": HI, "stream_options": {"include_usage": "yes"}},
                 {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}):
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["message"], response.text


# --- logit_bias -------------------------------------------------------------------------------------------


def test_logit_bias_steers_the_tokens(client, tokenizer):
    def tokens(**kwargs) -> list[str]:
        reply = client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, logprobs=0, **GREEDY, **kwargs)
        return reply.choices[0].logprobs.tokens

    favourite = tokenizer.encode("fox", add_bos=False)[0]
    assert tokens(logit_bias={str(favourite): 100}) == [tokenizer.token_text(favourite)] * 5
    plain = tokens()
    banned = tokens(logit_bias={str(tokenizer.encode(plain[0], add_bos=False)[0]): -100})
    assert banned[0] != plain[0]


@pytest.mark.parametrize("bias", [{"5": 101}, {"5": "up"}, {"fox": 1}, {"1000000": 1}])
def test_bad_logit_bias_is_a_400(client, bias):
    with pytest.raises(BadRequestError):
        chat(client, logit_bias=bias)


# --- /tokenize, /detokenize, /version ----------------------------------------------------------------------


def test_tokenize_as_vllm_and_llama_cpp_send_it(http, tokenizer):
    text = "Hello there 🙂"
    vllm = http.post("/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert vllm["tokens"] == tokenizer.encode(text) and vllm["count"] == len(vllm["tokens"])
    assert vllm["max_model_len"] == CONTEXT and "".join(vllm["token_strs"][1:]).startswith("Hello there")
    without_bos = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert without_bos == tokenizer.encode(text, add_bos=False)
    llama_cpp = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [t["id"] for t in llama_cpp] == without_bos  # llama.cpp adds no BOS unless add_special is set
    assert llama_cpp[0]["piece"] == tokenizer.token_text(without_bos[0])
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()["tokens"]
    assert chat == tokenizer.encode_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")], False)


def test_detokenize_inverts_tokenize(http, tokenizer):
    text = "Ternary weights: -1, 0, +1. 你好"
    ids = tokenizer.encode(text, add_bos=False)
    answer = http.post("/detokenize", json={"model": MODEL, "tokens": ids}).json()
    assert answer == {"prompt": text, "content": text}


@pytest.mark.parametrize("path, body, status", [
    ("/tokenize", {"prompt": "a", "messages": HI}, 400),
    ("/tokenize", {}, 400),
    ("/tokenize", {"prompt": 5}, 400),
    ("/tokenize", {"model": "gpt-4", "prompt": "a"}, 404),
    ("/detokenize", {"tokens": [10**9]}, 400),
    ("/detokenize", {"tokens": "abc"}, 400),
])
def test_bad_tokenizer_requests(http, path, body, status):
    response = http.post(path, json=body)
    assert response.status_code == status and response.json()["error"]["message"], response.text


def test_version(http):
    from bitnet_tt import __version__

    assert http.get("/version").json() == {"version": __version__}


# --- n > 1 -----------------------------------------------------------------------------------------------


def test_n_greedy_choices_are_the_single_answer(client):
    one = chat(client, max_tokens=6)
    three = chat(client, max_tokens=6, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens and three.usage.completion_tokens == 18


def test_n_seeded_choices_differ_and_repeat(client):
    def tokens() -> list[list]:
        reply = chat(client, max_tokens=8, temperature=5.0, seed=7, n=4, logprobs=True)
        return [[t.bytes for t in c.logprobs.content] for c in sorted(reply.choices, key=lambda c: c.index)]

    first = tokens()
    assert first == tokens() and len({str(t) for t in first}) > 1


def test_n_streamed_choices_equal_the_whole_reply(client):
    whole = chat(client, max_tokens=6, n=2, temperature=1.0, seed=3)
    texts, finishes = ["", ""], [None, None]
    chunks = list(chat(client, max_tokens=6, n=2, temperature=1.0, seed=3, stream=True,
                       stream_options={"include_usage": True}))
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices] and finishes == ["length", "length"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12


# --- response_format: grammar-constrained JSON ---------------------------------------------------------------

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
SCHEMAS = {  # name -> (schema, whether a value matches it)
    "person": (PERSON, lambda v: set(v) == {"name", "age", "ok", "tags"} and isinstance(v["name"], str)
               and len(v["name"]) <= 8 and type(v["age"]) is int and 0 <= v["age"] <= 150
               and isinstance(v["ok"], bool) and len(v["tags"]) <= 3 and set(v["tags"]) <= {"a", "b"}),
    "answer": ({"enum": ["yes", "no", "maybe"]}, lambda v: v in ("yes", "no", "maybe")),
    "pair": ({"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "boolean"}},
             lambda v: len(v) == 2 and all(isinstance(x, bool) for x in v)),
    "nested": ({"type": "object", "required": ["point"], "additionalProperties": False,
                "properties": {"point": {"type": "object", "required": ["x", "y"], "additionalProperties": False,
                                         "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                        "y": {"type": "number", "enum": [0.5, 1.5]}}}}},
               lambda v: set(v) == {"point"} and set(v["point"]) == {"x", "y"} and -9 <= v["point"]["x"] <= 9
               and v["point"]["y"] in (0.5, 1.5)),
}


@pytest.mark.parametrize("name", SCHEMAS)
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.5, seed=11)])
def test_json_schema_output_parses_and_matches(client, name, sampling):
    schema, matches = SCHEMAS[name]
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=120, response_format=response_format,
                                           **sampling)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    assert matches(json.loads(choice.message.content)), choice.message.content


def test_json_object_output_is_an_object_and_streams_the_same(client):
    args = dict(model=MODEL, messages=HI, max_tokens=120, response_format={"type": "json_object"}, temperature=1.5,
                seed=5)
    whole = client.chat.completions.create(**args).choices[0]
    assert whole.finish_reason == "stop" and isinstance(json.loads(whole.message.content), dict)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)
                       if c.choices)
    assert streamed == whole.message.content


def test_a_cut_off_constrained_output_says_length(client):
    endless = {"type": "array", "items": {"type": "integer"}}  # the tiny model writes one long number
    reply = client.completions.create(model=MODEL, prompt="Numbers:", max_tokens=10, temperature=0,
                                      extra_body={"response_format": {"type": "json_schema",
                                                                      "json_schema": {"name": "n", "schema": endless}}})
    choice = reply.choices[0]
    assert (choice.finish_reason, reply.usage.completion_tokens) == ("length", 10)
    assert choice.text.startswith("[")  # the grammar held while it lasted; the JSON is unfinished
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.text)


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema"}, {"type": "xml"}, {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}},
    {"type": "json_schema", "json_schema": {"schema": "not a schema"}},
])
def test_bad_response_format_is_a_400(client, response_format):
    with pytest.raises(BadRequestError):
        chat(client, response_format=response_format)


# --- the key, the event stream, the metrics -------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tiny, tokenizer):
    backend = load_torch_backend(tiny, max_slots=1, max_context=64, dtype="float32", progress=False)
    with TestClient(create_app(Engine(backend, tokenizer), MODEL, api_key="sk-key")) as http:
        yield http


@pytest.mark.parametrize("path", ["/v1/models", "/tokenize", "/version"])
@pytest.mark.parametrize("authorization, status", [(None, 401), ("Bearer sk-wrong", 401), ("Basic sk-key", 401),
                                                   ("Bearer sk-key", 200), ("bearer sk-key", 200)])
def test_the_api_key_guards_the_new_routes(keyed, path, authorization, status):
    headers = {"Authorization": authorization} if authorization else {}
    send = (lambda p, **kw: keyed.post(p, json={"prompt": "Hi"}, **kw)) if path == "/tokenize" else keyed.get
    response = send(path, headers=headers)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_docs_show_every_request_body(keyed):
    spec = keyed.get("/openapi.json", headers={"Authorization": "Bearer sk-key"}).json()
    schemas = spec["components"]["schemas"]
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.removeprefix("#/components/schemas/") in schemas
    assert "response_format" in schemas["ChatCompletionRequest"]["properties"]
    assert schemas["ChatMessageIn"]["properties"]["content"]["anyOf"][1]["items"]["$ref"].endswith("/TextPart")


def test_the_event_stream_is_framed_as_openai_frames_it(http):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        raw = "".join(response.iter_text())
    assert response.headers["content-type"].startswith("text/event-stream")
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_metrics_count_tokens_and_responses(http):
    def scrape() -> dict[str, float]:
        text = http.get("/metrics").text
        return {k: float(v) for line in text.splitlines() if line and not line.startswith("#")
                for k, v in [line.rsplit(" ", 1)]}

    before = scrape()
    http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 5, "ignore_eos": True})
    after = scrape()
    ok = 'bitnet_tt_requests_total{endpoint="/v1/completions",status="200"}'
    assert after[ok] - before.get(ok, 0) == 1
    assert after["bitnet_tt_generation_tokens_total"] - before["bitnet_tt_generation_tokens_total"] == 5
    assert after["bitnet_tt_inter_token_latency_seconds_count"] - before["bitnet_tt_inter_token_latency_seconds_count"] == 4
    assert after["bitnet_tt_requests_running"] == 0
