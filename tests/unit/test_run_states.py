"""Run states (loopd.runs.states): the transition table, outcomes, and typed progress."""

from __future__ import annotations

import typing

import orjson
import pytest

from loopd.errors import IllegalTransition, LoopdError
from loopd.runs import states
from loopd.runs.progress import Ended, Progress, TaskState
from loopd.runs.states import TRANSITIONS, Outcome, RunStatus
from loopd.store.base import LIVE, RunRecord
from loopd.workflow.model import Task

LEGAL = [(a, b) for a, nexts in TRANSITIONS.items() for b in sorted(nexts)]
ILLEGAL = [(states.SUCCEEDED, states.RUNNING), (states.CANCELLED, states.PENDING),
           (states.FAILED, states.SUCCEEDED), (states.QUEUED, states.RUNNING),
           (states.PENDING, states.SUCCEEDED), (states.WAITING, states.SUCCEEDED),
           (states.CRASHED, states.CRASHED), (states.EXPIRED, states.RUNNING)]


def record(status: str) -> RunRecord:
    return RunRecord("run-1", None, "r", "web-1", "workflow", "p.w", {}, status, 0.0)


def test_every_status_has_a_row_and_finals_have_no_way_out() -> None:
    """The table covers every status, and only final statuses have no next status."""
    assert set(TRANSITIONS) == set(RunStatus)
    assert set(states.FINAL) == {s for s, nexts in TRANSITIONS.items() if not nexts}
    assert not set(states.ACTIVE) & set(states.FINAL)


@pytest.mark.parametrize(("current", "wanted"), LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
def test_every_legal_move_is_allowed(current: RunStatus, wanted: RunStatus) -> None:
    """Each edge of the table moves the run to that status."""
    run = record(current)
    states.move(run, wanted)
    assert run.status == wanted


@pytest.mark.parametrize(("current", "wanted"), ILLEGAL,
                         ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_an_illegal_move_raises_naming_run_and_both_statuses(current: str, wanted: str
                                                             ) -> None:
    """A move with no edge raises a LoopdError naming the run id, from and to, and leaves
    the run as it was."""
    run = record(current)
    with pytest.raises(IllegalTransition) as caught:
        states.move(run, wanted)
    assert isinstance(caught.value, LoopdError)
    assert str(caught.value) == f"run run-1: no transition from {current} to {wanted}"
    assert run.status == current


def test_an_unknown_status_is_an_illegal_move() -> None:
    """A status string outside the enum is refused like an illegal move."""
    with pytest.raises(IllegalTransition, match="run-1"):
        states.move(record(states.RUNNING), "exploded")


def test_move_records_reason_and_end_instant() -> None:
    """``reason`` and ``at`` go into the run with the status."""
    run = record(states.RUNNING)
    states.move(run, states.FAILED, reason="boom", at=12.5)
    assert (run.status, run.reason, run.finished) == (states.FAILED, "boom", 12.5)


def test_a_success_without_confirmation_is_done_not_fixed() -> None:
    """default_outcome gives ``done`` for succeeded, ``cancelled`` and ``failed`` otherwise."""
    assert states.default_outcome(states.SUCCEEDED) is Outcome.DONE
    assert states.default_outcome(states.REJECTED) is Outcome.CANCELLED
    assert states.default_outcome(states.CRASHED) is Outcome.FAILED


def test_the_succeed_field_allows_exactly_the_outcomes() -> None:
    """The workflow model's ``succeed`` literal lists exactly the Outcome values."""
    hint = typing.get_type_hints(Task)["succeed"]
    (literal, _none) = typing.get_args(hint)
    assert set(typing.get_args(literal)) == {o.value for o in Outcome}


def test_progress_round_trips_through_json() -> None:
    """A full progress survives to_json, the store's JSON encoding and from_json."""
    progress = Progress(
        ready=["b"], arrived={"j": ["a"]}, completed=["a"], history=["a: succeeded"], seq=7,
        tasks={"a": TaskState("done", 2, "succeeded", input={"k": 1}),
               "b": TaskState("waiting", 1, step=6, step_started=1.5, deadline=9.0,
                              not_before=3.0, timeout_at=4.0),
               "c": TaskState("running", 1, items={"0": TaskState("running", 1,
                                                                   interrupted=True),
                                                   "1": TaskState("done", 1, "succeeded",
                                                                  output={"x": 1})})},
        ended=Ended(RunStatus.SUCCEEDED, None, Outcome.FIXED), failed_branch="why",
        failed_status=RunStatus.REJECTED, deadline=100.0, confirm="succeeded", gate=5.0)
    assert Progress.from_json(orjson.loads(orjson.dumps(progress.to_json()))) == progress


def test_progress_saved_by_the_dict_version_loads() -> None:
    """The JSON shape the untyped runner saved reads back, free-text outcomes dropped."""
    stored = {"ready": ["verify"], "arrived": {}, "completed": ["restart"], "seq": 3,
              "history": ["restart: succeeded"], "failed_branch": None, "deadline": None,
              "ended": {"status": "succeeded", "reason": None, "outcome": "restarted_web-1"},
              "tasks": {"restart": {"state": "done", "status": "succeeded", "attempt": 1},
                        "verify": {"state": "waiting", "attempt": 0, "deadline": 50.0,
                                   "step": 3, "step_started": 20.0}}}
    progress = Progress.from_json(stored)
    assert progress.tasks["verify"] == TaskState("waiting", 0, step=3, step_started=20.0,
                                                 deadline=50.0)
    assert progress.ended == Ended(RunStatus.SUCCEEDED, None, None)
    assert Progress.from_json(None) == Progress() == Progress.from_json({})
    assert Progress.from_json({"gate": {"deadline": 8.0}}).gate == 8.0


def test_the_store_knows_which_statuses_have_not_ended() -> None:
    """loopd.store cannot import the run states; its copy must not drift from them."""
    assert frozenset(states.ACTIVE) | {states.QUEUED} == LIVE
    assert not LIVE & set(states.FINAL)
