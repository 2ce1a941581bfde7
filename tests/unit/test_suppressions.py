"""The guard a suppressed decision's reason names, and the log lines of suppressions."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from loopd.decide.suppressions import SuppressionLog
from loopd.decisions import decision_guard


@pytest.mark.parametrize(("reason", "guard"), [
    ("guard throttle: once within 600s (counted across replicas)", "throttle"),
    ("throttled: once within 600s (12s left)", "throttle"),
    ("throttled: 2 runs within 3600s (max 2)", "throttle"),
    ("for: held 14s of 30s", "for"),
    ("guard breaker: open until 2026-12-01T17:00:00Z", "breaker"),
    ("guard silence: silenced by 8c1f (rack move)", "silence"),
    ("guard resolved: a resolved alert never starts a run", "resolved"),
    ("guard: budget 3 runs per 1h used", "budget"),
    ("incident already open", None),
    ("queue full (5)", None),
    ("run.input: undefined variable (origin x)", None),
    ("would run action core.noop (shadow mode)", None),
    ("", None),
    (None, None),
])
def test_the_guard_is_read_from_the_reason(reason: str | None, guard: str | None) -> None:
    """Each stored form of a suppression names its guard; other reasons name none."""
    assert decision_guard(reason) == guard


def test_every_suppression_is_a_debug_line_and_the_summary_comes_once_a_minute() -> None:
    """One debug line per suppression; per rule and guard, the first is told at info at
    once, then one line a minute counts everything suppressed since the previous one."""
    now = [0.0]
    with capture_logs() as logs:
        log = SuppressionLog(clock=lambda: now[0])
        log.suppressed("disk", "db-1", "webhook", "e0", "throttle", "throttled: x")
        for n in range(1, 37):
            now[0] = float(n)
            log.suppressed("disk", "db-1", "webhook", f"e{n}", "throttle", "throttled: x")
        log.suppressed("disk", "db-2", "webhook", "b1", "budget", "guard budget: y")
        now[0] = 60.0
        log.suppressed("disk", "db-1", "webhook", "e37", "throttle", "throttled: x")
    debug = [e for e in logs if e["log_level"] == "debug"]
    assert len(debug) == 39
    assert debug[0] == {"event": "event suppressed", "log_level": "debug", "rule": "disk",
                        "key": "db-1", "source": "webhook", "event_id": "e0",
                        "guard": "throttle", "reason": "throttled: x"}
    assert [e["event"] for e in logs if e["log_level"] == "info"] == [
        "rule disk: 1 event(s) suppressed by throttle",
        "rule disk: 1 event(s) suppressed by budget",
        "rule disk: 37 event(s) suppressed by throttle in the last 60s",
    ]


def test_suppressions_after_a_summary_are_told_by_the_next_flush() -> None:
    """A burst that ends right after a summary is told once its minute has passed, by the
    periodic flush, not held back until some later suppression; nothing pending, nothing
    told."""
    now = [0.0]
    with capture_logs() as logs:
        log = SuppressionLog(clock=lambda: now[0])
        log.suppressed("disk", "db-1", "webhook", "e0", "throttle", "throttled: x")
        now[0] = 5.0
        for n in range(1, 4):
            log.suppressed("disk", "db-1", "webhook", f"e{n}", "throttle", "throttled: x")
        now[0] = 30.0
        log.flush()  # not a minute yet
        now[0] = 61.0
        log.flush()
        now[0] = 200.0
        log.flush()  # nothing new
    assert [e["event"] for e in logs if e["log_level"] == "info"] == [
        "rule disk: 1 event(s) suppressed by throttle",
        "rule disk: 3 event(s) suppressed by throttle in the last 61s",
    ]
