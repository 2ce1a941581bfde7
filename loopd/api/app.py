"""The HTTP API (aiohttp, one port): health, metrics, ingest, rules, runs, incidents,
decisions, guards, audit, reload.

Every request passes the gate first (``loopd.api.auth``: Host and Origin allow-lists,
JSON-only mutating requests, tokens and roles); handlers read the caller with
``loopd.api.principal.principal(request)``.

Every error is JSON ``{"error": "...", "status": N}`` naming the problem; an
unexpected exception in a handler is logged with the request and answered 500
without taking the daemon down.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiohttp import web

from loopd import metrics
from loopd.api.correlation import correlation_of
from loopd.config import ApiConfig
from loopd.control import Control, ReloadResult
from loopd.events import Delivery
from loopd.units import seconds

if TYPE_CHECKING:
    from loopd.api.auth import Gate

log = structlog.get_logger("loopd.api")


__all__ = ["CTX", "ApiContext", "ReloadResult", "build_app"]


@dataclass(slots=True)
class ApiContext:
    """What the API reaches: the control facade, and the ingest path of push sources."""

    control: Control
    emit: Callable[[Delivery], Awaitable[None]]
    push_sources: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> type, max
    decision_timeout: float = 30.0
    body_timeout: float = 30.0  # reading one request body (api.body_timeout)
    api: ApiConfig = field(default_factory=ApiConfig)  # limits (loopd.api.limits)
    gate: Gate | None = None  # admission (auth, roles, browser safety); None: the default


CTX = web.AppKey("loopd", ApiContext)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=str), status=status,
                        content_type="application/json")


def error(status: int, message: str, **extra: Any) -> web.Response:
    return json_response({"error": message, "status": status, **extra}, status=status)


@web.middleware
async def errors_middleware(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason if exc.text is None else exc.text.strip())
    except Exception:  # API boundary: answer 500, keep serving
        log.exception("request failed", method=request.method, path=request.path)
        return error(500, "internal error; see loopd's log")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 503 when the engine has made no progress on waiting events for
    ``engine.stall_after`` (a restart is the remedy); readiness is /readyz."""
    reason = request.app[CTX].control.stalled()
    if reason is not None:
        return json_response({"status": "stalled", "reason": reason}, status=503)
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    control = request.app[CTX].control
    sources = control.sources_connected()
    store = control.store_ok()
    ready = all(sources.values()) and store
    return json_response({"ready": ready, "sources": sources, "store": store},
                         status=200 if ready else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    # ``name[]`` (as Prometheus' client libraries take it) keeps those samples only, so a
    # probe polling one counter does not render (or refresh) every rule's series
    names = request.query.getall("name[]", [])
    if not names or "loopd_budget_remaining" in names:
        # budgets free up as their window slides, with no event to say so: refresh the gauge
        request.app[CTX].control.refresh_budgets()
    # this daemon's registry: the request's task inherits the metrics its run() made current
    return web.Response(body=metrics.exposition(names),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def rules(request: web.Request) -> web.Response:
    """Each rule with its match count and what it correlates (``correlation``: group,
    inhibits, absent, all/any; null for an ordinary rule); the load errors."""
    control = request.app[CTX].control
    ruleset = control.ruleset
    return json_response({
        "rules": [{
            "name": r.name, "origin": r.origin, "enabled": r.rule.enabled,
            "source": r.source, "run": {r.kind: r.target}, "matches": control.matches(r.name),
            "for": seconds(r.for_s), "throttle": r.throttle.model_dump() if r.throttle else None,
            "correlation": correlation_of(r.rule),
        } for r in ruleset.rules],
        "errors": [str(e) for e in ruleset.errors],
    })


async def reload(request: web.Request) -> web.Response:
    """200 when everything loaded; 422 with the errors (and the rule files whose previous
    rules were kept because they did not parse) otherwise: the good rules are active."""
    result = await request.app[CTX].control.reload()
    return json_response({"rules": result.rules, "errors": result.errors, "kept": result.kept},
                         status=422 if result.errors else 200)


async def guards(request: web.Request) -> web.Response:
    return json_response(request.app[CTX].control.guard_status())


async def close_breaker(request: web.Request) -> web.Response:
    scope = request.match_info["scope"]
    if not await request.app[CTX].control.close_breaker(scope):
        return error(404, f"no open circuit breaker {scope!r} (scopes are a rule name, "
                          "or rule|key for per-key breakers)")
    return json_response({"scope": scope, "state": "closed"})


def build_app(ctx: ApiContext) -> web.Application:
    from loopd.api import audit, decisions, ingest, limits, runs
    from loopd.api.auth import Gate
    from loopd.config import LoopdConfig

    gate = ctx.gate or Gate(LoopdConfig())  # loopback, no tokens: as the daemon's default
    # ingest reads its bodies in chunks against each source's max_payload; anything read
    # whole (request.read(), post()) is capped at api.max_body
    cap = ctx.api.max_body
    # audit.refusals before the gate (it records the gate's 403s), audit.trail after it
    # (it records who acted, as the gate found them)
    app = web.Application(middlewares=[errors_middleware, limits.body_limit, audit.refusals,
                                       gate.middleware, audit.trail], client_max_size=cap)
    app[CTX] = ctx
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics_handler, name="metrics")
    app.router.add_get("/v1/rules", rules, name="rules")
    app.router.add_post("/v1/reload", reload, name="reload")
    app.router.add_get("/v1/guards", guards, name="guards")
    app.router.add_post("/v1/guards/breakers/{scope}/close", close_breaker,
                        name="close_breaker")
    ingest.add_routes(app)
    runs.add_routes(app)
    decisions.add_routes(app)
    audit.add_routes(app)
    return app
