"""`bitnet-tt serve` as a user runs it: a real server process on 127.0.0.1, driven by the openai client and httpx.

All traffic goes to 127.0.0.1; every wait is bounded in count and time; each fixture stops its server.
Checks count tokens rather than time, so that a slow or busy machine does not make them flaky. Hostile input
(issue 11) is sent as raw HTTP where the framing matters; a few checks run the app in-process (no socket) to
watch its threads or break its backend on purpose.
"""

from __future__ import annotations

import json
import os
import random
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

    def __init__(self, model, log_path, *options, env: dict | None = None, api_key: str | None = None,
                 quiet: bool = True, command: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # float64: outputs under concurrent load are compared with outputs alone, and in fp32 a batch's order of
        # sums could flip an activation tie on some CPUs.
        cmd = [*(command or [sys.executable, "-m", "bitnet_tt.cli"]), "serve", "--model", str(model),
               "--model-name", MODEL, "--host", HOST, "--port", str(self.port), "--dtype", "float64",
               *(["--quiet"] if quiet else []), *options]
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
        return httpx.post(self.url + path, headers={**self.headers, **(headers or {})}, timeout=60, **kwargs)

    def get(self, path: str, headers: dict | None = None) -> httpx.Response:
        return httpx.get(self.url + path, headers={**self.headers, **(headers or {})}, timeout=10)

    def raw(self, request: bytes, read_timeout: float = 60) -> bytes:
        """Send `request` as it is on a new connection; everything the server sends until it closes."""
        with socket.create_connection((HOST, self.port), timeout=read_timeout) as sock:
            sock.sendall(request)
            return read_until_closed(sock)

    def metrics(self) -> dict[str, float]:
        text = self.get("/metrics").text
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


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def start_server(model, log_path, *options, **kwargs):
    server = ServerProcess(model, log_path, *options, **kwargs)
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
    """One slot, one waiting request at most, an API key from the environment, /metrics open to scrapers."""
    log = tmp_path_factory.mktemp("guarded") / "log"
    yield from start_server(model, log, "--max-batch", "1", "--max-queue", "1", "--public-metrics",
                            env={"BITNET_TT_API_KEY": API_KEY})


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
    ("/v1/chat/completions", {**OK_CHAT, "n": 0}, 400, "n", None),
    ("/v1/chat/completions", {**OK_CHAT, "n": 1000}, 400, "n", None),
    ("/v1/chat/completions", {**OK_CHAT, "stop": [""]}, 400, None, None),
    ("/v1/chat/completions", {**OK_CHAT, "stop": 7}, 400, "stop", None),
    ("/v1/chat/completions", {**OK_CHAT, "stream": "yes"}, 400, "stream", None),
    ("/v1/chat/completions", {**OK_CHAT, "logit_bias": "lots"}, 400, "logit_bias", None),
    ("/v1/chat/completions", {**OK_CHAT, "messages": "Hi"}, 400, "messages", None),
    ("/v1/chat/completions", {**OK_CHAT, "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages", None),
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
    server.post("/v1/completions", json={**OK_TEXT, "n": 0})
    metrics = server.wait_idle()
    assert metrics['bitnet_tt_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert metrics['bitnet_tt_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
    assert metrics["bitnet_tt_prompt_tokens_total"] > 0 and metrics["bitnet_tt_generation_tokens_total"] >= 3
    for histogram in ("bitnet_tt_time_to_first_token_seconds", "bitnet_tt_inter_token_latency_seconds"):
        assert metrics[f'{histogram}_bucket{{le="+Inf"}}'] == metrics[f"{histogram}_count"] > 0
    assert httpx.get(server.url + "/metrics", timeout=10).headers["content-type"].startswith("text/plain")


# --- faults: one request's failure is its own; a dead engine ends the process ------------------------------

def refuse_non_finite(name: str):
    raise AssertionError(f"bare {name} in JSON output")


def cli_with_backend(patch: str) -> list[str]:
    """The CLI in a process whose TorchBackend is changed by `patch` (Python defining `TorchBackend` methods)."""
    return [sys.executable, "-c", "import sys\nfrom bitnet_tt.backends.torch.backend import TorchBackend\n"
            "from bitnet_tt.cli import main\n" + patch + "\nsys.exit(main(sys.argv[1:]))\n"]


# Every decode fails: prefill works, so the first token goes out before the failure.
BROKEN_CLI = cli_with_backend("""
def lose_the_device(*args):
    raise RuntimeError("device lost: internal detail")

TorchBackend.decode = lose_the_device
""")

# A prompt of over 100 tokens gets NaN logits from its prefill (a numerical fault in one request).
POISONED_CLI = cli_with_backend("""
import torch
prefill = TorchBackend.prefill

def poisoned(self, slot, token_ids):
    logits = prefill(self, slot, token_ids)
    return torch.full_like(logits, float("nan")) if self.slot_length(slot) > 100 else logits  # prefilled in chunks

TorchBackend.prefill = poisoned
""")


def test_non_finite_logits_fail_their_request_while_the_others_go_on(model, tmp_path):
    server = ServerProcess(model, tmp_path / "log", "--max-batch", "2", command=POISONED_CLI)
    try:
        server.wait_healthy()
        normal = {**OK_TEXT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        alone = server.post("/v1/completions", json=normal).json()["choices"][0]["text"]
        with ThreadPoolExecutor(max_workers=4) as pool:
            poisoned = [pool.submit(server.post, "/v1/completions", json={**OK_TEXT, "prompt": "word " * 150,
                                                                          "stream": stream}) for stream in (False, True)]
            together = pool.submit(server.post, "/v1/completions", json=normal)
            plain, streamed = (future.result(timeout=120) for future in poisoned)
            assert together.result(timeout=120).json()["choices"][0]["text"] == alone
        assert plain.status_code == 500, plain.text
        assert "non-finite logits" in plain.json()["error"]["message"]
        assert streamed.status_code == 200 and "non-finite logits" in streamed.text and "[DONE]" not in streamed.text
        for payload in [plain.text] + [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]:
            json.loads(payload, parse_constant=refuse_non_finite)  # no bare NaN or Infinity
        assert server.get("/health").status_code == 200 and server.wait_idle()
    finally:
        server.stop()


def test_a_backend_that_keeps_failing_fails_its_requests_and_ends_the_process(model, tmp_path):
    server = ServerProcess(model, tmp_path / "log", "--max-batch", "2", command=BROKEN_CLI)
    try:
        server.wait_healthy()
        failed = server.post("/v1/completions", json={**OK_TEXT, "max_tokens": 5, "stream": True})
        assert failed.status_code == 200 and '"error"' in failed.text and "[DONE]" not in failed.text
        assert "device lost" not in failed.text  # the exception's text goes to the log only
        for _ in range(5):  # after MAX_BACKEND_FAILURES_IN_A_ROW failures the server stops
            try:
                response = server.post("/v1/completions", json=OK_TEXT)
            except httpx.TransportError:
                break
            assert response.status_code in (500, 503) and "device lost" not in response.text
        assert server.proc.wait(timeout=60) == 1
    finally:
        server.stop()
    log = server.log()
    assert "device lost: internal detail" in log and "supervisor can restart" in log.splitlines()[-1]


def test_an_unexpected_error_answers_a_generic_message_and_an_id_found_in_the_log(model, caplog):
    """In-process: the tokenizer breaks; the client sees an id, the log holds the exception."""
    from fastapi.testclient import TestClient

    from bitnet_tt.backends.torch.backend import load_torch_backend
    from bitnet_tt.engine import Engine
    from bitnet_tt.server import create_app

    def broken(*args):
        raise RuntimeError("secret internal detail")

    backend = load_torch_backend(model, max_slots=1, max_context=64, dtype="float32", progress=False)
    engine = Engine(backend, Tokenizer(model, ModelConfig.from_folder(model)))
    engine.tokenizer.encode = broken
    with TestClient(create_app(engine, MODEL), raise_server_exceptions=False) as client:
        response = client.post("/v1/completions", json=OK_TEXT)
        assert client.get("/health").status_code == 200
    message = response.json()["error"]["message"]
    assert response.status_code == 500 and "secret" not in response.text
    error_id = message.split("error id ")[1].split(":")[0]
    assert any(error_id in r.getMessage() and "secret internal detail" in str(r.exc_info) for r in caplog.records)


def test_prompts_are_tokenised_off_the_event_loop(model):
    """A long prompt's tokenising must not hold up the event loop (and /health with it)."""
    import asyncio

    from fastapi.testclient import TestClient

    from bitnet_tt.backends.torch.backend import load_torch_backend
    from bitnet_tt.engine import Engine
    from bitnet_tt.server import create_app

    backend = load_torch_backend(model, max_slots=1, max_context=64, dtype="float32", progress=False)
    engine = Engine(backend, Tokenizer(model, ModelConfig.from_folder(model)))
    on_the_loop = []
    for name in ("encode", "encode_chat"):
        real = getattr(engine.tokenizer, name)

        def spy(*args, real=real, **kwargs):
            try:
                asyncio.get_running_loop()
                on_the_loop.append(True)
            except RuntimeError:  # no event loop runs in this thread
                on_the_loop.append(False)
            return real(*args, **kwargs)

        setattr(engine.tokenizer, name, spy)
    with TestClient(create_app(engine, MODEL)) as client:
        assert client.post("/v1/completions", json=OK_TEXT).status_code == 200
        assert client.post("/v1/chat/completions", json=OK_CHAT).status_code == 200
    assert len(on_the_loop) >= 2 and not any(on_the_loop)


# --- issue 11: values that once disabled the server ---------------------------------------------------------

TINY_SETTINGS = [{"top_p": 1e-300}, {"top_p": 1e-46}, {"top_p": 5e-324}, {"temperature": 1e-40},
                 {"temperature": 1e-45}, {"temperature": 5e-324}, {"repetition_penalty": 1e-300},
                 {"repetition_penalty": 1e-40}, {"top_k": 1, "top_p": 1e-300}]


@pytest.mark.parametrize("setting", TINY_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_tiny_sampling_settings_are_served(server, setting):
    body = {**OK_CHAT, "max_tokens": 4, **setting}
    assert server.post("/v1/chat/completions", json=body).status_code == 200
    streamed = server.post("/v1/chat/completions", json={**body, "stream": True, "logprobs": True, "top_logprobs": 2})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    for payload in [line[6:] for line in streamed.text.splitlines() if line.startswith("data: {")]:
        json.loads(payload, parse_constant=refuse_non_finite)
    assert server.get("/health").status_code == 200
    assert server.post("/v1/completions", json=OK_TEXT).status_code == 200


@pytest.mark.parametrize("stop, status", [
    ("a bare stop string longer than sixteen characters", 200),
    (["x" * 1000] * 16, 200),
    (["x"] * 17, 400),
    (["x" * 1001], 400),
    ("x" * 1_040_000, 400),
])
def test_stop_strings_are_bounded_in_number_and_length(server, stop, status):
    response = server.post("/v1/completions", json={**OK_TEXT, "max_tokens": 3, "stop": stop})
    assert response.status_code == status, response.text[:300]


# --- issue 11: security --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure(model, tmp_path_factory):
    """An API key on the command line, the access log on, a short read timeout, few connections."""
    log = tmp_path_factory.mktemp("secure") / "log"
    yield from start_server(model, log, "--api-key", API_KEY, "--read-timeout", "1", "--max-connections", "8",
                            api_key=API_KEY, quiet=False)


@pytest.mark.parametrize("key_option", [["--api-key", ""], []])
def test_an_empty_api_key_is_refused(model, key_option):
    env = {**os.environ, "BITNET_TT_API_KEY": ""}
    done = subprocess.run([sys.executable, "-m", "bitnet_tt.cli", "serve", "--model", str(model), *key_option],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "API key is empty" in done.stderr


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"])
def test_with_a_key_every_path_but_health_needs_it(secure, path):
    assert httpx.get(secure.url + path, timeout=10).status_code == 401
    assert secure.get(path).status_code == 200
    assert httpx.get(secure.url + "/health", timeout=10).status_code == 200


def test_public_metrics_opens_metrics_only(guarded):
    assert httpx.get(guarded.url + "/metrics", timeout=10).status_code == 200
    assert httpx.get(guarded.url + "/docs", timeout=10).status_code == 401


def raw_request(method: str, path: str, host: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", *(f"{k}: {v}" for k, v in
                                                                                   (headers or {}).items())]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize("host, status", [
    ("attacker.example", 400), ("attacker.example:{port}", 400), ("127.0.0.1:1", 400),
    ("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("[::1]:{port}", 200), ("localhost", 200),
])
def test_a_loopback_server_answers_only_its_own_host_names(server, host, status):
    """DNS rebinding: a page at attacker.example resolved to 127.0.0.1 sends its own name as Host."""
    response = server.raw(raw_request("GET", "/v1/models", host.format(port=server.port)))
    assert status_of(response) == status, response[:300]


def test_a_cross_origin_simple_post_is_not_executed(server):
    """A browser sends text/plain across origins without a preflight: only application/json is taken."""
    before = generated_tokens(server)
    body = json.dumps({**OK_TEXT, "max_tokens": 3}).encode()
    host = f"{HOST}:{server.port}"
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Origin": "http://attacker.example", **({"Content-Type": content_type} if content_type else {})}
        response = server.raw(raw_request("POST", "/v1/completions", host, headers, body))
        assert status_of(response) == 415, response[:300]
    ok = server.raw(raw_request("POST", "/v1/completions", host, {"Content-Type": "application/json; charset=utf-8"},
                                body))
    assert status_of(ok) == 200
    assert generated_tokens(server) - before == 3  # only the JSON request generated


def test_query_strings_are_not_logged(secure):
    secret = "sk-in-the-query-0123"
    assert secure.get(f"/v1/models?api_key={secret}").status_code == 200
    assert httpx.get(f"{secure.url}/v1/models?key={secret}", timeout=10).status_code == 401
    log = secure.log()
    assert "GET /v1/models HTTP/1.1" in log and secret not in log and API_KEY not in log


# --- issue 11: slow clients ------------------------------------------------------------------------------


def test_a_client_that_sends_its_headers_slowly_is_disconnected(secure):
    """Slowloris: a connection that never completes its headers is closed after --read-timeout (1 s)."""
    sockets = [socket.create_connection((HOST, secure.port), timeout=60) for _ in range(4)]
    try:
        for sock in sockets:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert [read_until_closed(sock) for sock in sockets] == [b""] * 4  # closed without an answer
    finally:
        for sock in sockets:
            sock.close()
    assert secure.get("/health").status_code == 200


def test_a_body_that_never_completes_times_out(secure):
    head = raw_request("POST", "/v1/completions", f"{HOST}:{secure.port}",
                       {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    head = head.replace(b"Content-Length: 0", b"Content-Length: 1000")
    response = secure.raw(head + b'{"model": "tiny", ')
    assert status_of(response) == 408 and b"request_timeout" in response


def test_connections_beyond_the_limit_get_503(secure):
    idle = [socket.create_connection((HOST, secure.port), timeout=60) for _ in range(8)]
    try:
        assert secure.get("/health").status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 30
    while secure.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert secure.get("/health").status_code == 200


def test_a_client_that_never_reads_its_stream_is_cancelled(server):
    """Its outputs pile up once the socket buffers are full: beyond the bound, its request is cancelled.
    Twenty alternatives per token make each chunk large, so that the buffers fill early."""
    before = generated_tokens(server)
    most = CONTEXT - 32
    body = json.dumps({**OK_CHAT, "max_tokens": most, "temperature": 0, "ignore_eos": True, "stream": True,
                       "logprobs": True, "top_logprobs": 20}).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((HOST, server.port))
        sock.sendall(raw_request("POST", "/v1/chat/completions", f"{HOST}:{server.port}",
                                 {"Content-Type": "application/json"}, body))
        deadline = time.monotonic() + 60
        while generated_tokens(server) == before and time.monotonic() < deadline:
            time.sleep(0.05)  # until the request runs; nothing is read, ever
        after = server.wait_idle(timeout=300)["bitnet_tt_generation_tokens_total"]
        assert server.post("/v1/completions", json=OK_TEXT).status_code == 200  # others go on meanwhile
    assert 0 < after - before < most


# --- soak -----------------------------------------------------------------------------------------------


def soak_request(server: ServerProcess, kind: str, rng: random.Random) -> int | None:
    """One request of `kind`; its status, or None where the client left before an answer."""
    text = {**OK_TEXT, "prompt": f"Soak {rng.randint(0, 999)}", "max_tokens": rng.randint(1, 12)}
    host = f"{HOST}:{server.port}"
    if kind == "good":
        return server.post("/v1/completions", json=text).status_code
    if kind == "stream":
        return server.post("/v1/chat/completions", json={**OK_CHAT, "stream": True, "logprobs": True}).status_code
    if kind == "cut stream":  # reads a chunk or two, then disconnects
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={**text, "max_tokens": LONG, "ignore_eos": True, "stream": True}) as response:
            for _, _ in zip(range(rng.randint(1, 3)), response.iter_lines()):
                pass
        return None
    if kind == "cut plain":  # gives up before the answer
        try:
            httpx.post(server.url + "/v1/completions", timeout=httpx.Timeout(60, read=0.05),
                       json={**text, "max_tokens": LONG, "ignore_eos": True})
        except httpx.ReadTimeout:
            return None
        return 200
    if kind == "cut body":  # announces a body, sends part of it, disconnects
        with socket.create_connection((HOST, server.port), timeout=60) as sock:
            sock.sendall(raw_request("POST", "/v1/completions", host, {"Content-Type": "application/json"})
                         .replace(b"Content-Length: 0", b"Content-Length: 500") + b'{"model": "ti')
        return None
    if kind == "tiny setting":
        return server.post("/v1/chat/completions", json={**OK_CHAT, **rng.choice(TINY_SETTINGS)}).status_code
    bad = {
        "bad json": dict(content=b'{"model": "tiny", "prompt": [', headers={"Content-Type": "application/json"}),
        "bad value": dict(json={**text, "temperature": -1}),
        "long stop": dict(json={**text, "stop": "x" * 100_000}),
        "text/plain": dict(content=json.dumps(text).encode(), headers={"Content-Type": "text/plain"}),
    }[kind]
    return server.post("/v1/completions", **bad).status_code


SOAK_EXPECTED = {"good": {200, 429}, "stream": {200, 429}, "cut stream": {None}, "cut plain": {None, 200},
                 "cut body": {None}, "tiny setting": {200, 429}, "bad json": {400}, "bad value": {400},
                 "long stop": {400}, "text/plain": {415}}


@pytest.mark.slow
def test_soak_with_bad_requests_and_disconnects_leaves_the_server_as_new(model, tmp_path):
    """200 mixed requests, 16 at a time on 4 slots; then the server is healthy, idle, and greedy as when new."""
    greedy = {**OK_TEXT, "prompt": "The soak check", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    server = ServerProcess(model, tmp_path / "log", "--max-batch", "4", "--max-queue", "8")
    try:
        server.wait_healthy()
        when_new = server.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
        rng = random.Random(11)
        kinds = [rng.choice(list(SOAK_EXPECTED)) for _ in range(200)]
        with ThreadPoolExecutor(max_workers=16) as pool:
            statuses = list(pool.map(lambda i: soak_request(server, kinds[i], random.Random(i)), range(len(kinds)),
                                     timeout=600))
        for kind, status in zip(kinds, statuses):
            assert status in SOAK_EXPECTED[kind], (kind, status)
        assert server.get("/health").status_code == 200
        metrics = server.wait_idle(timeout=60)
        assert not [name for name in metrics if 'status="5' in name], metrics
        assert server.post("/v1/completions", json=greedy).json()["choices"][0]["text"] == when_new
    finally:
        server.stop()


def test_serve_defaults_are_the_servers_limits():
    from bitnet_tt.cli import build_parser
    from bitnet_tt.server import Limits

    args, limits = build_parser().parse_args(["serve"]), Limits()
    assert (args.max_queue, args.read_timeout, args.max_connections) == (
        limits.max_queue, limits.read_timeout, limits.max_connections)
