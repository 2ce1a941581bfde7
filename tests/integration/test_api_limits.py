"""The HTTP API's limits and health, against a real daemon on loopback.

Nesting depth, ids of events sent without one, body size enforced while reading,
idle / body timeouts, the connection cap, liveness of a wedged engine, the body limit of
routes that take none, the batch size, concurrent ingest requests, and a full queue. Each test
starts a real ``Daemon`` (SQLite store in tmp_path) with small limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from loopd.api.limits import INGEST_GATE
from loopd.config import load_config
from loopd.errors import ConfigError
from loopd.store.base import Batch, CommitResult, Store
from tests.integration.test_api import REPO, RULES, Api, sample, serving
from tests.servers import wait_until

CONFIG = """\
listen: 127.0.0.1:0
sources:
  - {name: webhook, type: webhook, max_payload: 1MiB}
rules: [rules]
packs: [packs]
store: {path: var/loopd.db}
api: {idle_timeout: 0.5s, body_timeout: 0.5s, max_connections: 8}
engine: {stall_after: 0.5s}
"""

Start = Callable[[], Awaitable[Api]]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "alerts.yaml").write_text(RULES)
    shutil.copytree(REPO / "packs" / "core", tmp_path / "packs" / "core")
    (tmp_path / "loopd.yaml").write_text(CONFIG)
    async with serving(tmp_path / "loopd.yaml", rules_dir) as api:
        yield api


async def connect(api: Api) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert api.daemon.port is not None
    return await asyncio.open_connection("127.0.0.1", api.daemon.port)


async def closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (fails after 10 s)."""
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""


async def test_an_event_nested_too_deep_is_rejected_and_the_others_decided(api: Api) -> None:
    """An event nested 1,000 levels deep is a 400 naming its depth; the list's others are
    still decided, and the engine keeps deciding afterwards."""
    before = sample("loopd_events_rejected_total", source="webhook", reason="decode")
    deep = b'{"a":' * 998 + b"1" + b"}" * 998  # orjson reads it, but writes only 255 deep
    status, body = await api.post("/v1/events", data=b'[{"id": "deep", "topic": "disk", '
                                  b'"key": "db-9", "data": {"used": 0.99, "a": ' + deep
                                  + b'}}, {"id": "d1", "topic": "disk", "key": "db-1", '
                                  b'"data": {"used": 0.95}}]')
    assert status == 400
    assert (body["accepted"], body["rejected"]) == (1, 1)
    assert body["errors"][0].startswith("webhook 127.0.0.1 /v1/events[0]: ")
    assert "nested 1000 levels deep (limit 64)" in body["errors"][0]
    assert sample("loopd_events_rejected_total", source="webhook", reason="decode") \
        - before == 1
    status, body = await api.post("/v1/events", {"id": "d2", "topic": "disk", "key": "db-2",
                                                 "data": {"used": 0.97}})
    assert (status, body["accepted"]) == (200, 1)
    await api.settled()
    assert sorted(r["key"] for r in await api.runs("hot-disk")) == ["db-1", "db-2"]


async def test_an_event_without_id_posted_twice_is_decided_once(api: Api) -> None:
    """The same id-less event (with its time) posted twice gives one decision and one run."""
    event = {"topic": "disk", "key": "db-1", "time": "2024-05-01T10:00:00Z",
             "data": {"used": 0.95}}
    status, first = await api.post("/v1/events", event)
    assert (status, first["accepted"]) == (200, 1)
    await api.settled()
    status, second = await api.post("/v1/events", event)
    assert (status, second["accepted"]) == (200, 1)
    await api.settled()
    assert len(await api.runs("hot-disk")) == 1
    assert await api.daemon.store.count_decisions(rule="hot-disk") == 1
    assert sample("loopd_events_duplicate_total", source="webhook") == 1


async def test_a_chunked_body_over_max_payload_is_refused_while_reading(api: Api) -> None:
    """A chunked upload of 64 MiB to a 1 MiB source gets 413 long before it is sent: the
    server stops reading at max_payload instead of buffering the body."""
    reader, writer = await connect(api)
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    answer = asyncio.ensure_future(reader.readline())
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * 64 * 1024)
    sent = 0
    try:
        while not answer.done() and sent < 64 * 1024 * 1024:
            writer.write(chunk)
            sent += 64 * 1024
            await writer.drain()
            await asyncio.sleep(0)  # let the answer be read as soon as it arrives
        assert (await asyncio.wait_for(answer, 10)).startswith(b"HTTP/1.1 413 ")
    except ConnectionResetError:
        pass  # the server may close before all of it arrives; the count below still holds
    finally:
        answer.cancel()
        writer.close()
    # socket buffers on loopback hold a few MiB; without the limit the server reads 64 MiB
    assert sent < 16 * 1024 * 1024, sent
    assert sample("loopd_events_rejected_total", source="webhook", reason="too_large") == 1


async def test_an_idle_connection_is_closed_after_the_idle_timeout(api: Api) -> None:
    """A connection that sends nothing, or stops in the middle of its headers, is closed
    after ``api.idle_timeout``."""
    idle, idle_w = await connect(api)
    half, half_w = await connect(api)
    half_w.write(b"POST /v1/events HTTP/1.1\r\nHost: lo")
    try:
        assert await closed(idle) == b""
        assert await closed(half) == b""
    finally:
        idle_w.close()
        half_w.close()


async def test_a_half_sent_body_gets_408_after_the_body_timeout(api: Api) -> None:
    """A request whose body stops arriving is answered 408 and closed after
    ``api.body_timeout``."""
    reader, writer = await connect(api)
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 b"\r\nContent-Length: 100\r\n\r\n{\"topic\": ")
    try:
        answer = await closed(reader)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"body timeout" in answer


async def test_connections_over_the_cap_are_refused(api: Api) -> None:
    """With ``api.max_connections`` open, the next connection gets 503 and is closed;
    once one closes, a new one is served."""
    held = [await connect(api) for _ in range(8)]
    try:
        async def counted() -> bool:
            return len(api.daemon.runner.server.connections) == 8  # type: ignore[union-attr]

        await wait_until(counted, what="8 connections to be open")
        reader, writer = await connect(api)
        answer = await closed(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"connection limit" in answer
    finally:
        for _, w in held:
            w.close()

    async def served() -> bool:
        try:
            return (await api.get("/healthz"))[0] == 200
        except aiohttp.ClientError:
            return False

    await wait_until(served, what="a new connection to be served")


class WedgedStore:
    """A store whose commits block until released: the engine makes no progress."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.release = asyncio.Event()

    async def commit(self, batch: Batch) -> CommitResult:
        await self.release.wait()
        return await self._inner.commit(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_liveness_fails_while_the_engine_is_wedged(api: Api) -> None:
    """/healthz is 200 while idle, 503 with a reason once an event waits longer than
    ``engine.stall_after`` without a batch written, and 200 again once it moves."""
    assert await api.get("/healthz") == (200, {"status": "ok"})
    engine = api.daemon.engine
    wedged = WedgedStore(engine.store)
    engine.store = cast(Store, wedged)
    post = asyncio.create_task(api.post("/v1/events", {"id": "w1", "topic": "disk",
                                                       "key": "db-1", "data": {"used": 0.99}}))

    async def status() -> int:
        return (await api.get("/healthz"))[0]

    async def dead() -> bool:
        return await status() == 503

    await wait_until(dead, what="/healthz to say the engine is stalled")
    body = (await api.get("/healthz"))[1]
    assert body["status"] == "stalled"
    assert "no batch written" in body["reason"]
    wedged.release.set()
    assert (await post)[0] == 200
    assert await status() == 200
    engine.store = wedged._inner
    await api.settled()
    assert await status() == 200


# -- limits of what one request may ask (api.max_body*, max_batch, max_concurrent_ingest,
# queue_timeout) ---------------------------------------------------------------------------

LIMITED = """\
listen: 127.0.0.1:0
sources:
  - {{name: webhook, type: webhook, max_payload: 1MiB}}
rules: [rules]
packs: [packs]
store: {{path: var/loopd.db}}
api: {{{api}}}
engine: {{queue_size: 2}}
"""


@contextlib.asynccontextmanager
async def limited(tmp_path: Path, api: str) -> AsyncIterator[Api]:
    """A daemon with the ``api:`` settings ``api`` and an engine queue of two."""
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "alerts.yaml").write_text(RULES)
    shutil.copytree(REPO / "packs" / "core", tmp_path / "packs" / "core")
    (tmp_path / "loopd.yaml").write_text(LIMITED.format(api=api))
    async with serving(tmp_path / "loopd.yaml", rules_dir) as daemon_api:
        yield daemon_api


def disk(n: int, prefix: str = "d") -> dict[str, Any]:
    return {"id": f"{prefix}{n}", "topic": "disk", "key": f"db-{n}", "data": {"used": 0.95}}


async def test_a_body_on_a_route_that_takes_none_is_refused_413(api: Api) -> None:
    """A reload or approve carrying a body over ``api.max_body_unused`` (declared or
    chunked) is refused 413 naming the limit, before it acts or is audited."""
    status, body = await api.post("/v1/reload", data=b"x" * 8192)
    assert status == 413
    assert body["error"] == ("body of 8192 bytes exceeds api.max_body_unused 4096; reload "
                             "takes no body")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(4):
            yield b"y" * 2048

    status, body = await api.post("/v1/runs/r1/approve", data=chunks())
    assert status == 413
    assert "exceeds api.max_body_unused 4096; approve_run takes no body" in body["error"]
    assert sample("loopd_api_refused_total", route="reload", reason="body") == 1
    assert sample("loopd_api_refused_total", route="approve_run", reason="body") == 1
    assert (await api.get("/v1/audit"))[1]["audit"] == []
    # a small body is ignored: the reload runs (422: this fixture's rules name a source
    # it does not configure)
    assert (await api.post("/v1/reload", data=b"{}"))[0] == 422


async def test_a_batch_over_max_batch_is_413_and_nothing_is_decided(tmp_path: Path) -> None:
    """Six events to a daemon with ``api.max_batch: 5`` are refused 413 naming the limit,
    and none of them is decided; five are accepted."""
    async with limited(tmp_path, "max_batch: 5") as api:
        status, body = await api.post("/v1/events", [disk(n) for n in range(6)])
        assert status == 413
        assert "6 events exceed api.max_batch 5; nothing was decided" in body["error"]
        await api.settled()
        assert await api.daemon.store.count_decisions() == 0
        assert sample("loopd_events_received_total", source="webhook") == 0
        assert sample("loopd_api_refused_total", route="events", reason="batch") == 1
        status, body = await api.post("/v1/events", [disk(n) for n in range(5)])
        assert (status, body["accepted"]) == (200, 5)


async def test_ingest_past_max_concurrent_ingest_is_503_at_once(tmp_path: Path) -> None:
    """With two ingest requests being served (their decision held by a wedged store), a
    third is answered 503 with Retry-After at once; the two finish once the store moves."""
    async with limited(tmp_path, "max_concurrent_ingest: 2") as api:
        engine = api.daemon.engine
        wedged = WedgedStore(engine.store)
        engine.store = cast(Store, wedged)
        held = [asyncio.create_task(api.post("/v1/events", disk(n))) for n in range(2)]
        try:
            assert api.daemon.runner is not None
            gate = api.daemon.runner.app[INGEST_GATE]
            await wait_until(lambda: gate.serving == 2, what="two ingest requests served")
            async with asyncio.timeout(5), api.http.post("/v1/events", json=disk(9)) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                assert "api.max_concurrent_ingest" in (await resp.json())["error"]
            assert sample("loopd_api_refused_total", route="events",
                          reason="concurrency") == 1
        finally:
            wedged.release.set()
            results = await asyncio.gather(*held)
            engine.store = wedged._inner
        assert [status for status, _ in results] == [200, 200]
        assert sample("loopd_ingest_requests_total", source="webhook",
                      principal="anonymous") == 2


async def test_a_full_engine_queue_is_503_with_retry_after_and_a_retry_is_deduplicated(
        tmp_path: Path) -> None:
    """While the engine's queue stays full past ``api.queue_timeout`` the request gets 503
    with Retry-After instead of holding the connection; what was queued is decided, and
    the retry decides the rest without deciding any event twice."""
    async with limited(tmp_path, "queue_timeout: 0.3s") as api:
        engine = api.daemon.engine
        wedged = WedgedStore(engine.store)
        engine.store = cast(Store, wedged)
        batch = [disk(n) for n in range(50)]
        try:
            async with asyncio.timeout(10), api.http.post("/v1/events", json=batch) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                message = (await resp.json())["error"]
            assert "engine queue stayed full for 0.3s (api.queue_timeout)" in message
            assert sample("loopd_api_refused_total", route="events", reason="queue") == 1
        finally:
            wedged.release.set()
        await api.settled()
        engine.store = wedged._inner
        queued = await api.daemon.store.count_decisions(rule="hot-disk")
        assert 0 < queued < 50
        assert f"{queued} of 50 event(s) queued" in message
        status, body = await api.post("/v1/events", batch)
        assert (status, body["accepted"]) == (200, 50)
        await api.settled()
        assert await api.daemon.store.count_decisions(rule="hot-disk") == 50
        assert len(await api.runs("hot-disk")) == 50
        assert sample("loopd_events_duplicate_total", source="webhook") == queued


@pytest.mark.parametrize(("setting", "named"), [
    ("max_batch: 0", "api.max_batch"), ("max_body: lots", "api.max_body"),
    ("trusted_proxies: [proxy.example]", "api.trusted_proxies"),
    ("queue_timeout: 0s", "api.queue_timeout")])
def test_a_bad_limit_is_a_config_error_naming_it(tmp_path: Path, setting: str,
                                                 named: str) -> None:
    """A limit or proxy list that cannot work is refused at load, naming the setting."""
    (tmp_path / "loopd.yaml").write_text(LIMITED.format(api=setting))
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "loopd.yaml")
    assert named in str(info.value)
