"""Checking a batch's limits (``loopd.store.base.Limit``) against what every replica
admitted: what the limits' scopes hold is read once per batch, then brought up to date
in memory as the batch's runs are admitted in order, so a batch costs a few reads
whatever its size (the store holds its write lock meanwhile: nobody else admits)."""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field

from loopd.errors import StoreRejected
from loopd.store.base import CommitResult, Limit, RunRecord

KINDS = frozenset({"window", "open", "breaker", "opens"})
COUNTED = frozenset({"window", "open"})  # an admitted run is counted in these scopes


@dataclass
class Wanted:
    """What to read for a batch: per window scope the earliest instant that counts, the
    open scopes, the breaker scopes."""

    window: dict[str, float] = field(default_factory=dict)
    opened: set[str] = field(default_factory=set)
    breaker: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, runs: list[RunRecord], limits: dict[str, list[Limit]], origin: str) -> Wanted:
        """What ``runs``' limits need read; a limit of an unknown kind is refused."""
        wanted = cls()
        for run in runs:
            for lim in limits.get(run.id, ()):
                if lim.kind not in KINDS:
                    raise StoreRejected(f"write failed: run {run.id}: unknown limit kind "
                                        f"{lim.kind!r}", origin=origin)
                if lim.kind == "window":
                    since = run.created - lim.per
                    wanted.window[lim.scope] = min(wanted.window.get(lim.scope, since), since)
                elif lim.kind == "open":
                    wanted.opened.add(lim.scope)
                elif lim.kind == "breaker":
                    wanted.breaker.add(lim.scope)
        return wanted


@dataclass
class Admissions:
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    keys: dict[str, set[str | None]] = field(default_factory=lambda: defaultdict(set))
    breakers: dict[str, float] = field(default_factory=dict)  # scope -> until

    def refusal(self, run: RunRecord, limits: list[Limit], result: CommitResult
                ) -> Limit | None:
        """The first of ``limits`` that refuses ``run``, or None."""
        for limit in limits:
            if limit.kind == "opens":  # only with the breaker this very commit opened
                refused = limit.scope not in result.breakers_opened
            elif limit.kind == "window":
                times = self.times[limit.scope]
                recent = len(times) - bisect.bisect_right(times, run.created - limit.per)
                refused = recent >= limit.count
            elif limit.kind == "open":
                refused = len(self.keys[limit.scope] - {run.key}) >= limit.count
            else:  # breaker
                refused = self.breakers.get(limit.scope, float("-inf")) > run.created
            if refused:
                return limit
        return None

    def admit(self, run: RunRecord, limits: list[Limit], *, open_key: bool = True
              ) -> list[str]:
        """Count an admitted run in its scopes (its key among the open ones when
        ``open_key``: its incident is open); returns them (one admission row each)."""
        scopes = sorted({lim.scope for lim in limits if lim.kind in COUNTED})
        for scope in scopes:
            bisect.insort(self.times[scope], run.created)
            if open_key:
                self.keys[scope].add(run.key)
        return scopes
