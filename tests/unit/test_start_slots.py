"""Start slots: a bounded number of runs starting at once, handed on in arrival order."""

from __future__ import annotations

import asyncio
import random

from loopd.runs.slots import Slots


async def test_slots_are_handed_on_in_arrival_order() -> None:
    """Past the size, runs wait; each slot given back goes to the run that waited longest."""
    slots = Slots(2)
    await slots.take("a")
    await slots.take("b")
    order: list[str] = []

    async def start(run_id: str) -> None:
        await slots.take(run_id)
        order.append(run_id)

    waiting = [asyncio.create_task(start(r)) for r in ("c", "d", "e")]
    await asyncio.sleep(0)
    assert order == []
    slots.give_back("a")
    slots.give_back("b")
    await asyncio.sleep(0)
    assert order == ["c", "d"]
    slots.give_back("c")
    await asyncio.gather(*waiting)
    assert order == ["c", "d", "e"]


async def test_a_cancelled_waiter_is_forgotten_and_a_slot_handed_to_it_passes_on() -> None:
    """A run cancelled while waiting leaves the queue; one cancelled just as it was handed
    a slot passes that slot to the next waiter instead of keeping it."""
    slots = Slots(1)
    await slots.take("a")
    b = asyncio.create_task(slots.take("b"))
    c = asyncio.create_task(slots.take("c"))
    d = asyncio.create_task(slots.take("d"))
    await asyncio.sleep(0)
    c.cancel()  # waiting: forgotten
    await asyncio.gather(c, return_exceptions=True)
    slots.give_back("a")  # handed to b ...
    b.cancel()  # ... which is cancelled before it resumes: d gets the slot
    await asyncio.gather(b, return_exceptions=True)
    await asyncio.wait_for(d, 5)
    assert slots._holding == {"d"} and not slots._waiting


async def test_cancelling_thousands_of_waiting_runs_in_any_order_leaves_every_slot_free(
        ) -> None:
    """Shutdown cancels every queued run in a task group's arbitrary order: afterwards no
    slot is lost and nothing waits (a semaphore did this in quadratic time)."""
    slots = Slots(64)

    async def run(run_id: str) -> None:
        try:
            await slots.take(run_id)
            await asyncio.Event().wait()
        finally:
            slots.give_back(run_id)

    tasks = [asyncio.create_task(run(str(i))) for i in range(20_000)]
    await asyncio.sleep(0)
    random.Random(9).shuffle(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert (slots._free, slots._holding, len(slots._waiting)) == (64, set(), 0)
