"""Compile a validated Rule into closures: the hot path never walks raw config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loopd.errors import ConfigError, RuleError
from loopd.events import Event
from loopd.expr.compiler import Compiled, compile_expression, compile_template
from loopd.expr.names import problems, templates, topic_captures
from loopd.expr.topics import compile_topic_pattern
from loopd.policy import Escalate
from loopd.rules.model import Rule, Scalar, Throttle

# Names a rule's condition and templates can read.
RULE_SCOPE = frozenset({"event", "vars", "inventory", "telemetry", "now", "key", "entity"})
# Names an escalation's input can read (see loopd.decide.incidents: _escalate).
ESCALATE_SCOPE = frozenset({"rule", "key", "reason", "entity", "now"})

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
    """Compile one rule; raises its first problem (``check_rule`` lists them all)."""
    compiled, errors = check_rule(rule, origin)
    if compiled is None:
        raise errors[0]
    return compiled


def check_rule(rule: Rule, origin: str) -> tuple[CompiledRule | None, list[RuleError]]:
    """Compile one rule, collecting every problem: (the rule or None, the problems)."""
    errors: list[RuleError] = []

    def fail(message: str, fld: str) -> None:
        errors.append(RuleError(message, rule=rule.name, field=fld))

    matches: list[tuple[Path, tuple[Scalar, ...]]] = []
    for dotted, expected in rule.on.match.items():
        values = tuple(expected) if isinstance(expected, list) else (expected,)
        if not values:
            fail("match list is empty", f"on.match.{dotted}")
        matches.append((tuple(dotted.split(".")), values))
    # The index (matcher.py) picks the most selective equality; accepts() checks them all.
    checks = tuple((p, _hashable(v)) for p, v in matches)

    topic = None
    if rule.on.topic is not None:
        try:
            topic = compile_topic_pattern(rule.on.topic)
        except ConfigError as exc:
            fail(exc.message, "on.topic")
    members = {"vars": topic_captures(rule.on.topic)}

    def names(value: Any, fld: str) -> None:
        for where, piece in templates(value, fld):
            for problem in problems(piece, RULE_SCOPE, members=members):
                fail(problem, where)

    def expr(text: str | None, fld: str) -> Compiled | None:
        if text is None:
            return None
        try:
            compiled = compile_expression(text, RULE_SCOPE)
        except ValueError as exc:
            fail(str(exc), fld)
            return None
        for problem in problems(text, RULE_SCOPE, expression=True, members=members):
            fail(problem, fld)
        return compiled

    def tmpl(value: Any, fld: str) -> Compiled | None:
        try:
            compiled = compile_template(value, RULE_SCOPE)
        except ValueError as exc:
            fail(str(exc), fld)
            return None
        names(value, fld)
        return compiled

    condition = expr(rule.if_, "if")
    key = tmpl(rule.key, "key") if rule.key is not None else None
    inputs = tmpl(rule.run.input, "run.input")
    if rule.guards.escalate is not None:
        for fld, message in escalate_problems(rule.guards.escalate):
            fail(message, f"guards.escalate.{fld}")
    if errors or inputs is None:
        return None, errors
    return CompiledRule(
        name=rule.name, origin=origin, rule=rule, source=rule.on.source,
        matches=tuple(matches), checks=checks, topic=topic, condition=condition, key=key,
        for_s=rule.for_, throttle=rule.throttle, kind=rule.run.kind, target=rule.run.target,
        input=inputs, for_resolved=rule.on.match.get("status") in ("resolved", ["resolved"]),
    ), []


def escalate_problems(escalate: Escalate) -> list[tuple[str, str]]:
    """(field, problem) for an escalation's input templates, read with ESCALATE_SCOPE."""
    out: list[tuple[str, str]] = []
    try:
        compile_template(escalate.input, ESCALATE_SCOPE)
    except ValueError as exc:
        return [("input", str(exc))]
    for fld, text in templates(escalate.input, "input"):
        out.extend((fld, p) for p in problems(text, ESCALATE_SCOPE))
    return out
