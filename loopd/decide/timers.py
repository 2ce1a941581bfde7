"""Per-(rule, key) memory of when runs started, and the ``for:`` timers."""

from __future__ import annotations

from loopd.rules.model import Throttle

_KEEP = 256  # starts remembered per (rule, key): more than any sane max-per-window


class Throttles:
    """Run start times per (rule, key); answers "may another run start now?"."""

    def __init__(self) -> None:
        self._starts: dict[tuple[str, str], list[float]] = {}

    def record(self, rule: str, key: str, when: float) -> None:
        starts = self._starts.get((rule, key))
        if starts is None:
            self._starts[(rule, key)] = [when]
            return
        starts.append(when)
        if len(starts) > _KEEP:
            del starts[: len(starts) - _KEEP]

    def blocked(self, rule: str, key: str, throttle: Throttle, now: float) -> str | None:
        """None when a run may start, else why not (for the decision record)."""
        starts = self._starts.get((rule, key))
        if not starts:
            return None
        if throttle.once_within is not None and now - starts[-1] < throttle.once_within:
            left = throttle.once_within - (now - starts[-1])
            return f"throttled: once within {throttle.once_within:g}s ({left:.0f}s left)"
        if throttle.max is not None and throttle.per is not None:
            window_start = now - throttle.per
            recent = sum(1 for t in starts if t >= window_start)
            if recent >= throttle.max:
                return f"throttled: {recent} runs within {throttle.per:g}s (max {throttle.max})"
        return None


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
