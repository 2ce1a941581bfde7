"""Start slots: how many runs may be starting (acting, not yet settled into a wait) at once.

A burst of 10,000 triggers starts its runs 256 at a time instead of all together; a run
that settles into a wait (confirm, approval, a task's delay, a retry's backoff, an action
that only sleeps) gives its slot back, and takes one again when it wakes. One ``Slots``
is shared by the dispatcher (which takes a slot as a run starts) and the task kinds
(which say when a run waits and wakes); the composition root hands the same object to
both.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict


class Slots:
    """At most ``size`` runs hold a slot; the others wait in arrival order.

    Not an ``asyncio.Semaphore``: a semaphore forgets a cancelled waiter by searching its
    queue, so cancelling tens of thousands of waiting runs at shutdown (in a task group's
    arbitrary order) took quadratic time, tens of seconds. Here a waiter is found by its
    run id.
    """

    def __init__(self, size: int = 256) -> None:
        self._free = size
        self._holding: set[str] = set()
        self._waiting: OrderedDict[str, asyncio.Future[None]] = OrderedDict()

    async def take(self, run_id: str) -> None:
        """Wait for a slot for ``run_id`` (a no-op when it holds one already)."""
        if run_id in self._holding:
            return
        if self._free > 0 and not self._waiting:
            self._free -= 1
            self._holding.add(run_id)
            return
        handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[run_id] = handed
        try:
            await handed  # _hand_on() puts run_id in _holding before it resolves this
        except asyncio.CancelledError:
            if self._waiting.get(run_id) is handed:
                del self._waiting[run_id]
            else:  # handed a slot just as it was cancelled: pass it on
                self.give_back(run_id)
            raise

    def hold(self, run_id: str) -> RunSlot:
        """``run_id``'s slot as an action's :class:`~loopd.packs.executor.Hold`: an
        action that only waits (``core.sleep``) gives it back meanwhile."""
        return RunSlot(self, run_id)

    def give_back(self, run_id: str) -> None:
        """The run waits now (or ended): it no longer counts as starting."""
        if run_id in self._holding:
            self._holding.discard(run_id)
            self._hand_on()

    def _hand_on(self) -> None:
        while self._waiting:
            run_id, handed = self._waiting.popitem(last=False)
            if not handed.done():
                self._holding.add(run_id)
                handed.set_result(None)
                return
        self._free += 1


class RunSlot:
    """One run's start slot, as an action holds it (see :meth:`Slots.hold`)."""

    __slots__ = ("_run_id", "_slots")

    def __init__(self, slots: Slots, run_id: str) -> None:
        self._slots, self._run_id = slots, run_id

    async def take(self) -> None:
        await self._slots.take(self._run_id)

    def give_back(self) -> None:
        self._slots.give_back(self._run_id)
