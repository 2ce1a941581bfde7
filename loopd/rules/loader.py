"""Load rule files: YAML with line numbers, validated rule by rule.

One bad rule never stops the others: each error is collected as a
``RuleError`` that says ``file:line rule field: what is wrong``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import yaml
from pydantic import ValidationError

from loopd import yamlfile
from loopd.errors import RuleError
from loopd.policy import Escalate
from loopd.rules.compile import CompiledRule, check_rule, escalate_problems
from loopd.rules.model import Rule

TargetCheck = Callable[[str, str], str | None]
"""(kind, target) -> None when known, else a message saying what is wrong."""


class InputCheck(Protocol):
    """(kind, target, input) -> what is wrong with giving ``input`` to that known target;
    ``unsafe_shell``: inputs the rule accepts may carry event data into a shell."""

    def __call__(self, kind: str, target: str, values: dict[str, Any], *,
                 unsafe_shell: Collection[str] = ()) -> list[str]: ...


log = structlog.get_logger("loopd.rules")

OUTCOME_SOURCE = "loopd"
"""The source of outcome events (loopd's own): always a valid ``on.source``."""


@dataclass(slots=True)
class RuleSet:
    rules: list[CompiledRule] = field(default_factory=list)
    errors: list[RuleError] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    by_file: dict[Path, list[CompiledRule]] = field(default_factory=dict)
    kept: list[Path] = field(default_factory=list)
    """Files that could not be parsed this time, whose previously loaded rules stay."""


def rule_files(paths: Iterable[Path]) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` under the given files and folders, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")))
        else:
            found.append(path)
    return found


@dataclass(slots=True, frozen=True)
class _Checks:
    target: TargetCheck | None
    input: InputCheck | None
    sources: frozenset[str] | None


def load_rules(paths: Iterable[Path], check_target: TargetCheck | None = None, *,
               check_input: InputCheck | None = None, sources: Iterable[str] | None = None,
               previous: RuleSet | None = None) -> RuleSet:
    """Load, check and compile every rule of the files under ``paths``.

    ``check_target``/``check_input`` check what a rule runs (and its escalation) against
    the packs; ``sources``, when given, are the configured source names ``on.source``
    may name (besides ``loopd``). With ``previous`` (a reload), a file that cannot be
    read or parsed as a whole keeps the rules ``previous`` loaded from it; it is
    listed in ``kept`` and its error reported.
    """
    checks = _Checks(check_target, check_input,
                     None if sources is None else frozenset(sources) | {OUTCOME_SOURCE})
    result = RuleSet()
    seen: dict[str, str] = {}
    for path in rule_files(paths):
        result.files.append(path)
        found: list[CompiledRule] = []
        read = _read(path, result.errors)
        if read is None:
            if previous is None or path not in previous.by_file:
                continue
            result.kept.append(path)
            for rule in previous.by_file[path]:
                gone = checks.target(rule.kind, rule.target) if checks.target else None
                if gone:  # the packs changed under the kept rule
                    result.errors.append(RuleError(
                        f"{gone}; the previously loaded rule is dropped",
                        origin=rule.origin, rule=rule.name, field=f"run.{rule.kind}"))
                    continue
                if rule.name in seen:
                    result.errors.append(RuleError(
                        f"duplicate rule name (first defined at {seen[rule.name]}); the "
                        "previously loaded rule is dropped", origin=rule.origin,
                        rule=rule.name, field="name"))
                    continue
                seen[rule.name] = rule.origin
                found.append(rule)
        for origin, raw, lines in read or ():
            compiled = _load_one(origin, raw, lines, checks, seen, result.errors)
            if compiled is not None:
                found.append(compiled)
        result.by_file[path] = found
        result.rules.extend(found)
    _check_inhibits(result)
    return result


def _check_inhibits(result: RuleSet) -> None:
    """A rule whose ``inhibits`` names a rule that is not loaded is an error (and is not
    loaded either: it would hold back nothing, or the wrong rule after a rename)."""
    names = {r.name for r in result.rules}
    bad = {}
    for rule in result.rules:
        unknown = [n for n in rule.rule.inhibits if n not in names]
        if unknown:
            bad[rule.name] = rule
            result.errors.append(RuleError(
                f"inhibits unknown rule(s) {', '.join(map(repr, unknown))} (or rules that "
                "failed to load)", origin=rule.origin, rule=rule.name, field="inhibits"))
    if bad:
        result.rules = [r for r in result.rules if r.name not in bad]
        for path, rules in result.by_file.items():
            result.by_file[path] = [r for r in rules if r.name not in bad]


def _load_one(origin: str, raw: dict[str, Any], lines: dict[str, str], checks: _Checks,
              seen: dict[str, str], errors: list[RuleError]) -> CompiledRule | None:
    """One rule compiled, or None with every problem it has added to ``errors``."""
    name = raw.get("name") if isinstance(raw.get("name"), str) else None
    try:
        rule = Rule.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            fld = ".".join(p.rstrip("_") for p in loc) or None
            line = lines.get(loc[0].rstrip("_"), origin) if loc else origin
            errors.append(RuleError(_msg(err), origin=line, rule=name, field=fld))
        return None
    if rule.name in seen:
        errors.append(RuleError(
            f"duplicate rule name (first defined at {seen[rule.name]})",
            origin=origin, rule=rule.name, field="name"))
        return None
    seen[rule.name] = origin
    problems: list[RuleError] = []

    def fail(message: str, fld: str) -> None:
        problems.append(RuleError(message, rule=rule.name, field=fld))

    several = "all" if rule.all is not None else "any" if rule.any is not None else None
    for i, condition in enumerate(rule.conditions):
        source = condition.on.source
        if checks.sources is not None and source is not None and source not in checks.sources:
            known = ", ".join(sorted(checks.sources))
            where = f"{several}[{i}].on.source" if several else "on.source"
            fail(f"unknown source {source!r} (configured: {known})", where)
    unsafe = rule.unsafe_shell
    for fld, message in target_problems(rule.run.kind, rule.run.target, rule.run.input,
                                        checks.target, checks.input, unsafe):
        fail(message, f"run.{fld}")
    escalate = rule.guards.escalate
    if escalate is not None:
        kind = "workflow" if escalate.workflow else "action"
        # unsafe_shell is about run.input only: an escalation gets no opt-out
        for fld, message in target_problems(kind, escalate.workflow or escalate.action or "",
                                            escalate.input, checks.target, checks.input):
            fail(message, f"guards.escalate.{fld}")
    compiled, compile_errors = check_rule(rule, origin)
    problems.extend(compile_errors)
    located = []
    for problem in problems:
        top = (problem.field or "").split(".")[0].split("[")[0]
        located.append(RuleError(problem.message, origin=lines.get(top, origin),
                                 rule=rule.name, field=problem.field))
    # in the order of the file: ``origin`` ends in the line number
    errors.extend(sorted(located, key=lambda e: int((e.origin or ":0").rpartition(":")[2])))
    if problems:
        return None
    if unsafe:  # at every load: the opt-out stays visible
        log.warning("rule passes event data to a shell verbatim (unsafe_shell)",
                    rule=rule.name, origin=lines.get("unsafe_shell", origin),
                    inputs=list(unsafe))
    return compiled


def global_escalation_problems(escalate: Escalate | None, config_file: Path | None,
                               check_target: TargetCheck | None,
                               check_input: InputCheck | None) -> list[RuleError]:
    """The problems of loopd.yaml's ``guards.escalate`` (target, input, templates)."""
    if escalate is None:
        return []
    origin = str(config_file) if config_file is not None else "loopd.yaml"
    if config_file is not None:
        # the file was read a moment ago; should it fail now, the message still names it
        with contextlib.suppress(OSError, yaml.YAMLError):
            origin = yamlfile.key_lines(yamlfile.compose(config_file.read_text())[1],
                                        config_file).get("guards", origin)
    kind = "workflow" if escalate.workflow else "action"
    found = target_problems(kind, escalate.workflow or escalate.action or "", escalate.input,
                            check_target, check_input)
    found += escalate_problems(escalate)
    return [RuleError(message, origin=origin, field=f"guards.escalate.{fld}")
            for fld, message in found]


def target_problems(kind: str, target: str, input: dict[str, Any],
                    check_target: TargetCheck | None, check_input: InputCheck | None,
                    unsafe_shell: Collection[str] = ()) -> list[tuple[str, str]]:
    """(field, problem) for running ``target`` with ``input``: unknown, or input it refuses
    (including event data for an input its command runs verbatim, see taint.py)."""
    if check_target is not None:
        problem = check_target(kind, target)
        if problem:
            return [(kind, problem)]
    if check_input is None:
        return []
    return [("input", p) for p in check_input(kind, target, input, unsafe_shell=unsafe_shell)]


def _msg(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def _read(path: Path, errors: list[RuleError]
          ) -> list[tuple[str, dict[str, Any], dict[str, str]]] | None:
    """(origin, raw rule, field -> file:line) for each rule in one file; None when the file
    cannot be read or parsed as a whole (its error is in ``errors``)."""
    try:
        data, node = yamlfile.compose(path.read_text())
    except OSError as exc:
        errors.append(RuleError(f"cannot read: {exc.strerror}", origin=str(path)))
        return None
    except yaml.YAMLError as exc:
        where, message = yamlfile.error_where(exc, path)
        errors.append(RuleError(message, origin=where))
        return None
    if data is None or node is None:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        errors.append(RuleError("a rule file is a mapping with a 'rules:' list",
                                origin=f"{path}:1"))
        return None
    unknown = set(data) - {"rules"}
    if unknown:
        errors.append(RuleError(f"unknown top-level field(s): {', '.join(sorted(unknown))}",
                                origin=f"{path}:1"))
    rules_node = next(v for k, v in node.value if k.value == "rules")
    out = []
    for raw, rnode in zip(data["rules"], rules_node.value, strict=True):
        origin = f"{path}:{rnode.start_mark.line + 1}"
        if not isinstance(raw, dict):
            errors.append(RuleError("a rule must be a mapping", origin=origin))
            continue
        lines = {k.value: f"{path}:{k.start_mark.line + 1}" for k, _ in rnode.value}
        out.append((origin, raw, lines))
    return out
