"""The time workflows run on: the wall clock in the daemon, a virtual one in a simulation.

Every instant a workflow waits for (a task's ``delay``, a retry's ``not_before``, a
confirmation's deadline and query interval, an approval's expiry, a task's ``timeout``,
the run's overall ``timeout``) is an epoch instant in ``run.progress`` and is awaited
through a ``Clock``, never through ``asyncio.sleep``/``call_later`` directly, so the same
runner replays recorded events with event time as the clock (``loopd simulate``).

Contract (both implementations pass ``tests/unit/test_clock.py``):

* ``now()`` is epoch seconds.
* ``sleep_until(when)`` returns once ``now() >= when``; at once, without yielding, when
  that already holds.
* ``wait(future, until)`` waits for ``future`` until the instant ``until``; True when the
  future is done (also when it completed in the same turn the deadline passed), False
  when the deadline came first. It never cancels ``future``.
* ``timeout_at(when)`` is an ``async with`` block that is cancelled at ``when`` and then
  raises ``TimeoutError``, like ``asyncio.timeout_at`` (a deadline already past cancels it
  at its first suspension).
* Cancelling a waiting coroutine leaves no timer behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep_until(self, when: float) -> None: ...

    async def wait(self, future: asyncio.Future[Any], until: float) -> bool: ...

    def timeout_at(self, when: float) -> AbstractAsyncContextManager[object]: ...


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class WallClock:
    """``time.time()`` and the event loop's timers; what the daemon runs on."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, when: float) -> None:
        delay = when - time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def wait(self, future: asyncio.Future[Any], until: float) -> bool:
        if future.done():
            return True
        left = until - time.time()
        if left <= 0:
            return False
        # one future and one timer handle per waiter: no extra task or coroutine, so
        # 10,000 waiting runs stay cheap
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()
        handle = loop.call_later(left, _wake, wake)

        def on_done(_: asyncio.Future[Any]) -> None:
            _wake(wake)

        future.add_done_callback(on_done)
        try:
            await wake
        finally:
            handle.cancel()
            future.remove_done_callback(on_done)
        return future.done()

    def timeout_at(self, when: float) -> AbstractAsyncContextManager[object]:
        loop = asyncio.get_running_loop()
        # persisted instants are wall-clock; the loop's timers run on its monotonic clock
        return asyncio.timeout_at(loop.time() + (when - time.time()))


class VirtualClock:
    """Time that moves only when ``advance(to)`` is called (simulation, tests).

    Timers are kept in a heap; ``advance`` wakes those due in deadline order. ``blocked``
    counts the coroutines waiting in ``sleep_until``/``wait`` and ``changes`` counts every
    time one starts or stops waiting, so a driver can tell when the system is quiescent:
    nothing left to do until the clock moves or an event arrives.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.blocked = 0
        self.changes = 0

    def now(self) -> float:
        return self._now

    def next_deadline(self) -> float | None:
        """The earliest instant a pending timer is due, None when there is none."""
        timers = self._timers
        while timers and timers[0][2].done():  # cancelled waits leave their entry behind
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def pending(self) -> int:
        """Timers not yet due (deadlines of waits, sleeps and timeouts)."""
        return sum(1 for _, _, fut in self._timers if not fut.done())

    def advance(self, to: float, *, inclusive: bool = True) -> int:
        """Move time to ``to`` (never backwards) and wake the timers due, earliest first;
        with ``inclusive=False`` those due exactly at ``to`` stay pending. Returns how many
        were woken. Woken coroutines run once the caller yields to the event loop."""
        if to > self._now:
            self._now = to
        woken = 0
        timers = self._timers
        while timers and (timers[0][0] < to or (inclusive and timers[0][0] == to)):
            _, _, fut = heapq.heappop(timers)
            if not fut.done():
                fut.set_result(None)
                woken += 1
        return woken

    def _timer(self, when: float) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (when, next(self._seq), fut))
        return fut

    async def _block(self, fut: asyncio.Future[None]) -> None:
        self.blocked += 1
        self.changes += 1
        try:
            await fut
        finally:
            self.blocked -= 1
            self.changes += 1
            if not fut.done():
                fut.cancel()

    async def sleep_until(self, when: float) -> None:
        if when <= self._now:
            return
        await self._block(self._timer(when))

    async def wait(self, future: asyncio.Future[Any], until: float) -> bool:
        if future.done():
            return True
        if until <= self._now:
            return False
        wake = self._timer(until)

        def on_done(_: asyncio.Future[Any]) -> None:
            _wake(wake)

        future.add_done_callback(on_done)
        try:
            await self._block(wake)
        finally:
            future.remove_done_callback(on_done)
        return future.done()

    @contextlib.asynccontextmanager
    async def timeout_at(self, when: float) -> AsyncIterator[object]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(None) as scope:
            active = True

            def expire(fut: asyncio.Future[None]) -> None:
                # the block may have ended between the timer firing and this callback
                if active and not fut.cancelled():
                    scope.reschedule(loop.time())

            timer = self._timer(when)
            timer.add_done_callback(expire)
            if when <= self._now:
                _wake(timer)
            try:
                yield scope
            finally:
                active = False
                if not timer.done():
                    timer.cancel()
