"""A simulated fleet for ``loopd demo``: hosts whose services degrade and recover.

The fleet is a source: every ``interval`` it emits one telemetry event per
host and service (topic ``telemetry/<host>/<service>``, data ``{status,
latency_ms, host, service}``). Faults are scheduled in the config: at ``at``
seconds after start a service degrades; restarting it (the ``sim`` pack's
``restart_service`` action) brings it back after ``recovery`` seconds unless
the fault is ``stuck``, which no restart fixes.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from loopd import metrics
from loopd.config import SimSourceConfig
from loopd.events import Delivery, Event
from loopd.sources.base import Emit, StoppableSource


@dataclass(slots=True)
class Service:
    host: str
    name: str
    degraded_since: float | None = None
    stuck: bool = False
    recovers_at: float | None = None
    restarts: int = 0
    history: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "ok" if self.degraded_since is None else "degraded"


class Fleet:
    """The simulated hosts; the sim pack's actions act on it through ``ctx.services``."""

    def __init__(self, config: SimSourceConfig) -> None:
        self.config = config
        self.services = {(h, s): Service(h, s) for h in config.hosts for s in config.services}
        self.started = time.monotonic()
        self._pending = sorted(config.faults, key=lambda f: f.at)
        self._rng = random.Random(7)

    def tick(self, now: float) -> None:
        elapsed = now - self.started
        while self._pending and self._pending[0].at <= elapsed:
            fault = self._pending.pop(0)
            svc = self.services.get((fault.host, fault.service))
            if svc is not None and svc.degraded_since is None:
                svc.degraded_since, svc.stuck = now, fault.stuck
                svc.history.append(f"{elapsed:5.1f}s degraded{' (stuck)' if fault.stuck else ''}")
        for svc in self.services.values():
            if svc.recovers_at is not None and now >= svc.recovers_at:
                svc.degraded_since = svc.recovers_at = None
                svc.history.append(f"{now - self.started:5.1f}s recovered")

    def restart(self, host: str, service: str) -> dict[str, object]:
        svc = self.services.get((host, service))
        if svc is None:
            raise KeyError(f"{host} has no service {service}")
        now = time.monotonic()
        svc.restarts += 1
        svc.history.append(f"{now - self.started:5.1f}s restarted")
        if svc.degraded_since is not None and not svc.stuck:
            svc.recovers_at = now + self.config.recovery
        return {"host": host, "service": service, "restarts": svc.restarts,
                "was": svc.status}

    def telemetry(self) -> list[Event]:
        now = time.time()
        out = []
        for (host, name), svc in self.services.items():
            bad = svc.degraded_since is not None
            latency = self._rng.uniform(800, 2500) if bad else self._rng.uniform(20, 60)
            out.append(Event(
                id=f"sim-{host}-{name}-{now:.3f}", source=self.config.name,
                topic=f"telemetry/{host}/{name}", key=f"{host}/{name}", time=now,
                data={"host": host, "service": name, "status": svc.status,
                      "latency_ms": round(latency, 1)},
                origin=f"sim {host}/{name}"))
        return out

    @property
    def done(self) -> bool:
        """Every scheduled fault happened and nothing is waiting to recover."""
        return not self._pending and all(s.recovers_at is None for s in self.services.values())


class SimSource(StoppableSource):
    """The Source protocol over a Fleet: connected while it runs."""

    def __init__(self, config: SimSourceConfig, fleet: Fleet) -> None:
        super().__init__(config.name)
        self.fleet = fleet
        self.interval = config.interval

    async def run(self, emit: Emit) -> None:
        self._connected = True
        metrics.source_up(self.name, True)
        try:
            while not self._stop.is_set():
                self.fleet.tick(time.monotonic())
                for event in self.fleet.telemetry():
                    metrics.event_received(self.name)
                    await emit(Delivery(event))
                try:
                    async with asyncio.timeout(self.interval):
                        await self._stop.wait()
                except TimeoutError:
                    pass
        finally:
            self._connected = False
