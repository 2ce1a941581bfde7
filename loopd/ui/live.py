"""Live updates: a server-sent event stream of the incident list, or of one run's trace.

``GET /live`` (``?run=ID`` for a trace) sends the part of the page again when what it
shows has changed (``event: incidents`` or ``event: trace``, the rendered HTML as data),
and a comment now and then so proxies keep the connection. Polling the store, not this
process's memory, is what makes it right behind a load balancer: a run executed by
another replica shows up too.

One ``Feed`` per watched thing (the incident list, or one run) looks at the store once
every ``POLL`` seconds however many browsers watch it, and only while one does: twenty
open tabs cost one poll a second, not twenty. Streams are capped (``MAX_STREAMS``, and
``MAX_PER_PRINCIPAL`` per token), so one viewer cannot take the connections ingest needs.

A stream ends when the client goes away (noticed at the next poll, not the next write),
when the credentials it was opened with stop being good (checked at the next poll after
the tokens were read again, so a token rotated away ends its streams at once, and every
``RECHECK`` polls, for a session that expired), or at once when the daemon shuts down (the
app's ``on_shutdown`` sets ``STOPPING``), so no handler is left for the runner to cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import Counter
from typing import Any

import orjson
import structlog
from aiohttp import web

from loopd.api.app import CTX, error
from loopd.api.principal import principal
from loopd.control import Control
from loopd.errors import StoreError
from loopd.ui.pages import Pages

log = structlog.get_logger("loopd.ui")

POLL = 1.0  # s between two looks at the store
KEEPALIVE = 15  # polls without a change between two comments
RECHECK = 15  # polls between two checks that the stream's credentials are still good
MAX_STREAMS = 100
MAX_PER_PRINCIPAL = 20
STOPPING = web.AppKey("loopd.ui.stopping", asyncio.Event)


def sse(event: str, html: str) -> bytes:
    """One server-sent event: every line of the data on its own ``data:`` line."""
    lines = "".join(f"data: {line}\n" for line in html.splitlines() or [""])
    return f"event: {event}\n{lines}\n".encode()


def _fingerprint(data: Any) -> bytes:
    return hashlib.sha256(orjson.dumps(data, default=repr)).digest()


class Feed:
    """The newest rendering of one watched thing, and how many streams watch it."""

    def __init__(self, pages: Pages, control: Control, run_id: str | None) -> None:
        self.pages, self.control, self.run_id = pages, control, run_id
        self.watchers = 0
        self.version = 0  # bumped when what the part shows changed
        self.message = b""
        self._mark: bytes | None = None
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Look, render when changed, sleep; until cancelled by the last watcher."""
        while True:
            try:
                event, data, template = await self._look()
            except StoreError as exc:  # the store is down: the page keeps what it shows
                log.warning("live update could not read the store", error=str(exc))
            else:
                mark = _fingerprint(data)
                if mark != self._mark:
                    self._mark = mark
                    self.message = sse(event, self.pages.fragment(template, **data))
                    self.version += 1
            await asyncio.sleep(POLL)

    async def _look(self) -> tuple[str, dict[str, Any], str]:
        if self.run_id is None:
            return "incidents", await self.pages.incidents_data(self.control), \
                "_incidents.html"
        data = await self.pages.trace_data(self.control, self.run_id)
        if data is None:
            return "trace", {"missing": self.run_id}, "_gone.html"
        return "trace", data, "_trace.html"


class Live:
    def __init__(self, pages: Pages) -> None:
        self.pages = pages
        self._feeds: dict[str | None, Feed] = {}
        self._streams: Counter[str] = Counter()  # open streams per token name

    async def stream(self, request: web.Request) -> web.StreamResponse:
        who = principal(request).name
        if sum(self._streams.values()) >= MAX_STREAMS:
            return error(429, f"{MAX_STREAMS} live streams are open: reload later")
        if self._streams[who] >= MAX_PER_PRINCIPAL:
            return error(429, f"token {who!r} has {MAX_PER_PRINCIPAL} live streams open: "
                              "close a tab")
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})  # nginx: pass each event on as it comes
        await response.prepare(request)
        self._streams[who] += 1
        feed = self._watch(request.app[CTX].control, request.query.get("run"))
        try:
            if await self._follow(request, response, feed):
                await response.write_eof()
        finally:
            self._streams[who] -= 1
            await self._unwatch(feed)
        return response

    async def _follow(self, request: web.Request, response: web.StreamResponse,
                      feed: Feed) -> bool:
        """Write the feed's changes until the stream should end; False when the client
        went away (nothing more can be written)."""
        stopping = request.app[STOPPING]
        gate = self.pages.gate
        seen, polls, checked = 0, 0, gate.generation
        try:
            await response.write(b"retry: 2000\n\n")
            while not stopping.is_set():
                if request.transport is None or request.transport.is_closing():
                    return False
                if feed.version != seen:
                    seen = feed.version
                    await response.write(feed.message)
                polls += 1
                if polls % KEEPALIVE == 0:
                    await response.write(b": still here\n\n")
                if polls % RECHECK == 0 or gate.generation != checked:
                    checked = gate.generation
                    if not gate.still_valid(request):
                        break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL):
                        await stopping.wait()
        except ConnectionResetError:  # the browser went away: nothing more to send
            return False
        return True

    def _watch(self, control: Control, run_id: str | None) -> Feed:
        feed = self._feeds.get(run_id)
        if feed is None:
            feed = self._feeds[run_id] = Feed(self.pages, control, run_id)
            feed.task = asyncio.create_task(feed.run(), name=f"ui-live-{run_id or 'incidents'}")
        feed.watchers += 1
        return feed

    async def _unwatch(self, feed: Feed) -> None:
        feed.watchers -= 1
        if feed.watchers or feed.task is None:
            return
        del self._feeds[feed.run_id]
        feed.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feed.task
