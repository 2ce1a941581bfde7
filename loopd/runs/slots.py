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


class Slots:
    def __init__(self, size: int = 256) -> None:
        self._free = asyncio.Semaphore(size)
        self._holding: set[str] = set()

    async def take(self, run_id: str) -> None:
        """Wait for a slot for ``run_id`` (a no-op when it holds one already)."""
        if run_id not in self._holding:
            await self._free.acquire()
            self._holding.add(run_id)

    def hold(self, run_id: str) -> RunSlot:
        """``run_id``'s slot as an action's :class:`~loopd.packs.executor.Hold`: an
        action that only waits (``core.sleep``) gives it back meanwhile."""
        return RunSlot(self, run_id)

    def give_back(self, run_id: str) -> None:
        """The run waits now (or ended): it no longer counts as starting."""
        if run_id in self._holding:
            self._holding.discard(run_id)
            self._free.release()


class RunSlot:
    """One run's start slot, as an action holds it (see :meth:`Slots.hold`)."""

    __slots__ = ("_run_id", "_slots")

    def __init__(self, slots: Slots, run_id: str) -> None:
        self._slots, self._run_id = slots, run_id

    async def take(self) -> None:
        await self._slots.take(self._run_id)

    def give_back(self) -> None:
        self._slots.give_back(self._run_id)
