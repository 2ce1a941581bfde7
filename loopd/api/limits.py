"""Connection limits of the API's server: a TCP site that refuses connections past a cap.

aiohttp has no connection cap of its own. ``CappedSite`` wraps the server's protocol
factory: while ``max_connections`` connections are open, a new one is answered
``503`` with a JSON error and closed at once, before anything of it is read.
"""

from __future__ import annotations

import asyncio
import ssl

import orjson
import structlog
from aiohttp import web

log = structlog.get_logger("loopd.api")


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
