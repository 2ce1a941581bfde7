"""Leases in one process: a run taken over by another replica stops here without writing
or acting (the lease check before each action, the fenced writes), and the taker resumes
it from its last stored step."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from loopd import metrics
from loopd.runs import states
from loopd.store.sqlite import SqliteStore
from tests.servers import wait_until
from tests.workflow_harness import Harness, Process, open_harness

WAIT_THEN_ACT = """
tasks:
  pause: {delay: 1500ms, next: act}
  act: {action: t.notify, input: {message: restart nginx}}
"""


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path) as h:
        yield h


def _silence(path: Path, replica: str) -> None:
    """The replica's heartbeat stops (as when its process is paused past the lease)."""
    with contextlib.closing(sqlite3.connect(str(path))) as db, db:
        db.execute("UPDATE replicas SET heartbeat=0 WHERE name=?", (replica,))


async def test_a_run_taken_over_while_it_waits_neither_acts_nor_writes(
        harness: Harness) -> None:
    """While the run waits in a delay, another replica takes it over; when the delay ends
    this replica does not act (the non-idempotent action is never called here), writes
    nothing more (the stored run is the taker's, unchanged), and counts the lost lease."""
    harness.load(change=WAIT_THEN_ACT)
    run = await harness.start("change")
    await wait_until(_pausing(harness, run.id), timeout=5,
                     what="the run to wait in its delay")
    other = SqliteStore(harness.store.path, replica="survivor", lease=0.1)
    await other.open()
    try:
        _silence(harness.store.path, harness.store.replica)
        claimed = await other.claim_runs(states.ACTIVE, others_only=True)
        assert run.id in claimed
        taken = await other.get_run(run.id)
        assert taken is not None and taken.owner == "survivor"
        lost_before = metrics.current().value("loopd_lease_lost_total")
        await harness.dispatcher.drain(10)
        assert harness.calls.count("notify") == 0
        assert metrics.current().value("loopd_lease_lost_total") == lost_before + 1
        after = await other.get_run(run.id)
        assert after is not None
        assert (after.owner, after.epoch, after.version, after.status) == (
            "survivor", taken.epoch, taken.version, taken.status)
        assert [s.task for s in await other.steps(run.id)] == \
            [s.task for s in await harness.store.steps(run.id)]
    finally:
        await other.close()


async def test_a_replica_takes_over_and_finishes_a_silent_replicas_run(
        harness: Harness) -> None:
    """The taker's dispatcher resumes the run from its stored step and finishes it."""
    harness.load(change=WAIT_THEN_ACT)
    run = await harness.start("change")
    await wait_until(_pausing(harness, run.id), timeout=5,
                     what="the run to wait in its delay")
    await harness.crash()  # the first replica stops as it would at kill -9: run as stored
    _silence(harness.store.path, harness.store.replica)
    harness.store.replica = "survivor"  # the same file, seen by another replica
    harness.process = Process(harness)
    harness.process.start()
    taken = await harness.dispatcher.takeover()
    assert [r.id for r in taken] == [run.id]
    harness.dispatcher.start(taken)
    done = await harness.wait(run)
    assert done.status == states.SUCCEEDED, done.reason
    assert harness.calls.count("notify") == 1
    assert done.run.owner == "survivor"


def _pausing(harness: Harness, run_id: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        stored = await harness.store.get_run(run_id)
        tasks = (stored.progress or {}).get("tasks", {}) if stored is not None else {}
        return bool(tasks.get("pause", {}).get("state") == "waiting")
    return check
