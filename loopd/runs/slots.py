"""Start slots: how many runs may be starting (acting, not yet settled into a wait) at once.

A burst of 10,000 triggers starts its runs 256 at a time instead of all together; a run
that settles into a long wait (confirm, approval) gives its slot back, and takes one
again when it wakes. One ``Slots`` is shared by the dispatcher (which takes a slot as a
run starts) and the task kinds (which say when a run waits and wakes); the composition
root hands the same object to both.
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

    def give_back(self, run_id: str) -> None:
        """The run waits now (or ended): it no longer counts as starting."""
        if run_id in self._holding:
            self._holding.discard(run_id)
            self._free.release()
