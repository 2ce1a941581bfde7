"""Committing the engine's batches: the store decides, a bad record is cut out.

A batch is committed in one transaction. When the store is down (a plain
``StoreError``: disk full, locked, unreachable) nothing is acknowledged and the
same batch is retried with backoff, with ``ok`` false meanwhile (``/readyz``).
When the store refuses records (``StoreRejected``: retrying can never succeed),
the batch is halved until the events whose records are refused are found: each
gets an ``error`` decision and is acknowledged; the rest is committed. A single
bad event in a batch of n costs about 2 log2(n) commits.
"""

from __future__ import annotations

import asyncio
import time

from loopd import metrics
from loopd.errors import StoreError, StoreRejected
from loopd.events import Event
from loopd.store.base import Batch, CommitResult, DecisionRecord, Mark, Store


class Committer:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.ok = True  # False while commits fail for a reason other than a bad record
        # batches in which the store rejected some event: memory that ran ahead of what was
        # committed (correlation state) is read again from the store
        # (Engine._caught_up_after_rejection)
        self.rejections = 0
        self._found = 0  # events rejected by the commit under way
        # (source, id) of the events rejected, until the engine has taken them out of its
        # memory (it removes them then)
        self.rejected: set[tuple[str, str]] = set()
        self.commits = 0  # calls of commit that returned (the engine waits for its own)
        self.waiting = False  # someone waits in caught_up
        self.catch_up_timeout = 60.0
        self._committed = asyncio.Event()

    async def commit(self, batch: Batch, marks: list[Mark], events: list[Event | None]
                     ) -> CommitResult:
        """Commit ``batch``, whose segment i (``marks[i]:marks[i+1]``) holds what was
        decided for ``events[i]`` (None: a run's end). A store that is down holds
        everything (never ack an undecided event) and is retried with backoff; a batch the
        store rejects is split until the segments it refuses are found, and only their
        events are rejected."""
        try:
            result = await self.write(batch)
        except StoreRejected as exc:
            if len(events) > 2:
                metrics.log.warning("store rejected a batch; finding the culprit",
                                    error=str(exc), events=len(events) - 1)
            result = CommitResult()
            await self._bisect(batch, marks, events, 0, len(events), result, exc,
                               failed=True)
            if self._found:  # counted once everything is written: nothing awaits after it
                self._found = 0
                self.rejections += 1
        self.commits += 1
        self._committed.set()
        return result

    async def caught_up(self, commits: int) -> bool:
        """Wait until ``commits`` calls of ``commit`` returned; False when they had not
        after ``catch_up_timeout`` (the store is slow or down: the caller tries later)."""
        self.waiting = True
        try:
            async with asyncio.timeout(self.catch_up_timeout):
                while self.commits < commits:
                    self._committed.clear()
                    await self._committed.wait()
            return True
        except TimeoutError:
            metrics.log.warning("the batches in flight were not written in time",
                                written=self.commits, wanted=commits)
            return False
        finally:
            self.waiting = False

    async def write(self, batch: Batch) -> CommitResult:
        """Commit ``batch`` whole, retried while the store is down (StoreRejected when
        the store refuses it)."""
        delay = 0.05
        while True:
            try:
                result = await self.store.commit(batch)
                self.ok = True
                return result
            except StoreRejected:
                self.ok = True  # it answered: it is up
                raise
            except StoreError as exc:
                self.ok = False
                metrics.log.error("store commit failed; holding acknowledgements and retrying",
                                  error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _bisect(self, batch: Batch, marks: list[Mark], events: list[Event | None],
                      lo: int, hi: int, result: CommitResult, error: StoreRejected, *,
                      failed: bool = False) -> None:
        """Commit segments ``lo:hi`` (``failed``: known to be rejected), halving what the
        store rejects: one bad event costs about 2 log2(batch) commits."""
        part = batch.part(marks[lo], marks[hi])
        if not part:
            return
        if not failed:
            try:
                result.merge(await self.write(part))
                return
            except StoreRejected as exc:
                error = exc
        if hi - lo == 1:
            await self._reject(events[lo], part, error, result)
            return
        mid = (lo + hi) // 2
        await self._bisect(batch, marks, events, lo, mid, result, error)
        await self._bisect(batch, marks, events, mid, hi, result, error)

    async def _reject(self, event: Event | None, part: Batch, error: StoreRejected,
                      result: CommitResult) -> None:
        """The store refuses what was decided for ``event``: nothing of it is created; an
        ``error`` decision per rule says why (when even that cannot be written, the log line
        and the counter do), and the event is acknowledged so it cannot wedge the stream."""
        result.skipped_runs |= {r.id for r in part.runs}
        self._found += 1
        if event is not None:
            self.rejected.add((event.source, event.id))
        source = event.source if event is not None else "loopd"
        metrics.event_rejected(
            source, "store_rejected", error,
            event_id=event.id if event is not None else None,
            event_origin=(event.origin or event.id) if event is not None else None,
            what="the event is recorded as an error decision and acknowledged"
            if event is not None else "what a run's end changed is dropped")
        now = time.time()
        firsts = {d.rule: d for d in part.decisions}
        notes = Batch(decisions=[
            DecisionRecord(d.source, d.event_id, d.rule, d.key, "error",
                           f"store rejected: {error}"[:500], now) for d in firsts.values()])
        if notes.decisions:
            try:
                result.merge(await self.write(notes))
            except StoreRejected as exc:
                metrics.log.error("the rejection could not be recorded either", error=str(exc),
                                  event_id=event.id if event is not None else None)
