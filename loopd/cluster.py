"""Several replicas on one store: what each replica does besides its own work.

Replicas share nothing but the store (PostgreSQL, or one SQLite file) and the brokers;
there is no membership protocol of loopd's own. Every ``store.poll`` seconds (sooner when
the store says another replica wrote: Postgres LISTEN/NOTIFY, a hint only) each replica:

* **takes over** the runs of replicas silent for longer than the lease (their heartbeat
  stopped: killed, paused, partitioned), adopts their incidents and resumes them from
  their last stored step (``Dispatcher.takeover``);
* **carries out commands** given to another replica's API for runs executing here
  (approve, reject, cancel), read from the store;
* **follows the shared breakers**: one closed or opened by another replica is closed or
  opened here too; and, while other replicas are alive, the shared ``for:`` timers (the
  earliest start of a condition wins, a reset anywhere resets it everywhere);
* **reloads** when ``POST /v1/reload`` was called on another replica (each replica reads
  its own configuration files; SIGHUP stays one process's);
* while other replicas are alive, **stores the events confirm tasks may wait for** (the
  sources their evidence names) and resolved alerts, **brings evidence stored by other
  replicas** to the confirm tasks waiting here, in the order it was stored (what was
  stored before a task began to wait is no evidence for it), and lets a resolved alert
  that reached another replica cancel the runs here that have not acted yet.

A poll that fails (the store is down) is logged and tried again at the next one; nothing
is lost meanwhile: commands and events stay in the store, and runs keep their lease only
while their replica's heartbeat is written.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from loopd import metrics
from loopd.control import RELOAD_KV
from loopd.decide.engine import ANY_SOURCE, Engine
from loopd.errors import StoreError
from loopd.events import Event
from loopd.packs.registry import PackRegistry
from loopd.runs.approvals import Approvals
from loopd.runs.dispatcher import Dispatcher, api_cancel
from loopd.runs.evidence import ConfirmHub
from loopd.store.base import CommandRecord, Store

log = structlog.get_logger("loopd.cluster")
_UNREAD = object()


def evidence_sources(registry: PackRegistry) -> dict[str, tuple[str, ...]]:
    """Per source any loaded workflow's confirm task waits on (``*``: any source), what
    the topics it may take as evidence start with."""
    found: dict[str, set[str]] = {}
    for workflow in registry.workflows.values():
        for task in getattr(workflow, "tasks", {}).values():
            evidence = getattr(task, "evidence", None)
            if evidence is not None:
                found.setdefault(evidence.source or ANY_SOURCE, set()).add(
                    evidence.topic_prefix)
    return {source: tuple(sorted(prefixes)) for source, prefixes in found.items()}


class Cluster:
    def __init__(self, store: Store, engine: Engine, dispatcher: Dispatcher,
                 approvals: Approvals, hub: ConfirmHub, registry: Callable[[], PackRegistry],
                 *, poll: float, reload: Callable[[], None] | None = None) -> None:
        self.store = store
        self.engine = engine
        self.dispatcher = dispatcher
        self.approvals = approvals
        self.hub = hub
        self.registry = registry
        self.poll = poll
        self.others: list[str] = []  # the other live replicas, as of the last poll
        self._reload = reload
        self._reload_seen: object = _UNREAD
        self._carried_out: set[int] = set()  # command seqs done here (of live runs)
        self._event_pos: int | None = None
        self._sources_of: PackRegistry | None = None  # the registry _sources came from
        self._sources: dict[str, tuple[str, ...]] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except StoreError as exc:
                log.warning("replica poll failed; trying again", error=str(exc),
                            retry_in_s=self.poll)
            except Exception:  # supervised boundary: a bug here must not stop the daemon
                log.exception("replica poll crashed; trying again", retry_in_s=self.poll)
            await self.store.wait_changed(self.poll)

    async def tick(self) -> None:
        store = self.store
        now = time.time()
        self.others = [r.name for r in await store.replicas()
                       if r.name != store.replica and now - r.heartbeat < store.lease]
        self.engine.keep_evidence = self._evidence_sources() if self.others else None
        self.engine.shared = bool(self.others)  # group members are read back from the store
        taken = await self.dispatcher.takeover()
        if taken:
            await self.engine.adopt(taken)
            self.dispatcher.start(taken)
        # every command of the live runs this replica owns, not only new ones: a run taken
        # over brings the commands its dying owner never carried out; one that cannot be
        # carried out yet (a resumed run not waiting for approval yet) is tried again
        pending = await store.commands(0)
        self._carried_out &= {c.seq for c in pending}
        for command in pending:
            if command.seq not in self._carried_out and self._carry_out(command):
                self._carried_out.add(command.seq)
        self.engine.sync_breakers(await store.breakers())
        await self._reloaded_elsewhere()
        if self.others:  # keys may reach any replica (webhooks): for: timers are shared
            await self.engine.follow_timers()
        else:  # alone: no other replica's group incident holds anything back
            self.engine.correlation.follow_foreign([])
        await self._evidence()

    def _evidence_sources(self) -> dict[str, tuple[str, ...]]:
        """evidence_sources of the loaded packs, computed again only after a reload."""
        registry = self.registry()
        if self._sources_of is not registry:
            self._sources_of, self._sources = registry, evidence_sources(registry)
        return self._sources

    async def _reloaded_elsewhere(self) -> None:
        asked = await self.store.kv_get(*RELOAD_KV)
        token = asked.get("token") if isinstance(asked, dict) else None
        if self._reload_seen is _UNREAD:  # what was asked before this replica started
            self._reload_seen = token
            return
        if token == self._reload_seen:
            return
        self._reload_seen = token
        by = asked.get("by") if isinstance(asked, dict) else None
        if by != self.store.replica and self._reload is not None:
            log.info("reloading: POST /v1/reload on another replica", replica=by)
            self._reload()

    def _carry_out(self, command: CommandRecord) -> bool:
        """A command another replica's API took for a run executing here; False when it
        cannot be carried out now (the run is not waiting for approval, not executing)."""
        run_id = command.run_id
        if command.kind in ("approve", "reject"):
            problem = self.approvals.decide(run_id, command.kind == "approve", command.reason,
                                            command.by)
            if problem is not None:
                return False
        elif command.kind == "cancel":
            why = api_cancel(command.by)
            if not self.dispatcher.cancel(run_id, why, acting_too=True) and \
                    self.engine.cancel_queued(run_id, f"{why} while queued") is None:
                return False
        else:
            log.warning("unknown run command ignored", kind=command.kind, run=run_id)
            return True
        metrics.run_command(command.kind, "received", run_id)
        return True

    async def _evidence(self) -> None:
        """Offer the events other replicas stored to the confirm tasks waiting here (those
        stored after each began to wait), and let resolved alerts cancel the runs here
        that have not acted yet, as they would on the replica that received them."""
        store = self.store
        if self._event_pos is None or not self.others:
            self._event_pos = self.hub.position = await store.last_event()
            return
        while True:
            found = await store.events_since(self._event_pos, limit=1000)
            for pos, record in found:
                event = _event(record)
                if len(self.hub):
                    self.hub.offer(event, position=pos)
                if event.data.get("status") == "resolved":
                    self.engine.resolved_elsewhere(event)
                self._event_pos = self.hub.position = pos
            if len(found) < 1000:
                return
            await asyncio.sleep(0)


def _event(record: Any) -> Event:
    return Event(id=record.id, source=record.source, topic=record.topic,
                 data=record.data if isinstance(record.data, dict) else {},
                 key=record.key, time=record.time, origin=f"store:{record.source}")
