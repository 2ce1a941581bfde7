"""Runs and incidents: ``GET /v1/runs/{id}`` tells the whole story of a run."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from loopd.api.app import CTX, error, json_response
from loopd.runs import states
from loopd.store.base import IncidentRecord, RunRecord, StepRecord

REDACTED = "***"
_SECRET_WORDS = ("password", "secret", "token", "api_key", "apikey", "authorization")


def redact(value: Any) -> Any:
    """Hide values under secret-looking keys wherever a run's data is shown."""
    if isinstance(value, dict):
        return {k: REDACTED if any(w in str(k).lower() for w in _SECRET_WORDS) else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _limit(request: web.Request) -> int:
    try:
        return max(1, min(1000, int(request.query.get("limit", "100"))))
    except ValueError:
        raise web.HTTPBadRequest(text="limit must be an integer") from None


def run_summary(run: RunRecord) -> dict[str, Any]:
    return {
        "id": run.id, "incident": run.incident_id, "rule": run.rule, "key": run.key,
        run.kind: run.target, "status": run.status, "outcome": run.outcome,
        "reason": run.reason, "created": run.created, "started": run.started,
        "finished": run.finished,
        "duration_s": (run.finished - run.created) if run.finished else None,
    }


def step_view(step: StepRecord) -> dict[str, Any]:
    return {
        "seq": step.seq, "task": step.task, "action": step.action, "attempt": step.attempt,
        "status": step.status, "started": step.started, "finished": step.finished,
        "duration_s": (step.finished - step.started) if step.finished else None,
        "input": redact(step.input), "output": redact(step.output), "error": step.error,
        "transition": step.transition,
    }


def incident_view(inc: IncidentRecord) -> dict[str, Any]:
    return {"id": inc.id, "rule": inc.rule, "key": inc.key, "status": inc.status,
            "opened": inc.opened, "closed": inc.closed, "events": inc.events,
            "run": inc.run_id, "outcome": inc.outcome}


async def list_runs(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    status = request.query.get("status")
    if status is not None and status not in (*states.ACTIVE, *states.FINAL, states.QUEUED):
        return error(400, f"unknown status {status!r}")
    runs = await ctx.store.list_runs(status=status, limit=_limit(request))
    return json_response({"runs": [run_summary(r) for r in runs]})


async def get_run(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    run_id = request.match_info["id"]
    run = await ctx.store.get_run(run_id)
    if run is None:
        return error(404, f"no run {run_id!r}")
    steps = await ctx.store.steps(run_id)
    decisions = await ctx.store.decisions_for(incident_id=run.incident_id) \
        if run.incident_id else []
    story = run_summary(run)
    story.update(
        input=redact(run.input), context=redact(run.ctx), trigger=redact(run.event),
        steps=[step_view(s) for s in steps],
        events=[{"source": d.source, "id": d.event_id, "outcome": d.outcome,
                 "reason": d.reason, "time": d.time} for d in decisions],
    )
    return json_response(story)


async def cancel_run(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    run_id = request.match_info["id"]
    run = await ctx.store.get_run(run_id)
    if run is None:
        return error(404, f"no run {run_id!r}")
    if run.status == states.QUEUED:
        queued = ctx.engine.incidents.cancel_queued(run_id)
        if queued is None:
            return error(409, f"run {run_id} is no longer queued")
        states.move(queued, states.CANCELLED)
        queued.outcome = states.OUTCOME_CANCELLED
        queued.finished, queued.reason = time.time(), "cancelled through the API while queued"
        await ctx.store.save_run(queued)
        return json_response({"id": run_id, "status": states.CANCELLED})
    if run.status not in states.ACTIVE:
        return error(409, f"run {run_id} already ended ({run.status})")
    if not await ctx.dispatcher.cancel(run_id):
        return error(409, f"run {run_id} is not executing here")
    return json_response({"id": run_id, "status": "cancelling"}, status=202)


async def decide_approval(request: web.Request, approved: bool) -> web.Response:
    ctx = request.app[CTX]
    run_id = request.match_info["id"]
    if ctx.approve is None:
        return error(404, "approvals are not enabled")
    reason = request.query.get("reason")
    problem = await ctx.approve(run_id, approved, reason)
    if problem is not None:
        return error(409, problem)
    return json_response({"id": run_id, "approved": approved}, status=202)


async def approve(request: web.Request) -> web.Response:
    return await decide_approval(request, True)


async def reject(request: web.Request) -> web.Response:
    return await decide_approval(request, False)


async def list_incidents(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    status = request.query.get("status")
    if status not in (None, "open", "closed"):
        return error(400, "status must be open or closed")
    incidents = await ctx.store.list_incidents(status=status, limit=_limit(request))
    return json_response({"incidents": [incident_view(i) for i in incidents]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/runs", list_runs)
    app.router.add_get("/v1/runs/{id}", get_run)
    app.router.add_post("/v1/runs/{id}/cancel", cancel_run)
    app.router.add_post("/v1/runs/{id}/approve", approve)
    app.router.add_post("/v1/runs/{id}/reject", reject)
    app.router.add_get("/v1/incidents", list_incidents)
