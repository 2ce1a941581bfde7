"""The latest telemetry per entity: what conditions read as ``telemetry[key]``."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from loopd import metrics
from loopd.events import Event

DEFAULT_TTL = 86400.0
DEFAULT_MAX_KEYS = 100_000


class Telemetry(OrderedDict[str, dict[str, Any]]):
    """entity key -> the latest value of every field its events carried.

    Fed by every event that has a ``key`` (Kafka record key, envelope ``key``);
    ``seen_at`` is the time of the latest event. A scraped sample (its ``series`` header
    set) feeds the one field it names instead, and the ``stale`` header of a target's
    ``up`` sample names the fields to forget. A dict underneath (an OrderedDict,
    least recently seen first), so the compiled conditions read it at dict speed.

    Bounded: a key not seen for ``ttl`` seconds (event time) is forgotten, and past
    ``max_keys`` the least recently seen key goes; both are counted in
    ``loopd_memory_evictions_total{what="telemetry"}``. A forgotten key reads as
    absent, as one never seen.
    """

    def __init__(self, *, ttl: float = DEFAULT_TTL, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        super().__init__()
        self.ttl = ttl
        self.max_keys = max_keys
        self._warned = False

    def observe(self, event: Event) -> None:
        key = event.key
        if key is None:
            return
        latest = self.get(key)
        if latest is None:
            latest = self[key] = {}
            if len(self) > self.max_keys:
                self._full()
        else:
            self.move_to_end(key)
        headers = event.headers
        series = headers.get("series")
        if series is None:
            latest.update(event.data)
        else:  # a scraped sample (loopd/sources/scrape.py): one field per series
            latest[series] = event.data.get("value")
            if series != "up":
                # a scrape adds a key with its first sample at most and ends with the
                # target's ``up``, which catches up with the expired keys for it
                latest["seen_at"] = event.time
                return
            stale = headers.get("stale")
            if stale:  # series gone from the target's last two scrapes
                for gone in stale.split("\n"):
                    latest.pop(gone, None)
        latest["seen_at"] = now = event.time
        self._expire(now)

    def _expire(self, now: float) -> None:
        # Two at most per event: one key added per event at most, so the expired ones at
        # the front are caught up with, and no event pays for a long sweep.
        expired = 0
        for _ in range(2):
            oldest = next(iter(self.values()))
            seen = oldest.get("seen_at")
            if not isinstance(seen, int | float) or now - seen <= self.ttl:
                break
            self.popitem(last=False)
            expired += 1
        metrics.evicted("telemetry", expired)

    def _full(self) -> None:
        self.popitem(last=False)
        metrics.evicted("telemetry", 1, full=True)
        if not self._warned:
            self._warned = True
            metrics.memory_full("telemetry", self.max_keys,
                                "conditions read the least recently seen keys as absent")
