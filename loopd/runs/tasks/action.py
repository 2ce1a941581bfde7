"""Action tasks: one action with its retry policy, or a ``with_items`` fan-out."""

from __future__ import annotations

import asyncio
from typing import Any

from loopd.errors import ConditionError
from loopd.packs.executor import ActionContext, ActionResult
from loopd.runs import states
from loopd.runs.lease import lease_check
from loopd.runs.progress import TaskState
from loopd.runs.tasks.base import TaskBase, TaskResult
from loopd.store.base import RunRecord, StepRecord
from loopd.workflow.loader import CompiledTask


class ActionTasks(TaskBase):
    async def _attempts(self, run: RunRecord, ct: CompiledTask, ts: TaskState, *,
                        item: Any) -> TaskResult:
        """One action (or one item of a fan-out) with its retry policy."""
        action = ct.task.action or ""
        retry = ct.task.retry
        if ts.interrupted:
            ts.interrupted = False
            step = await self._step(run, ct.name, action, ts.attempt)
            why = f"loopd stopped while {action} was running and it is not idempotent"
            await self._finish(step, states.INTERRUPTED, None, why)
            return TaskResult(states.INTERRUPTED, {}, why, ts.attempt, step)
        while True:
            if ts.not_before is not None:
                await self._wait_until(run, ts.not_before)  # a backoff holds no slot
                ts.not_before = None
            # The attempt counts, and is saved ``running``, only once the action holds its
            # executor slot (``started``): a run that was still waiting for a slot when
            # loopd died did not act, and a restart starts this attempt again.
            attempt = ts.attempt + 1
            ts.state = "waiting"
            extra = {"item": item} if item is not None else {}
            try:
                rendered = ct.input(self.wf.scope(run, **extra))
            except ConditionError as exc:
                ts.attempt = attempt
                step = await self._step(run, ct.name, action, attempt)
                why = f"task {ct.name} input: {exc}"
                await self._finish(step, states.FAILED, None, why)
                return TaskResult(states.FAILED, {}, why, attempt, step)
            acting: list[StepRecord] = []

            async def started(rendered: Any = rendered, attempt: int = attempt,
                              acting: list[StepRecord] = acting) -> None:
                ts.attempt, ts.state, ts.input = attempt, "running", rendered
                await self.save(run)  # "running" is durable before the action starts
                acting.append(await self._step(run, ct.name, action, attempt, rendered))

            ctx = ActionContext(run.id, ct.name, self.wf.inventory, dry_run=self.dry_run,
                                services=self.services, holds=[self.slots.hold(run.id)],
                                lease=lease_check(self.store, run.id))
            known = self.executor.registry.actions.get(action)
            if known is not None and known.spec.idempotent:
                # retried after a crash anyway: recorded running before it queues for a
                # slot (its write joins a large group commit); see the dispatcher
                await started()
                result: ActionResult = await self.executor.execute(action, rendered, ctx)
            else:
                result = await self.executor.execute(action, rendered, ctx, started=started)
            if not acting:  # it never started (invalid input, unknown action)
                await started()
            step = acting[0]
            status = states.SUCCEEDED if result.ok else (
                states.TIMED_OUT if result.output.get("timed_out") else states.FAILED)
            await self._finish(step, status, result.output, result.error)
            if result.ok:
                return TaskResult(status, result.output, None, attempt, step)
            if retry is None or attempt > retry.count:
                return TaskResult(status, result.output, result.error, attempt, step)
            if ct.retry_when is not None:
                try:
                    wanted = bool(ct.retry_when(self.wf.scope(
                        run, result=result.output, error=result.error, **extra)))
                except ConditionError:
                    wanted = False
                if not wanted:
                    return TaskResult(status, result.output, result.error, attempt, step)
            delay = min(retry.delay * retry.backoff ** (attempt - 1), retry.max_delay)
            ts.not_before = self.clock.now() + delay
            ts.state = "waiting"
            await self.save(run)

    async def _items(self, run: RunRecord, ct: CompiledTask, ts: TaskState) -> TaskResult:
        """Fan out over items with a concurrency limit; only failed items are retried."""
        step = await self._step(run, ct.name, ct.task.action, 1)
        try:
            items = ct.items(self.wf.scope(run)) if ct.items is not None else []
        except ConditionError as exc:
            await self._finish(step, states.FAILED, None, f"with_items: {exc}")
            return TaskResult(states.FAILED, {}, f"task {ct.name} with_items: {exc}", 1, step)
        if not isinstance(items, list):
            why = f"task {ct.name} with_items must be a list, got {type(items).__name__}"
            await self._finish(step, states.FAILED, None, why)
            return TaskResult(states.FAILED, {}, why, 1, step)
        slots = asyncio.Semaphore(ct.task.concurrency)

        async def one(index: int, item: Any) -> TaskResult:
            istate = ts.items.setdefault(str(index), TaskState())
            if istate.status == states.SUCCEEDED:  # done before a restart
                return TaskResult(states.SUCCEEDED, istate.output or {})
            async with slots:
                result = await self._attempts(run, ct, istate, item=item)
            istate.status, istate.output = result.status, result.output
            await self.save(run)  # a restart must not run a finished item again
            return result

        results = await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))
        failed = [i for i, r in enumerate(results) if r.status != states.SUCCEEDED]
        output = {"items": [r.output for r in results], "failed": failed}
        status = states.FAILED if failed else states.SUCCEEDED
        error = (f"{len(failed)} of {len(items)} items failed: "
                 + "; ".join(str(results[i].error) for i in failed[:3])) if failed else None
        await self._finish(step, status, output, error)
        return TaskResult(status, output, error, 1, step)
