"""Live updates: a server-sent event stream of the incident list, or of one run's trace.

``GET /live`` (``?run=ID`` for a trace) polls the store every ``POLL`` seconds and sends
the part of the page again when what it shows has changed (``event: incidents`` or
``event: trace``, the rendered HTML as data), and a comment now and then so proxies keep
the connection. Polling the store, not this process's memory, is what makes it right
behind a load balancer: a run executed by another replica shows up too.

The stream ends when the client goes away, or at once when the daemon shuts down (the
app's ``on_shutdown`` sets ``STOPPING``), so no handler is left for the runner to cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Any

import orjson
from aiohttp import web

from loopd.ui.pages import Pages

POLL = 1.0  # s between two looks at the store
KEEPALIVE = 15  # polls without a change between two comments
STOPPING = web.AppKey("loopd.ui.stopping", asyncio.Event)


def sse(event: str, html: str) -> bytes:
    """One server-sent event: every line of the data on its own ``data:`` line."""
    lines = "".join(f"data: {line}\n" for line in html.splitlines() or [""])
    return f"event: {event}\n{lines}\n".encode()


def _fingerprint(data: Any) -> bytes:
    return hashlib.sha256(orjson.dumps(data, default=repr)).digest()


class Live:
    def __init__(self, pages: Pages) -> None:
        self.pages = pages

    async def stream(self, request: web.Request) -> web.StreamResponse:
        run_id = request.query.get("run")
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})  # nginx: pass each event on as it comes
        await response.prepare(request)
        stopping = request.app[STOPPING]
        seen: bytes | None = None
        quiet = 0
        try:
            await response.write(b"retry: 2000\n\n")
            while not stopping.is_set():
                event, data, template = await self._look(request, run_id)
                mark = _fingerprint(data)
                if mark != seen:
                    seen, quiet = mark, 0
                    await response.write(sse(event, self.pages.fragment(template, **data)))
                else:
                    quiet += 1
                    if quiet % KEEPALIVE == 0:
                        await response.write(b": still here\n\n")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL):
                        await stopping.wait()
        except ConnectionResetError:  # the browser went away: nothing more to send
            return response
        await response.write_eof()
        return response

    async def _look(self, request: web.Request, run_id: str | None
                    ) -> tuple[str, dict[str, Any], str]:
        if run_id is None:
            return "incidents", await self.pages.incidents_data(request), "_incidents.html"
        data = await self.pages.trace_data(request, run_id)
        if data is None:
            return "trace", {"missing": run_id}, "_gone.html"
        return "trace", data, "_trace.html"
