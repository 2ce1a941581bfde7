"""What one group commit of the PostgreSQL store writes, inside its one transaction.

``Group.write(conn)`` runs every queued operation (engine batches, fenced run and step
saves, single statements) on one connection, one statement per kind of row (``unnest``
of arrays), and returns each operation's answer. Nothing here commits, and nothing
touches the store's memory: the store applies ``Group.taken`` and ``Group.lost`` (the
epochs it now holds runs under, the runs it holds no more) only once the transaction
committed, so a retried or failed group leaves the store as it was.

Order inside the transaction: the locks of every ``Limit`` scope and breaker the group
touches (sorted, so two replicas' groups never deadlock), then batches and single
statements in the order queued, then run saves, then step saves (fenced: they change
neither owner nor epoch, so their place among the rest does not matter), then events,
last, under a lock held until commit: positions are handed out in commit order, so a
reader of ``events_since`` never skips one that commits later with a smaller number.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from loopd.errors import LeaseLost, StoreRejected
from loopd.store.admission import Admissions, Wanted
from loopd.store.base import (
    RUN_OUTCOMES,
    Batch,
    CommitResult,
    DecisionRecord,
    EventRecord,
    IncidentRecord,
    Limit,
    RunRecord,
    StepRecord,
    refusal_reason,
)
from loopd.store.codec import dump
from loopd.store.postgres_schema import (
    ADMISSIONS_INSERT,
    BREAKERS_OPEN,
    DECISIONS_INSERT,
    EVENTS_INSERT,
    EVENTS_LOCK,
    INCIDENT_COLUMNS,
    INCIDENTS_INSERT,
    INCIDENTS_UPDATE,
    KV_DELETE,
    KV_PUT,
    LOCK_SPACE,
    RUNS_INSERT,
    RUNS_SAVE,
    RUNS_UPSERT,
    STEPS_SAVE,
    TIMERS_CLEAR,
    TIMERS_SET,
)

Conn = psycopg.AsyncConnection[tuple[Any, ...]]
JOINED_REASON = "incident already open (decided by another loopd)"
_RUNS = "(" + ", ".join(f"'{o}'" for o in sorted(RUN_OUTCOMES)) + ")"  # SQL: a run's outcomes


def text(value: Any) -> str:
    """A JSON value as the text PostgreSQL casts to jsonb (the shared codec: total)."""
    return dump(value).decode()


def columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as one list per column: the arrays ``unnest`` takes back apart."""
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


def number(value: Any) -> float | None:
    """A float8 array element: None stays None (a NOT NULL column refuses it)."""
    return None if value is None else float(value)


def scope_key(scope: str) -> int:
    """A stable 64-bit advisory lock key for a scope, the same on every replica."""
    return int.from_bytes(hashlib.blake2b(scope.encode(), digest_size=8).digest(), "big",
                          signed=True)


def run_row(r: RunRecord, epoch: int | None = None) -> tuple[Any, ...]:
    return (r.id, r.incident_id, r.rule, r.key, r.kind, r.target, text(r.input), r.status,
            number(r.created), number(r.started), number(r.finished), r.reason, text(r.ctx),
            r.outcome, text(r.event), text(r.progress), r.owner,
            r.epoch if epoch is None else epoch, r.version)


def step_row(s: StepRecord, held: int) -> tuple[Any, ...]:
    return (s.run_id, s.seq, s.task, s.action, s.attempt, s.status, number(s.started),
            number(s.finished), text(s.input), text(s.output), s.error, s.transition, held)


@dataclass(slots=True)
class SaveRun:
    run: RunRecord


@dataclass(slots=True)
class SaveStep:
    step: StepRecord


@dataclass(slots=True)
class Statement:
    """One statement with its parameters; consecutive ones with the same SQL go as one
    ``executemany``."""

    sql: str
    params: tuple[Any, ...]


Op = Batch | SaveRun | SaveStep | Statement
Answer = CommitResult | LeaseLost | None


@dataclass
class Group:
    """One transaction's worth of queued operations, and what it produced."""

    ops: list[Op]
    replica: str
    held: dict[str, int]          # the store's held epochs when the group was formed
    origin: str
    answers: list[Answer] = field(default_factory=list)
    taken: dict[str, int] = field(default_factory=dict)   # runs this group made held
    lost: set[str] = field(default_factory=set)           # runs it found held no more
    notify: bool = False          # runs, events or commands written: wake the others

    async def write(self, conn: Conn) -> None:
        self.answers = [None] * len(self.ops)
        self.taken, self.lost = {}, set()
        self.notify = False
        scopes = sorted({scope_key(s) for op in self.ops if isinstance(op, Batch)
                         for s in _scopes(op)})
        if scopes:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(k) FROM unnest(%b::int8[]) WITH ORDINALITY "
                "AS u(k, n) ORDER BY n", (scopes,))
        events: list[EventRecord] = []
        i = 0
        while i < len(self.ops):
            op = self.ops[i]
            if isinstance(op, Batch):
                self.answers[i] = await self._batch(conn, op)
                events += op.events
                i += 1
            elif isinstance(op, Statement):
                rows = [op.params]
                i += 1
                while i < len(self.ops):
                    nxt = self.ops[i]
                    if not isinstance(nxt, Statement) or nxt.sql != op.sql:
                        break
                    rows.append(nxt.params)
                    i += 1
                async with conn.cursor() as cur:
                    await cur.executemany(op.sql, rows)
            else:
                i += 1
        await self._saves(conn)
        await self._steps(conn)
        if events:
            rows = [(e.source, e.id, e.topic, e.key, number(e.time), text(e.data))
                    for e in events]
            await conn.execute(EVENTS_INSERT, (LOCK_SPACE, EVENTS_LOCK, *columns(rows, 6)))
            self.notify = True

    # -- fenced run and step saves ------------------------------------------------------

    async def _saves(self, conn: Conn) -> None:
        saves = {op.run.id: (i, op.run) for i, op in enumerate(self.ops)
                 if isinstance(op, SaveRun)}
        if not saves:
            return
        held = [(run, self.held[rid]) for rid, (_, run) in saves.items() if rid in self.held]
        fresh = [run for rid, (_, run) in saves.items() if rid not in self.held]
        written: set[str] = set()
        if held:
            async with conn.cursor() as cur:
                await cur.execute(RUNS_SAVE, (*columns([run_row(r, e) for r, e in held], 19),
                                              self.replica))
                written = {row[0] for row in await cur.fetchall()}
        if fresh:  # first inserted by save_run: held from now on; an existing one is not
            async with conn.cursor() as cur:
                await cur.execute(RUNS_INSERT, columns([run_row(r) for r in fresh], 19))
                for rid, epoch in await cur.fetchall():
                    written.add(rid)
                    self.taken[rid] = int(epoch)
        self.notify |= bool(written)
        for i, op in enumerate(self.ops):
            if isinstance(op, SaveRun) and op.run.id not in written:
                self.answers[i] = self._lost(op.run.id, "run")

    async def _steps(self, conn: Conn) -> None:
        steps: dict[tuple[str, int], StepRecord] = {}
        for i, op in enumerate(self.ops):
            if not isinstance(op, SaveStep):
                continue
            epoch = self.held.get(op.step.run_id, self.taken.get(op.step.run_id))
            if epoch is None:
                self.answers[i] = self._lost(op.step.run_id, "step")
            else:
                steps[(op.step.run_id, op.step.seq)] = op.step
        if not steps:
            return
        rows = [step_row(s, self.held.get(s.run_id, self.taken.get(s.run_id, -1)))
                for s in steps.values()]
        async with conn.cursor() as cur:
            await cur.execute(STEPS_SAVE, (*columns(rows, 13), self.replica))
            written = {(r, int(q)) for r, q in await cur.fetchall()}
        for i, op in enumerate(self.ops):
            if isinstance(op, SaveStep) and self.answers[i] is None \
                    and (op.step.run_id, op.step.seq) not in written:
                self.answers[i] = self._lost(op.step.run_id, "step")

    def _lost(self, run_id: str, what: str) -> LeaseLost:
        self.lost.add(run_id)
        return LeaseLost(f"{what} of run {run_id} not written: the run is not held by "
                         f"replica {self.replica} under the epoch it claimed",
                         origin=self.origin)

    # -- an engine batch ------------------------------------------------------------------

    async def _batch(self, conn: Conn, batch: Batch) -> CommitResult:
        result = CommitResult()
        again: set[str] = set()  # runs this batch created before (see _decisions)
        if batch.decisions:
            again = await self._decisions(conn, batch.decisions, result)
        incidents = batch.not_duplicated(result)
        if batch.breakers_closed:
            await conn.execute("DELETE FROM breakers WHERE scope = ANY(%b::text[])",
                               (list(batch.breakers_closed),))
        if batch.breakers:
            async with conn.cursor() as cur:
                first = {b.scope: b for b in reversed(batch.breakers)}  # a scope once
                await cur.execute(BREAKERS_OPEN, columns(
                    [(b.scope, number(b.opened), number(b.until), b.reason)
                     for b in first.values()], 4))
                result.breakers_opened |= {row[0] for row in await cur.fetchall()}
        inserted: set[str] = set()
        if incidents:
            inserted = await self._incidents(conn, list(incidents.values()), batch, result)
        runs = [r for r in batch.runs if r.id not in result.skipped_runs]
        limited = [r for r in runs if batch.limits.get(r.id) and r.id not in again]
        if limited:
            await self._admit(conn, limited, batch, inserted, result)
            runs = [r for r in runs if r.id not in result.refused]
            result.skipped_runs |= set(result.refused)
        if runs:
            for run in runs:
                run.owner = self.replica
            async with conn.cursor() as cur:
                await cur.execute(RUNS_INSERT, columns([run_row(r) for r in runs], 19))
                self.taken.update((rid, int(epoch)) for rid, epoch in await cur.fetchall())
            self.notify = True
        if batch.run_updates:  # a queued run started, or cancelled: this replica takes it
            updates = {r.id: r for r in batch.run_updates}
            for run in updates.values():
                run.owner = self.replica
            async with conn.cursor() as cur:
                await cur.execute(RUNS_UPSERT, columns([run_row(r) for r in updates.values()],
                                                       19))
                for rid, epoch in await cur.fetchall():
                    updates[rid].epoch = self.taken[rid] = int(epoch)
            self.notify = True
        if batch.timers_set:  # one row per timer: a statement may not change a row twice
            starts: dict[tuple[str, str], float | None] = {}
            for rule, key, since in batch.timers_set:
                at, was = number(since), starts.get((rule, key))
                starts[(rule, key)] = at if was is None or at is None else min(at, was)
            await conn.execute(TIMERS_SET, columns(
                [(r, k, s) for (r, k), s in starts.items()], 3))
        if batch.timers_cleared:
            await conn.execute(TIMERS_CLEAR, columns(list(batch.timers_cleared), 2))
        put = [(n, k, text(v)) for (n, k), v in batch.kv.items() if v is not None]
        if put:
            ns, keys, values = columns(put, 3)
            await conn.execute(KV_PUT, (time.time(), ns, keys, values))
        gone = [slot for slot, v in batch.kv.items() if v is None]
        if gone:
            await conn.execute(KV_DELETE, columns(gone, 2))
        return result

    async def _decisions(self, conn: Conn, decisions: list[DecisionRecord],
                         result: CommitResult) -> set[str]:
        """Insert the decisions; those already stored (by this replica or another) are the
        result's ``duplicates``: one statement whatever the batch holds. Returns the runs
        this very batch created in an earlier commit whose answer was lost (the connection
        dropped during COMMIT, and the committer tried again): their decisions are found
        stored with the same run id (run ids are unique), and are not duplicates."""
        rows = [(d.source, d.event_id, d.rule, d.key, d.outcome, d.reason, number(d.time),
                 d.incident_id, d.run_id) for d in decisions]
        async with conn.cursor() as cur:
            await cur.execute(DECISIONS_INSERT, columns(rows, 9))
            new = {(s, e, r) for s, e, r in await cur.fetchall()}
        dup = {(d.source, d.event_id, d.rule) for d in decisions} - new
        runs = [(d.source, d.event_id, d.rule, d.run_id) for d in decisions
                if d.run_id and d.outcome in RUN_OUTCOMES and (d.source, d.event_id, d.rule)
                in dup]
        again: set[str] = set()
        if runs:
            async with conn.cursor() as cur:
                await cur.execute(
                    "SELECT d.source, d.event_id, d.rule, d.run_id FROM decisions d JOIN "
                    "unnest(%b::text[], %b::text[], %b::text[], %b::text[]) AS u(source, "
                    "event_id, rule, run_id) ON d.source = u.source AND d.event_id = "
                    "u.event_id AND d.rule = u.rule AND d.run_id = u.run_id",
                    columns(runs, 4))
                for source, event_id, rule, run_id in await cur.fetchall():
                    dup.discard((source, event_id, rule))
                    again.add(run_id)
        result.duplicates |= dup
        return again

    async def _incidents(self, conn: Conn, incidents: list[IncidentRecord], batch: Batch,
                         result: CommitResult) -> set[str]:
        """Write the incidents; returns the ids inserted. A new incident that meets an
        open one for the same (rule, key) (another replica opened it) is not created: its
        decisions join the open one, and its runs are not created."""
        # new ones first (one statement, the common case); those already stored are
        # updated, and a new one that met an open incident the batch closes goes in after
        inserted = await self._insert_incidents(conn, incidents)
        stored = [i for i in incidents if i.id not in inserted]
        if not stored:
            return inserted
        async with conn.cursor() as cur:
            await cur.execute(INCIDENTS_UPDATE, columns(
                [(i.id, i.status, number(i.closed), i.events, i.run_id, i.outcome)
                 for i in stored], 6))
            updated = {row[0] for row in await cur.fetchall()}
        new = [i for i in stored if i.id not in updated]
        if new:
            inserted |= await self._insert_incidents(conn, new)
        missed = [i for i in new if i.id not in inserted]
        if not missed:
            return inserted
        async with conn.cursor() as cur:
            await cur.execute(
                f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE status='open' AND (rule, key)"
                " IN (SELECT * FROM unnest(%b::text[], %b::text[]))",
                columns([(i.rule, i.key) for i in missed], 2))
            held = {(row[1], row[2]): IncidentRecord(*row) for row in await cur.fetchall()}
        joins = []
        for inc in missed:
            found = held.get((inc.rule, inc.key))
            if found is None:
                raise StoreRejected(f"write failed: incident {inc.id} conflicts with a stored "
                                    "incident of the same id", origin=self.origin)
            result.conflicts[inc.id] = found
            result.skipped_runs |= {r.id for r in batch.runs if r.incident_id == inc.id}
            joins.append((inc.id, found.id, found.run_id))
        await conn.execute(
            f"UPDATE decisions SET incident_id=j.held, outcome=CASE WHEN outcome IN {_RUNS} "
            f"THEN 'joined' ELSE outcome END, reason=CASE WHEN outcome IN {_RUNS} THEN %s "
            f"ELSE reason END, run_id=CASE WHEN outcome IN {_RUNS} THEN j.run ELSE run_id END "
            "FROM unnest(%b::text[], %b::text[], %b::text[]) AS j(new, held, run) "
            "WHERE decisions.incident_id = j.new", (JOINED_REASON, *columns(joins, 3)))
        return inserted

    @staticmethod
    async def _insert_incidents(conn: Conn, incidents: list[IncidentRecord]) -> set[str]:
        """Insert what is new; returns the ids inserted (not: stored already, or the
        (rule, key) has an open incident)."""
        async with conn.cursor() as cur:
            await cur.execute(INCIDENTS_INSERT, columns(
                [(i.id, i.rule, i.key, i.status, number(i.opened), number(i.closed), i.events,
                  i.run_id, i.outcome) for i in incidents], 9))
            return {row[0] for row in await cur.fetchall()}

    # -- guards across replicas -------------------------------------------------------

    async def _admit(self, conn: Conn, runs: list[RunRecord], batch: Batch, inserted: set[str],
                     result: CommitResult) -> None:
        """Check each new run's limits against what every replica admitted (the scopes are
        locked: see ``write``), in order, counting those admitted before it in this batch;
        a refused run is not created, nor the incident it opened."""
        state, open_incidents = await _read_admissions(conn, runs, batch.limits)
        rows: list[tuple[Any, ...]] = []
        refused: list[RunRecord] = []
        for run in runs:
            limits = batch.limits[run.id]
            limit = state.refusal(run, limits, result)
            if limit is not None:
                result.refused[run.id] = limit
                refused.append(run)
                continue
            for scope in state.admit(run, limits,
                                     open_key=run.incident_id in open_incidents):
                rows.append((scope, run.id, run.key, number(run.created), run.incident_id))
        if rows:
            await conn.execute(ADMISSIONS_INSERT, columns(rows, 5))
        if not refused:
            return
        # nothing dangles: no decision points at a run or an incident never created; an
        # incident goes only when none of its runs in this batch was admitted
        kept = {r.incident_id for r in batch.runs
                if r.id not in result.refused and r.id not in result.skipped_runs}
        dropped = [(r.incident_id, r.id, refusal_reason(result.refused[r.id]))
                   for r in refused if r.incident_id in inserted and r.incident_id not in kept]
        if dropped:  # the incidents the refused runs opened are not created either
            incidents, run_ids, reasons = columns(dropped, 3)
            await conn.execute(
                "DELETE FROM incidents USING unnest(%b::text[], %b::text[]) AS d(id, run) "
                "WHERE incidents.id = d.id AND incidents.run_id = d.run", (incidents, run_ids))
            await conn.execute(
                "UPDATE decisions SET outcome='suppressed', reason=d.reason, incident_id=NULL, "
                "run_id=NULL FROM unnest(%b::text[], %b::text[]) AS d(id, reason) "
                "WHERE decisions.incident_id = d.id", (incidents, reasons))
        await conn.execute(
            "UPDATE decisions SET outcome='suppressed', reason=u.reason, run_id=NULL "
            "FROM unnest(%b::text[], %b::text[]) AS u(run, reason) "
            "WHERE decisions.run_id = u.run",
            columns([(r.id, refusal_reason(result.refused[r.id])) for r in refused], 2))


def _scopes(batch: Batch) -> set[str]:
    scopes = {b.scope for b in batch.breakers} | set(batch.breakers_closed)
    for run in batch.runs:
        scopes |= {lim.scope for lim in batch.limits.get(run.id, ())}
    return scopes


async def _read_admissions(conn: Conn, runs: list[RunRecord], limits: dict[str, list[Limit]]
                           ) -> tuple[Admissions, set[str]]:
    """What the limits' scopes hold (read once per batch, kept up to date in memory as
    the batch's runs are admitted: loopd.store.admission), and which of the runs'
    incidents are open (only those count a key in an ``open`` scope)."""
    wanted = Wanted.of(runs, limits, "postgres")
    state = Admissions()
    open_incidents: set[str] = set()
    async with conn.cursor() as cur:
        if wanted.window:
            await cur.execute(
                "SELECT a.scope, a.time FROM admissions a JOIN unnest(%b::text[], "
                "%b::float8[]) AS w(scope, since) ON a.scope = w.scope "
                "AND a.time > w.since", columns(list(wanted.window.items()), 2))
            for scope, t in await cur.fetchall():
                state.times[scope].append(float(t))
            for times in state.times.values():
                times.sort()
        if wanted.opened:
            await cur.execute(
                "SELECT DISTINCT a.scope, a.key FROM admissions a JOIN incidents i "
                "ON i.id = a.incident_id WHERE i.status = 'open' AND a.scope = ANY(%b::text[])",
                (sorted(wanted.opened),))
            for scope, key in await cur.fetchall():
                state.keys[scope].add(key)
            await cur.execute(
                "SELECT id FROM incidents WHERE status = 'open' AND id = ANY(%b::text[])",
                ([r.incident_id for r in runs if r.incident_id is not None],))
            open_incidents = {row[0] for row in await cur.fetchall()}
        if wanted.breaker:
            await cur.execute("SELECT scope, until FROM breakers "
                              "WHERE scope = ANY(%b::text[])", (sorted(wanted.breaker),))
            state.breakers = {s: float(u) for s, u in await cur.fetchall()}
    return state, open_incidents
