"""``loopd simulate``: replay recorded events through the real rules, engine decisions and
workflows, with event time as the clock and every action in dry run.

What is real: the rules, the engine's decisions (``for:``, throttles, incidents, run
modes, guards), the workflows (transitions, retries, delays, confirmations, rollbacks,
timeouts) and the outcome events loopd feeds back to its own rules. What is not:
actions are not executed (the executor returns the action's ``dry_run:`` output from its
pack.yaml, ``{"dry_run": true}`` when it declares none); PromQL is not queried,
Alertmanager silences are not consulted and nobody approves (approvals expire); the
state is an in-memory SQLite store, never the daemon's.

How time moves: the engine's clock is each event's ``time``; the workflows run on a
VirtualClock. Before an event at T, every timer due before T (delay, retry, confirmation
deadline, approval expiry, timeout) fires, one deadline at a time in order, and the
replay waits until the runs are quiescent (each finished, or waiting for the clock or an
event); then the event is decided at T. An event that creates runs, is evidence for a
waiting run or cancels one is committed, its runs dispatched, and the replay waits for
quiescence again, so the runs' confirmations see the next event. After the last event
the clock moves past every pending deadline (at most ``END_HORIZON`` beyond it; runs
still going then are cancelled).

Inputs (JSON Lines events or Alertmanager payloads, CSV telemetry) are read by
loopd.simulate.input; the first invalid line stops the replay with ``DecodeError``
naming ``FILE:LINE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

from loopd.clock import VirtualClock
from loopd.config import LoopdConfig
from loopd.events import Event
from loopd.messages import StartRun
from loopd.simulate.input import CSV_SOURCE, EventFile, read_events
from loopd.simulate.report import Meter, Report, Tally
from loopd.store.base import Batch, CommitResult, RunRecord, StepRecord
from loopd.store.memory import MemoryStore
from loopd.wiring import build

END_HORIZON = 7 * 86400.0
COMMIT_EVERY = 5000   # decisions per store transaction when no run forces a commit
QUIET_TURNS = 8       # loop turns with nothing moving before the runs count as quiescent


class _ReplayStore(MemoryStore):
    """The in-memory store, counting every call so the replay notices a run still making
    progress: nothing else runs while a simulation writes, and a run's store call never
    waits on a thread, so the replay sees a run as quiescent only when it waits for the
    clock or an event. Only the public Store protocol is used."""

    def __init__(self) -> None:
        super().__init__(replica="simulate")
        self.calls = 0

    async def commit(self, batch: Batch) -> CommitResult:
        self.calls += 1
        return await super().commit(batch)

    async def save_run(self, run: RunRecord) -> None:
        self.calls += 1
        await super().save_run(run)

    async def save_step(self, step: StepRecord) -> None:
        self.calls += 1
        await super().save_step(step)

    async def steps(self, run_id: str) -> list[StepRecord]:
        self.calls += 1
        return await super().steps(run_id)

    async def get_run(self, run_id: str) -> RunRecord | None:
        self.calls += 1
        return await super().get_run(run_id)

    async def kv_put(self, namespace: str, key: str, value: Any) -> None:
        self.calls += 1
        await super().kv_put(namespace, key, value)

    async def kv_get(self, namespace: str, key: str) -> Any:
        self.calls += 1
        return await super().kv_get(namespace, key)

    async def flush(self) -> None:
        """Nothing is buffered: every write is applied when it is made."""


class Simulation:
    """loopd as loopd.wiring builds it for ``loopd simulate``: the engine on event time,
    the workflows on the same VirtualClock, actions in dry run, an in-memory store;
    ``replay`` feeds it events and returns the report. Use ``async with``; ``store`` stays
    open until the block ends. It drives the engine one event at a time through the
    engine's public ``decide_now``/``take_inbox``/``commit``."""

    def __init__(self, config: LoopdConfig, *, csv_source: str = CSV_SOURCE,
                 first_runs: int = 10) -> None:
        self.config = config
        self.clock = VirtualClock()
        self.store = _ReplayStore()
        parts = build(config, store=self.store, clock=self.clock, event_time=True,
                      simulated=True, telemetry_sources=(csv_source,))
        self.registry, self.ruleset = parts.registry, parts.ruleset
        self.engine = parts.engine
        self.kinds = parts.runs.kinds
        self.workflows = parts.runs.workflows
        self.dispatcher = parts.runs.dispatcher
        self.tally = Tally(first_runs)
        self._active: set[str] = set()
        self._dispatcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Simulation:
        await self.store.open()
        await self.engine.load()
        self._dispatcher = asyncio.create_task(self.dispatcher.run(), name="simulate-dispatch")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._dispatcher is not None:
            self.dispatcher.shutting_down = True
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        await self.store.close()

    # -- driving -----------------------------------------------------------------------

    async def replay(self, events: Iterable[Event],
                     progress: Callable[[int], None] | None = None) -> Report:
        began = time.perf_counter()
        clock, tally, hub, engine = self.clock, self.tally, self.kinds.hub, self.engine
        read = 0
        for event in events:
            read += 1
            when = event.time
            tally.event(event)
            if when > clock.now():
                due = clock.next_deadline()
                if due is not None and due < when:
                    await self._timers(before=when)
                clock.advance(when, inclusive=False)  # timers due at `when` fire after it
            elif when < clock.now():
                tally.late(event, clock.now())
            mark = hub.satisfied
            # runs to start or cancel, or evidence for a waiting run: let them act
            if engine.decide_now(event) or hub.satisfied != mark:
                await self._commit()
                await self._settle()
            elif engine.open_decisions() >= COMMIT_EVERY:
                await self._commit()
            if progress is not None and not read & 1023:
                progress(read)
        await self._commit()
        last = clock.now()
        await self._timers(before=last + END_HORIZON)
        await self._end(last + END_HORIZON)
        if progress is not None:
            progress(read)
        return await tally.report(self, time.perf_counter() - began, read)

    async def _timers(self, before: float) -> None:
        """Fire every timer due before ``before``, one deadline at a time."""
        clock = self.clock
        await self._commit()
        while (due := clock.next_deadline()) is not None and due < before:
            clock.advance(due)
            await self._settle()

    async def _commit(self) -> None:
        committed = await self.engine.commit()
        self.tally.decisions(committed.decisions)
        for command in committed.commands:
            if isinstance(command, StartRun):
                self._active.add(command.run.id)
                self.tally.run_created(command.run)

    async def _settle(self) -> None:
        """Return once every run is finished or waits for the clock or an event, and the
        ends of the runs that finished (their outcome events too) are decided."""
        hub, engine = self.kinds.hub, self.engine
        while True:
            await self._quiesce()
            mark = hub.satisfied
            ended = engine.take_inbox()  # outcome events may start runs or be evidence too
            if not ended:
                return
            for message in ended:
                self._active.discard(message.run.id)
                self.tally.run_finished(message.run)
                self.tally.fed_back += 1
            if not engine.open_commands() and hub.satisfied == mark:
                return
            await self._commit()

    async def _quiesce(self) -> None:
        store, clock, dispatcher = self.store, self.clock, self.dispatcher
        quiet, last = 0, (-1, -1, -1)
        while quiet < QUIET_TURNS:
            await asyncio.sleep(0)  # every callback ready now runs before this returns
            mark = (store.calls, clock.changes, dispatcher.active())
            quiet = quiet + 1 if mark == last else 0
            last = mark
        await store.flush()

    async def _end(self, horizon: float) -> None:
        """Runs still active at the horizon are cancelled: the simulation ended them."""
        if not self._active:
            await self._commit()  # the ends of the last runs (incidents closed)
            return
        self.clock.advance(horizon)
        why = (f"still running {END_HORIZON / 86400:g} days after the last event: "
               "the simulation ended it")
        for run_id in sorted(self._active):
            if self.dispatcher.cancel(run_id, why, acting_too=True):
                self.tally.ended_by_simulation += 1
        await self._settle()
        await self._commit()


async def run_simulation(config: LoopdConfig, files: list[EventFile], *,
                         csv_source: str = CSV_SOURCE, first_runs: int = 10,
                         meter: Meter | None = None,
                         progress: Callable[[int], None] | None = None) -> Report:
    """Replay ``files`` through ``config``'s rules and workflows; the report of the run."""
    events = read_events(files, csv_source=csv_source, meter=meter)
    async with Simulation(config, csv_source=csv_source, first_runs=first_runs) as sim:
        report = await sim.replay(events, progress)
    report.files = [str(f.path) for f in files]
    return report
