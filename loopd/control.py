"""The control facade: everything the API does that reads or changes live state.

The API (loopd.api) sees loopd only through ``Control`` (and the ingest path of push
sources): approve/reject/cancel a run, close a breaker, reload, rules with their match
counts, guard status, runs/incidents/steps read from the store, and the audit trail
(appended to and read, never changed). Changes go to their one writer: guard memory
and queued runs to the engine (written by its next batch, awaited here so an answer
means durable), running runs to the dispatcher, approvals to the one set of pending
approvals; approve, reject and cancel carry who asked (``by``) into the run's history.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from loopd import metrics
from loopd.decide.engine import Engine
from loopd.packs.registry import PackRegistry
from loopd.rules.loader import RuleSet
from loopd.runs import states
from loopd.runs.approvals import Approvals
from loopd.runs.dispatcher import Dispatcher, api_cancel
from loopd.sources.base import Source
from loopd.store.base import (
    LIVE,
    AuditQuery,
    AuditRecord,
    CommandRecord,
    DecisionQuery,
    DecisionRecord,
    IncidentRecord,
    RunRecord,
    StepRecord,
    Store,
)

WRITE_TIMEOUT = 10.0
RELOAD_KV = ("cluster", "reload")  # the last POST /v1/reload, on any replica
MEMBERS_KV = "members"  # namespace: group incident id -> its members (decide.correlation)


AROUND = 900.0  # s: how far from an incident its rule and key's suppressions still belong to it


@dataclass(slots=True)
class ReloadResult:
    rules: int
    errors: list[str]
    kept: list[str] = field(default_factory=list)  # rule files whose previous rules stay


@dataclass(frozen=True, slots=True)
class CancelAnswer:
    """``cancelled`` (a queued run, now final), ``cancelling`` (the run is being stopped),
    ``missing`` (no such run) or ``refused`` (``problem`` says why)."""

    state: Literal["cancelled", "cancelling", "missing", "refused"]
    problem: str | None = None


class Control:
    def __init__(self, *, engine: Engine, dispatcher: Dispatcher, approvals: Approvals,
                 store: Store, registry: Callable[[], PackRegistry],
                 reload: Callable[[], Awaitable[ReloadResult]],
                 sources: dict[str, Source] | None = None, stall_after: float = 60.0) -> None:
        self._engine = engine
        self._dispatcher = dispatcher
        self._approvals = approvals
        self._store = store
        self._registry = registry
        self._reload = reload
        self._sources = sources or {}
        self._stall_after = stall_after

    # -- rules, guards, health ------------------------------------------------------------

    @property
    def ruleset(self) -> RuleSet:
        return self._engine.ruleset

    def matches(self, rule: str) -> int:
        return self._engine.matches[rule]

    def registry(self) -> PackRegistry:
        return self._registry()

    def sources_connected(self) -> dict[str, bool]:
        return {name: s.connected for name, s in self._sources.items()}

    def store_ok(self) -> bool:
        """False while the store fails commits (down, full, locked): nothing is decided."""
        return self._engine.store_ok

    def stalled(self) -> str | None:
        """Why the engine is stuck (liveness), or None: events have waited longer than
        ``engine.stall_after`` with no batch written."""
        engine = self._engine
        backlog = engine.backlog
        # a store outage is not a wedged engine: it retries by itself and readiness says
        # so; restarting loopd would not bring the database back
        if not backlog or not engine.store_ok:
            return None
        idle = time.monotonic() - engine.progress_at
        if idle <= self._stall_after:
            return None
        return (f"no batch written for {idle:.1f}s (stall_after {self._stall_after:g}s) "
                f"with {backlog} event(s) or message(s) waiting")

    def guard_status(self) -> dict[str, Any]:
        engine = self._engine
        return engine.guards.snapshot(engine.policies(), engine.now())

    def refresh_budgets(self) -> None:
        """Budgets free up as their window slides, with no event to say so: refresh the
        loopd_budget_remaining gauge (before /metrics answers)."""
        engine = self._engine
        engine.guards.publish_budgets(engine.policies(), engine.now())

    async def close_breaker(self, scope: str) -> bool:
        """Close a breaker for every replica: here (memory and the store, through the
        engine's next batch), or in the store when only another replica's memory has it
        (the others follow the store within a poll)."""
        if not self._engine.close_breaker(scope):
            return await self._store.close_breaker(scope)
        await self._engine.drain(WRITE_TIMEOUT)  # written by the engine's next batch
        return True

    async def reload(self) -> ReloadResult:
        result = await self._reload()
        # every other replica reloads its own files too, within a poll (loopd.cluster)
        await self._store.kv_put(*RELOAD_KV, {"token": uuid.uuid4().hex,
                                              "by": self._store.replica, "at": time.time()})
        return result

    # -- runs ---------------------------------------------------------------------------

    async def decide(self, run_id: str, approved: bool, reason: str | None,
                     by: str | None = None) -> str | None:
        """Approve or reject a run waiting for approval (rule ``mode: approval`` or an
        ``approval:`` task) as ``by``; None when done (here, or handed to the replica
        executing the run), else why not."""
        run = await self._store.get_run(run_id)
        kind = "approve" if approved else "reject"
        if run is not None and await self._forward(run, kind, by, reason):
            return None
        return self._approvals.decide(run_id, approved, reason, by)

    async def _forward(self, run: RunRecord, kind: str, by: str | None,
                       reason: str | None) -> bool:
        """Hand a command to the replica executing ``run`` (through the store), when the
        store says it is another's: this replica may still hold a stale task of it (it
        was paused past its lease). False when the run is this replica's (or nobody's,
        or ended), so there is nobody to hand it to."""
        if run.owner in (None, self._store.replica) or run.status not in LIVE:
            return False
        await self._store.send_command(CommandRecord(run.id, kind, by, reason, time.time()))
        metrics.run_command(kind, "sent", run.id)
        return True

    async def cancel(self, run_id: str, by: str | None = None) -> CancelAnswer:
        """Cancel a run as ``by`` (its reason names who)."""
        run = await self._store.get_run(run_id)
        if run is None:
            return CancelAnswer("missing", f"no run {run_id!r}")
        if await self._forward(run, "cancel", by, None):
            return CancelAnswer("cancelling")  # by the replica that has it
        if run.status == states.QUEUED:  # still the engine's: in its incident's queue
            if self._engine.cancel_queued(run_id, f"{api_cancel(by)} while queued") is None:
                return CancelAnswer("refused", f"run {run_id} is no longer queued")
            await self._engine.drain(WRITE_TIMEOUT)
            return CancelAnswer("cancelled")
        if run.status not in states.ACTIVE:
            return CancelAnswer("refused", f"run {run_id} already ended ({run.status})")
        if not self._dispatcher.cancel(run_id, api_cancel(by), acting_too=True):
            return CancelAnswer("refused", f"run {run_id} is not executing here")
        return CancelAnswer("cancelling")

    # -- reads ----------------------------------------------------------------------------

    async def list_runs(self, *, status: str | None, limit: int, rule: str | None = None
                        ) -> list[RunRecord]:
        return await self._store.list_runs(status=status, rule=rule, limit=limit)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self._store.get_run(run_id)

    async def steps(self, run_id: str) -> list[StepRecord]:
        return await self._store.steps(run_id)

    async def get_incident(self, incident_id: str) -> IncidentRecord | None:
        return await self._store.get_incident(incident_id)

    async def decisions_around(self, incident: IncidentRecord) -> list[DecisionRecord]:
        """The incident's story in decisions, oldest first: the one that opened it, the
        events that joined it (the newest thousand), and the suppressed decisions for its
        rule and key from ``AROUND`` seconds before it opened to as long after it closed
        (a pending ``for:``, a throttle, a silence, a breaker)."""
        own = await self._store.decisions(DecisionQuery(incident_id=incident.id, limit=1000))
        until = (incident.closed if incident.closed is not None else time.time()) + AROUND
        near = await self._store.decisions(DecisionQuery(
            rule=incident.rule, key=incident.key, outcome="suppressed",
            since=incident.opened - AROUND, until=until, limit=200))
        merged = {d.seq: d for d in (*own, *near)}
        return [merged[seq] for seq in sorted(merged)]

    async def members(self, incident_id: str) -> dict[str, Any] | None:
        """A group incident's members and the matches it inhibited (loopd.decide.correlation
        writes them with the decisions that change them), None for other incidents."""
        value = await self._store.kv_get(MEMBERS_KV, incident_id)
        return value if isinstance(value, dict) else None

    async def decisions(self, query: DecisionQuery) -> list[DecisionRecord]:
        """Decisions newest first (``GET /v1/decisions``, the UI's explorer)."""
        return await self._store.decisions(query)

    async def list_incidents(self, *, status: str | None, limit: int) -> list[IncidentRecord]:
        return await self._store.list_incidents(status=status, limit=limit)

    # -- the audit trail (append-only) -----------------------------------------------------

    async def append_audit(self, record: AuditRecord) -> None:
        """Durable when this returns; StoreError when it cannot be written."""
        await self._store.append_audit(record)

    async def audit(self, query: AuditQuery) -> list[AuditRecord]:
        return await self._store.audit(query)
