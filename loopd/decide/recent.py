"""The events the engine decided lately, to recognise a redelivery without asking the
store (the store's unique decisions still refuse one that comes later than this).

The last ``size`` of them, oldest forgotten first, by when they were first decided. An
``OrderedDict`` of ``(source, id)`` tuples took about 220 bytes an event (its node, the
tuple, the id it kept alive): 45 MB for the default window of 200,000, which a long
backlog fills. Here an event is one string (its source's number and its id) in a set and
a deque: about 115 bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class RecentEvents:
    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: set[str] = set()
        self._order: deque[str] = deque()
        self._prefixes: dict[str, str] = {}

    def _ident(self, source: str, event_id: str) -> str:
        # the source's number here, then ":": up to the first ":" is a number naming one
        # source, so no two (source, id) pairs make the same string
        prefix = self._prefixes.get(source)
        if prefix is None:
            prefix = self._prefixes[source] = f"{len(self._prefixes)}:"
        return prefix + event_id

    def seen(self, source: str, event_id: str) -> bool:
        return self._ident(source, event_id) in self._ids

    def add(self, source: str, event_id: str) -> None:
        ident = self._ident(source, event_id)
        ids = self._ids
        if ident in ids:
            return
        ids.add(ident)
        order = self._order
        order.append(ident)
        if len(order) > self.size:
            ids.discard(order.popleft())

    def extend(self, idents: Iterable[tuple[str, str]]) -> None:
        for source, event_id in idents:
            self.add(source, event_id)

    def __len__(self) -> int:
        return len(self._order)
