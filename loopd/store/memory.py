"""The Store protocol in memory: tests, simulation, and a reference for the contract.

It keeps the same promises as the SQLite store (``tests/unit/test_store_contract.py``
runs on both): a commit is all or nothing, a duplicate decision creates nothing, one
open incident per (rule, key), runs are claimed per replica, JSON values go through the
same encoding (so a value reads back as it would from disk), the audit trail is a
list only ever appended to. Nothing survives the process, unless a ``MemoryData`` is
handed to the next ``MemoryStore`` (a "restart" in tests).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from loopd.errors import StoreError, StoreRejected
from loopd.store.base import (
    RUN_OUTCOMES,
    AuditQuery,
    AuditRecord,
    Batch,
    CommitResult,
    DecisionRecord,
    EngineState,
    EventRecord,
    IncidentRecord,
    RunRecord,
    StepRecord,
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

    async def claim_runs(self, statuses: tuple[str, ...], *, lease: float | None = None
                         ) -> set[str]:
        d = self._d
        stale = time.time() - (self.lease if lease is None else lease)
        alive = {name for name, beat in d.replicas.items() if beat >= stale}
        claimed = set()
        for run in d.runs.values():
            if run.status in statuses and (run.owner in (None, self.replica)
                                           or run.owner not in alive):
                run.owner, run.epoch = self.replica, run.epoch + 1
                claimed.add(run.id)
        return claimed

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
        # nothing above wrote: from here the batch is applied whole
        for e in batch.events:
            d.events.setdefault((e.source, e.id), replace(e, data=load(dump(e.data))))
        for dec in new_decisions:
            held = joined.get(dec.incident_id or "")
            if held is not None:
                dec = replace(dec, incident_id=held.id)
                if dec.outcome in RUN_OUTCOMES:
                    dec = replace(dec, outcome="joined", run_id=held.run_id,
                                  reason="incident already open (decided by another loopd)")
            d.decisions[(dec.source, dec.event_id, dec.rule)] = replace(dec)
        for inc in incidents.values():
            d.incidents[inc.id] = replace(inc)
        for run in batch.runs:
            if run.id in result.skipped_runs or run.id in d.runs:
                continue
            run.owner = self.replica
            d.runs[run.id] = _stored(run)
        for run in batch.run_updates:
            d.runs[run.id] = _stored(run)
        for rule, key, since in batch.timers_set:
            d.timers[(rule, key)] = since
        for rule, key in batch.timers_cleared:
            d.timers.pop((rule, key), None)
        for slot, value in batch.kv.items():
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
        run.owner = self.replica
        run.version += 1
        old = self._d.runs.get(run.id)
        saved = _stored(run)
        if old is not None:
            saved.epoch = old.epoch  # the epoch belongs to claim_runs
        self._d.runs[run.id] = saved

    async def save_step(self, step: StepRecord) -> None:
        self._d.steps[(step.run_id, step.seq)] = replace(
            step, input=load(dump(step.input)), output=load(dump(step.output)))

    async def close_incident(self, incident_id: str, closed: float, outcome: str) -> None:
        inc = self._d.incidents.get(incident_id)
        if inc is not None:
            inc.status, inc.closed, inc.outcome = "closed", closed, outcome

    async def get_run(self, run_id: str) -> RunRecord | None:
        run = self._d.runs.get(run_id)
        return _stored(run) if run is not None else None

    async def list_runs(self, *, status: str | None = None, limit: int = 100) -> list[RunRecord]:
        runs = [r for r in self._d.runs.values() if status is None or r.status == status]
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

    async def decisions_for(self, *, run_id: str | None = None, incident_id: str | None = None,
                            limit: int = 1000) -> list[DecisionRecord]:
        if run_id is not None:
            found = [x for x in self._d.decisions.values() if x.run_id == run_id]
        else:
            found = [x for x in self._d.decisions.values() if x.incident_id == incident_id]
        return [replace(x) for x in found[:limit]]

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
