"""Limits of the API: connections, request bodies, concurrent ingest requests.

* aiohttp has no connection cap of its own. ``CappedSite`` wraps the server's protocol
  factory: while ``api.max_connections`` connections are open, a new one is answered
  ``503`` with a JSON error and closed at once, before anything of it is read.
* ``body_limit`` (a middleware) bounds the body of every route but ingest (those read
  in chunks against their source's ``max_payload``, loopd.api.ingest): a route that
  takes no body (approve, reject, cancel, close a breaker, reload, every read) refuses
  one over ``api.max_body_unused`` (4 KiB), any other one over ``api.max_body``
  (64 KiB), with 413 naming the limit, whether the length is declared or chunked.
* ``IngestGate`` counts the ingest requests being served: past
  ``api.max_concurrent_ingest`` the next one is answered 503 with ``Retry-After`` at
  once, before its body is read.

Every refusal is counted in ``loopd_api_refused_total{route, reason}``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

import orjson
import structlog
from aiohttp import web

from loopd import metrics
from loopd.api.app import CTX, error

log = structlog.get_logger("loopd.api")

INGEST_ROUTES = frozenset({"events", "events_source", "alertmanager", "alertmanager_source"})
# routes that read a body besides ingest: the web UI's sign-in form (loopd.ui)
BODY_ROUTES: frozenset[str] = frozenset({"ui_signin_post"})
_CHUNK = 64 * 1024


def _refusal(limit: int) -> bytes:
    body = orjson.dumps({"error": f"connection limit of {limit} reached; retry later",
                         "status": 503})
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


class _Refuse(asyncio.Protocol):
    """Answers 503 and closes; what the client sent is ignored."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._answer)
        transport.close()


class CappedSite(web.TCPSite):
    """A ``TCPSite`` that serves at most ``max_connections`` connections at a time."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *,
                 max_connections: int, reuse_address: bool = True,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner, host, port, reuse_address=reuse_address,
                         ssl_context=ssl_context)
        self._max_connections = max_connections
        self._answer = _refusal(max_connections)
        self.refused = 0

    async def start(self) -> None:
        server = self._runner.server
        assert server is not None
        limit, answer = self._max_connections, self._answer

        def protocol() -> asyncio.BaseProtocol:
            if len(server.connections) >= limit:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.warning("connection refused: connection limit reached",
                                limit=limit, refused=self.refused)
                return _Refuse(answer)
            return server()

        # as TCPSite.start, with the capped factory
        self._runner._reg_site(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


async def read_capped(request: web.Request, limit: int, timeout: float) -> bytes | None:
    """The body, read chunk by chunk; None as soon as it passes ``limit`` (the rest is
    never buffered). TimeoutError when it takes longer than ``timeout``."""
    chunks: list[bytes] = []
    size = 0
    async with asyncio.timeout(timeout):
        async for chunk in request.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
    return b"".join(chunks)


def closing(response: web.Response) -> web.Response:
    """The rest of the body is not read: the connection cannot carry another request."""
    response.force_close()
    return response


def refuse(status: int, route: str, limit: str, message: str,
           retry_after: float | None = None, **where: object) -> web.Response:
    """A JSON refusal by ``limit``, counted and logged (``message`` names the bound)."""
    metrics.request_refused(route, limit, message, **where)
    response = error(status, message)
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(retry_after)))
    return response


@web.middleware
async def body_limit(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
    route = request.match_info.route.name or ""
    if route in INGEST_ROUTES or not request.body_exists:
        return await handler(request)
    api = request.app[CTX].api
    takes_body = route in BODY_ROUTES
    limit = api.max_body if takes_body else api.max_body_unused
    setting = "api.max_body" if takes_body else "api.max_body_unused"
    what = "" if takes_body else f"; {route or request.path} takes no body"
    declared = request.content_length
    if declared is not None and declared > limit:
        return closing(refuse(413, route, "body", f"body of {declared} bytes exceeds "
                              f"{setting} {limit}{what}", client=request.remote))
    if not takes_body:
        # a chunked body: read (at most the limit) and drop it, so the handler starts clean
        try:
            body = await read_capped(request, limit, request.app[CTX].body_timeout)
        except TimeoutError:
            return closing(refuse(408, route, "body_timeout", "body timeout: the request "
                                  "body did not arrive in time", client=request.remote))
        if body is None:
            return closing(refuse(413, route, "body", f"body of more than {limit} bytes "
                                  f"exceeds {setting} {limit}{what}", client=request.remote))
    return await handler(request)


class IngestGate:
    """How many ingest requests are being served; at most ``limit`` at a time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.serving = 0

    def enter(self) -> bool:
        if self.serving >= self.limit:
            return False
        self.serving += 1
        return True

    def leave(self) -> None:
        self.serving -= 1


INGEST_GATE = web.AppKey("loopd.ingest_gate", IngestGate)
