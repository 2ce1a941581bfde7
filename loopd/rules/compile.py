"""Compile a validated Rule into closures: the hot path never walks raw config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loopd.errors import ConfigError, RuleError
from loopd.events import Event
from loopd.expr.compiler import Compiled, compile_expression, compile_template
from loopd.expr.topics import compile_topic_pattern
from loopd.rules.model import Rule, Scalar, Throttle

# Names a rule's condition and templates can read.
RULE_SCOPE = frozenset({"event", "vars", "inventory", "telemetry", "now", "key", "entity"})

Path = tuple[str, ...]
_MISSING = object()


def lookup(data: Any, path: Path) -> Any:
    """Follow a dotted path through nested dicts; ``_MISSING`` when absent."""
    for part in path:
        if not isinstance(data, dict):
            return _MISSING
        data = data.get(part, _MISSING)
        if data is _MISSING:
            return _MISSING
    return data


@dataclass(slots=True, eq=False)
class CompiledRule:
    name: str
    origin: str
    rule: Rule
    source: str | None
    matches: tuple[tuple[Path, tuple[Scalar, ...]], ...]
    checks: tuple[tuple[Path, frozenset[Scalar]], ...]
    topic: Callable[[str], dict[str, str] | None] | None
    condition: Compiled | None
    key: Compiled | None
    for_s: float | None
    throttle: Throttle | None
    kind: str
    target: str
    input: Compiled
    for_resolved: bool = False  # on.match says status: resolved: the rule acts on resolution

    def accepts(self, event: Event) -> dict[str, str] | None:
        """The topic variables when ``on`` matches the event, else None."""
        data = event.data
        try:
            for path, values in self.checks:
                value = lookup(data, path)
                if value is _MISSING or value not in values:
                    return None
        except TypeError:  # an unhashable value (dict/list) never equals a scalar
            return None
        if self.topic is None:
            return event.vars
        captured = self.topic(event.topic)
        if captured is None:
            return None
        return {**event.vars, **captured} if event.vars else captured


def _hashable(values: tuple[Scalar, ...]) -> frozenset[Scalar]:
    return frozenset(values)


def compile_rule(rule: Rule, origin: str) -> CompiledRule:
    matches: list[tuple[Path, tuple[Scalar, ...]]] = []
    for dotted, expected in rule.on.match.items():
        values = tuple(expected) if isinstance(expected, list) else (expected,)
        if not values:
            raise RuleError("match list is empty", rule=rule.name, field=f"on.match.{dotted}")
        matches.append((tuple(dotted.split(".")), values))
    # The index (matcher.py) picks the most selective equality; accepts() checks them all.
    checks = tuple((p, _hashable(v)) for p, v in matches)

    def expr(text: str | None, fld: str) -> Compiled | None:
        if text is None:
            return None
        try:
            return compile_expression(text, RULE_SCOPE)
        except ValueError as exc:
            raise RuleError(str(exc), rule=rule.name, field=fld) from None

    topic = None
    if rule.on.topic is not None:
        try:
            topic = compile_topic_pattern(rule.on.topic)
        except ConfigError as exc:
            raise RuleError(exc.message, rule=rule.name, field="on.topic") from None
    key = None
    if rule.key is not None:
        try:
            key = compile_template(rule.key, RULE_SCOPE)
        except ValueError as exc:
            raise RuleError(str(exc), rule=rule.name, field="key") from None
    try:
        inputs = compile_template(rule.run.input, RULE_SCOPE)
    except ValueError as exc:
        raise RuleError(str(exc), rule=rule.name, field="run.input") from None
    return CompiledRule(
        name=rule.name, origin=origin, rule=rule, source=rule.on.source,
        matches=tuple(matches), checks=checks, topic=topic, condition=expr(rule.if_, "if"), key=key,
        for_s=rule.for_, throttle=rule.throttle, kind=rule.run.kind, target=rule.run.target,
        input=inputs, for_resolved=rule.on.match.get("status") in ("resolved", ["resolved"]),
    )
