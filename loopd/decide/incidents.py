"""Incidents: one per (rule, key), the runs inside them, and the policy that decides
whether a matching event starts a run.

After a rule's condition (and ``for:``) holds for a key, ``decide`` records
exactly one decision: ``run_created``, ``joined`` (single mode, or the
incident is full), ``queued``, ``restarted``, ``shadow`` (would have run), or
``suppressed`` with the guard that said no (resolved: never from a resolved
alert unless the rule's ``on.match`` says ``status: resolved``; throttle, silence,
maintenance, breaker, flapping, budget, blast_radius). Run modes per rule, as
in Home Assistant scripts: ``single`` (new events join the open incident),
``restart`` (cancel the run that has not finished, start a new one),
``queued`` (run after the current one), ``parallel`` (up to ``max_parallel``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from loopd import metrics
from loopd.catalog.inventory import Inventory
from loopd.decide.guards import Guards, Verdict
from loopd.decide.suppressions import SuppressionLog
from loopd.decide.timers import Throttle, compile_throttle
from loopd.errors import ConditionError
from loopd.events import Event, new_id
from loopd.expr.compiler import compile_template
from loopd.messages import CancelRun, RunCommand, StartRun
from loopd.policy import Escalate, RuleGuards
from loopd.rules.compile import RULE_SCOPE, CompiledRule
from loopd.runs import states
from loopd.store.base import Batch, DecisionRecord, IncidentRecord, Limit, RunRecord


@dataclass(slots=True)
class _Runs:
    active: set[str] = field(default_factory=set)
    queued: deque[RunRecord] = field(default_factory=deque)
    fingerprint: str | None = None


class Incidents:
    def __init__(self, guards: Guards, inventory: Inventory,
                 suppressions: SuppressionLog | None = None) -> None:
        self.guards = guards
        self.inventory = inventory
        self.suppressions = suppressions or SuppressionLog()
        self.open: dict[tuple[str, str], IncidentRecord] = {}
        self.by_id: dict[str, tuple[str, str]] = {}
        self.runs: dict[str, _Runs] = {}
        self.by_fingerprint: dict[str, set[str]] = {}
        self.policies: dict[str, CompiledRule] = {}
        self._throttles: dict[str, Throttle] = {}

    def set_rules(self, rules: Iterable[CompiledRule]) -> None:
        """The rules in force (load, reload); throttles compile to per-key budgets."""
        self.policies = {r.name: r for r in rules}
        self._throttles = {name: t for name, r in self.policies.items()
                           if (t := compile_throttle(r.throttle)) is not None}
        self.guards.set_windows({name: _longest_window(r.rule.guards, self._throttles.get(name))
                                 for name, r in self.policies.items()})

    # -- restore --------------------------------------------------------------------

    def adopt(self, incidents: list[IncidentRecord], runs: list[RunRecord]) -> None:
        """Open incidents from the store, with their active and queued runs, into memory
        (a restart, or runs taken over from another replica)."""
        for inc in incidents:
            if inc.id in self.by_id:
                continue
            self.open[(inc.rule, inc.key)] = inc
            self.by_id[inc.id] = (inc.rule, inc.key)
            self.runs[inc.id] = _Runs()
            self.guards.incident_opened(inc.key)
        for run in runs:  # active and queued runs of open incidents
            slot = self.runs.get(run.incident_id or "")
            if slot is None:
                continue
            if run.status == states.QUEUED:
                if run not in slot.queued:
                    slot.queued.append(run)
            else:
                slot.active.add(run.id)
            fingerprint = (run.event or {}).get("data", {}).get("fingerprint")
            if fingerprint and run.incident_id:
                slot.fingerprint = fingerprint
                self.by_fingerprint.setdefault(fingerprint, set()).add(run.incident_id)

    def start_orphaned_queues(self) -> list[RunRecord]:
        """The next queued run of every incident whose active runs all ended (loopd died
        before it started the next one), moved to pending: the caller stores and starts
        them."""
        started = []
        for slot in self.runs.values():
            if slot.queued and not slot.active:
                nxt = slot.queued.popleft()
                states.move(nxt, states.PENDING)
                slot.active.add(nxt.id)
                started.append(nxt)
        return started

    def restore(self, incidents: list[IncidentRecord], runs: list[RunRecord]
                ) -> list[IncidentRecord]:
        """Rebuild from the store; returns incidents left open without a live run (loopd
        died between a run's end and its incident's close), closed here, to be saved."""
        self.adopt(incidents, runs)
        stale = []
        for incident_id, slot in list(self.runs.items()):
            if slot.active or slot.queued:
                continue
            ident = self.by_id.pop(incident_id)
            incident = self.open.pop(ident)
            del self.runs[incident_id]
            if slot.fingerprint is not None:
                self.by_fingerprint.get(slot.fingerprint, set()).discard(incident_id)
            self.guards.incident_closed(incident.key)
            incident.status, incident.outcome = "closed", incident.outcome or "unknown"
            stale.append(incident)
        return stale

    # -- deciding ---------------------------------------------------------------------

    def decide(self, rule: CompiledRule, event: Event, key: str, scope: dict[str, Any],
               now: float, batch: Batch, commands: list[RunCommand]) -> None:
        """Record one decision in ``batch``; run commands go to ``commands``, sent by the
        engine once the batch is durable."""
        name = rule.name
        policy = rule.rule

        def record(outcome: str, reason: str | None = None,
                   incident: IncidentRecord | None = None, run_id: str | None = None) -> None:
            batch.decisions.append(DecisionRecord(
                event.source, event.id, name, key, outcome, reason, now,
                incident.id if incident else None,
                run_id or (incident.run_id if incident else None)))

        # a resolved alert starts nothing, unless the rule asks for resolutions explicitly
        resolved = event.data.get("status") == "resolved" and not rule.for_resolved
        incident = self.open.get((name, key))
        if incident is not None:
            incident.events += 1
            batch.incidents[incident.id] = incident
            slot = self.runs.setdefault(incident.id, _Runs())
            mode = policy.run_mode
            if resolved or mode == "single":
                record("joined", "incident already open", incident)
                return
            if mode == "parallel" and len(slot.active) >= policy.max_parallel:
                record("joined", f"{len(slot.active)} runs active (max_parallel "
                                 f"{policy.max_parallel})", incident)
                return
            if mode == "queued" and len(slot.queued) >= policy.max_queued:
                record("joined", f"queue full ({policy.max_queued})", incident)
                return
        if resolved:
            self._suppress(record, event, name, key, "resolved",
                           "guard resolved: a resolved alert never starts a run")
            return
        throttle = self._throttles.get(name)
        if throttle is not None:
            why = self.guards.throttled(name, key, throttle, now)
            if why is not None:
                self._suppress(record, event, name, key, "throttle", why)
                return
        labels = event.data.get("labels")
        verdict = self.guards.check(name, key, policy.guards, labels if isinstance(
            labels, dict) else None, now)
        if verdict is not None:
            self._suppress(record, event, name, key, verdict.guard,
                           f"guard {verdict.guard}: {verdict.reason}")
            if verdict.escalate:
                self._escalate(rule, key, verdict, now, batch, commands)
            return
        if policy.mode == "shadow":
            self.guards.run_started(name, key, now, policy.guards.max_runs)
            record("shadow", f"would run {rule.kind} {rule.target} (shadow mode)")
            return
        scope["entity"] = self.inventory.entities.get(key)
        try:
            inputs = rule.input(scope)
        except ConditionError as exc:
            metrics.rule_failed(name, "run.input", exc, source=event.source, event_id=event.id,
                                origin=event.origin or event.id)
            record("error", f"run.input: {exc}")
            return
        status = states.AWAITING_APPROVAL if policy.mode == "approval" else states.PENDING
        run = RunRecord(new_id(), None, name, key, rule.kind, rule.target, inputs, status, now,
                        event=event.to_json())
        if status == states.AWAITING_APPROVAL:
            run.progress = {"gate": {"deadline": now + policy.approval.within}}
        self.guards.run_started(name, key, now, policy.guards.max_runs)
        limits = self.guards.limits(name, key, policy.guards, throttle)
        if limits:
            batch.limits[run.id] = limits
        if incident is None:
            incident = IncidentRecord(new_id(), name, key, "open", now, run_id=run.id)
            self.open[(name, key)] = incident
            self.by_id[incident.id] = (name, key)
            self.runs[incident.id] = _Runs()
            self.guards.incident_opened(key)
            fingerprint = event.data.get("fingerprint")
            # one member's alert resolving does not cancel its group's remediation
            if isinstance(fingerprint, str) and rule.correlation != "group":
                self.runs[incident.id].fingerprint = fingerprint
                self.by_fingerprint.setdefault(fingerprint, set()).add(incident.id)
            outcome = "run_created"
        else:
            outcome = {"parallel": "run_created", "queued": "queued",
                       "restart": "restarted"}[policy.run_mode]
        run.incident_id = incident.id
        slot = self.runs[incident.id]
        batch.incidents[incident.id] = incident
        batch.runs.append(run)
        if outcome == "queued" and slot.active:
            states.move(run, states.QUEUED)
            slot.queued.append(run)
            record(outcome, f"after {len(slot.queued) - 1} queued run(s)", incident, run.id)
            return
        if outcome == "restarted":  # the old run stops even when it already acts
            for old in list(slot.active):
                commands.append(CancelRun(old, f"restarted by event {event.id}",
                                          acting_too=True))
        incident.run_id = run.id
        slot.active.add(run.id)
        commands.append(StartRun(run))
        record(outcome, None, incident, run.id)

    def _suppress(self, record: Callable[..., None], event: Event, rule: str, key: str,
                  guard: str, reason: str) -> None:
        metrics.guard_suppressed(rule, guard)
        self.suppressions.suppressed(rule, key, event.source, event.id, guard, reason)
        record("suppressed", reason)

    def _escalate(self, rule: CompiledRule, key: str, verdict: Verdict | str, now: float,
                  batch: Batch, commands: list[RunCommand]) -> RunRecord | None:
        """Start the rule's (or the global) escalation once, for a human to look."""
        reason = verdict.reason if isinstance(verdict, Verdict) else verdict
        target: Escalate | None = rule.rule.guards.escalate or self.guards.config.escalate
        if target is None:
            metrics.log.error("guard wants a human and no escalate target is configured",
                              rule=rule.name, key=key, reason=reason)
            return None
        scope = {"rule": rule.name, "key": key, "reason": reason,
                 "entity": self.inventory.entities.get(key), "now": now}
        try:
            inputs = compile_template(target.input, RULE_SCOPE | {"rule", "reason"})(scope)
        except (ConditionError, ValueError) as exc:
            metrics.log.error("escalation input failed", rule=rule.name, error=str(exc))
            return None
        kind = "workflow" if target.workflow else "action"
        run = RunRecord(new_id(), None, rule.name, key, kind,
                        target.workflow or target.action or "", inputs, states.PENDING, now,
                        reason=f"escalation: {reason}")
        batch.runs.append(run)
        commands.append(StartRun(run))
        return run

    # -- resolved alerts ------------------------------------------------------------------

    def resolved(self, event: Event, batch: Batch, commands: list[RunCommand],
                 now: float | None = None) -> list[str]:
        """A resolved alert cancels runs of its incidents that have not acted yet: the
        queued ones here, the active ones by the dispatcher if they have not acted."""
        fingerprint = event.data.get("fingerprint")
        if not isinstance(fingerprint, str):
            return []
        cancelled = []
        for incident_id in list(self.by_fingerprint.get(fingerprint, ())):
            slot = self.runs.get(incident_id)
            if slot is None:
                continue
            while slot.queued:
                run = slot.queued.popleft()
                states.move(run, states.CANCELLED, at=now if now is not None else event.time)
                run.reason, run.outcome = "alert resolved before it ran", states.OUTCOME_CANCELLED
                batch.run_updates.append(run)
                cancelled.append(run.id)
            for run_id in list(slot.active):
                commands.append(CancelRun(
                    run_id, f"alert resolved ({event.id}) before the run acted"))
        return cancelled

    # -- runs ending -----------------------------------------------------------------------

    def run_finished(self, run: RunRecord, now: float, batch: Batch,
                     commands: list[RunCommand]) -> IncidentRecord | None:
        """A run ended: feed the guards (escalate when a breaker opens), start the run its
        incident queued next, or close the incident (returned) when nothing is left."""
        rule = self.policies.get(run.rule or "")
        if rule is not None and run.key is not None and run.incident_id is not None:
            reason = self.guards.run_ended(rule.name, run.key, run.outcome or "",
                                           rule.rule.guards, now)
            if self.guards.remembers(rule.rule.guards):
                self.guards.dirty = True
            if reason is not None:
                breaker = rule.rule.guards.breaker
                scope = rule.name if breaker is None or breaker.per == "rule" \
                    else f"{rule.name}|{run.key}"
                opened = self.guards.breaker_record(scope)
                if opened is not None:
                    batch.breakers.append(opened)
                escalation = self._escalate(rule, run.key, reason, now, batch, commands)
                if escalation is not None and opened is not None:
                    # escalated by the one replica whose commit opens the breaker
                    batch.limits[escalation.id] = [Limit(scope, "opens", guard="breaker",
                                                         reason="breaker already open")]
        incident_id = run.incident_id
        slot = self.runs.get(incident_id or "")
        if slot is None or incident_id is None:
            return None
        slot.active.discard(run.id)
        if slot.queued:
            nxt = slot.queued.popleft()
            states.move(nxt, states.PENDING)
            slot.active.add(nxt.id)
            batch.run_updates.append(nxt)  # pending is durable before it is started
            commands.append(StartRun(nxt))
            return None
        if slot.active:
            return None
        ident = self.by_id.pop(incident_id, None)
        incident = self.open.pop(ident, None) if ident is not None else None
        del self.runs[incident_id]
        if slot.fingerprint is not None:
            ids = self.by_fingerprint.get(slot.fingerprint, set())
            ids.discard(incident_id)
            if not ids:
                self.by_fingerprint.pop(slot.fingerprint, None)
        if incident is not None:
            self.guards.incident_closed(incident.key)
            incident.status, incident.closed, incident.outcome = "closed", now, run.outcome
            batch.incidents[incident.id] = incident
        return incident

    def cancel_queued(self, run_id: str) -> RunRecord | None:
        """Take a queued run (run_mode queued) out of its incident's queue."""
        for slot in self.runs.values():
            for run in slot.queued:
                if run.id == run_id:
                    slot.queued.remove(run)
                    return run
        return None

    def discard(self, run: RunRecord, *, queued_too: bool = False) -> None:
        """The store did not create ``run`` (its decision was a duplicate, lost a race for the
        incident, or was rejected), or another replica took it over: forget it, and its
        incident when nothing else runs there (``queued_too``: nothing else is active; the
        queued runs went with the incident to its new owner). Memory follows the store; it
        never decides a conflict."""
        slot = self.runs.get(run.incident_id or "")
        if slot is None or run.incident_id is None:
            return
        slot.active.discard(run.id)
        if run in slot.queued:
            slot.queued.remove(run)
        if queued_too and not slot.active:
            slot.queued.clear()
        if slot.active or slot.queued:
            return
        ident = self.by_id.pop(run.incident_id, None)
        incident = self.open.pop(ident, None) if ident is not None else None
        del self.runs[run.incident_id]
        if slot.fingerprint is not None:
            ids = self.by_fingerprint.get(slot.fingerprint, set())
            ids.discard(run.incident_id)
            if not ids:
                self.by_fingerprint.pop(slot.fingerprint, None)
        if incident is not None:
            self.guards.incident_closed(incident.key)

    def policy_map(self) -> dict[str, RuleGuards]:
        return {name: r.rule.guards for name, r in self.policies.items()}


def _longest_window(guards: RuleGuards, throttle: Throttle | None) -> float:
    """How far back a rule's per-key guard memory matters: past it, a key's memory only
    takes room."""
    windows = [0.0]
    if throttle is not None:
        windows += [b.per for b in (throttle.once, throttle.most) if b is not None]
    if guards.max_runs_per_key is not None:
        windows.append(guards.max_runs_per_key.per)
    if guards.flapping is not None:
        windows.append(guards.flapping.within)
    if guards.breaker is not None:
        windows.append(guards.breaker.within)
    return max(windows)
