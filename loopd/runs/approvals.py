"""Pending approvals: one model for a rule in ``mode: approval`` (the run waits before it
acts) and an ``approval:`` task of a workflow (the run waits at that task).

Either way a run waits for a human's ``decide(run_id, approved, reason, by)`` until a
deadline kept in the run's progress (so a restart keeps it); the API has one entry
point for both. ``by`` (the principal's name) goes where the run's own history is
written: "rejected by oncall-alice: ...", the approval step's output, ``ctx.approved``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from loopd.clock import Clock


@dataclass(frozen=True, slots=True)
class Decision:
    approved: bool
    reason: str | None
    by: str | None = None  # who decided (the API principal's name)

    def rejection(self) -> str:
        """The run's reason when rejected: ``rejected by alice: not now``."""
        who = f" by {self.by}" if self.by else ""
        return f"rejected{who}{': ' + self.reason if self.reason else ''}"


class Approvals:
    def __init__(self) -> None:
        self._pending: dict[str, asyncio.Future[Decision]] = {}

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._pending

    def decide(self, run_id: str, approved: bool, reason: str | None,
               by: str | None = None) -> str | None:
        """Approve or reject the run's pending approval; None when done, else why not."""
        future = self._pending.get(run_id)
        if future is None or future.done():
            return f"run {run_id} is not awaiting approval"
        future.set_result(Decision(approved, reason, by))
        return None

    async def wait(self, run_id: str, deadline: float, clock: Clock) -> Decision | None:
        """The decision about ``run_id``, or None when ``deadline`` came first."""
        future = self._pending[run_id] = asyncio.get_running_loop().create_future()
        try:
            # clock.wait never cancels the future, nor swallows a cancellation of this task
            # (asyncio.wait_for can, on Python 3.11)
            if not await clock.wait(future, deadline):
                return None
            decision: Decision = future.result()
            return decision
        finally:
            self._pending.pop(run_id, None)
