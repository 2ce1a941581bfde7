"""``GET /v1/decisions``: what loopd decided about each event, newest first.

The answer to "why did nothing run?": every event a rule matched left a decision, and a
suppressed one names its guard and reason. Filters ``rule``, ``key``, ``outcome``,
``source``, ``since``/``until`` (RFC 3339 or epoch seconds) and ``limit`` (at most 1000);
pages go back with ``before`` (a row's ``seq``), and ``next`` is the link to the next
page (None on the last one).

The web UI's explorer also filters by guard (``throttle``, ``for``, ``group``,
``inhibited``, ``all``...). The guard is not a column of the store: it is the word a
suppression's reason names (``decision_guard``), so ``guarded`` reads the suppressions
page by page and keeps the guard's, reading at most ``GUARD_SCAN`` of them for one page;
when that is reached before the page is full, the next page goes on from where it
stopped.

Every view of a decision (this route, a run's and an incident's story) has the one row
shape of ``decision_view``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from loopd.api import query as params
from loopd.api.app import CTX, json_response
from loopd.decisions import OUTCOMES, decision_guard
from loopd.store.base import DecisionQuery, DecisionRecord
from loopd.units import rfc3339

_FILTERS = ("rule", "key", "outcome", "source", "since", "until", "before", "limit")
GUARD_SCAN = 20_000  # suppressions read at most for one page of one guard's
_CHUNK = 1000


def decision_view(d: DecisionRecord) -> dict[str, Any]:
    return {"seq": d.seq, "time": rfc3339(d.time), "source": d.source, "event": d.event_id,
            "rule": d.rule, "key": d.key, "outcome": d.outcome,
            "guard": decision_guard(d.reason) if d.outcome == "suppressed" else None,
            "reason": d.reason, "incident": d.incident_id, "run": d.run_id}


def decision_query(request: web.Request) -> DecisionQuery:
    """The DecisionQuery of the request's parameters; 400 naming a bad one."""
    q = request.query
    params.refuse_unknown(q, _FILTERS)
    outcome = q.get("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise web.HTTPBadRequest(text=f"unknown outcome {outcome!r} (use "
                                      f"{', '.join(OUTCOMES)})")
    return DecisionQuery(
        rule=q.get("rule"), key=q.get("key"), outcome=outcome, source=q.get("source"),
        since=params.time_param(q, "since"), until=params.time_param(q, "until"),
        before=params.int_param(q, "before"), limit=params.limit(q))


async def guarded(read: Callable[[DecisionQuery], Awaitable[list[DecisionRecord]]],
                  query: DecisionQuery, guard: str, scan: int = GUARD_SCAN
                  ) -> tuple[list[DecisionRecord], int | None]:
    """Up to ``query.limit`` suppressions naming ``guard`` that ``query`` selects, read
    with ``read`` (``Control.decisions``, a store's ``decisions``), newest first, and the
    ``before`` of the next page (None when there is none): the seq of the last row shown,
    or of the last suppression read when ``scan`` of them were read before the page was
    full."""
    found: list[DecisionRecord] = []
    before, seen = query.before, 0
    while seen < scan:
        size = min(_CHUNK, scan - seen)
        chunk = await read(replace(query, outcome="suppressed", before=before, limit=size))
        for d in chunk:
            if decision_guard(d.reason) == guard:
                if len(found) == query.limit:  # one more than the page: there is a next
                    return found, found[-1].seq
                found.append(d)
        seen += len(chunk)
        if len(chunk) < size:
            return found, None  # no older suppression
        before = chunk[-1].seq
    return found, before  # read enough for one answer: the next goes on from here


async def list_decisions(request: web.Request) -> web.Response:
    query = decision_query(request)
    wanted = query.limit
    # one more than asked: whether there is a next page at all
    found = await request.app[CTX].control.decisions(replace(query, limit=wanted + 1))
    page = found[:wanted]
    more = len(found) > wanted and page
    return json_response({
        "decisions": [decision_view(d) for d in page],
        "next": str(request.rel_url.update_query(before=page[-1].seq)) if more else None,
    })


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/decisions", list_decisions, name="decisions")
