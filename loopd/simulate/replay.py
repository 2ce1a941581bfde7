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
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from typing import Any, cast

import aiosqlite

from loopd.catalog.inventory import Inventory
from loopd.clock import VirtualClock
from loopd.config import LoopdConfig
from loopd.daemon import load_packs_and_rules, outcome_event
from loopd.decide.engine import Engine, _Pending
from loopd.decide.guards import Guards
from loopd.events import Event
from loopd.packs.executor import Executor
from loopd.runs import states
from loopd.runs.dispatcher import Dispatcher
from loopd.runs.runner import WorkflowRunner
from loopd.runs.tasks import TaskKinds
from loopd.simulate.input import CSV_SOURCE, EventFile, event_time, read_events
from loopd.simulate.report import Meter, Report, Tally
from loopd.store.base import Batch, RunRecord
from loopd.store.sqlite import SqliteStore

END_HORIZON = 7 * 86400.0
COMMIT_EVERY = 5000   # decisions per store transaction when no run forces a commit
QUIET_TURNS = 8       # loop turns with nothing moving before the runs count as quiescent


class _Cursor:
    """An async face on a sqlite3 cursor, as SqliteStore uses aiosqlite's."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def __aenter__(self) -> _Cursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cursor.close()


class _Call:
    """What ``execute`` returns: awaitable, and an ``async with`` block (like aiosqlite)."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = _Cursor(cursor)

    def __await__(self) -> Generator[Any, None, _Cursor]:
        return self._cursor.__aenter__().__await__()

    async def __aenter__(self) -> _Cursor:
        return self._cursor

    async def __aexit__(self, *exc: object) -> None:
        await self._cursor.__aexit__()


class _SyncConnection:
    """The part of aiosqlite's Connection SqliteStore uses, run in the caller's thread."""

    def __init__(self) -> None:
        self._db = sqlite3.connect(":memory:", isolation_level=None)

    def execute(self, sql: str, params: Iterable[Any] = ()) -> _Call:
        return _Call(self._db.execute(sql, tuple(params)))

    def executemany(self, sql: str, rows: Iterable[Any]) -> _Call:
        return _Call(self._db.executemany(sql, rows))

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    async def close(self) -> None:
        self._db.close()


class _ReplayStore(SqliteStore):
    """SqliteStore (its schema and statements) on an in-memory database driven in the
    event loop's thread, its writes buffered and written in one transaction when the runs
    are quiescent (or before a read): nothing else runs while a simulation writes, and a
    run's store call never waits on aiosqlite's thread, so the replay sees a run as
    quiescent only when it waits for the clock or an event. ``calls`` counts every store
    call, so the replay notices a run still making progress."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.calls = 0
        self._buffer: list[Batch | tuple[str, tuple[Any, ...]]] = []

    async def open(self) -> None:
        self._db = cast(aiosqlite.Connection, _SyncConnection())
        await self._migrate()

    async def _submit(self, op: Batch | tuple[str, tuple[Any, ...]]) -> None:
        self.calls += 1
        self._buffer.append(op)
        return None

    async def flush(self) -> None:
        """Write what is buffered, in order, in one transaction."""
        if not self._buffer:
            return
        ops, self._buffer = self._buffer, []
        loop = asyncio.get_running_loop()
        group: list[tuple[Any, asyncio.Future[Any]]] = [(op, loop.create_future()) for op in ops]
        await self._write_group(group)
        for _, done in group:
            done.result()  # raises the StoreError of a failed write

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        self.calls += 1
        await self.flush()
        return await super()._all(sql, params)


class _ReplayEngine(Engine):
    """The engine on event time. Between events (a run ending at its confirmation
    deadline, say) its clock is the replay's VirtualClock: the instant the run ended,
    not the time of the latest event decided, so breakers and flapping windows count
    from when it really happened."""

    def __init__(self, *args: Any, virtual: VirtualClock, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._virtual = virtual

    def now(self) -> float:
        return self._virtual.now()


class Simulation:
    """The engine and workflow half of loopd, wired as loopd.daemon wires them, on a
    VirtualClock and an in-memory store; ``replay`` feeds it events and returns the
    report. Use ``async with``; ``store`` stays open until the block ends."""

    def __init__(self, config: LoopdConfig, *, csv_source: str = CSV_SOURCE,
                 first_runs: int = 10) -> None:
        self.config = config
        self.clock = VirtualClock()
        self.store = _ReplayStore()
        inventory = Inventory.load(config.inventory)
        self.registry, self.ruleset = load_packs_and_rules(config)
        registry = self.registry
        executor = Executor(registry, {})  # dry run: no runner is ever asked to act
        self.engine = _ReplayEngine(
            self.store, self.ruleset, virtual=self.clock, inventory=inventory, clock=event_time,
            guards=Guards(config.guards, inventory), dedup_window=config.engine.dedup_window,
            telemetry_sources=frozenset(
                [c.name for c in config.sources if c.telemetry] + [csv_source]))
        self.kinds = TaskKinds(self.store, executor, services={"store": self.store},
                               dry_run=True, clock=self.clock)
        self.workflows = WorkflowRunner(self.store, lambda: registry, self.kinds,
                                        inventory=inventory, telemetry=self.engine.telemetry)
        self.engine.on_event = self.kinds.hub.offer
        self.dispatcher = Dispatcher(
            self.store, executor, inventory=inventory, finish_incident=self.engine.run_finished,
            workflows=self.workflows, dry_run=True, on_finished=self._finished, clock=self.clock,
            max_starting=1 << 30)  # the replay waits for quiescence itself
        self.engine.on_runs = self._dispatch
        self.engine.incidents.cancel_run = self._cancel_unstarted
        self.engine.incidents.restart_run = self._cancel_run
        self.tally = Tally(first_runs)
        self._pending = _Pending(Batch(), [])
        self._feedback: deque[Event] = deque()
        self._active: set[str] = set()
        self._ending = False
        self._cancels = 0
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

    # -- wiring ------------------------------------------------------------------------

    def _dispatch(self, runs: list[RunRecord]) -> None:
        for run in runs:
            self._active.add(run.id)
            self.tally.run_created(run)
        self.dispatcher.submit(runs)

    def _cancel_unstarted(self, run_id: str, reason: str) -> bool:
        """The engine cancels a run that has not acted (its alert resolved): the replay
        lets that run end before the next event."""
        cancelled = self.dispatcher.cancel_unstarted(run_id, reason)
        self._cancels += cancelled
        return cancelled

    def _cancel_run(self, run_id: str, reason: str) -> bool:
        """The engine cancels a run acting or not (run_mode restart), likewise."""
        cancelled = self.dispatcher.cancel_run(run_id, reason)
        self._cancels += cancelled
        return cancelled

    async def _finished(self, run: RunRecord) -> None:
        """Count the run; its outcome event goes back to the rules, as in the daemon."""
        now = self.clock.now()  # the dispatcher runs on the virtual clock too
        if self._ending and run.status == states.CANCELLED:
            run.reason = (f"still running {END_HORIZON / 86400:g} days after the last event: "
                          "the simulation ended it")
            await self.store.save_run(run)
        self._active.discard(run.id)
        self.tally.run_finished(run)
        outcome = outcome_event(run, self.config.outcomes.topic)
        outcome.time = now
        self._feedback.append(outcome)

    # -- driving -----------------------------------------------------------------------

    async def replay(self, events: Iterable[Event],
                     progress: Callable[[int], None] | None = None) -> Report:
        began = time.perf_counter()
        clock, tally, hub = self.clock, self.tally, self.kinds.hub
        decide = self.engine._decide  # the engine's synchronous hot path, one event at a time
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
                tally.out_of_order += 1
            mark = hub.satisfied + self._cancels
            decide(event, self._pending)
            # runs to start, evidence for a waiting run, or a run cancelled: let them act
            if self._pending.runs or hub.satisfied + self._cancels != mark:
                await self._commit()
                await self._settle()
            elif len(self._pending.batch.decisions) >= COMMIT_EVERY:
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
        pending = self._pending
        self._pending = _Pending(Batch(), [])
        if pending.batch:
            await self.store.commit(pending.batch)
        self.tally.decisions(pending.batch.decisions)
        if pending.runs:
            self._dispatch(pending.runs)

    async def _settle(self) -> None:
        """Return once every run is finished or waits for the clock or an event, and the
        outcome events of the runs that finished are decided."""
        hub = self.kinds.hub
        while True:
            await self._quiesce()
            if not self._feedback:
                return
            mark = hub.satisfied + self._cancels
            while self._feedback:  # outcome events may start runs or be evidence too
                event = self._feedback.popleft()
                self.tally.fed_back += 1
                self.engine._decide(event, self._pending)
            if not self._pending.runs and hub.satisfied + self._cancels == mark:
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
            return
        self.clock.advance(horizon)
        self._ending = True
        for run_id in sorted(self._active):
            if await self.dispatcher.cancel(run_id):
                self.tally.ended_by_simulation += 1
        await self._settle()


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
