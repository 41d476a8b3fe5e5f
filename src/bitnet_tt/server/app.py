"""The HTTP server: FastAPI routes over one engine, whose steps run in a single background thread.

Threads: uvicorn's event loop parses requests, submits them to the engine (thread-safe) and streams what
comes back; request bodies are parsed and tokenised in worker threads, so that a long prompt does not hold up
the loop; the engine thread is the only one that calls `engine.step()`. Each request's outputs cross from the
engine thread to its handler through a bounded asyncio queue (`call_soon_threadsafe`).

Failures: an error while generating fails the requests it concerns (the engine contains it). If the engine
itself stops (its backend keeps failing), every request fails, /health answers 503 and `serve` stops the
server and raises EngineStopped, so that the process exits non-zero and a supervisor can restart it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import prometheus_client
from fastapi import APIRouter, FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..engine import Engine, Request, RequestOutput, RequestStatus
from ..errors import BitNetError, CapacityError
from ..sampling import SamplingParams
from .guard import Gatekeeper, GuardedH11, QueryStringsHidden, check_api_key, is_loopback, loopback_hosts
from .protocol import (
    APIError, ApiFormat, ChatCompletionRequest, ChatFormat, CompletionFormat, CompletionRequest, DetokenizeRequest,
    Reply, TokenizeRequest, completion_budget, new_request_id, parse_body,
)

logger = logging.getLogger("bitnet_tt.server")


@dataclass(frozen=True)
class Limits:
    """What one client may take of the server."""

    max_queue: int = 64  # waiting requests (beyond the engine's slots) before new ones get a 429
    max_body_bytes: int = 1 << 20
    read_timeout: float = 20.0  # seconds for a request's headers, and again for its body, to arrive
    max_connections: int = 256  # open connections before new requests get a 503 (uvicorn's limit_concurrency)
    max_buffered_outputs: int = 512  # outputs a stream may hold unread (its client is slow) before it is cancelled


class EngineStopped(BitNetError):
    """The engine could not go on; the server stopped so that a supervisor can restart it."""

    exit_code = 1

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# ---------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """The server's Prometheus metrics, in a registry of the app's own; updated from the event loop and the
    engine thread (prometheus_client is thread-safe)."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        where = dict(registry=self.registry)
        self.responses = prometheus_client.Counter("bitnet_tt_requests", "HTTP responses by endpoint and status.",
                                                   ["endpoint", "status"], **where)
        self.prompt_tokens = prometheus_client.Counter("bitnet_tt_prompt_tokens", "Prompt tokens prefilled.", **where)
        self.generated_tokens = prometheus_client.Counter("bitnet_tt_generation_tokens", "Tokens generated.", **where)
        self.ttft = prometheus_client.Histogram("bitnet_tt_time_to_first_token_seconds",
                                                "From submission to the first token.", buckets=TTFT_BUCKETS, **where)
        self.itl = prometheus_client.Histogram("bitnet_tt_inter_token_latency_seconds",
                                               "Between consecutive tokens of a request.", buckets=ITL_BUCKETS, **where)

    def count_response(self, endpoint: str, status: int) -> None:
        self.responses.labels(endpoint, str(status)).inc()

    def record_token(self, latency: float, first: bool, prompt_tokens: int) -> None:
        """A token delivered `latency` seconds after submission (first) or after the request's previous token."""
        self.generated_tokens.inc()
        if first:
            self.prompt_tokens.inc(prompt_tokens)
            self.ttft.observe(latency)
        else:
            self.itl.observe(latency)

    def add_gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read when the metrics are scraped."""
        prometheus_client.Gauge(name, help, registry=self.registry).set_function(read)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class CountResponses:
    """ASGI middleware: counts every response by route and status, errors included."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        started = False

        def count(status: int) -> None:
            route = scope.get("route")  # set by the router, in this same scope; absent for unknown paths
            self.metrics.count_response(getattr(route, "path", "other"), status)

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:  # answered as a 500 by Starlette's outermost middleware, outside this one
            if not started:
                count(500)
            raise


# ---------------------------------------------------------------------------------------------
# The engine thread


@dataclass
class _Live:
    """A submitted request that has not finished, as the engine thread sees it."""

    request: Request
    deliver: Callable[[RequestOutput | APIError], None]
    submitted: float
    last_token: float | None = None


class EngineLoop:
    """Owns the one thread that steps the engine; submits with a bound on waiting requests; keeps the gauges."""

    def __init__(self, engine: Engine, metrics: Metrics, max_waiting: int, on_failure: Callable[[], None]):
        self.engine, self.metrics, self.max_waiting, self.on_failure = engine, metrics, max_waiting, on_failure
        self._lock = threading.Lock()  # guards _live and _failure; never held while stepping
        self._live: dict[str, _Live] = {}
        self._failure: APIError | None = None  # set once the loop has stopped; later requests get it
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="bitnet-tt-engine", daemon=True)
        self.slots_in_use = 0
        self._add_gauges(metrics)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    @property
    def healthy(self) -> bool:
        return self._failure is None and self._thread.is_alive()

    @property
    def failed(self) -> bool:
        return self._failure is not None and self._failure.status == 500

    def submit(self, prompt_ids: list[int], choice_params: list[SamplingParams], reply_id: str,
               deliver: Callable[[RequestOutput | APIError], None]) -> list[Request]:
        """Queue one request per choice, whose outputs go to `deliver` (called in the engine thread); 429 when
        the queue is full (a request with several choices is let in whole while it is not)."""
        # Holding the lock makes the check and the submission one step, and keeps _on_output (which takes
        # the lock) from seeing the request's outputs before it is registered in _live.
        with self._lock:
            if self._failure is not None:
                raise self._failure
            waiting = self._count(RequestStatus.WAITING)
            if waiting >= self.max_waiting:
                raise APIError(429, f"the server is busy: {waiting} requests are waiting for a slot; retry later",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            submitted = time.perf_counter()
            requests = [self.engine.submit(prompt_ids, params, on_output=self._on_output, request_id=f"{reply_id}-{i}")
                        for i, params in enumerate(choice_params)]
            for request in requests:
                self._live[request.id] = _Live(request, deliver, submitted)
        self._wake.set()
        return requests

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)
        self._wake.set()

    def _add_gauges(self, metrics: Metrics) -> None:
        metrics.add_gauge("bitnet_tt_requests_waiting", "Requests queued for a slot.",
                          lambda: self._locked_count(RequestStatus.WAITING))
        metrics.add_gauge("bitnet_tt_requests_running", "Requests holding a slot.",
                          lambda: self._locked_count(RequestStatus.RUNNING))
        metrics.add_gauge("bitnet_tt_slots_in_use", "KV-cache slots serving a request.",
                          lambda: self.slots_in_use)

    def _locked_count(self, status: RequestStatus) -> int:
        with self._lock:
            return self._count(status)

    def _count(self, status: RequestStatus) -> int:
        return sum(1 for live in self._live.values() if live.request.status is status)

    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self.engine.has_work():
                    self._wake.wait()
                    self._wake.clear()  # cleared before has_work() is asked again, so no submission is missed
                    continue
                self.engine.step()
                self.slots_in_use = self.engine.slots_in_use
            self._fail_all(APIError(503, "the server is shutting down", type="server_error"))
        except Exception:
            logger.exception("the engine stopped; failing every request and stopping the server")
            self._fail_all(APIError(500, "the engine stopped (details are in the server's log); the server is "
                                         "stopping", type="server_error"))
            self.on_failure()

    def _on_output(self, output: RequestOutput) -> None:
        """Called by engine.step() in this thread for every output."""
        now = time.perf_counter()
        request_id = output.request.id
        with self._lock:
            live = self._live.pop(request_id, None) if output.finished else self._live.get(request_id)
        if live is None:
            return
        if output.token_ids:
            first = live.last_token is None
            self.metrics.record_token(now - (live.submitted if first else live.last_token), first,
                                      len(output.request.prompt_ids))
            live.last_token = now
        live.deliver(output)

    def _fail_all(self, error: APIError) -> None:
        with self._lock:
            self._failure = error
            lives, self._live = list(self._live.values()), {}
        for live in lives:
            live.deliver(error)


# ---------------------------------------------------------------------------------------------
# One request, seen from the event loop


class Generation:
    """A submitted request (one engine request per choice): their outputs arrive on one bounded asyncio queue,
    fed from the engine thread. A client that does not read them fast enough (its stream's buffers are full)
    has its request cancelled."""

    def __init__(self, engine_loop: EngineLoop, prompt_ids: list[int], choice_params: list[SamplingParams],
                 reply_id: str, max_buffered: int):
        self._engine_loop = engine_loop
        self._queue: asyncio.Queue[RequestOutput | APIError] = asyncio.Queue(max_buffered * len(choice_params))
        self._overflowed = False
        event_loop = asyncio.get_running_loop()

        def deliver(item: RequestOutput | APIError) -> None:
            if not event_loop.is_closed():  # the server may already have stopped
                event_loop.call_soon_threadsafe(self._put, item)

        self.requests = engine_loop.submit(prompt_ids, choice_params, reply_id, deliver)

    def _put(self, item: RequestOutput | APIError) -> None:
        if self._overflowed:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._overflowed = True
            self.cancel()
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(APIError(503, f"the client read too slowly: over {self._queue.maxsize} outputs "
                                                 "were waiting to be sent; the request was cancelled",
                                            type="server_error", code="client_too_slow"))

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Every choice's outputs, in the order they come, until the last choice has finished."""
        unfinished = len(self.requests)
        while unfinished:
            item = await self._queue.get()
            if isinstance(item, APIError):
                raise item
            if item.finished and item.request.finish_reason == "error":
                raise APIError(500, f"{item.request.error} (request id {item.request.id})", type="server_error")
            yield item
            unfinished -= item.finished

    def cancel(self) -> None:
        """Free the slots of the choices that have not finished, at the engine's next step."""
        for request in self.requests:
            if not request.finished:
                self._engine_loop.cancel(request.id)


class EventStream(StreamingResponse):
    """A server-sent-events response that cancels its request however it ends: done, client gone, error.
    Hand-written rather than sse-starlette's: each event is one line of JSON, so the framing is one f-string,
    and sse-starlette took 1.6-2x the time per event here (its per-send cancel scopes and event encoding)."""

    def __init__(self, generation: Generation, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


def sse(data: dict | str) -> str:
    # allow_nan=False: a NaN would be invalid JSON; it raises instead (the sampler never lets one through)
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"),
                                                            allow_nan=False)
    return f"data: {payload}\n\n"


async def stream_events(generation: Generation, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    try:
        async for output in generation.outputs():
            if (chunk := reply.chunk(output)) is not None:
                yield sse(chunk)
    except APIError as exc:  # the status line is already sent: the error goes in the stream, as OpenAI does
        yield sse(exc.body())
        return
    if include_usage:
        yield sse(reply.usage_chunk())
    yield sse("[DONE]")


async def collect(generation: Generation, reply: Reply) -> dict:
    async for _ in generation.outputs():
        pass
    return reply.completion()


async def read_body(http_request: HTTPRequest, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to be over `limit` bytes."""
    too_large = APIError(413, f"the request body is over the server's limit of {limit} bytes",
                         code="request_too_large")
    if int(http_request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in http_request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:  # nobody reads the answer; it shows in the metrics
        raise APIError(499, "the client closed the connection before sending its whole body") from None
    return bytes(body)


async def unless_disconnected(http_request: HTTPRequest, work: Awaitable[dict]) -> dict | None:
    """Await `work`; if the client goes away first, cancel it and return None."""

    async def until_disconnected():
        while (await http_request.receive())["type"] != "http.disconnect":
            pass

    work, watcher = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnected())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        work.cancel()  # nothing happens if it is done
    return work.result() if work in done else None


# ---------------------------------------------------------------------------------------------
# The application


def create_app(engine: Engine, model_name: str, api_key: str | None = None, limits: Limits = Limits(),
               allowed_hosts: frozenset[str] | None = None, public_metrics: bool = False,
               on_engine_failure: Callable[[], None] = lambda: None) -> FastAPI:
    """An OpenAI-compatible app over `engine`; the engine thread runs while the app does (its lifespan).
    With `api_key`, every path but /health (and /metrics if `public_metrics`) needs it; `allowed_hosts`: the
    Host headers accepted (None: any); `on_engine_failure` is called (in the engine thread) if the engine stops."""
    check_api_key(api_key)
    metrics = Metrics()
    engine_loop = EngineLoop(engine, metrics, limits.max_queue, on_engine_failure)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()

    def check_model(body: BaseModel) -> None:
        """A model other than the one served is a 404 (the tokenizer routes may leave it out)."""
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    async def complete(http_request: HTTPRequest, api: ApiFormat) -> Response:
        """Chat and text completions, streamed or not: one path."""
        raw = await read_body(http_request, limits.max_body_bytes)
        body, prompt_ids = await asyncio.to_thread(parse_and_tokenise, api, raw, engine)  # off the event loop
        check_model(body)
        max_new = completion_budget(len(prompt_ids), body.requested_max_tokens(), engine.backend.max_context)
        reply_id = new_request_id(api)
        generation = Generation(engine_loop, prompt_ids, body.choice_params(max_new), reply_id,
                                limits.max_buffered_outputs)
        reply = Reply(api, reply_id, generation.requests, model_name, engine.tokenizer.token_text)
        if body.stream:
            return EventStream(generation, stream_events(generation, reply, body.include_usage))
        try:
            completion = await unless_disconnected(http_request, collect(generation, reply))
        finally:
            generation.cancel()
        # 499 (nginx's "client closed request") is never read by anyone; it shows in the metrics.
        return JSONResponse(completion) if completion is not None else Response(status_code=499)

    app = FastAPI(title="bitnet-tt", lifespan=lifespan)
    app.state.engine_loop = engine_loop
    app.add_middleware(Gatekeeper, api_key=api_key, allowed_hosts=allowed_hosts, public_metrics=public_metrics,
                       body_timeout=limits.read_timeout)
    app.add_middleware(CountResponses, metrics=metrics)  # outermost: it counts the gatekeeper's refusals too
    v1 = APIRouter(prefix="/v1")

    @v1.post("/chat/completions", openapi_extra=request_schema(ChatCompletionRequest))
    async def chat_completions(http_request: HTTPRequest) -> Response:
        return await complete(http_request, ChatFormat)

    @v1.post("/completions", openapi_extra=request_schema(CompletionRequest))
    async def completions(http_request: HTTPRequest) -> Response:
        return await complete(http_request, CompletionFormat)

    @v1.get("/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": started, "owned_by": "bitnet-tt",
                "max_model_len": engine.backend.max_context}
        return {"object": "list", "data": [card]}

    app.include_router(v1)

    # Beside /v1, where vLLM and llama.cpp's server have them.
    @app.post("/tokenize", openapi_extra=request_schema(TokenizeRequest))
    async def tokenize(http_request: HTTPRequest) -> dict:
        raw = await read_body(http_request, limits.max_body_bytes)
        body, ids = await asyncio.to_thread(parse_tokenize_request, raw, engine)  # off the event loop
        check_model(body)
        return body.response(ids, engine.tokenizer, engine.backend.max_context)

    @app.post("/detokenize", openapi_extra=request_schema(DetokenizeRequest))
    async def detokenize(http_request: HTTPRequest) -> dict:
        body = parse_body(DetokenizeRequest, await read_body(http_request, limits.max_body_bytes))
        check_model(body)
        return await asyncio.to_thread(body.response, engine.tokenizer)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/health")
    async def health() -> Response:
        healthy = engine_loop.healthy
        return JSONResponse({"status": "ok" if healthy else "unavailable"}, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    add_error_handlers(app)
    document_request_schemas(app)
    return app


def parse_and_tokenise(api: ApiFormat, raw: bytes, engine: Engine):
    body = parse_body(api.request_model, raw)
    return body, api.prompt_ids(body, engine.tokenizer)


def parse_tokenize_request(raw: bytes, engine: Engine) -> tuple[TokenizeRequest, list[int]]:
    body = parse_body(TokenizeRequest, raw)
    return body, body.token_ids(engine.tokenizer)


REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest)
SCHEMA_REF = "#/components/schemas/{model}"


def request_schema(model: type[BaseModel]) -> dict:
    """The OpenAPI requestBody of a route that validates its body itself (so that a bad body is OpenAI's 400)."""
    ref = {"$ref": SCHEMA_REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def document_request_schemas(app: FastAPI) -> None:
    """Put the request models, and the models they use, into /docs' components."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            _, definitions = models_json_schema([(m, "validation") for m in REQUEST_MODELS], ref_template=SCHEMA_REF)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
        return app.openapi_schema

    app.openapi = openapi


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's JSON error body; an unexpected one as a generic message and an id that
    finds its traceback in the log."""

    def answer(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return answer(exc)

    @app.exception_handler(BitNetError)  # the engine's and the sampler's own checks of a request
    async def request_error(_, exc: BitNetError):
        code = "context_length_exceeded" if isinstance(exc, CapacityError) else None
        return answer(APIError(400, str(exc), code=code))

    @app.exception_handler(StarletteHTTPException)  # unknown route, wrong method
    async def http_error(_, exc: StarletteHTTPException):
        return answer(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def internal_error(http_request: HTTPRequest, exc: Exception):
        error_id = uuid.uuid4().hex
        logger.error("error %s answering %s %s", error_id, http_request.method, http_request.url.path, exc_info=exc)
        return answer(APIError(500, f"internal server error (error id {error_id}: the details are in the server's "
                                    "log)", type="server_error"))


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits = Limits(), public_metrics: bool = False, quiet: bool = False) -> None:
    """Run the server until interrupted; raise EngineStopped if it stopped because the engine did. The API
    key is never logged, nor any query string (a client may put its key there)."""
    import uvicorn

    check_api_key(api_key)
    if api_key is None and not is_loopback(host):
        logger.warning("bitnet-tt: listening on %s without an API key: anyone who can reach it can use it", host)
    server: uvicorn.Server | None = None

    def stop_server() -> None:
        server.should_exit = True

    app = create_app(engine, model_name, api_key=api_key, limits=limits, allowed_hosts=loopback_hosts(host, port),
                     public_metrics=public_metrics, on_engine_failure=stop_server)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning" if quiet else "info",
                            access_log=not quiet, timeout_graceful_shutdown=5, limit_concurrency=limits.max_connections,
                            http=functools.partial(GuardedH11, header_timeout=limits.read_timeout))
    logging.getLogger("uvicorn.access").addFilter(QueryStringsHidden())
    server = uvicorn.Server(config)
    server.run()
    if app.state.engine_loop.failed:
        raise EngineStopped("the engine stopped after repeated backend failures (see the log above); exiting so "
                            "that a supervisor can restart the server")
