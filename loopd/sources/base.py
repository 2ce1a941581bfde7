"""The Source protocol and the supervisor that keeps every source alive.

Contract (every implementation passes ``tests/integration/test_source_contract.py``,
run under the ``Supervisor`` below):

* ``run(emit)`` connects, then reads messages and awaits ``emit(delivery)``
  for each one, in order. A delivery is ``Delivery(event, ack)`` with a
  normalized ``loopd.events.Event``: a non-empty ``id`` (from the message or
  its envelope, else generated and unique), ``source`` = the source's name,
  the message's ``topic`` and ``key`` (None when it has none), ``time`` in
  epoch seconds (float), ``data`` a dict, and ``origin`` naming where the
  message came from. ``emit`` blocks while the engine's queue is full: that
  is the backpressure, a source must not buffer around it. A source that reads
  messages in batches (kafka) may hand a batch over with ``offer_of(emit)`` first:
  what fits is handed over at once, in order, and ``emit`` waits for the rest.
* The engine calls ``ack()`` once the decision about the event is durable;
  a second call changes nothing. A message counts as consumed only then:
  - kafka: offsets are committed up to the first unacked record, so an
    unacked record is redelivered to the group's next consumer (restart,
    rebalance);
  - webhook, alertmanager: the HTTP request is answered 2xx only once every
    accepted event in it is acked (else 503 after the decision timeout; a
    retry is de-duplicated by event id);
  - mqtt: the PUBACK of a QoS 1 message is sent then (in arrival order), so an
    unacked message is redelivered when the persistent session reconnects; QoS 0
    has nothing to ack (see ``sources/mqtt.py``);
  - sim: a no-op; the fleet makes fresh telemetry every interval.
* It returns or raises when the connection is lost; the supervisor then
  reconnects with exponential backoff. It never retries on its own.
* A message that cannot become an Event is *rejected*: counted with
  ``metrics.event_rejected``, logged with its origin, sent to the dead-letter
  destination if the source has one, and then acknowledged so it does not
  block the stream. It is never emitted, never silently dropped, and the
  messages after it are read as usual.
* ``connected`` is true between a successful connect and the loss of it.
* ``on_assigned`` (optional, set by whoever wires the source before ``run``; None:
  nothing to call): a source whose broker moves a share of the stream between replicas
  awaits it when this replica is given a share it did not have (kafka: a rebalance
  assigned partitions this consumer did not own just before, including the first
  assignment of every connection), *before* the first message of that share is emitted,
  so the engine can rebuild its caches for the keys that moved from the store (its
  ``for:`` timers; throttles and recent event ids need no rebuild: the store checks
  them in every commit). An error out of it counts as a lost
  connection (the source raises, the supervisor reconnects, the hook runs again). Sources
  without partitions never call it (mqtt shared subscriptions spread messages, not keys).
* ``close()`` makes ``run`` return promptly (seconds, whatever it is waiting
  on) and flushes acknowledgements (Kafka commits the offsets of everything
  decided so far); ``run`` on a closed source returns at once.
  ``Supervisor.stop()`` closes the source and ends a backoff wait at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import structlog

from loopd import metrics
from loopd.events import Delivery

log = structlog.get_logger("loopd.sources")

Emit = Callable[[Delivery], Awaitable[None]]
# ``emit.offer(deliveries, start)``, where the emit has it (the daemon's does): hand over
# at once, without waiting, as many of ``deliveries[start:]`` as the engine's queue has
# room for, in order; how many. A source holding a batch calls it first and ``emit``
# for the next one when it returned short (that await is the backpressure).
Offer = Callable[[list[Delivery], int], int]


def offer_of(emit: Emit) -> Offer | None:
    """The ``offer`` of ``emit``, None when it has none (a test's ``queue.put``)."""
    offer: Offer | None = getattr(emit, "offer", None)
    return offer


# awaited when the broker gives this replica a share of the stream it did not have
OnAssigned = Callable[[], Awaitable[None]]


class Source(Protocol):
    name: str
    on_assigned: OnAssigned | None

    @property
    def connected(self) -> bool: ...

    async def run(self, emit: Emit) -> None: ...

    async def close(self) -> None: ...


class StoppableSource:
    """Plumbing shared by sources without a connection of their own (push, sim):
    ``connected`` while ``run`` runs, ``close()`` makes it return; nothing is ever
    reassigned to them, so ``on_assigned`` is never called."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.on_assigned: OnAssigned | None = None
        self._connected = False
        self._stop = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connected

    async def close(self) -> None:
        self._stop.set()


class Supervisor:
    """Runs one source forever: reconnect with backoff, report ``loopd_source_up``.

    Only ``stop()`` or a cancellation of the supervisor's own task ends it. A
    ``CancelledError`` that comes out of ``source.run`` while nobody cancelled this task
    (aiokafka's fetcher lets one out of ``consumer.stop()`` after a broker outage) is a
    failure of the source like any other: logged, backed off, reconnected. A supervisor
    that ends any other way logs an error; ``failed`` then stays true.
    """

    def __init__(
        self, source: Source, emit: Emit, *, min_backoff: float = 0.2, max_backoff: float = 30.0
    ) -> None:
        self.source = source
        self._emit = emit
        self._min = min_backoff
        self._max = max_backoff
        self._stopping = asyncio.Event()
        self.failed = False

    async def run(self) -> None:
        name = self.source.name
        ended_by: BaseException | None = None
        try:
            await self._loop(name)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                ended_by = RuntimeError("cancelled from inside, not by its owner")
            raise
        except BaseException as exc:
            ended_by = exc
            raise
        finally:
            metrics.source_up(name, False)
            if ended_by is not None and not self._stopping.is_set():
                self.failed = True
                # an error that shows: loopd_source_up stays 0 and /readyz false (the
                # source is not connected), and this says why
                log.error("source supervisor ended; the source stays down until restart",
                          source=name, error=f"{type(ended_by).__name__}: {ended_by}")

    async def _loop(self, name: str) -> None:
        delay = self._min
        task = asyncio.current_task()
        while not self._stopping.is_set():
            try:
                await self.source.run(self._emit)
                delay = self._min
            except asyncio.CancelledError as exc:
                if task is None or task.cancelling():
                    raise  # our own cancellation: the daemon is stopping
                # a stray cancellation out of the source's library, not asked for by anyone
                metrics.source_failed(name, exc, retry_in=delay)
            except Exception as exc:  # supervised boundary: a source never takes loopd down
                metrics.source_failed(name, exc, retry_in=delay)
            finally:
                metrics.source_up(name, False)
            # jitter so several replicas do not reconnect in lockstep; stop() cuts it short
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay * (0.5 + random.random() / 2)):
                    await self._stopping.wait()
            delay = min(delay * 2, self._max)

    async def stop(self) -> None:
        self._stopping.set()
        await self.source.close()


async def until_closed(work: Coroutine[Any, Any, None], closed: asyncio.Event,
                       name: str) -> None:
    """Run ``work`` in a task of its own until it ends (its error raised) or ``closed`` is
    set (it is cancelled, and this returns): so ``close()`` ends a source's work at any
    await, a connect to a dead broker or an emit blocked on a full engine queue included."""
    task = asyncio.create_task(work, name=f"loopd source {name}")
    stop = asyncio.create_task(closed.wait(), name=f"loopd close {name}")
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        task.cancel()
        await asyncio.gather(task, stop, return_exceptions=True)
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error


def replica_name(replica: str | None) -> str:
    """``replica``, or when None the process's own name (``LOOPD_REPLICA``, else the host
    name), the one the store writes under; the wiring passes the store's."""
    if replica is not None:
        return replica
    from loopd.store.sqlite import default_replica  # one definition of the default

    return default_replica()
