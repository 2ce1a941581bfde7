"""The tasks that only record a step: ``succeed`` (with its outcome), ``fail`` (with its
reason) and ``noop``."""

from __future__ import annotations

from typing import Any

from loopd.runs import states
from loopd.runs.tasks.base import TaskBase, TaskResult
from loopd.store.base import RunRecord
from loopd.workflow.loader import CompiledTask


class BuiltinTasks(TaskBase):
    async def _builtin(self, run: RunRecord, ct: CompiledTask) -> TaskResult:
        step = await self._step(run, ct.name, None, 1)
        if ct.kind == "fail":
            message = self._message(run, ct)
            await self._finish(step, states.FAILED, None, message)
            return TaskResult(states.FAILED, {}, message or f"task {ct.name} failed", 1, step)
        output: dict[str, Any] = {}
        if ct.kind == "succeed" and ct.task.succeed:  # one of Outcome, checked at load
            output["outcome"] = states.Outcome(ct.task.succeed)
        await self._finish(step, states.SUCCEEDED, output)
        return TaskResult(states.SUCCEEDED, output, None, 1, step)
