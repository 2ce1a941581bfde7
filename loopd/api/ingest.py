"""``POST /v1/events`` and ``POST /v1/alertmanager``: push sources over HTTP.

The handler answers once every accepted event is decided and durable: 200
with counts, or 400 naming each rejected item (the valid ones are still
decided), or 503 when the engine did not decide in time (the events stay
queued; a retry is recognised by event id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
from aiohttp import web

from loopd import metrics
from loopd.api.app import CTX, error, json_response
from loopd.errors import DecodeError, EventError
from loopd.events import JSON, Delivery, Event
from loopd.sources.webhook import alertmanager_events, generic_events

Parser = Callable[..., list[Event | DecodeError]]


async def _ingest(request: web.Request, kind: str, parser: Parser) -> web.Response:
    ctx = request.app[CTX]
    name = request.match_info.get("source") or next(
        (n for n, (t, _) in ctx.push_sources.items() if t == kind), None)
    if name is None or ctx.push_sources.get(name, ("", 0))[0] != kind:
        return error(404, f"no {kind} source {'named ' + repr(name) if name else 'configured'}")
    max_payload = ctx.push_sources[name][1]
    origin = f"{kind} {request.remote or '?'} {request.path}"
    if request.content_length is not None and request.content_length > max_payload:
        metrics.event_rejected(name, "too_large", "payload too large", origin=origin)
        return error(413, f"payload of {request.content_length} bytes exceeds max_payload "
                          f"{max_payload} of source {name!r}")
    body = await request.read()
    if len(body) > max_payload:
        metrics.event_rejected(name, "too_large", "payload too large", origin=origin)
        return error(413, f"payload of {len(body)} bytes exceeds max_payload {max_payload} "
                          f"of source {name!r}")
    try:
        parsed: JSON = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        metrics.event_rejected(name, "decode", exc, origin=origin)
        return error(400, f"{origin}: malformed JSON: {exc}")
    try:
        items = parser(parsed, source=name, origin=origin)
    except EventError as exc:
        metrics.event_rejected(name, exc.reason, exc, origin=origin)
        return error(400, str(exc))
    loop = asyncio.get_running_loop()
    waits: list[asyncio.Future[None]] = []
    rejected = []
    for item in items:
        if isinstance(item, EventError):
            metrics.event_rejected(name, item.reason, item, origin=item.origin)
            rejected.append(str(item))
            continue
        done: asyncio.Future[None] = loop.create_future()
        waits.append(done)
        metrics.event_received(name)
        await ctx.emit(Delivery(item, _resolver(done)))
    try:
        async with asyncio.timeout(ctx.decision_timeout):
            await asyncio.gather(*waits)
    except TimeoutError:
        return error(503, f"{len(waits)} event(s) queued but not decided within "
                          f"{ctx.decision_timeout:g}s; retry is safe (events are de-duplicated)")
    body_out = {"accepted": len(waits), "rejected": len(rejected), "errors": rejected}
    return json_response(body_out, status=400 if rejected else 200)


def _resolver(future: asyncio.Future[None]) -> Callable[[], None]:
    def ack() -> None:
        if not future.done():
            future.set_result(None)
    return ack


async def events(request: web.Request) -> web.Response:
    return await _ingest(request, "webhook", generic_events)


async def alertmanager(request: web.Request) -> web.Response:
    return await _ingest(request, "alertmanager", alertmanager_events)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/events", events)
    app.router.add_post("/v1/events/{source}", events)
    app.router.add_post("/v1/alertmanager", alertmanager)
    app.router.add_post("/v1/alertmanager/{source}", alertmanager)
