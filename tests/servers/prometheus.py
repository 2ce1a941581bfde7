"""Debian's real ``prometheus`` on loopback, scraping a target the test controls.

``running_prometheus(root)`` starts a ``MetricsTarget`` (an aiohttp ``/metrics`` in the
Prometheus text format, whose samples the test sets and removes) and a ``prometheus``
process on a free port with its data in ``root``, scraping that target every second.
``./scripts/test`` installs Debian's ``prometheus`` when it is missing and it runs as
root; without the binary the tests that need it skip, and fail under ``CI=true``
(``servers.require``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from tests.servers import free_port, require, wait_until

BINARY = os.environ.get("LOOPD_TEST_PROMETHEUS") or shutil.which("prometheus") \
    or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
SCRAPE_INTERVAL = "1s"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class MetricsTarget:
    """``/metrics`` on 127.0.0.1:<free port>: gauges the test sets (``set``) and takes
    away (``remove``); Prometheus marks a removed series stale at its next scrape."""

    def __init__(self) -> None:
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.scrapes = 0
        self.address = ""
        self._runner: web.AppRunner | None = None

    def set(self, name: str, value: float, **labels: str) -> None:
        self.samples[(name, tuple(sorted(labels.items())))] = value

    def remove(self, name: str, **labels: str) -> None:
        self.samples.pop((name, tuple(sorted(labels.items()))), None)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        names = sorted({name for name, _ in self.samples})
        lines = []
        for name in names:
            lines.append(f"# TYPE {name} gauge")
            lines += [f"{name}{_labels(dict(labels))} {value!r}"
                      for (n, labels), value in sorted(self.samples.items()) if n == name]
        return web.Response(text="\n".join(lines) + "\n",
                            content_type="text/plain", charset="utf-8")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.address = f"127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class Prometheus:
    """One ``prometheus`` process on ``port`` (free unless given), its log in root."""

    def __init__(self, root: Path, target: MetricsTarget, port: int | None = None) -> None:
        self.root = root
        self.target = target
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "prometheus.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert BINARY is not None
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                       "evaluation_interval": SCRAPE_INTERVAL},
            # honor_labels: the samples' own instance label is kept (web-1, not the
            # target's address), so one target stands for a fleet
            "scrape_configs": [{"job_name": "target", "honor_labels": True,
                                "static_configs": [{"targets": [self.target.address]}]}],
        }))
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                BINARY, f"--config.file={config}", f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async def ready() -> bool:
                assert self.proc is not None
                assert self.proc.returncode is None, self.log.read_text()[-2000:]
                try:
                    async with http.get(f"{self.url}/-/ready") as resp:
                        return resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            await wait_until(ready, timeout=30, interval=0.1, what="Prometheus to be ready")

    async def query(self, expr: str) -> list[dict[str, object]]:
        """The instant vector ``expr`` gives now (a test's own view of Prometheus)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
                http.get(f"{self.url}/api/v1/query", params={"query": expr}) as resp:
            body = await resp.json()
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    async def wait_for(self, expr: str, present: bool = True, timeout: float = 20.0) -> None:
        """Wait until ``expr`` has series (``present``) or none: a scrape saw the change."""
        async def seen() -> bool:
            return bool(await self.query(expr)) == present

        await wait_until(seen, timeout=timeout, interval=0.1,
                         what=f"{expr} to {'have' if present else 'lose'} series")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def running_prometheus(root: Path, port: int | None = None
                             ) -> AsyncIterator[Prometheus]:
    """A started target and Prometheus scraping it; both stopped on the way out."""
    require(BINARY is not None, "prometheus (Debian package prometheus)")
    target = MetricsTarget()
    await target.start()
    prometheus = Prometheus(root, target, port)
    try:
        await prometheus.start()
        yield prometheus
    finally:
        await prometheus.stop()
        await target.stop()
