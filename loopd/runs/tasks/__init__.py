"""What each kind of task does: action (with retry and with_items), sub-workflow,
confirm, approval, rollback, succeed, fail, noop; one module per kind, the shared
bookkeeping in :mod:`loopd.runs.tasks.base`. Every attempt is a step in the store; every
timer is persisted in the run's progress before it is awaited.
"""

from __future__ import annotations

from loopd.runs import states
from loopd.runs.progress import TaskState
from loopd.runs.tasks.action import ActionTasks
from loopd.runs.tasks.approval import ApprovalTasks
from loopd.runs.tasks.base import INCONCLUSIVE, TaskResult
from loopd.runs.tasks.builtin import BuiltinTasks
from loopd.runs.tasks.confirm import ConfirmTasks
from loopd.runs.tasks.rollback import RollbackTasks
from loopd.runs.tasks.workflow import WorkflowTasks
from loopd.store.base import RunRecord
from loopd.workflow.loader import CompiledTask, CompiledWorkflow

__all__ = ["INCONCLUSIVE", "TaskKinds", "TaskResult"]


class TaskKinds(ActionTasks, WorkflowTasks, ConfirmTasks, ApprovalTasks, RollbackTasks,
                BuiltinTasks):
    """Runs one task of a workflow run: its delay and timeout, then what its kind does."""

    async def run(self, run: RunRecord, wf: CompiledWorkflow, ct: CompiledTask) -> TaskResult:
        ts = self.progress(run).tasks.setdefault(ct.name, TaskState())
        if ct.task.delay and ts.not_before is None:
            ts.not_before = self.clock.now() + ct.task.delay
            ts.state = "waiting"
            await self.save(run)
        if ts.not_before is not None:
            await self._wait_until(run, ts.not_before)  # a delay holds no slot
            ts.not_before = None
        try:
            if ct.task.timeout is not None:
                # kept in the run's progress: a restart keeps the original deadline
                if ts.timeout_at is None:
                    ts.timeout_at = self.clock.now() + ct.task.timeout
                async with self.clock.timeout_at(ts.timeout_at):
                    return await self._kind(run, wf, ct, ts)
            return await self._kind(run, wf, ct, ts)
        except TimeoutError:
            why = f"task {ct.name} timed out after {ct.task.timeout:g}s"
            step = await self.end_running_steps(run, states.TIMED_OUT, why, task=ct.name)
            return TaskResult(states.TIMED_OUT, {}, why, ts.attempt, step)

    async def _kind(self, run: RunRecord, wf: CompiledWorkflow, ct: CompiledTask,
                    ts: TaskState) -> TaskResult:
        kind = ct.kind
        if kind == "action":
            if ct.items is not None:
                return await self._items(run, ct, ts)
            return await self._attempts(run, ct, ts, item=None)
        if kind == "workflow":
            return await self._subworkflow(run, ct)
        if kind == "confirm":
            return await self._confirm(run, ct, ts)
        if kind == "approval":
            return await self._approval(run, ct, ts)
        if kind == "rollback":
            return await self._rollback(run, wf, ct)
        return await self._builtin(run, ct)
