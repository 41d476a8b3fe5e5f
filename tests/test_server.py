"""`bitnet-tt serve` as a user runs it: a real server process on 127.0.0.1, driven by the openai client and httpx.

All traffic goes to 127.0.0.1; every wait is bounded in count and time; each fixture stops its server.
Checks count tokens rather than time, so that a slow or busy machine does not make them flaky. The last test
runs the app in-process (no socket) to break its backend on purpose.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from bitnet_tt.config import ModelConfig
from bitnet_tt.tokenizer import ChatMessage, Tokenizer

HOST = "127.0.0.1"
MODEL = "tiny"
API_KEY = "sk-test-0123456789"
CONTEXT = 4096  # long enough that a request nobody cancels would visibly run on
LONG = 3000  # max_tokens of requests that are meant to be cut short
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
GAUGES = ("bitnet_tt_requests_waiting", "bitnet_tt_requests_running", "bitnet_tt_slots_in_use")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m bitnet_tt.cli serve` on a free loopback port; output goes to a file, never to a pipe that fills."""

    def __init__(self, model, log_path, *options, env: dict | None = None):
        self.url = f"http://{HOST}:{free_port()}"
        self.log_path = log_path
        # float64: outputs under concurrent load are compared with outputs alone, and in fp32 a batch's order of
        # sums could flip an activation tie on some CPUs.
        cmd = [sys.executable, "-m", "bitnet_tt.cli", "serve", "--model", str(model), "--model-name", MODEL,
               "--host", HOST, "--port", self.url.rsplit(":", 1)[1], "--dtype", "float64", "--quiet", *options]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_healthy(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}:\n{self.log()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"the server was not healthy within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, api_key: str = "unused") -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=api_key, timeout=60, max_retries=0)

    def post(self, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers=headers, timeout=60, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {name: float(value) for line in text.splitlines() if line and not line.startswith("#")
                for name, value in [line.rsplit(" ", 1)]}

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """Metrics once no request waits or runs and no KV-cache slot is held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            metrics = self.metrics()
            if all(metrics[g] == 0 for g in GAUGES):
                return metrics
            time.sleep(0.05)
        pytest.fail(f"the server did not become idle within {timeout} s: {[(g, metrics[g]) for g in GAUGES]}")


def start_server(model, log_path, *options, env=None):
    server = ServerProcess(model, log_path, *options, env=env)
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("packed", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    yield from start_server(model, tmp_path_factory.mktemp("server") / "log", "--max-batch", "4", "--max-queue", "64")


@pytest.fixture(scope="module")
def guarded(model, tmp_path_factory):
    """One slot, one waiting request at most, an API key from the environment."""
    log = tmp_path_factory.mktemp("guarded") / "log"
    yield from start_server(model, log, "--max-batch", "1", "--max-queue", "1", env={"BITNET_TT_API_KEY": API_KEY})


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def stream_text(stream, stop_after: int | None = None) -> tuple[str, list[str], str | None, object]:
    """(text, tokens when logprobs were asked, finish_reason, usage) of a completions or chat stream."""
    text, tokens, finish, usage = [], [], None, None
    with stream:  # leaving it closes the connection: a client that stops early disconnects
        for count, chunk in enumerate(stream, 1):
            usage = chunk.usage or usage
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            text.append((choice.delta.content or "") if hasattr(choice, "delta") else choice.text)
            if choice.logprobs is not None and hasattr(choice.logprobs, "tokens"):
                tokens += choice.logprobs.tokens
            finish = choice.finish_reason or finish
            if stop_after is not None and count >= stop_after:
                break
    return "".join(text), tokens, finish, usage


# --- the happy path ---------------------------------------------------------------------------------


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion_counts_usage(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, **GREEDY)
    tokenizer = Tokenizer(model, ModelConfig.from_folder(model))
    prompt_tokens = len(tokenizer.encode_chat([ChatMessage(**m) for m in messages]))
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 7)
    assert reply.usage.total_tokens == prompt_tokens + 7


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streaming_equals_non_streaming(client, endpoint):
    if endpoint == "chat":
        create = client.chat.completions.create
        args = dict(messages=[{"role": "user", "content": "Tell me about ternary weights."}], max_completion_tokens=12)
        text_of = lambda reply: reply.choices[0].message.content
    else:
        create = client.completions.create
        args = dict(prompt="BitNet b1.58 is", max_tokens=12)
        text_of = lambda reply: reply.choices[0].text
    whole = create(model=MODEL, **args, **GREEDY)
    text, _, finish, usage = stream_text(create(model=MODEL, **args, **GREEDY, stream=True,
                                                stream_options={"include_usage": True}))
    assert text == text_of(whole) and finish == whole.choices[0].finish_reason == "length"
    assert usage.model_dump() == whole.usage.model_dump()


def test_stop_strings_end_the_text(client):
    args = dict(model=MODEL, prompt="Request number 2: tell me about the sea", max_tokens=16, **GREEDY)
    full = client.completions.create(**args).choices[0].text
    stop = next((c for c in full if c != full[0]), None)
    assert stop is not None, f"the tiny model's greedy text has one repeated character: {full!r}"
    expected = full[: full.index(stop)]
    for stops in (stop, ["never-seen", stop]):
        reply = client.completions.create(**args, stop=stops)
        assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, "stop")
        text, _, finish, _ = stream_text(client.completions.create(**args, stop=stops, stream=True))
        assert (text, finish) == (expected, "stop")


def test_seeded_sampling_is_reproducible(client):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.5, top_p=0.9, seed=1234,
                presence_penalty=0.5, frequency_penalty=0.5, logprobs=0,
                extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True})
    first, again = (client.completions.create(**args).choices[0].logprobs.tokens for _ in range(2))
    assert first == again and len(first) == 12


def test_logprobs(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          logprobs=True, top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy: the best token
    text = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, logprobs=2, **GREEDY)
    logprobs = text.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


# --- disconnects, concurrency, limits -------------------------------------------------------------------


def generated_tokens(server) -> float:
    return server.metrics()["bitnet_tt_generation_tokens_total"]


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client):
    before = generated_tokens(server)
    stream = client.completions.create(model=MODEL, prompt="Go on forever", max_tokens=LONG, stream=True, **GREEDY)
    stream_text(stream, stop_after=2)
    after = server.wait_idle()["bitnet_tt_generation_tokens_total"]
    assert 2 <= after - before < LONG / 2


def test_a_client_that_leaves_a_plain_request_frees_its_slot(server):
    before = generated_tokens(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=httpx.Timeout(60, read=0.3),
                   json={"model": MODEL, "prompt": "Go on", "max_tokens": LONG, "temperature": 0, "ignore_eos": True})
    after = server.wait_idle()["bitnet_tt_generation_tokens_total"]
    assert after - before < LONG / 2


def test_concurrent_streams_share_the_engine_and_leave_nothing_behind(server, client):
    """32 streaming clients on 4 slots; every 4th leaves early. Survivors get what they get when alone."""
    topics = ["cats", "BitNet", "the sea", "ternary weights", "a fox", "你好", "🙂", "dogs"]
    requests = [dict(prompt=f"Client {i}: tell me about {topics[i % 8]}", max_tokens=4 + i % 9) for i in range(32)]
    leavers = set(range(3, 32, 4))

    def run(i: int, stream: bool):
        args = dict(model=MODEL, logprobs=0, **GREEDY, **requests[i])
        if not stream:
            reply = client.completions.create(**args).choices[0]
            return reply.text, reply.logprobs.tokens, reply.finish_reason, None
        if i in leavers:
            args["max_tokens"] = LONG
        return stream_text(client.completions.create(**args, stream=True), stop_after=2 if i in leavers else None)

    alone = {i: run(i, stream=False) for i in range(32) if i not in leavers}
    with ThreadPoolExecutor(max_workers=32) as pool:
        together = list(pool.map(lambda i: run(i, stream=True), range(32), timeout=120))
    for i, expected in alone.items():
        assert together[i][:3] == expected[:3], f"client {i}"
        assert len(expected[1]) == requests[i]["max_tokens"]
    for i in leavers:
        assert len(together[i][1]) == 2
    server.wait_idle()


def test_a_full_queue_answers_429_at_once(guarded):
    client = httpx.Client(base_url=guarded.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    body = dict(model=MODEL, prompt="Hold the slot", max_tokens=LONG, temperature=0, ignore_eos=True, stream=True)
    with client, client.stream("POST", "/v1/completions", json=body) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: an abandoned httpx line iterator closes the connection
        next(lines)  # its first token: it holds the only slot
        with client.stream("POST", "/v1/completions", json=body) as waiting:
            assert waiting.status_code == 200  # submitted: it waits for the slot
            started = time.monotonic()
            rejected = client.post("/v1/completions", json={**body, "stream": False})
            assert time.monotonic() - started < 10
            assert rejected.status_code == 429 and rejected.json()["error"]["code"] == "queue_full"
    guarded.wait_idle()


def test_api_key(guarded):
    assert httpx.get(guarded.url + "/v1/models", timeout=10).status_code == 401
    wrong = httpx.get(guarded.url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    client = guarded.client(api_key=API_KEY)
    assert [m.id for m in client.models.list().data] == [MODEL]
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert reply.usage.completion_tokens <= 2
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200
    assert API_KEY not in guarded.log()


# --- bad input ----------------------------------------------------------------------------------------

OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
OK_TEXT = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None, None),
    ("/v1/chat/completions", b"", 400, None, None),
    ("/v1/chat/completions", {**OK_CHAT, "temperature": "hot"}, 400, "temperature", None),
    ("/v1/chat/completions", {**OK_CHAT, "temperature": 1e9}, 400, None, None),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": -5}, 400, "max_tokens", None),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 10**12}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {**OK_CHAT, "top_p": 0}, 400, None, None),
    ("/v1/chat/completions", {**OK_CHAT, "top_logprobs": 1000}, 400, None, None),
    ("/v1/chat/completions", {**OK_CHAT, "seed": -1}, 400, None, None),
    ("/v1/chat/completions", {**OK_CHAT, "n": 2}, 400, "n", None),
    ("/v1/chat/completions", {**OK_CHAT, "stop": [""]}, 400, None, None),
    ("/v1/chat/completions", {**OK_CHAT, "stop": 7}, 400, "stop", None),
    ("/v1/chat/completions", {**OK_CHAT, "stream": "yes"}, 400, "stream", None),
    ("/v1/chat/completions", {**OK_CHAT, "logit_bias": "lots"}, 400, "logit_bias", None),
    ("/v1/chat/completions", {**OK_CHAT, "messages": "Hi"}, 400, "messages", None),
    ("/v1/chat/completions", {**OK_CHAT, "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "robot", "content": "Hi"}]}, 400, None, None),
    ("/v1/chat/completions", {**OK_CHAT, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/completions", {**OK_TEXT, "prompt": "word " * (CONTEXT + 100)}, 400, None, "context_length_exceeded"),
    ("/v1/completions", {**OK_TEXT, "prompt": [1, 10**9]}, 400, None, None),
    ("/v1/completions", {**OK_TEXT, "prompt": []}, 400, None, None),
    ("/v1/completions", {**OK_TEXT, "logprobs": 99}, 400, None, None),
    ("/v1/completions", {**OK_TEXT, "prompt": "a" * (2 << 20)}, 413, None, "request_too_large"),
    ("/v1/embeddings", OK_TEXT, 404, None, None),
])
def test_bad_input_gets_an_openai_error(server, path, body, status, param, code):
    sent = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = server.post(path, headers={"Content-Type": "application/json"}, **sent)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and (error["param"], error["code"]) == (param, code), error
    assert server.post("/v1/completions", json=OK_TEXT).status_code == 200  # and it keeps serving


def test_metrics_exposition(server, client):
    client.completions.create(model=MODEL, prompt="count me", max_tokens=3, **GREEDY)
    server.post("/v1/completions", json={**OK_TEXT, "n": 3})
    metrics = server.wait_idle()
    assert metrics['bitnet_tt_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert metrics['bitnet_tt_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
    assert metrics["bitnet_tt_prompt_tokens_total"] > 0 and metrics["bitnet_tt_generation_tokens_total"] >= 3
    for histogram in ("bitnet_tt_time_to_first_token_seconds", "bitnet_tt_inter_token_latency_seconds"):
        assert metrics[f'{histogram}_bucket{{le="+Inf"}}'] == metrics[f"{histogram}_count"] > 0
    assert httpx.get(server.url + "/metrics", timeout=10).headers["content-type"].startswith("text/plain")


def test_an_engine_failure_fails_requests_instead_of_hanging(model):
    """In-process (no socket): a backend that breaks mid-generation gives a 500 and an unhealthy server."""
    from fastapi.testclient import TestClient

    from bitnet_tt.backends.torch.backend import load_torch_backend
    from bitnet_tt.engine import Engine
    from bitnet_tt.server import create_app

    def lose_the_device(slots, token_ids):
        raise RuntimeError("device lost")

    backend = load_torch_backend(model, max_slots=2, max_context=64, dtype="float32", progress=False)
    backend.decode = lose_the_device  # prefill works, so the first token goes out before the failure
    engine = Engine(backend, Tokenizer(model, ModelConfig.from_folder(model)))
    with TestClient(create_app(engine, MODEL)) as client:
        streamed = client.post("/v1/completions", json={**OK_TEXT, "max_tokens": 5, "stream": True})
        assert streamed.status_code == 200 and '"error"' in streamed.text and "device lost" in streamed.text
        later = client.post("/v1/completions", json=OK_TEXT)
        assert later.status_code == 500 and "device lost" in later.json()["error"]["message"]
        assert client.get("/health").status_code == 503
