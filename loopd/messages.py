"""The two typed messages between deciding and running (DESIGN.md "State ownership").

``decide/`` is the only writer of incidents and guard memory, ``runs/`` the only writer
of run state; instead of calling into each other they send:

* a **run command** from the engine to the dispatcher, only after the decision that
  produced it is durable: ``StartRun`` (a run to execute) or ``CancelRun`` (stop one:
  ``acting_too=False`` only when it has not started to act, e.g. its alert resolved;
  ``True`` whatever it does, e.g. run mode ``restart`` or the API). Commands are sent
  in the order they were decided, so a cancel never overtakes the start of its run;
* ``RunEnded`` from the dispatcher into the engine's own inbox once the run's final
  state is stored: the engine starts what the incident queued, feeds the guards,
  closes the incident and decides the run's outcome event, all in its own batch, and
  then marks the message ``recorded`` (as a source's delivery is acknowledged), so the
  dispatcher counts a run as done only once its consequences are durable and the runs
  they start are on their way.

``Outbox`` is what a sender holds: anything with ``put_nowait`` (an ``asyncio.Queue``,
the engine's inbox, a list-backed recorder in a test). Sending never blocks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from loopd.events import Event
from loopd.store.base import RunRecord

M = TypeVar("M", contravariant=True)


class Outbox(Protocol[M]):
    def put_nowait(self, item: M, /) -> None: ...


@dataclass(frozen=True, slots=True)
class StartRun:
    """Execute a durable run; ``resumed``: it was in flight when loopd last stopped."""

    run: RunRecord
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class CancelRun:
    run_id: str
    reason: str
    acting_too: bool = False


RunCommand = StartRun | CancelRun


@dataclass(frozen=True, slots=True)
class RunEnded:
    """A run reached a final state, and that state is stored."""

    run: RunRecord
    recorded: asyncio.Future[None] | None = field(default=None, compare=False)

    def done(self) -> None:
        """The engine wrote what the run's end changed and sent the commands it made."""
        if self.recorded is not None and not self.recorded.done():
            self.recorded.set_result(None)

    def outcome_event(self, topic: str) -> Event:
        """The event loopd feeds back to its own rules (and a bus) when a run ends."""
        run = self.run
        data = {
            "run": run.id, "rule": run.rule, "key": run.key, run.kind: run.target,
            "status": run.status, "outcome": run.outcome, "reason": run.reason,
            "created": run.created, "finished": run.finished,
            "duration_s": (run.finished - run.created) if run.finished else None,
        }
        return Event(id=f"outcome:{run.id}", source="loopd", topic=topic, data=data,
                     key=run.key, origin=f"loopd run {run.id}",
                     time=run.finished if run.finished is not None else run.created)
