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
from loopd.rules.model import Condition, Rule, Scalar, Throttle

# Names a rule's condition and templates can read.
RULE_SCOPE = frozenset({"event", "vars", "inventory", "telemetry", "now", "key", "entity"})
# What a group rule's run.input also reads (its members), and an all rule's (the events
# that matched each condition, in condition order)
GROUP_SCOPE = RULE_SCOPE | {"members"}
ALL_SCOPE = RULE_SCOPE | {"matched"}
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
    # correlation (loopd.decide.correlation): "group", "absent" or "all"; None for the rest
    # (an ``any`` rule is an ordinary rule with several conditions)
    correlation: str | None = None
    group_by: Compiled | None = None  # group.by, rendered with the member as ``key``
    # the rule's other conditions (all/any), each a CompiledRule of the same rule with its
    # own on/if; ``part`` is the condition's position (0 for this one)
    parts: tuple[CompiledRule, ...] = ()
    part: int = 0

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

    for fld, message in rule.correlation_problems():
        fail(message, fld)
    several = "all" if rule.all is not None else "any" if rule.any is not None else None
    conditions = [
        _condition(c, f"{several}[{i}]." if several else "", fail)
        for i, c in enumerate(rule.conditions)]
    # vars the key and input may read: what every condition's topic captures
    captured = [topic_captures(c.on.topic) for c in rule.conditions]
    common = None if any(c is None for c in captured) else frozenset.intersection(
        *[c for c in captured if c is not None])
    members = {"vars": common}

    def tmpl(value: Any, fld: str, scope: frozenset[str] = RULE_SCOPE) -> Compiled | None:
        try:
            compiled = compile_template(value, scope)
        except ValueError as exc:
            fail(str(exc), fld)
            return None
        for where, piece in templates(value, fld):
            for problem in problems(piece, scope, members=members):
                fail(problem, where)
        return compiled

    key = tmpl(rule.key, "key") if rule.key is not None else None
    group_by = tmpl(rule.group.by, "group.by") if rule.group is not None else None
    scope = GROUP_SCOPE if rule.group is not None else ALL_SCOPE if rule.all is not None \
        else RULE_SCOPE
    inputs = tmpl(rule.run.input, "run.input", scope)
    if rule.guards.escalate is not None:
        for fld, message in escalate_problems(rule.guards.escalate):
            fail(message, f"guards.escalate.{fld}")
    if errors or inputs is None or any(c is None for c in conditions):
        return None, errors
    correlation = "group" if rule.group is not None else "absent" \
        if rule.absent is not None else "all" if rule.all is not None else None
    compiled = [
        CompiledRule(
            name=rule.name, origin=origin, rule=rule, source=c.source, matches=c.matches,
            checks=c.checks, topic=c.topic, condition=c.condition, key=key,
            for_s=rule.for_, throttle=rule.throttle, kind=rule.run.kind,
            target=rule.run.target, input=inputs, for_resolved=c.for_resolved,
            correlation=correlation, group_by=group_by, part=i)
        for i, c in enumerate(conditions) if c is not None]
    first = compiled[0]
    first.parts = tuple(compiled[1:])
    return first, []


@dataclass(frozen=True, slots=True)
class _Matcher:
    """One condition compiled: what ``accepts`` and the condition check read."""

    source: str | None
    matches: tuple[tuple[Path, tuple[Scalar, ...]], ...]
    checks: tuple[tuple[Path, frozenset[Scalar]], ...]
    topic: Callable[[str], dict[str, str] | None] | None
    condition: Compiled | None
    for_resolved: bool


def _condition(cond: Condition, prefix: str, fail: Callable[[str, str], None]
               ) -> _Matcher | None:
    """Compile one ``on`` + ``if`` (a rule's own, or one of its all/any conditions)."""
    before = [False]

    def failed(message: str, fld: str) -> None:
        before[0] = True
        fail(message, prefix + fld)

    matches: list[tuple[Path, tuple[Scalar, ...]]] = []
    for dotted, expected in cond.on.match.items():
        values = tuple(expected) if isinstance(expected, list) else (expected,)
        if not values:
            failed("match list is empty", f"on.match.{dotted}")
        matches.append((tuple(dotted.split(".")), values))
    # The index (matcher.py) picks the most selective equality; accepts() checks them all.
    checks = tuple((p, _hashable(v)) for p, v in matches)
    topic = None
    if cond.on.topic is not None:
        try:
            topic = compile_topic_pattern(cond.on.topic)
        except ConfigError as exc:
            failed(exc.message, "on.topic")
    condition = None
    if cond.if_ is not None:
        members = {"vars": topic_captures(cond.on.topic)}
        try:
            condition = compile_expression(cond.if_, RULE_SCOPE)
        except ValueError as exc:
            failed(str(exc), "if")
        for problem in problems(cond.if_, RULE_SCOPE, expression=True, members=members):
            failed(problem, "if")
    if before[0]:
        return None
    return _Matcher(cond.on.source, tuple(matches), checks, topic, condition,
                    cond.on.match.get("status") in ("resolved", ["resolved"]))


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
