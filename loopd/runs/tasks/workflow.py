"""Sub-workflow tasks: a child run ``parent/task`` whose context comes back as the result."""

from __future__ import annotations

from loopd.errors import ConditionError
from loopd.runs import states
from loopd.runs.tasks.base import TaskBase, TaskResult
from loopd.store.base import RunRecord
from loopd.workflow.loader import CompiledTask


class WorkflowTasks(TaskBase):
    async def _subworkflow(self, run: RunRecord, ct: CompiledTask) -> TaskResult:
        child_id = f"{run.id}/{ct.name}"
        child = await self.store.get_run(child_id)
        resumed = child is not None
        if child is None:
            try:
                rendered = ct.input(self.wf.scope(run))
            except ConditionError as exc:
                return TaskResult(states.FAILED, {}, f"task {ct.name} input: {exc}")
            child = RunRecord(child_id, None, run.rule, run.key, "workflow",
                              ct.task.workflow or "", rendered, states.PENDING, self.clock.now(),
                              event=run.event)
            await self.store.save_run(child)
        step = await self._step(run, ct.name, ct.task.workflow, 1, child.input)
        if child.status in states.FINAL:  # it ended before loopd stopped; the parent not
            status, reason = states.RunStatus(child.status), child.reason
        else:
            status, reason = await self.wf.execute(child, resumed=resumed)
            states.move(child, status, at=self.clock.now())
            child.reason = reason
            child.outcome = self.wf.outcome(child, status)
            await self.store.save_run(child)
        output = {k: v for k, v in child.ctx.items() if k != "history"}
        output.update(run=child_id, outcome=child.outcome)
        final = states.SUCCEEDED if status == states.SUCCEEDED else states.FAILED
        await self._finish(step, final, {"run": child_id, "outcome": child.outcome}, reason)
        return TaskResult(final, output, reason, 1, step)
