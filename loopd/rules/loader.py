"""Load rule files: YAML with line numbers, validated rule by rule.

One bad rule never stops the others: each error is collected as a
``RuleError`` that says ``file:line rule field: what is wrong``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from loopd.errors import RuleError
from loopd.rules.compile import CompiledRule, compile_rule
from loopd.rules.model import Rule
from loopd.yamlfile import Loader

TargetCheck = Callable[[str, str], str | None]
"""(kind, target) -> None when known, else a message saying what is wrong."""


@dataclass(slots=True)
class RuleSet:
    rules: list[CompiledRule] = field(default_factory=list)
    errors: list[RuleError] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def rule_files(paths: Iterable[Path]) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` under the given files and folders, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")))
        else:
            found.append(path)
    return found


def load_rules(paths: Iterable[Path], check_target: TargetCheck | None = None) -> RuleSet:
    result = RuleSet()
    seen: dict[str, str] = {}
    for path in rule_files(paths):
        result.files.append(path)
        for origin, raw, lines in _read(path, result.errors):
            name = raw.get("name") if isinstance(raw.get("name"), str) else None
            try:
                rule = Rule.model_validate(raw)
            except ValidationError as exc:
                for err in exc.errors():
                    loc = [str(p) for p in err["loc"]]
                    fld = ".".join(p.rstrip("_") for p in loc) or None
                    line = lines.get(loc[0].rstrip("_"), origin) if loc else origin
                    result.errors.append(RuleError(_msg(err), origin=line, rule=name, field=fld))
                continue
            if rule.name in seen:
                result.errors.append(RuleError(
                    f"duplicate rule name (first defined at {seen[rule.name]})",
                    origin=origin, rule=rule.name, field="name"))
                continue
            seen[rule.name] = origin
            if check_target is not None:
                problem = check_target(rule.run.kind, rule.run.target)
                if problem:
                    result.errors.append(RuleError(
                        problem, origin=lines.get("run", origin), rule=rule.name,
                        field=f"run.{rule.run.kind}"))
                    continue
            try:
                result.rules.append(compile_rule(rule, origin))
            except RuleError as exc:
                line = lines.get((exc.field or "").split(".")[0], origin)
                result.errors.append(RuleError(exc.message, origin=line, rule=rule.name,
                                               field=exc.field))
    return result


def _msg(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def _read(path: Path, errors: list[RuleError]) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """Yield (origin, raw rule, field -> file:line) for each rule in one file."""
    try:
        text = path.read_text()
    except OSError as exc:
        errors.append(RuleError(f"cannot read: {exc.strerror}", origin=str(path)))
        return []
    try:
        loader = Loader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        errors.append(RuleError(f"invalid YAML: {getattr(exc, 'problem', None) or exc}",
                                origin=where))
        return []
    if data is None or node is None:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        errors.append(RuleError("a rule file is a mapping with a 'rules:' list",
                                origin=f"{path}:1"))
        return []
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
