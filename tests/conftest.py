"""Shared test configuration.

Test servers (brokers, SSH, HTTP targets) live in ``tests/servers/`` and are
started by the tests themselves on free loopback ports. When ``CI=true`` a
missing test server is a failure, never a skip: use ``servers.require``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

pytest_plugins = [
    "tests.servers.kafka",
    "tests.servers.mqtt",
    "tests.servers.ssh",
    "tests.servers.http_targets",
    "tests.servers.postgres",
]


def _sqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


@pytest.fixture(autouse=True)
def _no_leaked_store() -> Iterator[None]:
    """A test must close every store it opens: a leaked aiosqlite thread keeps the
    interpreter alive after the suite, so CI would hang instead of finishing."""
    before = _sqlite_threads()
    yield
    leaked = _sqlite_threads() - before
    for thread in leaked:
        thread.join(timeout=2)
    leaked = {t for t in leaked if t.is_alive()}
    if leaked:
        pytest.fail(f"{len(leaked)} SQLite connection(s) left open by this test")
