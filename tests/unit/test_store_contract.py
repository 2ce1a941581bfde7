"""The Store contract (loopd/store/base.py), run against every implementation.

Each implementation is one ``params`` entry of the ``impl`` fixture; a new store
(Postgres) adds itself there and must pass every test in this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from loopd.errors import StoreError
from loopd.store import codec
from loopd.store.base import (
    AuditQuery,
    AuditRecord,
    Batch,
    BreakerRecord,
    CommitResult,
    DecisionQuery,
    DecisionRecord,
    EventRecord,
    IncidentRecord,
    RunRecord,
    StepRecord,
    Store,
)
from loopd.store.memory import MemoryData, MemoryStore
from loopd.store.postgres import PostgresStore
from loopd.store.sqlite import SqliteStore
from loopd.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION

Opener = Callable[..., Awaitable[Store]]


@pytest.fixture(params=["sqlite", "memory", "postgres"])
async def impl(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens a store on the same durable location each time it is called (a "restart", or
    another replica with ``replica=``; ``lease=`` its lease); postgres: a database of its
    own on the test server (tests/servers/postgres.py)."""
    opened: list[Store] = []
    data = MemoryData()
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgres" else ""

    async def open_store(replica: str | None = None, lease: float = 15.0) -> Store:
        store: Store
        if request.param == "sqlite":
            store = SqliteStore(tmp_path / "loopd.db", replica=replica, lease=lease)
        elif request.param == "postgres":
            store = PostgresStore(dsn, replica=replica or "contract", lease=lease,
                                  pool_min=1, pool_max=4)
        else:
            store = MemoryStore(data, replica=replica or "memory", lease=lease)
        await store.open()
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()


def _run(run_id: str, *, rule: str = "r", key: str = "web-1", created: float | None = None,
         status: str = "pending", **extra: Any) -> RunRecord:
    return RunRecord(run_id, f"inc-{run_id}", rule, key, "action", "core.noop", {"a": 1}, status,
                     created if created is not None else time.time(), **extra)


def _decision(event_id: str, rule: str = "r", outcome: str = "run_created",
              source: str = "webhook") -> DecisionRecord:
    return DecisionRecord(source, event_id, rule, "web-1", outcome, None, time.time())


def _event(event_id: str, source: str = "webhook") -> EventRecord:
    return EventRecord(source, event_id, "topic", "web-1", time.time(), {"value": 1})


async def test_a_committed_batch_is_readable(impl: Opener) -> None:
    """Everything in a committed batch can be read back: events, decisions, incidents, runs."""
    store = await impl()
    run = _run("run-1")
    incident = IncidentRecord("inc-run-1", "r", "web-1", "open", time.time(), run_id="run-1")
    await store.commit(Batch(
        events=[_event("e1")], decisions=[DecisionRecord(
            "webhook", "e1", "r", "web-1", "run_created", None, time.time(), incident.id,
            run.id)],
        incidents={incident.id: incident}, runs=[run]))
    event = await store.get_event("webhook", "e1")
    assert event is not None and event.data == {"value": 1}
    assert (await store.get_run("run-1")) == run
    (decision,) = await store.decisions_for(run_id="run-1")
    assert (decision.event_id, decision.outcome, decision.incident_id) == (
        "e1", "run_created", "inc-run-1")
    assert [i.id for i in await store.list_incidents(status="open")] == ["inc-run-1"]
    assert await store.get_incident("inc-run-1") == incident
    assert await store.get_incident("inc-nope") is None


async def test_a_batch_reads_back_exactly_as_written(impl: Opener) -> None:
    """Every field of a batch's events, decisions and incidents reads back as given (the
    SQLite store writes them as one JSON array per table): full-precision times, text
    that looks like a number, quotes, escapes and characters beyond the BMP, missing
    values, event data with an integer beyond 64 bits; many rows keep their order."""
    store = await impl()
    odd = ['007', 'say "hi" \\ back', "ünï 🚒 \n\t", "1e3", "null"]
    now = time.time() + 0.123456789
    events = [EventRecord("kafka", f"k-{i}", "t/ü", odd[i % 5], now + i / 7,
                          {"v": odd[i % 5], "n": i, "f": 0.1 + i}) for i in range(300)]
    big = EventRecord("kafka", "big", "t", None, now, {"big": 2**70, "s": "🚒"})
    decisions = [DecisionRecord("kafka", e.id, "r-ü", e.key, "joined", odd[i % 5], e.time,
                                "inc-1", None) for i, e in enumerate(events)]
    incident = IncidentRecord("inc-1", "r-ü", "web-1", "open", now, None, 300, None, None)
    await store.commit(Batch(events=events, decisions=decisions,
                             incidents={incident.id: incident}))
    await store.commit(Batch(events=[big], decisions=[
        DecisionRecord("kafka", "big", "r-ü", None, "suppressed", None, now)]))
    for e in events[:7] + events[-3:]:
        assert await store.get_event("kafka", e.id) == e
    read_big = await store.get_event("kafka", "big")
    assert read_big is not None and read_big.data["s"] == "🚒" and read_big.key is None
    assert read_big.data["big"] == pytest.approx(2**70)
    assert await store.get_incident("inc-1") == incident
    read = await store.decisions(DecisionQuery(rule="r-ü", limit=1000))
    assert [d.event_id for d in read] == ["big"] + [e.id for e in reversed(events)]
    assert [(d.source, d.event_id, d.rule, d.key, d.outcome, d.reason, d.time,
             d.incident_id, d.run_id) for d in reversed(read[1:])] == [
        (d.source, d.event_id, d.rule, d.key, d.outcome, d.reason, d.time, d.incident_id,
         d.run_id) for d in decisions]
    assert (read[0].key, read[0].reason, read[0].time) == (None, None, now)


async def test_commit_is_atomic(impl: Opener) -> None:
    """A batch that fails part-way raises StoreError and leaves nothing of itself behind."""
    store = await impl()
    # an incident without a rule violates the schema after events and decisions were written
    bad = IncidentRecord("i-1", None, "web-1", "open", time.time())  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="write failed"):
        await store.commit(Batch(
            events=[_event("e1"), _event("e2")],
            decisions=[_decision("e1"), _decision("e2")],
            incidents={"i-1": bad},
            runs=[_run("run-1")],
            timers_set=[("r", "web-1", 1.0)]))
    assert await store.get_event("webhook", "e1") is None
    assert await store.count_decisions() == 0
    assert await store.get_run("run-1") is None
    assert (await store.load_state(since=0, recent=10)).for_timers == []
    # the store is still usable afterwards: no transaction was left open
    await store.commit(Batch(events=[_event("e3")], decisions=[_decision("e3")]))
    assert await store.count_decisions() == 1


async def test_decisions_are_unique_per_source_event_and_rule(impl: Opener) -> None:
    """Writing the same (source, event id, rule) decision twice keeps the first one only."""
    store = await impl()

    def decision(outcome: str, rule: str = "r", source: str = "webhook") -> DecisionRecord:
        return DecisionRecord(source, "e1", rule, "web-1", outcome, None, time.time(),
                              "inc-1", "run-1")

    await store.commit(Batch(decisions=[decision("run_created")]))
    await store.commit(Batch(decisions=[decision("joined")]))  # a redelivery decided again
    await store.commit(Batch(decisions=[decision("joined", rule="other"),
                                        decision("joined", source="kafka")]))
    kept = await store.decisions_for(run_id="run-1")
    assert [(d.source, d.rule, d.outcome) for d in kept] == [
        ("webhook", "r", "run_created"), ("webhook", "other", "joined"),
        ("kafka", "r", "joined")]
    assert await store.count_decisions(rule="r") == 2
    assert [d.event_id for d in await store.decisions_for(incident_id="inc-1")] == ["e1"] * 3


async def test_load_state_returns_what_the_engine_needs_after_a_restart(impl: Opener) -> None:
    """Open incidents, for-timers, recent run starts and decided event ids survive a reopen."""
    store = await impl()
    now = time.time()
    await store.commit(Batch(
        decisions=[_decision(f"e{i}") for i in range(5)],
        incidents={
            "i-open": IncidentRecord("i-open", "r", "web-1", "open", now),
            "i-done": IncidentRecord("i-done", "r", "web-2", "open", now),
        },
        runs=[_run("old", created=now - 1000), _run("new", created=now - 10)],
        timers_set=[("r", "web-1", now - 30), ("r", "web-2", now - 20)],
    ))
    await store.commit(Batch(timers_cleared=[("r", "web-2")]))
    await store.close_incident("i-done", now, "fixed")

    reopened = await impl()
    state = await reopened.load_state(since=now - 100, recent=3)
    assert [i.id for i in state.open_incidents] == ["i-open"]
    ((rule, key, deadline),) = state.for_timers
    assert (rule, key) == ("r", "web-1") and deadline == pytest.approx(now - 30)
    ((rule, key, started),) = state.run_starts
    assert (rule, key) == ("r", "web-1") and started == pytest.approx(now - 10)
    assert state.recent_events == [("webhook", "e2"), ("webhook", "e3"), ("webhook", "e4")]


async def test_run_starts_come_oldest_first_even_after_updates(impl: Opener) -> None:
    """Run starts are ordered by creation, whatever order the runs were last written in."""
    store = await impl()
    now = time.time()
    first, second = _run("a", created=now - 50), _run("b", created=now - 5)
    await store.commit(Batch(runs=[first, second]))
    first.status = "succeeded"
    await store.save_run(first)  # the older run is written last
    state = await store.load_state(since=0, recent=10)
    assert [c for _, _, c in state.run_starts] == [pytest.approx(now - 50),
                                                     pytest.approx(now - 5)]


async def test_runs_and_steps_are_saved_as_they_change(impl: Opener) -> None:
    """save_run replaces the run's record and save_step its step; both survive a reopen."""
    store = await impl()
    run = _run("run-1")
    await store.commit(Batch(runs=[run]))
    run.status, run.started, run.ctx = "running", time.time(), {"host": "web-1"}
    await store.save_run(run)
    step = StepRecord("run-1", 1, "restart", "linux.restart_service", 1, "running", time.time(),
                      input={"host": "web-1"})
    await store.save_step(step)
    step.status, step.output, step.finished = "succeeded", {"exit_status": 0}, time.time()
    await store.save_step(step)

    reopened = await impl()
    assert await reopened.get_run("run-1") == run
    assert await reopened.steps("run-1") == [step]
    assert [r.id for r in await reopened.runs_in_status(("running",))] == ["run-1"]
    assert [r.id for r in await reopened.list_runs(status="running")] == ["run-1"]
    assert await reopened.list_runs(status="failed") == []
    assert await reopened.get_run("nope") is None


async def test_runs_are_listed_newest_first_by_status_and_rule(impl: Opener) -> None:
    """``list_runs`` narrows by status, by rule, or both, newest first, up to the limit."""
    store = await impl()
    now = time.time()
    await store.commit(Batch(runs=[
        _run("a", rule="disk", created=now - 3, status="succeeded"),
        _run("b", rule="cpu", created=now - 2, status="succeeded"),
        _run("c", rule="disk", created=now - 1)]))
    async def ids(**q: Any) -> list[str]:
        return [r.id for r in await store.list_runs(**q)]
    assert await ids() == ["c", "b", "a"]
    assert await ids(rule="disk") == ["c", "a"]
    assert await ids(status="succeeded") == ["b", "a"]
    assert await ids(status="succeeded", rule="disk") == ["a"]
    assert await ids(rule="disk", limit=1) == ["c"]
    assert await ids(rule="nope") == []


async def test_a_run_is_created_once(impl: Opener) -> None:
    """Committing a run that already exists never overwrites its later state."""
    store = await impl()
    run = _run("run-1")
    await store.commit(Batch(runs=[run]))
    await store.save_run(_run("run-1", status="succeeded", created=run.created))
    await store.commit(Batch(runs=[run]))  # e.g. a batch retried after a lost ack
    saved = await store.get_run("run-1")
    assert saved is not None and saved.status == "succeeded"


async def test_values_json_cannot_hold_natively_are_stored(impl: Opener) -> None:
    """Huge integers and non-string keys in run input are stored instead of failing a batch."""
    store = await impl()
    run = _run("run-1")
    run.input = {"big": 2**70, "codes": {200: "ok"}}
    await store.commit(Batch(runs=[run], decisions=[_decision("e1")]))
    saved = await store.get_run("run-1")
    assert saved is not None
    assert saved.input["codes"] == {"200": "ok"}
    assert saved.input["big"] == pytest.approx(2**70)
    await store.commit(Batch(decisions=[_decision("e2")]))
    assert await store.count_decisions() == 2


async def test_concurrent_writers_are_all_committed(impl: Opener) -> None:
    """Batches and run writes submitted at the same time are all durable once awaited."""
    store = await impl()
    runs = [_run(f"run-{i}") for i in range(20)]
    await store.commit(Batch(runs=runs))
    writes: list[Awaitable[object]] = []
    for i, run in enumerate(runs):
        run.status = "succeeded"
        writes.append(store.save_run(run))
        writes.append(store.commit(Batch(decisions=[_decision(f"e{i}")])))
    await asyncio.gather(*writes)
    assert await store.count_decisions() == 20
    assert len(await store.list_runs(status="succeeded")) == 20


async def test_kv_values_persist(impl: Opener) -> None:
    """kv_put stores a JSON value per (namespace, key) that kv_get returns after a reopen."""
    store = await impl()
    assert await store.kv_get("netdev", "sw-1") is None
    await store.kv_put("netdev", "sw-1", {"config": "hostname sw-1"})
    await store.kv_put("netdev", "sw-1", {"config": "hostname sw-1\nntp 10.0.0.1"})
    reopened = await impl()
    assert await reopened.kv_get("netdev", "sw-1") == {"config": "hostname sw-1\nntp 10.0.0.1"}
    assert await reopened.kv_get("other", "sw-1") is None


async def test_a_batch_writes_and_deletes_kv_values_that_a_scan_lists(impl: Opener) -> None:
    """A batch's kv entry stores its value, None deletes it, in the batch's transaction;
    kv_scan lists one namespace's (key, value) pairs ordered by key, after a reopen too."""
    store = await impl()
    await store.commit(Batch(kv={("corr", "b"): {"n": 2}, ("corr", "a"): [1],
                                 ("corr", "c"): "x", ("other", "a"): 0}))
    await store.commit(Batch(kv={("corr", "c"): None, ("corr", "a"): [1, 2],
                                 ("corr", "zz"): None}))
    reopened = await impl()
    assert await reopened.kv_scan("corr") == [("a", [1, 2]), ("b", {"n": 2})]
    assert await reopened.kv_scan("other") == [("a", 0)]
    assert await reopened.kv_scan("none") == []
    assert await reopened.kv_scan("corr", prefix="b") == [("b", {"n": 2})]
    await store.commit(Batch(kv={("corr", "a%_"): 1, ("corr", "ab"): 2}))
    assert await store.kv_scan("corr", prefix="a%") == [("a%_", 1)]
    assert await reopened.kv_get("corr", "c") is None


async def test_a_lone_surrogate_in_a_kv_value_reads_back(impl: Opener) -> None:
    """Text no UTF-8 can hold (a lone surrogate, e.g. out of a template) is stored as
    U+FFFD in its place, by every store alike, and reads back by kv_get and kv_scan after
    a reopen: a value stored once must never make a read (the correlation load at a
    restart) fail, nor the batch that carries it."""
    store = await impl()
    value = {"event": {"data": {"msg": "half \ud800 of a pair"}}, "n": 1}
    await store.commit(Batch(kv={("corr", "g"): value}))
    await store.kv_put("netdev", "sw-1", {"config": "\udfff"})
    reopened = await impl()
    assert await reopened.kv_scan("corr") == [
        ("g", {"event": {"data": {"msg": "half \ufffd of a pair"}}, "n": 1})]
    assert await reopened.kv_get("netdev", "sw-1") == {"config": "\ufffd"}


def test_a_file_written_with_an_escaped_lone_surrogate_reads_back() -> None:
    """What an earlier dump wrote (the escape orjson refuses) is read by the fallback."""
    assert codec.load(b'{"x": "\\ud800"}') == {"x": "\ud800"}


async def test_the_schema_version_is_recorded(tmp_path: Path) -> None:
    """A new SQLite store records the schema version it created in ``user_version``."""
    path = tmp_path / "loopd.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    again = SqliteStore(path)  # opening an up-to-date store migrates nothing
    await again.open()
    await again.close()


async def test_a_store_from_a_newer_loopd_is_refused(tmp_path: Path) -> None:
    """Opening a store whose schema is newer than this loopd raises StoreError naming the file."""
    path = tmp_path / "loopd.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    store = SqliteStore(path)
    with pytest.raises(StoreError, match="newer than this loopd") as info:
        await store.open()
    assert info.value.origin == str(path)
    # the connection was released (its thread would otherwise keep the process alive)
    with pytest.raises(StoreError, match="not open"):
        await store.get_run("x")


async def test_an_unusable_path_is_a_store_error(tmp_path: Path) -> None:
    """A store path that cannot hold a database raises StoreError, not an OS traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = SqliteStore(blocker / "loopd.db")
    with pytest.raises(StoreError, match="cannot open store"):
        await store.open()


async def test_using_a_closed_store_is_a_store_error(tmp_path: Path) -> None:
    """Reading from a store that is not open raises StoreError."""
    store = SqliteStore(tmp_path / "loopd.db")
    with pytest.raises(StoreError, match="not open"):
        await store.get_run("x")


async def test_a_duplicate_decision_creates_nothing(impl: Opener) -> None:
    """A decision already stored (a redelivery decided again, here or by another process)
    is reported as a duplicate, and neither its run nor the incident it opened is created."""
    store = await impl()
    now = time.time()

    def batch(n: int) -> Batch:
        inc = IncidentRecord(f"inc-{n}", "r", f"web-{n}", "open", now, run_id=f"run-{n}")
        run = RunRecord(f"run-{n}", inc.id, "r", f"web-{n}", "action", "core.noop", {},
                        "pending", now)
        return Batch(decisions=[DecisionRecord("webhook", "e1", "r", f"web-{n}",
                                               "run_created", None, now, inc.id, run.id)],
                     incidents={inc.id: inc}, runs=[run])

    assert not await store.commit(batch(1))
    result = await store.commit(batch(2))
    assert result.duplicates == {("webhook", "e1", "r")}
    assert result.skipped_runs == {"run-2"}
    assert [r.id for r in await store.list_runs()] == ["run-1"]
    assert [i.id for i in await store.list_incidents()] == ["inc-1"]


async def test_one_open_incident_per_rule_and_key(impl: Opener) -> None:
    """A new incident for a (rule, key) with an open one is not created: its decision joins
    the open incident and its run is not created; once closed, a new one may open."""
    store = await impl()
    now = time.time()

    def batch(n: int) -> Batch:
        inc = IncidentRecord(f"inc-{n}", "r", "web-1", "open", now + n, run_id=f"run-{n}")
        run = RunRecord(f"run-{n}", inc.id, "r", "web-1", "action", "core.noop", {},
                        "pending", now + n)
        return Batch(decisions=[DecisionRecord("webhook", f"e{n}", "r", "web-1",
                                               "run_created", None, now, inc.id, run.id)],
                     incidents={inc.id: inc}, runs=[run])

    await store.commit(batch(1))
    result = await store.commit(batch(2))
    assert result.conflicts["inc-2"].id == "inc-1" and result.skipped_runs == {"run-2"}
    (joined,) = [d for d in await store.decisions_for(incident_id="inc-1")
                 if d.event_id == "e2"]
    assert (joined.outcome, joined.run_id) == ("joined", "run-1")
    await store.close_incident("inc-1", now + 5, "fixed")
    assert not await store.commit(batch(3))
    assert [i.id for i in await store.list_incidents(status="open")] == ["inc-3"]


async def test_runs_are_claimed_by_one_replica_at_a_time(impl: Opener) -> None:
    """Runs are created owned by the committing replica; claiming again bumps the epoch."""
    store = await impl()
    run = _run("run-1")
    await store.commit(Batch(runs=[run]))
    saved = await store.get_run("run-1")
    assert saved is not None and saved.owner == store.replica
    assert set(await store.claim_runs(("pending",))) == {"run-1"}
    again = await store.get_run("run-1")
    assert again is not None and again.epoch == saved.epoch + 1
    await store.save_run(again)  # a save never turns the epoch back
    last = await store.get_run("run-1")
    assert last is not None and last.epoch == again.epoch


async def test_an_incident_closed_earlier_in_a_batch_frees_its_key(impl: Opener) -> None:
    """One batch that closes an incident and then opens the next one for the same (rule,
    key) creates the new incident and its run (the changes apply in order)."""
    store = await impl()
    now = time.time()
    first = IncidentRecord("inc-1", "r", "web-1", "open", now, run_id="run-1")
    await store.commit(Batch(incidents={first.id: first}))
    closed = IncidentRecord("inc-1", "r", "web-1", "closed", now, now + 1, run_id="run-1",
                            outcome="fixed")
    second = IncidentRecord("inc-2", "r", "web-1", "open", now + 2, run_id="run-2")
    run = RunRecord("run-2", "inc-2", "r", "web-1", "action", "core.noop", {}, "pending",
                    now + 2)
    result = await store.commit(Batch(
        decisions=[DecisionRecord("webhook", "e2", "r", "web-1", "run_created", None, now,
                                  "inc-2", "run-2")],
        incidents={closed.id: closed, second.id: second}, runs=[run]))
    assert not result
    assert [i.id for i in await store.list_incidents(status="open")] == ["inc-2"]
    assert (await store.get_run("run-2")) is not None


def _audit(n: int, *, action: str = "approve_run", who: str = "oncall-alice",
           target: str | None = "run-1", at: float | None = None,
           status: int | None = 202) -> AuditRecord:
    return AuditRecord(at if at is not None else time.time(), f"req-{n}", who, "operator",
                       action, target, {"reason": f"n{n}", "token": "***"}, status,
                       "requested" if status is None else "approved", "127.0.0.1")


async def test_the_audit_trail_is_read_newest_first_and_filtered(impl: Opener) -> None:
    """Audit records read back newest first with their parameters, numbered in the order
    appended, and filtered by action, who, target and since, up to the limit."""
    store = await impl()
    now = time.time()
    await store.append_audit(_audit(1, at=now - 100, status=None))
    await store.append_audit(_audit(2, at=now - 50))
    await store.append_audit(_audit(3, action="cancel_run", who="bob", target="run-2", at=now))
    await store.append_audit(_audit(4, action="reload", target=None, at=now))
    everything = await store.audit(AuditQuery())
    assert [r.request for r in everything] == ["req-4", "req-3", "req-2", "req-1"]
    assert [r.seq for r in everything] == sorted((r.seq for r in everything), reverse=True)
    oldest = everything[-1]
    assert (oldest.who, oldest.role, oldest.action, oldest.target, oldest.status,
            oldest.outcome, oldest.client) == ("oncall-alice", "operator", "approve_run",
                                               "run-1", None, "requested", "127.0.0.1")
    assert oldest.params == {"reason": "n1", "token": "***"}
    assert [r.request for r in await store.audit(AuditQuery(action="approve_run"))] == \
        ["req-2", "req-1"]
    assert [r.request for r in await store.audit(AuditQuery(who="bob"))] == ["req-3"]
    assert [r.request for r in await store.audit(AuditQuery(target="run-1"))] == \
        ["req-2", "req-1"]
    assert [r.request for r in await store.audit(AuditQuery(since=now - 60))] == \
        ["req-4", "req-3", "req-2"]
    assert [r.request for r in await store.audit(AuditQuery(limit=2))] == ["req-4", "req-3"]
    assert await store.audit(AuditQuery(who="bob", action="reload")) == []


async def test_decisions_are_read_newest_first_filtered_and_paged(impl: Opener) -> None:
    """``decisions(query)``: newest first with their positions; rule, key, outcome, source,
    incident and time narrow; ``before`` (a position) reads the next page."""
    store = await impl()
    now = time.time()
    rows = [DecisionRecord("webhook", f"e{i}", "r" if i % 2 else "q", f"h{i % 3}",
                           "suppressed" if i % 4 == 0 else "joined", f"why {i}", now + i,
                           "inc-1" if i < 3 else None) for i in range(10)]
    await store.commit(Batch(decisions=rows[:6]))
    await store.commit(Batch(decisions=[*rows[6:], DecisionRecord(
        "mqtt", "m1", "r", "h0", "run_created", None, now + 20)]))
    every = await store.decisions(DecisionQuery())
    assert [d.event_id for d in every] == ["m1", *(f"e{i}" for i in range(9, -1, -1))]
    assert [d.seq for d in every] == sorted((d.seq for d in every), reverse=True)
    assert len({d.seq for d in every}) == 11 and every[-1].seq > 0
    expected: list[tuple[DecisionQuery, str]] = [
        (DecisionQuery(rule="q"), "e8 e6 e4 e2 e0"), (DecisionQuery(key="h1"), "e7 e4 e1"),
        (DecisionQuery(outcome="suppressed"), "e8 e4 e0"), (DecisionQuery(source="mqtt"), "m1"),
        (DecisionQuery(incident_id="inc-1"), "e2 e1 e0"),
        (DecisionQuery(since=now + 7), "m1 e9 e8 e7"), (DecisionQuery(until=now + 1), "e1 e0"),
        (DecisionQuery(rule="r", key="h0"), "m1 e9 e3")]
    for query, ids in expected:
        assert [d.event_id for d in await store.decisions(query)] == ids.split(), query
    first = await store.decisions(DecisionQuery(limit=4))
    rest = await store.decisions(DecisionQuery(before=first[-1].seq, limit=100))
    assert [d.event_id for d in first + rest] == [d.event_id for d in every]
    assert await store.decisions(DecisionQuery(rule="nope")) == []


async def test_the_audit_trail_survives_a_restart(impl: Opener) -> None:
    """Audit records appended before a restart are read back after it, and new ones follow."""
    store = await impl()
    await store.append_audit(_audit(1))
    await store.close()
    again = await impl()
    await again.append_audit(_audit(2))
    assert [r.request for r in await again.audit(AuditQuery())] == ["req-2", "req-1"]


async def test_an_audit_record_missing_a_field_is_refused(impl: Opener) -> None:
    """An audit record without its principal is refused with a StoreError, not stored."""
    store = await impl()
    record = _audit(1)
    record.who = None  # type: ignore[assignment]
    with pytest.raises(StoreError):
        await store.append_audit(record)
    assert await store.audit(AuditQuery()) == []


async def test_the_sqlite_audit_table_refuses_update_and_delete(tmp_path: Path) -> None:
    """The SQLite audit table is append-only in the database itself: an UPDATE or a DELETE,
    even from another connection (sqlite3 by hand), aborts and leaves the record as it was."""
    path = tmp_path / "loopd.db"
    store = SqliteStore(path)
    await store.open()
    await store.append_audit(_audit(1))
    await store.close()
    with sqlite3.connect(path) as db:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit SET who='mallory'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM audit")
        assert db.execute("SELECT who FROM audit").fetchall() == [("oncall-alice",)]


async def test_a_version_2_store_upgrades_and_keeps_its_runs(tmp_path: Path) -> None:
    """A state file of schema version 2 (before the audit trail) opens: it is migrated to
    the current version, its runs are kept, and the audit trail works."""
    path = tmp_path / "loopd.db"
    with sqlite3.connect(path) as db:
        for version in (1, 2):
            for statement in MIGRATIONS[version]:
                db.execute(statement)
        db.execute("INSERT INTO runs (id, kind, target, status, created) "
                   "VALUES ('old-run', 'action', 'core.noop', 'succeeded', 1.0)")
        db.execute("PRAGMA user_version=2")
    store = SqliteStore(path)
    await store.open()
    try:
        old = await store.get_run("old-run")
        assert old is not None and old.status == "succeeded"
        await store.append_audit(_audit(1))
        assert [r.request for r in await store.audit(AuditQuery())] == ["req-1"]
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4


async def test_processes_opening_a_new_sqlite_file_together_migrate_it_once(
        tmp_path: Path) -> None:
    """Several replicas starting at once on one new state file all open it: the schema is
    read and migrated inside one write transaction, so no migration is applied twice."""
    path = tmp_path / "loopd.db"
    stores = [SqliteStore(path, replica=f"r{i}") for i in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    for store in stores:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_one_rejected_sqlite_writer_fails_alone_in_a_mixed_group(tmp_path: Path) -> None:
    """A group SQLite writes in one hop (plain batches, a run's saves and an audit row):
    the batch whose decision breaks NOT NULL gets StoreRejected, every other writer's
    record is durable once."""
    store = SqliteStore(tmp_path / "loopd.db")
    await store.open()
    try:
        now = time.time()
        run = _run("run-1")
        await store.commit(Batch(runs=[run]))
        writes = [store.commit(Batch(decisions=[DecisionRecord(
            "w", f"e{i}", None if i == 3 else "r", "k", "suppressed", None, now)]))  # type: ignore[arg-type]
            for i in range(6)]
        run.status = "running"
        # the first writes alone; the run's save and the audit row come before the
        # rejected batch in the group, so its rollback undoes them before the retries
        results = await asyncio.gather(
            writes[0], store.save_run(run), store.append_audit(_audit(1)), *writes[1:],
            return_exceptions=True)
        assert [type(r).__name__ for r in results] == [
            "CommitResult", "NoneType", "NoneType", "CommitResult", "CommitResult",
            "StoreRejected", "CommitResult", "CommitResult"]
        assert "NOT NULL" in str(results[5])
        assert not any(r for r in results if isinstance(r, CommitResult))  # no duplicate
        assert await store.count_decisions() == 5
        stored = await store.get_run("run-1")
        assert stored is not None and stored.status == "running"
        assert len(await store.audit(AuditQuery())) == 1
    finally:
        await store.close()


async def test_a_cancelled_writer_s_group_is_written_whole_before_the_next(
        impl: Opener) -> None:
    """A writer cancelled while its group is written (a run cancelled mid-save): the group
    is still written whole, and the next group starts after it (review: the lock was
    given back at the cancel, the next group's BEGIN met the open transaction and its
    error handling rolled the first one back: a breaker lost, a kv row kept)."""
    store = await impl()
    now = time.time()
    batch = Batch(breakers=[BreakerRecord("r", now, now + 60, "3 failures")],
                  kv={("guards", "state"): {"n": 1}})  # not plain: several statements
    writer = asyncio.create_task(store.commit(batch))
    await asyncio.sleep(0)  # it holds the writers' turn and is writing
    writer.cancel()
    await store.append_audit(_audit(1))  # the next group: after the first, whole
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    assert [b.scope for b in await store.breakers()] == ["r"]
    assert await store.kv_get("guards", "state") == {"n": 1}
    assert len(await store.audit(AuditQuery())) == 1
