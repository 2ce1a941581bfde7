"""Durability: a loopd process stops mid-run (as loopd.daemon does at shutdown: the
dispatcher's ``shutting_down`` set, then its tasks cancelled) and a new process on the same
SqliteStore resumes the run from what the store says (tests/workflow_harness.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from loopd.events import Event
from loopd.packs.executor import Executor
from loopd.packs.python import PythonRunner
from loopd.runs import states
from tests.servers import wait_until
from tests.workflow_harness import Harness, Process, open_harness


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path) as h:
        yield h


async def downtime_until(instant: float) -> None:
    """loopd stays down until the wall clock reaches ``instant``."""
    await wait_until(lambda: time.time() >= instant, timeout=5, interval=0.01,
                     what="the downtime to pass")


def cpu(host: str, value: float) -> Event:
    return Event(id=uuid.uuid4().hex, source="mqtt", topic=f"telemetry/{host}/cpu",
                 data={"value": value})


VERIFY = """
    input: [host]
    tasks:
      verify:
        confirm:
          event: {topic: "telemetry/{{ ctx.host }}/cpu", if: "event.value < 50"}
          within: %s
"""


async def test_a_waiting_confirmation_resumes_with_its_original_deadline(
        harness: Harness) -> None:
    """A run waiting for confirmation when loopd stops keeps its deadline across the restart
    and ends inconclusive at that instant, not a full window after the restart."""
    harness.load(verify=VERIFY % "400ms")
    run = await harness.start("verify", host="web-1")
    await harness.waiting_for_evidence()
    await harness.crash()
    stored = await harness.stored(run)
    assert stored.status == states.WAITING
    deadline = stored.progress["tasks"]["verify"]["deadline"]
    (waited,) = await harness.store.steps(run.id)
    await downtime_until(deadline - 0.2)
    restarted = time.time()
    await harness.resume()
    await harness.waiting_for_evidence()
    assert (await harness.stored(run)).progress["tasks"]["verify"]["deadline"] == deadline
    done = await harness.wait(run)
    assert (done.status, done.outcome) == (states.SUCCEEDED, states.INCONCLUSIVE)
    assert done.run.finished is not None
    assert deadline - 0.01 <= done.run.finished < restarted + 0.4 - 0.05
    (step,) = done.steps  # the waiting step is found again, not written anew
    assert (step.seq, step.started, step.status) == (waited.seq, waited.started,
                                                     "inconclusive")
    assert "run: resumed after a restart" in done.run.progress["history"]


async def test_a_resumed_confirmation_still_accepts_evidence(harness: Harness) -> None:
    """After a restart the resumed run waits on the new process' hub and is confirmed there."""
    harness.load(verify=VERIFY % "5s")
    run = await harness.start("verify", host="web-1")
    await harness.waiting_for_evidence()
    await harness.restart()
    await harness.waiting_for_evidence()
    harness.kinds.hub.offer(cpu("web-1", 12))
    done = await harness.wait(run)
    assert (done.status, done.outcome) == (states.SUCCEEDED, states.FIXED)
    assert done.ctx["verify"]["event"]["data"] == {"value": 12}


CHANGE = """
    tasks:
      change:
        action: %s
        input: {key: change}
        next: [{when: succeeded, do: done}, {when: failed, do: recover}]
      recover: {action: t.echo, input: {value: "{{ ctx.change.status }}"}}
      done: {succeed: fixed}
"""


async def test_a_non_idempotent_action_running_at_the_crash_is_interrupted(
        harness: Harness) -> None:
    """A non-idempotent action that was running when loopd stopped is not run again: its
    task ends `interrupted` and follows its failure transition."""
    harness.load(change=CHANGE % "t.hold")
    run = await harness.start("change")
    await wait_until(lambda: harness.calls.count("hold") == 1, timeout=5,
                     what="the action to start")
    await harness.restart()
    done = await harness.wait(run)
    assert harness.calls.count("hold") == 1
    assert (done.status, done.outcome) == (states.SUCCEEDED, states.DONE)
    assert done.tasks[-1] == "recover"
    assert harness.calls.of("echo") == [{"value": states.INTERRUPTED}]
    cut, interrupted = done.of("change")  # the attempt the stop cut short, then the verdict
    assert (cut.status, cut.error) == (states.INTERRUPTED,
                                       "loopd stopped while this step was running")
    assert interrupted.status == states.INTERRUPTED
    assert interrupted.error == ("loopd stopped while t.hold was running and it is not "
                                 "idempotent")
    assert interrupted.transition == "recover (when failed)"


async def test_a_run_waiting_for_an_executor_slot_at_the_crash_acts_after_the_restart(
        harness: Harness) -> None:
    """With one executor slot, a run whose non-idempotent action only waited for the slot
    when loopd stopped acts once after the restart; only the run that was acting ends
    `interrupted`."""
    await harness.crash()  # the harness' process, replaced by one with a single slot
    harness.executor = Executor(harness.registry, {"python": PythonRunner()}, max_concurrent=1)
    harness.process = Process(harness)
    harness.process.start()
    harness.load(bare="""
        input: [key]
        tasks:
          change: {action: t.hold, input: {key: "{{ ctx.key }}"}}
    """)
    acting = await harness.start("bare", key="a")
    await wait_until(lambda: harness.calls.count("hold") == 1, timeout=5,
                     what="the first action to start")
    waiting = await harness.start("bare", key="b")
    await wait_until(lambda: harness.dispatcher.active() == 2, timeout=5,
                     what="the second run to wait for the slot")
    await harness.crash()
    stored = await harness.stored(waiting)
    assert stored.progress is not None
    assert stored.progress["tasks"].get("change", {}).get("state") != "running"
    assert await harness.store.steps(waiting.id) == []  # nothing acted, nothing recorded
    harness.calls.gate.set()
    await harness.resume()
    await harness.wait(acting)
    assert [c.input["key"] for c in harness.calls.log] == ["a", "b"]  # each acted once
    assert (await harness.wait(acting)).status == states.INTERRUPTED
    done = await harness.wait(waiting)
    assert done.status == states.SUCCEEDED
    (step,) = done.steps
    assert (step.status, step.attempt) == (states.SUCCEEDED, 1)


async def test_an_unhandled_interruption_ends_the_run_interrupted(harness: Harness) -> None:
    """An interrupted task with no failure transition ends the run `interrupted`."""
    harness.load(bare="""
        tasks:
          change: {action: t.hold, input: {key: change}}
    """)
    run = await harness.start("bare")
    await wait_until(lambda: harness.calls.count("hold") == 1, timeout=5,
                     what="the action to start")
    await harness.restart()
    done = await harness.wait(run)
    assert (done.status, done.outcome) == (states.INTERRUPTED, states.OUTCOME_FAILED)
    assert harness.calls.count("hold") == 1


async def test_an_idempotent_action_running_at_the_crash_is_retried(harness: Harness) -> None:
    """An idempotent action that was running when loopd stopped runs again after resume."""
    harness.load(change=CHANGE % "t.hold_idempotent")
    run = await harness.start("change")
    await wait_until(lambda: harness.calls.count("hold") == 1, timeout=5,
                     what="the action to start")
    await harness.crash()
    harness.calls.gate.set()  # the second attempt completes
    await harness.resume()
    done = await harness.wait(run)
    assert harness.calls.count("hold") == 2
    assert (done.status, done.outcome) == (states.SUCCEEDED, states.FIXED)
    assert done.tasks == ["change", "change", "done"]
    assert [(s.attempt, s.status) for s in done.of("change")] == [
        (1, states.INTERRUPTED), (2, states.SUCCEEDED)]
    assert [s.seq for s in done.steps] == [1, 2, 3]  # no step record was overwritten


async def test_a_persisted_retry_delay_is_honoured_after_resume(harness: Harness) -> None:
    """A retry delay set before the crash holds after resume: the next attempt comes at the
    persisted instant, neither earlier nor a whole delay after the restart."""
    harness.load(retry="""
        tasks:
          work:
            action: t.flaky
            input: {key: k, fails: 1}
            retry: {count: 1, delay: 400ms}
    """)
    run = await harness.start("retry")

    async def delay_is_durable() -> bool:
        progress = (await harness.stored(run)).progress or {}
        return "not_before" in progress.get("tasks", {}).get("work", {})

    await wait_until(delay_is_durable, timeout=5, what="the retry delay to be stored")
    await harness.crash()
    not_before = (await harness.stored(run)).progress["tasks"]["work"]["not_before"]
    await downtime_until(not_before - 0.2)
    restarted = time.time()
    await harness.resume()
    done = await harness.wait(run)
    assert done.status == states.SUCCEEDED, done.reason
    assert harness.calls.count("flaky") == 2
    first, second = done.steps
    assert (first.attempt, second.attempt) == (1, 2)
    assert not_before - 0.005 <= second.started < restarted + 0.4 - 0.05


FAN = """
    tasks:
      each:
        action: %s
        with_items: [a, b, c, d]
        concurrency: 4
        input: {key: "{{ item }}"}
"""


async def test_with_items_resumes_without_rerunning_succeeded_items(harness: Harness) -> None:
    """A fan-out resumed after a crash runs again only the items that had not succeeded."""
    harness.load(fan=FAN % "t.hold_idempotent")
    harness.calls.free = {"a", "b"}
    run = await harness.start("fan")
    await wait_until(lambda: harness.calls.count("hold") == 4, timeout=5,
                     what="every item to start")
    await harness.crash()
    harness.calls.gate.set()
    await harness.resume()
    done = await harness.wait(run)
    assert done.status == states.SUCCEEDED, done.reason
    assert {k: harness.calls.count("hold", key=k) for k in "abcd"} == {
        "a": 1, "b": 1, "c": 2, "d": 2}
    assert [o["key"] for o in done.ctx["each"]["items"]] == ["a", "b", "c", "d"]


async def test_non_idempotent_items_running_at_the_crash_are_interrupted(
        harness: Harness) -> None:
    """Items of a non-idempotent fan-out that were running when loopd stopped are not run
    again; they are interrupted and fail the task, while finished items keep their result."""
    harness.load(fan=FAN % "t.hold")
    harness.calls.free = {"a", "b"}
    run = await harness.start("fan")
    await wait_until(lambda: harness.calls.count("hold") == 4, timeout=5,
                     what="every item to start")
    await harness.crash()
    harness.calls.gate.set()
    await harness.resume()
    done = await harness.wait(run)
    assert {k: harness.calls.count("hold", key=k) for k in "abcd"} == {
        "a": 1, "b": 1, "c": 1, "d": 1}
    assert done.status == states.FAILED
    assert done.ctx["each"]["failed"] == [2, 3]
    assert done.reason is not None and done.reason.startswith("2 of 4 items failed: ")
    assert "not idempotent" in done.reason


async def test_a_sub_workflow_is_resumed_by_its_parent(harness: Harness) -> None:
    """A child run waiting when loopd stops is resumed through its parent, with its deadline,
    and its context still reaches the parent."""
    harness.load(verify=VERIFY % "5s", parent="""
        input: [host]
        tasks:
          check: {workflow: t.verify, input: {host: "{{ ctx.host }}"}, next: done}
          done: {succeed: fixed}
    """)
    run = await harness.start("parent", host="web-1")
    await harness.waiting_for_evidence()
    child_id = f"{run.id}/check"
    deadline = (await harness.stored(child_id)).progress["tasks"]["verify"]["deadline"]
    await harness.restart()
    await harness.waiting_for_evidence()
    assert (await harness.stored(child_id)).progress["tasks"]["verify"]["deadline"] == deadline
    harness.kinds.hub.offer(cpu("web-1", 5))
    done = await harness.wait(run)
    assert (done.status, done.outcome) == (states.SUCCEEDED, states.FIXED)
    child = await harness.stored(child_id)
    assert (child.status, child.outcome) == (states.SUCCEEDED, states.FIXED)
    assert done.ctx["check"]["verify"]["event"]["data"] == {"value": 5}


async def test_a_task_timeout_keeps_its_original_deadline_after_resume(
        harness: Harness) -> None:
    """A task's ``timeout`` counts from when the task first started: after a restart the
    retried (idempotent) action times out at the persisted instant, not a timeout later."""
    harness.load(bounded="""
        tasks:
          work:
            action: t.slow
            input: {seconds: 30}
            timeout: 600ms
    """)
    run = await harness.start("bounded")
    await wait_until(lambda: harness.calls.count("slow") == 1, timeout=5,
                     what="the action to start")
    await harness.crash()
    deadline = (await harness.stored(run)).progress["tasks"]["work"]["timeout_at"]
    await downtime_until(deadline - 0.3)
    restarted = time.time()
    await harness.resume()
    done = await harness.wait(run)
    assert done.status == states.TIMED_OUT
    assert done.run.finished is not None
    assert deadline - 0.01 <= done.run.finished < restarted + 0.6 - 0.1
