"""The Store contract for several replicas (loopd/store/base.py), on every implementation:
fenced run writes, limits counted across replicas in the commit's transaction, shared
breakers, run commands, event positions.

Limits are tested with another replica alive: a SQLite store alone on its file since it
opened counts them without reading them (its engine's memory saw every run and checked).

Two replicas are two stores on the same durable location (``impl(replica=...)``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from loopd.errors import LeaseLost
from loopd.store.base import (
    AuditQuery,
    Batch,
    BreakerRecord,
    CommandRecord,
    CommitResult,
    DecisionQuery,
    DecisionRecord,
    EventRecord,
    IncidentRecord,
    Limit,
    RunRecord,
    StepRecord,
)
from tests.unit.test_store_contract import Opener, _audit, impl

__all__ = ["impl"]  # the fixture, with its params (one per implementation)


def _run(run_id: str, *, key: str = "web-1", created: float | None = None,
         status: str = "pending") -> RunRecord:
    return RunRecord(run_id, f"inc-{run_id}", "r", key, "action", "core.noop", {}, status,
                     created if created is not None else time.time())


def _decided(run: RunRecord, limits: list[Limit] | None = None, **extra: Any) -> Batch:
    """The batch one engine decision that starts ``run`` writes (new incident)."""
    inc = IncidentRecord(run.incident_id or "", run.rule or "r", run.key or "", "open",
                         run.created, run_id=run.id)
    decision = DecisionRecord("am", f"ev-{run.id}", run.rule or "r", run.key, "run_created",
                              None, run.created, inc.id, run.id)
    return Batch(decisions=[decision], incidents={inc.id: inc}, runs=[run],
                 limits={run.id: limits} if limits else {}, **extra)


async def _two(impl: Opener) -> tuple[Any, Any]:
    a = await impl(replica="a")
    b = await impl(replica="b", lease=0.3)
    return a, b


async def test_a_former_owner_writes_nothing_after_a_takeover(impl: Opener) -> None:
    """b takes a's run over once a is silent past the lease; a's saves of the run and of its
    steps are refused with LeaseLost and change nothing; b's go through."""
    a, b = await _two(impl)
    run = _run("run-1")
    await a.commit(Batch(runs=[run]))
    await a.save_step(StepRecord("run-1", 1, "action", "core.noop", 1, "running", time.time()))
    assert await a.holds("run-1")
    claimed = await b.claim_runs(("pending",), lease=0.0)
    assert claimed == {"run-1": run.epoch + 1}
    assert not await a.holds("run-1") and await b.holds("run-1")
    stale = await a.get_run("run-1")
    assert stale is not None
    stale.status = "running"
    with pytest.raises(LeaseLost, match="run-1"):
        await a.save_run(run)
    with pytest.raises(LeaseLost):
        await a.save_step(StepRecord("run-1", 2, "t", None, 1, "running", time.time()))
    stored = await b.get_run("run-1")
    assert stored is not None and (stored.owner, stored.status) == ("b", "pending")
    assert [s.seq for s in await b.steps("run-1")] == [1]
    taken = await b.get_run("run-1")
    assert taken is not None
    taken.status = "running"
    await b.save_run(taken)
    await b.save_step(StepRecord("run-1", 2, "t", None, 1, "running", time.time()))
    final = await a.get_run("run-1")
    assert final is not None and (final.owner, final.status) == ("b", "running")
    assert [s.seq for s in await a.steps("run-1")] == [1, 2]


async def test_a_run_not_held_is_refused_until_claimed(impl: Opener) -> None:
    """A store writes only runs it created, inserted or claimed: a restarted process (a new
    store on the same data) claims before it writes."""
    first = await impl(replica="a")
    await first.commit(Batch(runs=[_run("run-1")]))
    restarted = await impl(replica="a")
    stored = await restarted.get_run("run-1")
    assert stored is not None
    with pytest.raises(LeaseLost):
        await restarted.save_run(stored)
    assert set(await restarted.claim_runs(("pending",))) == {"run-1"}
    await restarted.save_run(stored)
    child = _run("run-1/sub", status="running")  # new to the store: inserted and held
    await restarted.save_run(child)
    await restarted.save_step(StepRecord(child.id, 1, "t", None, 1, "running", time.time()))
    assert await restarted.holds(child.id)


async def test_a_periodic_takeover_leaves_this_replicas_own_runs_alone(impl: Opener) -> None:
    a, b = await _two(impl)
    await a.commit(Batch(runs=[_run("mine")]))
    await b.commit(Batch(runs=[_run("theirs")]))
    assert await a.claim_runs(("pending",), others_only=True) == {}
    assert await a.holds("mine")
    await a.heartbeat()
    taken = await a.claim_runs(("pending",), lease=0.0, others_only=True)
    assert set(taken) == {"theirs"}
    assert await a.holds("mine") and not await b.holds("theirs")


async def test_a_fleet_budget_holds_across_replicas(impl: Opener) -> None:
    """Two replicas together never exceed a window budget: the store counts what both
    admitted; the refused decision says why and creates neither run nor incident."""
    a, b = await _two(impl)
    now = time.time()
    fleet = Limit("fleet", "window", 3, 3600.0, "budget", "fleet budget of 3 runs is spent")
    results = []
    for i in range(6):
        store = a if i % 2 else b
        results.append(await store.commit(_decided(_run(f"run-{i}", key=f"h{i}",
                                                        created=now + i), [fleet])))
    refused = [r for result in results for r in result.refused]
    assert refused == ["run-3", "run-4", "run-5"]
    assert all(r in result.skipped_runs for result in results for r in result.refused)
    assert {r.id for r in await a.list_runs()} == {"run-0", "run-1", "run-2"}
    assert {i.key for i in await a.list_incidents()} == {"h0", "h1", "h2"}
    assert await a.count_decisions() == 6  # every event decided; three of them suppressed
    for i in range(3, 6):  # nothing dangles: no decision points at a run never created
        assert await b.decisions_for(run_id=f"run-{i}") == []
        assert await b.decisions_for(incident_id=f"inc-run-{i}") == []


async def test_refused_decisions_read_back_suppressed_with_the_reason(impl: Opener) -> None:
    store, _ = await _two(impl)  # another replica is alive: the store counts
    now = time.time()
    limit = Limit("rule:r", "window", 1, 60.0, "budget", "rule budget of 1 runs per 60s")
    await store.commit(_decided(_run("run-1", created=now), [limit]))
    result = await store.commit(_decided(_run("run-2", key="web-2", created=now + 1), [limit]))
    assert result.refused == {"run-2": limit}
    assert await store.get_run("run-2") is None
    assert await store.count_decisions() == 2
    assert [i.key for i in await store.list_incidents()] == ["web-1"]
    # the window slides: a run created after it is admitted
    later = await store.commit(_decided(_run("run-3", key="web-3", created=now + 61), [limit]))
    assert not later.refused and await store.get_run("run-3") is not None


async def test_a_blast_radius_counts_open_incidents_of_every_replica(impl: Opener) -> None:
    """``open`` limits count distinct keys whose incident is open, whoever opened it;
    closing an incident frees its place."""
    a, b = await _two(impl)
    now = time.time()
    radius = Limit("group:web", "open", 2, 0.0, "blast_radius", "2 of group web at most")
    assert not (await a.commit(_decided(_run("r1", key="w1", created=now), [radius]))).refused
    assert not (await b.commit(_decided(_run("r2", key="w2", created=now), [radius]))).refused
    third = await a.commit(_decided(_run("r3", key="w3", created=now), [radius]))
    assert set(third.refused) == {"r3"}
    await b.close_incident("inc-r2", now + 1, "fixed")
    assert not (await a.commit(_decided(_run("r4", key="w3", created=now + 2),
                                        [radius]))).refused
    closing = IncidentRecord("inc-r1", "r", "w1", "closed", now, now + 3, run_id="r1",
                             outcome="fixed")
    await a.commit(Batch(incidents={closing.id: closing}))
    assert not (await b.commit(_decided(_run("r5", key="w5", created=now + 4),
                                        [radius]))).refused


async def test_breakers_are_shared_and_open_once(impl: Opener) -> None:
    """A breaker opened by one replica refuses the other's runs; when both open it, one
    commit says it opened it (the one that escalates); closing it closes it for both."""
    a, b = await _two(impl)
    now = time.time()
    breaker = BreakerRecord("r", now, now + 600, "3 runs not fixed")
    first = await a.commit(Batch(breakers=[breaker]))
    second = await b.commit(Batch(breakers=[BreakerRecord("r", now + 1, now + 601, "x")]))
    assert first.breakers_opened == {"r"} and second.breakers_opened == set()
    assert [br.scope for br in await b.breakers()] == ["r"]
    gate = Limit("r", "breaker", guard="breaker", reason="circuit open")
    assert set((await b.commit(_decided(_run("x1", created=now + 2), [gate]))).refused) \
        == {"x1"}
    assert await b.close_breaker("r")
    assert not await a.close_breaker("r")
    assert await a.breakers() == []
    assert not (await a.commit(_decided(_run("x2", created=now + 3), [gate]))).refused


async def test_commands_reach_the_runs_owner(impl: Opener) -> None:
    a, b = await _two(impl)
    await a.commit(Batch(runs=[_run("run-a")]))
    await b.commit(Batch(runs=[_run("run-b")]))
    await b.send_command(CommandRecord("run-a", "approve", "oncall", "looks right", 1.0))
    await a.send_command(CommandRecord("run-b", "cancel", "bob", None, 2.0))
    mine = await a.commands(0)
    assert [(c.run_id, c.kind, c.by, c.reason) for c in mine] == [
        ("run-a", "approve", "oncall", "looks right")]
    assert [c.kind for c in await b.commands(0)] == ["cancel"]
    assert await a.commands(mine[-1].seq) == []
    # b takes run-a over (a fell silent): the approval a never carried out comes along
    await b.claim_runs(("pending",), lease=0.0, others_only=True)
    assert [(c.run_id, c.kind) for c in await b.commands(0)] == [
        ("run-a", "approve"), ("run-b", "cancel")]
    assert await a.commands(0) == []
    ended = await b.get_run("run-b")
    assert ended is not None
    ended.status = "cancelled"
    await b.save_run(ended)  # an ended run's commands are done with
    assert [c.run_id for c in await b.commands(0)] == ["run-a"]


async def test_events_are_read_in_the_order_stored_by_any_replica(impl: Opener) -> None:
    a, b = await _two(impl)
    start = await a.last_event()
    for i, store in enumerate((a, b, a)):
        await store.commit(Batch(events=[EventRecord("am", f"e{i}", "t", "k", float(i),
                                                     {"n": i})]))
    await b.commit(Batch(events=[EventRecord("am", "e0", "t", "k", 0.0, {"n": 0})]))  # again
    found = await b.events_since(start)
    assert [e.id for _, e in found] == ["e0", "e1", "e2"]
    positions = [pos for pos, _ in found]
    assert positions == sorted(positions) and positions[-1] == await a.last_event()
    assert [e.id for _, e in await a.events_since(positions[0])] == ["e1", "e2"]
    assert [e.id for _, e in await a.events_since(start, limit=1)] == ["e0"]
    assert found[1][1].data == {"n": 1}


async def test_the_earliest_for_timer_start_wins(impl: Opener) -> None:
    """Two replicas that both saw a condition start to hold keep the first instant."""
    a, b = await _two(impl)
    await a.commit(Batch(timers_set=[("r", "k", 100.0)]))
    await b.commit(Batch(timers_set=[("r", "k", 120.0)]))
    state = await a.load_state(since=0, recent=0)
    assert state.for_timers == [("r", "k", 100.0)]
    await b.commit(Batch(timers_cleared=[("r", "k")]))
    await a.commit(Batch(timers_set=[("r", "k", 130.0)]))
    assert (await b.load_state(since=0, recent=0)).for_timers == [("r", "k", 130.0)]


async def test_a_refused_queued_run_leaves_the_admitted_runs_decision_alone(
        impl: Opener) -> None:
    """One batch opens an incident with a run (admitted) and queues a second (refused): the
    incident and the first decision stand; only the second is suppressed."""
    store, _ = await _two(impl)
    now = time.time()
    first, second = _run("ra", created=now), _run("rb", created=now + 1, status="queued")
    second.incident_id = first.incident_id
    batch = _decided(first)
    batch.decisions.append(DecisionRecord("am", "ev-rb", "r", "web-1", "queued", None,
                                          now + 1, first.incident_id, "rb"))
    batch.runs.append(second)
    fleet = [Limit("fleet", "window", 1, 3600.0, "budget", "fleet budget of 1 run")]
    batch.limits = {"ra": fleet, "rb": fleet}
    result = await store.commit(batch)
    assert set(result.refused) == {"rb"}
    assert await store.get_run("ra") is not None and await store.get_run("rb") is None
    assert [i.id for i in await store.list_incidents(status="open")] == [first.incident_id]
    assert [(d.event_id, d.outcome) for d in await store.decisions_for(run_id="ra")] == [
        ("ev-ra", "run_created")]


async def test_a_closed_incident_is_never_opened_again(impl: Opener) -> None:
    """A replica whose memory is behind the store upserts an incident another closed: it
    stays closed (its events count), so no event joins a closed incident."""
    a, b = await _two(impl)
    run = _run("run-1")
    await a.commit(_decided(run))
    await b.close_incident(run.incident_id or "", time.time(), "fixed")
    stale = IncidentRecord(run.incident_id or "", "r", "web-1", "open", run.created,
                           events=2, run_id=run.id)
    await a.commit(Batch(incidents={stale.id: stale}))
    (stored,) = await a.list_incidents()
    assert (stored.status, stored.outcome, stored.events) == ("closed", "fixed", 2)


async def test_writers_queued_together_each_get_their_own_answer(impl: Opener) -> None:
    """Writers queued while a commit is written share the next transaction (SQLite writes
    a group of plain batches, lease checks, fenced run writes and plain statements in one
    hop; a group with a batch it must decide goes the regular way): each writer still
    gets its own answer, a run taken over is refused and changes nothing, every other
    record is written once."""
    a, b = await _two(impl)
    held, lost = _run("held", status="running"), _run("lost")
    await a.commit(Batch(runs=[held, lost]))
    assert set(await b.claim_runs(("pending",), lease=0.0)) == {"lost"}
    now = time.time()
    first = _decided(_run("new-1", key="web-11"))

    def step(run_id: str, seq: int) -> StepRecord:
        return StepRecord(run_id, seq, "action", "core.noop", 1, "running", now)

    def saved(run: RunRecord, status: str) -> RunRecord:
        run.status = status
        return run

    answers = await asyncio.gather(
        a.commit(_decided(_run("new-0", key="web-10"))),  # alone: the others queue behind
        a.commit(first), a.holds("held"), a.holds("lost"),
        a.save_run(saved(held, "succeeded")), a.save_run(saved(lost, "running")),
        a.save_step(step("held", 1)), a.save_step(step("lost", 1)),
        a.append_audit(_audit(1)), a.append_audit(_audit(2)), return_exceptions=True)
    assert [type(x).__name__ for x in answers] == [
        "CommitResult", "CommitResult", "bool", "bool", "NoneType", "LeaseLost",
        "NoneType", "LeaseLost", "NoneType", "NoneType"]
    assert answers[2:4] == [True, False] and not answers[0] and not answers[1]
    stored_lost, stored_held = await b.get_run("lost"), await b.get_run("held")
    assert stored_lost is not None and (stored_lost.owner, stored_lost.status) == \
        ("b", "pending")
    assert stored_held is not None and stored_held.status == "succeeded"
    assert [s.seq for s in await b.steps("held")] == [1] and await b.steps("lost") == []
    assert [r.request for r in await b.audit(AuditQuery())] == ["req-2", "req-1"]

    # the event of a batch decided before, decided again (a redelivery: another run and
    # incident), among the writers: its duplicate is named, its run is not created, and
    # the writers with it are written once
    redelivered = _decided(_run("new-1b", key="web-13"))
    redelivered.decisions = [replace(d, event_id="ev-new-1") for d in redelivered.decisions]
    again = await asyncio.gather(
        a.commit(_decided(_run("new-2", key="web-12"))), a.append_audit(_audit(3)),
        a.commit(redelivered), a.save_step(step("held", 2)), a.holds("held"),
        return_exceptions=True)
    assert [type(x).__name__ for x in again] == [
        "CommitResult", "NoneType", "CommitResult", "NoneType", "bool"]
    assert isinstance(again[2], CommitResult)
    assert again[2].duplicates == {("am", "ev-new-1", "r")} and again[4] is True
    held_now = await b.get_run("held")
    assert held_now is not None and (held_now.owner, held_now.epoch) == ("a", held.epoch)
    assert again[2].skipped_runs == {"new-1b"} and await b.get_run("new-1b") is None
    assert [s.seq for s in await b.steps("held")] == [1, 2]
    assert [r.request for r in await b.audit(AuditQuery())] == ["req-3", "req-2", "req-1"]
    decided = await b.decisions(DecisionQuery())
    assert sorted(d.event_id for d in decided) == ["ev-new-0", "ev-new-1", "ev-new-2"]


async def test_a_new_run_saved_beside_a_run_taken_over_is_held_and_written(
        impl: Opener) -> None:
    """A run new to the store (a workflow's child) saved in the same group as a run this
    replica lost: the combined write changes fewer rows than it has, so each is written
    again alone, from before the combined write (review: the new run's row was already
    in, its second insert met the fence and it was refused with LeaseLost, then held by
    no one while this replica lived)."""
    a, b = await _two(impl)
    lost = _run("lost")
    await a.commit(Batch(runs=[lost]))
    assert set(await b.claim_runs(("pending",), lease=0.0)) == {"lost"}
    child = _run("lost-parent/child", status="running")
    lost.status = "running"
    answers = await asyncio.gather(
        a.append_audit(_audit(1)),  # alone: the two saves queue behind it, one group
        a.save_run(child), a.save_run(lost), return_exceptions=True)
    assert [type(x).__name__ for x in answers] == ["NoneType", "NoneType", "LeaseLost"]
    assert await a.holds(child.id) and not await a.holds("lost")
    child.status = "succeeded"
    await a.save_run(child)
    stored = await b.get_run(child.id)
    assert stored is not None and (stored.owner, stored.status) == ("a", "succeeded")
    # the same beside a batch that is not plain (a breaker): SQLite's regular path
    second = _run("lost-parent/second", status="running")
    now = time.time()
    regular = await asyncio.gather(
        a.append_audit(_audit(2)),
        a.commit(Batch(breakers=[BreakerRecord("r", now, now + 60, "3 failures")])),
        a.save_run(second), a.save_run(lost), return_exceptions=True)
    assert [type(x).__name__ for x in regular] == [
        "NoneType", "CommitResult", "NoneType", "LeaseLost"]
    assert await a.holds(second.id)


async def test_a_new_runs_save_cancelled_mid_write_leaves_it_held(impl: Opener) -> None:
    """The save of a run new to the store, cancelled while its group is written (a run
    cancelled as it starts): the group is written whole, so the run is stored and stays
    this replica's (review: the store forgot it held the run while the row went in, and
    every later save was refused with LeaseLost, the run held by no one)."""
    a = await impl(replica="a")
    child = _run("parent/child", status="running")
    saving = asyncio.create_task(a.save_run(child))
    await asyncio.sleep(0)  # its group is being written
    saving.cancel()
    await asyncio.gather(saving, return_exceptions=True)
    await a.append_audit(_audit(1))  # in the next group: the cancelled one is written
    assert await a.holds(child.id)
    child.status = "succeeded"
    await a.save_run(child)
    stored = await a.get_run(child.id)
    assert stored is not None and (stored.owner, stored.status) == ("a", "succeeded")
