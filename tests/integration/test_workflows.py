"""The workflow language (issue #3) end to end: a real SqliteStore, Executor, PythonRunner,
WorkflowRunner and Dispatcher running the test pack of tests/workflow_harness.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from loopd.runs import states
from tests.workflow_harness import Harness, open_harness


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path) as h:
        yield h


# -- inputs ------------------------------------------------------------------------------

TYPED = """
    input:
      host: {type: string, required: true}
      count: {type: integer, default: 3}
      mode: {type: string, default: safe, enum: [safe, fast]}
    tasks:
      show:
        action: t.echo
        input: {value: "{{ input.host }} {{ ctx.host }} {{ ctx.count * 2 }} {{ ctx.mode }}"}
"""


async def test_inputs_are_typed_and_defaults_fill_the_context(harness: Harness) -> None:
    """Given inputs reach `input` and `ctx`, and defaults fill the fields not given."""
    harness.load(typed=TYPED)
    done = await harness.run("typed", host="web-1")
    assert done.status == states.SUCCEEDED, done.reason
    assert (done.ctx["host"], done.ctx["count"], done.ctx["mode"]) == ("web-1", 3, "safe")
    assert harness.calls.of("echo") == [{"value": "web-1 web-1 6 safe"}]


@pytest.mark.parametrize(("given", "problem"), [
    ({"host": "web-1", "count": "three"}, "input: count: expected integer, got str"),
    ({"count": 2}, "input: host is required"),
    ({"host": "web-1", "mode": "reckless"}, "input: mode: 'reckless' is not one of"),
    ({"host": "web-1", "colour": "red"}, "input: unknown field(s) colour"),
])
async def test_an_input_failing_its_schema_fails_the_run_naming_the_field(
        harness: Harness, given: dict[str, Any], problem: str) -> None:
    """An input that does not fit the workflow's schema fails the run before any task runs."""
    harness.load(typed=TYPED)
    done = await harness.run("typed", **given)
    assert (done.status, done.outcome) == (states.FAILED, states.OUTCOME_FAILED)
    assert done.reason is not None and done.reason.startswith("workflow t.typed: ")
    assert problem in done.reason
    assert done.steps == [] and harness.calls.log == []


# -- the run context -----------------------------------------------------------------------

async def test_results_are_published_under_task_names_and_publish_adds_values(
        harness: Harness) -> None:
    """Each task's result lands in ctx under its name; `publish` adds values templated from
    ctx, input and result, and native types survive a single-expression template."""
    harness.load(ctx="""
        input: [host]
        tasks:
          first:
            action: t.echo
            input: {value: 5}
            publish: {doubled: "{{ result.value * 2 }}", seen: "{{ input.host }}/{{ ctx.host }}"}
            next: second
          second:
            action: t.echo
            input: {value: "{{ ctx.first.value + ctx.doubled }}"}
    """)
    done = await harness.run("ctx", host="web-1")
    assert done.status == states.SUCCEEDED, done.reason
    assert done.ctx["first"] == {"status": states.SUCCEEDED, "value": 5}
    assert (done.ctx["doubled"], done.ctx["seen"]) == (10, "web-1/web-1")
    assert done.ctx["second"] == {"status": states.SUCCEEDED, "value": 15}
    assert done.of("second")[0].input == {"value": 15}


# -- transitions ---------------------------------------------------------------------------

async def test_succeeded_and_failed_transitions_follow_the_result(harness: Harness) -> None:
    """A failed task takes its `failed` transition, a succeeded one its `succeeded` one."""
    harness.load(branch="""
        tasks:
          try:
            action: t.flaky
            input: {key: once, fails: 1}
            next: [{when: succeeded, do: happy}, {when: failed, do: again}]
          again:
            action: t.flaky
            input: {key: once, fails: 1}
            next: [{when: succeeded, do: happy}, {when: failed, do: sad}]
          happy: {action: t.echo, input: {value: happy}}
          sad: {action: t.echo, input: {value: sad}}
    """)
    done = await harness.run("branch")
    assert done.status == states.SUCCEEDED, done.reason
    assert done.tasks == ["try", "again", "happy"]
    assert done.of("try")[0].transition == "again (when failed)"
    assert done.of("again")[0].transition == "happy (when succeeded)"


async def test_the_first_matching_transition_wins(harness: Harness) -> None:
    """Transitions are tried in order and only the first whose condition holds is taken."""
    harness.load(first="""
        tasks:
          measure:
            action: t.echo
            input: {value: 5}
            next:
              - {when: "result.value > 10", do: big}
              - {when: "result.value > 1 and status == 'succeeded'", do: medium}
              - {when: "result.value > 0", do: small}
              - {when: always, do: small}
          big: {noop: true}
          medium: {noop: true}
          small: {noop: true}
    """)
    done = await harness.run("first")
    assert done.tasks == ["measure", "medium"]
    assert done.of("measure")[0].transition == "medium (when condition held)"


async def test_always_is_taken_whatever_the_status(harness: Harness) -> None:
    """An `always` transition handles a failure, so the run goes on and succeeds."""
    harness.load(always="""
        tasks:
          try:
            action: t.flaky
            input: {key: k, fails: 9}
            next: [{when: always, do: cleanup}]
          cleanup: {action: t.echo, input: {value: "{{ ctx.try.status }}"}}
    """)
    done = await harness.run("always")
    assert (done.status, done.tasks) == (states.SUCCEEDED, ["try", "cleanup"])
    assert harness.calls.of("echo") == [{"value": "failed"}]


async def test_a_run_that_only_logs_ends_done_not_fixed(harness: Harness) -> None:
    """A successful run without a confirm task (here only ``core.log``) has outcome ``done``."""
    harness.load(notify="""
        input: [host]
        tasks:
          say: {action: core.log, input: {message: "looked at {{ ctx.host }}"}}
    """)
    done = await harness.run("notify", host="web-1")
    assert (done.status, done.outcome) == (states.SUCCEEDED, states.DONE), done.reason
    assert (await harness.stored(done.run.id)).outcome == states.DONE


async def test_no_matching_transition_ends_the_run_with_the_tasks_status(
        harness: Harness) -> None:
    """A task with no transition for its result ends the run with that result."""
    harness.load(ends="""
        tasks:
          try:
            action: t.flaky
            input: {key: "{{ ctx.key }}", fails: "{{ ctx.fails }}"}
            next: [{when: "result.attempts == 99", do: never}]
          never: {noop: true}
    """)
    ok = await harness.run("ends", key="a", fails=0)
    failed = await harness.run("ends", key="b", fails=1)
    assert (ok.status, ok.outcome, ok.tasks) == (states.SUCCEEDED, states.DONE, ["try"])
    assert (failed.status, failed.outcome) == (states.FAILED, states.OUTCOME_FAILED)
    assert failed.reason == "t.flaky: b failed on attempt 1"
    assert failed.of("try")[0].transition == "no transition"


async def test_explicit_succeed_and_fail_end_the_run_with_their_text(harness: Harness) -> None:
    """`succeed` ends the run with its outcome, `fail` with its (templated) reason."""
    harness.load(explicit="""
        input: [host, good]
        tasks:
          decide:
            noop: true
            next:
              - {when: "ctx.good", do: done}
              - {when: always, do: give_up}
          done: {succeed: inconclusive}
          give_up: {fail: "gave up on {{ ctx.host }}"}
    """)
    good = await harness.run("explicit", host="web-1", good=True)
    bad = await harness.run("explicit", host="web-2", good=False)
    assert (good.status, good.outcome, good.reason) == (states.SUCCEEDED,
                                                        states.INCONCLUSIVE, None)
    assert (bad.status, bad.outcome, bad.reason) == (states.FAILED, states.OUTCOME_FAILED,
                                                     "gave up on web-2")
    assert bad.tasks == ["decide", "give_up"]


async def test_next_shorthand_goes_on_after_success_only(harness: Harness) -> None:
    """`next: name` is taken on success and is no transition on failure."""
    harness.load(short="""
        input: [fails]
        tasks:
          one:
            action: t.flaky
            input: {key: "k{{ ctx.fails }}", fails: "{{ ctx.fails }}"}
            next: two
          two: {action: t.echo, input: {value: 2}}
    """)
    ok = await harness.run("short", fails=0)
    failed = await harness.run("short", fails=1)
    assert (ok.status, ok.tasks) == (states.SUCCEEDED, ["one", "two"])
    assert (failed.status, failed.tasks) == (states.FAILED, ["one"])


# -- retries -------------------------------------------------------------------------------

async def test_retry_repeats_a_failed_action_and_records_each_attempt(
        harness: Harness) -> None:
    """`retry.count` more attempts are made and every attempt is a step with its number."""
    harness.load(retry="""
        input: [fails]
        tasks:
          work:
            action: t.flaky
            input: {key: "k{{ ctx.fails }}", fails: "{{ ctx.fails }}"}
            retry: {count: 2, delay: 10ms}
    """)
    ok = await harness.run("retry", fails=2)
    exhausted = await harness.run("retry", fails=5)
    assert ok.status == states.SUCCEEDED and ok.ctx["work"]["attempts"] == 3
    assert [(s.attempt, s.status) for s in ok.steps] == [
        (1, states.FAILED), (2, states.FAILED), (3, states.SUCCEEDED)]
    assert ok.steps[0].error == "t.flaky: k2 failed on attempt 1"
    assert exhausted.status == states.FAILED
    assert [s.attempt for s in exhausted.steps] == [1, 2, 3]
    assert exhausted.reason == "t.flaky: k5 failed on attempt 3"
    assert harness.calls.count("flaky", key="k5") == 3


async def test_retry_delay_grows_exponentially_up_to_max_delay(harness: Harness) -> None:
    """Attempts are spaced by delay * backoff**(n-1), capped at max_delay."""
    harness.load(backoff="""
        tasks:
          work:
            action: t.flaky
            input: {key: k, fails: 3}
            retry: {count: 3, delay: 50ms, backoff: 2, max_delay: 120ms}
    """)
    done = await harness.run("backoff")
    assert done.status == states.SUCCEEDED
    gaps = [b.started - a.finished for a, b in zip(done.steps, done.steps[1:], strict=False)
            if a.finished is not None]
    assert len(gaps) == 3
    assert gaps[0] >= 0.05 - 0.005 and gaps[1] >= 0.1 - 0.005 and gaps[2] >= 0.12 - 0.005
    assert gaps[2] < 0.2  # 50ms * 2**2 = 200ms, capped at 120ms


@pytest.mark.parametrize(("key", "attempts"), [("transient", 3), ("permanent", 1)])
async def test_retry_when_limits_which_failures_are_retried(harness: Harness, key: str,
                                                            attempts: int) -> None:
    """A failure whose error fails `retry.when` is not retried."""
    harness.load(when="""
        input: [key]
        tasks:
          work:
            action: t.flaky
            input: {key: "{{ ctx.key }}", fails: 9}
            retry: {count: 2, delay: 10ms, when: "not error.startswith('t.flaky: permanent')"}
    """)
    done = await harness.run("when", key=key)
    assert done.status == states.FAILED
    assert harness.calls.count("flaky", key=key) == attempts
    assert len(done.steps) == attempts


# -- delays and timeouts -------------------------------------------------------------------

async def test_delay_postpones_the_start_of_a_task(harness: Harness) -> None:
    """A task with `delay` starts that long after the transition that reached it."""
    harness.load(delayed="""
        tasks:
          first: {action: t.echo, input: {value: 1}, next: later}
          later: {action: t.echo, input: {value: 2}, delay: 150ms}
    """)
    done = await harness.run("delayed")
    first, later = done.steps
    assert first.finished is not None
    assert later.started - first.finished >= 0.15 - 0.005


async def test_task_timeout_is_timed_out_and_takes_the_failure_transition(
        harness: Harness) -> None:
    """A task over its `timeout` ends `timed_out`, which a `failed` transition handles."""
    harness.load(timeout="""
        tasks:
          work:
            action: t.slow
            input: {seconds: 5}
            timeout: 100ms
            next: [{when: failed, do: handle}]
          handle: {action: t.echo, input: {value: "{{ ctx.work.status }}: {{ ctx.work.error }}"}}
    """)
    done = await harness.run("timeout")
    assert done.status == states.SUCCEEDED, done.reason
    assert done.tasks == ["work", "handle"]
    assert harness.calls.of("echo") == [{"value": "timed_out: task work timed out after 0.1s"}]
    (work,) = done.of("work")
    assert (work.status, work.error) == (states.TIMED_OUT, "task work timed out after 0.1s")
    assert work.transition == "handle (when failed)"


async def test_timed_out_is_a_transition_word_of_its_own(harness: Harness) -> None:
    """`when: timed_out` matches a task timeout; an unhandled one ends the run timed_out."""
    harness.load(words="""
        input: [seconds]
        tasks:
          work:
            action: t.slow
            input: {seconds: "{{ ctx.seconds }}"}
            timeout: 100ms
            next: [{when: timed_out, do: slow_path}]
          slow_path: {noop: true}
    """)
    slow = await harness.run("words", seconds=5)
    assert (slow.status, slow.tasks) == (states.SUCCEEDED, ["work", "slow_path"])
    harness.load(unhandled="""
        tasks:
          work: {action: t.slow, input: {seconds: 5}, timeout: 100ms}
    """)
    unhandled = await harness.run("unhandled")
    assert (unhandled.status, unhandled.reason) == (states.TIMED_OUT,
                                                    "task work timed out after 0.1s")
    assert unhandled.outcome == states.OUTCOME_FAILED


async def test_run_timeout_ends_the_run_timed_out(harness: Harness) -> None:
    """A workflow `timeout` stops the run wherever it is and ends it timed_out."""
    harness.load(overall="""
        timeout: 200ms
        tasks:
          first: {action: t.echo, input: {value: 1}, next: stuck}
          stuck: {action: t.slow, input: {seconds: 5}, next: never}
          never: {noop: true}
    """)
    done = await harness.run("overall")
    assert (done.status, done.outcome) == (states.TIMED_OUT, states.OUTCOME_FAILED)
    assert done.reason == "workflow timed out after 0.2s"
    assert done.run.finished is not None and done.run.started is not None
    assert 0.2 - 0.01 <= done.run.finished - done.run.started < 2
    assert "never" not in done.tasks
    (stuck,) = done.of("stuck")
    assert (stuck.status, stuck.error) == (states.TIMED_OUT, "workflow timed out after 0.2s")


# -- parallel branches and fan-out --------------------------------------------------------

async def test_parallel_branches_run_together_and_join_waits_for_all(harness: Harness) -> None:
    """`do: [a, b]` runs both branches at once and a `join` task starts once, after both."""
    harness.load(fork="""
        tasks:
          start: {noop: true, next: {do: [a, b]}}
          a: {action: t.slow, input: {seconds: 0.05, key: a}, next: both}
          b: {action: t.slow, input: {seconds: 0.1, key: b}, next: both}
          both:
            join: [a, b]
            action: t.echo
            input: {value: "{{ ctx.a.key }}+{{ ctx.b.key }}"}
    """)
    done = await harness.run("fork")
    assert done.status == states.SUCCEEDED, done.reason
    assert harness.calls.peak == 2
    assert sorted(done.tasks) == ["a", "b", "both", "start"]
    (a,), (b,), (both,) = done.of("a"), done.of("b"), done.of("both")
    assert a.finished is not None and b.finished is not None
    assert both.started >= max(a.finished, b.finished)
    assert harness.calls.of("echo") == [{"value": "a+b"}]


async def test_a_failed_branch_fails_the_run_after_the_others_finish(harness: Harness) -> None:
    """A branch that fails unhandled makes the run fail, while a sibling branch completes."""
    harness.load(halves="""
        tasks:
          start: {noop: true, next: {do: [good, bad]}}
          good: {action: t.slow, input: {seconds: 0.05}}
          bad: {action: t.flaky, input: {key: bad, fails: 1}}
    """)
    done = await harness.run("halves")
    assert done.status == states.FAILED
    assert done.reason == "t.flaky: bad failed on attempt 1"
    assert done.ctx["good"]["status"] == states.SUCCEEDED


async def test_a_handled_failure_does_not_hide_another_branchs_failure(
        harness: Harness) -> None:
    """A failure handled in one branch leaves the unhandled failure of another standing."""
    harness.load(mixed="""
        tasks:
          start: {noop: true, next: {do: [bad, wobbly]}}
          bad: {action: t.flaky, input: {key: bad, fails: 1}}
          wobbly:
            action: t.slow
            input: {seconds: 0.05}
            next: [{when: always, do: wobble}]
          wobble:
            action: t.flaky
            input: {key: wobble, fails: 1}
            next: [{when: failed, do: recovered}]
          recovered: {noop: true}
    """)
    done = await harness.run("mixed")
    assert "recovered" in done.tasks
    assert (done.status, done.reason) == (states.FAILED, "t.flaky: bad failed on attempt 1")


async def test_with_items_respects_its_concurrency_limit(harness: Harness) -> None:
    """with_items runs one action per item, never more at once than `concurrency`."""
    harness.load(fan="""
        input: [hosts]
        tasks:
          each:
            action: t.slow
            with_items: "{{ ctx.hosts }}"
            concurrency: 2
            input: {seconds: 0.03, key: "{{ item }}"}
    """)
    hosts = [f"web-{i}" for i in range(6)]
    done = await harness.run("fan", hosts=hosts)
    assert done.status == states.SUCCEEDED, done.reason
    assert harness.calls.peak == 2
    assert sorted(c["key"] for c in harness.calls.of("slow")) == hosts
    assert [o["key"] for o in done.ctx["each"]["items"]] == hosts
    assert done.ctx["each"]["failed"] == []


async def test_with_items_retries_only_the_failed_items(harness: Harness) -> None:
    """A retried fan-out repeats only the items that failed."""
    harness.load(items="""
        tasks:
          each:
            action: t.flaky
            with_items: [a, b, c]
            input: {key: "{{ item }}", fails: "{{ 1 if item == 'b' else 0 }}"}
            retry: {count: 1, delay: 10ms}
    """)
    done = await harness.run("items")
    assert done.status == states.SUCCEEDED, done.reason
    assert [harness.calls.count("flaky", key=k) for k in "abc"] == [1, 2, 1]
    assert [o["attempts"] for o in done.ctx["each"]["items"]] == [1, 2, 1]


async def test_with_items_fails_naming_the_failed_items(harness: Harness) -> None:
    """A fan-out with an item that keeps failing fails with the index and error of it."""
    harness.load(broken="""
        tasks:
          each:
            action: t.flaky
            with_items: [a, b, c]
            input: {key: "{{ item }}", fails: "{{ 5 if item == 'b' else 0 }}"}
            retry: {count: 1, delay: 10ms}
    """)
    done = await harness.run("broken")
    assert done.status == states.FAILED
    assert done.ctx["each"]["failed"] == [1]
    assert done.reason == "1 of 3 items failed: t.flaky: b failed on attempt 2"


# -- sub-workflows --------------------------------------------------------------------------

async def test_sub_workflow_runs_as_a_child_record_and_returns_its_context(
        harness: Harness) -> None:
    """A `workflow` task runs a child run `parent/task` whose context comes back as result."""
    harness.load(child="""
        input: {host: {type: string, required: true}}
        tasks:
          look: {action: t.echo, input: {value: "looked at {{ ctx.host }}"}, next: done}
          done: {succeed: done}
    """, parent="""
        input: [host]
        tasks:
          check:
            workflow: t.child
            input: {host: "{{ ctx.host }}"}
            publish: {seen: "{{ result.look.value }}"}
    """)
    done = await harness.run("parent", host="web-1")
    assert done.status == states.SUCCEEDED, done.reason
    child = await harness.stored(f"{done.run.id}/check")
    assert (child.target, child.status, child.outcome) == ("t.child", states.SUCCEEDED,
                                                           states.DONE)
    assert child.input == {"host": "web-1"}
    assert done.ctx["seen"] == "looked at web-1"
    assert done.ctx["check"]["run"] == child.id
    assert done.ctx["check"]["outcome"] == states.DONE
    assert done.ctx["check"]["look"]["value"] == "looked at web-1"
    assert [s.task for s in await harness.store.steps(child.id)] == ["look", "done"]


# -- template errors at run time -------------------------------------------------------------

async def test_a_template_error_at_render_time_fails_the_run_naming_task_and_cause(
        harness: Harness) -> None:
    """A template that cannot be evaluated fails its task, and the run's reason names both."""
    harness.load(render="""
        input: {count: {type: any}}
        tasks:
          first: {action: t.echo, input: {value: 1}, next: bump}
          bump: {action: t.echo, input: {value: "{{ ctx.count + 1 }}"}}
    """)
    done = await harness.run("render", count="three")
    assert done.status == states.FAILED
    assert done.reason is not None
    assert done.reason.startswith("task bump input: 'ctx.count + 1': TypeError: ")
    (bump,) = done.of("bump")
    assert (bump.status, bump.error) == (states.FAILED, done.reason)
    assert harness.calls.of("echo") == [{"value": 1}]
