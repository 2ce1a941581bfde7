"""Correlation: rules that see more than one event (``group``, ``inhibits``, ``absent``,
``all``), with their partial state.

* ``group: {by, count, within}``: the rule's key (or the event's) is a *member*; ``by``
  renders the *group*, the incident's key. Until ``count`` distinct members matched within
  ``within`` (each member's latest match counts), the event is ``suppressed`` (guard
  ``group``); the event that completes the count opens the incident through
  ``Incidents.decide`` with ``members`` in scope; later members join it. When it closes,
  the group starts afresh.
* ``inhibits``: while a group incident is open, the listed rules' matches for its members
  are ``suppressed`` (guard ``inhibited``). When it closes, the last inhibited event of
  each (rule, member) not resolved since is decided again (``<id>~after-<incident>``).
* ``absent: D``: each matching event arms a timer per key at now + D; when it is due the
  rule fires once with the last event (``<id>~absent``); a resolved event disarms it.
* ``all`` + ``within``: per key, the latest match of each condition; when every
  condition matched within the window the rule fires with the completing event.

The engine is the only caller (decide/ is the one writer of this state). Every change is
a row of the store's kv (namespace ``correlation``; a group incident's members and
inhibited matches under ``members``), written by the batch of the decision that made it
(``flush``), so a restart or a rebalance rebuilds exactly this state (``rebuild``) and an
event redelivered after a crash is decided against what was durable. Expired state is
deleted (``sweep``): memory and rows are bounded by the windows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from loopd import metrics
from loopd.decide.correlation_state import (
    JSON,
    MEMBERS,
    NAMESPACE,
    Absence,
    Group,
    Inhibited,
    Member,
    Partial,
    Slot,
    Timers,
    event_from,
    inhibited_row,
    member_rows,
    members_row,
    row,
)
from loopd.decide.incidents import Incidents
from loopd.decide.suppressions import SuppressionLog
from loopd.events import Event
from loopd.messages import RunCommand
from loopd.rules.compile import CompiledRule
from loopd.store.base import Batch, DecisionRecord, IncidentRecord

__all__ = ["MEMBERS", "NAMESPACE", "Absence", "Correlation", "Slot", "event_from",
           "member_rows", "row"]

class Correlation:
    def __init__(self, incidents: Incidents, suppressions: SuppressionLog,
                 max_slots: int = 100_000) -> None:
        self.incidents = incidents
        self.suppressions = suppressions
        self.max_slots = max_slots
        self.groups: dict[Slot, Group] = {}
        self.absences: dict[Slot, Absence] = {}
        self.partials: dict[Slot, Partial] = {}
        # rule inhibited -> member -> the open group holding it back
        self.inhibitors: dict[str, dict[str, Group]] = {}
        self.inhibitable: frozenset[str] = frozenset()  # rules some group rule inhibits
        self.peak = 0  # the most slots held at once (benchmarks: memory bounded by windows)
        self._rules: dict[str, CompiledRule] = {}
        self._writes: dict[tuple[str, str], JSON] = {}  # kv rows for the next batch
        self._dirty: dict[str, Group] = {}  # group incident id -> its members row to write
        self._timers = Timers()  # absence timers, and when windows pass
        self._fingerprints: dict[str, list[Inhibited]] = {}
        self._released: list[tuple[str, str, JSON]] = []  # (rule, incident, event): release
        self._warned = False
        self._told = (0, 0, 0)
        # several replicas: groups held below their count in this batch (the store may
        # know more members, decided elsewhere), and other replicas' open group incidents
        self.held: set[Slot] = set()
        self.foreign: dict[str, dict[str, Group]] = {}  # rule inhibited -> member -> group
        self.foreign_groups: dict[Slot, Group] = {}
        self._foreign_before: dict[Slot, Group] = {}  # the sizes loopd_correlation_state shows

    # -- rules ------------------------------------------------------------------------

    def set_rules(self, rules: Iterable[CompiledRule]) -> None:
        """The rules in force: state of rules removed, disabled or no longer of its kind
        is dropped (an absence of a disabled rule is disarmed). A group rule gone with its
        incident open inhibits nothing any more: the matches it held back that are still
        firing are decided again now (``take_released``), as its close would have."""
        self._rules = {r.name: r for r in rules if r.rule.enabled}
        self.inhibitable = frozenset(
            n for r in self._rules.values() if r.correlation == "group" for n in r.rule.inhibits)
        for kind, states in (("group", self.groups), ("absent", self.absences),
                             ("all", self.partials)):
            for slot in [s for s in states if self._kind(s[0]) != kind]:
                if kind == "group":
                    self._release_group(self.groups[slot])
                self._drop(kind, slot)
        self._reindex()

    def _release_group(self, group: Group) -> None:
        incident = self.incidents.open.get((group.rule, group.key))
        if incident is None or incident.id != group.incident:
            return
        self._write_members(group)  # the list as it was, for the API
        for seen in group.inhibited.values():
            if seen.firing:
                self._released.append((seen.rule, incident.id, seen.event))

    def _kind(self, rule: str) -> str | None:
        compiled = self._rules.get(rule)
        return compiled.correlation if compiled is not None else None

    def size(self) -> int:
        """Slots held: groups, absence timers and partial all matches."""
        return len(self.groups) + len(self.absences) + len(self.partials)

    # -- group ------------------------------------------------------------------------

    def group(self, rule: CompiledRule, event: Event, member: str, key: str,
              scope: dict[str, Any], now: float, batch: Batch, commands: list[RunCommand]
              ) -> None:
        """Decide a group rule's match of ``member`` for the group ``key``."""
        spec = rule.rule.group
        assert spec is not None
        slot = (rule.name, key)
        group = self.groups.get(slot)
        if group is None:
            group = self.groups[slot] = Group(rule.name, key)
            self._bound()
        incident = self.incidents.open.get(slot)
        if incident is not None:
            self._join(group, incident, event, member, now, batch)
            return
        elsewhere = self.foreign_groups.get(slot)
        if elsewhere is not None:  # another replica holds the open incident: join it there
            self._touch(group, member, event, now)  # its owner merges the member's row
            self._foreign_member(elsewhere, member)
            batch.decisions.append(DecisionRecord(
                event.source, event.id, rule.name, key, "joined",
                f"member {member} of group {key} (its incident is another replica's)", now,
                elsewhere.incident))
            return
        group.incident = None
        self._expire(group, now, spec.within)
        self._touch(group, member, event, now)
        have = len(group.members)
        if have < spec.count:
            self.held.add(slot)
            self._expire_at(min(m.last for m in group.members.values()) + spec.within, "g",
                            slot)
            # recorded for the group, the incident's key: its story tells how it formed
            self._suppress(batch, rule.name, key, event, now, "group",
                           f"guard group: {have} of {spec.count} members within "
                           f"{spec.within:g}s (group {key}, member {member})")
            return
        self.open(rule, group, event, scope, now, batch, commands)

    def open(self, rule: CompiledRule, group: Group, event: Event, scope: dict[str, Any],
             now: float, batch: Batch, commands: list[RunCommand]) -> None:
        """``group`` has its count: open its incident with ``event`` (unless a guard or
        the throttle says no: then it stays as it is, and the next member tries again)."""
        scope["key"] = group.key
        scope["members"] = self._view(group)
        self.incidents.decide(rule, event, group.key, scope, now, batch, commands)
        opened = self.incidents.open.get((group.rule, group.key))
        if opened is not None:
            group.incident = opened.id
            self._inhibit_members(group)
            self._write_members(group)

    def complete(self, slot: Slot, rows: list[tuple[str, JSON]], now: float
                 ) -> tuple[CompiledRule, Group, Event] | None:
        """A group held below its count, with the store's member rows (several replicas
        decide members of one group): the rule, the group and a trigger event when the
        union has the count now. The trigger is the newest member's event under the id
        ``<id>~group``, the same on every replica that reads the same rows."""
        rule = self._rules.get(slot[0])
        spec = rule.rule.group if rule is not None else None
        if rule is None or spec is None or slot in self.incidents.open:
            return None
        group = self.groups.setdefault(slot, Group(*slot))
        for name, value in rows:
            member = json.loads(name)[3]
            if member not in group.members:
                group.members[member] = Member(member, value["first"], value["last"],
                                               value["event"])
            else:
                known = group.members[member]
                known.last = max(known.last, value["last"])
        _in_arrival_order(group)
        self._expire(group, now, spec.within)
        if len(group.members) < spec.count:
            return None
        newest = max(group.members.values(), key=lambda m: (m.last, m.key))
        return rule, group, event_from(newest.event, f"{newest.event['id']}~group")

    def _join(self, group: Group, incident: IncidentRecord, event: Event, member: str,
              now: float, batch: Batch) -> None:
        new = member not in group.members
        if group.incident != incident.id:  # opened before this engine knew the group
            group.incident = incident.id
        self._touch(group, member, event, now)
        if new:
            self._inhibit_members(group, [member])
        self._write_members(group)  # a repeat moves the member's last time too
        incident.events += 1
        batch.incidents[incident.id] = incident
        reason = (f"member {member} joined group {group.key} ({len(group.members)} members)"
                  if new else "incident already open")
        batch.decisions.append(DecisionRecord(
            event.source, event.id, group.rule, group.key, "joined", reason, now, incident.id,
            incident.run_id))

    def _touch(self, group: Group, member: str, event: Event, now: float) -> None:
        known = group.members.get(member)
        if known is None:
            known = group.members[member] = Member(member, now, now, event.to_json())
        else:
            known.last = max(known.last, now)
        if not known.row:
            known.row = row("g", group.rule, group.key, member)
        self._writes[(NAMESPACE, known.row)] = {
            "first": known.first, "last": known.last, "event": known.event}

    def _expire(self, group: Group, now: float, within: float) -> None:
        for old in [m for m in group.members.values() if now - m.last > within]:
            del group.members[old.key]
            self._writes[(NAMESPACE, row("g", group.rule, group.key, old.key))] = None

    def _view(self, group: Group) -> list[dict[str, Any]]:
        """``members`` as a group rule's run.input sees it."""
        entities = self.incidents.inventory.entities
        return [{"key": m.key, "time": m.first, "event": m.event,
                 "entity": entities.get(m.key)} for m in group.members.values()]

    def _write_members(self, group: Group) -> None:
        """The group incident's members row is written by the next flush (once per batch,
        however many members joined or matches it held back)."""
        if group.incident is not None:
            self._dirty[group.incident] = group

    # -- inhibits ---------------------------------------------------------------------

    def _inhibit_members(self, group: Group, members: Iterable[str] | None = None) -> None:
        """``members`` (all of the group's by default) are held back by ``group`` for the
        rules it inhibits."""
        rule = self._rules.get(group.rule)
        if rule is None:
            return
        for name in rule.rule.inhibits:
            held = self.inhibitors.setdefault(name, {})
            for member in group.members if members is None else members:
                held[member] = group

    def inhibitor(self, rule: str, key: str) -> Group | None:
        """The open group incident holding back ``rule``'s matches for ``key``, if any."""
        held = self.inhibitors.get(rule)
        group = held.get(key) if held else None
        if group is not None:
            incident = self.incidents.open.get((group.rule, group.key))
            if incident is not None and incident.id == group.incident:
                return group
            del held[key]  # type: ignore[union-attr]  # closed, or never created
        elsewhere = self.foreign.get(rule)  # another replica's open group incident
        return elsewhere.get(key) if elsewhere else None

    def inhibit(self, group: Group, rule: str, key: str, event: Event, now: float,
                batch: Batch) -> None:
        """Record ``rule``'s match for member ``key`` as held back by ``group``."""
        reason = (f"guard inhibited: {key} is a member of group {group.key} of "
                  f"{group.rule} (incident {group.incident})")
        slot = (rule, key)
        seen = group.inhibited.get(slot)
        data = event.to_json()
        if seen is None:
            seen = group.inhibited[slot] = Inhibited(rule, key, now, now, data,
                                                     group=(group.rule, group.key))
        else:
            seen.count, seen.last, seen.event, seen.firing = seen.count + 1, now, data, True
        fingerprint = event.data.get("fingerprint")
        if isinstance(fingerprint, str) and seen.fingerprint != fingerprint:
            seen.fingerprint = fingerprint
            self._fingerprints.setdefault(fingerprint, []).append(seen)
        if group.foreign:  # the members row is the holder's: it merges this row
            seen.row = row("i", group.rule, group.key, group.incident or "", rule, key)
            self._writes[(NAMESPACE, seen.row)] = inhibited_row(seen)
        else:
            self._write_members(group)
        self._suppress(batch, rule, key, event, now, "inhibited", reason)

    def follow_foreign(self, incidents: list[tuple[IncidentRecord, JSON]]) -> None:
        """Other replicas' open group incidents with their members rows: their members
        (and the members decided here) join them, and their matches of the rules they
        inhibit are held back here too (until the next read)."""
        self._foreign_before = self.foreign_groups
        self.foreign, self.foreign_groups = {}, {}
        for incident, stored in incidents:
            slot = (incident.rule, incident.key)
            if slot in self.incidents.open or slot[0] not in self._rules:
                continue
            members = [m["key"] for m in (stored or {}).get("members", ())]
            local = self.groups.get(slot)
            self._foreign_group(slot, incident.id, [*members, *(local.members if local else ())])
        for slot, before in self._foreign_before.items():
            after = self.foreign_groups.get(slot)
            if after is None or after.inhibited is not before.inhibited:  # gone, or another
                self._forget_fingerprints(before)

    def conflicted(self, opened: str, held: IncidentRecord) -> None:
        """The store did not create group incident ``opened``: another replica holds
        ``held`` open for the group. The group's members join that one (they are
        inhibited by it here), and the members row written for ``opened`` goes."""
        group = self.groups.get((held.rule, held.key))
        if group is None or group.incident != opened:
            return
        group.incident = None
        self._dirty.pop(opened, None)
        self._writes[(MEMBERS, opened)] = None
        self._foreign_group((held.rule, held.key), held.id, list(group.members))
        elsewhere = self.foreign_groups[(held.rule, held.key)]
        for (rule, key), seen in group.inhibited.items():  # held back by the phantom
            seen.row = row("i", held.rule, held.key, held.id, rule, key)
            elsewhere.inhibited[(rule, key)] = seen
            self._writes[(NAMESPACE, seen.row)] = inhibited_row(seen)
        group.inhibited = {}

    def _foreign_group(self, slot: Slot, incident: str, members: Iterable[str]) -> None:
        group = Group(*slot, incident=incident, foreign=True)
        before = self._foreign_before.get(slot)
        if before is not None and before.incident == incident:
            group.inhibited = before.inhibited  # what was held back here: counts go on
        self.foreign_groups[slot] = group
        for member in members:
            self._foreign_member(group, member)

    def _forget_fingerprints(self, group: Group) -> None:
        """The matches ``group`` held back no longer wait for a resolved alert."""
        for seen in group.inhibited.values():
            if seen.fingerprint is None or (
                    held := self._fingerprints.get(seen.fingerprint)) is None:
                continue
            held[:] = [s for s in held if s is not seen]
            if not held:
                del self._fingerprints[seen.fingerprint]

    def _foreign_member(self, group: Group, member: str) -> None:
        group.members.setdefault(member, Member(member, 0.0, 0.0, None))
        rule = self._rules.get(group.rule)
        for name in rule.rule.inhibits if rule is not None else ():
            self.foreign.setdefault(name, {})[member] = group

    def held_for(self, rows: list[tuple[str, JSON]], open_ids: set[str]
                 ) -> list[tuple[str, str, JSON]]:
        """The ``"i"`` rows (name, incident id, value) of group incidents that neither this
        engine nor ``open_ids`` (the store's open incidents, read after ``rows``) holds
        open: candidates to ``release``."""
        mine = {i.id for i in self.incidents.open.values()}
        found = []
        for name, value in rows:
            if name.startswith('["i",'):
                _, _, _, incident, *_ = json.loads(name)
                if incident not in open_ids and incident not in mine:
                    found.append((name, incident, value))
        return found

    def release(self, name: str, incident: str, value: JSON) -> None:
        """A match held back for a group incident that closed before its holder merged
        it: its row goes, and, still firing, it is decided again (``take_released``) as
        the close would have (``<id>~after-<incident>``)."""
        if self._writes.get((NAMESPACE, name), 0) is None:
            return  # released already; its row is deleted by the next batch
        self._writes[(NAMESPACE, name)] = None
        if value.get("firing"):
            self._released.append((json.loads(name)[4], incident, value["event"]))

    def take_released(self, now: float) -> list[tuple[str, Event]]:
        """The released matches to decide again, with their rule."""
        if not self._released:
            return []
        released, self._released = self._released, []
        return [(rule, event_from(data, f"{data['id']}~after-{incident}", at=now))
                for rule, incident, data in released]

    def pending(self) -> bool:
        """Rows changed (or matches released) that no batch has taken yet."""
        return bool(self._writes or self._dirty or self._released)

    def resolved(self, fingerprint: str) -> None:
        """A resolved alert: inhibited matches of the same alert are not firing any more."""
        for seen in self._fingerprints.pop(fingerprint, ()):
            seen.firing, seen.fingerprint = False, None
            if seen.row is not None:  # held back here for another replica's group
                self._writes[(NAMESPACE, seen.row)] = inhibited_row(seen)
                continue
            group = self.groups.get(seen.group)
            if group is not None:
                self._write_members(group)

    def closed(self, incident: IncidentRecord, now: float) -> list[tuple[str, Event]]:
        """A group incident closed: the group starts afresh, its inhibitions end; returns
        the last inhibited events still firing with their rule, to be decided again."""
        group = self.groups.get((incident.rule, incident.key))
        if group is None or group.incident != incident.id:
            return []
        self._write_members(group)
        self._drop("group", (group.rule, group.key))
        again: list[tuple[str, Event]] = []
        for seen in group.inhibited.values():
            if seen.firing:
                data = seen.event
                again.append((seen.rule, event_from(
                    data, f"{data['id']}~after-{incident.id}", at=now)))
        return again

    # -- absent -----------------------------------------------------------------------

    def arm(self, rule: CompiledRule, event: Event, key: str, now: float) -> None:
        """A matching event (re)arms the rule's timer for ``key``; a resolved one disarms."""
        slot = (rule.name, key)
        if event.data.get("status") == "resolved":
            if slot in self.absences:
                self._drop("absent", slot)
            return
        assert rule.rule.absent is not None
        armed = self.absences.get(slot)
        if armed is not None and armed.event["id"] == event.id \
                and armed.event["source"] == event.source:
            return  # the event that armed it, delivered again: no new event for the key
        absence = Absence(rule.name, key, now + rule.rule.absent, event.to_json())
        if slot not in self.absences:
            self._bound()
        self.absences[slot] = absence
        self._arm_at(absence.due, slot)
        self._writes[(NAMESPACE, row("a", rule.name, key))] = {
            "due": absence.due, "event": absence.event}

    def next_due(self) -> float | None:
        """When the earliest absence timer is due (None: none armed)."""
        return self._timers.next_due(self.absences)

    def next_expiry(self) -> float | None:
        """When the earliest window may pass (the sweep then forgets what expired)."""
        return self._timers.next_expiry()

    def due(self, now: float) -> list[Absence]:
        """The absences due at ``now`` (still in memory: ``fired`` forgets each)."""
        return sorted((a for a in self.absences.values() if a.due <= now),
                      key=lambda a: (a.due, a.rule, a.key))

    def fired(self, absence: Absence) -> None:
        """Its rule fired (or another replica fired it): disarmed until the next event."""
        if self.absences.get((absence.rule, absence.key)) is absence:
            self._drop("absent", (absence.rule, absence.key))

    def follow_absence(self, absence: Absence, stored: JSON) -> bool:
        """The store's row of a due absence (other replicas may have re-armed, fired or
        disarmed it): True when it is still due as memory has it."""
        slot = (absence.rule, absence.key)
        if not isinstance(stored, dict):
            self.absences.pop(slot, None)  # fired or disarmed elsewhere
            return False
        due = float(stored["due"])
        if due > absence.due:  # re-armed elsewhere
            absence.due, absence.event = due, stored["event"]
            self._arm_at(due, slot)
            return False
        return True

    # -- all --------------------------------------------------------------------------

    def all(self, rule: CompiledRule, event: Event, key: str, scope: dict[str, Any],
            now: float, batch: Batch, commands: list[RunCommand]) -> None:
        """Decide an ``all`` rule's match of its condition ``rule.part`` for ``key``."""
        within, wanted = rule.rule.within, len(rule.rule.conditions)
        assert within is not None
        slot = (rule.name, key)
        partial = self.partials.get(slot)
        if partial is None:
            partial = self.partials[slot] = Partial(rule.name, key)
            self._bound()
        partial.matched[rule.part] = (now, event.to_json())
        for part in [p for p, (t, _) in partial.matched.items() if now - t > within]:
            del partial.matched[part]
        if len(partial.matched) < wanted:
            self._writes[(NAMESPACE, row("p", rule.name, key))] = {
                str(p): [t, e] for p, (t, e) in partial.matched.items()}
            self._expire_at(min(t for t, _ in partial.matched.values()) + within, "p", slot)
            missing = [i for i in range(wanted) if i not in partial.matched]
            waiting = ", ".join(_describe(rule.rule.conditions[i].on.topic, i) for i in missing)
            self._suppress(batch, rule.name, key, event, now, "all",
                           f"guard all: {len(partial.matched)} of {wanted} conditions within "
                           f"{within:g}s (waiting for {waiting})")
            return
        scope["matched"] = [partial.matched[i][1] for i in range(wanted)]
        self._drop("all", slot)
        self.incidents.decide(rule, event, key, scope, now, batch, commands)

    # -- writing, expiry, restore -----------------------------------------------------

    def rule(self, name: str) -> CompiledRule | None:
        return self._rules.get(name)

    def segment(self, batch: Batch) -> None:
        """The rows changed since the last call go into ``batch`` as the segment's being
        decided (``Batch.put_kv``): a batch the store rejects is split by segment, and the
        rows of a rejected event must go with it."""
        if self._writes:
            put = batch.put_kv
            for key, value in self._writes.items():
                put(key, value)
            self._writes = {}

    def flush(self, batch: Batch) -> None:
        """The rows changed since the last flush go into ``batch`` (the decision's); the
        members rows of group incidents once per batch, with every part of it."""
        self.segment(batch)
        if self._dirty:
            for incident, group in self._dirty.items():
                batch.kv[(MEMBERS, incident)] = members_row(group)
            self._dirty = {}

    def forget(self, events: set[tuple[str, str]]) -> Batch:
        """The store rejected ``events`` (source, id): they count nowhere. Their rows were
        not written, but the members rows of group incidents are written with every part
        of a batch, and held the matches they made: the rows of the groups they touched,
        without those, to write before memory is read again from the store (a held-back
        match whose last event was rejected is dropped with it)."""

        def rejected(event: JSON) -> bool:
            return isinstance(event, dict) and (event.get("source"), event.get("id")) in events

        batch = Batch()
        for group in self.groups.values():
            if group.incident is None or group.foreign:
                continue
            gone = [slot for slot, seen in group.inhibited.items() if rejected(seen.event)]
            left = [key for key, member in group.members.items() if rejected(member.event)]
            for slot in gone:
                del group.inhibited[slot]
            for key in left:
                del group.members[key]
            if gone or left:
                batch.kv[(MEMBERS, group.incident)] = members_row(group)
        return batch

    def sweep(self, now: float) -> None:
        """Forget groups and partial matches whose window passed (their rows too)."""
        size = (len(self.groups), len(self.absences), len(self.partials))
        if size != self._told:
            self._told = size
            metrics.correlation_state(*size)
        for kind, slot in self._timers.expired(now):
            rule = self._rules.get(slot[0])
            if kind == "g" and (group := self.groups.get(slot)) is not None:
                spec = rule.rule.group if rule is not None else None
                if spec is None or slot in self.incidents.open:
                    continue  # an open incident's members stay until it closes
                group.incident = None  # closed, or the store never created it
                self._expire(group, now, spec.within)
                if group.members:
                    self._expire_at(min(m.last for m in group.members.values()) + spec.within,
                                    "g", slot)
                else:
                    self._drop("group", slot)
            elif kind == "p" and (partial := self.partials.get(slot)) is not None:
                within = rule.rule.within if rule is not None else None
                if within is None:
                    continue
                for part in [p for p, (t, _) in partial.matched.items() if now - t > within]:
                    del partial.matched[part]
                if partial.matched:
                    self._expire_at(min(t for t, _ in partial.matched.values()) + within, "p",
                                    slot)
                else:
                    self._drop("all", slot)
        self._timers.compact(self.absences)

    def rebuild(self, rows: list[tuple[str, JSON]], members: dict[str, JSON]) -> None:
        """All state anew from the store's rows (start, a rebalance); ``members``: the
        members rows of the open group incidents."""
        self.groups, self.absences, self.partials = {}, {}, {}
        self._timers, self._fingerprints, self.inhibitors = Timers(), {}, {}
        held: list[tuple[str, JSON]] = []
        for name, value in rows:
            if name.startswith('["i",'):
                held.append((name, value))
            else:
                self._load_row(name, value)
        for (rule, key), group in self.groups.items():
            _in_arrival_order(group)  # rows come in key order
            spec = self._rules.get(rule)
            if spec is not None and spec.rule.group is not None and group.members:
                # one expiry entry per slot: armed at the oldest member's, once all are read
                self._expire_at(min(m.last for m in group.members.values())
                                + spec.rule.group.within, "g", (rule, key))
            incident = self.incidents.open.get((rule, key))
            if incident is not None:
                group.incident = incident.id
                stored = members.get(incident.id)
                for seen in (stored or {}).get("inhibited", ()):
                    entry = Inhibited(seen["rule"], seen["key"], seen["first"], seen["last"],
                                      seen["event"], seen["count"], seen["firing"],
                                      group=(rule, key))
                    group.inhibited[(entry.rule, entry.key)] = entry
                    fingerprint = (entry.event.get("data") or {}).get("fingerprint")
                    if isinstance(fingerprint, str) and entry.firing:
                        entry.fingerprint = fingerprint
                        self._fingerprints.setdefault(fingerprint, []).append(entry)
        for name, value in held:
            _, rule, key, *rest = json.loads(name)
            self._held_elsewhere((rule, key), name, rest, value)
        self._reindex()

    def merge(self, rows: list[tuple[str, JSON]]) -> None:
        """Other replicas' rows (several replicas deciding one group, webhooks reaching
        any): members and matches this engine lacks, absences re-armed later there."""
        grown: dict[Slot, Group] = {}
        for name, value in rows:
            kind, rule, key, *rest = json.loads(name)
            slot = (rule, key)
            if kind == "g" and rest:
                group = self.groups.setdefault(slot, Group(rule, key))
                if rest[0] not in group.members:
                    group.members[rest[0]] = Member(rest[0], value["first"], value["last"],
                                                    value["event"])
                    grown[slot] = group
            elif kind == "a":
                absence = self.absences.get(slot)
                if absence is not None and value["due"] > absence.due:
                    absence.due, absence.event = value["due"], value["event"]
                    self._arm_at(absence.due, slot)
            elif kind == "p":
                partial = self.partials.setdefault(slot, Partial(rule, key))
                for part, (t, data) in value.items():
                    mine = partial.matched.get(int(part))
                    if mine is None or mine[0] < t:
                        partial.matched[int(part)] = (t, data)
            elif kind == "i" and len(rest) == 3:
                self._held_elsewhere(slot, name, rest, value)
        for slot, group in grown.items():
            _in_arrival_order(group)
            if slot in self.incidents.open and group.incident is not None:
                self._write_members(group)  # members another replica decided join it
        self._reindex()

    def _held_elsewhere(self, slot: Slot, name: str, rest: list[str], value: JSON) -> None:
        """Another replica held back a match for this engine's open group incident: it
        joins the incident's list (and is decided again when it closes)."""
        incident, rule, key = rest
        group = self.groups.get(slot)
        if group is None or group.incident != incident or slot not in self.incidents.open:
            return
        group.rows.add(name)
        seen = group.inhibited.get((rule, key))
        if seen is not None and seen.last >= value["last"] and seen.firing == value["firing"]:
            return
        if seen is None or seen.last <= value["last"]:
            group.inhibited[(rule, key)] = Inhibited(
                rule, key, value["first"], value["last"], value["event"], value["count"],
                value["firing"], group=slot)
        else:
            seen.firing = seen.firing and value["firing"]
        self._write_members(group)

    def _load_row(self, name: str, value: JSON) -> None:
        try:
            kind, rule, key, *rest = json.loads(name)
        except ValueError:
            return
        slot = (rule, key)
        if kind == "g" and rest:
            group = self.groups.setdefault(slot, Group(rule, key))
            group.members[rest[0]] = Member(rest[0], value["first"], value["last"],
                                            value["event"])
        elif kind == "a":
            self.absences[slot] = Absence(rule, key, value["due"], value["event"])
            self._arm_at(value["due"], slot)
        elif kind == "p":
            partial = self.partials.setdefault(slot, Partial(rule, key))
            for part, (t, data) in value.items():
                partial.matched[int(part)] = (t, data)
            spec = self._rules.get(rule)
            if spec is not None and spec.rule.within is not None and partial.matched:
                self._expire_at(
                    min(t for t, _ in partial.matched.values()) + spec.rule.within, "p", slot)

    def _reindex(self) -> None:
        self.inhibitors = {}
        for group in self.groups.values():
            if group.incident is not None:
                self._inhibit_members(group)
        self.peak = max(self.peak, self.size())

    def _drop(self, kind: str, slot: Slot) -> None:
        rule, key = slot
        if kind == "group":
            group = self.groups.pop(slot, None)
            if group is not None:
                for member in group.members:
                    self._writes[(NAMESPACE, row("g", rule, key, member))] = None
                compiled = self._rules.get(rule)
                names = compiled.rule.inhibits if compiled is not None else list(
                    self.inhibitors)  # a rule gone: look everywhere
                for name in names:  # only the group's own members, in its own rules' maps
                    held = self.inhibitors.get(name)
                    for member in group.members if held else ():
                        if held.get(member) is group:  # type: ignore[union-attr]
                            del held[member]  # type: ignore[union-attr]
                for seen in group.inhibited.values():
                    if seen.fingerprint is not None:
                        self._fingerprints.pop(seen.fingerprint, None)
                for name in group.rows:
                    self._writes[(NAMESPACE, name)] = None
        elif kind == "absent":
            self.absences.pop(slot, None)
            self._writes[(NAMESPACE, row("a", rule, key))] = None
        else:
            self.partials.pop(slot, None)
            self._writes[(NAMESPACE, row("p", rule, key))] = None

    def _arm_at(self, when: float, slot: Slot) -> None:
        self._timers.arm(when, slot)

    def _expire_at(self, when: float, kind: str, slot: Slot) -> None:
        self._timers.expire(when, kind, slot)

    def _bound(self) -> None:
        """Past ``max_slots``, the oldest slot of the largest kind goes (counted, logged
        once); an open group incident's members are never forgotten."""
        size = self.size()
        self.peak = max(self.peak, size)
        if size <= self.max_slots:
            return
        sizes = {"group": len(self.groups), "all": len(self.partials),
                 "absent": len(self.absences)}
        kind = max(sizes, key=sizes.__getitem__)
        slot: Slot | None
        if kind == "group":  # an open group incident's members are kept
            slot = next((g for g in self.groups if g not in self.incidents.open), None)
        else:
            slot = next(iter(self.partials if kind == "all" else self.absences), None)
        if slot is not None:
            self._drop(kind, slot)
            metrics.evicted("correlation", 1, full=True)
        if not self._warned:
            self._warned = True
            metrics.memory_full("correlation", self.max_slots,
                                "the oldest partial groups, matches or absence timers")

    def _suppress(self, batch: Batch, rule: str, key: str, event: Event, now: float,
                  guard: str, reason: str) -> None:
        metrics.guard_suppressed(rule, guard)
        self.suppressions.suppressed(rule, key, event.source, event.id, guard, reason)
        batch.decisions.append(DecisionRecord(
            event.source, event.id, rule, key, "suppressed", reason, now))


def _in_arrival_order(group: Group) -> None:
    """Members read from the store (in key order, or merged from other replicas) in the
    order they first matched."""
    group.members = dict(sorted(group.members.items(), key=lambda m: (m[1].first, m[0])))


def _describe(topic: str | None, index: int) -> str:
    return f"all[{index}]" + (f" {topic}" if topic else "")
