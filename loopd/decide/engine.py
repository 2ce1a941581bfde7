"""The engine: delivery -> match -> decide -> record -> ack.

Two tasks share the work so the decision loop never waits on the disk:

* the *decider* takes deliveries from the bounded queue in batches and decides
  each event synchronously against in-memory state (open incidents, ``for:``
  timers, throttles, recent event ids), appending what it decided to a Batch;
* the *writer* commits each Batch in one transaction, then acknowledges its
  deliveries (Kafka offsets become committable) and hands new runs over.

In-memory state runs ahead of the disk, never the acknowledgements: after a
crash the unacknowledged events are redelivered and decided again from the
durable state, so no event is lost and none is decided twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from loopd import metrics
from loopd.catalog.inventory import Inventory
from loopd.catalog.telemetry import Telemetry
from loopd.decide.guards import Guards
from loopd.decide.incidents import Incidents
from loopd.decide.timers import ForTimers
from loopd.errors import ConditionError, StoreError
from loopd.events import Delivery, Event
from loopd.policy import GlobalGuards
from loopd.rules.compile import CompiledRule
from loopd.rules.loader import RuleSet
from loopd.rules.matcher import RuleIndex
from loopd.runs import states
from loopd.store.base import Batch, DecisionRecord, EventRecord, IncidentRecord, RunRecord, Store

Clock = Callable[[Event], float]
RunsReady = Callable[[list[RunRecord]], None]
NO_KEY = "-"
THROTTLE_MEMORY = 7 * 86400.0


def wall_clock(_: Event) -> float:
    return time.time()


@dataclass(slots=True)
class _Pending:
    batch: Batch
    deliveries: list[Delivery]
    runs: list[RunRecord] = field(default_factory=list)


class Engine:
    def __init__(
        self, store: Store, rules: RuleSet, *, inventory: Inventory | None = None,
        queue_size: int = 10_000, batch_max: int = 2000, dedup_window: int = 200_000,
        clock: Clock = wall_clock, on_runs: RunsReady | None = None,
        on_event: Callable[[Event], None] | None = None,
        telemetry_sources: frozenset[str] | None = None, guards: Guards | None = None,
    ) -> None:
        self.store = store
        self.inventory = inventory or Inventory()
        self.telemetry = Telemetry()
        self._telemetry_sources = telemetry_sources  # None: every source
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=queue_size)
        self.clock = clock
        self.on_runs = on_runs
        self.on_event = on_event  # e.g. confirm tasks waiting for evidence
        self.matches: Counter[str] = Counter()
        self._batch_max = batch_max
        self._dedup_window = dedup_window
        self._written: asyncio.Queue[_Pending | None] = asyncio.Queue(maxsize=2)
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.guards = guards or Guards(GlobalGuards(), self.inventory)
        self.incidents = Incidents(self.guards, self.inventory)
        self._timers = ForTimers()
        self._in_flight = 0
        self._latest: float | None = None  # the latest event time decided (event clocks)
        self._idle = asyncio.Event()
        self._idle.set()
        self.ruleset = rules
        self._index = RuleIndex(rules.rules)
        self.incidents.policies = {r.name: r for r in rules.rules}

    # -- lifecycle ---------------------------------------------------------------

    async def load(self, open_runs: list[RunRecord] | None = None) -> None:
        """Restore what the store knows, before the first delivery."""
        state = await self.store.load_state(
            since=time.time() - THROTTLE_MEMORY, recent=self._dedup_window)
        if open_runs is None:
            open_runs = await self.store.runs_in_status((*states.ACTIVE, states.QUEUED))
        for stale in self.incidents.restore(state.open_incidents, open_runs):
            await self.store.close_incident(stale.id, time.time(), stale.outcome or "unknown")
        self.guards.load(await self.store.kv_get("guards", "state"))
        for rule, key, since in state.for_timers:
            self._timers.load(rule, key, since)
        for rule, key, created in state.run_starts:
            self.incidents.throttles.record(rule, key, created)
            self.guards.run_started(rule, key, created)
        for ident in state.recent_events:
            self._recent[ident] = None

    async def run(self) -> None:
        """Decide and write until cancelled; both halves stop together."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._decider(), name="engine-decider")
            tg.create_task(self._writer(), name="engine-writer")

    async def emit(self, delivery: Delivery) -> None:
        """Hand a delivery to the engine; waits while the queue is full (backpressure)."""
        self._in_flight += 1
        self._idle.clear()
        await self.queue.put(delivery)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every delivery handed in so far is decided, written and acked."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    def swap_rules(self, rules: RuleSet) -> None:
        """Atomically switch to a new rule set (reload); open incidents are kept."""
        self._index = RuleIndex(rules.rules)
        self.incidents.policies = {r.name: r for r in rules.rules}
        self.ruleset = rules

    def open_incident(self, rule: str, key: str) -> IncidentRecord | None:
        return self.incidents.open.get((rule, key))

    def now(self) -> float:
        """The engine's clock outside an event: the wall clock, or with an event-time clock
        the latest event time decided, so that guards compare times of one clock."""
        if self.clock is wall_clock or self._latest is None:
            return time.time()
        return self._latest

    async def run_finished(self, run: RunRecord) -> None:
        """A run ended: start what its incident queued, feed the guards, close the incident."""
        starts, incident, changed = self.incidents.run_finished(run, self.now())
        for nxt in starts:
            await self.store.save_run(nxt)  # durable before it is handed over
        if incident is not None:
            await self.store.close_incident(incident.id, incident.closed or self.now(),
                                            incident.outcome or "")
        if changed or self.guards.dirty:
            await self.save_guards()
        if starts:
            self.hand_over(starts)

    def hand_over(self, runs: list[RunRecord]) -> None:
        """Give durable runs to ``on_runs`` (the dispatcher), then cancel those whose
        cancellation was asked while they were being written (alert resolved, restart
        mode). Whoever drives ``_decide`` itself hands its runs over through this."""
        if self.on_runs is not None:
            self.on_runs(runs)
        unsubmitted, cancel = self.incidents.unsubmitted, self.incidents.cancel_run
        for run in runs:
            why = unsubmitted.pop(run.id, None)
            if why is not None and cancel is not None:
                cancel(run.id, why)

    async def save_guards(self) -> None:
        """Persist the guards' memory (breakers, failures, fixes, flapping escalations)."""
        self.guards.dirty = False
        await self.store.kv_put("guards", "state", self.guards.state())

    # -- the two halves -------------------------------------------------------------

    async def _decider(self) -> None:
        queue = self.queue
        while True:
            first = await queue.get()
            pending = _Pending(Batch(), [first])
            self._decide(first.event, pending)
            # Take what is already queued; no waiting, so latency stays low at low rates.
            while len(pending.deliveries) < self._batch_max and not queue.empty():
                delivery = queue.get_nowait()
                pending.deliveries.append(delivery)
                self._decide(delivery.event, pending)
            metrics.queue_depth(queue.qsize())
            # Waits when two batches are already being written: backpressure to the queue.
            await self._written.put(pending)

    async def _writer(self) -> None:
        delay = 0.05
        while True:
            pending = await self._written.get()
            if pending is None:
                return
            while pending.batch:
                try:
                    await self.store.commit(pending.batch)
                    break
                except StoreError as exc:
                    # Never ack an undecided event: hold everything and retry.
                    metrics.log.error("store commit failed; retrying", error=str(exc),
                                      retry_in_s=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            delay = 0.05
            if self.guards.dirty:  # e.g. a flapping escalation: never escalate twice
                try:
                    await self.save_guards()
                except StoreError as exc:  # still dirty: the next batch tries again
                    self.guards.dirty = True
                    metrics.log.error("saving guard state failed", error=str(exc))
            done = time.monotonic()
            for delivery in pending.deliveries:
                delivery.ack()
                metrics.event_decided(done - delivery.received)
            for d in pending.batch.decisions:
                metrics.decision_recorded(d.rule, d.outcome)
            if pending.runs:
                self.hand_over(pending.runs)
            self._in_flight -= len(pending.deliveries)
            if self._in_flight <= 0:
                self._in_flight = 0
                self._idle.set()

    # -- the hot path ----------------------------------------------------------------

    def _decide(self, event: Event, pending: _Pending) -> None:
        try:
            self._decide_event(event, pending)
        except Exception:  # supervised boundary: a bug on one event must not stop the engine
            metrics.engine_error(event.source, event.origin or event.id)

    def _decide_event(self, event: Event, pending: _Pending) -> None:
        if self._telemetry_sources is None or event.source in self._telemetry_sources:
            self.telemetry.observe(event)
        if self.on_event is not None:
            self.on_event(event)
        if event.data.get("status") == "resolved":
            self.incidents.resolved(event, pending.batch, self.clock(event))
        candidates = self._index.candidates(event)
        if not candidates:
            return
        ident: tuple[str, str] | None = None
        matched = False
        now = self.clock(event)
        if self._latest is None or now > self._latest:
            self._latest = now
        for rule in candidates:
            tvars = rule.accepts(event)
            if tvars is None:
                continue
            if ident is None:
                ident = (event.source, event.id)
                if ident in self._recent:
                    metrics.event_duplicate(event.source, event.id)
                    return
            scope = {"event": event, "vars": tvars, "inventory": self.inventory.entities,
                     "telemetry": self.telemetry, "now": now}
            try:
                holds = rule.condition is None or bool(rule.condition(scope))
                if not holds and rule.for_s is None:
                    continue
                key = NO_KEY
                if rule.key is not None:
                    rendered = rule.key(scope)
                    if rendered is None or rendered == "":
                        # never lump unrelated entities into one incident
                        raise ConditionError(f"key {rule.rule.key!r} rendered empty")
                    key = str(rendered)
                elif event.key is not None:
                    key = event.key
            except ConditionError as exc:
                metrics.rule_error(rule.name, exc, event.origin)
                continue
            if not holds:  # a `for:` rule whose condition stopped holding
                if self._timers.reset(rule.name, key):
                    pending.batch.timers_cleared.append((rule.name, key))
                continue
            matched = True
            self.matches[rule.name] += 1
            metrics.rule_matched(rule.name)
            scope["key"] = key
            self._decide_rule(rule, event, key, scope, now, pending)
        if matched and ident is not None:
            self._remember(ident)
            pending.batch.events.append(
                EventRecord(event.source, event.id, event.topic, event.key, event.time,
                            event.data))

    def _decide_rule(self, rule: CompiledRule, event: Event, key: str, scope: dict[str, object],
                     now: float, pending: _Pending) -> None:
        batch, name = pending.batch, rule.name
        if rule.for_s is not None:
            since, started = self._timers.hold(name, key, now)
            if started:
                batch.timers_set.append((name, key, since))
            if now - since < rule.for_s:
                batch.decisions.append(DecisionRecord(
                    event.source, event.id, name, key, "suppressed",
                    f"for: held {now - since:.0f}s of {rule.for_s:g}s", now))
                return
        before = len(pending.runs)
        self.incidents.decide(rule, event, key, scope, now, batch, pending.runs)
        if rule.for_s is not None and len(pending.runs) > before and self._timers.reset(
                name, key):
            # acted: the condition must hold for the whole duration again before the next run
            batch.timers_cleared.append((name, key))

    def _remember(self, ident: tuple[str, str]) -> None:
        recent = self._recent
        recent[ident] = None
        if len(recent) > self._dedup_window:
            recent.popitem(last=False)
