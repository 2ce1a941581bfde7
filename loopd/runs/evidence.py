"""Evidence for confirm tasks: events offered by the engine, PromQL polled.

Every event the engine sees is offered to the hub; only runs waiting on a
confirm task hold waiters, indexed by source, so with nobody waiting an event
costs one dict lookup. A waiter succeeds on the first event that matches its
``on`` part and satisfies its ``if``; a matching event that fails the ``if`` is
counter-evidence (the fix did not work), which turns "no evidence" at the
deadline into ``failed`` instead of ``inconclusive``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# the client confirm tasks poll (in catalog/, so that promql sources share it)
from loopd.catalog.prometheus import PromQL as PromQL
from loopd.errors import ConditionError
from loopd.events import Event
from loopd.rules.compile import lookup
from loopd.workflow.loader import Evidence

_MISSING = object()


@dataclass(eq=False, slots=True)
class Waiter:
    """One confirm task waiting for evidence: ``found`` is resolved by the first event
    that shows the fix worked; the task awaits it through its Clock until the deadline."""

    evidence: Evidence
    scope: Callable[[Event, dict[str, str]], dict[str, Any]]
    found: asyncio.Future[Event] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    against: int = 0
    after: int = 0  # events stored at this position or before predate the wait
    last_against: dict[str, Any] | None = None

    def offer(self, event: Event) -> None:
        ev = self.evidence
        if self.found.done():
            return
        if ev.topic is not None:
            tvars = ev.topic(event.topic)
            if tvars is None:
                return
        else:
            tvars = {}
        for path, values in ev.match:
            value = lookup(event.data, path)
            try:
                if value not in values:
                    return
            except TypeError:
                return
        if ev.condition is None:
            self.found.set_result(event)
            return
        try:
            ok = bool(ev.condition(self.scope(event, tvars)))
        except ConditionError:
            return  # an event this condition cannot read is no evidence either way
        if ok:
            self.found.set_result(event)
        else:
            self.against += 1
            self.last_against = event.to_json()


_Slot = tuple[str | None, str, Any]  # (source, "topic" | dotted match path, value)


class ConfirmHub:
    """Waiters indexed like rules: by literal topic, else by a literal match value,
    else by source; 10,000 waiting runs cost an event a few dict lookups."""

    def __init__(self) -> None:
        self._slots: dict[_Slot, set[Waiter]] = {}
        self._paths: dict[str | None, dict[tuple[str, ...], int]] = {}  # indexed paths per source
        self._count = 0
        self.satisfied = 0  # waiters whose evidence an offered event was, ever
        # the newest stored event position a replica has read (loopd.cluster): a waiter
        # added now takes only events stored after it as evidence read from the store
        self.position = 0

    def __len__(self) -> int:
        return self._count

    @staticmethod
    def _slot(waiter: Waiter) -> _Slot:
        ev = waiter.evidence
        if ev.literal_topic is not None:
            return (ev.source, "topic", ev.literal_topic)
        for path, values in ev.match:
            if len(values) == 1:
                (value,) = values
                return (ev.source, ".".join(path), value)
        return (ev.source, "*", None)

    def add(self, waiter: Waiter) -> None:
        waiter.after = self.position
        slot = self._slot(waiter)
        self._slots.setdefault(slot, set()).add(waiter)
        self._count += 1
        if slot[1] not in ("topic", "*"):
            paths = self._paths.setdefault(slot[0], {})
            key = tuple(slot[1].split("."))
            paths[key] = paths.get(key, 0) + 1

    def remove(self, waiter: Waiter) -> None:
        slot = self._slot(waiter)
        waiters = self._slots.get(slot)
        if waiters is None or waiter not in waiters:
            return
        waiters.discard(waiter)
        self._count -= 1
        if not waiters:
            del self._slots[slot]
        if slot[1] not in ("topic", "*"):
            paths = self._paths[slot[0]]
            key = tuple(slot[1].split("."))
            paths[key] -= 1
            if not paths[key]:
                del paths[key]

    def offer(self, event: Event, *, position: int | None = None) -> None:
        """Offer ``event`` to the waiters it may be evidence for; ``position``: where the
        store holds it (read back for replicas: waiters that began after it skip it)."""
        if not self._count:
            return
        slots = self._slots
        for source in (event.source, None):
            candidates = [slots.get((source, "topic", event.topic)),
                          slots.get((source, "*", None))]
            for path in self._paths.get(source, ()):
                value = lookup(event.data, path)
                try:
                    candidates.append(slots.get((source, ".".join(path), value)))
                except TypeError:  # unhashable value
                    continue
            for waiters in candidates:
                for waiter in list(waiters or ()):
                    if waiter.found.done():  # satisfied, its run not yet resumed
                        continue
                    if position is not None and position <= waiter.after:
                        continue  # stored before this run began to wait
                    waiter.offer(event)
                    if waiter.found.done():
                        self.satisfied += 1
