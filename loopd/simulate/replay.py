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
from collections.abc import Callable, Generator, Iterable
from typing import Any, cast

import aiosqlite

from loopd.clock import VirtualClock
from loopd.config import LoopdConfig
from loopd.events import Event
from loopd.messages import StartRun
from loopd.simulate.input import CSV_SOURCE, EventFile, read_events
from loopd.simulate.report import Meter, Report, Tally
from loopd.store.base import Batch
from loopd.store.sqlite import SqliteStore
from loopd.wiring import build

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
                tally.out_of_order += 1
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
