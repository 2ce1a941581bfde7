"""Shutdown cost of queued runs: cancelling N runs that wait for a start slot.

    python benchmarks/slots.py --waiting 33000

At shutdown the dispatcher's task group cancels every queued run, in its own arbitrary
order. Each run waits in ``Slots.take``; this measures how long cancelling all of them
takes with loopd's ``Slots`` and, for comparison, with the ``asyncio.Semaphore`` it
replaced (which forgets a cancelled waiter by searching its queue). Prints one JSON
object per implementation: waiting runs, seconds to cancel them all, and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit, machine
from loopd.runs.slots import Slots

SIZE = 64  # the dispatcher's default of runs starting at once


async def _cancel_all(kind: str, waiting: int, seed: int) -> float:
    slots = Slots(SIZE)
    semaphore = asyncio.Semaphore(SIZE)
    forever = asyncio.Event()

    async def run(run_id: str) -> None:
        if kind == "slots":
            try:
                await slots.take(run_id)
                await forever.wait()
            finally:
                slots.give_back(run_id)
        else:
            async with semaphore:
                await forever.wait()

    tasks = [asyncio.create_task(run(str(i))) for i in range(waiting + SIZE)]
    await asyncio.sleep(0.1)  # every run is holding or waiting
    random.Random(seed).shuffle(tasks)
    began = time.perf_counter()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", type=int, default=33_000, help="runs waiting for a slot")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    for kind in ("slots", "asyncio.Semaphore"):
        seconds = asyncio.run(_cancel_all(kind, args.waiting, args.seed))
        result: dict[str, Any] = {"benchmark": "slots", "implementation": kind,
                                  "waiting": args.waiting, "cancel_all_s": round(seconds, 3),
                                  "machine": machine()}
        emit(result)


if __name__ == "__main__":
    main()
