"""Runs and incidents: ``GET /v1/runs/{id}`` tells the whole story of a run, and
``GET /v1/incidents/{id}`` an incident's (its runs and decisions). Times are RFC 3339
(``units.rfc3339``), durations seconds rounded to milliseconds (``units.seconds``).

A run's story lists the decisions of its incident (``decisions``, the rows of
``GET /v1/decisions``): the event that opened it, those that joined it, and the
suppressions of its rule and key around it.

A group incident (a rule with ``group:``) also has its ``members`` (key, first and last
match, first event) and the matches it ``inhibited`` (loopd.api.correlation): in
``GET /v1/incidents/{id}``, and as ``group`` in its run's story; ``GET /v1/incidents``
gives each group incident's ``member_count``.

The story includes the people who intervened: ``interventions`` lists, from the audit
trail (loopd.api.audit), each approve, reject and cancel call on the run with who made
it (name and role), when, its reason and its result. Approve, reject and cancel also
pass the caller's token name (when auth is on) to where the run's own history is
written: its ``reason`` ("rejected by oncall-alice: ...", "cancelled through the API by
oncall-bob"), ``context.approved.by``, an approval step's output; so a trace tells who.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from loopd.api import query as params
from loopd.api.app import CTX, error, json_response
from loopd.api.correlation import group_view, groups_of
from loopd.api.decisions import decision_view
from loopd.api.principal import principal
from loopd.catalog.secrets import Secrets, redact_keys, secret_key
from loopd.control import Control
from loopd.packs.registry import PackRegistry
from loopd.runs import states
from loopd.store.base import AuditQuery, AuditRecord, IncidentRecord, RunRecord, StepRecord
from loopd.units import rfc3339, seconds

# the audited calls on a run that belong to its story
_INTERVENTIONS = {"approve_run": "approve", "reject_run": "reject", "cancel_run": "cancel"}


def run_summary(run: RunRecord) -> dict[str, Any]:
    return {
        "id": run.id, "incident": run.incident_id, "rule": run.rule, "key": run.key,
        run.kind: run.target, "status": run.status, "outcome": run.outcome,
        "reason": run.reason, "created": rfc3339(run.created), "started": rfc3339(run.started),
        "finished": rfc3339(run.finished),
        "duration_s": seconds(run.finished - run.created) if run.finished else None,
        "owner": run.owner, "epoch": run.epoch,  # the replica executing it, its claim
    }


def secret_inputs(registry: PackRegistry, action: str | None) -> frozenset[str]:
    """The inputs of ``action`` declared ``secret: true`` (masked wherever they are shown)."""
    found = registry.actions.get(action) if action else None
    if found is None:
        return frozenset()
    return found.secret_inputs


def step_view(step: StepRecord, registry: PackRegistry) -> dict[str, Any]:
    hidden = secret_inputs(registry, step.action)
    return {
        "seq": step.seq, "task": step.task, "action": step.action, "attempt": step.attempt,
        "status": step.status, "started": rfc3339(step.started),
        "finished": rfc3339(step.finished),
        "duration_s": seconds(step.finished - step.started) if step.finished else None,
        "input": redact_keys(step.input, hidden), "output": redact_keys(step.output, hidden),
        "error": step.error,
        "transition": step.transition,
    }


def incident_view(inc: IncidentRecord) -> dict[str, Any]:
    return {"id": inc.id, "rule": inc.rule, "key": inc.key, "status": inc.status,
            "opened": rfc3339(inc.opened), "closed": rfc3339(inc.closed), "events": inc.events,
            "run": inc.run_id, "outcome": inc.outcome}


async def list_runs(request: web.Request) -> web.Response:
    control = request.app[CTX].control
    status = request.query.get("status")
    if status is not None and status not in (*states.ACTIVE, *states.FINAL, states.QUEUED):
        return error(400, f"unknown status {status!r}")
    params.refuse_unknown(request.query, ("status", "rule", "limit"))
    runs = await control.list_runs(status=status, rule=request.query.get("rule") or None,
                                   limit=params.limit(request.query))
    return json_response({"runs": [run_summary(r) for r in runs]})


async def get_run(request: web.Request) -> web.Response:
    control = request.app[CTX].control
    run_id = request.match_info["id"]
    run = await control.get_run(run_id)
    if run is None:
        return error(404, f"no run {run_id!r}")
    return json_response(await run_story(control, run))


async def run_story(control: Control, run: RunRecord) -> dict[str, Any]:
    """The whole story of ``run``, secrets masked (by key and by value): what
    ``GET /v1/runs/{id}`` answers and the web UI's trace page shows."""
    run_id = run.id
    steps = await control.steps(run_id)
    incident = await control.get_incident(run.incident_id) if run.incident_id else None
    decisions = await control.decisions_around(incident) if incident is not None else []
    registry = control.registry()
    hidden = secret_inputs(registry, run.target) if run.kind == "action" else frozenset()
    story = run_summary(run)
    trail = await control.audit(AuditQuery(target=run_id, limit=1000))
    story.update(
        input=redact_keys(run.input, hidden), context=redact_keys(run.ctx),
        trigger=trigger_view(run.event), steps=[step_view(s, registry) for s in steps],
        decisions=[decision_view(d) for d in decisions],
        interventions=[intervention(r) for r in reversed(trail)
                       if r.action in _INTERVENTIONS and r.status is not None],
    )
    if incident is not None and (group := await control.members(incident.id)) is not None:
        story["group"] = {"rule": incident.rule, "key": incident.key, **group_view(group)}
    # a secret input's value (declared, or under a secret-looking name) may also sit in the
    # trigger, the context, an output or an error: mask it there by value
    known = Secrets([*_values(run.input, hidden), *(
        v for s in steps for v in _values(s.input, secret_inputs(registry, s.action)))])
    story_masked: dict[str, Any] = known.tree(story)
    return story_masked


def trigger_view(event: Any) -> Any:
    """The event that started the run, its time in RFC 3339 (its data as it came: the
    run's context and step outputs are the workflow's own data, shown as stored)."""
    if not isinstance(event, dict):
        return event
    shown = redact_keys(event)
    when = event.get("time")
    if isinstance(when, int | float):
        shown["time"] = rfc3339(when)
    return shown


def intervention(r: AuditRecord) -> dict[str, Any]:
    """An approve, reject or cancel call on a run, as its story shows it."""
    reason = r.params.get("reason") if isinstance(r.params, dict) else None
    return {"action": _INTERVENTIONS[r.action], "by": r.who, "role": r.role,
            "at": rfc3339(r.time),
            "reason": reason, "status": r.status, "outcome": r.outcome}


def _values(tree: Any, names: frozenset[str]) -> list[Any]:
    if not isinstance(tree, dict):
        return []
    return [v for k, v in tree.items() if k in names or secret_key(k)]


def _by(request: web.Request) -> str | None:
    """Who the run's history names: the caller's token name (with auth off, nobody: the
    audit trail still records the call, as ``anonymous``)."""
    who = principal(request)
    return who.name if who.authenticated else None


async def cancel_run(request: web.Request) -> web.Response:
    run_id = request.match_info["id"]
    answer = await request.app[CTX].control.cancel(run_id, _by(request))
    if answer.state == "missing":
        return error(404, answer.problem or f"no run {run_id!r}")
    if answer.state == "refused":
        return error(409, answer.problem or f"run {run_id} cannot be cancelled")
    if answer.state == "cancelled":
        return json_response({"id": run_id, "status": states.CANCELLED})
    return json_response({"id": run_id, "status": "cancelling"}, status=202)


async def decide_approval(request: web.Request, approved: bool) -> web.Response:
    run_id = request.match_info["id"]
    problem = await request.app[CTX].control.decide(
        run_id, approved, request.query.get("reason"), _by(request))
    if problem is not None:
        return error(409, problem)
    return json_response({"id": run_id, "approved": approved}, status=202)


async def approve(request: web.Request) -> web.Response:
    return await decide_approval(request, True)


async def reject(request: web.Request) -> web.Response:
    return await decide_approval(request, False)


async def list_incidents(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status not in (None, "open", "closed"):
        return error(400, "status must be open or closed")
    control = request.app[CTX].control
    incidents = await control.list_incidents(status=status, limit=params.limit(request.query))
    groups = await groups_of(control, incidents)
    return json_response({"incidents": [
        {**incident_view(i), "member_count": groups[i.id]["member_count"]}
        if i.id in groups else incident_view(i) for i in incidents]})


async def get_incident(request: web.Request) -> web.Response:
    """An incident, its runs (the one that opened it, the queued and restarted ones,
    oldest first) and its decisions (``Control.decisions_around``: those that opened and
    joined it, and its rule and key's suppressions around it); a group incident's
    ``members`` and ``inhibited`` matches (empty lists for other incidents)."""
    control = request.app[CTX].control
    incident_id = request.match_info["id"]
    incident = await control.get_incident(incident_id)
    if incident is None:
        return error(404, f"no incident {incident_id!r}")
    decisions = await control.decisions_around(incident)
    run_ids = dict.fromkeys([*(d.run_id for d in decisions if d.run_id is not None
                               and d.incident_id == incident.id),
                             *([incident.run_id] if incident.run_id else [])])
    runs = [run for run_id in run_ids if (run := await control.get_run(run_id)) is not None]
    runs.sort(key=lambda r: r.created)
    return json_response({**incident_view(incident),
                          **group_view(await control.members(incident.id)),
                          "runs": [run_summary(r) for r in runs],
                          "decisions": [decision_view(d) for d in decisions]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/runs", list_runs, name="runs")
    app.router.add_get("/v1/runs/{id}", get_run, name="run")
    app.router.add_post("/v1/runs/{id}/cancel", cancel_run, name="cancel_run")
    app.router.add_post("/v1/runs/{id}/approve", approve, name="approve_run")
    app.router.add_post("/v1/runs/{id}/reject", reject, name="reject_run")
    app.router.add_get("/v1/incidents", list_incidents, name="incidents")
    app.router.add_get("/v1/incidents/{id}", get_incident, name="incident")
