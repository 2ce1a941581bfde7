"""The log lines suppressed decisions leave (``loopd.decisions.decision_guard`` reads
the guard back out of a stored one's reason).

``SuppressionLog`` writes one ``debug`` line per suppression
(rule, key, source, event id, guard, reason), and at ``info`` a summary per rule and
guard at most once per ``interval`` (a minute): "rule X: 37 events suppressed by throttle
in the last 60s". The engine decides tens of thousands of events a second, so the debug
line is built only when debug is enabled, and the summary costs a dict lookup and a
clock read per suppression.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("loopd.decide")

SUMMARY_INTERVAL = 60.0


@dataclass(slots=True)
class _Window:
    count: int = 0  # suppressions since the last summary
    logged: float | None = None  # monotonic time of the last summary


class SuppressionLog:
    """The log lines of suppressions; ``clock`` is monotonic seconds (a parameter so a
    test can move it)."""

    def __init__(self, interval: float = SUMMARY_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}  # bounded: rules x guards
        # bound once, after loopd.logs configured the level: the lazy proxy would resolve
        # itself again on every call (half a microsecond)
        self._log = log.bind()
        self._debug = self._log.is_enabled_for(logging.DEBUG)

    def suppressed(self, rule: str, key: str | None, source: str, event_id: str,
                   guard: str, reason: str) -> None:
        if self._debug:
            self._log.debug("event suppressed", rule=rule, key=key, source=source,
                            event_id=event_id, guard=guard, reason=reason)
        window = self._windows.get((rule, guard))
        if window is None:
            window = self._windows[(rule, guard)] = _Window()
        window.count += 1
        now = self._clock()
        # leading edge: the first suppression is told at once, then at most one line per
        # interval, counting everything since the previous line (``flush`` tells the rest)
        if window.logged is None or now - window.logged >= self._interval:
            self._tell(rule, guard, window, now)

    def flush(self) -> None:
        """Tell the counts whose interval has passed since their last line: suppressions
        that came after a summary are not held back until the next one."""
        now = self._clock()
        for (rule, guard), window in self._windows.items():
            if window.count and window.logged is not None \
                    and now - window.logged >= self._interval:
                self._tell(rule, guard, window, now)

    async def run(self) -> None:
        """``flush`` once per interval, until cancelled (a daemon task)."""
        while True:
            await asyncio.sleep(self._interval)
            self.flush()

    def _tell(self, rule: str, guard: str, window: _Window, now: float) -> None:
        if window.logged is None:
            self._log.info(f"rule {rule}: {window.count} event(s) suppressed by {guard}",
                           rule=rule, guard=guard, suppressed=window.count)
        else:
            self._log.info(f"rule {rule}: {window.count} event(s) suppressed by {guard} in "
                           f"the last {now - window.logged:.0f}s", rule=rule, guard=guard,
                           suppressed=window.count, seconds=round(now - window.logged, 3))
        window.count = 0
        window.logged = now
