"""The group commit of the stores that group their writers: the writers' turn, and the
retry rule."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from loopd.errors import StoreError, StoreRejected

Op = TypeVar("Op")
Answer = TypeVar("Answer")


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


class Writers(Generic[Op, Answer]):
    """The writers waiting for a store's group commit, and whose turn it is to write
    (``lock``: SQLite's one connection takes it for its transactions outside the group
    commit too). ``write_all`` writes a group in one transaction and answers each
    writer's future (``write_group`` splits a group that fails)."""

    def __init__(self, write_all: Callable[[list[tuple[Op, asyncio.Future[Answer]]]],
                                           Awaitable[StoreError | None]]) -> None:
        self.lock = asyncio.Lock()
        self._queue: list[tuple[Op, asyncio.Future[Answer]]] = []
        self._write_all = write_all

    async def submit(self, op: Op) -> Answer:
        """``op`` written with all that waits when it is this writer's turn; its answer.
        The write is shielded, so a writer cancelled meanwhile (a run cancelled
        mid-save) leaves neither the transaction open nor the others of its group
        without an answer; and the turn is given back when the group is written, not at
        the cancel, so the next group never starts inside its transaction (review: on
        SQLite's one connection the next BEGIN met it, and the error handling rolled it
        back)."""
        done: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.append((op, done))
        await self.lock.acquire()
        if done.done():  # another writer wrote it meanwhile
            self.lock.release()
            return await done
        ops, self._queue = self._queue, []
        task = asyncio.ensure_future(write_group(ops, self._write_all))
        _WRITING.add(task)

        def written(_: asyncio.Task[None]) -> None:
            _WRITING.discard(task)
            self.lock.release()

        task.add_done_callback(written)
        await asyncio.shield(task)
        return await done
