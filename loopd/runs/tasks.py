"""What each kind of task does: action (with retry and with_items), sub-workflow,
confirm, approval, rollback, succeed, fail, noop. Every attempt is a step in
the store; every timer is persisted in ``run.progress`` before it is awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loopd.clock import Clock, WallClock
from loopd.errors import ConditionError, ConfigError
from loopd.events import Event
from loopd.packs.executor import ActionContext, ActionResult, Executor
from loopd.runs import states
from loopd.runs.approvals import Approvals
from loopd.runs.evidence import ConfirmHub, PromQL, Waiter
from loopd.runs.slots import Slots
from loopd.store.base import RunRecord, StepRecord, Store
from loopd.workflow.loader import CompiledTask, CompiledWorkflow, render_evidence

if TYPE_CHECKING:
    from loopd.runs.runner import WorkflowRunner

INCONCLUSIVE = "inconclusive"


@dataclass(slots=True)
class TaskResult:
    status: str
    output: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempt: int = 1
    step: StepRecord | None = None


class TaskKinds:
    def __init__(self, store: Store, executor: Executor, *, hub: ConfirmHub | None = None,
                 prometheus: PromQL | None = None, services: dict[str, Any] | None = None,
                 dry_run: bool = False, clock: Clock | None = None,
                 slots: Slots | None = None, approvals: Approvals | None = None) -> None:
        self.store = store
        self.clock: Clock = clock if clock is not None else WallClock()
        self.executor = executor
        self.hub = hub if hub is not None else ConfirmHub()  # an empty hub is falsy
        self.prometheus = prometheus
        self.services = services or {}
        self.dry_run = dry_run
        self.runner: WorkflowRunner | None = None
        # the dispatcher's start slots: a run settling into a long wait (confirm, approval)
        # gives its slot back, so the next run starts; it takes one again when it wakes
        self.slots = slots if slots is not None else Slots()
        self.approvals = approvals if approvals is not None else Approvals()

    @property
    def wf(self) -> WorkflowRunner:
        assert self.runner is not None, "TaskKinds is used by one WorkflowRunner"
        return self.runner

    # -- bookkeeping -------------------------------------------------------------

    def _message(self, run: RunRecord, ct: CompiledTask) -> str | None:
        """The task's rendered message (approval prompt, succeed outcome, fail reason)."""
        if ct.message is None:
            return None
        try:
            return str(ct.message(self.wf.scope(run)))
        except ConditionError as exc:
            return f"(message failed to render: {exc})"

    async def _waiting_step(self, run: RunRecord, ct: CompiledTask, tstate: dict[str, Any],
                            status: str, input: Any = None) -> StepRecord:
        """The step of a confirm/approval: created once, found again after a restart."""
        if "step" in tstate and run.status == status:
            self.slots.give_back(run.id)
            return StepRecord(run.id, tstate["step"], ct.name, None, 1, states.RUNNING,
                              tstate["step_started"], input=input)
        run.status = status
        step = await self._step(run, ct.name, None, 1, input)
        tstate["step"], tstate["step_started"] = step.seq, step.started
        await self.store.save_run(run)  # the status and the step to find again, together
        self.slots.give_back(run.id)
        return step

    async def _step(self, run: RunRecord, task: str, action: str | None, attempt: int,
                    input: Any = None) -> StepRecord:
        run.progress["seq"] += 1
        step = StepRecord(run.id, run.progress["seq"], task, action, attempt, states.RUNNING,
                          self.clock.now(), input=input)
        await self.store.save_step(step)
        return step

    async def _finish(self, step: StepRecord, status: str, output: Any = None,
                      error: str | None = None) -> None:
        step.status, step.finished, step.output, step.error = (
            status, self.clock.now(), output, error)
        await self.store.save_step(step)

    async def mark_transition(self, run: RunRecord, ct: CompiledTask, result: TaskResult,
                              targets: list[str], why: str) -> None:
        if result.step is not None:
            result.step.transition = f"{', '.join(targets)} ({why})" if targets else why
            await self.store.save_step(result.step)

    # -- dispatch ------------------------------------------------------------------

    async def run(self, run: RunRecord, wf: CompiledWorkflow, ct: CompiledTask) -> TaskResult:
        tstate = run.progress["tasks"].setdefault(ct.name, {"state": "ready", "attempt": 0})
        if ct.task.delay and "not_before" not in tstate:
            tstate["not_before"] = self.clock.now() + ct.task.delay
            tstate["state"] = "waiting"
            await self.store.save_run(run)
        if "not_before" in tstate:
            await self.clock.sleep_until(tstate["not_before"])
            del tstate["not_before"]
        try:
            if ct.task.timeout is not None:
                # kept in the run's progress: a restart keeps the original deadline
                deadline = tstate.setdefault("timeout_at", self.clock.now() + ct.task.timeout)
                async with self.clock.timeout_at(deadline):
                    return await self._kind(run, wf, ct, tstate)
            return await self._kind(run, wf, ct, tstate)
        except TimeoutError:
            why = f"task {ct.name} timed out after {ct.task.timeout:g}s"
            step = await self.end_running_steps(run, states.TIMED_OUT, why, task=ct.name)
            return TaskResult(states.TIMED_OUT, {}, why, tstate.get("attempt", 1), step)

    async def end_running_steps(self, run: RunRecord, status: str, why: str, *,
                                task: str | None = None, keep: Collection[int] = ()
                                ) -> StepRecord | None:
        """End the steps a task timeout or a stop of loopd left ``running`` (the run's, or
        ``task``'s; not those in ``keep``) with ``status``; return the last one. New steps
        are numbered after every step found, so none is ever overwritten."""
        last = None
        for step in await self.store.steps(run.id):
            run.progress["seq"] = max(run.progress["seq"], step.seq)
            if step.status != states.RUNNING or step.seq in keep or task not in (None, step.task):
                continue
            await self._finish(step, status, step.output, why)
            last = step
        return last

    async def _kind(self, run: RunRecord, wf: CompiledWorkflow, ct: CompiledTask,
                    tstate: dict[str, Any]) -> TaskResult:
        kind = ct.kind
        if kind == "action":
            if ct.items is not None:
                return await self._items(run, ct, tstate)
            return await self._attempts(run, ct, tstate, item=None)
        if kind == "workflow":
            return await self._subworkflow(run, ct, tstate)
        if kind == "confirm":
            return await self._confirm(run, ct, tstate)
        if kind == "approval":
            return await self._approval(run, ct, tstate)
        if kind == "rollback":
            return await self._rollback(run, wf, ct)
        step = await self._step(run, ct.name, None, 1)
        message = self._message(run, ct)
        if kind == "fail":
            await self._finish(step, states.FAILED, None, message)
            return TaskResult(states.FAILED, {}, message or f"task {ct.name} failed", 1, step)
        output = {"outcome": message} if kind == "succeed" and message else {}
        await self._finish(step, states.SUCCEEDED, output)
        return TaskResult(states.SUCCEEDED, output, None, 1, step)

    # -- actions -------------------------------------------------------------------

    async def _attempts(self, run: RunRecord, ct: CompiledTask, tstate: dict[str, Any], *,
                        item: Any) -> TaskResult:
        """One action (or one item of a fan-out) with its retry policy."""
        action = ct.task.action or ""
        retry = ct.task.retry
        if tstate.pop("interrupted", False):
            step = await self._step(run, ct.name, action, tstate.get("attempt", 1))
            why = f"loopd stopped while {action} was running and it is not idempotent"
            await self._finish(step, states.INTERRUPTED, None, why)
            return TaskResult(states.INTERRUPTED, {}, why, tstate.get("attempt", 1), step)
        while True:
            if "not_before" in tstate:
                await self.clock.sleep_until(tstate["not_before"])
                del tstate["not_before"]
            attempt = tstate["attempt"] = tstate.get("attempt", 0) + 1
            tstate["state"] = "running"
            extra = {"item": item} if item is not None else {}
            try:
                rendered = ct.input(self.wf.scope(run, **extra))
            except ConditionError as exc:
                step = await self._step(run, ct.name, action, attempt)
                why = f"task {ct.name} input: {exc}"
                await self._finish(step, states.FAILED, None, why)
                return TaskResult(states.FAILED, {}, why, attempt, step)
            tstate["input"] = rendered
            await self.store.save_run(run)  # "running" is durable before the action starts
            step = await self._step(run, ct.name, action, attempt, rendered)
            ctx = ActionContext(run.id, ct.name, self.wf.inventory, dry_run=self.dry_run,
                                services=self.services)
            result: ActionResult = await self.executor.execute(action, rendered, ctx)
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
            tstate["not_before"] = self.clock.now() + delay
            tstate["state"] = "waiting"
            await self.store.save_run(run)

    async def _items(self, run: RunRecord, ct: CompiledTask, tstate: dict[str, Any]
                     ) -> TaskResult:
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
        per_item: dict[str, dict[str, Any]] = tstate.setdefault("items", {})
        slots = asyncio.Semaphore(ct.task.concurrency)

        async def one(index: int, item: Any) -> TaskResult:
            istate = per_item.setdefault(str(index), {"attempt": 0})
            if istate.get("status") == states.SUCCEEDED:  # done before a restart
                return TaskResult(states.SUCCEEDED, istate.get("output", {}))
            async with slots:
                result = await self._attempts(run, ct, istate, item=item)
            istate.update(status=result.status, output=result.output)
            await self.store.save_run(run)  # a restart must not run a finished item again
            return result

        results = await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))
        failed = [i for i, r in enumerate(results) if r.status != states.SUCCEEDED]
        output = {"items": [r.output for r in results], "failed": failed}
        status = states.FAILED if failed else states.SUCCEEDED
        error = (f"{len(failed)} of {len(items)} items failed: "
                 + "; ".join(str(results[i].error) for i in failed[:3])) if failed else None
        await self._finish(step, status, output, error)
        return TaskResult(status, output, error, 1, step)

    async def _subworkflow(self, run: RunRecord, ct: CompiledTask, tstate: dict[str, Any]
                           ) -> TaskResult:
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
        status, reason = await self.wf.execute(child, resumed=resumed)
        child.status, child.finished, child.reason = status, self.clock.now(), reason
        child.outcome = self.wf.outcome(child, status)
        await self.store.save_run(child)
        output = {k: v for k, v in child.ctx.items() if k != "history"}
        output.update(run=child_id, outcome=child.outcome)
        final = states.SUCCEEDED if status == states.SUCCEEDED else states.FAILED
        await self._finish(step, final, {"run": child_id, "outcome": child.outcome}, reason)
        return TaskResult(final, output, reason, 1, step)

    # -- confirmation and approval --------------------------------------------------

    async def _confirm(self, run: RunRecord, ct: CompiledTask, tstate: dict[str, Any]
                       ) -> TaskResult:
        confirm = ct.task.confirm
        assert confirm is not None
        if "deadline" not in tstate:
            tstate["deadline"] = self.clock.now() + confirm.within
        tstate["state"] = "waiting"
        step = await self._waiting_step(run, ct, tstate, states.WAITING)
        waiter = None
        if ct.evidence is not None:
            try:
                evidence = render_evidence(ct.evidence, self.wf.scope(run))
            except (ConditionError, ConfigError) as exc:
                why = f"task {ct.name} confirm.event: {exc}"
                await self._finish(step, states.FAILED, None, why)
                run.status = states.RUNNING
                return TaskResult(states.FAILED, {}, why, 1, step)
            waiter = Waiter(evidence, lambda ev, tv: self.wf.scope(run, event=ev, vars=tv))
            self.hub.add(waiter)
        query_false = 0
        try:
            found = await self._await_evidence(run, ct, tstate["deadline"], waiter)
            await self.slots.take(run.id)
            if isinstance(found, Event):
                output = {"evidence": "event", "event": found.to_json()}
            elif found is True:
                output = {"evidence": "query"}
            else:
                query_false = -found if isinstance(found, int) and found < 0 else 0
                output = {}
        finally:
            if waiter is not None:
                self.hub.remove(waiter)
            run.status = states.RUNNING
        against = (waiter.against if waiter else 0) + query_false
        if output:
            status, error = states.SUCCEEDED, None
        elif against:
            status = states.FAILED
            error = (f"not fixed: {against} piece(s) of evidence against within "
                     f"{confirm.within:g}s")
            if waiter and waiter.last_against:
                output["last_evidence"] = waiter.last_against
        else:
            status, error = INCONCLUSIVE, f"no evidence within {confirm.within:g}s"
        await self._finish(step, status, output, error)
        return TaskResult(status, output, error, 1, step)

    async def _await_evidence(self, run: RunRecord, ct: CompiledTask, deadline: float,
                              waiter: Waiter | None) -> Event | bool | int:
        """The matching event, True for a query that held, else -(times the query was false)."""
        confirm = ct.task.confirm
        assert confirm is not None
        query = None
        if ct.query is not None and self.wf.prometheus is not None:
            try:
                query = str(ct.query(self.wf.scope(run)))
            except ConditionError:
                query = None
        falses = 0
        while True:
            if query is not None and self.wf.prometheus is not None:
                held = await self.wf.prometheus.holds(query)
                if held:
                    return True
                if held is False:
                    falses += 1
            now = self.clock.now()
            if now >= deadline:
                return -falses
            until = min(deadline, now + confirm.interval) if query is not None else deadline
            if waiter is None:
                await self.clock.sleep_until(until)
                continue
            if await self.clock.wait(waiter.found, until):
                return waiter.found.result()

    async def _approval(self, run: RunRecord, ct: CompiledTask, tstate: dict[str, Any]
                        ) -> TaskResult:
        approval = ct.task.approval
        assert approval is not None
        if "deadline" not in tstate:
            tstate["deadline"] = self.clock.now() + approval.within
        tstate["state"] = "waiting"
        message = self._message(run, ct)
        step = await self._waiting_step(run, ct, tstate, states.AWAITING_APPROVAL,
                                        {"message": message, "expires": tstate["deadline"]})
        try:
            decided = await self.approvals.wait(run.id, tstate["deadline"], self.clock)
            await self.slots.take(run.id)
        finally:
            run.status = states.RUNNING
        if decided is None:
            await self._finish(step, states.EXPIRED, None, "approval expired")
            return TaskResult(states.EXPIRED, {}, f"approval of {ct.name} expired", 1, step)
        approved, reason = decided.approved, decided.reason
        if approved:
            await self._finish(step, states.SUCCEEDED, {"approved": True, "reason": reason})
            return TaskResult(states.SUCCEEDED, {"approved": True}, None, 1, step)
        why = f"rejected{': ' + reason if reason else ''}"
        await self._finish(step, states.REJECTED, {"approved": False}, why)
        return TaskResult(states.REJECTED, {"approved": False}, why, 1, step)

    # -- rollback --------------------------------------------------------------------

    async def _rollback(self, run: RunRecord, wf: CompiledWorkflow, ct: CompiledTask
                        ) -> TaskResult:
        """Compensate completed action tasks in reverse order."""
        wanted = ct.task.rollback
        completed: list[str] = run.progress["completed"]
        names = [n for n in reversed(completed) if wanted == "all" or n in (wanted or [])]
        undone, failed = [], []
        registry = self.executor.registry
        for name in names:
            task = wf.tasks[name].task
            action = registry.actions.get(task.action or "")
            if action is None or action.spec.rollback is None:
                continue
            spec = action.spec.rollback
            tstate = run.progress["tasks"].get(name, {})
            scope = self.wf.scope(run, input=tstate.get("input") or {},
                                  result=run.ctx.get(name) or {})
            try:
                rendered = action.rollback_input(scope) if action.rollback_input else {}
            except ConditionError as exc:
                failed.append(f"{name}: {exc}")
                continue
            step = await self._step(run, f"{ct.name}:{name}", spec.action, 1, rendered)
            ctx = ActionContext(run.id, ct.name, self.wf.inventory, dry_run=self.dry_run,
                                services=self.services)
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
