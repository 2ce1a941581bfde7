"""The latest telemetry per entity: what conditions read as ``telemetry[key]``."""

from __future__ import annotations

from typing import Any

from loopd.events import Event


class Telemetry(dict[str, dict[str, Any]]):
    """entity key -> the latest value of every field its events carried.

    Fed by every event that has a ``key`` (Kafka record key, envelope ``key``);
    ``seen_at`` is the time of the latest event. A plain dict underneath, so the
    compiled conditions read it at dict speed.
    """

    def observe(self, event: Event) -> None:
        key = event.key
        if key is None:
            return
        latest = self.get(key)
        if latest is None:
            latest = self[key] = {}
        latest.update(event.data)
        latest["seen_at"] = event.time
