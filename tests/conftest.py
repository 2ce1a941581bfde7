"""Shared test configuration.

Test servers (brokers, SSH, HTTP targets) live in ``tests/servers/`` and are
started by the tests themselves on free loopback ports. When ``CI=true`` a
missing test server is a failure, never a skip: use ``servers.require``.
"""

from __future__ import annotations

pytest_plugins = [
    "tests.servers.kafka",
    "tests.servers.mqtt",
    "tests.servers.ssh",
    "tests.servers.http_targets",
]
