"""The rule index: from an event to the few rules that can match it.

Rules are bucketed by source, then by their most selective ``on.match``
equality (path -> value -> rules): ``labels.alertname`` rather than
``status: firing``, which every alert rule shares. An event costs one dict
lookup per distinct indexed path of its source, so 1,000 alert rules cost
about what 10 do.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from loopd.events import Event
from loopd.rules.compile import CompiledRule, Path, lookup
from loopd.rules.model import Scalar

_ANY = "*"


class _SourceIndex:
    __slots__ = ("by_path", "unindexed")

    def __init__(self) -> None:
        self.by_path: dict[Path, dict[Scalar, list[CompiledRule]]] = {}
        self.unindexed: list[CompiledRule] = []

    def add(self, rule: CompiledRule, popularity: Counter[tuple[Path, Scalar]]) -> None:
        if not rule.matches:
            self.unindexed.append(rule)
            return
        # the equality the fewest other rules share; ties: the rule's first
        path, values = min(rule.matches,
                           key=lambda m: max(popularity[(m[0], v)] for v in m[1]))
        table = self.by_path.setdefault(path, defaultdict(list))
        for value in values:
            table[value].append(rule)

    def collect(self, event: Event, out: list[CompiledRule]) -> None:
        data = event.data
        for path, table in self.by_path.items():
            value = lookup(data, path)
            try:
                hit = table.get(value)
            except TypeError:  # an unhashable value (dict/list) never equals a scalar
                continue
            if hit:
                out.extend(hit)
        out.extend(self.unindexed)


class RuleIndex:
    def __init__(self, rules: Iterable[CompiledRule]) -> None:
        self._sources: dict[str, _SourceIndex] = defaultdict(_SourceIndex)
        # an all/any rule is indexed once per condition (its parts)
        enabled = [part for r in rules if r.rule.enabled for part in (r, *r.parts)]
        popularity: Counter[tuple[Path, Scalar]] = Counter(
            (path, value) for r in enabled for path, values in r.matches for value in values)
        for rule in enabled:
            self._sources[rule.source or _ANY].add(rule, popularity)
        self._any = self._sources.get(_ANY)

    def candidates(self, event: Event) -> list[CompiledRule]:
        """Rules whose indexed equality holds; ``accepts`` checks the rest."""
        out: list[CompiledRule] = []
        index = self._sources.get(event.source)
        if index is not None:
            index.collect(event, out)
        if self._any is not None:
            self._any.collect(event, out)
        return out
