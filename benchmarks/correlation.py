"""Correlation rules for the ingest benchmark (issue 14): the same alerts and the same
number of rules, every tenth rule a correlation rule instead of a plain one.

Variants (``--correlation`` of benchmarks/ingest.py):

* ``none``: the plain corpus (benchmarks.common.write_rules), 1,000 plain rules.
* ``family``: the control for ``group``: its 100 rules matching what the group rules
  match (each a family of ten alert names), as plain rules (throttled, as the corpus's
  are). ``group`` against ``family`` is the cost of correlation itself; against ``none``
  it also counts the twice as many matches a family rule brings.
* ``group``: rule ``i`` with ``i % 10 == 9`` (100 of 1,000) is a group rule over the
  alert names of rules ``i-9 .. i`` (a family of ten names): key the alert's instance,
  ``group: {by: "{{ inventory[key].group }}", count: 3, within: 2m}``; every other one
  also ``inhibits`` the nine plain rules of its family. A matching alert of a family is
  seen by its plain rule and by the group rule (as a host alert in a storm is), so the
  inhibited matches are real; the group rule replaces the plain rule of name ``i``.
* ``mix``: the same 100 slots as 60 group rules, 20 ``absent: 5m`` rules and 20
  ``all`` rules (two conditions: the first five names of the family, the last five,
  ``within: 10m``).

The inventory puts the alerts' 200 hosts into four groups of 50 (both variants load it,
so the runs differ only in their rules).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from loopd.clock import WallClock
from loopd.decide.engine import Engine

VARIANTS = ("none", "family", "group", "mix")
GROUPS = ("frontend", "backend", "storage", "edge")
HOSTS = 200  # benchmarks.common.alerts' default
# the longest window of any correlation rule: past it, no state may remain
LONGEST_WINDOW_S = 600.0
CONDITION = "if: \"float(event.annotations.value) > 90\""


def kind_of(i: int, variant: str) -> str | None:
    """The correlation kind of rule ``i`` in ``variant``, None for a plain rule."""
    if variant == "none" or i % 10 != 9:
        return None
    if variant in ("group", "family"):
        return variant
    return ("group", "group", "group", "absent", "all")[(i // 10) % 5]


def _names(names: list[str]) -> str:
    return "[" + ", ".join(f"'{n}'" for n in names) + "]"


def _on(names: list[str]) -> str:
    return ("{source: alertmanager, match: {status: firing, labels.alertname: "
            f"{_names(names)}}}}}")


def correlated(variant: str) -> Callable[[int, list[str]], list[str] | None]:
    """The ``instead`` hook of benchmarks.common.write_rules for ``variant``."""

    def instead(i: int, names: list[str]) -> list[str] | None:
        kind = kind_of(i, variant)
        if kind is None:
            return None
        family = names[-10:]  # the names of rules i-9 .. i
        name = names[-1]
        key = "    key: \"{{ event.labels.instance }}\""
        if kind == "family":
            return [f"  - name: 'f{i}-{name}'", f"    on: {_on(family)}", f"    {CONDITION}",
                    key, "    throttle: {once_within: 10m}",
                    "    run: {action: core.noop, input: {host: \"{{ key }}\"}}"]
        if kind == "group":
            lines = [f"  - name: 'g{i}-{name}'", f"    on: {_on(family)}", f"    {CONDITION}",
                     key,
                     "    group: {by: \"{{ inventory[key].group }}\", count: 3, within: 2m}"]
            if (i // 10) % 2 == 1:
                plain = [f"r{j}-{n}" for j, n in zip(range(i - 9, i), family, strict=False)]
                lines.append(f"    inhibits: {_names(plain)}")
            return [*lines, "    run: {action: core.noop, input: {group: \"{{ key }}\","
                    " members: \"{{ members }}\"}}"]
        run = "    run: {action: core.noop, input: {host: \"{{ key }}\"}}"
        if kind == "absent":
            return [f"  - name: 'a{i}-{name}'", f"    on: {_on(family)}", f"    {CONDITION}",
                    key, "    absent: 5m", run]
        return [f"  - name: 'c{i}-{name}'", "    all:",
                f"      - {{on: {_on(family[:5])}, {CONDITION}}}",
                f"      - {{on: {_on(family[5:])}, {CONDITION}}}",
                key, "    within: 10m", run]

    return instead


def write_inventory(path: Path) -> Path:
    """The alerts' hosts in four groups, host ``n`` in group ``n % 4``."""
    entities = {f"host-{n}:9100": {"role": "node", "group": GROUPS[n % len(GROUPS)]}
                for n in range(HOSTS)}
    path.write_bytes(orjson.dumps({"entities": entities}))
    return path


class SkewedClock(WallClock):
    """The wall clock moved on by ``skew`` seconds: the phase after the storm jumps past
    every window instead of waiting ten minutes for it."""

    def __init__(self) -> None:
        self.skew = 0.0

    def now(self) -> float:
        return time.time() + self.skew

    async def sleep_until(self, when: float) -> None:
        await super().sleep_until(when - self.skew)

    async def wait(self, future: Any, until: float) -> bool:
        return await super().wait(future, until - self.skew)

    def timeout_at(self, when: float) -> Any:
        return super().timeout_at(when - self.skew)


def state(engine: Engine) -> dict[str, int]:
    """The correlation state's slots now, by kind, and the peak since start."""
    correlation = engine.correlation
    return {"groups": len(correlation.groups), "absences": len(correlation.absences),
            "partials": len(correlation.partials), "total": correlation.size(),
            "peak": correlation.peak}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per variant over the rounds, each variant's ratio to ``none`` and the
    correlation variants' to ``family`` (the same matches without correlation), by wall
    clock (``ratio_*``) and by the process's CPU time (``ratio_cpu_*``)."""
    out: dict[str, Any] = {"name": "ingest-correlation", "rounds": 0}
    medians: dict[str, float] = {}
    cpu_medians: dict[str, float] = {}
    for variant in VARIANTS:
        mine = [r for r in rows if r["correlation"] == variant]
        if not mine:
            continue
        out["rounds"] = max(out["rounds"], len(mine))
        rates = [float(r["events_per_s"]) for r in mine]
        cpu_rates = [float(r["events_per_cpu_s"]) for r in mine]
        medians[variant] = statistics.median(rates)
        cpu_medians[variant] = statistics.median(cpu_rates)
        entry: dict[str, Any] = {
            "events_per_s": [round(x) for x in rates], "median_events_per_s": round(
                medians[variant]),
            "events_per_cpu_s": [round(x) for x in cpu_rates],
            "median_events_per_cpu_s": round(cpu_medians[variant]),
            "p99_ms": [r["p99_ms"] for r in mine],
            "rss_mb": [r["rss_mb"] for r in mine]}
        if variant != "none":
            entry["state_peak"] = [r["state_storm"]["peak"] for r in mine]
            entry["state_after_storm"] = [r["state_storm"]["total"] for r in mine]
            entry["state_after_windows"] = [r["state_after"]["total"] for r in mine]
            entry["state_second_storm"] = [r["state_storm2"]["total"] for r in mine]
            entry["state_peak_after_second_storm"] = [r["state_storm2"]["peak"] for r in mine]
            entry["state_after_second_windows"] = [r["state_after2"]["total"] for r in mine]
        out[variant] = entry
    for suffix, by in (("", medians), ("_cpu", cpu_medians)):
        for variant, median in by.items():
            if variant != "none" and "none" in by:
                out[f"ratio{suffix}_{variant}"] = round(median / by["none"], 3)
            if variant in ("group", "mix") and "family" in by:
                out[f"ratio{suffix}_{variant}_to_family"] = round(median / by["family"], 3)
    return out


def decisions(db: Path) -> dict[str, int]:
    """Decisions recorded, by outcome (and by correlation guard, absences fired,
    inhibited matches decided again once their group closed, group incidents), read from
    the run's SQLite store after the daemon stopped."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT outcome, count(*) FROM decisions GROUP BY outcome")
        out = {outcome: int(n) for outcome, n in rows}
        for guard in ("inhibited", "group", "all"):
            (n,) = conn.execute("SELECT count(*) FROM decisions WHERE outcome = 'suppressed'"
                                " AND reason LIKE ?", (f"guard {guard}:%",)).fetchone()
            out[f"suppressed_{guard}"] = int(n)
        (n,) = conn.execute("SELECT count(*) FROM decisions WHERE event_id LIKE '%~absent'"
                            ).fetchone()
        out["absent_fired"] = int(n)
        (n,) = conn.execute("SELECT count(*) FROM decisions WHERE event_id LIKE '%~after-%'"
                            ).fetchone()
        out["decided_again_after_close"] = int(n)
        (n,) = conn.execute("SELECT count(*) FROM incidents WHERE rule LIKE 'g%'").fetchone()
        out["group_incidents"] = int(n)
    return out
