"""The Clock contract (loopd/workflow/clock.py), for WallClock and VirtualClock alike, and
what VirtualClock adds: time moves only on ``advance``, sleepers wake in deadline order,
and ``blocked``/``changes`` tell a driver when nothing is left to do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import pytest

from loopd.clock import Clock, VirtualClock, WallClock

STEP = 0.05  # seconds of wall time per step for WallClock; any instant for VirtualClock


async def turns(n: int = 5) -> None:
    """Let the event loop run what is ready (woken sleepers, callbacks)."""
    for _ in range(n):
        await asyncio.sleep(0)


class Driver:
    """Moves a clock's time forward: advances a VirtualClock, waits out a WallClock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.start = clock.now()

    def at(self, steps: float) -> float:
        return self.start + steps * STEP

    async def until(self, steps: float) -> None:
        when = self.at(steps)
        if isinstance(self.clock, VirtualClock):
            self.clock.advance(when)
            await turns()
            return
        await asyncio.sleep(max(0.0, when - time.time()) + 0.005)  # the wall clock: wait it out
        await turns()


@pytest.fixture(params=["wall", "virtual"])
def driver(request: pytest.FixtureRequest) -> Driver:
    clock: Clock = WallClock() if request.param == "wall" else VirtualClock(1_000_000.0)
    return Driver(clock)


def started(coro: Awaitable[object]) -> asyncio.Task[object]:
    async def run() -> object:
        return await coro

    return asyncio.ensure_future(run())


# -- the contract -----------------------------------------------------------------------------


async def test_sleep_until_returns_once_the_instant_is_reached(driver: Driver) -> None:
    """sleep_until returns only once now() has reached its instant."""
    task = started(driver.clock.sleep_until(driver.at(2)))
    await driver.until(1)
    assert not task.done()
    await driver.until(2)
    assert task.done()
    assert driver.clock.now() >= driver.at(2)


async def test_sleep_until_a_past_instant_returns_without_yielding(driver: Driver) -> None:
    """An instant already past costs nothing: the coroutine completes without suspending."""
    coro = driver.clock.sleep_until(driver.clock.now() - 10)
    with pytest.raises(StopIteration):
        coro.send(None)


async def test_wait_is_true_when_the_future_completes_before_the_deadline(
        driver: Driver) -> None:
    """wait answers True as soon as the future is done, without waiting for the deadline."""
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = started(driver.clock.wait(future, driver.at(4)))
    await turns()
    assert not task.done()
    future.set_result("evidence")
    await turns()
    assert task.done() and task.result() is True


async def test_wait_is_false_at_the_deadline_and_leaves_the_future_alone(
        driver: Driver) -> None:
    """At the deadline wait answers False; the future is neither cancelled nor resolved."""
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = started(driver.clock.wait(future, driver.at(1)))
    await driver.until(1)
    assert task.done() and task.result() is False
    assert not future.done()


async def test_wait_on_a_done_future_or_a_past_deadline_answers_at_once(driver: Driver) -> None:
    """A done future is True and a past deadline is False, whatever the other."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    done.set_result(1)
    pending: asyncio.Future[int] = loop.create_future()
    assert await driver.clock.wait(done, driver.at(-1)) is True
    assert await driver.clock.wait(pending, driver.at(-1)) is False


async def test_timeout_at_cancels_the_block_at_its_instant(driver: Driver) -> None:
    """The block is cancelled at the instant and TimeoutError raised; a block that ends
    first is not touched."""
    async def blocked() -> str:
        async with driver.clock.timeout_at(driver.at(1)):
            await asyncio.get_running_loop().create_future()
        return "finished"

    task = asyncio.ensure_future(blocked())
    await driver.until(1)
    with pytest.raises(TimeoutError):
        await task
    async with driver.clock.timeout_at(driver.at(3)):
        await turns()
    await driver.until(3)  # the timer of the finished block fires into nothing


async def test_timeout_at_a_past_instant_cancels_at_the_first_suspension(
        driver: Driver) -> None:
    """A deadline already past (a run resumed after its timeout) times the block out."""
    with pytest.raises(TimeoutError):
        async with driver.clock.timeout_at(driver.at(-1)):
            await asyncio.sleep(0)
            await asyncio.sleep(0)


async def test_cancelling_a_waiting_coroutine_propagates_and_leaves_no_timer(
        driver: Driver) -> None:
    """A cancelled sleeper or waiter raises CancelledError (never swallowed) and its timer
    no longer keeps the clock busy."""
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    tasks = [started(driver.clock.sleep_until(driver.at(5))),
             started(driver.clock.wait(future, driver.at(5)))]
    await turns()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not future.cancelled()
    if isinstance(driver.clock, VirtualClock):
        assert driver.clock.next_deadline() is None
        assert driver.clock.blocked == 0


# -- VirtualClock ------------------------------------------------------------------------------


async def test_virtual_time_moves_only_when_advanced() -> None:
    """now() is the start until advance(); advance never moves time backwards."""
    clock = VirtualClock(100.0)
    task = started(clock.sleep_until(101.0))
    await turns(20)
    assert (clock.now(), task.done()) == (100.0, False)
    clock.advance(50.0)
    assert clock.now() == 100.0
    clock.advance(101.0)
    await turns()
    assert task.done()


async def test_sleepers_wake_in_deadline_order() -> None:
    """Sleepers registered in any order wake earliest deadline first, ties in the order
    they started waiting."""
    clock = VirtualClock(0.0)
    woke: list[str] = []

    async def sleeper(name: str, when: float) -> None:
        await clock.sleep_until(when)
        woke.append(name)

    tasks = [asyncio.ensure_future(sleeper(name, when))
             for name, when in [("c", 30.0), ("a", 10.0), ("b1", 20.0), ("b2", 20.0)]]
    await turns()
    assert clock.next_deadline() == 10.0
    assert clock.advance(100.0) == 4
    await turns()
    assert woke == ["a", "b1", "b2", "c"]
    assert all(t.done() for t in tasks)


async def test_advance_exclusive_leaves_the_timers_due_at_that_instant() -> None:
    """advance(to, inclusive=False) fires what is due before ``to`` and keeps what is due
    at ``to`` pending (a replay decides the events at T before the deadlines at T)."""
    clock = VirtualClock(0.0)
    early = started(clock.sleep_until(5.0))
    at_to = started(clock.sleep_until(10.0))
    await turns()
    assert clock.advance(10.0, inclusive=False) == 1
    await turns()
    assert (early.done(), at_to.done(), clock.now()) == (True, False, 10.0)
    assert clock.next_deadline() == 10.0
    clock.advance(10.0)
    await turns()
    assert at_to.done()


async def test_blocked_counts_the_coroutines_waiting_on_the_clock() -> None:
    """blocked is the number of coroutines in sleep_until/wait; changes moves whenever one
    starts or stops waiting; a timeout block holds a timer but blocks nobody."""
    clock = VirtualClock(0.0)
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    assert (clock.blocked, clock.changes) == (0, 0)
    sleeper = started(clock.sleep_until(10.0))
    waiter = started(clock.wait(future, 20.0))
    await turns()
    assert clock.blocked == 2
    changes = clock.changes
    future.set_result(7)
    await turns()
    assert (waiter.result(), clock.blocked) == (True, 1)
    assert clock.changes > changes
    async with clock.timeout_at(30.0):
        assert clock.blocked == 1
        assert clock.pending() == 2  # the sleeper's timer and this block's
    clock.advance(10.0)
    await turns()
    assert sleeper.done() and clock.blocked == 0
    assert clock.next_deadline() is None


async def test_a_future_done_in_the_same_turn_as_its_deadline_counts_as_done() -> None:
    """When evidence and the deadline arrive together, wait answers True (the evidence
    is there when the waiter looks)."""
    clock = VirtualClock(0.0)
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = started(clock.wait(future, 5.0))
    await turns()
    clock.advance(5.0)
    future.set_result("evidence")
    await turns()
    assert task.result() is True


async def test_timeout_at_fires_when_virtual_time_passes_it() -> None:
    """A timeout block on a VirtualClock ends with TimeoutError only once the clock is
    advanced to its instant, however long the loop runs before."""
    clock = VirtualClock(0.0)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def body() -> None:
        async with clock.timeout_at(60.0):
            await gate

    task = asyncio.ensure_future(body())
    await turns(50)
    assert not task.done()
    clock.advance(59.0)
    await turns()
    assert not task.done()
    clock.advance(60.0)
    await turns()
    with pytest.raises(TimeoutError):
        await task
