"""The store is the arbiter: exactly-once holds across engines on one store, and a record the
store refuses is found, rejected and acknowledged instead of wedging ingestion."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from pathlib import Path
from typing import Any, cast

from loopd.decide.engine import Engine
from loopd.errors import StoreError
from loopd.events import Delivery
from loopd.store.base import Batch, CommitResult, DecisionRecord, IncidentRecord, RunRecord, Store
from loopd.store.sqlite import SqliteStore
from tests.servers import wait_until
from tests.unit.conftest import RulesFrom
from tests.unit.test_engine import SIMPLE, db, decisions, ev, running

__all__ = ["db"]  # the fixture, shared with test_engine


def _count(db: Path, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute(sql).fetchone()[0])


async def test_two_engines_on_one_store_decide_an_event_once(
    db: Path, rules_from: RulesFrom,
) -> None:
    """The same event fed to two engines on one store makes one decision, incident and run."""
    rules = rules_from(SIMPLE)
    async with running(db, rules) as a, running(db, rules) as b:
        await a.feed(ev("e1", value=1))
        await b.feed(ev("e1", value=1))
        assert len(a.runs) + len(b.runs) == 1
    assert decisions(db) == [("e1", "restart", "run_created")]
    assert _count(db, "SELECT COUNT(*) FROM runs") == 1
    assert _count(db, "SELECT COUNT(*) FROM incidents WHERE status='open'") == 1


async def test_two_engines_open_one_incident_per_rule_and_key(
    db: Path, rules_from: RulesFrom,
) -> None:
    """Two engines deciding different events for one (rule, key) leave one open incident and
    one run: the second decision joins the incident the store already holds."""
    rules = rules_from(SIMPLE)
    async with running(db, rules) as a, running(db, rules) as b:
        await a.feed(ev("e1", value=1))
        await b.feed(ev("e2", value=2))
        assert [len(a.runs), len(b.runs)] == [1, 0]
        # the loser's memory follows the store: its next event is decided against it again
        await b.feed(ev("e3", value=3))
        assert len(b.runs) == 0
    assert [d[2] for d in decisions(db)] == ["run_created", "joined", "joined"]
    assert _count(db, "SELECT COUNT(*) FROM runs") == 1
    assert _count(db, "SELECT COUNT(*) FROM incidents") == 1


async def test_a_duplicate_outside_the_memory_window_creates_nothing(
    db: Path, rules_from: RulesFrom,
) -> None:
    """A redelivery older than the in-memory duplicate window is refused by the store: no
    second run, no orphan run row."""
    rules = rules_from(SIMPLE)
    async with running(db, rules, dedup_window=1) as r:
        await r.feed(ev("e1", value=1, key="web-1"), ev("e2", value=2, key="web-2"),
                     ev("e3", value=3, key="web-3"))
        await r.feed(ev("e1", value=1, key="web-1"))
        assert len(r.runs) == 3
    assert _count(db, "SELECT COUNT(*) FROM runs") == 3
    assert _count(db, "SELECT COUNT(*) FROM decisions") == 3


async def test_a_record_the_store_refuses_is_rejected_alone(
    db: Path, rules_from: RulesFrom,
) -> None:
    """An event whose records the store refuses (a NaN time breaks NOT NULL) is recorded as an
    error and acknowledged; the events around it in the same batch are decided as usual."""
    rules = rules_from(SIMPLE)
    acked: list[str] = []
    async with running(db, rules) as r:
        for ident, at in (("ok-1", time.time()), ("poison", float("nan")),
                          ("ok-2", time.time())):
            event = ev(ident, at=at, key=ident, value=1)
            await r.engine.emit(Delivery(event, functools.partial(acked.append, ident)))
        await r.engine.drain(timeout=10)
        assert sorted(acked) == ["ok-1", "ok-2", "poison"]
        assert sorted(run.key or "" for run in r.runs) == ["ok-1", "ok-2"]
        assert r.engine.store_ok
        await r.feed(ev("after", key="after", value=1))  # and the engine goes on
        assert len(r.runs) == 3
    outcomes = {d[0]: d[2] for d in decisions(db)}
    assert outcomes == {"ok-1": "run_created", "poison": "error", "ok-2": "run_created",
                        "after": "run_created"}
    assert _count(db, "SELECT COUNT(*) FROM runs") == 3


async def test_the_store_refuses_a_second_open_incident(tmp_path: Path) -> None:
    """Committing a new incident for a (rule, key) that already has an open one creates
    neither the incident nor its run; the decision joins the open incident."""
    store = SqliteStore(tmp_path / "loopd.db", replica="a")
    await store.open()
    try:
        now = time.time()

        def batch(n: int) -> Batch:
            inc = IncidentRecord(f"inc-{n}", "r", "web-1", "open", now, run_id=f"run-{n}")
            run = RunRecord(f"run-{n}", inc.id, "r", "web-1", "action", "core.noop", {},
                            "pending", now)
            return Batch(decisions=[DecisionRecord("webhook", f"e{n}", "r", "web-1",
                                                   "run_created", None, now, inc.id, run.id)],
                         incidents={inc.id: inc}, runs=[run])

        assert not await store.commit(batch(1))
        result = await store.commit(batch(2))
        assert result.skipped_runs == {"run-2"}
        assert result.conflicts["inc-2"].id == "inc-1"
        assert [r.id for r in await store.list_runs()] == ["run-1"]
        (joined,) = [d for d in await store.decisions_for(incident_id="inc-1")
                     if d.event_id == "e2"]
        assert (joined.outcome, joined.run_id) == ("joined", "run-1")
    finally:
        await store.close()


async def test_runs_are_claimed_by_one_replica(tmp_path: Path) -> None:
    """Two replicas resuming one store claim disjoint runs: each run has one executor; a
    replica silent for longer than the lease loses its runs to the other."""
    path = tmp_path / "loopd.db"
    a, b = SqliteStore(path, replica="a"), SqliteStore(path, replica="b", lease=0.2)
    await a.open()
    await b.open()
    try:
        now = time.time()
        await a.commit(Batch(runs=[RunRecord("run-1", None, "r", "k", "action", "core.noop",
                                             {}, "pending", now)]))
        assert await a.claim_runs(("pending",)) == {"run-1": 1}
        assert await b.claim_runs(("pending",)) == {}
        # a stops beating; after the lease, b takes the run over with a new epoch
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE replicas SET heartbeat=? WHERE name='a'", (now - 1,))
        assert await b.claim_runs(("pending",)) == {"run-1": 2}
        taken = await b.get_run("run-1")
        assert taken is not None and (taken.owner, taken.epoch) == ("b", 2)
        assert await a.claim_runs(("pending",), lease=3600) == {}
    finally:
        await a.close()
        await b.close()


async def test_a_replica_name_is_held_by_one_live_process(tmp_path: Path) -> None:
    """A second store opened under a replica name a live process holds is refused, naming it."""
    path = tmp_path / "loopd.db"
    first = SqliteStore(path, replica="a")
    await first.open()
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE replicas SET pid=1 WHERE name='a'")  # pid 1 is alive
        second = SqliteStore(path, replica="a")
        try:
            await second.open()
        except Exception as exc:
            assert "replica name 'a' is in use" in str(exc)
        else:
            await second.close()
            raise AssertionError("a second live process took the same replica name")
    finally:
        await first.close()


class FlakyStore:
    """A real store whose commits fail as a full or unreachable disk does while ``down``."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.down = False
        self.failures = 0

    async def commit(self, batch: Batch) -> CommitResult:
        if self.down:
            self.failures += 1
            raise StoreError("write failed: OperationalError: database or disk is full",
                             origin="flaky")
        return await self.inner.commit(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_store_that_is_down_holds_acknowledgements_until_it_is_back(
    db: Path, rules_from: RulesFrom,
) -> None:
    """While commits fail for a transient reason nothing is acknowledged and the engine says
    the store is not ok; once the store is back the held events are decided and acked."""
    inner = SqliteStore(db)
    await inner.open()
    flaky = FlakyStore(inner)
    acked: list[str] = []
    engine = Engine(cast(Store, flaky), rules_from(SIMPLE))
    await engine.load()
    task = asyncio.create_task(engine.run())
    try:
        flaky.down = True
        await engine.emit(Delivery(ev("e1", value=1), functools.partial(acked.append, "e1")))
        await wait_until(lambda: flaky.failures >= 2, what="the commit to be retried")
        assert not engine.store_ok and acked == []
        flaky.down = False
        await engine.drain(timeout=10)
        assert engine.store_ok and acked == ["e1"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await inner.close()
    assert decisions(db) == [("e1", "restart", "run_created")]
