"""``POST /v1/events`` and ``POST /v1/alertmanager``: push sources over HTTP.

The handler answers once every accepted event is decided and durable: 200
with counts (``accepted``, of which ``duplicates`` were decided before: the same source
and event id, so nothing new was decided for them), or 400 naming each rejected item
(the valid ones are still decided), or 503 when the engine did not decide in time (the events stay
queued; a retry is recognised by event id). The body is read in chunks: past the
source's ``max_payload`` the answer is 413 at once (nothing more is buffered), and a
body that does not arrive within ``api.body_timeout`` is answered 408; both close the
connection.

Limits (loopd.api.limits), each refusal counted in ``loopd_api_refused_total``:

* more than ``api.max_concurrent_ingest`` requests at once: 503 with ``Retry-After``
  at once, before the body is read;
* more than ``api.max_batch`` events (or alerts) in one request: 413 naming the limit,
  and nothing of the request is decided;
* the engine's queue still full after ``api.queue_timeout``: 503 with ``Retry-After``
  instead of holding the connection (Alertmanager retries). The events queued before
  stay queued and are decided; the retry is de-duplicated by event id (id-less events
  get deterministic ids), so nothing is decided twice. A decision that takes longer
  than the decision timeout is answered 503 with ``Retry-After`` too.

Ingest calls are not in the audit trail (one row per POST would outnumber everything
else, and every event is recorded as decisions already): the principal (token name)
that posted is counted in ``loopd_ingest_requests_total{source, principal}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
from aiohttp import web

from loopd import metrics
from loopd.api.app import CTX, error, json_response
from loopd.api.limits import INGEST_GATE, IngestGate, closing, read_capped, refuse
from loopd.api.principal import principal
from loopd.errors import DecodeError, EventError
from loopd.events import JSON, Delivery, Event, OwnAck, shallow_bytes
from loopd.sources.webhook import alertmanager_events, generic_events

Parser = Callable[..., list[Event | DecodeError]]


async def _ingest(request: web.Request, kind: str, parser: Parser) -> web.Response:
    ctx = request.app[CTX]
    name = request.match_info.get("source") or next(
        (n for n, (t, _) in ctx.push_sources.items() if t == kind), None)
    if name is None or ctx.push_sources.get(name, ("", 0))[0] != kind:
        return error(404, f"no {kind} source {'named ' + repr(name) if name else 'configured'}")
    gate = request.app[INGEST_GATE]
    route = request.match_info.route.name or kind
    if not gate.enter():
        return closing(refuse(503, route, "concurrency", f"{gate.limit} ingest requests are "
                              "being served (api.max_concurrent_ingest); retry later",
                              retry_after=1, source=name))
    try:
        metrics.ingest_request(name, principal(request).name)
        return await _decide(request, name, route, parser)
    finally:
        gate.leave()


async def _decide(request: web.Request, name: str, route: str, parser: Parser
                  ) -> web.Response:
    ctx = request.app[CTX]
    kind, max_payload = ctx.push_sources[name]
    origin = f"{kind} {request.remote or '?'} {request.path}"
    if request.content_length is not None and request.content_length > max_payload:
        metrics.event_rejected(name, "too_large", "payload too large", origin=origin)
        return closing(error(413, f"payload of {request.content_length} bytes exceeds "
                                  f"max_payload {max_payload} of source {name!r}"))
    try:
        body = await read_capped(request, max_payload, ctx.body_timeout)
    except TimeoutError:
        metrics.event_rejected(name, "timeout", "body not received in time", origin=origin)
        return closing(error(408, f"body timeout: the request body did not arrive within "
                                  f"{ctx.body_timeout:g}s"))
    if body is None:
        metrics.event_rejected(name, "too_large", "payload too large", origin=origin)
        return closing(error(413, f"payload of more than {max_payload} bytes exceeds "
                                  f"max_payload {max_payload} of source {name!r}"))
    try:
        parsed: JSON = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        metrics.event_rejected(name, "decode", exc, origin=origin)
        return error(400, f"{origin}: malformed JSON: {exc}")
    try:
        # a body with few brackets cannot nest too deep: no value of it is walked to tell
        items = parser(parsed, source=name, origin=origin, shallow=shallow_bytes(body))
    except EventError as exc:
        metrics.event_rejected(name, exc.reason, exc, origin=origin)
        return error(400, str(exc))
    max_batch = ctx.api.max_batch
    if len(items) > max_batch:
        return refuse(413, route, "batch", f"{origin}: {len(items)} {_items(kind)} exceed "
                      f"api.max_batch {max_batch}; nothing was decided (send them in "
                      "smaller requests)", source=name)
    count = _Countdown(asyncio.get_running_loop().create_future())
    handed: list[Delivery] = []
    rejected = []
    valid = [item for item in items if not isinstance(item, EventError)]
    for item in items:
        if isinstance(item, EventError):
            metrics.event_rejected(name, item.reason, item, origin=item.origin)
            rejected.append(str(item))
    queue_timeout = ctx.api.queue_timeout
    try:
        # one deadline for handing the whole request over: a queue that stays full (the
        # engine cannot keep up, or the store is down) answers 503 instead of holding
        # Alertmanager's connection; what was queued stays queued and is decided
        async with asyncio.timeout(queue_timeout):
            for event in valid:
                metrics.event_received(name)
                delivery = _Posted(event, count)
                count.left += 1
                await ctx.emit(delivery)
                handed.append(delivery)
    except TimeoutError:
        return refuse(503, route, "queue", f"the engine queue stayed full for "
                      f"{queue_timeout:g}s (api.queue_timeout): {len(handed)} of {len(valid)} "
                      "event(s) queued and being decided; retry later (queued events are "
                      "de-duplicated)", retry_after=queue_timeout, source=name)
    try:
        async with asyncio.timeout(ctx.decision_timeout):
            await count.all_acked()
    except TimeoutError:
        return refuse(503, route, "decision", f"{len(handed)} event(s) queued but not decided "
                      f"within {ctx.decision_timeout:g}s; retry is safe for events with an "
                      "id or a time (they are de-duplicated)", retry_after=queue_timeout,
                      source=name)
    # the engine marked the events it had decided before (the same source and id): they
    # are accepted, and nothing new was decided for them
    duplicates = sum(d.duplicate for d in handed)
    body_out = {"accepted": len(handed), "duplicates": duplicates, "rejected": len(rejected),
                "errors": rejected}
    return json_response(body_out, status=400 if rejected else 200)


def _items(kind: str) -> str:
    return "alerts" if kind == "alertmanager" else "events"


class _Countdown:
    """The deliveries of one request not acknowledged yet; one future for all of them
    (instead of a future, a closure and a ``gather`` entry per event)."""

    __slots__ = ("done", "left")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.left = 1  # the request's own count, given back once every event is handed over

    def one(self) -> None:
        self.left -= 1
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)

    async def all_acked(self) -> None:
        """Once every event is handed over: until they are all acknowledged."""
        self.one()
        await self.done


class _Posted(OwnAck):
    """An event of a request: ``ack()`` counts it down once (a repeated ack is ignored)."""

    __slots__ = ("_acked", "_count")

    def __init__(self, event: Event, count: _Countdown) -> None:
        super().__init__(event)
        self._count = count
        self._acked = False

    def _ack(self) -> None:
        if not self._acked:
            self._acked = True
            self._count.one()


async def events(request: web.Request) -> web.Response:
    return await _ingest(request, "webhook", generic_events)


async def alertmanager(request: web.Request) -> web.Response:
    return await _ingest(request, "alertmanager", alertmanager_events)


def add_routes(app: web.Application) -> None:
    app[INGEST_GATE] = IngestGate(app[CTX].api.max_concurrent_ingest)
    app.router.add_post("/v1/events", events, name="events")
    app.router.add_post("/v1/events/{source}", events, name="events_source")
    app.router.add_post("/v1/alertmanager", alertmanager, name="alertmanager")
    app.router.add_post("/v1/alertmanager/{source}", alertmanager,
                         name="alertmanager_source")
