"""A rule's ``throttle`` compiled to per-key budgets, and the ``for:`` timers.

``throttle: {max: N, per: D}`` is the per-key budget ``guards.max_runs_per_key: {count:
N, per: D}`` under another name (and its own decision reason); ``once_within: D`` is
at most one run per D. Both count the same run starts (``Guards.key_starts``).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """When the condition of a ``for:`` rule started to hold, per (rule, key)."""

    def __init__(self) -> None:
        self._since: dict[tuple[str, str], float] = {}

    def load(self, rule: str, key: str, since: float) -> None:
        self._since[(rule, key)] = since

    def hold(self, rule: str, key: str, now: float) -> tuple[float, bool]:
        """Record that the condition holds; return (since, newly started)."""
        since = self._since.get((rule, key))
        if since is None:
            self._since[(rule, key)] = now
            return now, True
        return since, False

    def reset(self, rule: str, key: str) -> bool:
        """The condition no longer holds; True when a timer was running."""
        return self._since.pop((rule, key), None) is not None
