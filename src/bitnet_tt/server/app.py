"""The HTTP server: FastAPI routes over one engine, whose steps run in a single background thread.

Threads: uvicorn's event loop parses requests, submits them to the engine (thread-safe) and streams what
comes back; the engine thread is the only one that calls `engine.step()`. Each request's outputs cross
from the engine thread to its handler through an asyncio queue (`call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import prometheus_client
from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine import Engine, Request, RequestOutput, RequestStatus
from ..errors import BitNetError, CapacityError
from ..sampling import SamplingParams
from .protocol import (
    APIError, ApiFormat, ChatCompletionRequest, ChatFormat, CompletionFormat, CompletionRequest, DetokenizeRequest,
    Reply, TokenizeRequest, completion_budget, new_request_id, parse_body,
)

logger = logging.getLogger("bitnet_tt.server")

DEFAULT_MAX_QUEUE = 64  # waiting requests (beyond the engine's slots) before new ones get a 429
DEFAULT_MAX_BODY_BYTES = 1 << 20
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PING_SECONDS = 15  # an SSE comment while a stream has nothing to send, so that proxies keep the connection


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

    def __init__(self, engine: Engine, metrics: Metrics, max_waiting: int):
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
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
        metrics.add_gauge("bitnet_tt_slots_in_use", "KV-cache slots holding a context, as the backend reports.",
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
                backend = self.engine.backend
                self.slots_in_use = sum(1 for s in range(backend.max_slots) if backend.slot_length(s) > 0)
            self._fail_all(APIError(503, "the server is shutting down", type="server_error"))
        except Exception as exc:
            logger.exception("the engine failed; failing every request")
            self._fail_all(APIError(500, f"the engine failed: {exc.__class__.__name__}: {exc}", type="server_error"))

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
    """A submitted request (one engine request per choice): their outputs arrive on one asyncio queue, fed from
    the engine thread."""

    def __init__(self, engine_loop: EngineLoop, prompt_ids: list[int], choice_params: list[SamplingParams],
                 reply_id: str):
        self._engine_loop = engine_loop
        self._queue: asyncio.Queue[RequestOutput | APIError] = asyncio.Queue()
        event_loop = asyncio.get_running_loop()

        def deliver(item: RequestOutput | APIError) -> None:
            if not event_loop.is_closed():  # the server may already have stopped
                event_loop.call_soon_threadsafe(self._queue.put_nowait, item)

        self.requests = engine_loop.submit(prompt_ids, choice_params, reply_id, deliver)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Every choice's outputs, in the order they come, until the last choice has finished."""
        unfinished = len(self.requests)
        while unfinished:
            item = await self._queue.get()
            if isinstance(item, APIError):
                raise item
            yield item
            unfinished -= item.finished

    def cancel(self) -> None:
        """Free the slots of the choices that have not finished, at the engine's next step."""
        for request in self.requests:
            if not request.finished:
                self._engine_loop.cancel(request.id)


class EventStream(EventSourceResponse):
    """Server-sent events (sse-starlette: framing, keep-alive pings while a request waits for a slot, client
    disconnects) that cancel the request however the stream ends: done, client gone, error."""

    def __init__(self, generation: Generation, events: AsyncIterator[str]):
        super().__init__(events, sep="\n", ping=PING_SECONDS)
        self.generation = generation

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


def event_data(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


async def stream_events(generation: Generation, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """Each event's data: the chunks, then the usage chunk if asked for, then [DONE], as OpenAI sends them."""
    try:
        async for output in generation.outputs():
            if (chunk := reply.chunk(output)) is not None:
                yield event_data(chunk)
    except APIError as exc:  # the status line is already sent: the error goes in the stream, as OpenAI does
        yield event_data(exc.body())
        return
    if include_usage:
        yield event_data(reply.usage_chunk())
    yield "[DONE]"


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
    async for chunk in http_request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
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


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """An OpenAI-compatible app over `engine`; the engine thread runs while the app does (its lifespan)."""
    metrics = Metrics()
    engine_loop = EngineLoop(engine, metrics, max_queue)
    started = int(time.time())
    bearer = HTTPBearer(auto_error=False, description="The server's API key (--api-key), when it has one.")
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()

    def check_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        # compare_digest: the time taken does not tell how much of the key was right.
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def request_body(http_request: HTTPRequest, model: type[BaseModel]) -> BaseModel:
        """The validated body; a model other than the one served is a 404 (tokenizer routes may omit it)."""
        body = parse_body(model, await read_body(http_request, max_body_bytes))
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return body

    async def complete(http_request: HTTPRequest, api: ApiFormat) -> Response:
        """Chat and text completions, streamed or not: one path."""
        body = await request_body(http_request, api.request_model)
        prompt_ids = api.prompt_ids(body, engine.tokenizer)
        max_new = completion_budget(len(prompt_ids), body.requested_max_tokens(), engine.backend.max_context)
        reply_id = new_request_id(api)
        generation = Generation(engine_loop, prompt_ids, body.choice_params(max_new), reply_id)
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
    app.add_middleware(CountResponses, metrics=metrics)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

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
    # Served beside /v1, where vLLM and llama.cpp's server have them; they need the key as /v1 does.
    tokens = APIRouter(dependencies=[Depends(check_api_key)])

    @tokens.post("/tokenize", openapi_extra=request_schema(TokenizeRequest))
    async def tokenize(http_request: HTTPRequest) -> dict:
        body = await request_body(http_request, TokenizeRequest)
        return body.response(body.token_ids(engine.tokenizer), engine.tokenizer, engine.backend.max_context)

    @tokens.post("/detokenize", openapi_extra=request_schema(DetokenizeRequest))
    async def detokenize(http_request: HTTPRequest) -> dict:
        return (await request_body(http_request, DetokenizeRequest)).response(engine.tokenizer)

    app.include_router(tokens)

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
    """Every error leaves as OpenAI's JSON error body."""

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

    @app.exception_handler(Exception)  # Starlette logs the traceback itself
    async def internal_error(_, exc: Exception):
        return answer(APIError(500, "internal server error", type="server_error"))


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = DEFAULT_MAX_QUEUE, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          quiet: bool = False) -> None:
    """Run the server until interrupted. The API key is never logged."""
    import uvicorn

    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("bitnet-tt: listening on %s without an API key: anyone who can reach it can use it", host)
    app = create_app(engine, model_name, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info", access_log=not quiet,
                timeout_graceful_shutdown=5)
