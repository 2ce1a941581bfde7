"""Engines of two replicas on one store: a replica that starts while another executes an
incident's runs leaves that incident (and the runs queued behind it) to the other."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from loopd.catalog.inventory import Inventory
from loopd.clock import VirtualClock
from loopd.decide.engine import Engine
from loopd.decide.guards import Guards
from loopd.events import Delivery
from loopd.policy import GlobalGuards
from loopd.rules.loader import RuleSet
from loopd.runs import states
from loopd.store.sqlite import SqliteStore
from loopd.workflow.loader import literal_prefix
from tests.unit.conftest import RulesFrom, Sent
from tests.unit.test_guards import T0, Loop, alert, rule


@contextlib.asynccontextmanager
async def replica(db: Path, rules: RuleSet, name: str) -> AsyncIterator[Loop]:
    """One replica's engine, started the way the daemon starts it (claim, then load)."""
    store = SqliteStore(db, replica=name)
    await store.open()
    inv = Inventory()
    sent = Sent()
    engine = Engine(store, rules, inventory=inv, clock=VirtualClock(), event_time=True,
                    commands=sent, guards=Guards(GlobalGuards(), inv, None))
    in_flight = await store.runs_in_status((*states.ACTIVE, states.QUEUED))
    claimed = await store.claim_runs(states.ACTIVE)
    await engine.load(in_flight, set(claimed))
    task = asyncio.create_task(engine.run())
    try:
        yield Loop(engine, store, db, sent)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()


async def test_a_replica_started_later_leaves_another_replicas_queued_incident_alone(
        tmp_path: Path, rules_from: RulesFrom) -> None:
    """b executes r1 with r2 queued behind it; c starts meanwhile: c does not restore the
    incident, so its event joins it in the store; b runs both and closes it, and a later
    event at c opens a new incident instead of joining (or reopening) the closed one."""
    db = tmp_path / "loopd.db"
    rules = rules_from(rule("q", extra="    run_mode: queued\n    max_queued: 5"))
    async with replica(db, rules, "b") as b:
        await b.feed(alert("e1", "web-1", T0), alert("e2", "web-1", T0 + 1))
        (r1,) = b.runs
        assert b.outcomes() == ["run_created", "queued"]
        async with replica(db, rules, "c") as c:
            assert not c.engine.incidents.open
            await c.feed(alert("e3", "web-1", T0 + 2))
            assert b.outcomes()[-1] == "joined"
            await b.end(r1)
            await b.end(b.runs[1])
            assert await b.store.runs_in_status((states.QUEUED,)) == []
            assert [i.status for i in await b.store.list_incidents()] == ["closed"]
            await c.feed(alert("e4", "web-1", T0 + 3))
            assert b.outcomes()[-1] == "run_created"
            assert sorted(i.status for i in await b.store.list_incidents()) == [
                "closed", "open"]


async def test_a_queued_run_is_cancelled_by_the_engine_that_holds_its_incident(
        tmp_path: Path, rules_from: RulesFrom) -> None:
    """c does not hold b's incident, so it cannot cancel the queued run itself (the API
    hands the cancel to b); cancelled on b, it stays cancelled when r1 ends."""
    db = tmp_path / "loopd.db"
    rules = rules_from(rule("q", extra="    run_mode: queued\n    max_queued: 5"))
    async with replica(db, rules, "b") as b:
        await b.feed(alert("e1", "web-1", T0), alert("e2", "web-1", T0 + 1))
        (r1,) = b.runs
        (r2,) = await b.store.runs_in_status((states.QUEUED,))
        async with replica(db, rules, "c") as c:
            assert c.engine.cancel_queued(r2.id, "cancelled by bob") is None
            assert b.engine.cancel_queued(r2.id, "cancelled by bob") is not None
            await b.engine.drain(timeout=10)
            await b.end(r1)
            after = await b.store.get_run(r2.id)
            assert after is not None and after.status == states.CANCELLED
            assert [r.id for r in b.runs] == [r1.id]


def test_replicas_store_only_the_topics_confirm_tasks_can_take_as_evidence() -> None:
    """What a confirm task's topic can match starts with its literal part: while replicas
    share the work, only such events (and resolved alerts) are stored for each other."""
    assert literal_prefix("telemetry/{{ ctx.host }}/service/{{ ctx.service }}") == \
        "telemetry/"
    assert literal_prefix("metrics/{host}/node_load1") == "metrics/"
    assert literal_prefix("alerts/+/down") == "alerts/"
    assert literal_prefix("health/web-1") == "health/web-1"
    assert literal_prefix(None) == ""


async def test_a_run_queued_behind_one_that_ended_at_a_crash_starts_at_the_restart(
        tmp_path: Path, rules_from: RulesFrom) -> None:
    """loopd died after r1's end was stored and before the engine started r2, queued
    behind it: the restarted engine starts r2 (it waited forever before)."""
    db = tmp_path / "loopd.db"
    rules = rules_from(rule("q", extra="    run_mode: queued\n    max_queued: 5"))
    async with replica(db, rules, "b") as b:
        await b.feed(alert("e1", "web-1", T0), alert("e2", "web-1", T0 + 1))
        (r1,) = b.runs
        (r2,) = await b.store.runs_in_status((states.QUEUED,))
        ended = await b.store.get_run(r1.id)
        assert ended is not None
        ended.status = states.SUCCEEDED
        await b.store.save_run(ended)  # the end is stored; the engine never heard of it
    async with replica(db, rules, "b") as again:
        assert [r.id for r in again.runs] == [r2.id]
        stored = await again.store.get_run(r2.id)
        assert stored is not None and stored.status == states.PENDING


async def test_an_event_another_replica_decided_is_marked_a_duplicate(
        tmp_path: Path, rules_from: RulesFrom) -> None:
    """The store, not memory, knows c's event was decided at b: c's delivery is marked
    ``duplicate`` (the ingest reply counts it) and starts nothing; a new event is not."""
    db = tmp_path / "loopd.db"
    rules = rules_from(rule("once"))
    async with replica(db, rules, "b") as b, replica(db, rules, "c") as c:
        await b.feed(alert("e1", "web-1", T0))
        again, fresh = Delivery(alert("e1", "web-1", T0)), Delivery(alert("e2", "web-2", T0))
        for delivery in (again, fresh):
            await c.engine.emit(delivery)
        await c.engine.drain(timeout=10)
        assert (again.duplicate, fresh.duplicate) == (True, False)
        assert [r.key for r in (*b.runs, *c.runs)] == ["web-1", "web-2"]
        assert b.outcomes() == ["run_created", "run_created"]
