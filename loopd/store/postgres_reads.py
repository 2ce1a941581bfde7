"""The PostgreSQL store's connections and its reads (``PostgresStore`` adds the writes).

Every read is one statement on a pooled connection (autocommit: one round trip), bounded
by the store's timeout and retried once on a fresh connection when the server dropped
the old one (a restart). Errors become ``StoreError`` (transient: the server is down or
busy) or ``StoreRejected`` (a value PostgreSQL can never hold), with the DSN's secrets
scrubbed from their text.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import orjson
import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_loads

from loopd.errors import StoreError, StoreRejected
from loopd.store.base import (
    DECISION_COLUMNS,
    LIVE_STATUSES,
    AuditQuery,
    AuditRecord,
    BreakerRecord,
    CommandRecord,
    DecisionQuery,
    DecisionRecord,
    EngineState,
    EventRecord,
    IncidentRecord,
    ReplicaRecord,
    RunRecord,
    StepRecord,
)
from loopd.store.postgres_batch import Conn
from loopd.store.postgres_schema import DB_NOW, SELECT_AUDIT, SELECT_RUN

T = TypeVar("T")
# Errors a retry of the same records can never fix: the culprit is found and rejected.
# (A ProgrammingError from the server, SQLSTATE class 42, is a missing table or privilege:
# the operator's to fix, so transient; one from psycopg itself is a value it cannot send.)
REJECTED = (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError,
            OverflowError, TypeError, ValueError, RecursionError)


class Scrubber:
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


class PostgresReads:
    """The pool, bounded and retried use of its connections, and every read."""

    replica: str
    timeout: float
    origin: str
    _scrub: Scrubber
    _pool: psycopg_pool.AsyncConnectionPool[Conn] | None

    @property
    def pool(self) -> psycopg_pool.AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise StoreError("store is not open", origin=self.origin)
        return self._pool


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
        if isinstance(exc, REJECTED) and not (
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
                if attempt >= 2 or committing or not dropped(exc) \
                        or isinstance(exc, psycopg_pool.PoolTimeout):
                    raise self._classify(exc, doing) from None
                with contextlib.suppress(psycopg.Error, psycopg_pool.PoolTimeout,
                                         TimeoutError):
                    async with asyncio.timeout(self.timeout):
                        await self.pool.check()  # drop every other stale connection too
            except (psycopg.Error, psycopg_pool.PoolTimeout, TimeoutError, OSError,
                    *REJECTED) as exc:
                raise self._classify(exc, doing) from None

    async def _all(self, sql: str, params: Any = ()) -> list[Any]:
        async def body(conn: Conn) -> list[Any]:
            async with conn.cursor() as cur:
                await cur.execute(sql, params)
                return await cur.fetchall()
        return await self._with("read", body)


    async def replicas(self) -> list[ReplicaRecord]:
        """Every registered replica; ``heartbeat`` on this host's clock (the database's
        instant moved by the difference of the two clocks), so ``time.time() -
        heartbeat`` is the silence the database measured, whatever this host's clock."""
        rows = await self._all(f"SELECT name, host, pid, heartbeat - {DB_NOW} + %s "
                               "FROM replicas ORDER BY name", (time.time(),))
        return [ReplicaRecord(n, h, int(p), float(b)) for n, h, p, b in rows]


    async def breakers(self) -> list[BreakerRecord]:
        rows = await self._all("SELECT scope, opened, until, reason FROM breakers "
                               "WHERE until > %s ORDER BY scope", (time.time(),))
        return [BreakerRecord(s, float(o), float(u), r) for s, o, u, r in rows]


    async def commands(self, after: int) -> list[CommandRecord]:
        rows = await self._all(
            "SELECT c.run_id, c.kind, c.by, c.reason, c.time, c.seq FROM commands c "
            "JOIN runs r ON r.id = c.run_id WHERE c.seq > %s AND r.owner = %s "
            f"AND r.status IN {LIVE_STATUSES} ORDER BY c.seq", (after, self.replica))
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

    async def list_runs(self, *, status: str | None = None, rule: str | None = None,
                        limit: int = 100) -> list[RunRecord]:
        terms = [(c, v) for c, v in (("status", status), ("rule", rule)) if v]
        where = ("WHERE " + " AND ".join(f"{c}=%s" for c, _ in terms)) if terms else ""
        rows = await self._all(f"{SELECT_RUN} {where} ORDER BY created DESC LIMIT %s",
                               [*(v for _, v in terms), limit])
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

    async def get_incident(self, incident_id: str) -> IncidentRecord | None:
        rows = await self._all(
            "SELECT id, rule, key, status, opened, closed, events, run_id, outcome FROM "
            "incidents WHERE id=%s", (incident_id,))
        return IncidentRecord(*rows[0]) if rows else None

    async def decisions_for(self, *, run_id: str | None = None, incident_id: str | None = None,
                            limit: int = 1000) -> list[DecisionRecord]:
        if run_id is not None:
            where, param = "run_id=%s", run_id
        else:
            where, param = "incident_id=%s", incident_id or ""
        rows = await self._all(
            f"SELECT {DECISION_COLUMNS} FROM decisions WHERE {where} ORDER BY seq LIMIT %s",
            (param, limit))
        return [DecisionRecord(*r) for r in rows]

    async def decisions(self, query: DecisionQuery) -> list[DecisionRecord]:
        where, params = query.where("%s")
        rows = await self._all(f"SELECT {DECISION_COLUMNS} FROM decisions{where} "
                               "ORDER BY seq DESC LIMIT %s", (*params, query.limit))
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

    async def kv_scan(self, namespace: str, prefix: str = "") -> list[tuple[str, Any]]:
        # left(), not LIKE: a key may hold % and _
        rows = await self._all(
            "SELECT key, value FROM kv WHERE namespace=%s AND left(key, %s)=%s "
            "ORDER BY key COLLATE \"C\"", (namespace, len(prefix), prefix))
        return [(str(k), v) for k, v in rows]


    async def get_event(self, source: str, event_id: str) -> EventRecord | None:
        rows = await self._all("SELECT source, id, topic, key, time, data FROM events "
                               "WHERE source=%s AND id=%s", (source, event_id))
        return EventRecord(*rows[0]) if rows else None


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


async def configure(conn: Conn) -> None:
    """Each pooled connection reads jsonb with orjson (client-side only: no session
    state on the server)."""
    set_json_loads(orjson.loads, conn)


def dropped(exc: psycopg.OperationalError) -> bool:
    """Whether the connection itself was lost (the server restarted, the network
    dropped), as opposed to a statement failing on a working connection."""
    return isinstance(exc, psycopg.errors.AdminShutdown | psycopg.errors.CannotConnectNow) \
        or getattr(exc, "sqlstate", None) is None
