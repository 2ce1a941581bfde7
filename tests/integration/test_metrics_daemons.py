"""Two daemons in one process keep separate metrics, and each ``/metrics`` shows its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from loopd.config import load_config
from loopd.daemon import Daemon
from tests.integration.test_api import _until_ready

CONFIG = """\
listen: 127.0.0.1:0
sources:
  - {name: webhook, type: webhook}
rules: []
packs: []
store: {path: var/loopd.db}
"""


async def _start(daemon: Daemon) -> asyncio.Task[None]:
    ready = asyncio.Event()
    return await _until_ready(daemon.run(on_ready=lambda _: ready.set()), ready)


def _daemon(root: Path) -> Daemon:
    root.mkdir()
    (root / "loopd.yaml").write_text(CONFIG)
    return Daemon(load_config(root / "loopd.yaml"))


async def _post_events(port: int, n: int) -> None:
    async with aiohttp.ClientSession() as http:
        events = [{"id": f"e{i}", "topic": "disk", "data": {}} for i in range(n)]
        async with http.post(f"http://127.0.0.1:{port}/v1/events", json=events) as resp:
            assert resp.status == 200, await resp.text()


async def _exposition(port: int) -> str:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def test_two_daemons_do_not_see_each_others_counts(tmp_path: Path) -> None:
    """Events posted to one daemon are counted in its registry and /metrics, not the other's."""
    one, two = _daemon(tmp_path / "one"), _daemon(tmp_path / "two")
    tasks: list[asyncio.Task[None]] = []
    try:
        for d in (one, two):
            tasks.append(await _start(d))
        assert one.port is not None and two.port is not None
        await _post_events(one.port, 2)
        await _post_events(two.port, 3)
        await one.engine.drain(timeout=10)
        await two.engine.drain(timeout=10)
        assert one.metrics.value("loopd_events_received_total", source="webhook") == 2
        assert two.metrics.value("loopd_events_received_total", source="webhook") == 3
        assert 'loopd_events_received_total{source="webhook"} 2.0' in await _exposition(one.port)
        assert 'loopd_events_received_total{source="webhook"} 3.0' in await _exposition(two.port)
    finally:
        for d in (one, two):
            d.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
