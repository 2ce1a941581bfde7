"""Throttles (once_within, max per window) and ``for:`` timers, per (rule, key)."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from loopd.catalog.inventory import Inventory
from loopd.decide.guards import Guards
from loopd.decide.timers import ForTimers, compile_throttle
from loopd.policy import GlobalGuards
from loopd.rules.model import Throttle
from loopd.rules.model import Throttle as ThrottleSpec


class Throttles:
    """A rule's throttle as it runs: compiled to per-key budgets of the guards, which
    count the same run starts as ``guards.max_runs_per_key``."""

    def __init__(self) -> None:
        self.guards = Guards(GlobalGuards(), Inventory())

    def record(self, rule: str, key: str, when: float) -> None:
        self.guards.run_started(rule, key, when)

    def blocked(self, rule: str, key: str, spec: ThrottleSpec, now: float) -> str | None:
        throttle = compile_throttle(spec)
        assert throttle is not None
        return self.guards.throttled(rule, key, throttle, now)


def test_once_within_blocks_until_the_window_has_passed() -> None:
    """``once_within`` refuses a second run for the same key until the window is over."""
    throttles, rule = Throttles(), Throttle(once_within="10m")
    assert throttles.blocked("r", "web-1", rule, now=1000.0) is None
    throttles.record("r", "web-1", 1000.0)
    why = throttles.blocked("r", "web-1", rule, now=1000.0 + 599)
    assert why is not None and "once within 600s" in why and "(1s left)" in why
    assert throttles.blocked("r", "web-1", rule, now=1000.0 + 600) is None


def test_throttles_are_per_rule_and_key() -> None:
    """A run for one key (or one rule) never throttles another key (or rule)."""
    throttles, rule = Throttles(), Throttle(once_within=60)
    throttles.record("r", "web-1", 1000.0)
    assert throttles.blocked("r", "web-1", rule, now=1001.0) is not None
    assert throttles.blocked("r", "web-2", rule, now=1001.0) is None
    assert throttles.blocked("other", "web-1", rule, now=1001.0) is None


def test_max_per_window_counts_recent_runs_only() -> None:
    """``max: 2, per: 1h`` allows two runs in any hour and a third once the first is older."""
    throttles, rule = Throttles(), Throttle(max=2, per="1h")
    for t in (0.0, 100.0):
        assert throttles.blocked("r", "k", rule, now=t) is None
        throttles.record("r", "k", t)
    why = throttles.blocked("r", "k", rule, now=200.0)
    assert why == "throttled: 2 runs within 3600s (max 2)"
    assert throttles.blocked("r", "k", rule, now=3600.0 + 0.5) is None


@pytest.mark.parametrize("spec, message", [
    ({}, "needs once_within or max + per"),
    ({"max": 3}, "max and per go together"),
    ({"per": "1h"}, "needs once_within or max + per"),
    ({"max": 0, "per": "1h"}, "greater than or equal to 1"),
    ({"once_within": "later"}, "bad duration"),
])
def test_incomplete_throttles_are_refused(spec: dict[str, object], message: str) -> None:
    """A throttle that cannot mean anything is a validation error saying what is missing."""
    with pytest.raises(ValidationError, match=re.escape(message)):
        Throttle.model_validate(spec)


def test_for_timer_holds_from_the_first_time_and_resets() -> None:
    """A ``for:`` timer remembers when the condition started holding until it is reset."""
    timers = ForTimers()
    assert timers.hold("r", "k", 10.0) == (10.0, True)
    assert timers.hold("r", "k", 20.0) == (10.0, False)
    assert timers.hold("r", "other", 20.0) == (20.0, True)
    assert timers.reset("r", "k") is True
    assert timers.reset("r", "k") is False
    assert timers.hold("r", "k", 30.0) == (30.0, True)


def test_loaded_timers_continue_where_they_were() -> None:
    """A timer restored from the store keeps its original start time."""
    timers = ForTimers()
    timers.load("r", "k", 5.0)
    assert timers.hold("r", "k", 50.0) == (5.0, False)
