"""The group commit's retry rule, shared by the stores that group their writers."""

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
