"""Debian's real ``prometheus`` on loopback, scraping a target the test controls.

``running_prometheus(root)`` starts a ``MetricsTarget`` (a ``/metrics`` in the
Prometheus text format, whose samples the tests set and remove) and a ``prometheus``
process on a free port with its data in ``root``, scraping that target every second.
Both are synchronous, so one pair can serve a whole test module (Prometheus takes about
5 s to scrape a new target for the first time): tests then keep apart by metric name.
``./scripts/test`` installs Debian's ``prometheus`` when it is missing and it runs as
root (``LOOPD_TEST_PROMETHEUS`` names another binary); without the binary the tests
that need it skip, and fail under ``CI=true`` (``servers.require``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import yaml

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
    """``/metrics`` on 127.0.0.1:<free port>, served from a thread (so that one target
    outlives a test's event loop): gauges the test sets (``set``) and takes away
    (``remove``); Prometheus marks a removed series stale at its next scrape."""

    def __init__(self) -> None:
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.scrapes = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self.samples[(name, tuple(sorted(labels.items())))] = value

    def remove(self, name: str, **labels: str) -> None:
        with self._lock:
            self.samples.pop((name, tuple(sorted(labels.items()))), None)

    def forget(self, name: str) -> None:
        """Remove every series of ``name``."""
        with self._lock:
            for key in [k for k in self.samples if k[0] == name]:
                del self.samples[key]

    def exposition(self) -> bytes:
        with self._lock:
            self.scrapes += 1
            samples = sorted(self.samples.items())
        lines = []
        for name in sorted({name for (name, _), _ in samples}):
            lines.append(f"# TYPE {name} gauge")
            lines += [f"{name}{_labels(dict(labels))} {value!r}"
                      for (n, labels), value in samples if n == name]
        return ("\n".join(lines) + "\n").encode()

    def start(self) -> None:
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = target.exposition()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # quiet: Prometheus scrapes every second

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="metrics-target", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class Prometheus:
    """One ``prometheus`` process on ``port`` (free unless given), its log in root."""

    def __init__(self, root: Path, target: MetricsTarget, port: int | None = None) -> None:
        self.root = root
        self.target = target
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until Prometheus is ready (its first scrape comes about 5 s
        later: the scrape manager applies new targets every 5 s)."""
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
            self.proc = subprocess.Popen(
                [BINARY, f"--config.file={config}", f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"Prometheus on port {self.port} not ready after {timeout}s")

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

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_prometheus(root: Path, port: int | None = None) -> Iterator[Prometheus]:
    """A started target and Prometheus scraping it; both stopped on the way out."""
    require(BINARY is not None, "prometheus (Debian package prometheus)")
    target = MetricsTarget()
    target.start()
    prometheus = Prometheus(root, target, port)
    try:
        prometheus.start()
        yield prometheus
    finally:
        prometheus.stop()
        target.stop()
