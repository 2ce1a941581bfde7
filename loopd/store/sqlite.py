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
import contextlib
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from loopd.errors import LeaseLost, StoreError, StoreRejected
from loopd.store import sqlite_fast as fast
from loopd.store.admission import Admissions, Wanted
from loopd.store.base import (
    DECISION_COLUMNS,
    LIVE_STATUSES,
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
from loopd.store.codec import dump as _dump
from loopd.store.codec import load as _load
from loopd.store.group import Writers
from loopd.store.sqlite_schema import (
    APPEND_AUDIT,
    INSERT_DECISION,
    MIGRATIONS,
    RUN_MARKS,
    SAVE_RUN,
    SAVE_STEP,
    SCHEMA_VERSION,
    SELECT_AUDIT,
    UPDATE_RUN,
    UPSERT_INCIDENT,
)


@dataclass(frozen=True, slots=True)
class _Fenced:
    """A write of run state: executed alone, and refused (``LeaseLost``) when it changed
    nothing because the run is no longer this replica's under the epoch it holds."""

    sql: str
    params: tuple[Any, ...]
    run_id: str


@dataclass(frozen=True, slots=True)
class _Check:
    """A lease check (``holds``), read inside the group's transaction: checks between
    writes cost no transaction of their own, nor split the writers' group."""

    run_id: str
    epoch: int


Op = Batch | _Fenced | _Check | tuple[str, tuple[Any, ...]]
# Errors a retry of the same records can never fix: the culprit is found and rejected.
_REJECTED = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError,
             sqlite3.ProgrammingError, OverflowError, TypeError, ValueError, RecursionError)


def _classify(exc: BaseException, origin: str) -> StoreError:
    message = f"write failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, _REJECTED):
        return StoreRejected(message, origin=origin)
    return StoreError(message, origin=origin)


def _incident_row(i: IncidentRecord) -> tuple[Any, ...]:
    return (i.id, i.rule, i.key, i.status, i.opened, i.closed, i.events, i.run_id, i.outcome)


def _marks(values: list[str]) -> str:
    return ",".join("?" * len(values))


def default_replica() -> str:
    """This replica's name: ``LOOPD_REPLICA``, else the host name (stable across restarts,
    like a StatefulSet pod's)."""
    return os.environ.get("LOOPD_REPLICA") or socket.gethostname() or "loopd"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs under ``pid``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SqliteStore:
    """The Store protocol on one SQLite file."""

    def __init__(self, path: Path | str, *, replica: str | None = None,
                 lease: float = 15.0) -> None:
        self.path = Path(path)
        self.replica = replica or default_replica()
        self.lease = lease  # a replica silent for this long has lost its runs
        self._incarnation = uuid.uuid4().hex
        self._db: aiosqlite.Connection | None = None
        # One connection: a transaction spans several awaits, so nothing else
        # may run statements on it meanwhile.
        self._writers: Writers[Op, CommitResult | None] = Writers(self._write_all)
        # run id -> the epoch this process holds the run under (created, claimed, inserted)
        self._held: dict[str, int] = {}
        self._alone = True  # no other replica wrote since this store opened (see _shared)
        self._opened_at = time.time()

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
            # busy_timeout first: another process opening the same file at the same moment
            # holds the lock briefly (journal mode, migrations) and must be waited for
            for attempt in range(10):
                try:
                    for pragma in ("busy_timeout=5000", "journal_mode=WAL",
                                   f"synchronous={sync}", "foreign_keys=OFF"):
                        await self.db.execute(f"PRAGMA {pragma}")
                    await self._migrate()
                    break
                except sqlite3.OperationalError as exc:
                    # several processes creating one new file: switching it to WAL can
                    # fail at once with "locked" (no busy wait there); the next try sees WAL
                    if "locked" not in str(exc) or attempt == 9:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))
            await self._register()
        except BaseException as exc:
            # close what was opened: aiosqlite's thread would keep the process alive
            await self.close()
            if isinstance(exc, OSError | aiosqlite.Error):
                raise StoreError(f"cannot open store: {exc}", origin=str(self.path)) from None
            raise

    async def _migrate(self) -> None:
        # The version is read inside the write transaction: two processes opening a new (or
        # old) file together must not both apply the same migration.
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            async with self.db.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store schema version {version} is newer than this loopd "
                    f"({SCHEMA_VERSION})", origin=str(self.path))
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    await self.db.execute(statement)
                await self.db.execute(f"PRAGMA user_version={target}")
            await self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(aiosqlite.Error):  # the error that got us here counts
                await self.db.execute("ROLLBACK")
            raise

    async def _register(self) -> None:
        """Take this replica's name; refuse it while another live process holds it (two
        processes with one name would both think they own the same runs)."""
        host, pid, now = socket.gethostname(), os.getpid(), time.time()
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            async with self.db.execute("SELECT incarnation, host, pid, heartbeat FROM replicas "
                                       "WHERE name=?", (self.replica,)) as cur:
                row = await cur.fetchone()
            if row is not None and row[0] != self._incarnation:
                other_host, other_pid, beat = row[1], int(row[2]), float(row[3])
                alive = pid_alive(other_pid) if other_host == host else \
                    now - beat < self.lease
                if alive and (other_host, other_pid) != (host, pid):
                    raise StoreError(
                        f"replica name {self.replica!r} is in use by a live loopd (pid "
                        f"{other_pid} on {other_host}); give each process its own name "
                        "with LOOPD_REPLICA", origin=str(self.path))
            await self.db.execute(
                "INSERT OR REPLACE INTO replicas VALUES (?,?,?,?,?)",
                (self.replica, self._incarnation, host, pid, now))
            await self.db.execute("COMMIT")
            self._opened_at = now
        except BaseException:
            with contextlib.suppress(aiosqlite.Error):  # the error that got us here counts
                await self.db.execute("ROLLBACK")
            raise

    async def heartbeat(self) -> None:
        await self._write("UPDATE replicas SET heartbeat=? WHERE name=? AND incarnation=?",
                          (time.time(), self.replica, self._incarnation))

    async def claim_runs(self, statuses: tuple[str, ...], *, lease: float | None = None,
                         others_only: bool = False, exclude: frozenset[str] = frozenset()
                         ) -> dict[str, int]:
        marks = ",".join("?" * len(statuses))
        stale = time.time() - (self.lease if lease is None else lease)
        own = "" if others_only else "OR owner=? "
        skip = ",".join("?" * len(exclude))
        params = (self.replica, *statuses, *(() if others_only else (self.replica,)),
                  self.replica, stale, *sorted(exclude))
        async with self._writers.lock:
            db = self.db
            try:
                await db.execute("BEGIN IMMEDIATE")
                async with db.execute(
                        f"UPDATE runs SET owner=?, epoch=epoch+1 WHERE status IN ({marks}) AND ("
                        f"owner IS NULL {own}OR (owner<>? AND owner NOT IN (SELECT name FROM "
                        "replicas WHERE heartbeat >= ?))) AND substr(id, 1, instr(id || '/', "
                        f"'/') - 1) NOT IN ({skip}) RETURNING id, epoch", params) as cur:
                    claimed = {row[0]: int(row[1]) for row in await cur.fetchall()}
                await db.execute("COMMIT")
            except aiosqlite.Error as exc:
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise StoreError(f"claiming runs failed: {exc}", origin=str(self.path)) from None
        self._held.update(claimed)
        return claimed

    async def holds(self, run_id: str) -> bool:
        """Read from the file; the checks of runs acting at once are read together, in
        one query (like the group commit), so a thousand actions cost a few reads."""
        epoch = self._held.get(run_id)
        if epoch is None:
            return False
        return await self._submit(_Check(run_id, epoch)) is not None

    def release(self, run_id: str) -> None:
        self._held.pop(run_id, None)

    async def replicas(self) -> list[ReplicaRecord]:
        return [ReplicaRecord(n, h, int(p), float(b)) for n, h, p, b in await self._all(
            "SELECT name, host, pid, heartbeat FROM replicas ORDER BY name")]

    async def breakers(self) -> list[BreakerRecord]:
        return [BreakerRecord(*row) for row in await self._all(
            "SELECT scope, opened, until, reason FROM breakers WHERE until>? ORDER BY scope",
            (time.time(),))]

    async def close_breaker(self, scope: str) -> bool:
        open_ = await self._all("SELECT 1 FROM breakers WHERE scope=? AND until>?",
                                (scope, time.time()))
        await self._write("DELETE FROM breakers WHERE scope=?", (scope,))
        return bool(open_)

    async def send_command(self, command: CommandRecord) -> None:
        await self._write("INSERT INTO commands (run_id, kind, by, reason, time) "
                          "VALUES (?,?,?,?,?)", (command.run_id, command.kind, command.by,
                                                 command.reason, command.time))

    async def commands(self, after: int) -> list[CommandRecord]:
        rows = await self._all(
            "SELECT c.run_id, c.kind, c.by, c.reason, c.time, c.seq FROM commands c JOIN runs r "
            f"ON r.id=c.run_id WHERE c.seq>? AND r.owner=? AND r.status IN {LIVE_STATUSES} "
            "ORDER BY c.seq", (after, self.replica))
        return [CommandRecord(*row) for row in rows]

    async def events_since(self, after: int, *, limit: int = 1000
                           ) -> list[tuple[int, EventRecord]]:
        rows = await self._all("SELECT rowid, * FROM events WHERE rowid>? ORDER BY rowid "
                               "LIMIT ?", (after, limit))
        return [(int(pos), EventRecord(s, i, topic, key, t, _load(data)))
                for pos, s, i, topic, key, t, data in rows]

    async def last_event(self) -> int:
        rows = await self._all("SELECT MAX(rowid) FROM events")
        return int(rows[0][0] or 0)

    async def wait_changed(self, timeout: float) -> None:
        await asyncio.sleep(timeout)  # one file: nothing to listen to, polling is the truth

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def commit(self, batch: Batch) -> CommitResult:
        result = await self._submit(batch)
        return result if isinstance(result, CommitResult) else CommitResult()

    async def _submit(self, op: Op) -> CommitResult | None:
        return await self._writers.submit(op)

    async def _write_all(self, ops: list[tuple[Op, asyncio.Future[CommitResult | None]]]
                         ) -> StoreError | None:
        try:
            db = self.db  # a store closed under its writers fails them, never hangs them
        except StoreError as exc:
            return exc
        steps = self._steps(ops)
        try:
            answers: list[Any] | None = None
            if all(kind != "batch" or fast.plain(batch) for kind, batch, _ in steps):
                # the common case: the whole group in one hop (sqlite_fast.write_steps)
                answers = await db._execute(  # type: ignore[no-untyped-call]
                    fast.write_steps, db._conn,
                    [("batch", b, self._owned_rows(b)) if kind == "batch" else (kind, b, x)
                     for kind, b, x in steps])
            if answers is None:  # a batch that is not plain, or one that met a duplicate
                answers = await self._regular(db, steps)
            results = self._answers(ops, steps, answers)
        except Exception as exc:
            # Whatever failed, never leave the transaction open (every later write would
            # fail) nor a waiter of this group without an answer (it would hang).
            try:
                if db.in_transaction:
                    await db.execute("ROLLBACK")
            except (aiosqlite.Error, ValueError):  # the connection went away meanwhile
                pass
            return _classify(exc, str(self.path))
        for (_, done), result in zip(ops, results, strict=True):
            if done.done():
                continue
            if isinstance(result, LeaseLost):
                done.set_exception(result)
            else:
                done.set_result(result)
        return None

    def _steps(self, ops: list[tuple[Op, asyncio.Future[CommitResult | None]]]
               ) -> list[fast.Step]:
        """The group as sqlite_fast steps: each batch one, and consecutive checks,
        fenced writes of one statement and plain statements of one statement one each (a
        batch's runs' rows come in only when the whole group is written in one hop)."""
        steps: list[fast.Step] = []
        for op, _ in ops:
            last = steps[-1] if steps else None
            if isinstance(op, Batch):
                steps.append(("batch", op, None))
            elif isinstance(op, _Check):
                if last is not None and last[0] == "check":
                    last[1].append(op.run_id)
                    last[2][1].append(op.epoch)
                else:
                    steps.append(("check", [op.run_id], (self.replica, [op.epoch])))
            elif isinstance(op, _Fenced):
                if last is not None and last[0] == "fenced" and last[1] == op.sql:
                    last[2].append(op.params)
                else:
                    steps.append(("fenced", op.sql, [op.params]))
            elif last is not None and last[0] == "sql" and last[1] == op[0]:
                last[2].append(op[1])
            else:
                steps.append(("sql", op[0], [op[1]]))
        return steps

    async def _regular(self, db: aiosqlite.Connection, steps: list[fast.Step]) -> list[Any]:
        """The steps' answers, a hop each: a batch that is not plain reads and decides as
        it writes (``_batch``), the others are ``sqlite_fast.step``."""
        # IMMEDIATE: take the write lock up front, so a second process on the same file
        # waits (busy_timeout) instead of failing half-way through the transaction.
        await db.execute("BEGIN IMMEDIATE")
        answers: list[Any] = []
        for one in steps:
            if one[0] == "batch":
                answers.append(await self._batch(one[1]))
            else:
                answers.append(await db._execute(  # type: ignore[no-untyped-call]
                    fast.step, db._conn, one))
        await db.execute("COMMIT")
        return answers

    def _answers(self, ops: list[tuple[Op, asyncio.Future[CommitResult | None]]],
                 steps: list[fast.Step], answers: list[Any]
                 ) -> list[CommitResult | LeaseLost | None]:
        """Each writer's result from its step's answer: a batch its CommitResult (True:
        written in one hop, its runs now held); a check a result object when the run is
        still held, None when not (``holds`` tells them apart by ``is None``); a fenced
        write None, or LeaseLost when it changed nothing; a statement None."""
        results: list[CommitResult | LeaseLost | None] = []
        writers = iter(op for op, _ in ops)
        for (kind, first, _), answer in zip(steps, answers, strict=True):
            if kind == "batch":
                next(writers)
                if answer is True:
                    self._held.update((r.id, r.epoch) for r in first.runs)
                    answer = CommitResult()
                results.append(answer)
            elif kind == "check":
                for held in answer:
                    next(writers)
                    results.append(CommitResult() if held else None)
            elif kind == "fenced":
                for changed in answer:
                    op = next(writers)
                    assert isinstance(op, _Fenced)
                    results.append(None if changed else self._lost(op.run_id))
            else:
                for _ in range(answer):
                    next(writers)
                    results.append(None)
        return results

    def _lost(self, run_id: str) -> LeaseLost:
        self._held.pop(run_id, None)
        return LeaseLost(f"run {run_id} is no longer this replica's ({self.replica}): another "
                         "replica took it over; nothing was written", origin=str(self.path))

    def _owned_rows(self, batch: Batch) -> list[tuple[Any, ...]]:
        """The rows of ``batch``'s runs, this replica's (whoever writes a run holds it)."""
        for run in batch.runs:
            run.owner = self.replica
        return [self._run_row(r) for r in batch.runs]

    async def _plain(self, batch: Batch) -> CommitResult | None:
        """``batch`` written in one hop to SQLite's thread (loopd.store.sqlite_fast), in
        the group's transaction; None when it met something the regular path decides
        (nothing was written)."""
        # aiosqlite's own queue to its thread, with the sqlite3 connection it runs on: the
        # public API offers statements only, one hop each
        db = self.db
        done = await db._execute(  # type: ignore[no-untyped-call]
            fast.write, db._conn, batch, self._owned_rows(batch))
        if not done:
            return None
        self._held.update((r.id, r.epoch) for r in batch.runs)
        return CommitResult()

    async def _batch(self, batch: Batch) -> CommitResult:
        if fast.plain(batch):
            plain = await self._plain(batch)
            if plain is not None:
                return plain
        db = self.db
        result = CommitResult()
        if batch.events:
            await db.executemany(
                "INSERT INTO events VALUES (?,?,?,?,?,?) ON CONFLICT (source, id) DO NOTHING",
                [(e.source, e.id, e.topic, e.key, e.time, _dump(e.data))
                 for e in batch.events],
            )
        if batch.decisions:
            await self._decisions(batch.decisions, result)
        incidents = batch.not_duplicated(result)
        existing: set[str] = set()
        shared = bool(batch.limits) and await self._shared()
        if shared:  # which incidents the limited runs' own are new (see _limits)
            ids = {r.incident_id for r in batch.runs if r.id in batch.limits and r.incident_id}
            marks = ",".join("?" * len(ids))
            async with db.execute(f"SELECT id FROM incidents WHERE id IN ({marks})",
                                  tuple(ids)) as cur:
                existing = {row[0] for row in await cur.fetchall()}
        if incidents:
            await self._incidents(list(incidents.values()), batch, result)
            closed = [(i.id,) for i in incidents.values() if i.status != "open"]
            if closed:
                await db.executemany("UPDATE admissions SET open=0 WHERE incident_id=?", closed)
        if batch.breakers_closed:
            await db.executemany("DELETE FROM breakers WHERE scope=?",
                                 [(scope,) for scope in batch.breakers_closed])
        for breaker in batch.breakers:
            cur = await db.execute(
                "INSERT INTO breakers VALUES (?,?,?,?) ON CONFLICT (scope) DO UPDATE SET "
                "opened=excluded.opened, until=excluded.until, reason=excluded.reason "
                "WHERE breakers.until <= excluded.opened",
                (breaker.scope, breaker.opened, breaker.until, breaker.reason))
            if cur.rowcount:
                result.breakers_opened.add(breaker.scope)
        runs = batch.runs
        if result.skipped_runs:
            runs = [r for r in runs if r.id not in result.skipped_runs]
        if batch.limits:
            runs = await self._limits(runs, batch, existing, result, shared=shared)
        if runs:
            for run in runs:
                run.owner = self.replica
            await db.executemany(
                f"INSERT INTO runs VALUES ({RUN_MARKS}) ON CONFLICT (id) DO NOTHING",
                [self._run_row(r) for r in runs])
            self._held.update((r.id, r.epoch) for r in runs)
        for run in batch.run_updates:
            run.owner = self.replica
            async with db.execute(UPDATE_RUN, self._run_row(run)) as cur:
                row = await cur.fetchone()
            run.epoch = int(row[0]) if row is not None else run.epoch
            self._held[run.id] = run.epoch
        if batch.timers_set:
            # the earliest start wins: two replicas that both saw the condition start to
            # hold (webhooks spread over them) keep the first one's instant
            await db.executemany("INSERT INTO timers VALUES (?,?,?) ON CONFLICT (rule, key) "
                                 "DO UPDATE SET since=MIN(since, excluded.since)",
                                 batch.timers_set)
        if batch.timers_cleared:
            await db.executemany("DELETE FROM timers WHERE rule=? AND key=?",
                                 batch.timers_cleared)
        if batch.kv:
            now = time.time()
            await db.executemany("INSERT OR REPLACE INTO kv VALUES (?,?,?,?)", [
                (ns, k, _dump(v), now) for (ns, k), v in batch.kv.items() if v is not None])
            gone = [slot for slot, v in batch.kv.items() if v is None]
            if gone:
                await db.executemany("DELETE FROM kv WHERE namespace=? AND key=?", gone)
        return result

    async def _shared(self) -> bool:
        """Whether another replica has been alive since this store opened (its heartbeat is
        newer than the lease before that: a live replica beats within it). Until one has,
        this process's engine saw every run there is (its memory was rebuilt from the file
        at start), so its guards already decided exactly what the limits would: they are
        counted, not read again."""
        if not self._alone:
            return True
        async with self.db.execute("SELECT 1 FROM replicas WHERE name<>? AND heartbeat>=? "
                                   "LIMIT 1", (self.replica, self._opened_at - self.lease)
                                   ) as cur:
            self._alone = await cur.fetchone() is None
        return not self._alone

    async def _limits(self, runs: list[RunRecord], batch: Batch, existing: set[str],
                      result: CommitResult, *, shared: bool = True) -> list[RunRecord]:
        """Check each new run's limits against what every replica admitted (one writer at a
        time: BEGIN IMMEDIATE serializes the processes on the file); returns the runs
        admitted, counted in their scopes. A refused run is not created, nor the incident it
        opened when no other run of it was admitted; its decisions become ``suppressed``
        with the limit's reason."""
        db = self.db
        # alone on the file: only the escalation's "opens" can refuse (see _shared)
        wanted = Wanted.of(runs, batch.limits, str(self.path))
        state = await self._admissions(wanted) if shared else Admissions()
        admitted, rows = [], []
        refusals: list[tuple[RunRecord, Limit]] = []
        for run in runs:
            limits = batch.limits.get(run.id)
            if not limits:
                admitted.append(run)
                continue
            refused = state.refusal(run, limits, result)
            if refused is not None:
                refusals.append((run, refused))
                continue
            admitted.append(run)
            rows += [(run.id, scope, run.key, run.created, run.incident_id)
                     for scope in state.admit(run, limits)]
        if rows:
            await db.executemany("INSERT INTO admissions VALUES (?,?,?,?,?,1)", rows)
        kept = {r.incident_id for r in admitted}
        for run, refused in refusals:
            result.refused[run.id] = refused
            result.skipped_runs.add(run.id)
            reason = refusal_reason(refused)
            inc = run.incident_id
            if inc is not None and inc not in existing and inc not in kept:
                # the incident it opened goes too (no run of it was admitted)
                await db.execute("DELETE FROM incidents WHERE id=?", (inc,))
                await db.execute(
                    "UPDATE decisions SET outcome='suppressed', reason=?, incident_id=NULL, "
                    "run_id=NULL WHERE incident_id=?", (reason, inc))
            else:
                await db.execute("UPDATE decisions SET outcome='suppressed', reason=?, "
                                 "run_id=NULL WHERE run_id=?", (reason, run.id))
        return admitted

    async def _admissions(self, wanted: Wanted) -> Admissions:
        """What the scopes of the batch's limits hold: three reads for the whole batch."""
        state = Admissions()
        if wanted.window:
            scopes = sorted(wanted.window)
            async with self.db.execute(
                    f"SELECT scope, at FROM admissions WHERE scope IN ({_marks(scopes)}) "
                    "AND at>? ORDER BY at", (*scopes, min(wanted.window.values()))) as cur:
                for scope, at in await cur.fetchall():
                    state.times[scope].append(float(at))
        if wanted.opened:
            scopes = sorted(wanted.opened)
            async with self.db.execute(
                    "SELECT DISTINCT scope, key FROM admissions WHERE open=1 AND scope IN "
                    f"({_marks(scopes)})", scopes) as cur:
                for scope, key in await cur.fetchall():
                    state.keys[scope].add(key)
        if wanted.breaker:
            scopes = sorted(wanted.breaker)
            async with self.db.execute(
                    f"SELECT scope, until FROM breakers WHERE scope IN ({_marks(scopes)})",
                    scopes) as cur:
                state.breakers = {s: float(u) for s, u in await cur.fetchall()}
        return state

    async def _decisions(self, decisions: list[DecisionRecord], result: CommitResult) -> None:
        """Insert the decisions; the ones already stored (by this process or another) are
        the result's ``duplicates``. One statement for the batch; only a batch that meets
        a duplicate pays a statement per decision, to find out which."""
        db = self.db
        rows = [(d.source, d.event_id, d.rule, d.key, d.outcome, d.reason, d.time,
                 d.incident_id, d.run_id) for d in decisions]
        await db.execute("SAVEPOINT decisions")
        cur = await db.executemany(INSERT_DECISION, rows)
        if cur.rowcount == len(rows):
            await db.execute("RELEASE decisions")
            return
        await db.execute("ROLLBACK TO decisions")
        for d, row in zip(decisions, rows, strict=True):
            cur = await db.execute(INSERT_DECISION, row)
            if cur.rowcount == 0:
                result.duplicates.add((d.source, d.event_id, d.rule))
        await db.execute("RELEASE decisions")

    async def _incidents(self, incidents: list[IncidentRecord], batch: Batch,
                         result: CommitResult) -> None:
        """Upsert the incidents. An incident new to the store that meets an open one for the
        same (rule, key) (another process opened it) is not created: its decisions join the
        open one, and its runs are not created."""
        db = self.db
        rows = [_incident_row(i) for i in incidents]
        await db.execute("SAVEPOINT incidents")
        try:
            await db.executemany(UPSERT_INCIDENT, rows)
            await db.execute("RELEASE incidents")
            return
        except sqlite3.IntegrityError:
            await db.execute("ROLLBACK TO incidents")
        for inc, row in zip(incidents, rows, strict=True):
            try:
                await db.execute(UPSERT_INCIDENT, row)
                continue
            except sqlite3.IntegrityError as exc:
                refused = exc
            async with db.execute(
                    "SELECT * FROM incidents WHERE rule=? AND key=? AND status='open'",
                    (inc.rule, inc.key)) as cur:
                found = await cur.fetchone()
            if found is None:
                raise StoreRejected(f"write failed: incident {inc.id}: {refused}",
                                    origin=str(self.path))
            held = IncidentRecord(*found)
            result.conflicts[inc.id] = held
            lost = {r.id for r in batch.runs if r.incident_id == inc.id}
            result.skipped_runs |= lost
            await db.execute(
                "UPDATE decisions SET outcome='joined', reason=?, incident_id=?, run_id=? "
                "WHERE incident_id=? AND outcome IN ('run_created','queued','restarted')",
                ("incident already open (decided by another loopd)", held.id, held.run_id,
                 inc.id))
            await db.execute("UPDATE decisions SET incident_id=? WHERE incident_id=?",
                             (held.id, inc.id))

    @staticmethod
    def _run_row(r: RunRecord) -> tuple[Any, ...]:
        return (r.id, r.incident_id, r.rule, r.key, r.kind, r.target, _dump(r.input), r.status,
                r.created, r.started, r.finished, r.reason, _dump(r.ctx), r.outcome,
                _dump(r.event), _dump(r.progress), r.owner, r.epoch, r.version)

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        try:
            async with self._writers.lock, self.db.execute(sql, tuple(params)) as cur:
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
        held = self._held.get(run.id)
        if held is None:  # not held: only a run new to the store may be written (inserted)
            held = -1
            self._held[run.id] = run.epoch
        else:
            run.epoch = held
        run.owner = self.replica  # whoever writes a run executes it (it holds it)
        run.version += 1
        try:
            await self._submit(_Fenced(SAVE_RUN, (*self._run_row(run), self.replica, held),
                                       run.id))
        except (LeaseLost, asyncio.CancelledError):
            # cancelled, the write goes on (shielded, in turn): a new run is stored and
            # stays held (forgetting it here refused every later save of it)
            raise
        except BaseException:
            if held == -1:
                self._held.pop(run.id, None)
            raise

    async def save_step(self, step: StepRecord) -> None:
        held = self._held.get(step.run_id, -1)
        await self._submit(_Fenced(SAVE_STEP, (
            step.run_id, step.seq, step.task, step.action, step.attempt, step.status,
            step.started, step.finished, _dump(step.input), _dump(step.output), step.error,
            step.transition, step.run_id, self.replica, held), step.run_id))

    async def close_incident(self, incident_id: str, closed: float, outcome: str) -> None:
        await self._write(
            "UPDATE incidents SET status='closed', closed=?, outcome=? WHERE id=?",
            (closed, outcome, incident_id))
        await self._write("UPDATE admissions SET open=0 WHERE incident_id=?", (incident_id,))

    @staticmethod
    def _run(row: Any) -> RunRecord:
        (rid, inc, rule, key, kind, target, inp, status, created, started, finished, reason,
         ctx, outcome, event, progress, owner, epoch, version) = row
        return RunRecord(rid, inc, rule, key, kind, target, _load(inp), status, created, started,
                         finished, reason, _load(ctx) or {}, outcome, _load(event),
                         _load(progress), owner, epoch, version)

    async def get_run(self, run_id: str) -> RunRecord | None:
        rows = await self._all("SELECT * FROM runs WHERE id=?", (run_id,))
        return self._run(rows[0]) if rows else None

    async def list_runs(self, *, status: str | None = None, rule: str | None = None,
                        limit: int = 100) -> list[RunRecord]:
        terms = [(c, v) for c, v in (("status", status), ("rule", rule)) if v]
        where = ("WHERE " + " AND ".join(f"{c}=?" for c, _ in terms)) if terms else ""
        rows = await self._all(f"SELECT * FROM runs {where} ORDER BY created DESC LIMIT ?",
                               [*(v for _, v in terms), limit])
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

    async def get_incident(self, incident_id: str) -> IncidentRecord | None:
        rows = await self._all("SELECT * FROM incidents WHERE id=?", (incident_id,))
        return IncidentRecord(*rows[0]) if rows else None

    async def decisions_for(self, *, run_id: str | None = None, incident_id: str | None = None,
                            limit: int = 1000) -> list[DecisionRecord]:
        if run_id is not None:
            where, param = "run_id=?", run_id
        else:
            where, param = "incident_id=?", incident_id or ""
        rows = await self._all(
            f"SELECT {DECISION_COLUMNS} FROM decisions WHERE {where} ORDER BY seq LIMIT ?",
            (param, limit))
        return [DecisionRecord(*r) for r in rows]

    async def decisions(self, query: DecisionQuery) -> list[DecisionRecord]:
        where, params = query.where("?")
        rows = await self._all(f"SELECT {DECISION_COLUMNS} FROM decisions{where} "
                               "ORDER BY seq DESC LIMIT ?", (*params, query.limit))
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

    async def kv_scan(self, namespace: str, prefix: str = "") -> list[tuple[str, Any]]:
        # substr, not LIKE: a key may hold % and _
        rows = await self._all(
            "SELECT key, value FROM kv WHERE namespace=? AND substr(key, 1, ?)=? ORDER BY key",
            (namespace, len(prefix), prefix))
        return [(str(k), _load(v)) for k, v in rows]

    async def get_event(self, source: str, event_id: str) -> EventRecord | None:
        rows = await self._all("SELECT * FROM events WHERE source=? AND id=?", (source, event_id))
        if not rows:
            return None
        s, i, topic, key, t, data = rows[0]
        return EventRecord(s, i, topic, key, t, _load(data))

    async def append_audit(self, record: AuditRecord) -> None:
        # through the group commit like every write: durable when this returns
        await self._write(APPEND_AUDIT, (
            record.time, record.request, record.who, record.role, record.action,
            record.target, _dump(record.params), record.status, record.outcome,
            record.client))

    async def audit(self, query: AuditQuery) -> list[AuditRecord]:
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("action", query.action), ("who", query.who),
                              ("target", query.target)):
            if value is not None:
                where.append(f"{column}=?")
                params.append(value)
        if query.since is not None:
            where.append("time>=?")
            params.append(query.since)
        sql = SELECT_AUDIT + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = await self._all(f"{sql} ORDER BY seq DESC LIMIT ?", [*params, query.limit])
        return [AuditRecord(t, req, who, role, action, target, _load(p), status, outcome,
                            client, seq)
                for t, req, who, role, action, target, p, status, outcome, client, seq
                in rows]
