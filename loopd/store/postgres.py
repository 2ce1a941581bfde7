"""PostgreSQL store (psycopg 3, async, with its pool): the store several replicas share.

Writes are group-committed like the SQLite store's: every writer queues its operation
and awaits it; whoever takes the writer's turn next writes everything queued in one
transaction, one statement per kind of row (``loopd.store.postgres_batch``), so a
thousand runs each saving a step cost a few commits, and each writer returns once its
write is durable.

It works behind PgBouncer in transaction mode: nothing relies on session state across
transactions, statements are never prepared (``prepare_threshold=None``), and the
LISTEN connection that wakes ``wait_changed`` is a dedicated one outside the pool
(``listen_dsn`` may point it past the bouncer, straight at the server).

Time: heartbeats and lease expiry use the database's clock alone
(``clock_timestamp()``), never a host's: replicas on hosts whose clocks differ still
agree on whose lease ran out. The times inside records (a run's ``created``, a
breaker's ``until``) are the engine's, as with every store.

Bounded: connecting, waiting for a pooled connection and every statement give up after
``timeout`` seconds (a statement past it is cancelled on the server), so a server that
is down raises ``StoreError``; the pool reconnects by itself when the server is back.
The DSN's password never appears in an error or a log line (``scrub``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import orjson
import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_loads

from loopd import metrics
from loopd.errors import LeaseLost, StoreError, StoreRejected
from loopd.store.base import (
    AuditQuery,
    AuditRecord,
    Batch,
    BreakerRecord,
    CommandRecord,
    CommitResult,
    DecisionRecord,
    EngineState,
    EventRecord,
    IncidentRecord,
    ReplicaRecord,
    RunRecord,
    StepRecord,
)
from loopd.store.postgres_batch import Answer, Conn, Group, Op, SaveRun, SaveStep, Statement
from loopd.store.postgres_batch import text as _text
from loopd.store.postgres_schema import (
    AUDIT_APPEND,
    COMMANDS_LOCK,
    CREATE_VERSION_TABLE,
    DB_NOW,
    KV_PUT,
    LOCK_SPACE,
    MIGRATION_LOCK,
    MIGRATIONS,
    REPLICA_LOCK,
    SCHEMA_VERSION,
    SELECT_AUDIT,
    SELECT_RUN,
)
from loopd.store.sqlite import default_replica

T = TypeVar("T")
Dsn = str | Callable[[], Awaitable[str]]
CHANNEL = "loopd"
# Errors a retry of the same records can never fix: the culprit is found and rejected.
# (A ProgrammingError from the server, SQLSTATE class 42, is a missing table or privilege:
# the operator's to fix, so transient; one from psycopg itself is a value it cannot send.)
_REJECTED = (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError,
             OverflowError, TypeError, ValueError, RecursionError)


class _Scrubber:
    """Takes the DSN's secrets out of text: psycopg's errors may quote the connection
    string (a malformed one), and no log line or error may show a password."""

    def __init__(self, *secrets: str) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def describe(dsn: str) -> tuple[str, str | None]:
    """``(where, password)`` of a DSN: ``postgres user@host:port/db`` names the server
    without its secrets. StoreError (showing nothing of it) when it does not parse."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        raise StoreError("the store DSN is not a valid PostgreSQL connection string; "
                         "the value is not shown", origin="postgres") from None
    user = params.get("user")
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    where = f"postgres {f'{user}@' if user else ''}{host}:{port}/{params.get('dbname', '')}"
    password = params.get("password")
    return where, str(password) if password is not None else None


class PostgresStore:
    """The Store protocol on PostgreSQL (see the module docstring)."""

    def __init__(self, dsn: Dsn, *, replica: str | None = None, lease: float = 15.0,
                 pool_min: int = 2, pool_max: int = 10, timeout: float = 10.0,
                 listen_dsn: Dsn | None = None) -> None:
        self._dsn = dsn
        self._listen_dsn = listen_dsn
        self.replica = replica or default_replica()
        self.lease = lease  # a replica silent for this long has lost its runs
        self.pool_min, self.pool_max = pool_min, max(pool_min, pool_max)
        self.timeout = timeout
        self.origin = "postgres"
        self._scrub = _Scrubber()
        self._incarnation = uuid.uuid4().hex
        self._pool: psycopg_pool.AsyncConnectionPool[Conn] | None = None
        self._lock = asyncio.Lock()  # the writer's turn (see _submit)
        self._queue: list[tuple[Op, asyncio.Future[Answer]]] = []
        self._held: dict[str, int] = {}  # run id -> the epoch this store holds it under
        self._changed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self.commits = 0  # group transactions committed (benchmarks, tests)

    # -- connections ----------------------------------------------------------------------

    async def _resolve(self, dsn: Dsn) -> str:
        return dsn if isinstance(dsn, str) else await dsn()

    def _kwargs(self) -> dict[str, Any]:
        # libpq's own bound on connecting (whole seconds, at least 2) and TCP keepalives,
        # so a connection to a host that vanished is noticed
        return {"prepare_threshold": None, "autocommit": True,
                "connect_timeout": max(2, int(self.timeout)), "keepalives": 1,
                "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                "application_name": f"loopd {self.replica}"[:63]}

    @property
    def pool(self) -> psycopg_pool.AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise StoreError("store is not open", origin=self.origin)
        return self._pool

    async def open(self) -> None:
        dsn = await self._resolve(self._dsn)
        self.origin, password = describe(dsn)
        self._scrub = _Scrubber(password or "", dsn)
        # one connection of its own first: its error says why (a refused password, no
        # server), and it migrates and registers before the pool fills
        try:
            async with asyncio.timeout(self.timeout):
                first = await psycopg.AsyncConnection.connect(dsn, **self._kwargs())
        except (psycopg.Error, TimeoutError, OSError) as exc:
            raise StoreError(f"cannot open store: {self._what(exc)}", origin=self.origin) \
                from None
        try:
            async with first:
                await self._migrate(first)
                await self._register(first)
        except (psycopg.Error, TimeoutError, OSError, *_REJECTED) as exc:
            raise self._classify(exc, "opening the store") from None
        pool: psycopg_pool.AsyncConnectionPool[Conn] = psycopg_pool.AsyncConnectionPool(
            dsn, min_size=self.pool_min, max_size=self.pool_max, kwargs=self._kwargs(),
            open=False, timeout=self.timeout, configure=_configure,
            name=f"loopd-{self.replica}")
        try:
            await pool.open(wait=True, timeout=self.timeout)
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
            await pool.close(timeout=1)
            raise StoreError(f"cannot open store: {self._what(exc)}", origin=self.origin) \
                from None
        self._pool = pool
        try:
            listen = await self._resolve(self._listen_dsn) if self._listen_dsn else dsn
            if listen != dsn:
                self._scrub = _Scrubber(password or "", dsn, listen,
                                        describe(listen)[1] or "")
            self._listener = asyncio.create_task(self._listen(listen),
                                                 name=f"store-listen-{self.replica}")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=self.timeout)

    def _what(self, exc: BaseException) -> str:
        """An error's text for a message: its class and its scrubbed words."""
        if isinstance(exc, psycopg_pool.PoolTimeout):
            return f"no connection to the server within {self.timeout:g}s"
        if isinstance(exc, TimeoutError):
            return f"no answer from the server within {self.timeout:g}s"
        words = " ".join(str(exc).split()) or type(exc).__name__
        return self._scrub(f"{type(exc).__name__}: {words}")

    def _classify(self, exc: BaseException, doing: str) -> StoreError:
        if isinstance(exc, StoreError):
            return exc
        message = f"{doing} failed: {self._what(exc)}"
        if isinstance(exc, _REJECTED) and not (
                isinstance(exc, psycopg.ProgrammingError) and exc.sqlstate is not None):
            return StoreRejected(message, origin=self.origin)
        return StoreError(message, origin=self.origin)

    async def _with(self, doing: str, body: Callable[[Conn], Coroutine[Any, Any, T]], *,
                    transaction: bool = False) -> T:
        """Run ``body`` on a pooled connection (in a transaction when asked), bounded by
        the timeout. Retried when nothing of it can have been written: a transaction the
        server rolled back for a deadlock (a few times), or a connection the server dropped
        meanwhile (a restart: once, on a fresh one, unless a COMMIT was sent, whose outcome
        is then unknown)."""
        attempt = 0
        while True:
            attempt += 1
            committing = False
            try:
                async with asyncio.timeout(self.timeout), self.pool.connection() as conn:
                    if not transaction:
                        return await body(conn)
                    async with conn.transaction():
                        value = await body(conn)
                        committing = True
                    return value
            except psycopg.OperationalError as exc:
                # SQLSTATE class 40 (a deadlock, a serialization failure): rolled back
                if (exc.sqlstate or "").startswith("40") and attempt < 4:
                    await asyncio.sleep(0.01 * attempt)  # the other transaction goes first
                    continue
                if attempt >= 2 or committing or not _dropped(exc) \
                        or isinstance(exc, psycopg_pool.PoolTimeout):
                    raise self._classify(exc, doing) from None
                with contextlib.suppress(psycopg.Error, psycopg_pool.PoolTimeout,
                                         TimeoutError):
                    async with asyncio.timeout(self.timeout):
                        await self.pool.check()  # drop every other stale connection too
            except (psycopg.Error, psycopg_pool.PoolTimeout, TimeoutError, OSError,
                    *_REJECTED) as exc:
                raise self._classify(exc, doing) from None

    async def _all(self, sql: str, params: Any = ()) -> list[Any]:
        async def body(conn: Conn) -> list[Any]:
            async with conn.cursor() as cur:
                await cur.execute(sql, params)
                return await cur.fetchall()
        return await self._with("read", body)

    # -- schema and registration -----------------------------------------------------

    async def _migrate(self, conn: Conn) -> None:
        """Bring the schema to this version, once: under an advisory lock held until the
        transaction ends, two replicas opening a new database together never both
        migrate; a schema newer than this loopd is refused."""
        async with asyncio.timeout(self.timeout * 6), conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                               (LOCK_SPACE, MIGRATION_LOCK))
            await conn.execute(CREATE_VERSION_TABLE)
            async with conn.cursor() as cur:
                await cur.execute("SELECT max(version) FROM schema_version")
                row = await cur.fetchone()
            version = int(row[0]) if row and row[0] is not None else 0
            if version > SCHEMA_VERSION:
                raise StoreError(f"store schema version {version} is newer than this loopd "
                                 f"({SCHEMA_VERSION})", origin=self.origin)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    await conn.execute(statement)
            if version < SCHEMA_VERSION:
                await conn.execute("DELETE FROM schema_version")
                await conn.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))

    async def _register(self, conn: Conn) -> None:
        """Take this replica's name; refuse it while another live process holds it (two
        processes with one name would both think they own the same runs). Live: on this
        host, its process exists; on another, its heartbeat is within the lease."""
        host, pid = socket.gethostname(), os.getpid()
        async with asyncio.timeout(self.timeout), conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                               (LOCK_SPACE, REPLICA_LOCK))
            async with conn.cursor() as cur:
                await cur.execute(f"SELECT incarnation, host, pid, {DB_NOW} - heartbeat "
                                  "FROM replicas WHERE name=%s", (self.replica,))
                row = await cur.fetchone()
            if row is not None and row[0] != self._incarnation:
                other_host, other_pid, silent = row[1], int(row[2]), float(row[3])
                alive = _pid_alive(other_pid) if other_host == host else silent < self.lease
                if alive and (other_host, other_pid) != (host, pid):
                    raise StoreError(
                        f"replica name {self.replica!r} is in use by a live loopd (pid "
                        f"{other_pid} on {other_host}); give each process its own name "
                        "with LOOPD_REPLICA", origin=self.origin)
            await conn.execute(
                "INSERT INTO replicas (name, incarnation, host, pid, heartbeat) VALUES "
                f"(%s, %s, %s, %s, {DB_NOW}) ON CONFLICT (name) DO UPDATE SET "
                "incarnation=excluded.incarnation, host=excluded.host, pid=excluded.pid, "
                "heartbeat=excluded.heartbeat", (self.replica, self._incarnation, host, pid))

    async def heartbeat(self) -> None:
        await self._write(Statement(
            f"UPDATE replicas SET heartbeat={DB_NOW} WHERE name=%s AND incarnation=%s",
            (self.replica, self._incarnation)))

    async def replicas(self) -> list[ReplicaRecord]:
        """Every registered replica; ``heartbeat`` on this host's clock (the database's
        instant moved by the difference of the two clocks), so ``time.time() -
        heartbeat`` is the silence the database measured, whatever this host's clock."""
        rows = await self._all(f"SELECT name, host, pid, heartbeat - {DB_NOW} + %s "
                               "FROM replicas ORDER BY name", (time.time(),))
        return [ReplicaRecord(n, h, int(p), float(b)) for n, h, p, b in rows]

    # -- the group commit -------------------------------------------------------------

    async def _submit(self, op: Op) -> Answer:
        done: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.append((op, done))
        async with self._lock:
            if not done.done():  # nobody wrote it for us meanwhile: write all that waits
                ops, self._queue = self._queue, []
                # Shielded: a cancelled writer (a run being cancelled) must not leave the
                # other writers of its group without an answer. The write ends by itself
                # (bounded by the timeout), so the shield's inner task needs no owner.
                await asyncio.shield(self._write_group(ops))
        answer = await done
        if isinstance(answer, LeaseLost):
            raise answer
        return answer

    async def _write(self, op: Op) -> None:
        await self._submit(op)

    async def _write_group(self, ops: list[tuple[Op, asyncio.Future[Answer]]]) -> None:
        """One transaction for the whole group; when it fails and the group has several
        writers, each writes alone, so one rejected record fails only its own writer."""
        error = await self._write_all(ops)
        if error is None:
            return
        if len(ops) == 1 or not isinstance(error, StoreRejected):
            for _, done in ops:
                if not done.done():
                    done.set_exception(error)
            return
        for op in ops:
            alone = await self._write_all([op])
            if alone is not None and not op[1].done():
                op[1].set_exception(alone)

    async def _write_all(self, ops: list[tuple[Op, asyncio.Future[Answer]]]
                         ) -> StoreError | None:
        group = Group([op for op, _ in ops], self.replica, dict(self._held), self.origin)

        async def body(conn: Conn) -> None:
            await group.write(conn)
            if group.notify:
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._incarnation))
        try:
            await self._with("write", body, transaction=True)
        except StoreError as exc:
            return exc
        self.commits += 1
        self._held.update(group.taken)
        for run_id in group.lost:  # unless a claim meanwhile gave it a newer epoch
            if self._held.get(run_id) == group.held.get(run_id):
                self._held.pop(run_id, None)
        for (_, done), answer in zip(ops, group.answers, strict=True):
            if not done.done():
                done.set_result(answer)
        return None

    async def commit(self, batch: Batch) -> CommitResult:
        result = await self._submit(batch)
        return result if isinstance(result, CommitResult) else CommitResult()

    # -- runs under a lease -------------------------------------------------------------

    async def claim_runs(self, statuses: tuple[str, ...], *, lease: float | None = None,
                         others_only: bool = False) -> dict[str, int]:
        # SKIP LOCKED: a run another replica is claiming (or saving a step of) right now
        # is left to it; the outer UPDATE re-checks the owner of every row it takes
        mine = "owner IS DISTINCT FROM %(me)s AND " if others_only else ""
        sql = (
            "UPDATE runs SET owner=%(me)s, epoch=epoch+1 WHERE id IN (SELECT id FROM runs "
            f"WHERE status = ANY(%(statuses)s::text[]) AND {mine}(owner IS NULL "
            "OR owner=%(me)s OR owner NOT IN (SELECT name FROM replicas "
            f"WHERE heartbeat >= {DB_NOW} - %(lease)s)) FOR UPDATE SKIP LOCKED) "
            "RETURNING id, epoch")
        rows = await self._all(sql, {
            "me": self.replica, "statuses": list(statuses),
            "lease": float(self.lease if lease is None else lease)})
        claimed = {rid: int(epoch) for rid, epoch in rows}
        self._held.update(claimed)
        return claimed

    async def holds(self, run_id: str) -> bool:
        epoch = self._held.get(run_id)
        if epoch is None:
            return False
        rows = await self._all("SELECT 1 FROM runs WHERE id=%s AND owner=%s AND epoch=%s",
                               (run_id, self.replica, epoch))
        return bool(rows)

    def release(self, run_id: str) -> None:
        self._held.pop(run_id, None)

    async def save_run(self, run: RunRecord) -> None:
        run.owner = self.replica  # whoever writes a run executes it (it claimed it)
        run.version += 1
        held = self._held.get(run.id)
        await self._write(SaveRun(run))
        epoch = self._held.get(run.id, held)
        if epoch is not None:
            run.epoch = epoch

    async def save_step(self, step: StepRecord) -> None:
        await self._write(SaveStep(step))

    # -- breakers, commands, events ---------------------------------------------------

    async def breakers(self) -> list[BreakerRecord]:
        rows = await self._all("SELECT scope, opened, until, reason FROM breakers "
                               "WHERE until > %s ORDER BY scope", (time.time(),))
        return [BreakerRecord(s, float(o), float(u), r) for s, o, u, r in rows]

    async def close_breaker(self, scope: str) -> bool:
        now = time.time()

        async def body(conn: Conn) -> bool:
            async with conn.cursor() as cur:
                await cur.execute("DELETE FROM breakers WHERE scope=%s RETURNING until",
                                  (scope,))
                return any(float(u) > now for (u,) in await cur.fetchall())
        return await self._with("closing a breaker", body, transaction=True)

    async def send_command(self, command: CommandRecord) -> None:
        async def body(conn: Conn) -> None:
            # numbers in commit order (see postgres_batch on events): an owner reading
            # after its last number never skips a command that commits later
            await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                               (LOCK_SPACE, COMMANDS_LOCK))
            async with conn.cursor() as cur:
                await cur.execute(
                    "INSERT INTO commands (run_id, kind, by, reason, time) "
                    "VALUES (%s, %s, %s, %s, %s) RETURNING seq",
                    (command.run_id, command.kind, command.by, command.reason, command.time))
                row = await cur.fetchone()
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._incarnation))
            if row is not None:
                command.seq = int(row[0])
        await self._with("sending a command", body, transaction=True)

    async def commands(self, after: int) -> list[CommandRecord]:
        rows = await self._all(
            "SELECT c.run_id, c.kind, c.by, c.reason, c.time, c.seq FROM commands c "
            "JOIN runs r ON r.id = c.run_id WHERE c.seq > %s AND r.owner = %s "
            "ORDER BY c.seq", (after, self.replica))
        return [CommandRecord(r, k, b, why, float(t), int(s)) for r, k, b, why, t, s in rows]

    async def events_since(self, after: int, *, limit: int = 1000
                           ) -> list[tuple[int, EventRecord]]:
        if limit <= 0:
            return []
        rows = await self._all(
            "SELECT pos, source, id, topic, key, time, data FROM events WHERE pos > %s "
            "ORDER BY pos LIMIT %s", (after, limit))
        return [(int(p), EventRecord(s, i, t, k, float(tm), d)) for p, s, i, t, k, tm, d in rows]

    async def last_event(self) -> int:
        rows = await self._all("SELECT max(pos) FROM events")
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    async def wait_changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        self._changed.clear()

    async def _listen(self, dsn: str) -> None:
        """LISTEN on a connection of its own; every notification from another replica
        wakes ``wait_changed``. A dropped connection is made again (and wakes the waiters:
        what it missed meanwhile is for their polling to find)."""
        delay, first = 0.1, True
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    conn = await psycopg.AsyncConnection.connect(dsn, **self._kwargs())
            except (psycopg.Error, TimeoutError, OSError) as exc:
                metrics.log.warning("store listener cannot connect; retrying",
                                    store=self.origin, error=self._what(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.1
                    if not first:  # what happened while it was away: for polling to find
                        self._changed.set()
                    first = False
                    async for note in conn.notifies():
                        if note.payload != self._incarnation:
                            self._changed.set()
            except psycopg.Error as exc:
                metrics.log.warning("store listener lost its connection; reconnecting",
                                    store=self.origin, error=self._what(exc))
            self._changed.set()
            await asyncio.sleep(delay)

    # -- the rest of the Store protocol -------------------------------------------------

    async def load_state(self, *, since: float, recent: int) -> EngineState:
        incidents = [IncidentRecord(*row) for row in await self._all(
            "SELECT id, rule, key, status, opened, closed, events, run_id, outcome "
            "FROM incidents WHERE status='open'")]
        timers = [(r, k, float(s)) for r, k, s in await self._all(
            "SELECT rule, key, since FROM timers")]
        starts = [(r, k, float(c)) for r, k, c in await self._all(
            "SELECT rule, key, created FROM runs WHERE created >= %s AND rule IS NOT NULL "
            "AND incident_id IS NOT NULL AND strpos(id, '/') = 0 ORDER BY created",
            (since,))]
        seen = [(s, i) for s, i in reversed(await self._all(
            "SELECT source, event_id FROM decisions ORDER BY seq DESC LIMIT %s", (recent,)))]
        return EngineState(incidents, timers, starts, seen)

    async def close_incident(self, incident_id: str, closed: float, outcome: str) -> None:
        await self._write(Statement(
            "UPDATE incidents SET status='closed', closed=%s, outcome=%s WHERE id=%s",
            (closed, outcome, incident_id)))

    @staticmethod
    def _run(row: Any) -> RunRecord:
        (rid, inc, rule, key, kind, target, inp, status, created, started, finished, reason,
         ctx, outcome, event, progress, owner, epoch, version) = row
        return RunRecord(rid, inc, rule, key, kind, target, inp, status, created, started,
                         finished, reason, ctx or {}, outcome, event, progress, owner,
                         int(epoch), int(version))

    async def get_run(self, run_id: str) -> RunRecord | None:
        rows = await self._all(f"{SELECT_RUN} WHERE id=%s", (run_id,))
        return self._run(rows[0]) if rows else None

    async def list_runs(self, *, status: str | None = None, limit: int = 100) -> list[RunRecord]:
        where, params = ("WHERE status=%s", [status]) if status else ("", [])
        rows = await self._all(f"{SELECT_RUN} {where} ORDER BY created DESC LIMIT %s",
                               [*params, limit])
        return [self._run(r) for r in rows]

    async def runs_in_status(self, statuses: tuple[str, ...]) -> list[RunRecord]:
        rows = await self._all(f"{SELECT_RUN} WHERE status = ANY(%b::text[]) ORDER BY created",
                               (list(statuses),))
        return [self._run(r) for r in rows]

    async def steps(self, run_id: str) -> list[StepRecord]:
        rows = await self._all(
            "SELECT run_id, seq, task, action, attempt, status, started, finished, input, "
            "output, error, transition FROM steps WHERE run_id=%s ORDER BY seq", (run_id,))
        return [StepRecord(*r) for r in rows]

    async def list_incidents(self, *, status: str | None = None,
                             limit: int = 100) -> list[IncidentRecord]:
        where, params = ("WHERE status=%s", [status]) if status else ("", [])
        rows = await self._all(
            "SELECT id, rule, key, status, opened, closed, events, run_id, outcome FROM "
            f"incidents {where} ORDER BY opened DESC LIMIT %s", [*params, limit])
        return [IncidentRecord(*r) for r in rows]

    async def decisions_for(self, *, run_id: str | None = None, incident_id: str | None = None,
                            limit: int = 1000) -> list[DecisionRecord]:
        if run_id is not None:
            where, param = "run_id=%s", run_id
        else:
            where, param = "incident_id=%s", incident_id or ""
        rows = await self._all(
            "SELECT source, event_id, rule, key, outcome, reason, time, incident_id, run_id "
            f"FROM decisions WHERE {where} ORDER BY seq LIMIT %s", (param, limit))
        return [DecisionRecord(*r) for r in rows]

    async def count_decisions(self, *, rule: str | None = None) -> int:
        if rule is None:
            rows = await self._all("SELECT count(*) FROM decisions")
        else:
            rows = await self._all("SELECT count(*) FROM decisions WHERE rule=%s", (rule,))
        return int(rows[0][0])

    async def kv_get(self, namespace: str, key: str) -> Any:
        rows = await self._all("SELECT value FROM kv WHERE namespace=%s AND key=%s",
                               (namespace, key))
        return rows[0][0] if rows else None

    async def kv_put(self, namespace: str, key: str, value: Any) -> None:
        await self._write(Statement(KV_PUT, (time.time(), [namespace], [key], [_text(value)])))

    async def get_event(self, source: str, event_id: str) -> EventRecord | None:
        rows = await self._all("SELECT source, id, topic, key, time, data FROM events "
                               "WHERE source=%s AND id=%s", (source, event_id))
        return EventRecord(*rows[0]) if rows else None

    async def append_audit(self, record: AuditRecord) -> None:
        # through the group commit like every write: durable when this returns
        r = record
        await self._write(Statement(AUDIT_APPEND, (
            [r.time], [r.request], [r.who], [r.role], [r.action], [r.target],
            [_text(r.params)], [r.status], [r.outcome], [r.client])))

    async def audit(self, query: AuditQuery) -> list[AuditRecord]:
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("action", query.action), ("who", query.who),
                              ("target", query.target)):
            if value is not None:
                where.append(f"{column}=%s")
                params.append(value)
        if query.since is not None:
            where.append("time>=%s")
            params.append(query.since)
        sql = SELECT_AUDIT + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = await self._all(f"{sql} ORDER BY seq DESC LIMIT %s", [*params, query.limit])
        return [AuditRecord(t, req, who, role, action, target, p, status, outcome, client,
                            int(seq))
                for t, req, who, role, action, target, p, status, outcome, client, seq
                in rows]


async def _configure(conn: Conn) -> None:
    """Each pooled connection reads jsonb with orjson (client-side only: no session
    state on the server)."""
    set_json_loads(orjson.loads, conn)


def _dropped(exc: psycopg.OperationalError) -> bool:
    """Whether the connection itself was lost (the server restarted, the network
    dropped), as opposed to a statement failing on a working connection."""
    return isinstance(exc, psycopg.errors.AdminShutdown | psycopg.errors.CannotConnectNow) \
        or getattr(exc, "sqlstate", None) is None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
