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
The DSN's password never appears in an error or a log line (``Scrubber``). The reads,
and the bounded, retried use of pooled connections, are in ``postgres_reads``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import psycopg_pool

from loopd import metrics
from loopd.errors import LeaseLost, StoreError
from loopd.store.base import (
    AuditRecord,
    Batch,
    CommandRecord,
    CommitResult,
    RunRecord,
    StepRecord,
)
from loopd.store.group import Writers
from loopd.store.postgres_batch import Answer, Conn, Group, Op, SaveRun, SaveStep, Statement
from loopd.store.postgres_batch import text as _text
from loopd.store.postgres_reads import REJECTED, PostgresReads, Scrubber, configure, describe
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
)
from loopd.store.sqlite import default_replica, pid_alive

Dsn = str | Callable[[], Awaitable[str]]
CHANNEL = "loopd"


class PostgresStore(PostgresReads):
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
        self._scrub = Scrubber()
        self._incarnation = uuid.uuid4().hex
        self._pool: psycopg_pool.AsyncConnectionPool[Conn] | None = None
        # the group commit (each write bounded by the timeout: a turn is never held for good)
        self._writers: Writers[Op, Answer] = Writers(self._write_all)
        self._held: dict[str, int] = {}  # run id -> the epoch this store holds it under
        self._changed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self.commits = 0  # group transactions committed (benchmarks, tests)
        # a write transaction idle this long is ended by the server (see _write_all): well
        # inside the lease, so a frozen replica's locks go before its runs are taken over
        self._idle_ms = int(1000 * max(1.0, min(lease / 3, timeout)))

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

    async def open(self) -> None:
        dsn = await self._resolve(self._dsn)
        self.origin, password = describe(dsn)
        self._scrub = Scrubber(password or "", dsn)
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
        except (psycopg.Error, TimeoutError, OSError, *REJECTED) as exc:
            raise self._classify(exc, "opening the store") from None
        pool: psycopg_pool.AsyncConnectionPool[Conn] = psycopg_pool.AsyncConnectionPool(
            dsn, min_size=self.pool_min, max_size=self.pool_max, kwargs=self._kwargs(),
            open=False, timeout=self.timeout, configure=configure,
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
                self._scrub = Scrubber(password or "", dsn, listen,
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
                alive = pid_alive(other_pid) if other_host == host else silent < self.lease
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
        # on a connection of its own, outside the group commit: a group waiting on a lock
        # (another replica frozen inside its transaction) must not cost this one its lease
        async def beat(conn: Conn) -> None:
            await conn.execute(
                f"UPDATE replicas SET heartbeat={DB_NOW} WHERE name=%s AND incarnation=%s",
                (self.replica, self._incarnation))
        await self._with("heartbeat", beat)

    # -- the group commit -------------------------------------------------------------

    async def _submit(self, op: Op) -> Answer:
        answer = await self._writers.submit(op)
        if isinstance(answer, LeaseLost):
            raise answer
        return answer

    async def _write(self, op: Op) -> None:
        await self._submit(op)

    async def _write_all(self, ops: list[tuple[Op, asyncio.Future[Answer]]]
                         ) -> StoreError | None:
        group = Group([op for op, _ in ops], self.replica, dict(self._held), self.origin)

        async def body(conn: Conn) -> None:
            # A replica frozen inside this transaction (SIGSTOP, a pause) would hold its
            # locks (the scopes of its limits, the event numbering) and stall every other
            # replica: the server ends a transaction idle for this long, releasing them.
            await conn.execute("SELECT set_config('idle_in_transaction_session_timeout', "
                               "%s, true)", (f"{self._idle_ms}ms",))
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
                         others_only: bool = False, exclude: frozenset[str] = frozenset()
                         ) -> dict[str, int]:
        # SKIP LOCKED on the top-level runs: one another replica is claiming (or saving a
        # step of) right now is left to it. A run's sub-workflow runs ("parent/task") go
        # with it, so a parent and its child are never split between two replicas.
        mine = "owner IS DISTINCT FROM %(me)s AND " if others_only else ""
        free = ("(owner IS NULL OR owner=%(me)s OR owner NOT IN (SELECT name FROM replicas "
                f"WHERE heartbeat >= {DB_NOW} - %(lease)s))")
        sql = (
            "WITH roots AS (SELECT id FROM runs WHERE status = ANY(%(statuses)s::text[]) "
            "AND position('/' in id) = 0 AND NOT (id = ANY(%(exclude)s::text[])) "
            f"AND {mine}{free} FOR UPDATE SKIP LOCKED) "
            "UPDATE runs SET owner=%(me)s, epoch=epoch+1 WHERE status = ANY(%(statuses)s::text[]) "
            f"AND split_part(id, '/', 1) IN (SELECT id FROM roots) AND {mine}{free} "
            "RETURNING id, epoch")
        rows = await self._all(sql, {
            "me": self.replica, "statuses": list(statuses), "exclude": sorted(exclude),
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

    async def close_incident(self, incident_id: str, closed: float, outcome: str) -> None:
        await self._write(Statement(
            "UPDATE incidents SET status='closed', closed=%s, outcome=%s WHERE id=%s",
            (closed, outcome, incident_id)))

    async def kv_put(self, namespace: str, key: str, value: Any) -> None:
        await self._write(Statement(KV_PUT, (time.time(), [namespace], [key], [_text(value)])))

    async def append_audit(self, record: AuditRecord) -> None:
        # through the group commit like every write: durable when this returns
        r = record
        await self._write(Statement(AUDIT_APPEND, (
            [r.time], [r.request], [r.who], [r.role], [r.action], [r.target],
            [_text(r.params)], [r.status], [r.outcome], [r.client])))
