"""What ``loopd simulate`` reports, as JSON (``--report FILE``) and as text, and its
progress line on stderr.

The report: events read (per source, duplicates recognised by id, out of time order,
outcome events fed back), the time span, per rule its matches, decisions per outcome and
suppressions per guard (the word a decision's ``reason`` starts with: ``for``,
``throttled``, ``guard <name>``), incidents, and runs with their simulated outcomes
(``fixed``, ``not_fixed``, ``inconclusive``, ``failed``, ``cancelled``) per workflow, with
the first runs (key, start, end) listed.

Group incidents (rules with ``group:``) are listed with their members and the matches
they inhibited, read from the simulation's store (kv ``members``, what the decision side
wrote), so it is the same data a daemon's ``GET /v1/incidents/{id}`` shows; times are
epoch seconds in the JSON, as everywhere in the report.
"""

from __future__ import annotations

import resource
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from prometheus_client import Counter as Metric

from loopd import metrics
from loopd.decisions import decision_guard
from loopd.events import Event
from loopd.runs import states
from loopd.store.base import DecisionRecord, IncidentRecord, RunRecord

if TYPE_CHECKING:
    from loopd.simulate.replay import Simulation

OUTCOMES = tuple(o.value for o in states.Outcome)
_ALL = 1 << 62  # "no limit" for the store's list queries
LATE_SHOWN = 5   # events out of time order named in the report
MEMBERS_KV = "members"  # group incident id -> its members (loopd.decide.correlation)
MEMBERS_SHOWN = 20  # members (and inhibited matches) named per group in the text report
WIDTH = 100  # the text report's lines of members wrap here


@dataclass(slots=True)
class Meter:
    """Bytes read so far from the event files (the readers add, the progress line reads)."""

    bytes: int = 0


def _samples(metric: Metric) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels.values()): s.value for family in metric.collect()
            for s in family.samples if s.name.endswith("_total")}


@dataclass
class Tally:
    """Counts gathered while the replay runs; ``report`` turns them into a Report."""

    first_n: int = 10
    out_of_order: int = 0
    # where the first events out of time order are (FILE:LINE), their time, the clock's
    late_first: list[dict[str, Any]] = field(default_factory=list)
    fed_back: int = 0
    ended_by_simulation: int = 0
    runs_created: int = 0
    first_time: float = float("inf")
    last_time: float = float("-inf")
    sources: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (rule, outcome)
    suppressed: Counter[tuple[str, str]] = field(default_factory=Counter)  # (rule, guard)
    examples: dict[str, str] = field(default_factory=dict)  # guard -> first reason
    finished: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    first: list[RunRecord] = field(default_factory=list)
    _duplicates: dict[tuple[str, ...], float] = field(default_factory=dict)
    _rule_errors: dict[tuple[str, ...], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the engine counts these in loopd's metrics; the report shows what this replay added
        self._duplicates = _samples(metrics.current().events_duplicate)
        self._rule_errors = _samples(metrics.current().rule_errors)

    def event(self, event: Event) -> None:
        self.sources[event.source] += 1
        when = event.time
        if when < self.first_time:
            self.first_time = when
        if when > self.last_time:
            self.last_time = when

    def late(self, event: Event, clock: float) -> None:
        """An event older than the clock: decided at the clock's time, counted, and the
        first few named (FILE:LINE) so the file can be sorted or fixed."""
        self.out_of_order += 1
        if len(self.late_first) < LATE_SHOWN:
            self.late_first.append({"origin": event.origin, "time": iso(event.time),
                                    "clock": iso(clock)})

    def decisions(self, decisions: list[DecisionRecord]) -> None:
        for d in decisions:
            self.outcomes[(d.rule, d.outcome)] += 1
            if d.outcome == "suppressed":
                guard = decision_guard(d.reason) or "unknown"
                self.suppressed[(d.rule, guard)] += 1
                if guard not in self.examples and d.reason:
                    self.examples[guard] = d.reason

    def run_created(self, run: RunRecord) -> None:
        self.runs_created += 1

    def run_finished(self, run: RunRecord) -> None:
        self.finished[(run.target, str(run.outcome or ""), str(run.status))] += 1
        first = self.first
        first.append(run)
        if len(first) > 4 * self.first_n:  # runs end out of order: keep the earliest started
            first.sort(key=_created)
            del first[self.first_n:]

    async def report(self, sim: Simulation, seconds: float, read: int) -> Report:
        incidents = await sim.store.list_incidents(limit=_ALL)
        by_rule: dict[str, dict[str, int]] = {}
        for inc in incidents:
            row = by_rule.setdefault(inc.rule, {"opened": 0, "open_at_end": 0, "events": 0})
            row["opened"] += 1
            row["events"] += inc.events
            row["open_at_end"] += inc.status == "open"
        rules: dict[str, dict[str, Any]] = {
            r.name: {"matches": sim.engine.matches.get(r.name, 0), "decisions": {},
                     "suppressions": {}} for r in sim.ruleset.rules}
        for (rule, outcome), n in sorted(self.outcomes.items()):
            rules.setdefault(rule, {"matches": 0, "decisions": {}, "suppressions": {}})
            rules[rule]["decisions"][outcome] = n
        for (rule, guard), n in sorted(self.suppressed.items()):
            rules[rule]["suppressions"][guard] = n
        for labels, value in _samples(metrics.current().rule_errors).items():
            added = int(value - self._rule_errors.get(labels, 0.0))
            if added and labels[0] in rules:
                rules[labels[0]]["errors"] = added
        duplicates = sum(int(v - self._duplicates.get(k, 0.0))
                         for k, v in _samples(metrics.current().events_duplicate).items())
        by_guard: Counter[str] = Counter()
        for (_, guard), n in self.suppressed.items():
            by_guard[guard] += n
        by_outcome: Counter[str] = Counter()
        by_status: Counter[str] = Counter()
        workflows: dict[str, dict[str, int]] = {}
        for (target, outcome, status), n in sorted(self.finished.items()):
            by_outcome[outcome] += n
            by_status[status] += n
            row = workflows.setdefault(target, dict.fromkeys(OUTCOMES, 0))
            row[outcome] = row.get(outcome, 0) + n
        decisions: Counter[str] = Counter()
        for (_, outcome), n in self.outcomes.items():
            decisions[outcome] += n
        first = sorted(self.first, key=_created)[: self.first_n]
        groups = await _groups(sim, incidents)
        span = (self.first_time, self.last_time) if read else (None, None)
        data: dict[str, Any] = {
            "events": {"read": read, "rejected": 0, "duplicates": duplicates,
                       "out_of_order": self.out_of_order,
                       "out_of_order_first": self.late_first, "fed_back": self.fed_back,
                       "by_source": dict(sorted(self.sources.items()))},
            "time": {"first": span[0], "last": span[1],
                     "seconds": (span[1] - span[0]) if read else 0.0,  # type: ignore[operator]
                     "simulated_until": sim.clock.now() if read else None},
            "rules": {"loaded": len(sim.ruleset.rules),
                      "errors": [str(e) for e in (*sim.registry.errors, *sim.ruleset.errors)],
                      "by_rule": rules},
            "decisions": dict(sorted(decisions.items())),
            "suppressions": {"by_guard": dict(by_guard.most_common()),
                             "examples": dict(sorted(self.examples.items()))},
            "incidents": {"opened": len(incidents),
                          "open_at_end": sum(i.status == "open" for i in incidents),
                          "by_rule": dict(sorted(by_rule.items()))},
            "groups": groups,
            "runs": {"created": self.runs_created, "finished": sum(self.finished.values()),
                     "ended_by_simulation": self.ended_by_simulation,
                     "by_outcome": {o: by_outcome.get(o, 0) for o in
                                    (*OUTCOMES, *sorted(set(by_outcome) - set(OUTCOMES)))},
                     "by_status": dict(sorted(by_status.items())),
                     "by_workflow": workflows,
                     "first": [_run_row(r) for r in first]},
            "wall": {"seconds": round(seconds, 3),
                     "events_per_s": round(read / seconds) if seconds > 0 else None,
                     "peak_rss_mb": round(
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
        }
        return Report(data)


async def _groups(sim: Simulation, incidents: list[IncidentRecord]) -> list[dict[str, Any]]:
    """The group incidents, oldest first, each with its members (in order of arrival)
    and the matches it inhibited, as the decision side stored them."""
    grouping = {r.name for r in sim.ruleset.rules if r.rule.group is not None}
    out = []
    for inc in sorted(incidents, key=lambda i: (i.opened, i.id)):
        if inc.rule not in grouping:
            continue
        value = await sim.store.kv_get(MEMBERS_KV, inc.id)
        stored = value if isinstance(value, dict) else {}
        members = [_member(m) for m in stored.get("members") or [] if isinstance(m, dict)]
        inhibited = [{k: i.get(k) for k in ("rule", "key", "count", "first", "last",
                                            "event_id", "source", "firing")}
                     for i in stored.get("inhibited") or [] if isinstance(i, dict)]
        out.append({"incident": inc.id, "rule": inc.rule, "key": inc.key,
                    "status": inc.status, "opened": inc.opened, "closed": inc.closed,
                    "run": inc.run_id, "outcome": inc.outcome,
                    "member_count": stored.get("member_count", len(members)),
                    "members": members,
                    "inhibited": inhibited,
                    "inhibited_matches": sum(int(i.get("count") or 0) for i in inhibited)})
    return out


def _member(m: dict[str, Any]) -> dict[str, Any]:
    """A stored member without its first event's data: key, first and last match, the
    event's id and source."""
    event = m.get("event")
    ref = event if isinstance(event, dict) else {"id": event}
    return {"key": m.get("key"), "time": m.get("time"), "last": m.get("last"),
            "event_id": ref.get("id"), "source": ref.get("source")}


def _created(run: RunRecord) -> tuple[float, str]:
    return (run.created, run.id)


def _run_row(run: RunRecord) -> dict[str, Any]:
    return {"id": run.id, "rule": run.rule, "key": run.key, "kind": run.kind,
            "workflow": run.target, "start": run.created, "end": run.finished,
            "status": run.status, "outcome": run.outcome, "reason": run.reason}


# -- rendering ---------------------------------------------------------------------------------


def iso(when: float | None) -> str:
    if when is None:
        return "-"
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else "",
             f"{minutes}m" if minutes else "", f"{secs}s" if secs or not seconds else ""]
    return " ".join(p for p in parts if p)


@dataclass
class Report:
    data: dict[str, Any]
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"files": self.files, **self.data}

    def render(self) -> str:
        d = self.data
        ev, span, rules, runs = d["events"], d["time"], d["rules"], d["runs"]
        out = [f"loopd simulate: {ev['read']:,} events from {len(self.files)} file(s) in "
               f"{d['wall']['seconds']:g}s ({d['wall']['events_per_s'] or 0:,} events/s)",
               f"  rejected {ev['rejected']}, duplicates {ev['duplicates']}, out of time order "
               f"{ev['out_of_order']}, outcome events fed back {ev['fed_back']}",
               *(f"  out of time order: {late['origin']} at {late['time']}, decided at "
                 f"{late['clock']}" for late in ev["out_of_order_first"]),
               f"  by source: {_pairs(ev['by_source']) or 'none'}",
               f"time: {iso(span['first'])} .. {iso(span['last'])} ({duration(span['seconds'])})"
               f", simulated until {iso(span['simulated_until'])}",
               f"rules: {rules['loaded']} loaded, {len(rules['errors'])} error(s)"]
        out += [f"  error: {e}" for e in rules["errors"]]
        width = max([len(n) for n in rules["by_rule"]] + [4])
        for name, row in rules["by_rule"].items():
            extra = f", {row['errors']} evaluation error(s)" if row.get("errors") else ""
            out.append(f"  {name:<{width}}  matches {row['matches']:,}: "
                       f"{_pairs(row['decisions']) or 'no decisions'}{extra}")
            if row["suppressions"]:
                out.append(f"  {'':<{width}}  suppressed by {_pairs(row['suppressions'])}")
        out.append(f"decisions: {_pairs(d['decisions']) or 'none'}")
        sup = d["suppressions"]
        if sup["by_guard"]:
            out.append("suppressions:")
            out += [f"  {guard:<14} {n:>8,}  e.g. {sup['examples'].get(guard, '')}"
                    for guard, n in sup["by_guard"].items()]
        inc = d["incidents"]
        out.append(f"incidents: {inc['opened']:,} opened, {inc['open_at_end']:,} open at the end")
        out += _render_groups(d.get("groups") or [])
        out.append(f"runs: {runs['created']:,} created, {runs['finished']:,} finished: "
                   f"{_pairs(runs['by_outcome']) or 'none'}")
        if runs["ended_by_simulation"]:
            out.append(f"  {runs['ended_by_simulation']} still running at the end were cancelled")
        if runs["by_workflow"]:
            width = max(len(w) for w in runs["by_workflow"])
            out.append(f"  {'workflow':<{width}}  " + " ".join(f"{o:>12}" for o in OUTCOMES))
            for wf, row in runs["by_workflow"].items():
                out.append(f"  {wf:<{width}}  " + " ".join(f"{row.get(o, 0):>12,}"
                                                           for o in OUTCOMES))
        if runs["first"]:
            out.append(f"first {len(runs['first'])} run(s):")
            for r in runs["first"]:
                out.append(f"  {iso(r['start'])} .. {iso(r['end'])}  {r['rule']}  "
                           f"key={r['key']}  {r['workflow']}  {r['outcome']} ({r['status']})")
        return "\n".join(out)


def _render_groups(groups: list[dict[str, Any]]) -> list[str]:
    if not groups:
        return []
    out = [f"group incidents: {len(groups)}"]
    for g in groups:
        state = "open at the end" if g["status"] == "open" else f"closed {iso(g['closed'])}"
        ran = f", run {g['run']} {g['outcome'] or ''}".rstrip() if g.get("run") else ""
        out.append(f"  {g['rule']}  {g['key']}: {g['member_count']} member(s), opened "
                   f"{iso(g['opened'])}, {state}{ran}")
        shown = g["members"][:MEMBERS_SHOWN]
        more = len(g["members"]) - len(shown)
        names = ", ".join(f"{m['key']}\xa0({iso(m['time'])})" for m in shown)
        out += _wrap(f"members: {names}{f', and {more} more' if more else ''}")
        by_rule: dict[str, list[dict[str, Any]]] = {}
        for i in g["inhibited"]:
            by_rule.setdefault(str(i["rule"]), []).append(i)
        for rule, rows in by_rule.items():
            shown_rows = rows[:MEMBERS_SHOWN]
            rest = len(rows) - len(shown_rows)
            matches = sum(int(i["count"] or 0) for i in rows)
            out += _wrap(f"held back {rule}: {matches:,} match(es) of {len(rows)} member(s): "
                         + ", ".join(f"{i['key']}" + (f" x{i['count']}" if i["count"] != 1
                                                      else "") for i in shown_rows)
                         + (f", and {rest} more" if rest else ""))
    return out


def _wrap(text: str) -> list[str]:
    """A long line of a group's members as lines of at most ``WIDTH``, indented."""
    # a no-break space keeps a member and its time on one line (textwrap breaks only at
    # ASCII whitespace)
    return [line.replace("\xa0", " ") for line in textwrap.wrap(
        text, WIDTH, initial_indent="    ", subsequent_indent="      ",
        break_on_hyphens=False)]


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items() if v)


# -- progress ---------------------------------------------------------------------------------


class Progress:
    """One line on stderr, redrawn in place (``\\r``): bytes read of the total, events/s,
    estimated time left. For a terminal only; the caller decides (``--no-progress``)."""

    def __init__(self, meter: Meter, total_bytes: int, stream: TextIO = sys.stderr,
                 interval: float = 0.25) -> None:
        self.meter = meter
        self.total = max(total_bytes, 1)
        self.stream = stream
        self.interval = interval
        self.started = time.monotonic()
        self._drawn = 0.0
        self._events = 0

    def __call__(self, events: int) -> None:
        self._events = events
        now = time.monotonic()
        if now - self._drawn < self.interval:
            return
        self._drawn = now
        elapsed = max(now - self.started, 1e-9)
        done = min(self.meter.bytes / self.total, 1.0)
        eta = elapsed * (1 - done) / done if done > 0 else 0.0
        bar = "#" * int(done * 24)
        self.stream.write(
            f"\r[{bar:<24}] {done:6.1%} {self.meter.bytes / 2**20:,.1f}/"
            f"{self.total / 2**20:,.1f} MiB  {events / elapsed:,.0f} events/s  "
            f"ETA {duration(eta)}   ")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        self._drawn = 0.0
        self(self._events)
        self.stream.write("\n")
        self.stream.flush()
