"""The live stream (``GET /live``) as browsers use it, with plain HTTP clients against a
real ``loopd run``: streams are capped per token, a closed one frees its place, and a
token rotated away ends the streams opened with it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from loopd.ui import live
from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, LoopdProcess
from tests.servers import wait_until

pytestmark = pytest.mark.e2e

VIEWER = "viewer-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
MAX_PER_PRINCIPAL = 20  # loopd.ui.live


def _config(config: Config, viewer_file: Path) -> None:
    viewer_file.write_text(VIEWER)
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.rules = {"r.yaml": [{"name": "log", "on": {"source": "webhook", "topic": "t"},
                                "run": {"action": "core.log", "input": {"message": "x"}}}]}
    config.extra["api"] = {"auth": {"open": ["healthz", "readyz"], "tokens": [
        {"name": "alice", "role": "viewer", "token": f"file:{viewer_file}"},
        {"name": "harness", "role": "admin", "token": "env:LIVE_ADMIN"}]}}
    config.write()


async def _open(session: aiohttp.ClientSession, daemon: LoopdProcess, token: str
                ) -> aiohttp.ClientResponse:
    return await session.get(daemon.url + "/live",
                             headers={"Authorization": f"Bearer {token}"})


async def test_streams_are_capped_per_token_and_a_closed_one_frees_its_place(
        config: Config, loopd_factory: Factory, tmp_path: Path) -> None:
    """Twenty streams for one token are served (each gets the incident list first); the
    twenty-first is a 429 naming the token; once the clients go away, their places come
    back without any write to notice it."""
    _config(config, tmp_path / "viewer")
    daemon = loopd_factory(config, {"LIVE_ADMIN": ADMIN}, token=ADMIN)
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        streams = [await _open(session, daemon, VIEWER) for _ in range(MAX_PER_PRINCIPAL)]
        try:
            assert {s.status for s in streams} == {200}
            first = await asyncio.wait_for(streams[0].content.readuntil(b"event: "), 30)
            assert first.endswith(b"event: ")
            assert (await asyncio.wait_for(streams[0].content.readline(), 30)).strip() \
                == b"incidents"
            refused = await _open(session, daemon, VIEWER)
            assert refused.status == 429
            assert "token 'alice' has 20 live streams open" in (await refused.json())["error"]
            refused.release()
        finally:
            for stream in streams:
                stream.close()

        async def freed() -> bool:
            answer = await _open(session, daemon, VIEWER)
            answer.close()
            return answer.status == 200

        await wait_until(freed, timeout=30, what="closed streams to free their places")


async def test_a_token_rotated_away_ends_the_streams_it_opened(
        config: Config, loopd_factory: Factory, tmp_path: Path) -> None:
    """The viewer token's file gets a new value and loopd reloads: the stream opened with
    the old value ends at its next poll (not at its periodic recheck, 15 polls away), and
    the old value opens no new one."""
    viewer_file = tmp_path / "viewer"
    _config(config, viewer_file)
    daemon = loopd_factory(config, {"LIVE_ADMIN": ADMIN}, token=ADMIN)
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        stream = await _open(session, daemon, VIEWER)
        assert stream.status == 200
        viewer_file.write_text("viewer-token-rotated-9876543210")
        await daemon.post("/v1/reload")

        async def ended() -> bytes:
            return await stream.content.read()  # to the end of the stream

        began = time.monotonic()
        await asyncio.wait_for(ended(), 60)
        # a second's poll, with room for a slow machine, and short of the recheck's 15 s
        assert time.monotonic() - began < live.RECHECK * live.POLL * 2 / 3
        stream.release()
        assert (await _open(session, daemon, VIEWER)).status == 401
