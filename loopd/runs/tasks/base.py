"""Bookkeeping every task kind shares: steps in the store, the run's typed progress while
it executes, moves between running and waiting, the rendered task message."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loopd.clock import Clock, WallClock
from loopd.errors import ConditionError
from loopd.packs.executor import Executor
from loopd.runs import states
from loopd.runs.approvals import Approvals
from loopd.runs.evidence import ConfirmHub, PromQL
from loopd.runs.progress import Progress, TaskState
from loopd.runs.slots import Slots
from loopd.store.base import RunRecord, StepRecord, Store
from loopd.workflow.loader import CompiledTask

if TYPE_CHECKING:
    from loopd.runs.runner import WorkflowRunner

INCONCLUSIVE = "inconclusive"  # a confirm task's result without evidence either way


@dataclass(slots=True)
class TaskResult:
    status: str
    output: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempt: int = 1
    step: StepRecord | None = None


class TaskBase:
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
        # the typed progress of each executing run; RunRecord.progress stays the JSON the
        # store saves, written from this before every save
        self._live: dict[str, Progress] = {}

    @property
    def wf(self) -> WorkflowRunner:
        assert self.runner is not None, "TaskKinds is used by one WorkflowRunner"
        return self.runner

    # -- progress ------------------------------------------------------------------

    def progress(self, run: RunRecord) -> Progress:
        """The run's progress: the live one while it executes, else read from its JSON."""
        live = self._live.get(run.id)
        return live if live is not None else Progress.from_json(run.progress)

    def begin(self, run: RunRecord, progress: Progress) -> None:
        """``progress`` is the run's while it executes (until :meth:`end`)."""
        self._live[run.id] = progress

    def end(self, run: RunRecord) -> None:
        """The run stops executing: its progress goes back into the record as JSON."""
        live = self._live.pop(run.id, None)
        if live is not None:
            run.progress = live.to_json()

    async def save(self, run: RunRecord) -> None:
        """Save the run with its current progress."""
        live = self._live.get(run.id)
        if live is not None:
            run.progress = live.to_json()
        await self.store.save_run(run)

    # -- bookkeeping -------------------------------------------------------------

    def _message(self, run: RunRecord, ct: CompiledTask) -> str | None:
        """The task's rendered message (approval prompt, fail reason)."""
        if ct.message is None:
            return None
        try:
            return str(ct.message(self.wf.scope(run)))
        except ConditionError as exc:
            return f"(message failed to render: {exc})"

    @staticmethod
    def _settle(run: RunRecord, status: str) -> None:
        """Move the run to ``status`` unless a parallel branch moved it there already."""
        if run.status != status:
            states.move(run, status)

    def _begin_waiting(self, ts: TaskState, within: float) -> float:
        """A confirm/approval starts waiting: its deadline (kept across a restart)."""
        if ts.deadline is None:
            ts.deadline = self.clock.now() + within
        ts.state = "waiting"
        return ts.deadline

    async def _waiting_step(self, run: RunRecord, ct: CompiledTask, ts: TaskState,
                            status: str, input: Any = None) -> StepRecord:
        """The step of a confirm/approval: created once, found again after a restart."""
        if ts.step is not None and ts.step_started is not None and run.status == status:
            self.slots.give_back(run.id)
            return StepRecord(run.id, ts.step, ct.name, None, 1, states.RUNNING,
                              ts.step_started, input=input)
        self._settle(run, status)
        step = await self._step(run, ct.name, None, 1, input)
        ts.step, ts.step_started = step.seq, step.started
        await self.save(run)  # the status and the step to find again, together
        self.slots.give_back(run.id)
        return step

    async def _wait_until(self, run: RunRecord, instant: float) -> None:
        """Wait for a timer (a task's delay, a retry's backoff) holding no start slot, so
        the next run starts meanwhile; the run takes one again before it goes on."""
        if instant <= self.clock.now():
            return
        self.slots.give_back(run.id)
        await self.clock.sleep_until(instant)
        await self.slots.take(run.id)

    async def _step(self, run: RunRecord, task: str, action: str | None, attempt: int,
                    input: Any = None) -> StepRecord:
        progress = self.progress(run)
        progress.seq += 1
        step = StepRecord(run.id, progress.seq, task, action, attempt, states.RUNNING,
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

    async def end_running_steps(self, run: RunRecord, status: str, why: str, *,
                                task: str | None = None, keep: Collection[int] = ()
                                ) -> StepRecord | None:
        """End the steps a task timeout or a stop of loopd left ``running`` (the run's, or
        ``task``'s; not those in ``keep``) with ``status``; return the last one. New steps
        are numbered after every step found, so none is ever overwritten."""
        progress = self.progress(run)
        last = None
        for step in await self.store.steps(run.id):
            progress.seq = max(progress.seq, step.seq)
            if step.status != states.RUNNING or step.seq in keep or task not in (None, step.task):
                continue
            await self._finish(step, status, step.output, why)
            last = step
        return last
