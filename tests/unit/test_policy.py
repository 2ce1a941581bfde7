"""Guard policy models: windows at fixed instants, budgets, breakers, blast radius, escalate.

Every ``Window.active`` check uses a fixed timestamp built from an ISO string
with its own offset, so the tests mean the same on any machine in any zone.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from loopd.config import load_config
from loopd.policy import (
    Approval,
    BlastRadius,
    Breaker,
    Budget,
    Escalate,
    Flapping,
    GlobalGuards,
    RuleGuards,
    Window,
)
from loopd.rules.model import Rule
from loopd.yamlfile import load as load_yaml


def at(text: str) -> float:
    """Epoch seconds of an ISO 8601 time with an explicit offset."""
    parsed = datetime.fromisoformat(text)
    assert parsed.tzinfo is not None, "give every test instant an offset"
    return parsed.timestamp()


# -- one-off windows ---------------------------------------------------------------------

def test_a_one_off_window_is_active_from_start_until_just_before_end() -> None:
    """A one-off window covers [start, end): its start instant is in, its end instant is out."""
    window = Window(start="2024-03-01T20:00:00Z", end="2024-03-02T02:00:00Z")
    assert not window.active(at("2024-03-01T19:59:59+00:00"))
    assert window.active(at("2024-03-01T20:00:00+00:00"))
    assert window.active(at("2024-03-02T01:59:59+00:00"))
    assert not window.active(at("2024-03-02T02:00:00+00:00"))


def test_a_one_off_window_without_offset_is_utc_and_one_with_offset_keeps_it() -> None:
    """Naive start/end times are UTC; an explicit offset is honoured."""
    naive = Window(start="2024-03-01T20:00:00", end="2024-03-01T21:00:00")
    paris = Window(start="2024-03-01T20:00:00+01:00", end="2024-03-01T21:00:00+01:00")
    instant = at("2024-03-01T20:30:00+00:00")  # 21:30 in Paris
    assert naive.active(instant)
    assert not paris.active(instant)
    assert paris.active(at("2024-03-01T19:30:00+00:00"))


# -- weekly windows ----------------------------------------------------------------------

def test_a_weekly_window_holds_on_its_days_between_from_and_to() -> None:
    """``days: [sat, sun], from 08:00 to 18:00`` holds weekend daytime only (to is exclusive)."""
    window = Window(days=["sat", "Sunday"], **{"from": "08:00"}, to="18:00")
    assert window.active(at("2024-01-06T08:00:00+00:00"))      # Saturday
    assert window.active(at("2024-01-07T17:59:00+00:00"))      # Sunday
    assert not window.active(at("2024-01-07T18:00:00+00:00"))  # Sunday, at `to`
    assert not window.active(at("2024-01-06T07:59:59+00:00"))  # Saturday, too early
    assert not window.active(at("2024-01-05T12:00:00+00:00"))  # Friday


def test_equal_from_and_to_cover_the_whole_day() -> None:
    """``from: "00:00", to: "00:00"`` holds all day long on its days, to midnight included."""
    window = Window(days=["sat", "sun"], **{"from": "00:00"}, to="00:00")
    assert window.active(at("2024-01-06T00:00:00+00:00"))
    assert window.active(at("2024-01-07T23:59:59+00:00"))
    assert not window.active(at("2024-01-08T00:00:00+00:00"))  # Monday
    assert not window.active(at("2024-01-05T23:59:59+00:00"))  # Friday


def test_a_window_without_days_holds_every_day() -> None:
    """A recurring window without ``days`` is a daily window."""
    window = Window(**{"from": "02:00"}, to="03:00")
    for day in range(1, 8):  # 2024-01-01 is a Monday: one instant on each weekday
        assert window.active(at(f"2024-01-0{day}T02:30:00+00:00"))
        assert not window.active(at(f"2024-01-0{day}T03:30:00+00:00"))


def test_an_overnight_window_belongs_to_the_day_it_starts() -> None:
    """``days: [fri], 22:00-06:00`` covers Friday night into Saturday morning, not Thursday's."""
    window = Window(days=["fri"], **{"from": "22:00"}, to="06:00")
    assert window.active(at("2024-01-05T22:00:00+00:00"))      # Friday evening
    assert window.active(at("2024-01-05T23:59:59+00:00"))
    assert window.active(at("2024-01-06T00:00:00+00:00"))      # Saturday morning
    assert window.active(at("2024-01-06T05:59:59+00:00"))
    assert not window.active(at("2024-01-06T06:00:00+00:00"))
    assert not window.active(at("2024-01-06T23:00:00+00:00"))  # Saturday evening
    assert not window.active(at("2024-01-05T05:00:00+00:00"))  # Friday morning: Thursday's
    assert not window.active(at("2024-01-05T12:00:00+00:00"))  # Friday noon


def test_a_weekly_window_is_read_in_its_own_timezone() -> None:
    """Days and hours are those of ``timezone``: Friday 23:30 UTC is Saturday in Paris."""
    window = Window(days=["sat", "sun"], **{"from": "00:00"}, to="23:59",
                    timezone="Europe/Paris")
    friday_utc = at("2024-01-05T23:30:00+00:00")  # 00:30 Saturday in Paris (UTC+1)
    assert window.active(friday_utc)
    assert not Window(days=["sat", "sun"], **{"from": "00:00"}, to="23:59").active(friday_utc)
    # in summer Paris is UTC+2: Sunday 22:30 UTC is already Monday there
    assert not window.active(at("2024-07-07T22:30:00+00:00"))
    assert window.active(at("2024-07-07T21:30:00+00:00"))


def test_an_overnight_window_wraps_in_its_timezone() -> None:
    """An overnight window in New York starts at 22:00 New York time, whatever UTC says."""
    window = Window(days=["mon"], **{"from": "22:00"}, to="02:00", timezone="America/New_York")
    assert window.active(at("2024-01-09T03:30:00+00:00"))      # Mon 22:30 in New York
    assert window.active(at("2024-01-09T06:30:00+00:00"))      # Tue 01:30 in New York
    assert not window.active(at("2024-01-09T07:30:00+00:00"))  # Tue 02:30 in New York
    assert not window.active(at("2024-01-08T23:00:00+00:00"))  # Mon 18:00 in New York


def test_unquoted_yaml_times_are_read_as_hours_and_minutes() -> None:
    """``from: 22:00`` unquoted (a YAML 1.1 base-60 integer) still means 22:00."""
    raw = load_yaml("days: [fri]\nfrom: 22:00\nto: 06:00\n")
    assert raw["from"] == 1320  # what the YAML parser hands over
    window = Window.model_validate(raw)
    assert (window.from_, window.to) == ("22:00", "06:00")
    assert window.active(at("2024-01-05T23:00:00+00:00"))


@pytest.mark.parametrize("spec, message", [
    ({}, "either one-off (start, end) or recurring"),
    ({"start": "2024-01-01T00:00:00Z", "end": "2024-01-02T00:00:00Z", "days": ["mon"],
      "from": "00:00", "to": "01:00"}, "either one-off (start, end) or recurring"),
    ({"start": "2024-01-01T00:00:00Z"}, "a one-off window needs start and end"),
    ({"from": "22:00"}, "a recurring window needs from and to"),
    ({"days": ["someday"], "from": "01:00", "to": "02:00"}, "unknown day(s) ['som']"),
    ({"from": "25:00", "to": "02:00"}, "hour must be in 0..23"),
    ({"from": "01:00", "to": "02:00", "timezone": "Mars/Olympus"},
     "unknown timezone 'Mars/Olympus'"),
    ({"from": "01:00", "to": "02:00", "until": "later"}, "Extra inputs are not permitted"),
])
def test_a_window_that_means_nothing_is_refused(spec: dict[str, Any], message: str) -> None:
    """Half a window, both kinds at once, unknown days, times or zones are validation errors."""
    with pytest.raises(ValidationError, match=re.escape(message)):
        Window.model_validate(spec)


def test_window_scoping_by_rule_and_group() -> None:
    """A global window applies to the rules and inventory groups it names, all when unset."""
    everything = Window(**{"from": "00:00"}, to="01:00")
    scoped = Window(**{"from": "00:00"}, to="01:00", rules=["restart-nginx"],
                    groups=["frontend"])
    assert everything.applies("any-rule", None)
    assert scoped.applies("restart-nginx", "frontend")
    assert not scoped.applies("restart-nginx", "backend")
    assert not scoped.applies("restart-nginx", None)
    assert not scoped.applies("other-rule", "frontend")


# -- limits ----------------------------------------------------------------------------

def test_durations_in_guards_accept_human_units() -> None:
    """Budget, breaker, flapping and approval durations read ``1h``, ``30m``, ``45s``."""
    assert Budget(count=3, per="1h").per == 3600.0
    breaker = Breaker(failures=3, within="1h", cool_off="30m")
    assert (breaker.within, breaker.cool_off, breaker.per) == (3600.0, 1800.0, "rule")
    assert Flapping(fixes=3, within="6h").within == 21600.0
    assert Approval(within="45s").within == 45.0
    assert Approval().within == 3600.0


@pytest.mark.parametrize("spec, message", [
    (("budget", {"count": -1, "per": "1h"}), "greater than or equal to 0"),
    (("budget", {"count": 1, "per": "soon"}), "bad duration"),
    (("breaker", {"failures": 0, "within": "1h", "cool_off": "1m"}),
     "greater than or equal to 1"),
    (("breaker", {"failures": 2, "within": "1h", "cool_off": "1m", "per": "host"}),
     "Input should be 'rule' or 'key'"),
    (("blast", {"max": "half"}), "max is a count or a percentage like '25%'"),
    (("blast", {"max": -1}), "max must be >= 0"),
    (("escalate", {}), "escalate needs exactly one of workflow or action"),
    (("escalate", {"workflow": "a.b", "action": "c.d"}),
     "escalate needs exactly one of workflow or action"),
])
def test_impossible_limits_are_refused(spec: tuple[str, dict[str, Any]], message: str) -> None:
    """Negative counts, unknown durations, bad percentages and ambiguous escalations fail."""
    models: dict[str, type[BaseModel]] = {"budget": Budget, "breaker": Breaker,
                                          "blast": BlastRadius, "escalate": Escalate}
    with pytest.raises(ValidationError, match=re.escape(message)):
        models[spec[0]].model_validate(spec[1])


@pytest.mark.parametrize("limit, members, allowed", [
    (2, 10, 2), (0, 10, 0), ("25%", 8, 2), ("25%", 10, 2), ("50%", 5, 2),
    ("25%", 3, 1), ("10%", 1, 1), ("100%", 7, 7), ("12.5%", 16, 2),
])
def test_blast_radius_limits_are_counts_or_percentages_of_the_group(
    limit: int | str, members: int, allowed: int,
) -> None:
    """A percentage rounds down but never below one entity; a count is used as it is."""
    assert BlastRadius(max=limit).limit(members) == allowed


# -- in rule files and loopd.yaml ---------------------------------------------------------

def test_a_rule_reads_its_modes_and_every_guard() -> None:
    """A rule's mode, approval, run mode and ``guards:`` block parse into typed models."""
    rule = Rule.model_validate(load_yaml("""
name: restart-nginx
on: {source: alertmanager, match: {labels.alertname: NginxDown}}
mode: approval
approval: {within: 15m}
run_mode: queued
max_queued: 3
guards:
  max_runs: {count: 10, per: 1h}
  max_runs_per_key: {count: 3, per: 1h}
  breaker: {failures: 3, within: 1h, cool_off: 30m, per: key}
  blast_radius: {max: "25%", group: frontend}
  flapping: {fixes: 3, within: 6h}
  maintenance:
    - {name: weekend, days: [sat, sun], from: "00:00", to: "23:59", timezone: Europe/Paris}
  escalate: {action: core.log, input: {message: "{{ rule }}: {{ reason }}"}}
run: {action: core.noop}
"""))
    assert (rule.mode, rule.approval.within, rule.run_mode, rule.max_queued) == (
        "approval", 900.0, "queued", 3)
    guards = rule.guards
    assert guards.max_runs == Budget(count=10, per=3600)
    assert guards.max_runs_per_key == Budget(count=3, per=3600)
    assert guards.breaker is not None and guards.breaker.per == "key"
    assert guards.blast_radius == BlastRadius(max="25%", group="frontend")
    assert guards.flapping == Flapping(fixes=3, within=21600)
    assert [w.name for w in guards.maintenance] == ["weekend"]
    assert guards.escalate is not None and guards.escalate.action == "core.log"


def test_a_rule_defaults_to_automatic_single_and_no_guards() -> None:
    """Without guard fields a rule is automatic, single, max_parallel 2, max_queued 10."""
    rule = Rule.model_validate({"name": "r", "run": {"action": "core.noop"}})
    assert (rule.mode, rule.run_mode, rule.max_parallel, rule.max_queued) == (
        "automatic", "single", 2, 10)
    assert rule.guards == RuleGuards()


@pytest.mark.parametrize("patch, message", [
    ({"mode": "dry"}, "Input should be 'automatic', 'approval' or 'shadow'"),
    ({"run_mode": "burst"}, "Input should be 'single', 'restart', 'queued' or 'parallel'"),
    ({"max_parallel": 0}, "greater than or equal to 1"),
    ({"guards": {"max_concurrent": 1}}, "Extra inputs are not permitted"),
])
def test_unknown_modes_and_guard_fields_are_refused(patch: dict[str, Any], message: str) -> None:
    """A misspelt mode or guard is an error, never silently ignored."""
    with pytest.raises(ValidationError, match=re.escape(message)):
        Rule.model_validate({"name": "r", "run": {"action": "core.noop"}, **patch})


def test_loopd_yaml_reads_global_guards_and_alertmanager(tmp_path: Path) -> None:
    """``guards:`` (fleet budget, blast radius, windows, escalate) and ``alertmanager:`` load."""
    path = tmp_path / "loopd.yaml"
    path.write_text("""
alertmanager: {url: "http://127.0.0.1:9093", refresh: 30s}
guards:
  max_runs: {count: 50, per: 1h}
  blast_radius: {max: "20%"}
  maintenance:
    - {name: freeze, start: 2024-12-20T00:00:00Z, end: 2025-01-02T00:00:00Z}
    - {name: backup, days: [sun], from: 01:00, to: 03:00, groups: [backend]}
  escalate: {action: core.log, input: {message: "{{ reason }}"}}
""")
    cfg = load_config(path)
    assert cfg.alertmanager is not None
    assert (cfg.alertmanager.url, cfg.alertmanager.refresh, cfg.alertmanager.timeout) == (
        "http://127.0.0.1:9093", 30.0, 5.0)
    assert cfg.guards.max_runs == Budget(count=50, per=3600)
    assert cfg.guards.blast_radius == BlastRadius(max="20%")
    freeze, backup = cfg.guards.maintenance
    assert freeze.active(at("2024-12-25T12:00:00+00:00"))
    assert (backup.from_, backup.to, backup.groups) == ("01:00", "03:00", ["backend"])
    assert load_config(tmp_path / "loopd.yaml").guards != GlobalGuards()
