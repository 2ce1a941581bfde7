"""Correlation as the operator sees it: a group incident's members and the matches it
inhibited, and what a rule correlates (its group, inhibitions, absence, all/any).

A group incident's members are stored by the decision side (loopd.decide.correlation) in
the store's kv, namespace ``members``, under the incident's id, in the transaction of the
decisions that change them, and kept after the incident closes; ``Control.members`` reads
that value. Every view of it (``GET /v1/incidents``, ``/v1/incidents/{id}``, a run's
story, the web UI, ``loopd show``, the ``loopd simulate`` report) goes through
``group_view`` here, so they show the same rows: times RFC 3339 (``units.rfc3339``),
members in order of arrival, inhibited matches by rule and key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from loopd.control import Control
from loopd.rules.loader import RuleSet
from loopd.rules.model import Condition, Rule
from loopd.store.base import IncidentRecord
from loopd.units import rfc3339, seconds


def _time(value: Any) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return rfc3339(float(value))
    return value if isinstance(value, str) else None


def _event_ref(member: dict[str, Any]) -> tuple[str | None, str | None]:
    """(event id, source) of a member's first event: the stored member carries the event
    as a dict (id, source, topic, key, time, data), or as its id alone."""
    event = member.get("event")
    if isinstance(event, dict):
        ident, source = event.get("id"), event.get("source")
        return (str(ident) if ident is not None else None,
                str(source) if source is not None else None)
    ident = member.get("event_id", event)
    source = member.get("source")
    return (str(ident) if ident is not None else None,
            str(source) if source is not None else None)


def member_view(member: dict[str, Any]) -> dict[str, Any]:
    """One member: its key, when it first and last matched, its first event's id and
    source."""
    event_id, source = _event_ref(member)
    return {"key": member.get("key"), "time": _time(member.get("time")),
            "last": _time(member.get("last", member.get("time"))),
            "event_id": event_id, "source": source}


def inhibited_view(row: dict[str, Any]) -> dict[str, Any]:
    """One (rule, member) the group held back: how many matches, the last one's time."""
    return {"rule": row.get("rule"), "key": row.get("key"), "count": row.get("count", 0),
            "last": _time(row.get("last"))}


def group_view(value: dict[str, Any] | None) -> dict[str, Any]:
    """``members``, ``member_count`` and ``inhibited`` of a stored members value (empty
    lists for an incident that is no group's)."""
    if not isinstance(value, dict):
        return {"members": [], "member_count": 0, "inhibited": []}
    members = [member_view(m) for m in value.get("members") or [] if isinstance(m, dict)]
    inhibited = [inhibited_view(i) for i in value.get("inhibited") or [] if isinstance(i, dict)]
    # the row lists at most 1,000 members and counts them all
    count = value.get("member_count")
    return {"members": members,
            "member_count": count if isinstance(count, int) else len(members),
            "inhibited": inhibited}


def group_rules(ruleset: RuleSet) -> frozenset[str]:
    """The names of the loaded rules that group their matches into one incident."""
    return frozenset(r.name for r in ruleset.rules if r.rule.group is not None)


async def groups_of(control: Control, incidents: Iterable[IncidentRecord]
                    ) -> dict[str, dict[str, Any]]:
    """incident id -> ``group_view`` for the incidents of group rules: one kv read each,
    and none at all for the incidents of other rules (a list of a thousand ordinary
    incidents costs no extra read)."""
    grouping = group_rules(control.ruleset)
    found: dict[str, dict[str, Any]] = {}
    for incident in incidents:
        if incident.rule in grouping:
            value = await control.members(incident.id)
            if value is not None:
                found[incident.id] = group_view(value)
    return found


def _condition(c: Condition) -> dict[str, Any]:
    return {"source": c.on.source, "topic": c.on.topic, "match": dict(c.on.match),
            "if": c.if_}


def correlation_of(rule: Rule) -> dict[str, Any] | None:
    """What ``rule`` correlates, as ``GET /v1/rules`` and the rules page show it (durations
    in seconds): ``group`` (by, count, within), ``inhibits``, ``absent``, ``all`` (its
    conditions, ``within``) or ``any`` (its conditions); None for an ordinary rule."""
    shown: dict[str, Any] = {}
    if rule.group is not None:
        shown["group"] = {"by": rule.group.by, "count": rule.group.count,
                          "within": seconds(rule.group.within)}
    if rule.inhibits:
        shown["inhibits"] = list(rule.inhibits)
    if rule.absent is not None:
        shown["absent"] = seconds(rule.absent)
    if rule.all is not None:
        shown["all"] = [_condition(c) for c in rule.all]
        shown["within"] = seconds(rule.within)
    if rule.any is not None:
        shown["any"] = [_condition(c) for c in rule.any]
    return shown or None
