"""What stands between the network and the routes: Host and API-key checks, JSON-only bodies, read deadlines.

`Gatekeeper` (ASGI middleware) answers a request before any route sees it when its Host header does not name
this server (DNS rebinding: a web page whose name resolves to 127.0.0.1 must not reach a loopback server),
its API key is missing or wrong, or a POST body is not JSON (a browser sends text/plain across origins without
asking first); it bounds the time a request body may take to arrive. `GuardedH11` (uvicorn's h11 protocol)
does the same for request headers, which uvicorn waits for without limit.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket

from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import BitNetError
from .protocol import APIError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
OPEN_PATHS = ("/health",)  # answered without the API key (a supervisor's probe)
SEND_BUFFER_BYTES = 256 << 10  # per connection; Linux doubles it for its bookkeeping


def check_api_key(api_key: str | None) -> None:
    """An empty key would silently turn authentication off: refused."""
    if api_key is not None and not api_key.strip():
        raise BitNetError("the API key is empty (--api-key '' or an empty $BITNET_TT_API_KEY): give a key, or "
                          "leave both unset to serve without one")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_hosts(host: str, port: int) -> frozenset[str] | None:
    """The Host headers a server bound to host:port accepts: on a loopback address, the loopback names with
    the port (or without, as a client on port 80 sends them); elsewhere any (None)."""
    if not is_loopback(host):
        return None
    names = {*LOOPBACK_NAMES, f"[{host}]" if ":" in host else host}
    return frozenset(names | {f"{name}:{port}" for name in names})


class Gatekeeper:
    """ASGI middleware: refuses requests that must not reach a route (see the module's docstring) with
    OpenAI's error body, and gives each request body `body_timeout` seconds to arrive (then a 408)."""

    def __init__(self, app, api_key: str | None, allowed_hosts: frozenset[str] | None, public_metrics: bool,
                 body_timeout: float):
        self.app, self.api_key, self.allowed_hosts = app, api_key, allowed_hosts
        self.open_paths = OPEN_PATHS + (("/metrics",) if public_metrics else ())
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if (refusal := self.refusal(scope)) is not None:
            refusal.headers = {**(refusal.headers or {}), "Connection": "close"}  # its body is left unread
            return await send_error(refusal, scope, receive, send)
        await self.app(scope, body_deadline(receive, self.body_timeout), send)

    def refusal(self, scope) -> APIError | None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if self.allowed_hosts is not None and headers.get("host", "").lower() not in self.allowed_hosts:
            return APIError(400, "the Host header does not name this server", code="invalid_host")
        if self.api_key is not None and scope["path"] not in self.open_paths and not self.authorised(headers):
            return APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if scope["method"] == "POST" and media_type != "application/json":
            return APIError(415, "the request body must be JSON, sent with 'Content-Type: application/json'",
                            code="unsupported_media_type")
        return None

    def authorised(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


async def send_error(error: APIError, scope, receive, send) -> None:
    await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(scope, receive, send)


def body_deadline(receive, seconds: float):
    """`receive`, raising a 408 APIError if the whole body has not arrived `seconds` after the request began.
    Once it has, messages (a disconnect) are awaited without limit."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    complete = False

    async def receive_in_time():
        nonlocal complete
        if complete:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), deadline - loop.time())
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {seconds:g} s", code="request_timeout",
                           headers={"Connection": "close"}) from None
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return receive_in_time


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived within
    `header_timeout` seconds of its opening or of its previous response (slowloris), and with a bounded kernel
    send buffer: Linux grows it to 4 MiB for a client that does not read, before the server's own bound on a
    stream's unsent outputs (Limits.max_buffered_outputs) could act."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if (sock := transport.get_extra_info("socket")) is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self.start_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.start_header_timer()

    def connection_lost(self, exc) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        super().connection_lost(exc)

    def start_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        self.header_timer = self.loop.call_later(self.header_timeout, self.close_if_headers_incomplete)

    def close_if_headers_incomplete(self) -> None:
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if waiting_for_headers and not self.transport.is_closing():
            self.transport.close()


class QueryStringsHidden(logging.Filter):
    """Drops the query string from uvicorn's access log lines: a client may put its key there."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:  # (client, method, path, version, status)
            client, method, path, version, status = record.args
            record.args = (client, method, str(path).partition("?")[0], version, status)
        return True
