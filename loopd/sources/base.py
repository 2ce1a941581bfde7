"""The Source protocol and the supervisor that keeps every source alive.

Contract (every implementation passes ``tests/integration/source_contract.py``):

* ``run(emit)`` connects, then reads messages and awaits ``emit(delivery)``
  for each one, in order. ``emit`` blocks while the engine's queue is full:
  that is the backpressure, a source must not buffer around it.
* It returns or raises when the connection is lost; the supervisor then
  reconnects with exponential backoff. It never retries on its own.
* A message that cannot become an Event is *rejected*: counted with
  ``metrics.event_rejected``, logged with its origin, sent to the dead-letter
  destination if the source has one, and then acknowledged so it does not
  block the stream. It is never emitted and never silently dropped.
* ``connected`` is true between a successful connect and the loss of it.
* ``close()`` makes ``run`` return promptly and flushes acknowledgements
  (Kafka commits the offsets of everything decided so far).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

from loopd import metrics
from loopd.events import Delivery

Emit = Callable[[Delivery], Awaitable[None]]


class Source(Protocol):
    name: str

    @property
    def connected(self) -> bool: ...

    async def run(self, emit: Emit) -> None: ...

    async def close(self) -> None: ...


class StoppableSource:
    """Plumbing shared by sources without a connection of their own (push, sim):
    ``connected`` while ``run`` runs, ``close()`` makes it return."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._connected = False
        self._stop = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connected

    async def close(self) -> None:
        self._stop.set()


class Supervisor:
    """Runs one source forever: reconnect with backoff, report ``loopd_source_up``."""

    def __init__(
        self, source: Source, emit: Emit, *, min_backoff: float = 0.2, max_backoff: float = 30.0
    ) -> None:
        self.source = source
        self._emit = emit
        self._min = min_backoff
        self._max = max_backoff
        self._stopping = False

    async def run(self) -> None:
        delay = self._min
        name = self.source.name
        while not self._stopping:
            try:
                await self.source.run(self._emit)
                delay = self._min
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # supervised boundary: a source never takes loopd down
                metrics.source_failed(name, exc, retry_in=delay)
            finally:
                metrics.source_up(name, False)
            if self._stopping:
                break
            # jitter so several replicas do not reconnect in lockstep
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self._max)

    async def stop(self) -> None:
        self._stopping = True
        await self.source.close()
