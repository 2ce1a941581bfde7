"""A PostgreSQL server on loopback for the tests: ``initdb`` + ``postgres`` in a temporary
directory on a free port, never the server that may already listen on 5432.

The binaries come from the machine's PostgreSQL packages (``/usr/lib/postgresql/*/bin``,
or ``LOOPD_TEST_PG_BIN``); ``./scripts/test`` installs Debian's ``postgresql`` when they
are missing and it runs as root. PostgreSQL refuses to run as root: as root the server
runs as ``nobody`` (data directory and socket directory owned by it). Without binaries
the tests that need the server skip, and fail under ``CI=true`` (``servers.require``).

``postgres_server`` (session scope) is one server for the session; ``postgres_dsn`` gives
each test a database of its own (``CREATE DATABASE``), so tests never see each other's
rows. ``stop()`` / ``start()`` restart the server on the same port and data.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers import free_port, require

USER = "loopd"


def pg_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres`` (the newest version), or None."""
    configured = os.environ.get("LOOPD_TEST_PG_BIN")
    candidates = [configured] if configured else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2])
        if p.split("/")[-2].isdigit() else 0, reverse=True)
    for directory in candidates:
        if directory and (Path(directory) / "initdb").exists() \
                and (Path(directory) / "postgres").exists():
            return Path(directory)
    return None


def _as_server_user() -> list[str]:
    """The prefix that runs a command as the unprivileged server user (as root only)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


@dataclass
class PostgresServer:
    bin: Path
    root: Path
    port: int
    _proc: subprocess.Popen[bytes] | None = None
    _dbs: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "nobody", "nogroup")
            shutil.chown(self.socket_dir, "nobody", "nogroup")
        subprocess.run(
            [*_as_server_user(), str(self.bin / "initdb"), "-D", str(self.data), "-U", USER,
             "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        if self.running:
            return
        log = (self.root / "postgres.log").open("ab")
        # fsync off: a test server's durability is the machine's page cache; the
        # transaction semantics loopd relies on are the same
        self._proc = subprocess.Popen(
            [*_as_server_user(), str(self.bin / "postgres"), "-D", str(self.data),
             "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.socket_dir),
             "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=300",
             "-c", "shared_buffers=64MB"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                tail = (self.root / "postgres.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres exited with {self._proc.returncode}: {tail}")
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                 "-U", USER, "-q"], check=False)
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"postgres on port {self.port} not ready after {timeout}s")

    def stop(self, *, fast: bool = True) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        # SIGINT is PostgreSQL's "fast" shutdown: clients disconnected, data consistent
        proc.send_signal(2 if fast else 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql and return its unaligned output (tests' own reads)."""
        out = subprocess.run(
            [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER,
             "-d", database, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True, capture_output=True, text=True)
        return out.stdout

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}")
        self._dbs.append(name)
        return name


def start_postgres() -> PostgresServer | None:
    """A running server in a new temporary directory, or None without binaries."""
    directory = pg_bin()
    if directory is None:
        return None
    root = Path(tempfile.mkdtemp(prefix="loopd-pg-"))
    server = PostgresServer(directory, root, free_port())
    server.init()
    server.start()
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = None
    if pg_bin() is not None:
        server = start_postgres()
    require(server is not None, "PostgreSQL binaries (initdb, postgres) in "
            "/usr/lib/postgresql/*/bin; install Debian's postgresql, or set LOOPD_TEST_PG_BIN")
    assert server is not None
    try:
        yield server
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A DSN of a fresh, empty database of its own for this test."""
    if not postgres_server.running:  # a test before this one stopped it
        postgres_server.start()
    return postgres_server.dsn(postgres_server.create_database())
