"""The workflow runner: tasks, transitions, retries, branches; resumable.

A run's resumable state is a typed :class:`~loopd.runs.progress.Progress` (kept as JSON
in ``run.progress`` by the store) and is saved before every
step takes effect (task started, attempt, timer set, task finished, context
published), so a restart continues where the run was: timers and deadlines
keep their original instants; a task that was executing at the crash is
retried if its action is idempotent and is otherwise ``interrupted`` (which
follows the ``failed`` transition).

Transitions: the first ``next`` entry whose ``when`` holds is taken; its
``do`` may start several tasks (parallel branches); a task with ``join`` starts
only once every task it names has finished. A task with no matching
transition ends its branch; the run ends when no branch is active, with the
status of an explicit ``succeed``/``fail`` task, else the status of a branch
that ended in a failure no transition handled (``failed``, ``timed_out``,
``interrupted``, ``rejected``, ``expired``), else ``succeeded``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from loopd import metrics
from loopd.catalog.inventory import Inventory
from loopd.catalog.telemetry import Telemetry
from loopd.clock import Clock
from loopd.errors import ConditionError
from loopd.packs.registry import PackRegistry, validate_fields
from loopd.runs import states
from loopd.runs.evidence import ConfirmHub, PromQL
from loopd.runs.progress import Ended, Progress, TaskState
from loopd.runs.states import Outcome, RunStatus
from loopd.runs.tasks import TaskKinds, TaskResult
from loopd.store.base import RunRecord, Store
from loopd.workflow.loader import CompiledTask, CompiledWorkflow

log = structlog.get_logger("loopd.workflow")

FAILURES = (states.FAILED, states.TIMED_OUT, states.INTERRUPTED, states.EXPIRED,
            states.REJECTED)
_CONFIRM_OUTCOME = {states.SUCCEEDED: Outcome.FIXED, states.FAILED: Outcome.NOT_FIXED,
                    "inconclusive": Outcome.INCONCLUSIVE}


class WorkflowRunner:
    def __init__(self, store: Store, registry: Callable[[], PackRegistry], kinds: TaskKinds,
                 *, inventory: Inventory, telemetry: Telemetry | None = None,
                 clock: Clock | None = None) -> None:
        self.store = store
        self.registry = registry
        self.kinds = kinds
        # one clock for the runner and its task kinds (the kinds' unless one is given)
        self.clock: Clock = clock if clock is not None else kinds.clock
        kinds.clock = self.clock
        self.inventory = inventory
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        kinds.runner = self

    @property
    def hub(self) -> ConfirmHub:
        return self.kinds.hub

    @property
    def prometheus(self) -> PromQL | None:
        return self.kinds.prometheus

    # -- scope ---------------------------------------------------------------------

    def scope(self, run: RunRecord, **extra: Any) -> dict[str, Any]:
        history = "\n".join(self.kinds.progress(run).history)
        ctx = run.ctx
        ctx["history"] = history
        scope = {
            "ctx": ctx, "input": run.input, "now": self.clock.now(), "event": run.event,
            "run": {"id": run.id, "rule": run.rule, "key": run.key, "workflow": run.target},
            "inventory": self.inventory.entities, "telemetry": self.telemetry,
            "history": history, "key": run.key,
            "entity": self.inventory.entities.get(run.key or ""),
        }
        scope.update(extra)
        return scope

    # -- a run ---------------------------------------------------------------------

    async def execute(self, run: RunRecord, *, resumed: bool
                      ) -> tuple[RunStatus, str | None]:
        """Run (or resume) a workflow run to its end; returns (status, reason). The run's
        status is left for the caller to move to the returned one."""
        wf = self.registry().workflows.get(run.target)
        if not isinstance(wf, CompiledWorkflow):
            return RunStatus.FAILED, f"unknown workflow {run.target!r}"
        if run.progress is None:
            try:
                inputs = validate_fields(wf.model.input, dict(run.input or {}), "input")
            except ValueError as exc:
                return RunStatus.FAILED, f"workflow {run.target}: {exc}"
            run.ctx = {**inputs, **(run.ctx or {})}
            progress = Progress(
                ready=[wf.model.first],
                deadline=self.clock.now() + wf.model.timeout if wf.model.timeout else None)
        else:
            progress = Progress.from_json(run.progress)
        self.kinds.begin(run, progress)
        try:
            return await self._execute(run, wf, progress, resumed=resumed)
        finally:
            self.kinds.end(run)

    async def _execute(self, run: RunRecord, wf: CompiledWorkflow, progress: Progress, *,
                       resumed: bool) -> tuple[RunStatus, str | None]:
        run.started = run.started or self.clock.now()
        # A run resumed while it waits (confirm, approval) has nothing new to write yet:
        # 10,000 waiting runs resume without 10,000 writes.
        waiting = resumed and run.status in (states.WAITING, states.AWAITING_APPROVAL)
        if not waiting and run.status != states.RUNNING:
            states.move(run, states.RUNNING)
        if resumed:
            self._resume(run, wf, progress)
            if not waiting:  # steps may have been written after the progress saved last
                keep = {t.step for t in progress.tasks.values()
                        if t.state == "waiting" and t.step is not None}
                await self.kinds.end_running_steps(
                    run, states.INTERRUPTED, "loopd stopped while this step was running",
                    keep=keep)
        if not waiting:
            await self.kinds.save(run)
        try:
            if progress.deadline is not None:
                async with self.clock.timeout_at(progress.deadline):
                    await self._schedule(run, wf, progress)
            else:
                await self._schedule(run, wf, progress)
        except TimeoutError:
            reason = f"workflow timed out after {wf.model.timeout:g}s"
            progress.history.append(f"run: timed out ({reason})")
            await self.kinds.end_running_steps(run, states.TIMED_OUT, reason)
            return RunStatus.TIMED_OUT, reason
        if progress.ended is not None:
            return progress.ended.status, progress.ended.reason
        if progress.failed_branch:
            return progress.failed_status or RunStatus.FAILED, progress.failed_branch
        return RunStatus.SUCCEEDED, None

    def _resume(self, run: RunRecord, wf: CompiledWorkflow, progress: Progress) -> None:
        """Tasks that were active at the crash are started again (see module doc)."""
        for name, tstate in progress.tasks.items():
            # with_items: the items are the ones running (a finished item has a status)
            items = [i for i in tstate.items.values()
                     if i.state == "running" and i.status is None]
            if tstate.state not in ("running", "waiting") and not items:
                continue
            if name not in progress.ready:
                progress.ready.append(name)
            ct = wf.tasks.get(name)
            if ct is None or ct.kind != "action":
                continue
            action = self.registry().actions.get(ct.task.action or "")
            if action is None or not action.spec.idempotent:
                for state in (tstate, *items):
                    if state.state == "running":
                        state.interrupted = True
        progress.history.append("run: resumed after a restart")

    async def _schedule(self, run: RunRecord, wf: CompiledWorkflow, progress: Progress
                        ) -> None:
        # One branch (the usual case): run tasks inline, no extra asyncio tasks per run.
        while len(progress.ready) == 1 and progress.ended is None:
            name = progress.ready[0]
            result = await self.kinds.run(run, wf, wf.tasks[name])
            await self._complete(run, wf, progress, wf.tasks[name], result)
        if progress.ready and progress.ended is None:
            await self._parallel(run, wf, progress)

    async def _parallel(self, run: RunRecord, wf: CompiledWorkflow, progress: Progress
                        ) -> None:
        done: asyncio.Queue[tuple[str, TaskResult]] = asyncio.Queue()
        active: dict[str, asyncio.Task[None]] = {}

        async def one(name: str) -> None:
            result = await self.kinds.run(run, wf, wf.tasks[name])
            await done.put((name, result))

        async with asyncio.TaskGroup() as tg:
            for name in list(progress.ready):
                active[name] = tg.create_task(one(name))
            while active:
                name, result = await done.get()
                active.pop(name, None)
                for target in await self._complete(run, wf, progress, wf.tasks[name],
                                                   result):
                    if target not in active:
                        active[target] = tg.create_task(one(target))
                if progress.ended is not None:
                    for task in active.values():
                        task.cancel()
                    break

    async def _complete(self, run: RunRecord, wf: CompiledWorkflow, progress: Progress,
                        ct: CompiledTask, result: TaskResult) -> list[str]:
        """Publish the result, choose the transition, persist; return tasks to start."""
        name = ct.name
        before = progress.tasks.get(name)
        # the input stays: a rollback renders its input from the task's input
        progress.tasks[name] = TaskState("done", result.attempt, result.status,
                                         input=before.input if before else None)
        if name in progress.ready:
            progress.ready.remove(name)
        run.ctx[name] = {"status": result.status, **result.output}
        if result.error:
            run.ctx[name]["error"] = result.error
        if ct.kind == "confirm":
            progress.confirm = result.status
            metrics.confirmation(run.target, result.status)
        if result.status == states.SUCCEEDED and ct.kind in ("action", "workflow"):
            progress.completed.append(name)
        if result.status == states.SUCCEEDED and ct.publish is not None:
            try:
                published = ct.publish(self.scope(run, result=result.output))
                if isinstance(published, dict):
                    run.ctx.update(published)
            except ConditionError as exc:
                result.status, result.error = states.FAILED, f"task {name} publish: {exc}"
        if ct.kind in ("succeed", "fail"):
            outcome = result.output.get("outcome")
            progress.ended = Ended(
                RunStatus.SUCCEEDED if ct.kind == "succeed" else RunStatus.FAILED,
                result.error, Outcome(outcome) if outcome else None)
        targets, why = self._transition(run, ct, result)
        progress.history.append(
            f"{name}: {result.status}" + (f" ({result.error})" if result.error else "")
            + (f" -> {', '.join(targets)} [{why}]" if targets else ""))
        await self.kinds.mark_transition(run, ct, result, targets, why)
        if not targets and result.status in FAILURES and progress.ended is None:
            progress.failed_branch = result.error or f"task {name} {result.status}"
            progress.failed_status = RunStatus(result.status)  # rejected stays rejected, etc.
        starts = []
        for target in targets:
            join = wf.tasks[target].task.join
            if join:
                arrived = progress.arrived.setdefault(target, [])
                if name not in arrived:
                    arrived.append(name)
                finished = {n for n, t in progress.tasks.items() if t.state == "done"}
                if not set(join) <= finished:
                    continue
            progress.tasks[target] = TaskState()
            progress.ready.append(target)
            starts.append(target)
        await self.kinds.save(run)
        return starts

    def _transition(self, run: RunRecord, ct: CompiledTask, result: TaskResult
                    ) -> tuple[list[str], str]:
        status = result.status
        for when, targets in ct.transitions:
            if isinstance(when, str):
                if when == "always" or when == status or (
                        when == "failed" and status in FAILURES):
                    return targets, f"when {when}"
                continue
            try:
                scope = self.scope(run, result=result.output, status=status,
                                   error=result.error)
                if when(scope):
                    return targets, "when condition held"
            except ConditionError as exc:
                log.warning("transition condition failed", run=run.id, task=ct.name,
                            error=str(exc))
        return [], "no transition"

    def outcome(self, run: RunRecord, status: str) -> Outcome:
        """What the run achieved: its ``succeed`` task's outcome, else its confirmation's,
        else what its status implies (``done`` for a success without confirmation)."""
        progress = self.kinds.progress(run)
        if progress.ended is not None and progress.ended.outcome is not None:
            return progress.ended.outcome
        if status in (states.CANCELLED, states.REJECTED, states.EXPIRED):
            return Outcome.CANCELLED
        if progress.confirm is not None:
            return _CONFIRM_OUTCOME.get(progress.confirm, Outcome.INCONCLUSIVE)
        return states.default_outcome(status)

