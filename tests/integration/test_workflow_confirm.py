"""Closing the loop: confirm tasks, rollback, approvals, cancellation, outcomes and their
metrics, with the real engine of tests/workflow_harness.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from loopd import metrics
from loopd.events import Event
from loopd.messages import CancelRun, StartRun
from loopd.runs import states
from loopd.store.base import RunRecord
from loopd.units import parse_time
from tests.servers import wait_until
from tests.workflow_harness import Harness, open_harness


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path) as h:
        yield h


def telemetry(topic: str, source: str = "mqtt", **data: Any) -> Event:
    return Event(id=uuid.uuid4().hex, source=source, topic=topic, data=data)


def metric(name: str, **labels: str) -> float:
    return metrics.current().registry.get_sample_value(name, labels) or 0.0


# -- confirm -------------------------------------------------------------------------------

VERIFY = """
    input: [host, metric]
    tasks:
      verify:
        confirm:
          event:
            source: mqtt
            topic: "telemetry/{{ ctx.host }}/cpu"
            match: {kind: "{{ ctx.metric }}"}
            if: "event.value < 50"
          within: %s
"""


async def test_matching_event_confirms_the_fix(harness: Harness) -> None:
    """The first event on the run's templated topic and match values that satisfies `if`
    confirms the fix; other hosts, other match values and other sources are no evidence."""
    harness.load(verify=VERIFY % "5s")
    run = await harness.start("verify", host="web-1", metric="user")
    await harness.waiting_for_evidence()
    assert (await harness.stored(run)).status == states.WAITING
    harness.kinds.hub.offer(telemetry("telemetry/web-2/cpu", kind="user", value=10))
    harness.kinds.hub.offer(telemetry("telemetry/web-1/cpu", kind="system", value=10))
    harness.kinds.hub.offer(telemetry("telemetry/web-1/cpu", source="kafka", kind="user",
                                      value=10))
    assert len(harness.kinds.hub) == 1  # none of those ended the wait
    harness.kinds.hub.offer(telemetry("telemetry/web-1/cpu", kind="user", value=20))
    done = await harness.wait(run)
    assert (done.status, done.outcome) == (states.SUCCEEDED, states.FIXED)
    assert done.ctx["verify"]["evidence"] == "event"
    assert done.ctx["verify"]["event"]["topic"] == "telemetry/web-1/cpu"
    assert done.ctx["verify"]["event"]["data"] == {"kind": "user", "value": 20}
    assert len(harness.kinds.hub) == 0
    # the step shows what it waited for, rendered for this run (the trace shows it)
    (step,) = done.steps
    assert step.input == {"within": 5.0, "interval": 15.0, "event": {
        "source": "mqtt", "topic": "telemetry/web-1/cpu", "match": {"kind": "user"},
        "if": "event.value < 50"}}


async def test_counter_evidence_means_not_fixed(harness: Harness) -> None:
    """An event about the entity that fails `if` makes the deadline a failure: not fixed."""
    harness.load(verify=VERIFY % "200ms")
    run = await harness.start("verify", host="web-1", metric="user")
    await harness.waiting_for_evidence()
    harness.kinds.hub.offer(telemetry("telemetry/web-1/cpu", kind="user", value=97))
    done = await harness.wait(run)
    assert (done.status, done.outcome) == (states.FAILED, states.NOT_FIXED)
    assert done.reason == "not fixed: 1 piece(s) of evidence against within 0.2s"
    assert done.ctx["verify"]["last_evidence"]["data"] == {"kind": "user", "value": 97}
    (step,) = done.steps
    assert step.status == states.FAILED and step.finished is not None
    assert step.finished - step.started >= 0.2 - 0.01


async def test_no_evidence_is_inconclusive_and_other_entities_do_not_count(
        harness: Harness) -> None:
    """Without an event about its own entity the confirmation is inconclusive at the deadline,
    however many events about another entity arrive."""
    harness.load(verify=VERIFY % "200ms")
    run = await harness.start("verify", host="web-1", metric="user")
    await harness.waiting_for_evidence()
    harness.kinds.hub.offer(telemetry("telemetry/web-2/cpu", kind="user", value=97))
    harness.kinds.hub.offer(telemetry("telemetry/web-2/cpu", kind="user", value=3))
    done = await harness.wait(run)
    assert (done.status, done.outcome) == (states.SUCCEEDED, states.INCONCLUSIVE)
    assert done.ctx["verify"] == {"status": "inconclusive",
                                  "error": "no evidence within 0.2s"}


async def test_concurrent_runs_each_wait_for_their_own_entity(harness: Harness) -> None:
    """Two runs waiting on the same templated topic are confirmed by their own host only."""
    harness.load(verify=VERIFY % "5s")
    one = await harness.start("verify", host="web-1", metric="user")
    two = await harness.start("verify", entity="web-2", host="web-2", metric="user")
    await harness.waiting_for_evidence(2)
    harness.kinds.hub.offer(telemetry("telemetry/web-2/cpu", kind="user", value=1))
    await harness.waiting_for_evidence(1)
    assert (await harness.stored(two)).status == states.SUCCEEDED
    assert (await harness.stored(one)).status == states.WAITING
    harness.kinds.hub.offer(telemetry("telemetry/web-1/cpu", kind="user", value=1))
    done = await harness.wait(one)
    assert done.outcome == states.FIXED


# -- rollback ------------------------------------------------------------------------------

ROLLBACK = """
    input: [host]
    tasks:
      first: {action: t.deploy, input: {name: app1}, next: tell}
      tell: {action: t.notify, input: {message: deployed}, next: second}
      second: {action: t.deploy, input: {name: app2}, next: verify}
      verify:
        confirm:
          event: {topic: "telemetry/{{ ctx.host }}/health", if: "event.ok"}
          within: 200ms
        next:
          - {when: succeeded, do: fixed}
          - {when: always, do: undo}
      undo: {rollback: %s, next: {when: always, do: give_up}}
      fixed: {succeed: fixed}
      give_up: {fail: "rolled back {{ ctx.undo.rolled_back }}"}
"""


async def test_failed_confirmation_compensates_completed_steps_in_reverse(
        harness: Harness) -> None:
    """After a failed confirmation, `rollback: all` runs the declared rollback action of each
    completed step, newest first, with the step's input and result; steps without one are
    skipped."""
    harness.load(undo=ROLLBACK % "all")
    run = await harness.start("undo", host="web-1")
    await harness.waiting_for_evidence()
    harness.kinds.hub.offer(telemetry("telemetry/web-1/health", ok=False))
    done = await harness.wait(run)
    assert harness.calls.of("undeploy") == [{"name": "app2", "version": "app2-v2"},
                                            {"name": "app1", "version": "app1-v2"}]
    assert done.tasks == ["first", "tell", "second", "verify", "undo:second", "undo:first",
                          "undo", "give_up"]
    assert done.ctx["undo"] == {"status": states.SUCCEEDED, "rolled_back": ["second", "first"],
                                "failed": []}
    assert (done.status, done.outcome) == (states.FAILED, states.NOT_FIXED)
    assert done.reason == "rolled back ['second', 'first']"
    assert harness.calls.count("notify") == 1


async def test_rollback_of_named_tasks_leaves_the_others(harness: Harness) -> None:
    """`rollback: [names]` compensates only the steps it names."""
    harness.load(undo=ROLLBACK % "[first]")
    run = await harness.start("undo", host="web-1")
    await harness.waiting_for_evidence()
    harness.kinds.hub.offer(telemetry("telemetry/web-1/health", ok=False))
    done = await harness.wait(run)
    assert harness.calls.of("undeploy") == [{"name": "app1", "version": "app1-v2"}]
    assert done.ctx["undo"]["rolled_back"] == ["first"]


# -- approval ------------------------------------------------------------------------------

APPROVAL = """
    input: [host]
    tasks:
      ask:
        approval: {within: %s, message: "restart nginx on {{ ctx.host }}?"}
        next: go
      go: {action: t.notify, input: {message: "go {{ ctx.host }}"}}
"""


async def decide_when_pending(harness: Harness, run: RunRecord, approved: bool,
                              reason: str | None = None) -> None:
    async def pending() -> bool:
        return (await harness.stored(run)).status == states.AWAITING_APPROVAL

    await wait_until(pending, timeout=5, what="the run to await approval")
    await wait_until(lambda: harness.approvals.decide(run.id, approved, reason) is None,
                     timeout=5, what="the approval to be decided")


async def test_approved_run_continues(harness: Harness) -> None:
    """An approval decided yes lets the run go on to the next task."""
    harness.load(ask=APPROVAL % "5s")
    run = await harness.start("ask", host="web-1")
    await decide_when_pending(harness, run, True, "ok by me")
    done = await harness.wait(run)
    assert (done.status, done.outcome) == (states.SUCCEEDED, states.DONE)
    assert harness.calls.of("notify") == [{"message": "go web-1"}]
    (ask,) = done.of("ask")
    assert ask.input["message"] == "restart nginx on web-1?"
    # when it expires, in the one time format (5 s after the step started)
    assert parse_time(ask.input["expires"]) == pytest.approx(ask.started + 5, abs=0.01)
    assert ask.output == {"approved": True, "reason": "ok by me"}


async def test_rejected_run_ends_rejected(harness: Harness) -> None:
    """An approval decided no ends the run `rejected` with the reason given, doing nothing."""
    harness.load(ask=APPROVAL % "5s")
    run = await harness.start("ask", host="web-1")
    await decide_when_pending(harness, run, False, "change freeze")
    done = await harness.wait(run)
    assert (done.status, done.outcome) == (states.REJECTED, states.OUTCOME_CANCELLED)
    assert done.reason == "rejected: change freeze"
    assert harness.calls.log == []
    assert harness.approvals.decide(run.id, True, None) == f"run {run.id} is not awaiting approval"


async def test_unanswered_approval_expires(harness: Harness) -> None:
    """An approval nobody decides before `within` ends the run `expired`."""
    harness.load(ask=APPROVAL % "100ms")
    done = await harness.run("ask", host="web-1")
    assert (done.status, done.outcome) == (states.EXPIRED, states.OUTCOME_CANCELLED)
    assert done.reason == "approval of ask expired"
    assert done.of("ask")[0].status == states.EXPIRED
    assert harness.calls.log == []


# -- cancellation --------------------------------------------------------------------------

async def test_cancel_through_the_dispatcher_ends_the_run_cancelled(harness: Harness) -> None:
    """Dispatcher.cancel stops a waiting run: status and outcome cancelled, incident closed."""
    harness.load(verify=VERIFY % "30s")
    run = await harness.start("verify", incident="inc-1", host="web-1", metric="user")
    await harness.waiting_for_evidence()
    assert harness.cancel(run)
    done = await harness.wait(run)
    assert (done.status, done.outcome) == (states.CANCELLED, states.OUTCOME_CANCELLED)
    assert done.reason == "cancelled through the API"
    assert harness.process.incidents == [("inc-1", states.OUTCOME_CANCELLED)]
    assert len(harness.kinds.hub) == 0
    assert not harness.cancel(run)


async def test_a_cancel_that_follows_its_start_in_the_queue_ends_the_run_before_it_acts(
    harness: Harness,
) -> None:
    """CancelRun right behind its StartRun (a run decided and cancelled in one batch) ends
    the run cancelled with the engine's reason, before any task runs; a cancel that may
    not stop an acting run (acting_too=False) does not stop one that acts."""
    harness.load(verify=VERIFY % "30s")
    first = await harness.start("verify", incident="inc-1", host="web-1", metric="user")
    await harness.waiting_for_evidence()
    harness.dispatcher.commands.put_nowait(CancelRun(first.id, "alert resolved"))
    run = RunRecord("run-2", "inc-2", "test-rule", "web-2", "workflow", "t.verify",
                    {"host": "web-2", "metric": "user"}, states.PENDING, time.time())
    await harness.store.save_run(run)
    harness.dispatcher.commands.put_nowait(StartRun(run))
    harness.dispatcher.commands.put_nowait(CancelRun(run.id, "restarted by event e2",
                                                     acting_too=True))
    await wait_until(lambda: ("inc-2", states.OUTCOME_CANCELLED) in harness.process.incidents,
                     timeout=5, what="the second run to end")
    done = await harness.stored(run)
    assert (done.status, done.reason) == (states.CANCELLED, "restarted by event e2")
    assert await harness.store.steps(run.id) == []
    assert (await harness.stored(first)).status == states.WAITING  # it acts: not stopped
    assert harness.cancel(first)


# -- outcomes and their metrics --------------------------------------------------------------

LOOP = """
    input: [host, fails]
    tasks:
      fix:
        action: t.flaky
        input: {key: "{{ ctx.host }}", fails: "{{ ctx.fails }}"}
        next: verify
      verify:
        confirm:
          event: {topic: "telemetry/{{ ctx.host }}/cpu", if: "event.value < 50"}
          within: 200ms
"""


@pytest.mark.parametrize(("fails", "value", "status", "outcome", "confirmed"), [
    (0, 10, states.SUCCEEDED, states.FIXED, states.SUCCEEDED),
    (0, 90, states.FAILED, states.NOT_FIXED, states.FAILED),
    (0, None, states.SUCCEEDED, states.INCONCLUSIVE, "inconclusive"),
    (1, None, states.FAILED, states.OUTCOME_FAILED, None),
    (0, "cancel", states.CANCELLED, states.OUTCOME_CANCELLED, None),
])
async def test_outcomes_and_their_metrics(harness: Harness, fails: int, value: Any,
                                          status: str, outcome: str, confirmed: str | None
                                          ) -> None:
    """Each way a remediation can end has its outcome (WorkflowRunner.outcome), and
    loopd_runs_total, loopd_run_outcomes_total and loopd_confirmations_total count it."""
    harness.load(loop=LOOP)
    before: dict[str, Any] = {
        "runs": metric("loopd_runs_total", workflow="t.loop", status=status),
        "outcomes": metric("loopd_run_outcomes_total", workflow="t.loop", outcome=outcome),
        "confirm": {r: metric("loopd_confirmations_total", workflow="t.loop", result=r)
                    for r in (states.SUCCEEDED, states.FAILED, "inconclusive")},
    }
    run = await harness.start("loop", host="web-1", fails=fails)
    if fails == 0:
        await harness.waiting_for_evidence()
        if value == "cancel":
            assert harness.cancel(run)
        elif value is not None:
            harness.kinds.hub.offer(telemetry("telemetry/web-1/cpu", value=value))
    done = await harness.wait(run)
    assert (done.status, done.outcome) == (status, outcome)
    assert harness.runner.outcome(done.run, done.status) == outcome
    assert metric("loopd_runs_total", workflow="t.loop", status=status) == before["runs"] + 1
    assert metric("loopd_run_outcomes_total", workflow="t.loop",
                  outcome=outcome) == before["outcomes"] + 1
    for result, count in before["confirm"].items():
        moved = 1 if result == confirmed else 0
        assert metric("loopd_confirmations_total", workflow="t.loop",
                      result=result) == count + moved, result
