"""The dispatcher: runs the engine decided, executed under a concurrency cap.

It reads run commands from its queue (loopd.messages): ``StartRun`` executes a run in
its own task inside the dispatcher's TaskGroup (the engine sends it only once the run
is durable, so a cancel decided later always arrives after its start); ``CancelRun``
stops one. When a run ends, its final state is stored and ``RunEnded`` goes into the
engine's inbox. On start the dispatcher resumes what the store says was in flight: a
pending run starts; a run that was executing an action when loopd died is retried when
that action is idempotent and otherwise ends ``interrupted``, so no run stays
``running`` forever and no non-idempotent action runs twice. A run counts as executing
only once its action holds an executor slot: one still waiting for a slot is stored
``pending`` and simply starts again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from loopd import metrics
from loopd.catalog.inventory import Inventory
from loopd.clock import Clock, WallClock
from loopd.errors import LeaseLost
from loopd.messages import CancelRun, Outbox, RunCommand, RunEnded, StartRun
from loopd.packs.executor import ActionContext, Executor
from loopd.runs import states
from loopd.runs.approvals import Approvals
from loopd.runs.lease import lease_check
from loopd.runs.slots import Slots
from loopd.store.base import RunRecord, StepRecord, Store

log = structlog.get_logger("loopd.dispatcher")

API_CANCEL = "cancelled through the API"


def api_cancel(by: str | None) -> str:
    """The reason of a run cancelled through the API, naming who: ``... by oncall-bob``."""
    return f"{API_CANCEL} by {by}" if by else API_CANCEL


class WorkflowExecutor(Protocol):
    """Executes a run of kind ``workflow`` (see loopd.runs.runner)."""

    async def execute(self, run: RunRecord, *, resumed: bool) -> tuple[str, str | None]: ...

    def outcome(self, run: RunRecord, status: str) -> str: ...


class Announcer(Protocol):
    """Tells the world outside loopd that a run ended (e.g. its outcome event on a bus)."""

    async def announce(self, run: RunRecord) -> None: ...


class Dispatcher:
    def __init__(
        self, store: Store, executor: Executor, *, inventory: Inventory,
        commands: asyncio.Queue[RunCommand] | None = None,
        ended: Outbox[RunEnded] | None = None, workflows: WorkflowExecutor | None = None,
        dry_run: bool = False, clock: Clock | None = None, slots: Slots | None = None,
        approvals: Approvals | None = None, announcer: Announcer | None = None,
    ) -> None:
        self.store = store
        self.clock: Clock = clock or WallClock()
        self.executor = executor
        self.inventory = inventory
        self.workflows = workflows
        self.dry_run = dry_run
        self.commands: asyncio.Queue[RunCommand] = commands if commands is not None \
            else asyncio.Queue()
        self._ended = ended
        self._announcer = announcer
        # Runs starting at once (until they act and settle into a wait): shared with the
        # task kinds, which give a slot back while a run waits.
        self._slots = slots if slots is not None else Slots()
        self.approvals = approvals if approvals is not None else Approvals()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # The one ledger of cancellation: runs handed over that have not acted yet
        # (pending, awaiting approval), and runs asked to stop -> why.
        self._unstarted: set[str] = set()
        self._stopping: dict[str, str] = {}
        self._entered: set[str] = set()  # tasks whose body runs (a cancel reaches it)
        self._ending: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.shutting_down = False
        # told (the engine) when a run was lost to another replica: memory forgets it
        self.on_lost: Callable[[RunRecord], None] | None = None

    def cancel(self, run_id: str, reason: str, *, acting_too: bool = False) -> bool:
        """Stop a run this dispatcher has; unless ``acting_too``, only one that has not
        acted yet (resolved alert). False when it has no such run."""
        task = self._tasks.get(run_id)
        if task is None or run_id in self._ending or (
                not acting_too and run_id not in self._unstarted):
            return False
        self._stopping.setdefault(run_id, reason)
        if run_id in self._entered:
            task.cancel()
        # else its body has not run yet: it sees ``_stopping`` first thing and ends there
        return True

    async def claim(self, stored: list[RunRecord]) -> dict[str, int]:
        """Claim what this replica resumes (its own runs, unowned ones, those of replicas
        silent past the lease), marking them in ``stored``; id -> epoch."""
        mine = await self.store.claim_runs(states.ACTIVE)
        for run in stored:
            if run.id in mine:
                run.owner, run.epoch = self.store.replica, mine[run.id]
        return mine

    async def resume(self, stored: list[RunRecord] | None = None,
                     claimed: dict[str, int] | None = None) -> int:
        """Re-dispatch what was in flight when loopd stopped; returns how many."""
        # sub-workflow runs ("parent/task") are resumed by their parent
        # only the runs this replica claimed: two processes on one store never both run one
        mine = claimed if claimed is not None else await self.store.claim_runs(states.ACTIVE)
        if stored is None:
            stored = await self.store.runs_in_status(states.ACTIVE)
        runs = [r for r in stored if r.status in states.ACTIVE and "/" not in r.id
                and r.id in mine]
        for run in runs:
            run.owner, run.epoch = self.store.replica, mine[run.id]
            self._idle.clear()
            self.commands.put_nowait(StartRun(run, resumed=True))
        if runs:
            log.info("resuming runs", count=len(runs))
        return len(runs)

    async def takeover(self) -> list[RunRecord]:
        """Claim the runs of replicas silent for longer than the lease and resume them here,
        from their last stored step (today's rule for an action that was running: retried
        only when idempotent, else ``interrupted``); returns them (the engine adopts their
        incidents before they end)."""
        claimed = await self.store.claim_runs(states.ACTIVE, others_only=True)
        runs = []
        for run_id, epoch in claimed.items():
            if "/" in run_id or run_id in self._tasks:
                continue  # a sub-workflow run is resumed by its parent
            run = await self.store.get_run(run_id)
            if run is None or run.status not in states.ACTIVE:
                continue
            run.epoch = epoch
            runs.append(run)
        if runs:
            metrics.runs_taken_over(len(runs), [r.id for r in runs])
        return runs

    def start(self, runs: list[RunRecord]) -> None:
        """Execute runs this replica just took over."""
        for run in runs:
            self._idle.clear()
            self.commands.put_nowait(StartRun(run, resumed=True))

    async def run(self) -> None:
        commands = self.commands
        async with asyncio.TaskGroup() as group:
            try:
                while True:
                    command = await commands.get()
                    if isinstance(command, CancelRun):
                        self.cancel(command.run_id, command.reason,
                                    acting_too=command.acting_too)
                        self._idle_if_done()
                        continue
                    run = command.run
                    self._idle.clear()
                    if run.status in (states.PENDING, states.AWAITING_APPROVAL) \
                            and not run.started:
                        self._unstarted.add(run.id)
                    self._tasks[run.id] = group.create_task(
                        self._execute(run, command.resumed), name=f"run-{run.id}")
            except asyncio.CancelledError:
                # Whoever stops the dispatcher (shutdown, or the daemon's task group
                # failing) stops it: runs in flight stay as stored and resume next start.
                self.shutting_down = True
                raise

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until no run is queued or executing (tests, simulation, shutdown)."""
        self._idle_if_done()
        await asyncio.wait_for(self._idle.wait(), timeout)

    def active(self) -> int:
        return len(self._tasks)

    def _idle_if_done(self) -> None:
        if not self._tasks and not self._ending and self.commands.empty():
            self._idle.set()

    async def _execute(self, run: RunRecord, resumed: bool) -> None:
        self._entered.add(run.id)
        try:
            await self._execute_run(run, resumed)
        except LeaseLost as exc:
            # another replica owns the run now: stop without writing or acting (nothing of
            # this run is ours to end; its new owner resumes it from the store)
            metrics.lease_lost(run.id, exc)
            if self.on_lost is not None:
                self.on_lost(run)
        finally:
            self._ending.discard(run.id)
            self._slots.give_back(run.id)
            self._tasks.pop(run.id, None)
            self._unstarted.discard(run.id)
            self._stopping.pop(run.id, None)
            self._entered.discard(run.id)
            self.store.release(run.id)
            self._idle_if_done()

    async def _execute_run(self, run: RunRecord, resumed: bool) -> None:
        try:
            if run.id in self._stopping:
                raise asyncio.CancelledError  # cancelled before it was ever scheduled
            await self._slots.take(run.id)
            if run.id in self._stopping:
                raise asyncio.CancelledError  # cancelled while waiting for a slot
            gated = run.status == states.AWAITING_APPROVAL and not run.started
            if gated and not await self._gate(run):
                return
            if run.kind == "workflow" and self.workflows is not None:
                self._unstarted.discard(run.id)
                metrics.run_started(run.target, run.id)
                status, reason = await self.workflows.execute(run, resumed=resumed)
                run.outcome = self.workflows.outcome(run, status)
                await self._end(run, status, reason, started=True)
            else:  # unstarted until its action holds an executor slot
                await self._run_action(run, resumed)
        except asyncio.CancelledError:
            if self.shutting_down or run.id in self._ending:
                raise  # left as it is in the store; resumed at next start
            unstarted = run.id in self._unstarted  # never counted as running
            why = self._stopping.pop(run.id, None)
            if self.workflows is not None and run.kind == "workflow" and run.progress:
                run.outcome = self.workflows.outcome(run, states.CANCELLED)
            await self._end(run, states.CANCELLED, why or API_CANCEL, started=not unstarted)
        except LeaseLost:
            raise
        except Exception as exc:  # task boundary: a loopd bug ends this run, not the daemon
            log.exception("run crashed", run=run.id)
            if run.id not in self._ending:
                try:
                    await self._end(run, states.CRASHED, f"{type(exc).__name__}: {exc}")
                except LeaseLost:
                    raise
                except Exception:  # e.g. the store is failing too: say so, keep the daemon
                    log.exception("could not record the crashed run", run=run.id)

    async def _gate(self, run: RunRecord) -> bool:
        """Rule ``mode: approval``: wait for a human before acting, through the same
        approvals as an ``approval:`` task; False when the run ended here."""
        self._slots.give_back(run.id)  # waiting for a human holds no starting slot
        deadline = float((run.progress or {}).get("gate", {}).get("deadline",
                                                                   self.clock.now()))
        decided = await self.approvals.wait(run.id, deadline, self.clock)
        if decided is None:
            await self._end(run, states.EXPIRED, "approval expired before anyone decided")
            return False
        if not decided.approved:
            await self._end(run, states.REJECTED, decided.rejection())
            return False
        await self._slots.take(run.id)
        states.move(run, states.PENDING)
        run.progress = {k: v for k, v in (run.progress or {}).items() if k != "gate"} or None
        run.ctx = {**(run.ctx or {}), "approved": {"reason": decided.reason,
                                                   "by": decided.by, "at": self.clock.now()}}
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
        step: StepRecord | None = None

        async def started() -> None:
            # Called once the action holds its executor slot, right before it acts: only
            # now is the run ``running``. Until then it stays pending in the store, so a
            # run that was only waiting for a slot when loopd died starts after a restart
            # instead of ending interrupted; it can still be cancelled like any unstarted run.
            nonlocal step
            self._unstarted.discard(run.id)
            states.move(run, states.RUNNING)
            run.started = self.clock.now()
            await self.store.save_run(run)
            metrics.run_started(run.target, run.id)
            step = StepRecord(run.id, 1, "action", run.target, 1, states.RUNNING,
                              self.clock.now(), input=run.input)
            await self.store.save_step(step)

        ctx = ActionContext(run.id, "action", self.inventory, dry_run=self.dry_run,
                            holds=[self._slots.hold(run.id)],
                            lease=lease_check(self.store, run.id))
        inputs: dict[str, Any] = run.input if isinstance(run.input, dict) else {}
        known = self.executor.registry.actions.get(run.target)
        if known is not None and known.spec.idempotent:
            # an idempotent action is retried after a crash anyway: it may be recorded
            # running before it queues for a slot, where its write joins a large group
            # commit; only a non-idempotent one pays for a write inside its slot
            await started()
            result = await self.executor.execute(run.target, inputs, ctx)
        else:
            result = await self.executor.execute(run.target, inputs, ctx, started=started)
        if step is None:  # it never started (invalid input, unknown action): record why
            await started()
        assert step is not None
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
        if self._ended is not None:  # stored final: the engine takes it from here
            recorded = asyncio.get_running_loop().create_future()
            self._ended.put_nowait(RunEnded(run, recorded))
            # the run counts as active until its end is recorded (incident closed, queued
            # run started): draining the dispatcher means the loop really went quiet
            await recorded
        if self._announcer is not None:
            await self._announcer.announce(run)
