"""Executor slots across ``kill -9`` and long waits, through the real daemon: a run that
was only waiting for a slot when loopd died acts after the restart (once), and a run
that sleeps holds no slot another run's action needs."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, LoopdProcess, eventually
from tests.servers.http_targets import Target

pytestmark = pytest.mark.e2e

RUNS = 10
CAP = 2


class Gate(Target):
    """``POST /act`` records the call's key, then answers once the gate opens."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/act", self._act)

    def keys(self) -> list[str]:
        return [str(seen.json["key"]) for seen in self.requests if seen.path == "/act"]

    async def _act(self, request: web.Request) -> web.Response:
        await self.opened.wait()
        return web.json_response({"ok": True})


ACT_PACK = """\
name: e2e
version: 0.0.1
description: a slow, non-idempotent action of the e2e tests
config:
  url: {type: string, required: true}
actions:
  act:
    runner: http
    method: POST
    url: "{{ config.url }}/act"
    json: {key: "{{ input.key }}"}
    input:
      key: {type: string, required: true}
    retries: 0
    timeout: 60s
    idempotent: false
"""

ACT_ONCE = """\
input: [key]
tasks:
  act:
    action: e2e.act
    input: {key: "{{ ctx.key }}"}
"""


def slow_actions(config: Config, gate: Gate, kind: str) -> None:
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.pack_config["e2e"] = {"url": gate.url}
    config.add_pack("e2e", {"pack.yaml": ACT_PACK, "workflows/act_once.yaml": ACT_ONCE})
    target = {"action": "e2e.act"} if kind == "action" else {"workflow": "e2e.act_once"}
    config.rules = {"act.yaml": [{
        "name": "act", "on": {"source": "webhook", "topic": "act"},
        "key": "{{ event.key }}",
        "run": {**target, "input": {"key": "{{ event.key }}"}},
    }]}
    config.extra["engine"] = {"max_concurrent_runs": CAP}


@pytest.mark.parametrize("kind", ["action", "workflow"])
async def test_runs_waiting_for_a_slot_at_kill_9_act_once_after_the_restart(
        config: Config, loopd_factory: Factory, kind: str) -> None:
    """After kill -9 while two runs act (the cap) and eight wait for an executor slot, the
    restarted daemon runs each of the eight once, and only the two that were acting end
    ``interrupted``."""
    gate = Gate()
    await gate.start()
    try:
        slow_actions(config, gate, kind)
        daemon = loopd_factory(config)
        await daemon.start()
        for n in range(RUNS):
            await daemon.post("/v1/events", {"topic": "act", "key": f"k{n}", "data": {}})
        await daemon.wait_runs(RUNS)
        await eventually(lambda: len(gate.keys()) == CAP, "the cap's actions to be acting")
        acting = set(gate.keys())
        await daemon.kill()
        assert len(gate.keys()) == CAP  # nothing else acted before the kill

        gate.opened.set()
        await daemon.start()
        await eventually(lambda: _count_final(daemon) == RUNS, "every run to end",
                         timeout=30)
        keys = gate.keys()
        assert sorted(keys) == sorted(f"k{n}" for n in range(RUNS)), keys  # each once
        runs = await daemon.runs()
        status = {r["key"]: r["status"] for r in runs}
        assert {k for k, s in status.items() if s == "interrupted"} == acting, status
        assert all(s == "succeeded" for k, s in status.items() if k not in acting), status
        await daemon.stop()
    finally:
        await gate.stop()


def _count_final(daemon: LoopdProcess) -> int:
    final = ("succeeded", "failed", "interrupted", "timed_out", "crashed", "cancelled")
    rows = daemon.store_query(
        f"SELECT count(*) FROM runs WHERE status IN ({','.join('?' * len(final))})", final)
    return int(rows[0][0])


async def test_a_sleeping_run_holds_no_slot_another_runs_action_needs(
        config: Config, loopd_factory: Factory) -> None:
    """With one executor slot, a run in ``core.sleep`` for 30 s does not keep another run's
    quick action from executing at once."""
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.rules = {"r.yaml": [
        {"name": "sleep", "on": {"source": "webhook", "topic": "sleep"},
         "run": {"action": "core.sleep", "input": {"seconds": 30}}},
        {"name": "quick", "on": {"source": "webhook", "topic": "quick"},
         "run": {"action": "core.log", "input": {"message": "quick"}}},
    ]}
    config.extra["engine"] = {"max_concurrent_runs": 1}
    daemon = loopd_factory(config)
    await daemon.start()
    await daemon.post("/v1/events", {"topic": "sleep", "key": "a", "data": {}})
    await daemon.wait_runs(1, status="running")
    sent = time.monotonic()
    await daemon.post("/v1/events", {"topic": "quick", "key": "b", "data": {}})
    await daemon.wait_runs(1, status="succeeded", timeout=5)
    assert time.monotonic() - sent < 5
    (sleeping,) = await daemon.runs(status="running")
    assert sleeping["rule"] == "sleep"
    await daemon.stop()
