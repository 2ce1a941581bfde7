"""A real ``loopd run`` daemon (a subprocess, see ``tests/e2e/daemon.py``) fed events that
drive its rules' expressions and templates past their bounds (issue 9, finding 4).

Without bounds the first such event pins the daemon's core and grows it by gigabytes:
``/healthz`` stops answering. With them each abusive evaluation is an ``error`` decision
naming the bound, ``/healthz`` answers within a second throughout, the daemon's memory
stays flat, and the next event is decided and run as usual.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.daemon import Config, LoopdProcess
from tests.servers import wait_until

HEALTHZ_S = 1.0
MAX_RSS_MB = 400
ON = {"source": "webhook", "topic": "abuse"}
RULES = [
    {"name": "power-if", "on": ON, "if": "event.n ** event.n > 0",
     "run": {"action": "core.noop"}},
    {"name": "repeat-key", "on": ON, "key": "{{ event.s * event.n }}",
     "run": {"action": "core.noop"}},
    {"name": "nested-loops", "on": ON, "key": "{{ event.host }}",
     "run": {"action": "core.log", "input": {"message": (
         "{% for i in range(event.m) %}{% for j in range(event.m) %}x{% endfor %}"
         "{% endfor %}")}}},
    {"name": "wide-filter", "on": ON, "key": "{{ event.host }}",
     "run": {"action": "core.log", "input": {"message": "{{ event.s | center(event.n) }}"}}},
    {"name": "ping", "on": {"source": "webhook", "topic": "ping"}, "key": "{{ event.host }}",
     "run": {"action": "core.noop", "input": {"pong": True}}},
]
ABUSE = {"topic": "abuse", "data": {"n": 10**9, "s": "ab", "m": 100_000, "host": "web-1"}}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[LoopdProcess]:
    config = Config(root=tmp_path, sources=[{"name": "webhook", "type": "webhook"}],
                    rules={"abuse.yaml": RULES})
    process = LoopdProcess(config)
    try:
        await process.start()
        yield process
    finally:
        await process.close()  # kills a daemon that no longer answers


async def test_abusive_events_fail_their_decisions_while_the_daemon_keeps_answering(
        daemon: LoopdProcess) -> None:
    """Events that would hang the daemon get error decisions naming the bound, ``/healthz``
    answers within a second all along, RSS stays bounded and the next event runs."""
    assert daemon.proc is not None
    for event in (ABUSE, {"topic": "ping", "data": {"host": "web-2"}}):
        try:
            status, _ = await daemon.request("POST", "/v1/events", event, timeout=5)
        except TimeoutError:
            raise AssertionError("POST /v1/events did not answer within 5s") from None
        assert status == 200
    slowest = 0.0

    async def settled() -> bool:
        nonlocal slowest
        started = time.monotonic()
        try:
            status, _ = await daemon.request("GET", "/healthz", timeout=HEALTHZ_S)
        except TimeoutError:
            raise AssertionError(f"/healthz did not answer within {HEALTHZ_S}s") from None
        slowest = max(slowest, time.monotonic() - started)
        assert status == 200
        decided = daemon.store_query("SELECT COUNT(*) FROM decisions")[0][0]
        return bool(decided >= 5 and [r for r in await daemon.runs() if r["rule"] == "ping"])

    await wait_until(settled, timeout=30, interval=0.05, what="five decisions and a ping run")
    assert slowest < HEALTHZ_S
    assert rss_mb(daemon.proc.pid) < MAX_RSS_MB

    rows = daemon.store_query("SELECT rule, outcome, reason FROM decisions ORDER BY seq")
    by_rule = {rule: (outcome, reason) for rule, outcome, reason in rows}
    expected = {
        "power-if": "if: expression exceeds the integer bound of 4096 bits",
        "repeat-key": "key: expression exceeds the string bound of 4194304 characters",
        "nested-loops": "template exceeds the loop budget of 100000 iterations",
        "wide-filter": "filter argument width=1000000000 exceeds its bound of 4194304",
    }
    for rule, message in expected.items():
        outcome, reason = by_rule[rule]
        assert outcome == "error" and message in reason, (rule, outcome, reason)
    assert by_rule["ping"][0] != "error"
    (ping,) = [r for r in await daemon.runs() if r["rule"] == "ping"]
    await daemon.wait_run(ping["id"], lambda story: story["status"] == "succeeded")
