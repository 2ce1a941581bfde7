"""Approval tasks: a human approves or rejects inside a workflow, before a deadline."""

from __future__ import annotations

from loopd.runs import states
from loopd.runs.progress import TaskState
from loopd.runs.tasks.base import TaskBase, TaskResult
from loopd.store.base import RunRecord
from loopd.units import rfc3339
from loopd.workflow.loader import CompiledTask


class ApprovalTasks(TaskBase):
    async def _approval(self, run: RunRecord, ct: CompiledTask, ts: TaskState) -> TaskResult:
        approval = ct.task.approval
        assert approval is not None
        deadline = self._begin_waiting(ts, approval.within)
        message = self._message(run, ct)
        step = await self._waiting_step(run, ct, ts, states.AWAITING_APPROVAL,
                                        {"message": message, "expires": rfc3339(deadline)})
        try:
            decided = await self.approvals.wait(run.id, deadline, self.clock)
            await self.slots.take(run.id)
        finally:
            self._settle(run, states.RUNNING)
        if decided is None:
            await self._finish(step, states.EXPIRED, None, "approval expired")
            return TaskResult(states.EXPIRED, {}, f"approval of {ct.name} expired", 1, step)
        approved, reason = decided.approved, decided.reason
        by = {"by": decided.by} if decided.by else {}  # who decided, through the API
        if approved:
            await self._finish(step, states.SUCCEEDED, {"approved": True, "reason": reason, **by})
            return TaskResult(states.SUCCEEDED, {"approved": True}, None, 1, step)
        why = decided.rejection()
        await self._finish(step, states.REJECTED, {"approved": False, **by}, why)
        return TaskResult(states.REJECTED, {"approved": False}, why, 1, step)
