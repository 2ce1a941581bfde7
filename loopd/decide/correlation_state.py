"""The records of correlation state (loopd.decide.correlation), their rows in the
store's kv, and the timers that say when an absence is due and a window passes.

Rows (namespace ``correlation``, keys from ``row``): ``["g", rule, group, member]`` a
group's member ``{first, last, event}``; ``["a", rule, key]`` an armed absence ``{due,
event}``; ``["p", rule, key]`` a partial ``all`` ``{condition: [time, event]}``;
``["i", rule, group, incident, inhibited rule, member]`` a match held back on a replica
that does not hold the group incident ``{first, last, count, event, firing}``, which the
holder merges into its members row (and decides again when it closes). Namespace
``members``: a group incident's id -> ``members_row`` (kept after it closes: the API and
the UI read it).
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from loopd.events import Event

NAMESPACE = "correlation"
MEMBERS = "members"  # group incident id -> {"rule", "key", "members", "inhibited"}
MAX_LISTED = 1000    # members and inhibited matches kept per group incident
JSON = Any
Slot = tuple[str, str]  # (rule, key): a group's key, an absence's or an all's key


@dataclass(slots=True)
class Member:
    key: str
    first: float
    last: float
    event: JSON  # the member's first event
    row: str = ""  # its kv key, made once (a member matches again and again)


@dataclass(slots=True)
class Inhibited:
    rule: str
    key: str
    first: float
    last: float
    event: JSON  # the last inhibited event, decided again when the group closes
    count: int = 1
    firing: bool = True  # no resolved event with its fingerprint came since
    fingerprint: str | None = None  # the alert's, when it has one
    group: Slot = ("", "")  # the group holding it back
    row: str | None = None  # held back here for another replica's group: its row


@dataclass(slots=True)
class Group:
    rule: str
    key: str
    members: dict[str, Member] = field(default_factory=dict)  # in order of arrival
    incident: str | None = None  # the open incident's id
    inhibited: dict[Slot, Inhibited] = field(default_factory=dict)
    foreign: bool = False  # another replica's open incident (read from the store)
    rows: set[str] = field(default_factory=set)  # other replicas' "i" rows merged in


@dataclass(slots=True)
class Absence:
    rule: str
    key: str
    due: float
    event: JSON  # the last matching event


@dataclass(slots=True)
class Partial:
    rule: str
    key: str
    matched: dict[int, tuple[float, JSON]] = field(default_factory=dict)  # condition -> match


def row(*parts: str) -> str:
    """The kv key of one piece of state: unambiguous whatever the rule and key hold."""
    return json.dumps(parts, separators=(",", ":"))


def member_rows(rule: str, key: str) -> str:
    """The prefix of the kv keys of one group's members."""
    return row("g", rule, key)[:-1] + ","


def event_from(data: JSON, ident: str, at: float | None = None) -> Event:
    """An event again from its ``to_json`` under a new id (a fired absence, an inhibited
    match decided again at ``at``: in event time, the instant it is decided)."""
    return Event(id=ident, source=data["source"], topic=data["topic"], data=data["data"],
                 key=data.get("key"), time=data["time"] if at is None else at,
                 headers=data.get("headers") or {}, vars=data.get("vars") or {})


def inhibited_row(seen: Inhibited) -> JSON:
    return {"first": seen.first, "last": seen.last, "count": seen.count,
            "event": seen.event, "firing": seen.firing}


def members_row(group: Group) -> JSON:
    """What the store keeps of a group incident: its members and the matches it held
    back (at most ``MAX_LISTED`` of each)."""
    members = list(group.members.values())[:MAX_LISTED]
    inhibited = list(group.inhibited.values())[:MAX_LISTED]
    return {
        "rule": group.rule, "key": group.key,
        "member_count": len(group.members), "inhibited_count": len(group.inhibited),
        "members": [{"key": m.key, "time": m.first, "last": m.last, "event": m.event}
                    for m in members],
        "inhibited": [
            {"rule": i.rule, "key": i.key, "count": i.count, "first": i.first,
             "last": i.last, "event": i.event, "event_id": i.event.get("id"),
             "source": i.event.get("source"), "firing": i.firing} for i in inhibited]}


class Timers:
    """Two heaps: when each absence is due, and when a group's or partial match's window
    passes. Entries go stale (re-armed, dropped); readers skip those. A window only
    moves later, so one expiry entry per slot is enough: when it passes, the sweep pushes
    the slot again for what is left."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Slot]] = []
        self._expiry: list[tuple[float, int, str, Slot]] = []
        self._expiring: set[tuple[str, Slot]] = set()
        self._seq = itertools.count()

    def arm(self, when: float, slot: Slot) -> None:
        heapq.heappush(self._due, (when, next(self._seq), slot))

    def expire(self, when: float, kind: str, slot: Slot) -> None:
        if (kind, slot) not in self._expiring:
            self._expiring.add((kind, slot))
            heapq.heappush(self._expiry, (when, next(self._seq), kind, slot))

    def next_due(self, absences: dict[Slot, Absence]) -> float | None:
        heap = self._due
        while heap:
            when, _, slot = heap[0]
            absence = absences.get(slot)
            if absence is not None and absence.due == when:
                return when
            heapq.heappop(heap)  # re-armed or disarmed since
        return None

    def next_expiry(self) -> float | None:
        """When the earliest window entry passes (it may be stale: the sweep says)."""
        return self._expiry[0][0] if self._expiry else None

    def expired(self, now: float) -> Iterator[tuple[str, Slot]]:
        """(kind, slot) of every window entry that passed before ``now``."""
        heap = self._expiry
        while heap and heap[0][0] < now:
            _, _, kind, slot = heapq.heappop(heap)
            self._expiring.discard((kind, slot))
            yield kind, slot

    def compact(self, absences: dict[Slot, Absence]) -> None:
        """Drop the stale entries re-arming leaves, once they outnumber the live ones."""
        if len(self._due) > 4 * len(absences) + 64:
            self._due = [e for e in self._due if (a := absences.get(e[2])) is not None
                         and a.due == e[0]]
            heapq.heapify(self._due)
