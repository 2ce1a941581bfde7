"""Run states: a status enum, its legal moves as a table, and the outcome enum.

```
 pending, awaiting_approval ──► queued ──► pending        (run_mode queued)

 (rule gate) awaiting_approval ───► pending
      │                               │  └──► failed      (unknown workflow, invalid input)
      │                               ▼
      │    ⟲ resumed ──────────────► running ◄──────► waiting ◄──► awaiting_approval
      │                               │                  (confirm task)    (approval task)
      │                               │                  └──► failed | timed_out (on resume)
      │                               └──► succeeded | failed | timed_out | interrupted
      │                                    | rejected | expired
      └──► rejected | expired | running                  (nobody approved the gate / resume)

 every active status ──► cancelled | crashed;        queued ──► cancelled
```
``running -> running`` is a run resumed after a restart. The table below is the truth; the
drawing is its picture. Every write of a run's status goes through :func:`move`.

Outcome (what the loop achieved, separate from how the run ended): ``fixed``
(confirmed), ``not_fixed`` (confirmation failed), ``inconclusive`` (no evidence
before the deadline), ``failed`` (the run failed before confirming),
``cancelled``, and ``done``: the run succeeded without confirming anything (it
notified, recorded, escalated), so it does not count as a fix.
"""

from __future__ import annotations

from enum import StrEnum

from loopd.errors import IllegalTransition
from loopd.store.base import RunRecord


class RunStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"  # run_mode queued: waits for the incident's current run, not dispatched
    RUNNING = "running"
    WAITING = "waiting"
    AWAITING_APPROVAL = "awaiting_approval"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    CRASHED = "crashed"
    REJECTED = "rejected"
    EXPIRED = "expired"


class Outcome(StrEnum):
    FIXED = "fixed"
    NOT_FIXED = "not_fixed"
    INCONCLUSIVE = "inconclusive"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DONE = "done"


S = RunStatus
_ENDS = frozenset({S.CANCELLED, S.CRASHED})  # reachable from every active status
# a run resumed while waiting can end without running again: its workflow is gone after a
# reload (failed), or its overall deadline passed while loopd was down (timed_out)
_WAITS_END = frozenset({S.FAILED, S.TIMED_OUT})
TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    S.PENDING: _ENDS | {S.QUEUED, S.RUNNING, S.FAILED},
    # approval + queued run modes queue a gated run (see loopd.decide.incidents)
    S.QUEUED: frozenset({S.PENDING, S.CANCELLED}),
    S.AWAITING_APPROVAL: _ENDS | _WAITS_END | {S.QUEUED, S.PENDING, S.RUNNING, S.WAITING,
                                               S.REJECTED, S.EXPIRED},
    S.RUNNING: _ENDS | {S.RUNNING, S.WAITING, S.AWAITING_APPROVAL, S.SUCCEEDED, S.FAILED,
                        S.TIMED_OUT, S.INTERRUPTED, S.REJECTED, S.EXPIRED},
    S.WAITING: _ENDS | _WAITS_END | {S.RUNNING, S.AWAITING_APPROVAL},
    **{final: frozenset() for final in (S.SUCCEEDED, S.FAILED, S.TIMED_OUT, S.CANCELLED,
                                        S.INTERRUPTED, S.CRASHED, S.REJECTED, S.EXPIRED)},
}

# Module constants kept for call sites elsewhere (StrEnum members are str; the store saves
# their values).
PENDING, QUEUED, RUNNING, WAITING = S.PENDING, S.QUEUED, S.RUNNING, S.WAITING
AWAITING_APPROVAL, SUCCEEDED, FAILED, TIMED_OUT = (
    S.AWAITING_APPROVAL, S.SUCCEEDED, S.FAILED, S.TIMED_OUT)
CANCELLED, INTERRUPTED, CRASHED, REJECTED, EXPIRED = (
    S.CANCELLED, S.INTERRUPTED, S.CRASHED, S.REJECTED, S.EXPIRED)

ACTIVE = (PENDING, RUNNING, WAITING, AWAITING_APPROVAL)
FINAL = tuple(s for s, nxt in TRANSITIONS.items() if not nxt)

FIXED, NOT_FIXED, INCONCLUSIVE, DONE = (
    Outcome.FIXED, Outcome.NOT_FIXED, Outcome.INCONCLUSIVE, Outcome.DONE)
OUTCOME_FAILED, OUTCOME_CANCELLED = Outcome.FAILED, Outcome.CANCELLED


def move(run: RunRecord, status: str, *, reason: str | None = None,
         at: float | None = None) -> None:
    """Set ``run.status`` to ``status`` if the table allows the move, else raise
    ``IllegalTransition``; ``reason`` (when given) becomes the run's reason, and ``at``
    (when given) its ``finished`` instant."""
    try:
        current, wanted = RunStatus(run.status), RunStatus(status)
    except ValueError:
        raise IllegalTransition(run.id, run.status, status) from None
    if wanted not in TRANSITIONS[current]:
        raise IllegalTransition(run.id, current, wanted)
    run.status = wanted.value  # a plain str, as the record documents (JSON keys, the store)
    if reason is not None:
        run.reason = reason
    if at is not None:
        run.finished = at


def default_outcome(status: str) -> Outcome:
    """The outcome of a run that reached ``status`` without a confirm task deciding it:
    ``done`` for a success (notifying is not fixing)."""
    if status == SUCCEEDED:
        return Outcome.DONE
    if status in (CANCELLED, REJECTED, EXPIRED):
        return Outcome.CANCELLED
    return Outcome.FAILED
