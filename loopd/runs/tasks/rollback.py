"""Rollback tasks: compensate completed action tasks in reverse order."""

from __future__ import annotations

from loopd.errors import ConditionError
from loopd.packs.executor import ActionContext
from loopd.runs import states
from loopd.runs.lease import lease_check
from loopd.runs.tasks.base import TaskBase, TaskResult
from loopd.store.base import RunRecord
from loopd.workflow.loader import CompiledTask, CompiledWorkflow


class RollbackTasks(TaskBase):
    async def _rollback(self, run: RunRecord, wf: CompiledWorkflow, ct: CompiledTask
                        ) -> TaskResult:
        """Compensate completed action tasks in reverse order."""
        progress = self.progress(run)
        wanted = ct.task.rollback
        completed = progress.completed
        names = [n for n in reversed(completed) if wanted == "all" or n in (wanted or [])]
        undone, failed = [], []
        registry = self.executor.registry
        for name in names:
            task = wf.tasks[name].task
            action = registry.actions.get(task.action or "")
            if action is None or action.spec.rollback is None:
                continue
            spec = action.spec.rollback
            ts = progress.tasks.get(name)
            scope = self.wf.scope(run, input=(ts.input if ts else None) or {},
                                  result=run.ctx.get(name) or {})
            try:
                rendered = action.rollback_input(scope) if action.rollback_input else {}
            except ConditionError as exc:
                failed.append(f"{name}: {exc}")
                continue
            step = await self._step(run, f"{ct.name}:{name}", spec.action, 1, rendered)
            ctx = ActionContext(run.id, ct.name, self.wf.inventory, dry_run=self.dry_run,
                                services=self.services, lease=lease_check(self.store, run.id))
            result = await self.executor.execute(spec.action, rendered, ctx)
            await self._finish(step, states.SUCCEEDED if result.ok else states.FAILED,
                               result.output, result.error)
            if result.ok:
                undone.append(name)
                completed.remove(name)
            else:
                failed.append(f"{name}: {result.error}")
        output = {"rolled_back": undone, "failed": failed}
        step = await self._step(run, ct.name, None, 1)
        status = states.FAILED if failed else states.SUCCEEDED
        error = "rollback failed: " + "; ".join(failed) if failed else None
        await self._finish(step, status, output, error)
        return TaskResult(status, output, error, 1, step)
