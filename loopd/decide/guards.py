"""Guards: the policy limits checked before loopd acts, and their memory.

``check`` runs on the engine's hot path only for a decision that would start
a run, and answers ``(guard, reason)`` or None. Order: silence, maintenance
window, circuit breaker, flapping, budgets (rule, key, fleet), blast radius.
Outcomes of finished runs feed the breaker and flapping memory, which is
saved in the store (``kv`` namespace ``guards``) so it survives restarts;
budgets and blast radius are rebuilt from the runs and open incidents.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, ItemsView
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from loopd import metrics
from loopd.catalog.inventory import Inventory
from loopd.catalog.silences import Silences
from loopd.decide.timers import Throttle
from loopd.policy import BlastRadius, Budget, GlobalGuards, RuleGuards, Window
from loopd.runs import states
from loopd.store.base import BreakerRecord, Limit
from loopd.units import rfc3339, seconds

# breaker failures; ``done`` (succeeded, nothing to confirm) and ``cancelled`` are not
NOT_FIXED = frozenset({states.NOT_FIXED, states.OUTCOME_FAILED, states.INCONCLUSIVE})
_FLEET = "*"
DEFAULT_MAX_KEYS = 100_000

K = TypeVar("K", bound=Hashable)


class Recent(Generic[K]):
    """Times per scope (a ``(rule, key)`` or ``"rule|key"``), bounded in the number of
    scopes. A scope whose latest time is older than its rule's window (``window``) counts
    for no guard any more and is forgotten first; only when more than ``max_keys`` scopes
    are all still inside their windows are the least recently added forced out (counted
    as ``full``, logged once): a budget of those scopes can then be exceeded, and the
    metric says so. Sweeps run when the memory has doubled since the last one, so an
    append costs O(1) amortized."""

    def __init__(self, what: str, window: Callable[[K], float], max_keys: int,
                 forget: Callable[[K], None] | None = None) -> None:
        self.what = what
        self.max_keys = max_keys
        self._window = window
        self._forget = forget
        self._times: OrderedDict[K, list[float]] = OrderedDict()
        self._sweep_at = min(1024, max_keys)
        self._warned = False

    def get(self, scope: K) -> list[float] | None:
        return self._times.get(scope)

    def add(self, scope: K, now: float) -> list[float]:
        """Append ``now`` to the scope's times (the caller trims); returns them."""
        times = self._times.get(scope)
        if times is None:
            times = self._times[scope] = [now]
            if len(self._times) > self._sweep_at:
                self.sweep(now)  # the newest, just added, is the last to go
            return times
        self._times.move_to_end(scope)
        times.append(now)
        return times

    def put(self, scope: K, times: list[float]) -> None:
        self._times[scope] = times

    def pop(self, scope: K) -> list[float] | None:
        return self._times.pop(scope, None)

    def items(self) -> ItemsView[K, list[float]]:
        return self._times.items()

    def __len__(self) -> int:
        return len(self._times)

    def sweep(self, now: float) -> None:
        times, window = self._times, self._window
        passed = [s for s, t in times.items() if not t or now - t[-1] >= window(s)]
        for scope in passed:
            del times[scope]
            if self._forget is not None:
                self._forget(scope)
        metrics.evicted(self.what, len(passed))
        if len(times) > self.max_keys:  # all in their windows: the least recent go
            forced = len(times) - self.max_keys * 9 // 10
            for _ in range(forced):
                scope, _times = times.popitem(last=False)
                if self._forget is not None:
                    self._forget(scope)
            metrics.evicted(self.what, forced, full=True)
            if not self._warned:
                self._warned = True
                metrics.memory_full(self.what, self.max_keys,
                                    "guards of the least recently used keys forget their "
                                    "runs: their budgets can be exceeded")
        self._sweep_at = min(max(1024, 2 * len(times)), self.max_keys)


@dataclass(slots=True)
class BreakerState:
    opened: float
    until: float
    reason: str
    escalated: bool = False


@dataclass(slots=True)
class Verdict:
    guard: str
    reason: str
    escalate: str | None = None  # set once per episode: escalate with this reason


@dataclass
class Guards:
    config: GlobalGuards
    inventory: Inventory
    silences: Silences | None = None
    max_keys: int = DEFAULT_MAX_KEYS  # per memory of (rule, key) scopes below
    starts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    breakers: dict[str, BreakerState] = field(default_factory=dict)
    flapping: dict[str, float] = field(default_factory=dict)  # scope -> escalated at
    remediating: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    dirty: bool = False  # memory changed outside run_ended: the engine saves it
    # rule -> the longest window any of its per-key memories matters for (set_windows)
    windows: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.key_starts: Recent[tuple[str, str]] = Recent(
            "throttle", lambda scope: self.windows.get(scope[0], 0.0), self.max_keys)
        self.failures: Recent[str] = Recent("breaker", self._scope_window, self.max_keys)
        self.fixes: Recent[str] = Recent("flapping", self._scope_window, self.max_keys,
                                         forget=self._fixes_forgotten)

    def set_windows(self, windows: dict[str, float]) -> None:
        """Per rule, the longest window its throttle, per-key budget, flapping or breaker
        looks back (a rule not listed: its memory has no use and is forgotten first)."""
        self.windows = windows

    def _scope_window(self, scope: str) -> float:
        return self.windows.get(scope.split("|", 1)[0], 0.0)

    def _fixes_forgotten(self, scope: str) -> None:
        # no fix left in the window: the next check would end the episode just the same
        if self.flapping.pop(scope, None) is not None:
            self.dirty = True

    # -- the check ------------------------------------------------------------------

    def group_of(self, key: str) -> str | None:
        entity = self.inventory.entities.get(key)
        group = entity.get("group") if entity else None
        return str(group) if group is not None else None

    def check(self, rule: str, key: str, policy: RuleGuards, labels: dict[str, Any] | None,
              now: float) -> Verdict | None:
        group = self.group_of(key)
        if self.silences is not None and labels:
            silence = self.silences.match(labels, now)
            if silence is not None:
                return Verdict("silence", f"silenced in Alertmanager by {silence.id}")
        window = self._window(rule, group, policy.maintenance, now)
        if window is not None:
            return Verdict("maintenance", f"maintenance window {window.name} is active")
        if policy.breaker is not None:
            scope = rule if policy.breaker.per == "rule" else f"{rule}|{key}"
            state = self.breakers.get(scope)
            if state is not None:
                if now < state.until:
                    return Verdict("breaker", f"circuit open since {state.reason}")
                del self.breakers[scope]  # cool-off over: closed again
                self.dirty = True
                metrics.circuit(rule, False)
        if policy.flapping is not None:
            scope = f"{rule}|{key}"
            fixed = _count_since(self.fixes.get(scope), now - policy.flapping.within)
            if fixed >= policy.flapping.fixes:
                first = scope not in self.flapping
                if first:  # saved by the engine, so a restart does not escalate again
                    self.flapping[scope] = now
                    self.dirty = True
                reason = (f"fixed {fixed} times within {policy.flapping.within:g}s: "
                          "the fix does not hold")
                return Verdict("flapping", reason, reason if first else None)
            if self.flapping.pop(scope, None) is not None:
                self.dirty = True
        for budget, starts, what in (
            (policy.max_runs, self.starts.get(rule), "rule"),
            (policy.max_runs_per_key, self.key_starts.get((rule, key)), "key"),
            (self.config.max_runs, self.starts.get(_FLEET), "fleet"),
        ):
            if budget is not None and self.remaining(budget, starts, now) <= 0:
                return Verdict("budget", f"{what} budget of {budget.count} runs per "
                                         f"{budget.per:g}s is spent")
        radius = policy.blast_radius or self.config.blast_radius
        if radius is not None and group is not None and radius.group in (None, group):
            verdict = self._blast(radius, group, key)
            if verdict is not None:
                return verdict
        return None

    def _window(self, rule: str, group: str | None, own: list[Window], now: float
                ) -> Window | None:
        for window in own:
            if window.applies(rule, group) and window.active(now):
                return window
        for window in self.config.maintenance:
            if window.applies(rule, group) and window.active(now):
                return window
        return None

    def _blast(self, radius: BlastRadius, group: str, key: str) -> Verdict | None:
        members = len(self.inventory.group(group))
        busy = self.remediating.get(group, {})
        if key in busy:
            return None  # already counted
        limit = radius.limit(members)
        if len(busy) >= limit:
            return Verdict("blast_radius", f"{len(busy)} of {members} entities of group "
                                           f"{group} under remediation (max {radius.max})")
        return None

    def throttled(self, rule: str, key: str, throttle: Throttle, now: float) -> str | None:
        """A rule's throttle: its per-key budgets, checked before the other guards; None
        when a run may start, else why not (the decision's reason)."""
        starts = self.key_starts.get((rule, key))
        if not starts:
            return None
        once = throttle.once
        if once is not None and now - starts[-1] < once.per:
            left = once.per - (now - starts[-1])
            return f"throttled: once within {once.per:g}s ({left:.0f}s left)"
        most = throttle.most
        if most is not None and self.remaining(most, starts, now) <= 0:
            recent = _count_since(starts, now - most.per)
            return f"throttled: {recent} runs within {most.per:g}s (max {most.count})"
        return None

    def limits(self, rule: str, key: str, policy: RuleGuards, throttle: Throttle | None
               ) -> list[Limit]:
        """The guards of a new run that the store checks again in the decision's
        transaction, against the runs of every replica (memory only knows this one's)."""
        found: list[Limit] = []
        per_key = f"key:{rule}|{key}"
        if throttle is not None:
            if throttle.once is not None:
                found.append(Limit(per_key, "window", 1, throttle.once.per, "throttle",
                                   f"once within {throttle.once.per:g}s"))
            if throttle.most is not None:
                found.append(Limit(per_key, "window", throttle.most.count, throttle.most.per,
                                   "throttle", f"{throttle.most.count} runs within "
                                   f"{throttle.most.per:g}s"))
        if policy.breaker is not None:
            scope = rule if policy.breaker.per == "rule" else f"{rule}|{key}"
            found.append(Limit(scope, "breaker", guard="breaker", reason=f"circuit {scope} "
                               "is open"))
        for budget, scope, what in ((policy.max_runs, f"rule:{rule}", "rule"),
                                    (policy.max_runs_per_key, per_key, "key"),
                                    (self.config.max_runs, "fleet", "fleet")):
            if budget is not None:
                found.append(Limit(scope, "window", budget.count, budget.per, "budget",
                                   f"{what} budget of {budget.count} runs per "
                                   f"{budget.per:g}s is spent"))
        radius = policy.blast_radius or self.config.blast_radius
        group = self.group_of(key) if radius is not None else None
        if radius is not None and group is not None and radius.group in (None, group):
            members = len(self.inventory.group(group))
            limit = radius.limit(members)
            found.append(Limit(f"group:{group}", "open", limit, 0.0, "blast_radius",
                               f"{limit} of {members} entities of group {group} under "
                               f"remediation (max {radius.max})"))
        return found

    def breaker_record(self, scope: str) -> BreakerRecord | None:
        state = self.breakers.get(scope)
        return None if state is None else BreakerRecord(scope, state.opened, state.until,
                                                        state.reason)

    def sync_breakers(self, shared: list[BreakerRecord], now: float) -> None:
        """Follow the breakers every replica sees (the store's): one closed elsewhere
        (``POST .../close`` on another replica) closes here; one opened elsewhere opens."""
        stored = {b.scope: b for b in shared}
        for scope in [s for s, b in self.breakers.items() if s not in stored and
                      b.opened < now - 1.0]:  # one opened here this second may be unwritten
            self.close_breaker(scope)
        for scope, b in stored.items():
            if scope not in self.breakers:
                self.breakers[scope] = BreakerState(b.opened, b.until, b.reason, True)
                metrics.circuit(scope.split("|")[0], True)

    @staticmethod
    def remaining(budget: Budget, starts: list[float] | None, now: float) -> int:
        return budget.count - _count_since(starts, now - budget.per)

    # -- what happened -----------------------------------------------------------------

    def run_started(self, rule: str, key: str, now: float, budget: Budget | None = None
                    ) -> None:
        """Count a run start (or a shadow "would run"); ``budget``: the rule's max_runs."""
        self.starts[rule].append(now)
        self.starts[_FLEET].append(now)
        for starts in (self.starts[rule], self.starts[_FLEET], self.key_starts.add((rule, key),
                                                                               now)):
            if len(starts) > 4096:
                del starts[:1024]
        if budget is not None:
            metrics.budget_remaining(rule, self.remaining(budget, self.starts[rule], now))

    def incident_opened(self, key: str) -> None:
        group = self.group_of(key)
        if group is not None:
            self.remediating[group][key] += 1

    def incident_closed(self, key: str) -> None:
        group = self.group_of(key)
        if group is None:
            return
        busy = self.remediating[group]
        busy[key] -= 1
        if busy[key] <= 0:
            del busy[key]

    def remembers(self, policy: RuleGuards) -> bool:
        """Whether outcomes of this rule's runs feed a guard (and its saved state)."""
        return policy.flapping is not None or policy.breaker is not None

    def run_ended(self, rule: str, key: str, outcome: str, policy: RuleGuards, now: float
                  ) -> str | None:
        """Record an outcome; returns a reason when a breaker just opened (escalate once)."""
        if outcome == states.FIXED:
            if policy.flapping is not None:  # only rules that watch for flapping remember
                fixes = self.fixes.add(f"{rule}|{key}", now)
                del fixes[: max(0, len(fixes) - 64)]
            return None
        breaker = policy.breaker
        if breaker is None or outcome not in NOT_FIXED:
            return None
        scope = rule if breaker.per == "rule" else f"{rule}|{key}"
        failures = self.failures.add(scope, now)
        recent = _count_since(failures, now - breaker.within)
        del failures[: len(failures) - recent]
        if recent >= breaker.failures and scope not in self.breakers:
            reason = (f"{recent} runs not fixed within {breaker.within:g}s "
                      f"(last on {key}: {outcome})")
            self.breakers[scope] = BreakerState(now, now + breaker.cool_off, reason, True)
            metrics.circuit(rule, True)
            return reason
        return None

    def close_breaker(self, scope: str) -> bool:
        if self.breakers.pop(scope, None) is None:
            return False
        self.failures.pop(scope)
        metrics.circuit(scope.split("|")[0], False)
        return True

    # -- durability and the API ------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "breakers": {s: [b.opened, b.until, b.reason, b.escalated]
                         for s, b in self.breakers.items()},
            "failures": {s: v for s, v in self.failures.items() if v},
            "fixes": {s: v[-64:] for s, v in self.fixes.items() if v},
            "flapping": self.flapping,
        }

    def load(self, saved: dict[str, Any] | None) -> None:
        if not saved:
            return
        for scope, (opened, until, reason, escalated) in saved.get("breakers", {}).items():
            self.breakers[scope] = BreakerState(opened, until, reason, escalated)
            metrics.circuit(scope.split("|")[0], True)
        for scope, times in saved.get("failures", {}).items():
            self.failures.put(scope, list(times))
        for scope, times in saved.get("fixes", {}).items():
            self.fixes.put(scope, list(times))
        self.flapping.update(saved.get("flapping", {}))

    def publish_budgets(self, policies: dict[str, RuleGuards], now: float) -> dict[str, int]:
        """Runs left per rule with a ``max_runs`` budget, also set as loopd_budget_remaining
        (the window slides: the API and /metrics call this before answering)."""
        left = {}
        for rule, policy in policies.items():
            if policy.max_runs is not None:
                left[rule] = self.remaining(policy.max_runs, self.starts.get(rule), now)
                metrics.budget_remaining(rule, left[rule])
        return left

    def snapshot(self, policies: dict[str, RuleGuards], now: float) -> dict[str, Any]:
        """What ``GET /v1/guards`` shows (times RFC 3339, durations in seconds)."""
        budgets = [{"rule": rule, "remaining": left, "count": b.count,
                    "per_s": seconds(b.per)}
                   for rule, left in self.publish_budgets(policies, now).items()
                   if (b := policies[rule].max_runs) is not None]
        if self.config.max_runs is not None:
            budgets.append({"rule": _FLEET, "count": self.config.max_runs.count,
                            "per_s": seconds(self.config.max_runs.per),
                            "remaining": self.remaining(self.config.max_runs,
                                                        self.starts.get(_FLEET), now)})
        windows = [w.name for w in self.config.maintenance if w.active(now)]
        windows += [f"{rule}:{w.name}" for rule, p in policies.items()
                    for w in p.maintenance if w.active(now)]
        return {
            "breakers": [{"scope": s, "state": "open" if now < b.until else "closing",
                          "opened": rfc3339(b.opened), "closes": rfc3339(b.until),
                          "reason": b.reason}
                         for s, b in self.breakers.items()],
            "budgets": budgets,
            "windows_active": windows,
            "flapping": [{"scope": s, "since": rfc3339(t)} for s, t in self.flapping.items()],
            "under_remediation": {g: sorted(keys) for g, keys in self.remediating.items()
                                  if keys},
            "silences": None if self.silences is None else {
                "active": len(self.silences.active), "fetched": rfc3339(self.silences.fetched),
                "error": self.silences.error},
        }


def _count_since(times: list[float] | None, since: float) -> int:
    if not times:
        return 0
    return len(times) - bisect.bisect_left(times, since)
