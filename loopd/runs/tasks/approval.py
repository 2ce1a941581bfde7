"""Approval tasks: a human approves or rejects inside a workflow, before a deadline."""

from __future__ import annotations

import asyncio

from loopd.runs import states
from loopd.runs.progress import TaskState
from loopd.runs.tasks.base import TaskBase, TaskResult
from loopd.store.base import RunRecord
from loopd.workflow.loader import CompiledTask


class ApprovalTasks(TaskBase):
    def decide(self, run_id: str, approved: bool, reason: str | None) -> str | None:
        """Resolve a pending approval; None when done, else why it cannot be."""
        future = self._approvals.get(run_id)
        if future is None or future.done():
            return f"run {run_id} is not awaiting approval"
        future.set_result((approved, reason))
        return None

    async def _approval(self, run: RunRecord, ct: CompiledTask, ts: TaskState) -> TaskResult:
        approval = ct.task.approval
        assert approval is not None
        if ts.deadline is None:
            ts.deadline = self.clock.now() + approval.within
        deadline = ts.deadline
        ts.state = "waiting"
        message = self._message(run, ct)
        step = await self._waiting_step(run, ct, ts, states.AWAITING_APPROVAL,
                                        {"message": message, "expires": deadline})
        future = self._approvals[run.id] = asyncio.get_running_loop().create_future()
        try:
            # clock.wait never cancels the future, nor swallows a cancellation of this task
            # (asyncio.wait_for can, on Python 3.11)
            decided = await self.clock.wait(future, deadline)
            if self.on_active is not None:
                await self.on_active(run.id)
        finally:
            self._approvals.pop(run.id, None)
            self._settle(run, states.RUNNING)
        if not decided:
            await self._finish(step, states.EXPIRED, None, "approval expired")
            return TaskResult(states.EXPIRED, {}, f"approval of {ct.name} expired", 1, step)
        approved, reason = future.result()
        if approved:
            await self._finish(step, states.SUCCEEDED, {"approved": True, "reason": reason})
            return TaskResult(states.SUCCEEDED, {"approved": True}, None, 1, step)
        why = f"rejected{': ' + reason if reason else ''}"
        await self._finish(step, states.REJECTED, {"approved": False}, why)
        return TaskResult(states.REJECTED, {"approved": False}, why, 1, step)
