"""A workflow run's resumable state, typed: what the runner saves before every step.

The store keeps it as JSON (``RunRecord.progress``); :meth:`Progress.from_json` reads
what :meth:`Progress.to_json` wrote, and the shape is the one earlier versions saved
(``{"ready": [...], "tasks": {name: {"state": ..., "attempt": ...}}, ...}``), so runs in
flight across an upgrade resume. Unset optional fields are left out of the JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loopd.runs.states import Outcome, RunStatus

JSON = Any


def _opt_float(value: Any) -> float | None:
    return float(value) if value is not None else None


@dataclass(slots=True)
class TaskState:
    """One task's (or one ``with_items`` item's) progress."""

    state: str = "ready"              # ready | running | waiting | done
    attempt: int = 0
    status: str | None = None         # its result (done tasks, finished items)
    input: Any = None                 # the rendered input (a rollback renders from it)
    output: Any = None                # a finished item's output
    step: int | None = None           # a confirm/approval step, found again on resume
    step_started: float | None = None
    not_before: float | None = None   # a delay or a retry's backoff, as an instant
    timeout_at: float | None = None   # the task's timeout, as an instant
    deadline: float | None = None     # a confirm's or an approval's deadline
    interrupted: bool = False         # running at a crash and not idempotent
    items: dict[str, TaskState] = field(default_factory=dict)  # with_items, by index

    def to_json(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {"state": self.state, "attempt": self.attempt}
        for name in ("status", "input", "output", "step", "step_started", "not_before",
                     "timeout_at", "deadline"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.interrupted:
            out["interrupted"] = True
        if self.items:
            out["items"] = {k: v.to_json() for k, v in self.items.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> TaskState:
        step = data.get("step")
        return cls(
            state=str(data.get("state", "ready")), attempt=int(data.get("attempt", 0)),
            status=data.get("status"), input=data.get("input"), output=data.get("output"),
            step=int(step) if step is not None else None,
            step_started=_opt_float(data.get("step_started")),
            not_before=_opt_float(data.get("not_before")),
            timeout_at=_opt_float(data.get("timeout_at")),
            deadline=_opt_float(data.get("deadline")),
            interrupted=bool(data.get("interrupted", False)),
            items={str(k): cls.from_json(v) for k, v in (data.get("items") or {}).items()})


@dataclass(slots=True)
class Ended:
    """An explicit ``succeed``/``fail`` task ended the run."""

    status: RunStatus
    reason: str | None = None
    outcome: Outcome | None = None


@dataclass(slots=True)
class Progress:
    ready: list[str] = field(default_factory=list)     # tasks to start (or resume)
    tasks: dict[str, TaskState] = field(default_factory=dict)
    arrived: dict[str, list[str]] = field(default_factory=dict)  # join -> tasks arrived
    completed: list[str] = field(default_factory=list)  # action/workflow tasks, for rollback
    history: list[str] = field(default_factory=list)
    seq: int = 0                                        # the last step's number
    ended: Ended | None = None
    failed_branch: str | None = None   # why a branch ended in an unhandled failure
    failed_status: RunStatus | None = None
    deadline: float | None = None      # the workflow's overall timeout, as an instant
    confirm: str | None = None         # the last confirm task's result
    gate: float | None = None          # rule mode approval: the approval's deadline

    def task(self, name: str) -> TaskState:
        """The task's state, created ``ready`` when it has none yet."""
        state = self.tasks.get(name)
        if state is None:
            state = self.tasks[name] = TaskState()
        return state

    def to_json(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {
            "ready": list(self.ready), "tasks": {k: v.to_json() for k, v in self.tasks.items()},
            "arrived": {k: list(v) for k, v in self.arrived.items()},
            "completed": list(self.completed), "history": list(self.history), "seq": self.seq,
            "ended": None if self.ended is None else {
                "status": self.ended.status, "reason": self.ended.reason,
                "outcome": self.ended.outcome},
            "failed_branch": self.failed_branch, "deadline": self.deadline}
        if self.failed_status is not None:
            out["failed_status"] = self.failed_status
        if self.confirm is not None:
            out["confirm"] = self.confirm
        if self.gate is not None:
            out["gate"] = {"deadline": self.gate}
        return out

    @classmethod
    def from_json(cls, data: JSON) -> Progress:
        """Read stored progress (None or ``{}`` is a run that has not started)."""
        if not data:
            return cls()
        ended = data.get("ended")
        failed_status = data.get("failed_status")
        gate = data.get("gate")
        return cls(
            ready=[str(n) for n in data.get("ready", [])],
            tasks={str(k): TaskState.from_json(v) for k, v in data.get("tasks", {}).items()},
            arrived={str(k): [str(n) for n in v] for k, v in data.get("arrived", {}).items()},
            completed=[str(n) for n in data.get("completed", [])],
            history=[str(h) for h in data.get("history", [])],
            seq=int(data.get("seq", 0)),
            ended=Ended(RunStatus(ended["status"]), ended.get("reason"),
                        _outcome(ended.get("outcome"))) if ended else None,
            failed_branch=data.get("failed_branch"),
            failed_status=RunStatus(failed_status) if failed_status else None,
            deadline=_opt_float(data.get("deadline")),
            confirm=data.get("confirm"),
            gate=_opt_float(gate.get("deadline")) if isinstance(gate, dict) else None)


def _outcome(value: Any) -> Outcome | None:
    """An outcome saved by a version that allowed free text is dropped (the run's outcome
    then follows from its confirmation and status)."""
    try:
        return Outcome(value) if value else None
    except ValueError:
        return None
