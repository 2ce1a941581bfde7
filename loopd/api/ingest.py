"""``POST /v1/events`` and ``POST /v1/alertmanager``: push sources over HTTP.

The handler answers once every accepted event is decided and durable: 200
with counts, or 400 naming each rejected item (the valid ones are still
decided), or 503 when the engine did not decide in time (the events stay
queued; a retry is recognised by event id). The body is read in chunks: past the
source's ``max_payload`` the answer is 413 at once (nothing more is buffered), and a
body that does not arrive within ``api.body_timeout`` is answered 408; both close the
connection.
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
_CHUNK = 64 * 1024


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
        return _closing(error(413, f"payload of {request.content_length} bytes exceeds "
                                   f"max_payload {max_payload} of source {name!r}"))
    try:
        body = await _read_body(request, max_payload, ctx.body_timeout)
    except TimeoutError:
        metrics.event_rejected(name, "timeout", "body not received in time", origin=origin)
        return _closing(error(408, f"body timeout: the request body did not arrive within "
                                   f"{ctx.body_timeout:g}s"))
    if body is None:
        metrics.event_rejected(name, "too_large", "payload too large", origin=origin)
        return _closing(error(413, f"payload of more than {max_payload} bytes exceeds "
                                   f"max_payload {max_payload} of source {name!r}"))
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
                          f"{ctx.decision_timeout:g}s; retry is safe for events with an id or "
                          "a time (they are de-duplicated)")
    body_out = {"accepted": len(waits), "rejected": len(rejected), "errors": rejected}
    return json_response(body_out, status=400 if rejected else 200)


async def _read_body(request: web.Request, max_payload: int, timeout: float) -> bytes | None:
    """The body, read chunk by chunk; None as soon as it passes ``max_payload`` (the rest
    is never buffered). TimeoutError when it takes longer than ``timeout``."""
    chunks: list[bytes] = []
    size = 0
    async with asyncio.timeout(timeout):
        async for chunk in request.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > max_payload:
                return None
            chunks.append(chunk)
    return b"".join(chunks)


def _closing(response: web.Response) -> web.Response:
    # the rest of the body is not read: the connection cannot carry another request
    response.force_close()
    return response


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
    app.router.add_post("/v1/events", events, name="events")
    app.router.add_post("/v1/events/{source}", events, name="events_source")
    app.router.add_post("/v1/alertmanager", alertmanager, name="alertmanager")
    app.router.add_post("/v1/alertmanager/{source}", alertmanager,
                         name="alertmanager_source")
