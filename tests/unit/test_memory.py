"""Memory per entity key is bounded: telemetry, throttle and for: timers forget what has
passed first, and what the maximum forces out is counted."""

from __future__ import annotations

from loopd import metrics
from loopd.catalog.inventory import Inventory
from loopd.catalog.telemetry import Telemetry
from loopd.decide.guards import Guards
from loopd.decide.timers import ForTimers, Throttle
from loopd.events import Event
from loopd.policy import Budget, GlobalGuards


def evictions(what: str, reason: str) -> float:
    return metrics.current().registry.get_sample_value(
        "loopd_memory_evictions_total", {"what": what, "reason": reason}) or 0.0


def ev(key: str, at: float) -> Event:
    return Event(id=f"{key}@{at}", source="telemetry", topic="cpu", data={"cpu": 1},
                 key=key, time=at)


def test_telemetry_forgets_keys_not_seen_for_the_ttl() -> None:
    """A key whose latest event is older than the TTL is forgotten; one seen again is kept."""
    before = evictions("telemetry", "expired")
    telemetry = Telemetry(ttl=60, max_keys=1000)
    telemetry.observe(ev("a", 0))
    telemetry.observe(ev("b", 10))
    telemetry.observe(ev("a", 50))  # a seen again: b is now the least recent
    telemetry.observe(ev("c", 100))  # b (90 s ago) has expired, a (50 s) has not
    assert sorted(telemetry) == ["a", "c"]
    assert telemetry["a"]["seen_at"] == 50
    assert evictions("telemetry", "expired") - before == 1


def test_telemetry_past_its_maximum_drops_the_least_recently_seen() -> None:
    """100,000 distinct keys through a telemetry bounded at 1,000 keep 1,000, all counted."""
    before = evictions("telemetry", "full")
    telemetry = Telemetry(ttl=1e9, max_keys=1000)
    for i in range(100_000):
        telemetry.observe(ev(f"host-{i}", float(i)))
    assert len(telemetry) == 1000
    assert "host-99999" in telemetry and "host-98999" not in telemetry
    assert evictions("telemetry", "full") - before == 99_000


def test_throttle_memory_of_passed_windows_is_forgotten_first() -> None:
    """Keys whose throttle window has passed go before any key still inside its window."""
    guards = Guards(GlobalGuards(), Inventory(), max_keys=2000)
    guards.set_windows({"slow": 3600.0, "fast": 60.0})
    throttle = Throttle(once=Budget(count=1, per=3600.0))
    guards.run_started("slow", "kept", 0.0)
    before, forced = evictions("throttle", "expired"), evictions("throttle", "full")
    for i in range(3000):  # a burst of distinct keys of a rule with a short window
        guards.run_started("fast", f"k{i}", float(i))
    assert len(guards.key_starts) <= 2000
    assert evictions("throttle", "full") == forced  # nothing in its window was forced out
    assert evictions("throttle", "expired") - before > 0
    # the key inside its hour is still throttled
    assert guards.throttled("slow", "kept", throttle, 3000.0) is not None


def test_throttle_memory_forced_out_by_the_maximum_is_counted() -> None:
    """When every key is still inside its window, the maximum forces the least recent out
    and every one forced out is counted as ``full``."""
    guards = Guards(GlobalGuards(), Inventory(), max_keys=1000)
    guards.set_windows({"slow": 1e9})
    before = evictions("throttle", "full")
    for i in range(10_000):
        guards.run_started("slow", f"k{i}", float(i))
    assert len(guards.key_starts) <= 1000
    assert evictions("throttle", "full") - before == 10_000 - len(guards.key_starts)
    assert guards.key_starts.get(("slow", "k9999")) == [9999.0]


def test_for_timers_are_bounded_and_the_oldest_go() -> None:
    """Past the maximum the oldest for: timer is forgotten; the newest are kept."""
    timers = ForTimers(max_keys=10)
    for i in range(25):
        timers.hold("hot", f"k{i}", float(i))
    assert len(timers) == 10
    assert timers.hold("hot", "k24", 99.0) == (24.0, False)
    assert timers.hold("hot", "k0", 99.0) == (99.0, True)
