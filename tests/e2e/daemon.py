"""Run the real ``loopd run -c CONFIG`` as a subprocess and talk to it over HTTP.

``LoopdProcess`` starts the console script installed next to the test's Python
(``.venv/bin/loopd``) with ``--listen 127.0.0.1:<free port>``, waits for
``/readyz`` with a deadline, and keeps the daemon's stdout and stderr in one
log file per start (``loopd-1.log``, ``loopd-2.log``, ... in its work dir) so a
failure can show what the daemon said. ``stop`` sends SIGTERM and asserts a
clean exit 0 within 10 s; ``kill`` is ``kill -9``. The same object can be
started again on the same config and store (a restart).

Everything here is async and never blocks the event loop for long: the test's
own servers (SSH, ServiceNow) run in-process on that loop. Nothing sleeps to
wait; every wait polls a condition with a deadline (``tests.servers.wait_until``).

A daemon with ``api.auth`` or ``api.tls`` is reached with ``LoopdProcess(config,
token=..., ssl=client_context)``: every call then sends the bearer token over HTTPS.

``Config`` writes loopd.yaml, rule files and the inventory into a test's
``tmp_path``; ``store_query`` reads the daemon's SQLite file read-only.

Several daemons ("replicas", each with its own ``LOOPD_REPLICA``) share one store through
``SharedStore``: a SQLite file or a PostgreSQL database, with the same ``query`` for both,
so one test runs on either. Give each replica a ``Config`` of its own (its own folder, so
its own logs) whose ``extra["store"]`` is the shared store's ``config()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from ssl import SSLContext
from typing import Any

import aiohttp
import orjson
import yaml

from tests.servers import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
SHIPPED_PACKS = REPO / "packs"
LOOPD = Path(sys.executable).parent / "loopd"
STOP_TIMEOUT = 10.0


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


@dataclass
class Config:
    """A loopd.yaml and its rules/inventory/packs folders under ``root``."""

    root: Path
    sources: list[dict[str, Any]] = field(default_factory=list)
    sinks: list[dict[str, Any]] = field(default_factory=list)
    rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # file -> rules
    entities: dict[str, dict[str, Any]] = field(default_factory=dict)
    credentials: dict[str, dict[str, str]] = field(default_factory=dict)
    pack_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # outcomes, engine, ...

    @property
    def path(self) -> Path:
        return self.root / "loopd.yaml"

    @property
    def store(self) -> Path:
        return self.root / "var" / "loopd.db"

    @property
    def rules_dir(self) -> Path:
        return self.root / "rules"

    @property
    def packs_dir(self) -> Path:
        """Packs written by the test (``add_pack``), loaded after the shipped ones."""
        return self.root / "packs"

    def write(self) -> Path:
        self.rules_dir.mkdir(parents=True, exist_ok=True)
        self.packs_dir.mkdir(parents=True, exist_ok=True)
        for name, rules in self.rules.items():
            self.write_rules(name, rules)
        (self.root / "inventory.yaml").write_text(
            _dump({"entities": self.entities, "credentials": self.credentials}))
        config = {
            "listen": "127.0.0.1:0",  # the harness passes --listen
            "sources": self.sources, "sinks": self.sinks,
            "rules": ["rules"], "packs": [str(SHIPPED_PACKS), "packs"],
            "inventory": "inventory.yaml", "pack_config": self.pack_config,
            "store": {"path": "var/loopd.db"},
            "log": {"format": "json", "level": "info"},
            **self.extra,
        }
        self.path.write_text(_dump(config))
        return self.path

    def write_rules(self, name: str, rules: list[dict[str, Any]] | str) -> Path:
        """Write (or overwrite) one rule file; a string is written as given."""
        path = self.rules_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rules if isinstance(rules, str) else _dump({"rules": rules}))
        return path

    def add_pack(self, name: str, files: dict[str, str]) -> Path:
        """A pack folder of this test: relative path -> file text."""
        folder = self.packs_dir / name
        for rel, text in files.items():
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        return folder


class DaemonError(Exception):
    """The daemon did not behave: the message carries the tail of its log."""


class LoopdProcess:
    """One loopd daemon: start / stop / kill / restart, and its HTTP API."""

    def __init__(self, config: Config, env: dict[str, str] | None = None, *,
                 token: str | None = None, ssl: SSLContext | None = None) -> None:
        self.config = config
        self.port = free_port()
        # token: sent as a bearer token on every call; ssl: talk HTTPS trusting it
        self.token = token
        self.ssl = ssl
        self.url = f"{'https' if ssl is not None else 'http'}://127.0.0.1:{self.port}"
        # the test decides every LOOPD_* setting, not the shell that runs pytest
        base = {k: v for k, v in os.environ.items() if not k.startswith("LOOPD_")}
        self.env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.logs: list[Path] = []
        self.starts = 0
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle ----------------------------------------------------------------

    @property
    def log(self) -> Path:
        return self.logs[-1]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 30.0) -> None:
        """Start ``loopd run`` and return once ``/readyz`` answers 200."""
        assert not self.running, "already running"
        if not self.config.path.exists():
            self.config.write()
        self.starts += 1
        log = self.config.root / f"loopd-{self.starts}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                str(LOOPD), "run", "-c", str(self.config.path),
                "--listen", f"127.0.0.1:{self.port}",
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=self.env, cwd=self.config.root,
            )
        try:
            await wait_until(self._ready, timeout=timeout, interval=0.05,
                             what="loopd /readyz to answer 200")
        except AssertionError as exc:
            await self.close()
            raise DaemonError(f"{exc}\n{self.tail()}") from None

    async def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise DaemonError(f"loopd exited with {self.proc.returncode} before it was ready"
                              f"\n{self.tail()}")
        try:
            status, _ = await self.request("GET", "/readyz", timeout=1.0)
        except (aiohttp.ClientError, TimeoutError):
            return False
        return status == 200

    async def stop(self, timeout: float = STOP_TIMEOUT) -> float:
        """SIGTERM; assert exit code 0 within ``timeout`` s; return how long it took."""
        assert self.proc is not None and self.running, "not running"
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.close()
            raise DaemonError(f"loopd did not exit within {timeout}s of SIGTERM\n"
                              f"{self.tail()}") from None
        took = time.monotonic() - started
        if self.proc.returncode != 0:
            raise DaemonError(f"loopd exited with {self.proc.returncode} after SIGTERM\n"
                              f"{self.tail()}")
        await self._close_session()
        return took

    async def kill(self) -> None:
        """``kill -9``: no shutdown code runs."""
        assert self.proc is not None and self.running, "not running"
        self.proc.kill()
        assert await asyncio.wait_for(self.proc.wait(), 10) == -signal.SIGKILL
        await self._close_session()

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.running, "not running"
        self.proc.send_signal(sig)

    async def close(self) -> None:
        """Teardown: whatever state it is in, leave no process behind."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        await self._close_session()

    def tail(self, lines: int = 60) -> str:
        out = []
        for log in self.logs[-2:]:
            try:
                text = log.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                text = ["(no log)"]
            out.append(f"----- {log.name} (last {len(text)} lines) -----")
            out.extend(text)
        return "\n".join(out)

    def log_lines(self) -> list[dict[str, Any]]:
        """Every JSON log line of every start, in order (other lines skipped)."""
        out = []
        for log in self.logs:
            for line in log.read_bytes().splitlines():
                if line.startswith(b"{"):
                    with contextlib.suppress(orjson.JSONDecodeError):
                        out.append(orjson.loads(line))
        return out

    # -- HTTP ------------------------------------------------------------------------

    async def _close_session(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None, *,
                      timeout: float = 30.0) -> tuple[int, Any]:
        """One API call; returns (status, decoded JSON or text)."""
        if self._session is None:
            auth = {"Authorization": f"Bearer {self.token}"} if self.token else None
            self._session = aiohttp.ClientSession(
                headers=auth, connector=aiohttp.TCPConnector(ssl=self.ssl)
                if self.ssl is not None else None)
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        async with self._session.request(
                method, self.url + path, data=data, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            raw = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, orjson.loads(raw)
            return resp.status, raw.decode(errors="replace")

    async def get(self, path: str) -> Any:
        status, body = await self.request("GET", path)
        assert status == 200, f"GET {path}: {status} {body}"
        return body

    async def post(self, path: str, body: Any = None, expect: int = 200) -> Any:
        status, answer = await self.request("POST", path, body)
        assert status == expect, f"POST {path}: {status} {answer}"
        return answer

    async def runs(self, **query: Any) -> list[dict[str, Any]]:
        qs = "&".join(f"{k}={v}" for k, v in {"limit": 1000, **query}.items())
        return list((await self.get(f"/v1/runs?{qs}"))["runs"])

    async def run(self, run_id: str) -> dict[str, Any]:
        return dict(await self.get(f"/v1/runs/{run_id}"))

    async def wait_run(self, run_id: str, predicate: Callable[[dict[str, Any]], bool],
                       timeout: float = 20.0, what: str = "run state") -> dict[str, Any]:
        """Poll ``GET /v1/runs/{id}`` until ``predicate(story)``; return the story."""
        story: dict[str, Any] = {}

        async def check() -> bool:
            nonlocal story
            story = await self.run(run_id)
            return predicate(story)

        try:
            await wait_until(check, timeout=timeout, interval=0.05, what=what)
        except AssertionError as exc:
            raise DaemonError(f"{exc}; run is {_short(story)}\n{self.tail(30)}") from None
        return story

    async def wait_runs(self, count: int, timeout: float = 20.0, **query: Any
                        ) -> list[dict[str, Any]]:
        """Poll ``GET /v1/runs`` until at least ``count`` runs match ``query``."""
        runs: list[dict[str, Any]] = []

        async def check() -> bool:
            nonlocal runs
            runs = await self.runs(**query)
            return len(runs) >= count

        await wait_until(check, timeout=timeout, interval=0.05,
                         what=f"{count} runs with {query or 'any status'}")
        return runs

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """``/metrics`` parsed: (name, labels) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        text = await self.get("/metrics")
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    async def metric(self, name: str, **labels: str) -> float:
        return (await self.metrics()).get((name, frozenset(labels.items())), 0.0)

    # -- the store ------------------------------------------------------------------

    def store_query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return store_query(self.config.store, sql, params)


def store_query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the daemon's SQLite store (WAL: safe while it writes, or after kill -9)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        return list(conn.execute(sql, params).fetchall())
    finally:
        conn.close()


def _short(story: dict[str, Any]) -> str:
    keep = ("id", "status", "outcome", "reason")
    steps = [(s.get("task"), s.get("status")) for s in story.get("steps", [])]
    return f"{ {k: story.get(k) for k in keep} } steps={steps}"


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str,
                     timeout: float = 20.0) -> None:
    """Poll ``check`` every 50 ms until true; fail naming ``what`` after ``timeout`` s."""
    await wait_until(check, timeout=timeout, interval=0.05, what=what)


class SharedStore:
    """One store several daemons share: a SQLite file (``path``) or a PostgreSQL database
    (``dsn``, handed to the daemons as ``env:LOOPD_PG_DSN``, never written in a file).

    ``config(**extra)`` is the ``store:`` section of each replica's loopd.yaml, ``env`` the
    variables its process needs; ``query`` reads the store from the test (``?`` marks on
    both kinds, so no literal ``%`` in the SQL), rows as tuples."""

    def __init__(self, *, path: Path | None = None, dsn: str | None = None) -> None:
        assert (path is None) != (dsn is None), "a SQLite path or a PostgreSQL DSN"
        self.path = path
        self.dsn = dsn
        self.kind = "sqlite" if path is not None else "postgres"
        self._pg: Any = None  # psycopg.AsyncConnection, opened at the first query
        self._opening = asyncio.Lock()  # several pollers may ask first at once

    def config(self, **extra: Any) -> dict[str, Any]:
        if self.path is not None:
            return {"path": str(self.path), **extra}
        return {"type": "postgres", "dsn": "env:LOOPD_PG_DSN", **extra}

    @property
    def env(self) -> dict[str, str]:
        return {"LOOPD_PG_DSN": self.dsn} if self.dsn is not None else {}

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.path is not None:
            if not self.path.exists():  # no daemon has opened it yet
                return []
            return store_query(self.path, sql, params)
        # imported here: only the PostgreSQL store needs the driver (a dependency of loopd's
        # Postgres store); the ignore keeps mypy quiet on an install without it
        import psycopg  # type: ignore[import-not-found, unused-ignore]

        async with self._opening:
            if self._pg is None:
                assert self.dsn is not None
                self._pg = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        async with self._pg.cursor() as cur:
            await cur.execute(sql.replace("?", "%s"), params)
            return [tuple(row) for row in await cur.fetchall()]

    async def scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = await self.query(sql, params)
        return rows[0][0] if rows else None

    async def close(self) -> None:
        if self._pg is not None:
            await self._pg.close()
            self._pg = None
