"""Prometheus endpoints on loopback for the scrape source's tests and benchmark.

* ``node_exporter()`` — Debian's real ``prometheus-node-exporter`` on a free port, with
  a few collectors (loadavg, meminfo, filesystem, netdev, cpu). Missing binary: the test
  skips, and fails under ``CI=true`` (``servers.require``); ``scripts/test`` installs it.
* ``MetricsTarget`` — an aiohttp ``/metrics`` whose answer a test controls: ``body``
  (text), ``status``, ``delay`` (seconds before answering: a slow target), ``gzip``, and
  ``content_type`` (OpenMetrics or text). ``requests`` counts what it answered.
  ``MetricsTarget.many(n)`` serves ``n`` targets from one server, a port each.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip as gz
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from tests.servers import free_port, require, wait_until

NODE_EXPORTER = os.environ.get("LOOPD_TEST_NODE_EXPORTER", "/usr/bin/prometheus-node-exporter")
TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@dataclass
class NodeExporter:
    host: str
    port: int

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


@contextlib.asynccontextmanager
async def node_exporter() -> AsyncIterator[NodeExporter]:
    """The real node exporter, listening on 127.0.0.1 until the block ends."""
    require(os.access(NODE_EXPORTER, os.X_OK), f"{NODE_EXPORTER} (Debian's "
            "prometheus-node-exporter; scripts/test installs it)")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
        "--collector.loadavg", "--collector.meminfo", "--collector.filesystem",
        "--collector.netdev", "--collector.cpu", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
            return True
        await wait_until(listening, timeout=20, what="the node exporter to listen")
        yield NodeExporter("127.0.0.1", port)
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


@dataclass
class MetricsTarget:
    """One controllable ``/metrics`` endpoint (see the module docstring)."""

    body: str = ""
    status: int = 200
    delay: float = 0.0
    gzip: bool = False
    content_type: str = TEXT
    requests: int = 0
    host: str = "127.0.0.1"
    port: int = 0
    path: str = "/metrics"
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def set(self, **values: float) -> None:
        """Expose one gauge per keyword (``set(load=3)`` -> ``load 3``)."""
        self.body = "".join(f"# TYPE {k} gauge\n{k} {v}\n" for k, v in values.items())

    def release(self) -> None:
        """Answer the requests a ``delay`` holds, now."""
        self._wake.set()

    async def answer(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.delay:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.delay):
                    await self._wake.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="failing on purpose\n")
        data = self.body.encode()
        headers = {"Content-Type": self.content_type}
        if self.gzip:
            data, headers["Content-Encoding"] = gz.compress(data, 1), "gzip"
        return web.Response(body=data, headers=headers)

    @classmethod
    @contextlib.asynccontextmanager
    async def serve(cls, **options: object) -> AsyncIterator[MetricsTarget]:
        """One target on a free port until the block ends."""
        async with cls.many(1, **options) as targets:
            yield targets[0]

    @classmethod
    @contextlib.asynccontextmanager
    async def many(cls, n: int, **options: object) -> AsyncIterator[list[MetricsTarget]]:
        """``n`` targets served by one aiohttp server, each on a port of its own (a
        target's ``instance`` is its host:port)."""
        socks = []
        for _ in range(n):  # bound now, on ports the kernel picks: no race for them
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        targets = [cls(port=sock.getsockname()[1], **options)  # type: ignore[arg-type]
                   for sock in socks]
        by_port = {t.port: t for t in targets}

        async def answer(request: web.Request) -> web.StreamResponse:
            return await by_port[request.url.port or 0].answer(request)

        app = web.Application()
        app.router.add_get("/metrics", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for sock in socks:
            await web.SockSite(runner, sock).start()
        try:
            yield targets
        finally:
            for t in targets:
                t.release()
            await runner.cleanup()
