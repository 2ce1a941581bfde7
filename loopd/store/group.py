"""The group commit of the stores that group their writers: the writers' turn, and the
retry rule."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from loopd.errors import StoreError, StoreRejected

Op = TypeVar("Op")


async def write_group(ops: list[tuple[Op, asyncio.Future[Any]]],
                      write_all: Callable[[list[tuple[Op, asyncio.Future[Any]]]],
                                          Awaitable[StoreError | None]]) -> None:
    """One transaction for the whole group; when it fails and the group has several
    writers, each writes alone, so one rejected record fails only its own writer (a
    store that is down fails them all at once)."""
    error = await write_all(ops)
    if error is None:
        return
    if len(ops) == 1 or not isinstance(error, StoreRejected):
        for _, done in ops:
            if not done.done():
                done.set_exception(error)
        return
    for op in ops:
        alone = await write_all([op])
        if alone is not None and not op[1].done():
            op[1].set_exception(alone)


# the groups being written: a task's only strong reference may be the loop's, and a
# cancelled writer no longer awaits its group
_WRITING: set[asyncio.Task[None]] = set()


async def write_in_turn(lock: asyncio.Lock, take: Callable[[], list[tuple[Op, Any]] | None],
                        write_all: Callable[[list[tuple[Op, Any]]],
                                            Awaitable[StoreError | None]]) -> None:
    """Write the group ``take()`` hands over (None or empty: nothing left, another writer
    wrote it) when it is this writer's turn under ``lock``. The write is shielded, so a
    writer cancelled meanwhile (a run cancelled mid-save) leaves neither the transaction
    open nor the others of its group without an answer; and the turn is given back when
    the group is written, not at the cancel, so the next group never starts inside its
    transaction (review: on SQLite's one connection the next BEGIN met it, and the error
    handling rolled it back)."""
    await lock.acquire()
    try:
        ops = take()
    except BaseException:
        lock.release()
        raise
    if not ops:
        lock.release()
        return
    task = asyncio.ensure_future(write_group(ops, write_all))
    _WRITING.add(task)

    def written(_: asyncio.Task[None]) -> None:
        _WRITING.discard(task)
        lock.release()

    task.add_done_callback(written)
    await asyncio.shield(task)
