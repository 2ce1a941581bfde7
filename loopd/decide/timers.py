"""A rule's ``throttle`` compiled to per-key budgets, and the ``for:`` timers.

``throttle: {max: N, per: D}`` is the per-key budget ``guards.max_runs_per_key: {count:
N, per: D}`` under another name (and its own decision reason); ``once_within: D`` is
at most one run per D. Both count the same run starts (``Guards.key_starts``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from loopd import metrics
from loopd.policy import Budget
from loopd.rules.model import Throttle as ThrottleSpec


@dataclass(frozen=True, slots=True)
class Throttle:
    """Per-key budgets of one rule: ``once`` is max 1 per its window, ``most`` N per D."""

    once: Budget | None = None
    most: Budget | None = None


def compile_throttle(spec: ThrottleSpec | None) -> Throttle | None:
    if spec is None:
        return None
    once = Budget(count=1, per=spec.once_within) if spec.once_within is not None else None
    most = Budget(count=spec.max, per=spec.per) \
        if spec.max is not None and spec.per is not None else None
    return Throttle(once, most) if once or most else None


class ForTimers:
    """When the condition of a ``for:`` rule started to hold, per (rule, key).

    A timer ends when its condition stops holding or the rule acts; past ``max_keys``
    timers the oldest is forgotten (counted, logged once): forgetting one only makes its
    condition hold for the whole duration again, it never acts early.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        self._since: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.max_keys = max_keys
        self._warned = False
        # keys this engine changed since the last follow, and in the round before: its
        # change may not be in the store yet, so a store read must not undo it
        self._touched: set[tuple[str, str]] = set()
        self._touched_before: set[tuple[str, str]] = set()

    def load(self, rule: str, key: str, since: float) -> None:
        self._since[(rule, key)] = since
        self._bound()

    def replace(self, timers: list[tuple[str, str, float]]) -> None:
        """All timers anew, as the store has them (partitions moved between replicas)."""
        self._since.clear()
        for rule, key, since in sorted(timers, key=lambda t: t[2]):
            self.load(rule, key, since)

    def follow(self, stored: list[tuple[str, str, float]]) -> None:
        """The store's timers (every replica's), for the keys this engine did not change
        in the last two rounds (its own change may still be on its way to the store)."""
        protected = self._touched | self._touched_before
        self._touched_before, self._touched = self._touched, set()
        found = {(rule, key): since for rule, key, since in stored}
        for slot in [s for s in self._since if s not in found and s not in protected]:
            del self._since[slot]  # reset by another replica
        for slot, since in found.items():
            if slot not in protected and self._since.get(slot) != since:
                self._since[slot] = since
        self._bound()

    def hold(self, rule: str, key: str, now: float) -> tuple[float, bool]:
        """Record that the condition holds; return (since, newly started)."""
        since = self._since.get((rule, key))
        if since is None:
            self._since[(rule, key)] = now
            self._touched.add((rule, key))
            self._bound()
            return now, True
        return since, False

    def reset(self, rule: str, key: str) -> bool:
        """The condition no longer holds; True when a timer was running."""
        self._touched.add((rule, key))
        return self._since.pop((rule, key), None) is not None

    def __len__(self) -> int:
        return len(self._since)

    def _bound(self) -> None:
        if len(self._since) <= self.max_keys:
            return
        self._since.popitem(last=False)
        metrics.evicted("for_timers", 1, full=True)
        if not self._warned:
            self._warned = True
            metrics.memory_full("for_timers", self.max_keys,
                                "the oldest for: timers start again from the next event")
