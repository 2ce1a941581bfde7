"""SQLite store (aiosqlite): the default, one file, WAL journal.

Writes are group-committed: every writer queues its statements and awaits
them; whoever holds the connection next writes everything queued in one
transaction (consecutive identical statements as one ``executemany``). A
thousand runs each saving a step cost a handful of commits, not a thousand,
and each writer still returns only once its write is durable.

``synchronous=NORMAL`` in WAL mode survives a killed process (kill -9), which
is what loopd's delivery guarantee needs; set ``LOOPD_SQLITE_SYNC=FULL`` to
survive power loss too, at a cost in throughput.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from loopd.errors import StoreError
from loopd.store.base import (
    Batch,
    DecisionRecord,
    EngineState,
    EventRecord,
    IncidentRecord,
    RunRecord,
    StepRecord,
)

SCHEMA_VERSION = 1

# One entry per schema version: the statements that bring version N-1 to N.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE events (source TEXT NOT NULL, id TEXT NOT NULL, topic TEXT NOT NULL,
               key TEXT, time REAL NOT NULL, data BLOB NOT NULL, PRIMARY KEY (source, id))""",
        """CREATE TABLE decisions (seq INTEGER PRIMARY KEY, source TEXT NOT NULL,
               event_id TEXT NOT NULL, rule TEXT NOT NULL, key TEXT, outcome TEXT NOT NULL,
               reason TEXT, time REAL NOT NULL, incident_id TEXT, run_id TEXT,
               UNIQUE (source, event_id, rule))""",
        "CREATE INDEX decisions_incident ON decisions (incident_id)",
        "CREATE INDEX decisions_run ON decisions (run_id)",
        "CREATE INDEX decisions_rule ON decisions (rule)",
        """CREATE TABLE incidents (id TEXT PRIMARY KEY, rule TEXT NOT NULL, key TEXT NOT NULL,
               status TEXT NOT NULL, opened REAL NOT NULL, closed REAL, events INTEGER NOT NULL,
               run_id TEXT, outcome TEXT)""",
        "CREATE INDEX incidents_open ON incidents (status, rule, key)",
        """CREATE TABLE runs (id TEXT PRIMARY KEY, incident_id TEXT, rule TEXT, key TEXT,
               kind TEXT NOT NULL, target TEXT NOT NULL, input BLOB, status TEXT NOT NULL,
               created REAL NOT NULL, started REAL, finished REAL, reason TEXT, ctx BLOB,
               outcome TEXT, event BLOB, progress BLOB)""",
        "CREATE INDEX runs_status ON runs (status)",
        "CREATE INDEX runs_rule_key ON runs (rule, key, created)",
        """CREATE TABLE steps (run_id TEXT NOT NULL, seq INTEGER NOT NULL, task TEXT NOT NULL,
               action TEXT, attempt INTEGER NOT NULL, status TEXT NOT NULL, started REAL NOT NULL,
               finished REAL, input BLOB, output BLOB, error TEXT, transition TEXT,
               PRIMARY KEY (run_id, seq))""",
        """CREATE TABLE timers (rule TEXT NOT NULL, key TEXT NOT NULL, since REAL NOT NULL,
               PRIMARY KEY (rule, key))""",
        """CREATE TABLE kv (namespace TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
               updated REAL NOT NULL, PRIMARY KEY (namespace, key))""",
    ],
}


def _dump(value: Any) -> bytes:
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # e.g. an integer beyond 64 bits from a template: orjson refuses it
        return json.dumps(value, default=str, skipkeys=True).encode()


def _load(blob: bytes | None) -> Any:
    return orjson.loads(blob) if blob else None


class SqliteStore:
    """The Store protocol on one SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        # One connection: a transaction spans several awaits, so nothing else
        # may run statements on it meanwhile.
        self._lock = asyncio.Lock()
        self._queue: list[tuple[Batch | tuple[str, tuple[Any, ...]], asyncio.Future[None]]] = []

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open", origin=str(self.path))
        return self._db

    async def open(self) -> None:
        try:
            if str(self.path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            sync = os.environ.get("LOOPD_SQLITE_SYNC", "NORMAL").upper()
            for pragma in ("journal_mode=WAL", f"synchronous={sync}", "foreign_keys=OFF",
                           "busy_timeout=5000"):
                await self.db.execute(f"PRAGMA {pragma}")
            await self._migrate()
        except BaseException as exc:
            # close what was opened: aiosqlite's thread would keep the process alive
            await self.close()
            if isinstance(exc, OSError | aiosqlite.Error):
                raise StoreError(f"cannot open store: {exc}", origin=str(self.path)) from None
            raise

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store schema version {version} is newer than this loopd ({SCHEMA_VERSION})",
                origin=str(self.path),
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await self.db.execute("BEGIN IMMEDIATE")
            for statement in MIGRATIONS[target]:
                await self.db.execute(statement)
            await self.db.execute(f"PRAGMA user_version={target}")
            await self.db.execute("COMMIT")

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def commit(self, batch: Batch) -> None:
        await self._submit(batch)

    async def _submit(self, op: Batch | tuple[str, tuple[Any, ...]]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((op, done))
        async with self._lock:
            if not done.done():  # nobody wrote it for us meanwhile: write all that waits
                ops, self._queue = self._queue, []
                # Shielded: a cancelled writer (a run being cancelled) must not leave the
                # transaction open, nor the other writers of its group without an answer.
                # The write ends by itself, so the shield's inner task needs no owner.
                await asyncio.shield(self._write_all(ops))
        await done

    async def _write_all(self, ops: list[tuple[Batch | tuple[str, tuple[Any, ...]],
                                         asyncio.Future[None]]]) -> None:
        db = self.db
        try:
            await db.execute("BEGIN")
            i = 0
            while i < len(ops):
                op = ops[i][0]
                if isinstance(op, Batch):
                    await self._batch(op)
                    i += 1
                    continue
                sql, rows = op[0], [op[1]]
                i += 1
                while i < len(ops) and not isinstance(ops[i][0], Batch) \
                        and ops[i][0][0] == sql:  # type: ignore[index]
                    rows.append(ops[i][0][1])  # type: ignore[index]
                    i += 1
                await db.executemany(sql, rows)
            await db.execute("COMMIT")
        except Exception as exc:
            # Whatever failed, never leave the transaction open (every later write would
            # fail) nor a waiter of this group without an answer (it would hang).
            if db.in_transaction:
                await db.execute("ROLLBACK")
            error = StoreError(f"write failed: {type(exc).__name__}: {exc}",
                               origin=str(self.path))
            for _, done in ops:
                if not done.done():
                    done.set_exception(error)
            return
        for _, done in ops:
            if not done.done():
                done.set_result(None)

    async def _batch(self, batch: Batch) -> None:
        db = self.db
        if batch.events:
            await db.executemany(
                "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?)",
                [(e.source, e.id, e.topic, e.key, e.time, _dump(e.data))
                 for e in batch.events],
            )
        if batch.decisions:
            await db.executemany(
                "INSERT OR IGNORE INTO decisions (source, event_id, rule, key, outcome, "
                "reason, time, incident_id, run_id) VALUES (?,?,?,?,?,?,?,?,?)",
                [(d.source, d.event_id, d.rule, d.key, d.outcome, d.reason, d.time,
                  d.incident_id, d.run_id) for d in batch.decisions],
            )
        if batch.incidents:
            await db.executemany(
                "INSERT OR REPLACE INTO incidents VALUES (?,?,?,?,?,?,?,?,?)",
                [(i.id, i.rule, i.key, i.status, i.opened, i.closed, i.events, i.run_id,
                  i.outcome) for i in batch.incidents.values()],
            )
        if batch.runs:
            await db.executemany(
                "INSERT OR IGNORE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [self._run_row(r) for r in batch.runs],
            )
        if batch.run_updates:
            await db.executemany(
                "INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [self._run_row(r) for r in batch.run_updates],
            )
        if batch.timers_set:
            await db.executemany("INSERT OR REPLACE INTO timers VALUES (?,?,?)",
                                 batch.timers_set)
        if batch.timers_cleared:
            await db.executemany("DELETE FROM timers WHERE rule=? AND key=?",
                                 batch.timers_cleared)
        if batch.kv:
            now = time.time()
            await db.executemany("INSERT OR REPLACE INTO kv VALUES (?,?,?,?)",
                                 [(ns, k, _dump(v), now) for (ns, k), v in batch.kv.items()])

    @staticmethod
    def _run_row(r: RunRecord) -> tuple[Any, ...]:
        return (r.id, r.incident_id, r.rule, r.key, r.kind, r.target, _dump(r.input), r.status,
                r.created, r.started, r.finished, r.reason, _dump(r.ctx), r.outcome,
                _dump(r.event), _dump(r.progress))

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        try:
            async with self._lock, self.db.execute(sql, tuple(params)) as cur:
                return list(await cur.fetchall())
        except aiosqlite.Error as exc:
            raise StoreError(f"read failed: {exc}", origin=str(self.path)) from None

    async def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        await self._submit((sql, params))

    async def load_state(self, *, since: float, recent: int) -> EngineState:
        incidents = [IncidentRecord(*row) for row in await self._all(
            "SELECT * FROM incidents WHERE status='open'")]
        timers = [(r, k, float(s)) for r, k, s in await self._all("SELECT * FROM timers")]
        starts = [(r, k, float(c)) for r, k, c in await self._all(
            "SELECT rule, key, created FROM runs WHERE created >= ? AND rule IS NOT NULL "
            "AND incident_id IS NOT NULL AND id NOT LIKE '%/%' ORDER BY created", (since,))]
        seen = [(s, i) for s, i in reversed(await self._all(
            "SELECT source, event_id FROM decisions ORDER BY seq DESC LIMIT ?", (recent,)))]
        return EngineState(incidents, timers, starts, seen)

    async def save_run(self, run: RunRecord) -> None:
        await self._write(
            "INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            self._run_row(run))

    async def save_step(self, step: StepRecord) -> None:
        await self._write(
            "INSERT OR REPLACE INTO steps VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (step.run_id, step.seq, step.task, step.action, step.attempt, step.status,
             step.started, step.finished, _dump(step.input), _dump(step.output), step.error,
             step.transition))

    async def close_incident(self, incident_id: str, closed: float, outcome: str) -> None:
        await self._write(
            "UPDATE incidents SET status='closed', closed=?, outcome=? WHERE id=?",
            (closed, outcome, incident_id))

    @staticmethod
    def _run(row: Any) -> RunRecord:
        (rid, inc, rule, key, kind, target, inp, status, created, started, finished, reason,
         ctx, outcome, event, progress) = row
        return RunRecord(rid, inc, rule, key, kind, target, _load(inp), status, created, started,
                         finished, reason, _load(ctx) or {}, outcome, _load(event),
                         _load(progress))

    async def get_run(self, run_id: str) -> RunRecord | None:
        rows = await self._all("SELECT * FROM runs WHERE id=?", (run_id,))
        return self._run(rows[0]) if rows else None

    async def list_runs(self, *, status: str | None = None, limit: int = 100) -> list[RunRecord]:
        where, params = ("WHERE status=?", [status]) if status else ("", [])
        rows = await self._all(
            f"SELECT * FROM runs {where} ORDER BY created DESC LIMIT ?", [*params, limit])
        return [self._run(r) for r in rows]

    async def runs_in_status(self, statuses: tuple[str, ...]) -> list[RunRecord]:
        marks = ",".join("?" * len(statuses))
        rows = await self._all(
            f"SELECT * FROM runs WHERE status IN ({marks}) ORDER BY created", statuses)
        return [self._run(r) for r in rows]

    async def steps(self, run_id: str) -> list[StepRecord]:
        rows = await self._all("SELECT * FROM steps WHERE run_id=? ORDER BY seq", (run_id,))
        return [StepRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], _load(r[8]),
                           _load(r[9]), r[10], r[11]) for r in rows]

    async def list_incidents(self, *, status: str | None = None,
                             limit: int = 100) -> list[IncidentRecord]:
        where, params = ("WHERE status=?", [status]) if status else ("", [])
        rows = await self._all(
            f"SELECT * FROM incidents {where} ORDER BY opened DESC LIMIT ?", [*params, limit])
        return [IncidentRecord(*r) for r in rows]

    async def decisions_for(self, *, run_id: str | None = None, incident_id: str | None = None,
                            limit: int = 1000) -> list[DecisionRecord]:
        if run_id is not None:
            where, param = "run_id=?", run_id
        else:
            where, param = "incident_id=?", incident_id or ""
        rows = await self._all(
            "SELECT source, event_id, rule, key, outcome, reason, time, incident_id, run_id "
            f"FROM decisions WHERE {where} ORDER BY seq LIMIT ?", (param, limit))
        return [DecisionRecord(*r) for r in rows]

    async def count_decisions(self, *, rule: str | None = None) -> int:
        sql, params = "SELECT COUNT(*) FROM decisions", ()
        if rule is not None:
            sql, params = sql + " WHERE rule=?", (rule,)  # type: ignore[assignment]
        rows = await self._all(sql, params)
        return int(rows[0][0])

    async def kv_get(self, namespace: str, key: str) -> Any:
        rows = await self._all("SELECT value FROM kv WHERE namespace=? AND key=?",
                               (namespace, key))
        return _load(rows[0][0]) if rows else None

    async def kv_put(self, namespace: str, key: str, value: Any) -> None:
        await self._write("INSERT OR REPLACE INTO kv VALUES (?,?,?,?)",
                          (namespace, key, _dump(value), time.time()))

    async def get_event(self, source: str, event_id: str) -> EventRecord | None:
        rows = await self._all("SELECT * FROM events WHERE source=? AND id=?", (source, event_id))
        if not rows:
            return None
        s, i, topic, key, t, data = rows[0]
        return EventRecord(s, i, topic, key, t, _load(data))
