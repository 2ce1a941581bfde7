"""The engine: delivery -> match -> decide -> record -> ack.

Two tasks share the work so the decision loop never waits on the disk:

* the *decider* takes deliveries from the bounded queue in batches and decides
  each event synchronously against in-memory state (open incidents, ``for:``
  timers, throttles, recent event ids), appending what it decided to a Batch.
  Before each batch it takes what is in its own inbox, checked first so a busy
  source never starves it: ``RunEnded`` messages (loopd.messages) from the
  dispatcher, whose consequences (the incident's queued run started, guard memory,
  the incident closed, the outcome event) go into the same Batch;
* the *writer* commits each Batch in one transaction, then acknowledges its
  deliveries (Kafka offsets become committable) and sends the run commands the
  batch decided (``StartRun``, ``CancelRun``) to the dispatcher, in order.

The engine is the one writer of incidents, ``for:`` timers and guard memory, and it
writes them only through its Batches. In-memory state runs ahead of the disk, never
the acknowledgements: after a crash the unacknowledged events are redelivered and
decided again from the durable state, so no event is lost and none is decided twice.

Time: ``clock`` is a loopd.clock.Clock. With ``event_time=True`` (simulation, tests)
it is a VirtualClock the engine moves to each event's time; the event is decided at
its own time, and between events the clock says when things happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loopd import metrics
from loopd.catalog.inventory import Inventory
from loopd.catalog.telemetry import DEFAULT_MAX_KEYS as TELEMETRY_MAX_KEYS
from loopd.catalog.telemetry import DEFAULT_TTL as TELEMETRY_TTL
from loopd.catalog.telemetry import Telemetry
from loopd.clock import Clock, VirtualClock, WallClock
from loopd.decide.committer import Committer
from loopd.decide.correlation import (
    MEMBERS,
    NAMESPACE,
    Absence,
    Correlation,
    Slot,
    event_from,
    member_rows,
    row,
)
from loopd.decide.guards import DEFAULT_MAX_KEYS as MEMORY_MAX_KEYS
from loopd.decide.guards import Guards
from loopd.decide.incidents import Incidents
from loopd.decide.recent import RecentEvents
from loopd.decide.suppressions import SuppressionLog
from loopd.decide.timers import ForTimers
from loopd.errors import ConditionError, StoreError, StoreRejected
from loopd.events import Delivery, Event
from loopd.messages import Outbox, RunCommand, RunEnded, StartRun
from loopd.policy import GlobalGuards, RuleGuards
from loopd.rules.compile import CompiledRule
from loopd.rules.loader import RuleSet
from loopd.rules.matcher import RuleIndex
from loopd.runs import states
from loopd.store.base import (
    Batch,
    BreakerRecord,
    CommitResult,
    DecisionRecord,
    EventRecord,
    IncidentRecord,
    Mark,
    RunRecord,
    Store,
    refusal_reason,
)

NO_KEY = "-"
ANY_SOURCE = "*"  # in Engine.keep_evidence: a confirm task waits on events of any source
THROTTLE_MEMORY = 7 * 86400.0
GUARDS_KV = ("guards", "state")


class _Ignore:
    """Where run commands go when nobody runs them (tests of decisions alone)."""

    def put_nowait(self, item: RunCommand, /) -> None:
        pass


@dataclass(slots=True)
class _Pending:
    batch: Batch
    deliveries: list[Delivery]
    commands: list[RunCommand] = field(default_factory=list)
    inbox: int = 0  # inbox messages taken into this batch (they count as in flight)
    ended: list[RunEnded] = field(default_factory=list)  # told once written and sent
    # where each delivery's records start (what comes before the first: the inbox's), so
    # a batch the store rejects can be split until the culprit is found
    marks: list[Mark] = field(default_factory=list)
    matched: Counter[str] = field(default_factory=Counter)  # counted once, when sealed
    # several replicas: groups this batch held below their count, read from the store
    # once it is written (their other members may be another replica's)
    held: list[Slot] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Committed:
    """What ``Engine.commit`` wrote and sent."""

    decisions: list[DecisionRecord]
    commands: list[RunCommand]


class Inbox:
    """The engine's own inbox: ``put_nowait`` never blocks and wakes the decider."""

    def __init__(self, wake: asyncio.Event, engine: Engine) -> None:
        self._items: deque[RunEnded | None] = deque()
        self._wake = wake
        self._engine = engine

    def put_nowait(self, item: RunEnded | None, /) -> None:
        """A message; None asks only for what changed in memory to be written."""
        self._items.append(item)
        self._engine._busy(1)
        self._wake.set()

    def __len__(self) -> int:
        return len(self._items)

    def popleft(self) -> RunEnded | None:
        return self._items.popleft()


class Engine:
    def __init__(
        self, store: Store, rules: RuleSet, *, inventory: Inventory | None = None,
        queue_size: int = 10_000, batch_max: int = 2000, dedup_window: int = 200_000,
        clock: Clock | None = None, event_time: bool = False,
        commands: Outbox[RunCommand] | None = None,
        evidence: Callable[[Event], None] | None = None,
        telemetry_sources: frozenset[str] | None = None, guards: Guards | None = None,
        outcomes_topic: str | None = None, telemetry_ttl: float = TELEMETRY_TTL,
        telemetry_max_keys: int = TELEMETRY_MAX_KEYS, memory_max_keys: int = MEMORY_MAX_KEYS,
    ) -> None:
        self.committer = Committer(store)  # the store decides; see loopd.decide.committer
        self.inventory = inventory or Inventory()
        # bounded: keys not seen for the TTL, or the least recent past the maximum, go
        self.telemetry = Telemetry(ttl=telemetry_ttl, max_keys=telemetry_max_keys)
        self._telemetry_sources = telemetry_sources  # None: every source
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=queue_size)
        self.clock: Clock = clock if clock is not None else WallClock()
        self._virtual: VirtualClock | None = None
        if event_time:
            if not isinstance(self.clock, VirtualClock):
                raise TypeError("event_time needs a VirtualClock the engine can move")
            self._virtual = self.clock
        self._commands: Outbox[RunCommand] = commands if commands is not None else _Ignore()
        self._evidence = evidence  # e.g. confirm tasks waiting for evidence
        # several replicas: events of these sources (topics starting with one of the
        # prefixes) are stored even when no rule decided them, for confirm tasks waiting
        # on other replicas (None: not stored)
        self.keep_evidence: dict[str, tuple[str, ...]] | None = None
        self._outcomes_topic = outcomes_topic  # a run's end is an event on this topic
        self.matches: Counter[str] = Counter()
        self._batch_max = batch_max
        self._written: asyncio.Queue[_Pending | None] = asyncio.Queue(maxsize=2)
        self._recent = RecentEvents(dedup_window)
        self.guards = guards or Guards(GlobalGuards(), self.inventory)
        self.suppressions = SuppressionLog()  # the log lines of suppressed decisions
        self.incidents = Incidents(self.guards, self.inventory, self.suppressions)
        self._timers = ForTimers(memory_max_keys)  # guard memory is bounded by Guards itself
        # group, inhibits, absent and all: their partial state (loopd.decide.correlation)
        self.correlation = Correlation(self.incidents, self.suppressions, memory_max_keys)
        self._absence_retry = 0.0  # monotonic: the store failed reading a due absence
        self._rejections = 0  # Committer.rejections when correlation was last read
        self._sealed = 0  # batches sealed with something to commit (Committer.commits)
        # other replicas decide the same keys (set by loopd.cluster): group members are
        # read back from the store, and their open group incidents inhibit here too
        self.shared = False
        self._completed: list[tuple[Slot, list[tuple[str, Any]]]] = []
        self._in_flight = 0
        # liveness: monotonic time of the last batch written (or of work arriving when idle)
        self.progress_at = time.monotonic()
        self._wake = asyncio.Event()
        self.inbox = Inbox(self._wake, self)
        self._open = _Pending(Batch(), [])  # what decide_now decided, not yet committed
        self._run_updates: list[RunRecord] = []  # queued runs cancelled through control
        self._breakers_closed: list[str] = []  # closed through control: written next batch
        self._resolved: list[Event] = []  # resolved alerts received by other replicas
        self._closed_here: dict[str, float] = {}  # scope -> when (monotonic)
        self._idle = asyncio.Event()
        self._idle.set()
        self.ruleset = rules
        self._index = RuleIndex(rules.rules)
        self.incidents.set_rules(rules.rules)
        self.correlation.set_rules(rules.rules)

    @property
    def store(self) -> Store:
        return self.committer.store

    @store.setter
    def store(self, store: Store) -> None:
        self.committer.store = store

    @property
    def store_ok(self) -> bool:
        """False while the store fails commits (down, full, locked): nothing is decided."""
        return self.committer.ok

    # -- lifecycle ---------------------------------------------------------------

    async def load(self, open_runs: list[RunRecord] | None = None,
                   claimed: set[str] | None = None) -> None:
        """Restore what the store knows, before the first delivery. ``claimed``: the active
        runs this replica claimed (``Dispatcher.claim``); the others are another replica's."""
        state = await self.store.load_state(
            since=time.time() - THROTTLE_MEMORY, recent=self._recent.size)
        if open_runs is None:
            open_runs = await self.store.runs_in_status((*states.ACTIVE, states.QUEUED))
        # Incidents whose runs another replica executes stay out of memory: that replica
        # closes them, and an event for them here meets them in the store (joined)
        # (whose are an incident's queued runs is told by its active ones)
        active = [r for r in open_runs if r.status in states.ACTIVE]
        if claimed is None:
            now = time.time()
            others = {r.name for r in await self.store.replicas() if r.name !=
                      self.store.replica and now - r.heartbeat < self.store.lease}
            foreign_run = {r.id for r in active if r.owner in others}
        else:
            foreign_run = {r.id for r in active if r.id not in claimed}
        theirs = {r.incident_id for r in active if r.id in foreign_run}
        ours = {r.incident_id for r in active if r.id not in foreign_run}
        foreign = theirs - ours
        stale = self.incidents.restore(
            [i for i in state.open_incidents if i.id not in foreign],
            [r for r in open_runs if r.incident_id not in foreign])
        if stale:  # closed as any other change of incidents: through a Batch
            now = self.now()
            for incident in stale:
                incident.closed = incident.closed or now
            await self.store.commit(Batch(incidents={i.id: i for i in stale}))
        # loopd died between a run's end and starting the run queued behind it: start it
        # now (durable as pending first, as the engine does when a run ends)
        waiting = self.incidents.start_orphaned_queues()
        if waiting:
            await self.store.commit(Batch(run_updates=waiting))
            for run in waiting:
                self._commands.put_nowait(StartRun(run))
        self.guards.load(await self.store.kv_get(*GUARDS_KV))
        # breakers are shared through the store's table (a store older than it kept them
        # in guard memory only): what memory has is written there, once
        opened = [b for s in self.guards.breakers if (b := self.guards.breaker_record(s))]
        if opened:
            await self.store.commit(Batch(breakers=opened))
        for rule, key, since in state.for_timers:
            self._timers.load(rule, key, since)
        await self._load_correlation()
        for rule, key, created in state.run_starts:
            self.guards.run_started(rule, key, created)
        self._recent.extend(state.recent_events)

    async def run(self) -> None:
        """Decide and write until cancelled; both halves stop together."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._decider(), name="engine-decider")
            tg.create_task(self._writer(), name="engine-writer")

    async def emit(self, delivery: Delivery) -> None:
        """Hand a delivery to the engine; waits while the queue is full (backpressure).
        Cancelled while it waits, the delivery is not handed over."""
        if not self._in_flight:
            self.progress_at = time.monotonic()
        self._in_flight += 1
        self._idle.clear()
        queue = self.queue
        if queue.full():
            try:
                await queue.put(delivery)
            except asyncio.CancelledError:
                # the caller gave up waiting (the API's queue_timeout): never handed over
                self._in_flight -= 1
                if self._in_flight <= 0:
                    self._in_flight = 0
                    self._idle.set()
                raise
        else:  # the common case, without a coroutine per event
            queue.put_nowait(delivery)
        self._wake.set()

    def offer(self, deliveries: list[Delivery], start: int = 0) -> int:
        """Hand over at once, without waiting, as many of ``deliveries[start:]`` as the
        queue has room for, in order; how many (a source with a batch in hand spares a
        coroutine per message; ``emit`` waits for the rest)."""
        queue = self.queue
        n = min(len(deliveries) - start, queue.maxsize - queue.qsize())
        if n <= 0:
            return 0
        if not self._in_flight:
            self.progress_at = time.monotonic()
        self._in_flight += n
        self._idle.clear()
        put = queue.put_nowait
        for i in range(start, start + n):
            put(deliveries[i])
        self._wake.set()
        return n

    @property
    def backlog(self) -> int:
        """Deliveries and inbox messages handed in and not yet written (liveness)."""
        return self._in_flight

    def _busy(self, n: int) -> None:
        if not self._in_flight:
            self.progress_at = time.monotonic()
        self._in_flight += n
        self._idle.clear()

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every delivery and inbox message handed in so far is decided,
        written and acked (and its run commands sent)."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    def swap_rules(self, rules: RuleSet) -> None:
        """Atomically switch to a new rule set (reload); open incidents are kept."""
        self._index = RuleIndex(rules.rules)
        self.incidents.set_rules(rules.rules)
        self.correlation.set_rules(rules.rules)  # state of rules gone or disabled is dropped
        self.ruleset = rules
        if self.correlation.pending():  # its rows deleted, held-back matches decided again
            self.inbox.put_nowait(None)

    def open_incident(self, rule: str, key: str) -> IncidentRecord | None:
        return self.incidents.open.get((rule, key))

    def open_incidents(self) -> int:
        return len(self.incidents.open)

    def now(self) -> float:
        """The engine's clock outside an event (the wall clock, or in event time the
        latest instant the clock reached), so that guards compare times of one clock."""
        return self.clock.now()

    # -- what the control facade asks (loopd.control) ----------------------------------

    def policies(self) -> dict[str, RuleGuards]:
        return self.incidents.policy_map()

    async def adopt(self, runs: list[RunRecord]) -> None:
        """Runs this replica took over: their open incidents (and the runs queued behind
        them) come into memory from the store, so their ends close them here."""
        wanted = {r.incident_id for r in runs if r.incident_id} - set(self.incidents.by_id)
        if not wanted:
            return
        incidents = [i for i in await self.store.list_incidents(status="open", limit=100_000)
                     if i.id in wanted]
        queued = [r for r in await self.store.runs_in_status((states.QUEUED,))
                  if r.incident_id in wanted]
        self.incidents.adopt(incidents, [*runs, *queued])

    async def refresh_timers(self) -> None:
        """Partitions moved to this replica (a Kafka rebalance): the ``for:`` timers come
        from the store, where the previous owner wrote them, so a condition that started
        to hold there must still hold for the whole duration here (and fires once), and
        one that stopped holding there does not fire here."""
        state = await self.store.load_state(since=time.time(), recent=0)
        self._timers.replace(state.for_timers)
        await self._load_correlation()

    async def _load_correlation(self) -> None:
        """Group members, absence timers and partial ``all`` matches as the store has
        them (start, a rebalance), with the members rows of the open group incidents."""
        rows = await self.store.kv_scan(NAMESPACE)
        members = {}
        for (rule, _), incident in list(self.incidents.open.items()):
            compiled = self.correlation.rule(rule)
            if compiled is not None and compiled.correlation == "group":
                members[incident.id] = await self.store.kv_get(MEMBERS, incident.id)
        self.correlation.rebuild(rows, members)

    async def follow_timers(self) -> None:
        """Other replicas decide the same keys (webhooks reach any): the ``for:`` timers
        follow the store's, except where this engine's own change may not be written yet
        (see ForTimers.follow)."""
        state = await self.store.load_state(since=time.time(), recent=0)
        self._timers.follow(state.for_timers)
        correlation = self.correlation
        rows: list[tuple[str, Any]] = []
        if correlation.size() or correlation.inhibitable:
            # group members and partial matches other replicas decided (a union: never
            # undoes what this engine decided), absences they re-armed
            rows = await self.store.kv_scan(NAMESPACE)
            correlation.merge(rows)
            if correlation.pending():  # a members row grew: written by the next batch
                self.inbox.put_nowait(None)
        if correlation.inhibitable:  # other replicas' open group incidents inhibit here
            opened = await self.store.list_incidents(status="open", limit=10_000)
            groups = [i for i in opened
                      if (rule := correlation.rule(i.rule)) is not None
                      and rule.correlation == "group"
                      and (i.rule, i.key) not in self.incidents.open]
            correlation.follow_foreign(
                [(i, await self.store.kv_get(MEMBERS, i.id)) for i in groups])
            await self._release_held(rows, {i.id for i in opened})

    async def _release_held(self, rows: list[tuple[str, Any]], opened: set[str]) -> None:
        """Matches held back for a group incident that closed before its holder merged
        them (read after ``rows``, so a row is never older than the incident it names):
        any replica deletes their rows and decides them again (Correlation.release)."""
        released = False
        for name, incident_id, value in self.correlation.held_for(rows, opened):
            try:
                incident = await self.store.get_incident(incident_id)
            except StoreError as exc:  # the next follow tries again
                metrics.log.warning("cannot read a held-back match's incident",
                                    incident=incident_id, error=str(exc))
                break
            if incident is None or incident.status != "open":
                self.correlation.release(name, incident_id, value)
                released = True
        if released:
            self.inbox.put_nowait(None)

    def resolved_elsewhere(self, event: Event) -> None:
        """A resolved alert another replica received (read from the store): the runs of
        its incidents here that have not acted yet are cancelled, as if it came here."""
        self._resolved.append(event)
        self.inbox.put_nowait(None)

    def forget_run(self, run: RunRecord) -> None:
        """A run another replica took over: its incident is that replica's to close, so
        memory forgets both, and the runs queued behind it, which the taker adopted (an
        event for it meets the incident in the store, joined)."""
        self.incidents.discard(run, queued_too=True)

    def sync_breakers(self, shared: list[BreakerRecord]) -> None:
        """The breakers the store holds for every replica (see Guards.sync_breakers); one
        closed here moments ago is not opened again from a read taken before its close
        was written (memory is only a pre-filter: the store refuses runs of an open one)."""
        now = time.monotonic()
        self._closed_here = {s: t for s, t in self._closed_here.items() if now - t < 10.0}
        self.guards.sync_breakers([b for b in shared if b.scope not in self._closed_here],
                                  self.now())

    def close_breaker(self, scope: str) -> bool:
        """Close an open circuit breaker; the change is written by the next batch."""
        if not self.guards.close_breaker(scope):
            return False
        self.guards.dirty = True
        self._breakers_closed.append(scope)  # for every replica: in the store
        self._closed_here[scope] = time.monotonic()
        self.inbox.put_nowait(None)
        return True

    def cancel_queued(self, run_id: str, reason: str) -> RunRecord | None:
        """Take a queued run (run_mode queued) out of its incident's queue, cancelled;
        written by the next batch. None when it is not queued (any more)."""
        run = self.incidents.cancel_queued(run_id)
        if run is None:
            return None
        states.move(run, states.CANCELLED, reason=reason, at=self.now())
        run.outcome = states.OUTCOME_CANCELLED
        self._run_updates.append(run)
        self.inbox.put_nowait(None)
        return run

    # -- deciding one event at a time (loopd simulate) ------------------------------------

    def decide_now(self, event: Event) -> int:
        """Decide ``event`` into the open batch at once, without the queue; returns how
        many run commands it produced. ``commit`` writes the open batch."""
        before = len(self._open.commands)
        self.correlation.segment(self._open.batch)  # the rows of what came before
        self._open.marks.append(self._open.batch.mark())
        self._decide(event, self._open)
        return len(self._open.commands) - before

    def take_inbox(self) -> list[RunEnded]:
        """Take what is in the inbox into the open batch; returns the runs that ended."""
        ended = self._take_inbox(self._open)
        self._in_flight -= self._open.inbox
        self._open.inbox = 0
        if self._in_flight <= 0:
            self._in_flight = 0
            self._idle.set()
        return ended

    def open_decisions(self) -> int:
        return len(self._open.batch.decisions)

    def open_commands(self) -> int:
        return len(self._open.commands)

    async def commit(self) -> Committed:
        """Write the open batch, then send its run commands; returns what it held."""
        pending, self._open = self._open, _Pending(Batch(), [])
        self._seal(pending)
        if pending.batch:
            self._reconcile(pending, await self._commit(pending))
        self._send(pending)
        return Committed(pending.batch.decisions, pending.commands)

    # -- the two halves -------------------------------------------------------------

    async def _decider(self) -> None:
        queue, inbox, wake = self.queue, self.inbox, self._wake
        while True:
            while not inbox and queue.empty():
                metrics.queue_depth(0)
                due = self._timer_due()
                if due is not None and due <= 0:
                    break
                wake.clear()
                if due is None:
                    await wake.wait()
                else:  # an absence, a window passing: its time or work, whichever first
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), due)
            pending = _Pending(Batch(), [])
            # After a batch the store partly rejected, memory is the store's again first.
            await self._caught_up_after_rejection()
            # Absences due first: their store check is the decider's other await here.
            await self._fire_absences(pending)
            # The inbox first: runs ending are never starved by a busy source.
            self._take_inbox(pending)
            # What waited (the sources are paused once it is the queue's size: a store
            # slower than the stream shows here, not after the batch emptied the queue)
            metrics.queue_depth(queue.qsize())
            # Take what is already queued; no waiting, so latency stays low at low rates.
            while len(pending.deliveries) < self._batch_max and not queue.empty():
                delivery = queue.get_nowait()
                pending.deliveries.append(delivery)
                self.correlation.segment(pending.batch)  # the rows of what came before
                pending.marks.append(pending.batch.mark())
                delivery.duplicate = self._decide(delivery.event, pending)
            self._seal(pending)
            # Waits when two batches are already being written: backpressure to the queue.
            await self._written.put(pending)

    def _take_inbox(self, pending: _Pending) -> list[RunEnded]:
        inbox, ended = self.inbox, []
        while inbox:
            message = inbox.popleft()
            pending.inbox += 1
            if message is not None:
                ended.append(message)
                pending.ended.append(message)
                self._run_ended(message, pending)
        if self._run_updates:
            pending.batch.run_updates.extend(self._run_updates)
            self._run_updates = []
        if self._resolved:
            resolved, self._resolved = self._resolved, []
            for event in resolved:
                self.incidents.resolved(event, pending.batch, pending.commands, self.now())
        if self._completed:
            completed, self._completed = self._completed, []
            for slot, rows in completed:
                self._complete_group(slot, rows, pending)
        for rule, again in self.correlation.take_released(self.now()):
            self._decide(again, pending, only=rule)  # held back for a group closed since
        return ended

    def _seal(self, pending: _Pending) -> None:
        """Last in every batch: guard memory and correlation state that changed are
        written with it."""
        if pending.matched:
            metrics.rules_matched(pending.matched)
        correlation = self.correlation
        correlation.sweep(self.now())
        correlation.flush(pending.batch)
        if correlation.held:
            if self.shared:
                pending.held.extend(correlation.held)
            correlation.held.clear()
        if self.guards.dirty:  # e.g. a flapping escalation: never escalate twice
            self.guards.dirty = False
            pending.batch.kv[GUARDS_KV] = self.guards.state()
        if self._breakers_closed:
            pending.batch.breakers_closed.extend(self._breakers_closed)
            self._breakers_closed = []
        if pending.batch:  # committed: after a rejection, correlation waits for it
            self._sealed += 1

    def _send(self, pending: _Pending) -> None:
        send = self._commands.put_nowait
        for command in pending.commands:
            send(command)
        for message in pending.ended:
            message.done()

    async def _writer(self) -> None:
        while True:
            pending = await self._written.get()
            if pending is None:
                return
            result = await self._commit(pending) if pending.batch else CommitResult()
            if result.duplicates:
                self._mark_duplicates(pending, result)
            done = self.progress_at = time.monotonic()
            deliveries = pending.deliveries
            for delivery in deliveries:
                delivery.ack()
            metrics.events_decided(done, [d.received for d in deliveries])
            duplicates = result.duplicates
            recorded: Counter[tuple[str, str]] = Counter(
                (d.rule, d.outcome) for d in pending.batch.decisions
                if not duplicates or (d.source, d.event_id, d.rule) not in duplicates)
            if recorded:
                metrics.decisions_recorded(recorded)
            if result:
                self._reconcile(pending, result)
            if pending.commands or pending.ended:
                self._send(pending)
            if pending.held:
                await self._read_groups(pending.held)
            self._in_flight -= len(pending.deliveries) + pending.inbox
            if self._in_flight <= 0:
                self._in_flight = 0
                self._idle.set()

    # -- committing: the store decides -------------------------------------------------

    async def _commit(self, pending: _Pending) -> CommitResult:
        # segment 0: what the inbox wrote; then one per delivery (or decide_now call)
        marks = [Batch().mark(), *pending.marks, pending.batch.mark()]
        events: list[Event | None] = [None, *(d.event for d in pending.deliveries)]
        if len(events) != len(marks) - 1:  # decide_now, without deliveries (simulate)
            events = [None] * (len(marks) - 1)
        return await self.committer.commit(pending.batch, marks, events)

    @staticmethod
    def _mark_duplicates(pending: _Pending, result: CommitResult) -> None:
        """A delivery whose every decision the store already had is a duplicate (another
        replica, or this one before a restart, decided it first)."""
        if not pending.deliveries:  # the inbox's or a timer's decisions alone (no one to tell)
            return
        decisions = pending.batch.decisions
        ends = [m[1] for m in pending.marks[1:]] + [len(decisions)]
        for delivery, start, end in zip(pending.deliveries, pending.marks, ends, strict=True):
            own = decisions[start[1]:end]
            if own and all((d.source, d.event_id, d.rule) in result.duplicates for d in own):
                delivery.duplicate = True

    def _reconcile(self, pending: _Pending, result: CommitResult) -> None:
        """Bring memory in line with what the store created: runs it did not create are
        forgotten (with their new incidents), and no command goes out for them."""
        if not result:
            return
        for d in pending.batch.decisions:
            if (d.source, d.event_id, d.rule) in result.duplicates:
                metrics.event_duplicate(d.source, d.event_id)
        for opened, held in result.conflicts.items():
            metrics.log.info("incident already open in the store; the event joined it",
                             rule=held.rule, key=held.key, incident=held.id)
            self.correlation.conflicted(opened, held)
        if result.refused:
            runs = {r.id: r for r in pending.batch.runs}
            for run_id, limit in result.refused.items():
                run = runs.get(run_id)
                if limit.kind != "opens" and run is not None:
                    metrics.guard_suppressed(run.rule or "", limit.guard)
                    trigger = run.event or {}
                    self.suppressions.suppressed(
                        run.rule or "", run.key, str(trigger.get("source", "")),
                        str(trigger.get("id", "")), limit.guard, refusal_reason(limit))
        skipped = result.skipped_runs
        if not skipped:
            return
        for run in pending.batch.runs:  # started and queued ones
            if run.id in skipped:
                self.incidents.discard(run)
        pending.commands = [
            c for c in pending.commands
            if (c.run.id if isinstance(c, StartRun) else c.run_id) not in skipped]

    # -- a run ended ------------------------------------------------------------------

    def _run_ended(self, message: RunEnded, pending: _Pending) -> None:
        """Start what the incident queued, feed the guards, close the incident, and decide
        the outcome event (closing the loop for loopd's own rules)."""
        run = message.run
        now = self.now()
        closed = self.incidents.run_finished(run, now, pending.batch, pending.commands)
        if closed is not None and self.correlation.groups:
            # a group incident closed: members still firing are decided normally again
            for rule, again in self.correlation.closed(closed, now):
                self._decide(again, pending, only=rule)
        if self._outcomes_topic is not None:
            metrics.event_received("loopd")
            self._decide(message.outcome_event(self._outcomes_topic), pending)

    # -- the hot path ----------------------------------------------------------------

    def _decide(self, event: Event, pending: _Pending, only: str | None = None) -> bool:
        """Decide ``event`` into ``pending`` (``only``: for that rule alone); True when it
        was already decided (a duplicate: nothing new is recorded)."""
        try:
            return self._decide_event(event, pending, only)
        except Exception:  # supervised boundary: a bug on one event must not stop the engine
            metrics.engine_error(event.source, event.origin or event.id)
            return False

    def _decide_event(self, event: Event, pending: _Pending, only: str | None) -> bool:
        # an event decided again for one rule (an inhibited match) was seen already: it is
        # no new telemetry, and no evidence
        fresh = only is None
        if fresh and (self._telemetry_sources is None
                      or event.source in self._telemetry_sources):
            self.telemetry.observe(event)
        if fresh and self._evidence is not None:
            self._evidence(event)
        keep = self.keep_evidence
        kept = fresh and keep is not None and (
            event.data.get("status") == "resolved" or any(
                event.topic.startswith(prefix)
                for prefix in (*keep.get(event.source, ()), *keep.get(ANY_SOURCE, ()))))
        if kept:  # stored for confirm tasks waiting on other replicas (events_since)
            pending.batch.events.append(
                EventRecord(event.source, event.id, event.topic, event.key, event.time,
                            event.data))
        virtual = self._virtual
        now = event.time
        correlation = self.correlation
        if virtual is not None:  # event time: decided at its own time; timers due exactly
            virtual.advance(now, inclusive=False)  # then fire after it (the replay's order)
            if correlation.absences:  # absences due before it fire first, at their time
                while (due := correlation.next_due()) is not None and due < now:
                    for absence in correlation.due(due):
                        self._fire(absence, pending, due)
        if event.data.get("status") == "resolved":
            self.incidents.resolved(event, pending.batch, pending.commands,
                                    now if virtual is not None else self.clock.now())
            fingerprint = event.data.get("fingerprint")
            if correlation.inhibitable and isinstance(fingerprint, str):
                correlation.resolved(fingerprint)
        candidates = self._index.candidates(event)
        if not candidates:
            return False
        if only is not None:
            candidates = [r for r in candidates if r.name == only]
        inhibitable = correlation.inhibitable
        if inhibitable and len(candidates) > 1:
            # group rules first: the member whose event opens a group is inhibited already
            candidates.sort(key=lambda r: r.name in inhibitable)
        if virtual is None:
            now = self.clock.now()
        checked = False  # whether the event was decided lately (a redelivery) is known
        decided = False  # some rule recorded a decision: remember the event
        seen: set[str] | None = None  # rules of several conditions that took the event
        for rule in candidates:
            if rule.parts or rule.part:  # all/any: an event counts for one condition
                if seen is None:
                    seen = set()
                elif rule.name in seen:
                    continue
            tvars = rule.accepts(event)
            if tvars is None:
                continue
            if not checked:
                checked = True
                if self._recent.seen(event.source, event.id):
                    metrics.event_duplicate(event.source, event.id)
                    return True
            scope = {"event": event, "vars": tvars, "inventory": self.inventory.entities,
                     "telemetry": self.telemetry, "now": now}
            part = "if"
            group: str | None = None
            try:
                holds = rule.condition is None or bool(rule.condition(scope))
                if not holds and rule.for_s is None:
                    continue
                key = NO_KEY
                part = "key"
                if rule.key is not None:
                    rendered = rule.key(scope)
                    if rendered is None or rendered == "":
                        # never lump unrelated entities into one incident
                        raise ConditionError(f"rendered empty from {rule.rule.key!r}")
                    key = str(rendered)
                elif event.key is not None:
                    key = event.key
                if rule.group_by is not None and holds:
                    part = "group.by"
                    scope["key"] = key
                    rendered = rule.group_by(scope)
                    if rendered is None or rendered == "":
                        by = rule.rule.group.by if rule.rule.group else ""
                        raise ConditionError(f"rendered empty from {by!r} for member {key}")
                    group = str(rendered)
            except ConditionError as exc:
                # an error decision, not a silent skip: the event is acknowledged, so the
                # record is the only trace of why this rule did nothing
                self._rule_failed(rule, event, part, exc, now, pending)
                decided = True
                continue
            if not holds:  # a `for:` rule whose condition stopped holding
                if self._timers.reset(rule.name, key):
                    pending.batch.timers_cleared.append((rule.name, key))
                continue
            if seen is not None:
                seen.add(rule.name)
            self.matches[rule.name] += 1
            pending.matched[rule.name] += 1
            if inhibitable and rule.name in inhibitable:
                holder = correlation.inhibitor(rule.name, key)
                if holder is not None:  # a member of an open group incident that inhibits it
                    correlation.inhibit(holder, rule.name, key, event, now, pending.batch)
                    decided = True
                    continue
            scope["key"] = key
            decided = self._decide_rule(rule, event, key, group, scope, now, pending) \
                or decided
        if decided:
            self._recent.add(event.source, event.id)
            if not kept:
                pending.batch.events.append(
                    EventRecord(event.source, event.id, event.topic, event.key, event.time,
                                event.data))
        return False

    def _rule_failed(self, rule: CompiledRule, event: Event, part: str, error: ConditionError,
                     now: float, pending: _Pending) -> None:
        origin = event.origin or event.id
        metrics.rule_failed(rule.name, part, error, source=event.source, event_id=event.id,
                            origin=origin)
        key = event.key if rule.key is None else None  # a key not rendered is no key
        pending.batch.decisions.append(DecisionRecord(
            event.source, event.id, rule.name, key, "error",
            f"{part}: {error} (origin {origin})"[:500], now))

    def _decide_rule(self, rule: CompiledRule, event: Event, key: str, group: str | None,
                     scope: dict[str, object], now: float, pending: _Pending) -> bool:
        """Decide one rule's match; False when nothing was recorded (an absence armed)."""
        batch, name = pending.batch, rule.name
        if rule.for_s is not None:
            since, started = self._timers.hold(name, key, now)
            if started:
                batch.timers_set.append((name, key, since))
            if now - since < rule.for_s:
                reason = f"for: held {now - since:.0f}s of {rule.for_s:g}s"
                self.suppressions.suppressed(name, key, event.source, event.id, "for", reason)
                batch.decisions.append(DecisionRecord(
                    event.source, event.id, name, key, "suppressed", reason, now))
                return True
        before = len(pending.commands)
        kind = rule.correlation
        if kind is None:
            self.incidents.decide(rule, event, key, scope, now, batch, pending.commands)
        elif kind == "group":
            assert group is not None
            self.correlation.group(rule, event, key, group, scope, now, batch,
                                   pending.commands)
        elif kind == "absent":
            # its absence fired already: this is the arming event delivered again (arming
            # records nothing to recognise it by), and firing twice in one batch would make
            # the store drop the first firing's run with the duplicate
            if not self._recent.seen(event.source, f"{event.id}~absent"):
                self.correlation.arm(rule, event, key, now)
            return False
        else:
            self.correlation.all(rule, event, key, scope, now, batch, pending.commands)
        if rule.for_s is not None and len(pending.commands) > before and self._timers.reset(
                name, key):
            # acted: the condition must hold for the whole duration again before the next run
            batch.timers_cleared.append((name, key))
        return True

    # -- several replicas deciding one group ---------------------------------------------

    async def _read_groups(self, held: list[Slot]) -> None:
        """The members rows of groups a batch held below their count, now written: with
        other replicas' members the count may be there; the decider opens them."""
        for slot in dict.fromkeys(held):
            try:
                rows = await self.store.kv_scan(NAMESPACE, member_rows(*slot))
            except StoreError as exc:  # the group's next member reads them again
                metrics.log.warning("cannot read a group's members from the store",
                                    rule=slot[0], group=slot[1], error=str(exc))
                continue
            self._completed.append((slot, rows))
            self.inbox.put_nowait(None)

    def _complete_group(self, slot: Slot, rows: list[tuple[str, Any]],
                        pending: _Pending) -> None:
        now = self.now()
        try:
            found = self.correlation.complete(slot, rows, now)
            if found is None:
                return
            rule, group, event = found
            if self._recent.seen(event.source, event.id):
                return
            scope = {"event": event, "vars": rule.accepts(event) or {},
                     "inventory": self.inventory.entities, "telemetry": self.telemetry,
                     "now": now}
            self.correlation.open(rule, group, event, scope, now, pending.batch,
                                  pending.commands)
        except Exception:  # supervised boundary, as _decide
            metrics.engine_error(slot[0], slot[1])
            return
        self._recent.add(event.source, event.id)
        pending.batch.events.append(EventRecord(event.source, event.id, event.topic,
                                                event.key, event.time, event.data))

    # -- absence timers (loopd.decide.correlation) ------------------------------------------

    def _timer_due(self) -> float | None:
        """Seconds until an absence is due or a window passes (whose state the next
        batch's sweep then deletes, so an idle daemon keeps none either)."""
        due = self._absence_due()
        expiry = self.correlation.next_expiry() if self._virtual is None else None
        if expiry is not None:
            # a hundredth of a second late, so the sweep finds the window passed
            left = expiry - self.clock.now() + 0.01
            due = left if due is None else min(due, left)
        return due

    def _absence_due(self) -> float | None:
        """Seconds until the earliest absence timer is due (None: none, or event time, where
        events move the clock)."""
        if self._virtual is not None or not self.correlation.absences:
            return None
        due = self.correlation.next_due()
        if due is None:
            return None
        return max(due - self.clock.now(), self._absence_retry - time.monotonic())

    async def _caught_up_after_rejection(self) -> None:
        """After a batch the store partly rejected, correlation memory is read again from
        the store: it had taken the rejected events in, whose rows were not written. The
        batches decided before (and their rows) are written first; while they are not,
        the next batch tries again."""
        committer = self.committer
        if committer.rejections == self._rejections \
                or not await committer.caught_up(self._sealed):
            return
        rejections, rejected = committer.rejections, set(committer.rejected)
        try:
            rows = self.correlation.forget(rejected)
            if rows:
                try:
                    await committer.write(rows)
                except StoreRejected as exc:  # what is read back still has them
                    metrics.log.warning("cannot write the members rows without the rejected "
                                        "events", error=str(exc))
            await self._load_correlation()
            self._rejections = rejections
            committer.rejected -= rejected
        except StoreError as exc:  # the next batch tries again
            metrics.log.warning("cannot read correlation state after a rejected batch",
                                error=str(exc))

    async def _fire_absences(self, pending: _Pending) -> None:
        """Fire the absences due, each checked against the store first: another replica
        may have re-armed, fired or disarmed it (its events went there)."""
        due = self._absence_due()
        if due is None or due > 0:
            return
        correlation, now = self.correlation, self.clock.now()
        for absence in correlation.due(now):
            try:
                stored = await self.store.kv_get(NAMESPACE, row("a", absence.rule, absence.key))
            except StoreError as exc:  # try again in a second; nothing fires unchecked
                self._absence_retry = time.monotonic() + 1.0
                metrics.log.warning("cannot check a due absence timer; trying again",
                                    rule=absence.rule, key=absence.key, error=str(exc))
                return
            if correlation.follow_absence(absence, stored):
                self._fire(absence, pending, now)

    def _fire(self, absence: Absence, pending: _Pending, now: float) -> None:
        """No event for the key within ``absent``: the rule fires once with the last one."""
        self.correlation.fired(absence)
        rule = self.correlation.rule(absence.rule)
        if rule is None or rule.correlation != "absent":
            return
        event = event_from(absence.event, f"{absence.event['id']}~absent")
        try:
            scope = {"event": event, "vars": rule.accepts(event) or {},
                     "inventory": self.inventory.entities, "telemetry": self.telemetry,
                     "now": now, "key": absence.key}
            self.matches[rule.name] += 1
            pending.matched[rule.name] += 1
            self.incidents.decide(rule, event, absence.key, scope, now, pending.batch,
                                  pending.commands)
        except Exception:  # supervised boundary, as _decide
            metrics.engine_error(event.source, event.id)
            return
        self._recent.add(event.source, event.id)
        pending.batch.events.append(EventRecord(event.source, event.id, event.topic,
                                                event.key, event.time, event.data))

