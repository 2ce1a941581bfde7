"""The Store protocol in memory: tests, simulation, and a reference for the contract.

It keeps the same promises as the SQLite store (``tests/unit/test_store_contract.py``
runs on both): a commit is all or nothing, a duplicate decision creates nothing, one
open incident per (rule, key), runs are claimed per replica, JSON values go through the
same encoding (so a value reads back as it would from disk), the audit trail is a
list only ever appended to. Nothing survives the process, unless a ``MemoryData`` is
handed to the next ``MemoryStore`` (a "restart" in tests).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from loopd.errors import LeaseLost, StoreError, StoreRejected
from loopd.store.base import (
    LIVE,
    RUN_OUTCOMES,
    AuditQuery,
    AuditRecord,
    Batch,
    BreakerRecord,
    CommandRecord,
    CommitResult,
    DecisionQuery,
    DecisionRecord,
    EngineState,
    EventRecord,
    IncidentRecord,
    Limit,
    ReplicaRecord,
    RunRecord,
    StepRecord,
    refusal_reason,
)
from loopd.store.codec import dump, load


@dataclass
class MemoryData:
    """What a MemoryStore holds; give the same one to a new store to "restart"."""

    events: dict[tuple[str, str], EventRecord] = field(default_factory=dict)
    decisions: dict[tuple[str, str, str], DecisionRecord] = field(default_factory=dict)
    incidents: dict[str, IncidentRecord] = field(default_factory=dict)
    runs: dict[str, RunRecord] = field(default_factory=dict)
    steps: dict[tuple[str, int], StepRecord] = field(default_factory=dict)
    timers: dict[tuple[str, str], float] = field(default_factory=dict)
    kv: dict[tuple[str, str], bytes] = field(default_factory=dict)
    replicas: dict[str, float] = field(default_factory=dict)  # name -> last heartbeat
    audit: list[AuditRecord] = field(default_factory=list)  # append-only, oldest first
    # several replicas: what every replica admitted (run id, scope, key, time, incident,
    # open), the shared breakers, run commands, and the order events were stored in
    admissions: list[list[Any]] = field(default_factory=list)
    breakers: dict[str, BreakerRecord] = field(default_factory=dict)
    commands: list[CommandRecord] = field(default_factory=list)
    event_order: list[tuple[str, str]] = field(default_factory=list)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _refuse(what: str, name: str) -> StoreRejected:
    return StoreRejected(f"write failed: {what}: {name} may not be null", origin="memory")


def _check(batch: Batch) -> None:
    """The NOT NULL columns of the SQLite schema: a record without them is refused whole."""
    for e in batch.events:
        for name in ("source", "id", "topic", "time"):
            if _missing(getattr(e, name)):
                raise _refuse(f"event {e.id}", name)
    for d in batch.decisions:
        for name in ("source", "event_id", "rule", "outcome", "time"):
            if _missing(getattr(d, name)):
                raise _refuse(f"decision {d.event_id}", name)
    for i in batch.incidents.values():
        for name in ("id", "rule", "key", "status", "opened", "events"):
            if _missing(getattr(i, name)):
                raise _refuse(f"incident {i.id}", name)
    for r in (*batch.runs, *batch.run_updates):
        for name in ("id", "kind", "target", "status", "created"):
            if _missing(getattr(r, name)):
                raise _refuse(f"run {r.id}", name)


def _stored(run: RunRecord) -> RunRecord:
    """A copy as the disk would give it back: JSON fields re-encoded, nothing shared."""
    return replace(run, input=load(dump(run.input)), ctx=load(dump(run.ctx)) or {},
                   event=load(dump(run.event)), progress=load(dump(run.progress)))


class MemoryStore:
    """The Store protocol on dictionaries."""

    def __init__(self, data: MemoryData | None = None, *, replica: str = "memory",
                 lease: float = 15.0) -> None:
        self.data = data if data is not None else MemoryData()
        self.replica = replica
        self.lease = lease
        self._open = False
        self._held: dict[str, int] = {}  # run id -> the epoch this store holds it under

    @property
    def _d(self) -> MemoryData:
        if not self._open:
            raise StoreError("store is not open", origin="memory")
        return self.data

    async def open(self) -> None:
        self._open = True
        self.data.replicas[self.replica] = time.time()

    async def close(self) -> None:
        self._open = False

    async def heartbeat(self) -> None:
        self._d.replicas[self.replica] = time.time()

    async def claim_runs(self, statuses: tuple[str, ...], *, lease: float | None = None,
                         others_only: bool = False, exclude: frozenset[str] = frozenset()
                         ) -> dict[str, int]:
        d = self._d
        stale = time.time() - (self.lease if lease is None else lease)
        alive = {name for name, beat in d.replicas.items() if beat >= stale}
        claimed = {}
        for run in d.runs.values():
            mine = run.owner == self.replica
            if run.id.split("/", 1)[0] in exclude:
                continue
            if run.status in statuses and (run.owner is None or (mine and not others_only)
                                           or (not mine and run.owner not in alive)):
                run.owner, run.epoch = self.replica, run.epoch + 1
                claimed[run.id] = run.epoch
        self._held.update(claimed)
        return claimed

    async def holds(self, run_id: str) -> bool:
        run = self._d.runs.get(run_id)
        return run is not None and run.owner == self.replica \
            and self._held.get(run_id) == run.epoch

    def release(self, run_id: str) -> None:
        self._held.pop(run_id, None)

    async def replicas(self) -> list[ReplicaRecord]:
        return [ReplicaRecord(name, "memory", 0, beat)
                for name, beat in sorted(self._d.replicas.items())]

    async def breakers(self) -> list[BreakerRecord]:
        now = time.time()
        return [replace(b) for _, b in sorted(self._d.breakers.items()) if b.until > now]

    async def close_breaker(self, scope: str) -> bool:
        found = self._d.breakers.pop(scope, None)
        return found is not None and found.until > time.time()

    async def send_command(self, command: CommandRecord) -> None:
        commands = self._d.commands
        commands.append(replace(command, seq=len(commands) + 1))

    async def commands(self, after: int) -> list[CommandRecord]:
        d = self._d
        return [replace(c) for c in d.commands if c.seq > after
                and (run := d.runs.get(c.run_id)) is not None and run.owner == self.replica
                and run.status in LIVE]

    async def events_since(self, after: int, *, limit: int = 1000
                           ) -> list[tuple[int, EventRecord]]:
        d = self._d
        found = []
        for pos in range(max(after, 0) + 1, min(len(d.event_order), after + limit) + 1):
            found.append((pos, replace(d.events[d.event_order[pos - 1]])))
        return found

    async def last_event(self) -> int:
        return len(self._d.event_order)

    async def wait_changed(self, timeout: float) -> None:
        await asyncio.sleep(timeout)

    def _lost(self, run_id: str) -> LeaseLost:
        self._held.pop(run_id, None)
        return LeaseLost(f"run {run_id} is no longer this replica's ({self.replica}): another "
                         "replica took it over; nothing was written", origin="memory")

    def _fenced(self, run_id: str) -> RunRecord | None:
        """The stored run, when this store may write it (None: a run new to the store)."""
        stored = self._d.runs.get(run_id)
        if stored is None:
            return None
        if stored.owner != self.replica or self._held.get(run_id) != stored.epoch:
            raise self._lost(run_id)
        return stored

    def _refusal(self, run: RunRecord, limits: list[Limit], result: CommitResult
                 ) -> Limit | None:
        d = self._d
        for limit in limits:
            rows = [a for a in d.admissions if a[1] == limit.scope]
            if limit.kind == "opens":  # only with the breaker this very commit opened
                refused = limit.scope not in result.breakers_opened
            elif limit.kind == "window":
                refused = sum(1 for a in rows if a[3] > run.created - limit.per) >= limit.count
            elif limit.kind == "open":
                refused = len({a[2] for a in rows if a[5] and a[2] != run.key}) >= limit.count
            elif limit.kind == "breaker":
                found = d.breakers.get(limit.scope)
                refused = found is not None and found.until > run.created
            else:
                raise StoreRejected(f"write failed: run {run.id}: unknown limit kind "
                                    f"{limit.kind!r}", origin="memory")
            if refused:
                return limit
        return None

    async def commit(self, batch: Batch) -> CommitResult:
        d = self._d
        _check(batch)
        result = CommitResult()
        new_decisions = []
        for dec in batch.decisions:
            ident = (dec.source, dec.event_id, dec.rule)
            if ident in d.decisions:
                result.duplicates.add(ident)
            else:
                new_decisions.append(dec)
        if result.duplicates:
            result.skipped_runs |= {
                dec.run_id for dec in batch.decisions
                if (dec.source, dec.event_id, dec.rule) in result.duplicates
                and dec.run_id and dec.outcome in RUN_OUTCOMES}
        live = {dec.incident_id for dec in new_decisions}
        incidents = {i: inc for i, inc in batch.incidents.items()
                     if not result.duplicates or i in live}
        # applied in order, as the SQLite store's upserts are: an incident closed earlier in
        # the batch frees its (rule, key) for one opened after it
        open_by_key = {(i.rule, i.key): i for i in d.incidents.values() if i.status == "open"}
        joined: dict[str, IncidentRecord] = {}
        for inc in incidents.values():
            slot = (inc.rule, inc.key)
            held = open_by_key.get(slot)
            if inc.status != "open":
                if held is not None and held.id == inc.id:
                    del open_by_key[slot]
            elif held is not None and held.id != inc.id:
                joined[inc.id] = held
            else:
                open_by_key[slot] = inc
        for new_id, held in joined.items():
            result.conflicts[new_id] = held
            result.skipped_runs |= {r.id for r in batch.runs if r.incident_id == new_id}
            incidents.pop(new_id)
        # the limits of the runs left, in order (each sees the ones admitted before it)
        admitted: list[list[Any]] = []
        refused_incidents: dict[str, str] = {}  # new incident not created -> why
        refused_runs: dict[str, str] = {}
        opened: dict[str, BreakerRecord] = {}
        for scope in batch.breakers_closed:
            d.breakers.pop(scope, None)
        for breaker in batch.breakers:
            held_b = d.breakers.get(breaker.scope)
            if held_b is None or held_b.until <= breaker.opened:
                opened[breaker.scope] = breaker
                result.breakers_opened.add(breaker.scope)
        refusals: list[tuple[RunRecord, Limit]] = []
        kept: set[str | None] = set()  # incidents of which a run was admitted
        for run in batch.runs:
            if run.id in result.skipped_runs or run.id in d.runs:
                continue
            limits = batch.limits.get(run.id)
            refused = self._refusal(run, limits, result) if limits else None
            if refused is not None:
                refusals.append((run, refused))
                continue
            kept.add(run.incident_id)
            if limits:
                scopes = {lim.scope for lim in limits if lim.kind in ("window", "open")}
                rows = [[run.id, scope, run.key, run.created, run.incident_id, True]
                        for scope in sorted(scopes)]
                d.admissions.extend(rows)
                admitted.extend(rows)
        for run, refused in refusals:
            result.refused[run.id] = refused
            result.skipped_runs.add(run.id)
            reason = refusal_reason(refused)
            refused_runs[run.id] = reason
            if run.incident_id is not None and run.incident_id not in d.incidents \
                    and run.incident_id not in kept:
                refused_incidents[run.incident_id] = reason
                incidents.pop(run.incident_id, None)
        # nothing above wrote (but the admissions, which are this batch's own): from here
        # the batch is applied whole
        d.breakers.update(opened)
        for e in batch.events:
            if (e.source, e.id) not in d.events:
                d.events[(e.source, e.id)] = replace(e, data=load(dump(e.data)))
                d.event_order.append((e.source, e.id))
        for dec in new_decisions:
            held = joined.get(dec.incident_id or "")
            if held is not None:
                dec = replace(dec, incident_id=held.id)
                if dec.outcome in RUN_OUTCOMES:
                    dec = replace(dec, outcome="joined", run_id=held.run_id,
                                  reason="incident already open (decided by another loopd)")
            why = refused_incidents.get(dec.incident_id or "")
            if why is not None:
                dec = replace(dec, outcome="suppressed", reason=why, incident_id=None,
                              run_id=None)
            elif (why := refused_runs.get(dec.run_id or "")) is not None:
                dec = replace(dec, outcome="suppressed", reason=why, run_id=None)
            d.decisions[(dec.source, dec.event_id, dec.rule)] = replace(
                dec, seq=len(d.decisions) + 1)
        for inc in incidents.values():
            old_inc = d.incidents.get(inc.id)
            if old_inc is not None and old_inc.status == "closed":  # never opened again
                inc = replace(inc, status="closed", closed=old_inc.closed,
                              run_id=old_inc.run_id, outcome=old_inc.outcome or inc.outcome)
            d.incidents[inc.id] = replace(inc)
            if inc.status != "open":
                for row in d.admissions:
                    if row[4] == inc.id:
                        row[5] = False
        for run in batch.runs:
            if run.id in result.skipped_runs or run.id in d.runs:
                continue
            run.owner = self.replica
            d.runs[run.id] = _stored(run)
            self._held[run.id] = run.epoch
        for run in batch.run_updates:
            old = d.runs.get(run.id)
            run.owner, run.epoch = self.replica, (old.epoch if old else run.epoch) + 1
            d.runs[run.id] = _stored(run)
            self._held[run.id] = run.epoch
        for rule, key, since in batch.timers_set:  # the earliest start wins (see SQLite)
            d.timers[(rule, key)] = min(since, d.timers.get((rule, key), since))
        for rule, key in batch.timers_cleared:
            d.timers.pop((rule, key), None)
        for slot, value in batch.kv.items():
            if value is None:
                d.kv.pop(slot, None)
            else:
                d.kv[slot] = dump(value)
        return result

    async def load_state(self, *, since: float, recent: int) -> EngineState:
        d = self._d
        starts = sorted(((r.rule, r.key, r.created) for r in d.runs.values()
                         if r.created >= since and r.rule is not None and r.key is not None
                         and r.incident_id is not None and "/" not in r.id),
                        key=lambda s: s[2])
        seen = [(dec.source, dec.event_id) for dec in list(d.decisions.values())[-recent:]]
        return EngineState([replace(i) for i in d.incidents.values() if i.status == "open"],
                           [(r, k, s) for (r, k), s in d.timers.items()],
                           [(r, k, c) for r, k, c in starts if r and k], seen)

    async def save_run(self, run: RunRecord) -> None:
        old = self._fenced(run.id)
        run.owner = self.replica
        run.version += 1
        saved = _stored(run)
        if old is not None:
            saved.epoch = run.epoch = old.epoch  # the epoch belongs to claim_runs
        else:
            self._held[run.id] = run.epoch
        self._d.runs[run.id] = saved

    async def save_step(self, step: StepRecord) -> None:
        if self._fenced(step.run_id) is None:
            raise self._lost(step.run_id)  # a step of a run this store never wrote
        self._d.steps[(step.run_id, step.seq)] = replace(
            step, input=load(dump(step.input)), output=load(dump(step.output)))

    async def close_incident(self, incident_id: str, closed: float, outcome: str) -> None:
        inc = self._d.incidents.get(incident_id)
        if inc is not None:
            inc.status, inc.closed, inc.outcome = "closed", closed, outcome
        for row in self._d.admissions:
            if row[4] == incident_id:
                row[5] = False

    async def get_run(self, run_id: str) -> RunRecord | None:
        run = self._d.runs.get(run_id)
        return _stored(run) if run is not None else None

    async def list_runs(self, *, status: str | None = None, rule: str | None = None,
                        limit: int = 100) -> list[RunRecord]:
        runs = [r for r in self._d.runs.values() if status in (None, r.status)
                and rule in (None, r.rule)]
        runs.sort(key=lambda r: r.created, reverse=True)
        return [_stored(r) for r in runs[:limit]]

    async def runs_in_status(self, statuses: tuple[str, ...]) -> list[RunRecord]:
        runs = sorted((r for r in self._d.runs.values() if r.status in statuses),
                      key=lambda r: r.created)
        return [_stored(r) for r in runs]

    async def steps(self, run_id: str) -> list[StepRecord]:
        found = [s for (rid, _), s in self._d.steps.items() if rid == run_id]
        return [replace(s) for s in sorted(found, key=lambda s: s.seq)]

    async def list_incidents(self, *, status: str | None = None,
                             limit: int = 100) -> list[IncidentRecord]:
        found = [i for i in self._d.incidents.values() if status is None or i.status == status]
        found.sort(key=lambda i: i.opened, reverse=True)
        return [replace(i) for i in found[:limit]]

    async def get_incident(self, incident_id: str) -> IncidentRecord | None:
        found = self._d.incidents.get(incident_id)
        return replace(found) if found is not None else None

    async def decisions_for(self, *, run_id: str | None = None, incident_id: str | None = None,
                            limit: int = 1000) -> list[DecisionRecord]:
        if run_id is not None:
            found = [x for x in self._d.decisions.values() if x.run_id == run_id]
        else:
            found = [x for x in self._d.decisions.values() if x.incident_id == incident_id]
        return [replace(x) for x in found[:limit]]

    async def decisions(self, query: DecisionQuery) -> list[DecisionRecord]:
        found = [x for x in reversed(self._d.decisions.values()) if query.matches(x)]
        return [replace(x) for x in found[:query.limit]]

    async def count_decisions(self, *, rule: str | None = None) -> int:
        return sum(1 for x in self._d.decisions.values() if rule is None or x.rule == rule)

    async def get_event(self, source: str, event_id: str) -> EventRecord | None:
        event = self._d.events.get((source, event_id))
        return replace(event) if event is not None else None

    async def kv_get(self, namespace: str, key: str) -> Any:
        blob = self._d.kv.get((namespace, key))
        return load(blob) if blob is not None else None

    async def kv_put(self, namespace: str, key: str, value: Any) -> None:
        self._d.kv[(namespace, key)] = dump(value)

    async def kv_scan(self, namespace: str, prefix: str = "") -> list[tuple[str, Any]]:
        return sorted((k, load(v)) for (n, k), v in self._d.kv.items()
                      if n == namespace and k.startswith(prefix))

    async def append_audit(self, record: AuditRecord) -> None:
        trail = self._d.audit
        for name in ("time", "request", "who", "role", "action", "outcome"):
            if _missing(getattr(record, name)):
                raise _refuse(f"audit record {record.request}", name)
        trail.append(replace(record, params=load(dump(record.params)), seq=len(trail) + 1))

    async def audit(self, query: AuditQuery) -> list[AuditRecord]:
        found: list[AuditRecord] = []
        for record in reversed(self._d.audit):
            if len(found) >= query.limit:
                break
            if query.matches(record):
                found.append(replace(record))
        return found
