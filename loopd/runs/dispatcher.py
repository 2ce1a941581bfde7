"""The dispatcher: runs created by the engine, executed under a concurrency cap.

Each run executes in its own task inside the dispatcher's TaskGroup; the
engine's writer hands runs over only after they are durable. On start the
dispatcher resumes what the store says was in flight: a pending run starts; a
run that was executing an action when loopd died is retried when that action
is idempotent and otherwise ends ``interrupted``, so no run stays ``running``
forever and no non-idempotent action runs twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from loopd import metrics
from loopd.catalog.inventory import Inventory
from loopd.clock import Clock, WallClock
from loopd.packs.executor import ActionContext, Executor
from loopd.runs import states
from loopd.store.base import RunRecord, StepRecord, Store

log = structlog.get_logger("loopd.dispatcher")

FinishIncident = Callable[[RunRecord], Awaitable[None]]  # the engine's run_finished


class WorkflowExecutor(Protocol):
    """Executes a run of kind ``workflow`` (see loopd.runs.runner)."""

    async def execute(self, run: RunRecord, *, resumed: bool) -> tuple[str, str | None]: ...

    def outcome(self, run: RunRecord, status: str) -> str: ...


RunFinished = Callable[[RunRecord], Awaitable[None]]


class Dispatcher:
    def __init__(
        self, store: Store, executor: Executor, *, inventory: Inventory,
        finish_incident: FinishIncident, workflows: WorkflowExecutor | None = None,
        dry_run: bool = False, on_finished: RunFinished | None = None,
        clock: Clock | None = None, max_starting: int = 256,
    ) -> None:
        self.store = store
        self.clock: Clock = clock or WallClock()
        self.executor = executor
        self.inventory = inventory
        self.workflows = workflows
        self.dry_run = dry_run
        self._finish_incident = finish_incident
        self.on_finished = on_finished
        self._inbox: asyncio.Queue[tuple[RunRecord, bool]] = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # runs handed over that have not started acting (pending, awaiting approval)
        self._unstarted: dict[str, str | None] = {}  # run id -> why it was cancelled
        self._stopping: dict[str, str] = {}  # acting runs cancelled by loopd -> why
        self._gates: dict[str, asyncio.Future[tuple[bool, str | None]]] = {}
        # Runs starting at once (until they act and settle into a wait): a burst of
        # 10,000 triggers starts them 256 at a time instead of all together.
        self._starting = asyncio.Semaphore(max_starting)
        self._holding: set[str] = set()
        self._ending: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.shutting_down = False

    def submit(self, runs: list[RunRecord]) -> None:
        """Called by the engine once the runs are durable; never blocks."""
        for run in runs:
            self._idle.clear()
            self._unstarted[run.id] = None
            self._inbox.put_nowait((run, False))

    def cancel_unstarted(self, run_id: str, reason: str) -> bool:
        """Cancel a run that has not acted yet (resolved alert, restart mode)."""
        if run_id not in self._unstarted:
            return False
        self._unstarted[run_id] = reason
        task = self._tasks.get(run_id)
        if task is not None:
            task.cancel()
        return True

    def cancel_run(self, run_id: str, reason: str) -> bool:
        """Cancel a run whether or not it has acted (run_mode restart); False when this
        dispatcher does not have it."""
        if self.cancel_unstarted(run_id, reason):
            return True
        task = self._tasks.get(run_id)
        if task is None:
            return False
        self._stopping[run_id] = reason
        task.cancel()
        return True

    def decide(self, run_id: str, approved: bool, reason: str | None) -> str | None:
        """Approve or reject a run waiting for approval before acting (rule ``mode:
        approval``); None when done, else why not."""
        gate = self._gates.get(run_id)
        if gate is None or gate.done():
            return f"run {run_id} is not awaiting approval"
        gate.set_result((approved, reason))
        return None

    async def resume(self, stored: list[RunRecord] | None = None) -> int:
        """Re-dispatch what was in flight when loopd stopped; returns how many."""
        # sub-workflow runs ("parent/task") are resumed by their parent
        if stored is None:
            stored = await self.store.runs_in_status(states.ACTIVE)
        runs = [r for r in stored if r.status in states.ACTIVE and "/" not in r.id]
        for run in runs:
            self._idle.clear()
            if run.status in (states.PENDING, states.AWAITING_APPROVAL) and not run.started:
                self._unstarted[run.id] = None
            self._inbox.put_nowait((run, True))
        if runs:
            log.info("resuming runs", count=len(runs))
        return len(runs)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            try:
                while True:
                    run, resumed = await self._inbox.get()
                    task = group.create_task(self._execute(run, resumed),
                                             name=f"run-{run.id}")
                    self._tasks[run.id] = task
            except asyncio.CancelledError:
                # Whoever stops the dispatcher (shutdown, or the daemon's task group
                # failing) stops it: runs in flight stay as stored and resume next start.
                self.shutting_down = True
                raise

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until no run is queued or executing (tests, simulation, shutdown)."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    def active(self) -> int:
        return len(self._tasks)

    async def cancel(self, run_id: str) -> bool:
        task = self._tasks.get(run_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def active_again(self, run_id: str) -> None:
        """A waiting run woke up (evidence, approval): it counts as starting again, so
        10,000 confirmations arriving together resume their runs a few hundred at a time."""
        if run_id not in self._holding:
            await self._starting.acquire()
            self._holding.add(run_id)

    def settled(self, run_id: str) -> None:
        """The run waits now (confirm, approval): it no longer counts as starting."""
        if run_id in self._holding:
            self._holding.discard(run_id)
            self._starting.release()

    async def _execute(self, run: RunRecord, resumed: bool) -> None:
        try:
            await self._starting.acquire()
            self._holding.add(run.id)
            if self._unstarted.get(run.id):
                raise asyncio.CancelledError  # cancelled while still in the inbox
            gated = run.status == states.AWAITING_APPROVAL and not run.started
            if gated and not await self._gate(run):
                return
            self._unstarted.pop(run.id, None)
            if run.kind == "workflow" and self.workflows is not None:
                metrics.run_started(run.target, run.id)
                status, reason = await self.workflows.execute(run, resumed=resumed)
                run.outcome = self.workflows.outcome(run, status)
                await self._end(run, status, reason, started=True)
            else:
                await self._run_action(run, resumed)
        except asyncio.CancelledError:
            if self.shutting_down or run.id in self._ending:
                raise  # left as it is in the store; resumed at next start
            unstarted = run.id in self._unstarted  # never counted as running
            why = self._unstarted.pop(run.id, None) or self._stopping.pop(run.id, None)
            if self.workflows is not None and run.kind == "workflow" and run.progress:
                run.outcome = self.workflows.outcome(run, states.CANCELLED)
            await self._end(run, states.CANCELLED, why or "cancelled through the API",
                            started=not unstarted)
        except Exception as exc:  # task boundary: a loopd bug ends this run, not the daemon
            log.exception("run crashed", run=run.id)
            if run.id not in self._ending:
                try:
                    await self._end(run, states.CRASHED, f"{type(exc).__name__}: {exc}")
                except Exception:  # e.g. the store is failing too: say so, keep the daemon
                    log.exception("could not record the crashed run", run=run.id)
        finally:
            self._ending.discard(run.id)
            self.settled(run.id)
            self._tasks.pop(run.id, None)
            self._unstarted.pop(run.id, None)
            self._stopping.pop(run.id, None)
            if not self._tasks and self._inbox.empty():
                self._idle.set()

    async def _gate(self, run: RunRecord) -> bool:
        """Wait for approval before acting; False when the run ended here."""
        self.settled(run.id)  # waiting for a human holds no starting slot
        deadline = float((run.progress or {}).get("gate", {}).get("deadline",
                                                                   self.clock.now()))
        gate = self._gates[run.id] = asyncio.get_running_loop().create_future()
        try:
            if not await self.clock.wait(gate, deadline):
                await self._end(run, states.EXPIRED, "approval expired before anyone decided")
                return False
            approved, reason = gate.result()
        finally:
            self._gates.pop(run.id, None)
        if not approved:
            await self._end(run, states.REJECTED, f"rejected{': ' + reason if reason else ''}")
            return False
        states.move(run, states.PENDING)
        run.progress = {k: v for k, v in (run.progress or {}).items() if k != "gate"} or None
        run.ctx = {**(run.ctx or {}), "approved": {"reason": reason, "at": self.clock.now()}}
        await self.store.save_run(run)
        return True

    async def _run_action(self, run: RunRecord, resumed: bool) -> None:
        if run.kind != "action":
            await self._end(run, states.FAILED, f"no executor for {run.kind} runs")
            return
        if resumed and run.status == states.RUNNING:
            action = self.executor.registry.actions.get(run.target)
            if action is None or not action.spec.idempotent:
                await self._end(run, states.INTERRUPTED,
                                "loopd stopped while a non-idempotent action was running")
                return
        states.move(run, states.RUNNING)
        run.started = self.clock.now()
        await self.store.save_run(run)
        metrics.run_started(run.target, run.id)
        step = StepRecord(run.id, 1, "action", run.target, 1, states.RUNNING, self.clock.now(),
                          input=run.input)
        await self.store.save_step(step)
        ctx = ActionContext(run.id, "action", self.inventory, dry_run=self.dry_run)
        inputs: dict[str, Any] = run.input if isinstance(run.input, dict) else {}
        result = await self.executor.execute(run.target, inputs, ctx)
        step.finished = self.clock.now()
        step.status = states.SUCCEEDED if result.ok else states.FAILED
        step.output, step.error = result.output, result.error
        await self.store.save_step(step)
        run.ctx = {**(run.ctx or {}), "action": result.output}
        status = states.SUCCEEDED if result.ok else states.FAILED
        await self._end(run, status, result.error, started=True)

    async def _end(self, run: RunRecord, status: str, reason: str | None, *,
                   started: bool = False) -> None:
        # Ending is one step: from here a cancel can no longer reach the run, so it is
        # never finished twice (status overwritten, guards counting it twice).
        self._tasks.pop(run.id, None)
        self._ending.add(run.id)
        now = self.clock.now()
        # an ending without a reason keeps the one the run was created with (escalations)
        states.move(run, status, reason=reason or run.reason, at=now)
        run.outcome = run.outcome or states.default_outcome(status)
        await self.store.save_run(run)
        if started:
            metrics.run_finished(run.target, run.id, status, now - (run.started or now), reason)
        fixed_in = now - run.created if run.outcome == states.FIXED else None
        metrics.outcome(run.target, run.rule, run.outcome, fixed_in)
        if run.incident_id or run.rule:
            await self._finish_incident(run)
        if self.on_finished is not None:
            await self.on_finished(run)
