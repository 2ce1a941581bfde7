"""Run and task states: an explicit state machine.

```
pending ──> running ──> succeeded
   │          │  ├────> failed        (an action failed and no transition handled it)
   │          │  ├────> timed_out     (the run's overall timeout)
   │          │  ├────> interrupted   (loopd died while a non-idempotent action ran)
   │          │  └────> crashed       (a bug in loopd; the reason is the traceback's last line)
   │          ├──> waiting ──> running          (a confirm task waits for evidence / a timer)
   │          └──> awaiting_approval ──> running | rejected | expired
   └──────────────────────────────────────────> cancelled (API, resolved alert, shutdown policy)
```
Outcome (what the loop achieved, separate from how the run ended):
``fixed`` (confirmed), ``not_fixed`` (confirmation failed), ``inconclusive``
(no evidence before the deadline), ``failed`` (the run failed before
confirming), ``cancelled``.
"""

from __future__ import annotations

PENDING = "pending"
QUEUED = "queued"  # run_mode queued: waits for the incident's current run, not yet dispatched
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

ACTIVE = (PENDING, RUNNING, WAITING, AWAITING_APPROVAL)
FINAL = (SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, INTERRUPTED, CRASHED, REJECTED, EXPIRED)

FIXED = "fixed"
NOT_FIXED = "not_fixed"
INCONCLUSIVE = "inconclusive"
OUTCOME_FAILED = "failed"
OUTCOME_CANCELLED = "cancelled"


def default_outcome(status: str) -> str:
    """The outcome of a run that reached ``status`` without a confirm task deciding it."""
    if status == SUCCEEDED:
        return FIXED
    if status in (CANCELLED, REJECTED, EXPIRED):
        return OUTCOME_CANCELLED
    return OUTCOME_FAILED
