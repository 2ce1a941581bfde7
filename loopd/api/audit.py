"""The API's audit trail: who changed what, when, from where, and how it went.

Every call that changes something (approve, reject, cancel, close a breaker, reload:
every non-GET route but ingest) is appended to the store's append-only trail, and so is
every call refused with 403 for a too-weak role. ``GET /v1/audit`` (admin) reads it,
newest first, with filters ``action=``, ``who=``, ``target=``, ``since=`` (RFC 3339
or epoch seconds) and ``limit=`` (at most 1000); each record's ``time`` is RFC 3339.

Order, so that nothing is done unaudited: ``trail`` runs after the auth middleware (the
principal is known) and appends a ``requested`` record **before** the handler acts;
when that write fails the call is answered 503 and nothing is done. After the handler,
a second record with the same ``request`` id holds the result (HTTP status and a short
outcome). If that one cannot be written the action stands (it happened) and the failure
is logged and counted (``loopd_audit_write_failures_total``): the trail still shows the
call, with its result missing, as it does for a call in flight when loopd stopped.
``refusals`` runs before the auth middleware and records its 403 answers to a real
token with too weak a role (the auth middleware puts the principal on the request
before it refuses one); a 403 for a foreign Origin or Host, which needs no token, is
counted in metrics but not recorded, so nobody can fill the trail.

A record holds the principal's name and role, the route's name as the action, its
target (run id, breaker scope), the query parameters with secret-looking keys redacted
(``redact_keys``; e.g. an approval's ``reason`` is kept), and the client address: the
peer's, or the ``X-Forwarded-For`` client when the peer is one of ``api.trusted_proxies``
(none by default: the header is not believed). Ingest calls are not audited (see
loopd.api.ingest).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from loopd import metrics
from loopd.api import query as params
from loopd.api.app import CTX, error, json_response
from loopd.api.limits import INGEST_ROUTES
from loopd.api.principal import forwarded_client, principal
from loopd.catalog.secrets import redact_keys
from loopd.errors import StoreError
from loopd.store.base import AuditQuery, AuditRecord
from loopd.units import rfc3339

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_RECORDED = web.RequestKey("loopd.audited", bool)  # trail wrote the request's records
_OUTCOME_MAX = 200
_PARAM_MAX = 500
_FILTERS = frozenset({"action", "who", "target", "since", "limit"})


def _route(request: web.Request) -> str:
    return request.match_info.route.name or request.path


def _audited(request: web.Request) -> bool:
    """A call that changes something: every non-GET named route but ingest (a path that
    matches no route changes nothing, and must not let anyone fill the trail)."""
    name = request.match_info.route.name
    return name is not None and name not in INGEST_ROUTES \
        and request.method not in ("GET", "HEAD", "OPTIONS")


def client_address(request: web.Request) -> str | None:
    """The peer, or the X-Forwarded-For client when the peer is a trusted proxy."""
    return forwarded_client(request.remote, request.headers.get("X-Forwarded-For"),
                            request.app[CTX].api.trusted_proxies)


def _record(request: web.Request, request_id: str, status: int | None,
            outcome: str) -> AuditRecord:
    who = principal(request)
    params = {k: v[:_PARAM_MAX] for k, v in request.query.items()}
    target = "/".join(request.match_info.values()) or None
    return AuditRecord(time.time(), request_id, who.name, who.role.label, _route(request),
                       target, redact_keys(params), status, outcome[:_OUTCOME_MAX],
                       client_address(request))


def _outcome(response: web.StreamResponse) -> str:
    """A short outcome: the error's message, the answer's ``status``/``state``, or the
    HTTP reason."""
    body = response.body if isinstance(response, web.Response) else None
    if isinstance(body, bytes) and response.content_type == "application/json":
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            for key in ("error", "status", "state"):
                if isinstance(data.get(key), str):
                    return str(data[key])
    return response.reason


async def _append(request: web.Request, record: AuditRecord, phase: str) -> bool:
    try:
        await request.app[CTX].control.append_audit(record)
    except StoreError as exc:
        metrics.audit_write_failed(record.action, phase, exc, target=record.target,
                                   request=record.request)
        return False
    return True


@web.middleware
async def trail(request: web.Request, handler: Handler) -> web.StreamResponse:
    """After the auth middleware: a record before the call acts, one with its result."""
    if not _audited(request):
        return await handler(request)
    request_id = uuid.uuid4().hex
    if not await _append(request, _record(request, request_id, None, "requested"), "before"):
        refused = error(503, f"the audit trail cannot be written; {_route(request)} was "
                             "not done (nothing is done unaudited): retry later")
        refused.headers["Retry-After"] = "5"
        return refused
    request[_RECORDED] = True
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        await _append(request, _record(request, request_id, exc.status,
                                       exc.text or exc.reason), "after")
        raise
    except Exception:
        await _append(request, _record(request, request_id, 500, "internal error"), "after")
        raise
    await _append(request, _record(request, request_id, response.status,
                                   _outcome(response)), "after")
    return response


def _token_refused(request: web.Request) -> bool:
    """A 403 worth a record: a real token, too weak for the route. A refused Origin or
    Host comes before any token is checked, and anyone could send those by the million."""
    return principal(request).authenticated and not request.get(_RECORDED, False)


@web.middleware
async def refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Before the auth middleware: its 403 answers (a too-weak role) are recorded too."""
    if request.match_info.route.name is None:
        return await handler(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status == 403 and _token_refused(request):
            await _append(request, _record(request, uuid.uuid4().hex, 403,
                                           exc.text or exc.reason), "refused")
        raise
    if response.status == 403 and _token_refused(request):
        await _append(request, _record(request, uuid.uuid4().hex, 403, _outcome(response)),
                      "refused")
    return response


def record_view(r: AuditRecord) -> dict[str, Any]:
    return {"seq": r.seq, "time": rfc3339(r.time), "request": r.request, "who": r.who,
            "role": r.role, "action": r.action, "target": r.target, "params": r.params,
            "status": r.status, "outcome": r.outcome, "client": r.client}


def query(request: web.Request) -> AuditQuery:
    """The AuditQuery of ``GET /v1/audit``'s parameters; 400 naming a bad one."""
    q = request.query
    params.refuse_unknown(q, _FILTERS)
    return AuditQuery(action=q.get("action"), who=q.get("who"), target=q.get("target"),
                      since=params.time_param(q, "since"), limit=params.limit(q))


async def list_audit(request: web.Request) -> web.Response:
    records = await request.app[CTX].control.audit(query(request))
    return json_response({"audit": [record_view(r) for r in records]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/audit", list_audit, name="audit")
