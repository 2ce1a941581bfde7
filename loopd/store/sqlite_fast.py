"""The common engine batch written in one hop to SQLite's thread.

aiosqlite runs every statement in its own thread and hands the answer back through the
event loop: a batch of events, decisions and incidents took a dozen such round trips
(BEGIN, each ``executemany``, the savepoints, COMMIT), each a wake-up of the thread and
of the loop. The HTTP ingest path decides tens of events per batch, so those hops were
most of its latency; a Kafka backlog paid them per 2,000 events. Here the batch runs as
one function in that thread, on the same connection and transaction.

A whole group of writers comes here in one hop (``write_steps``) when it holds nothing
but plain batches, lease checks, fenced run writes and plain statements; the regular path
writes the same steps a hop each (``step``).

Only a *plain* batch comes here: no cross-replica limits, breakers or updates of stored
runs (those read the store and decide as they write; loopd.store.sqlite keeps them).
When the plain write meets what needs deciding (a decision already stored, an incident
another process opened), it rolls back to its savepoint and says so: the caller writes
the batch again the regular way, which finds out which records and why.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from loopd.store.base import Batch
from loopd.store.codec import dump
from loopd.store.sqlite_schema import INSERT_DECISION, RUN_MARKS, UPSERT_INCIDENT

INSERT_EVENT = "INSERT INTO events VALUES (?,?,?,?,?,?) ON CONFLICT (source, id) DO NOTHING"
INSERT_RUN = f"INSERT INTO runs VALUES ({RUN_MARKS}) ON CONFLICT (id) DO NOTHING"


def plain(batch: Batch) -> bool:
    """Whether ``batch`` can be written by ``write`` (see the module doc)."""
    return not (batch.limits or batch.breakers or batch.breakers_closed or batch.run_updates)


def write(conn: sqlite3.Connection, batch: Batch, runs: list[tuple[Any, ...]]) -> bool:
    """Write ``batch`` (``runs``: its runs' rows, made on the loop's thread) in SQLite's
    thread, inside the caller's transaction. False, with nothing written, when a decision
    was already stored or an incident conflicts."""
    conn.execute("SAVEPOINT plain")
    if not _records(conn, batch, runs):
        conn.execute("ROLLBACK TO plain")
        conn.execute("RELEASE plain")
        return False
    conn.execute("RELEASE plain")
    return True


def _records(conn: sqlite3.Connection, batch: Batch, runs: list[tuple[Any, ...]]) -> bool:
    if batch.events:
        conn.executemany(INSERT_EVENT, [(e.source, e.id, e.topic, e.key, e.time, dump(e.data))
                                        for e in batch.events])
    decisions = batch.decisions
    if decisions:
        cur = conn.executemany(INSERT_DECISION, [
            (d.source, d.event_id, d.rule, d.key, d.outcome, d.reason, d.time, d.incident_id,
             d.run_id) for d in decisions])
        if cur.rowcount != len(decisions):
            return False  # some were decided before: the regular path finds which
    incidents = batch.incidents
    if incidents:
        try:
            conn.executemany(UPSERT_INCIDENT, [
                (i.id, i.rule, i.key, i.status, i.opened, i.closed, i.events, i.run_id,
                 i.outcome) for i in incidents.values()])
        except sqlite3.IntegrityError:
            return False  # another process holds an open one for the same (rule, key)
        closed = [(i.id,) for i in incidents.values() if i.status != "open"]
        if closed:
            conn.executemany("UPDATE admissions SET open=0 WHERE incident_id=?", closed)
    if runs:
        conn.executemany(INSERT_RUN, runs)
    if batch.timers_set:
        conn.executemany("INSERT INTO timers VALUES (?,?,?) ON CONFLICT (rule, key) "
                         "DO UPDATE SET since=MIN(since, excluded.since)", batch.timers_set)
    if batch.timers_cleared:
        conn.executemany("DELETE FROM timers WHERE rule=? AND key=?", batch.timers_cleared)
    if batch.kv:
        now = time.time()
        conn.executemany("INSERT OR REPLACE INTO kv VALUES (?,?,?,?)", [
            (ns, k, dump(v), now) for (ns, k), v in batch.kv.items() if v is not None])
        gone = [slot for slot, v in batch.kv.items() if v is None]
        if gone:
            conn.executemany("DELETE FROM kv WHERE namespace=? AND key=?", gone)
    return True


# A group of writers (loopd.store.group) that holds only plain batches, lease checks, fenced
# writes of run state and plain statements is written in one hop as well. While runs act,
# the engine's batches share their groups with the runs' saves and checks, and the regular
# path took a hop for BEGIN, for each batch, each run of checks, each statement and COMMIT:
# the in-process benchmark at 1,000 rules (1,003 runs acting during its first 100,000
# events) went 43,511-48,507 -> 58,416-64,507 events/s, alternating in one sitting.
Step = tuple[str, Any, Any]
"""("batch", Batch, its runs' rows) | ("check", run ids, (replica, epochs)) |
("fenced", statement, parameters of each) | ("sql", statement, rows). The regular path
writes the same steps, a hop each (a batch that is not plain reads as it writes)."""


def write_steps(conn: sqlite3.Connection, steps: list[Step]) -> list[Any] | None:
    """Each step's answer (a batch True, the others ``step``'s), all in one transaction;
    None, with nothing written, when a batch met what only the regular path decides (see
    ``write``)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        answers: list[Any] = []
        for one in steps:
            if one[0] != "batch":
                answers.append(step(conn, one))
            elif _records(conn, one[1], one[2]):
                answers.append(True)
            else:
                conn.execute("ROLLBACK")
                return None
        conn.execute("COMMIT")
        return answers
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def step(conn: sqlite3.Connection, one: Step) -> Any:
    """A step that is not a batch, in the caller's transaction: checks, whether each run
    is this replica's under its epoch; fenced writes, whether each changed its row (all at
    once, else each again alone from before that write, so a run new to the store does
    not meet its own row, to find which); a statement's rows, how many."""
    kind, first, second = one
    if kind == "check":
        replica, epochs = second
        found: dict[str, int] = {}
        for start in range(0, len(first), 500):
            ids = first[start:start + 500]
            found.update(conn.execute(
                f"SELECT id, epoch FROM runs WHERE owner=? AND id IN "
                f"({','.join('?' * len(ids))})", (replica, *ids)).fetchall())
        return [found.get(i) == e for i, e in zip(first, epochs, strict=True)]
    if kind == "fenced":
        conn.execute("SAVEPOINT fenced")
        if conn.executemany(first, second).rowcount == len(second):
            changed = [True] * len(second)
        else:
            conn.execute("ROLLBACK TO fenced")
            changed = [bool(conn.execute(first, p).rowcount) for p in second]
        conn.execute("RELEASE fenced")
        return changed
    conn.executemany(first, second)
    return len(second)
