"""The web UI's pages: one aiohttp handler per page, each rendering one template.

Pages read loopd through ``Control`` (and this daemon's metrics) exactly as the JSON API
does; the run trace is the API's own story of the run (``loopd.api.runs.run_story``),
so a secret masked there is masked here. The buttons (approve, reject, close a breaker)
post to the API's own routes, so they pass the same roles and the same audit trail.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import replace
from statistics import median
from typing import Any

from aiohttp import web

from loopd import metrics
from loopd.api.app import CTX
from loopd.api.auth import CSRF_HEADER, SESSION_COOKIE, SESSION_TTL, Gate
from loopd.api.correlation import correlation_of, groups_of
from loopd.api.decisions import guarded
from loopd.api.principal import Role, principal
from loopd.api.runs import run_story
from loopd.control import Control
from loopd.decisions import decision_guard
from loopd.runs import states
from loopd.store.base import DecisionQuery, DecisionRecord, IncidentRecord, RunRecord
from loopd.ui.views import condense, environment
from loopd.units import parse_time

_PAGE_SIZE = 50
_MEMBERS_SHOWN = 50  # a group incident's members (and held-back matches) listed on a page
_HISTORY = 1000  # incidents and runs the rules page counts fix rate and time to fix over
_WINDOW = 86400.0  # s: how far back the rules page counts shadow runs and suppressions
_DECISIONS = 20_000  # the most decisions of each of those two kinds it reads
_DECISION_FILTERS = ("rule", "key", "outcome", "source", "guard", "since")
# the guards a suppression can name, offered by the explorer's guard filter
_GUARDS = ("all", "blast_radius", "breaker", "budget", "flapping", "for", "group", "inhibited",
           "maintenance", "resolved", "silence", "throttle")
# what a browser may do with a page: scripts and styles from loopd only (event data in a
# page can never run), no framing, no referrer leaking run ids to other sites (same-origin:
# with no-referrer, Chromium sends "Origin: null" on the sign-in form, and the gate
# rightly refuses that)
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Pages:
    """The handlers, with the template environment and the API's gate they share."""

    def __init__(self, gate: Gate) -> None:
        self.env = environment()
        self.gate = gate

    # -- rendering --------------------------------------------------------------------

    def render(self, request: web.Request, template: str, status: int = 200,
               **data: Any) -> web.Response:
        who = principal(request)
        signed_in = who.authenticated and self.gate.tokens is not None
        cookie = request.cookies.get(SESSION_COOKIE)
        csrf = self.gate.tokens.csrf(cookie) if cookie and self.gate.tokens else None
        html = self.env.get_template(template).render(
            page=request.match_info.route.name, who=who.name if signed_in else None,
            role=who.role.label, auth=self.gate.tokens is not None,
            may_operate=who.may(Role.OPERATOR), csrf_header=CSRF_HEADER, csrf=csrf,
            now=time.time(), **data)
        return web.Response(text=html, status=status, content_type="text/html",
                            charset="utf-8", headers=_HEADERS)

    def fragment(self, template: str, **data: Any) -> str:
        """A part of a page (what the live stream sends), rendered on its own."""
        return self.env.get_template(template).render(now=time.time(), **data)

    # -- incidents ----------------------------------------------------------------------

    async def incidents_data(self, control: Control) -> dict[str, Any]:
        """Open incidents, then the recent closed ones, each with its runs (newest
        first) and, for a group incident, its members and the matches it inhibited;
        runs started by no incident are listed apart."""
        open_ = await control.list_incidents(status="open", limit=200)
        closed = await control.list_incidents(status="closed", limit=_PAGE_SIZE)
        runs = await control.list_runs(status=None, limit=500)
        by_incident: dict[str, list[RunRecord]] = defaultdict(list)
        for run in runs:
            if run.incident_id is not None:
                by_incident[run.incident_id].append(run)
        incidents = [*open_, *closed]
        return {"incidents": incidents, "runs_of": dict(by_incident),
                "groups": await groups_of(control, incidents), "shown": _MEMBERS_SHOWN,
                "waiting": sum(r.status == states.AWAITING_APPROVAL for r in runs)}

    async def incidents(self, request: web.Request) -> web.Response:
        return self.render(request, "incidents.html", **await self.incidents_data(
            request.app[CTX].control))

    # -- one run ------------------------------------------------------------------------

    async def trace_data(self, control: Control, run_id: str) -> dict[str, Any] | None:
        run = await control.get_run(run_id)
        if run is None:
            return None
        story = await run_story(control, run)
        # the decisions read here, not from the story, so the page keeps one row shape
        incident = await control.get_incident(run.incident_id) if run.incident_id else None
        around = await control.decisions_around(incident) if incident is not None else []
        registry = control.registry()
        workflow = registry.workflows.get(run.target) if run.kind == "workflow" else None
        tasks = workflow.tasks if workflow is not None else {}
        rule = next((r for r in control.ruleset.rules if r.name == run.rule), None)
        return {
            "run": story, "rule": rule, "kind": run.kind, "target": run.target,
            "decisions": condense([{"time": d.time, "outcome": d.outcome,
                                    "reason": d.reason, "source": d.source,
                                    "id": d.event_id} for d in around]),
            "kinds": {name: ct.kind for name, ct in tasks.items()},
            "confirms": {name: ct.task.confirm.model_dump(by_alias=True, exclude_none=True)
                         for name, ct in tasks.items() if ct.task.confirm is not None},
            "parent": run_id.rpartition("/")[0] or None,
            "active": run.status not in states.FINAL,
        }

    async def run(self, request: web.Request) -> web.Response:
        run_id = request.match_info["id"]
        data = await self.trace_data(request.app[CTX].control, run_id)
        if data is None:
            return self.render(request, "missing.html", status=404,
                               what=f"There is no run {run_id!r}.")
        return self.render(request, "run.html", **data)

    # -- decisions ----------------------------------------------------------------------

    async def decisions(self, request: web.Request) -> web.Response:
        filters = {k: request.query.get(k, "").strip() for k in _DECISION_FILTERS}
        problem = None
        since = None
        before = None
        if filters["since"]:
            try:
                since = parse_time(filters["since"])
            except ValueError as exc:
                problem = f"since: {exc}"
        if request.query.get("before"):
            try:
                before = int(request.query["before"])
            except ValueError:
                before = 0
            if not 1 <= before <= 2**63 - 1:
                problem = f"before={request.query['before']!r}: must be a decision's seq"
                before = None
        if filters["guard"] and filters["outcome"] not in ("", "suppressed"):
            problem = (f"guard {filters['guard']}: a guard names a suppressed decision, "
                       f"not one that is {filters['outcome']}")
        found: list[DecisionRecord] = []
        after = None
        control = request.app[CTX].control
        if problem is None:
            query = DecisionQuery(
                rule=filters["rule"] or None, key=filters["key"] or None,
                outcome=filters["outcome"] or None, source=filters["source"] or None,
                since=since, before=before, limit=_PAGE_SIZE)
            if filters["guard"]:  # the word a suppression's reason names, not a column
                found, after = await guarded(control.decisions, query, filters["guard"])
            else:
                found = await control.decisions(replace(query, limit=_PAGE_SIZE + 1))
                if len(found) > _PAGE_SIZE:  # one more than a page: there is an older page
                    found = found[:_PAGE_SIZE]
                    after = found[-1].seq
        older = {**{k: v for k, v in filters.items() if v}, "before": after} if after else None
        return self.render(request, "decisions.html", status=400 if problem else 200,
                           decisions=found, filters=filters, problem=problem, older=older,
                           rules=sorted(r.name for r in control.ruleset.rules),
                           guards=_GUARDS,
                           outcomes=("run_created", "joined", "suppressed", "shadow",
                                     "queued", "restarted", "error"))

    # -- approvals ----------------------------------------------------------------------

    async def approvals(self, request: web.Request) -> web.Response:
        control = request.app[CTX].control
        waiting = await control.list_runs(status=states.AWAITING_APPROVAL, limit=200)
        messages = {}
        for run in waiting:
            steps = await control.steps(run.id)
            asked = next((s for s in reversed(steps) if s.status == states.RUNNING
                          and isinstance(s.input, dict) and "message" in s.input), None)
            messages[run.id] = asked.input if asked is not None else None
        return self.render(request, "approvals.html", runs=waiting, asked=messages)

    # -- rules --------------------------------------------------------------------------

    async def rules(self, request: web.Request) -> web.Response:
        """Per rule: matches since this daemon started; from the store (every replica's):
        shadow "would run" decisions and suppressions per guard of the last ``_WINDOW``
        (so a throttle and a pending ``for:`` count too), and runs, fix rate and median
        time to fix over the newest ``_HISTORY`` runs and closed incidents. A handful of
        reads whatever the number of rules (a thousand rules is one page, not 2000 reads)."""
        control = request.app[CTX].control
        since = time.time() - _WINDOW
        closed = await control.list_incidents(status="closed", limit=_HISTORY)
        runs = await control.list_runs(status=None, limit=_HISTORY)
        shadow = Counter(d.rule for d in await control.decisions(
            DecisionQuery(outcome="shadow", since=since, limit=_DECISIONS)))
        held: dict[str, Counter[str]] = defaultdict(Counter)
        for d in await control.decisions(DecisionQuery(outcome="suppressed", since=since,
                                                       limit=_DECISIONS)):
            held[d.rule][decision_guard(d.reason) or "other"] += 1
        runs_of = Counter(run.rule for run in runs)
        ended: dict[str, list[IncidentRecord]] = defaultdict(list)
        for incident in closed:
            ended[incident.rule].append(incident)
        rows = []
        for r in control.ruleset.rules:
            fixed = [i for i in ended[r.name] if i.outcome == states.FIXED]
            rows.append({
                "rule": r, "matches": control.matches(r.name), "would_run": shadow[r.name],
                "suppressed": held[r.name], "runs": runs_of[r.name],
                "ended": len(ended[r.name]), "fixed": len(fixed),
                "time_to_fix": _median_fix(fixed),
                "correlation": correlation_of(r.rule),
            })
        return self.render(request, "rules.html", rows=rows, errors=control.ruleset.errors,
                           history=_HISTORY, window=_WINDOW, decisions=_DECISIONS)

    # -- guards, sources ------------------------------------------------------------------

    async def guards(self, request: web.Request) -> web.Response:
        return self.render(request, "guards.html", status_=request.app[CTX].control.guard_status())

    async def sources(self, request: web.Request) -> web.Response:
        received = {labels["source"]: v for labels, v in _samples("loopd_events_received_total")}
        rejected: dict[str, dict[str, float]] = defaultdict(dict)
        for labels, value in _samples("loopd_events_rejected_total"):
            rejected[labels["source"]][labels["reason"]] = value
        errors = metrics.current().source_errors
        rows = [{"name": name, "up": up, "received": received.get(name, 0),
                 "rejected": rejected.get(name, {}), "error": errors.get(name)}
                for name, up in sorted(request.app[CTX].control.sources_connected().items())]
        return self.render(request, "sources.html", rows=rows)

    # -- signing in and out ---------------------------------------------------------------

    async def signin(self, request: web.Request) -> web.Response:
        return self.render(request, "signin.html", problem=None)

    async def signin_post(self, request: web.Request) -> web.StreamResponse:
        """A pasted token becomes a session cookie (the token itself is in no cookie,
        page, log or URL); a wrong one is refused like a wrong header, and counted."""
        form = await request.post()
        presented = form.get("token")
        token, problem = self.gate.sign_in(request, presented if isinstance(presented, str)
                                           else "")
        if token is None or self.gate.tokens is None:
            status = 429 if problem.startswith("too many") else 401
            return self.render(request, "signin.html", status=status, problem=problem)
        response = web.HTTPSeeOther("/")
        response.set_cookie(SESSION_COOKIE, self.gate.tokens.session(token), path="/",
                            httponly=True, samesite="Strict", secure=self.gate.over_tls(request),
                            max_age=int(SESSION_TTL))
        return response

    async def signout(self, request: web.Request) -> web.StreamResponse:
        response = web.HTTPSeeOther("/signin")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response


def _samples(name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of one of this daemon's metrics, with its labels."""
    return [(dict(s.labels), s.value) for family in metrics.current().registry.collect()
            for s in family.samples if s.name == name]


def _median_fix(fixed: list[IncidentRecord]) -> float | None:
    """The median time from an incident's first event to its confirmed fix."""
    took = [i.closed - i.opened for i in fixed if i.closed is not None]
    return median(took) if took else None

