"""The lease check before an action: a run acts only while this replica still holds it.

A replica paused or cut off for longer than the store's lease loses its runs to another
(``Store.claim_runs``); when it wakes up, its run tasks may be about to act. Every action
is preceded by this check (read from the database, ``Store.holds``), and every write of run
state is fenced by the store, so the former owner neither acts nor writes: ``LeaseLost``
stops the run's task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from loopd.errors import LeaseLost
from loopd.store.base import Store


def lease_check(store: Store, run_id: str) -> Callable[[], Awaitable[None]]:
    """An ``ActionContext.lease`` for ``run_id``: raises ``LeaseLost`` when the run is no
    longer this replica's."""

    async def check() -> None:
        if not await store.holds(run_id):
            raise LeaseLost(f"run {run_id} is no longer this replica's ({store.replica}); "
                            "the action was not started", origin="lease")

    return check
