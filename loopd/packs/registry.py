"""Pack discovery: folders under ``packs/`` become actions (and workflows).

Registries are plain dicts filled by ``PackRegistry.load``; importing a module
registers nothing. A pack's ``actions.py`` is loaded from its file with
importlib (its functions are looked up by the names ``pack.yaml`` gives), so a
pack never needs to be installed as a package. A broken pack is reported with
its file and the other packs keep working.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from loopd import yamlfile
from loopd.catalog.credentials import parse_reference
from loopd.errors import ConfigError, PackError
from loopd.expr.compiler import WORKFLOW_SCOPE, Compiled, compile_template
from loopd.expr.names import problems, templates
from loopd.packs.manifest import (
    ActionSpec,
    HttpAction,
    InputField,
    PackManifest,
    PublishAction,
    PythonAction,
    SshAction,
)
from loopd.packs.taint import raw_inputs, shell_problems, untrusted_reads


@dataclass(slots=True)
class Action:
    name: str                       # pack.action
    pack: Pack
    spec: ActionSpec
    func: Callable[..., Any] | None = None
    input_model: type[BaseModel] | None = None
    rollback_input: Compiled | None = None
    raw_inputs: frozenset[str] = frozenset()  # inserted verbatim by its command (taint.py)
    secret_inputs: frozenset[str] = frozenset()  # declared ``secret: true``: references


@dataclass(slots=True)
class Pack:
    manifest: PackManifest
    path: Path
    config: dict[str, Any]
    actions: dict[str, Action] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest.name


@dataclass(slots=True)
class PackRegistry:
    packs: dict[str, Pack] = field(default_factory=dict)
    actions: dict[str, Action] = field(default_factory=dict)
    workflows: dict[str, Any] = field(default_factory=dict)
    workflow_inputs: dict[str, dict[str, InputField]] = field(default_factory=dict)
    errors: list[PackError] = field(default_factory=list)

    def check_target(self, kind: str, target: str) -> str | None:
        """For rule validation: None when ``target`` exists, else the problem."""
        table: dict[str, Any] = self.actions if kind == "action" else self.workflows
        if target in table:
            return None
        pack = target.partition(".")[0]
        if pack not in self.packs:
            known = ", ".join(sorted(self.packs)) or "none"
            return f"unknown pack {pack!r} in {kind} {target!r} (packs: {known})"
        return f"pack {pack!r} has no {kind} {target.partition('.')[2]!r}"

    def check_input(self, kind: str, target: str, values: dict[str, Any], *,
                    partial: bool = False, unsafe_shell: Collection[str] = ()) -> list[str]:
        """For rule and workflow validation: what is wrong with giving ``values`` (constants
        or templates) to a known target; ``partial``: values may come later (with_items).
        A template reading event-derived data for an input the action's command inserts
        verbatim is a problem unless that input is listed in ``unsafe_shell`` (taint.py)."""
        if kind == "workflow":
            declared = self.workflow_inputs.get(target)
            out = [] if declared is None else _field_problems(target, declared, values,
                                                             partial)
            if unsafe_shell:  # a workflow's inputs reach no shell; its tasks' may
                out.append(f"unsafe_shell does not apply to a workflow ({target}): list the "
                           "input in the unsafe_shell of the task that runs the action")
            return out
        action = self.actions.get(target)
        if action is None:
            return []
        out = _field_problems(target, action.spec.input, values, partial)
        out += _one_of_problems(target, action.spec.one_of, values, partial)
        out += shell_problems(target, action.raw_inputs, values, unsafe_shell,
                              argv="argv" in action.spec.input)
        out += _secret_input_problems(target, action.spec.input, values)
        if action.input_model is not None:
            out += [p for p in _model_problems(target, action.input_model, values, partial)
                    if p not in out]
        return out

    @classmethod
    def load(cls, paths: Iterable[Path], pack_config: dict[str, dict[str, Any]] | None = None
             ) -> PackRegistry:
        reg = cls()
        pack_config = pack_config or {}
        for root in paths:
            if not root.is_dir():
                reg.errors.append(PackError("packs folder does not exist", origin=str(root)))
                continue
            for folder in sorted(p for p in root.iterdir() if (p / "pack.yaml").is_file()):
                try:
                    pack, action_problems = _load_pack(folder, pack_config)
                except PackError as exc:
                    reg.errors.append(exc)
                    continue
                reg.errors += action_problems
                if pack.name in reg.packs:
                    reg.errors.append(PackError(
                        f"duplicate pack name {pack.name!r} (also in {reg.packs[pack.name].path})",
                        origin=str(folder / "pack.yaml")))
                    continue
                reg.packs[pack.name] = pack
                reg.actions.update(pack.actions)
        unknown = set(pack_config) - set(reg.packs)
        for name in sorted(unknown):
            reg.errors.append(PackError(f"configuration for unknown pack {name!r}",
                                        origin="loopd.yaml pack_config"))
        return reg


def validate_fields(fields: dict[str, InputField], values: dict[str, Any], what: str, *,
                    one_of: list[str] | None = None) -> dict[str, Any]:
    """Apply defaults, check required fields, types and patterns, and that exactly one of
    ``one_of`` is given; raise ValueError naming the field."""
    unknown = set(values) - set(fields)
    if unknown and fields:
        raise ValueError(f"{what}: unknown field(s) {', '.join(sorted(unknown))}")
    if one_of:
        given = [n for n in one_of if values.get(n) is not None]
        if len(given) != 1:
            raise ValueError(f"{what}: give exactly one of {', '.join(one_of)}"
                             + (f" (got {', '.join(given)})" if given else ""))
    out = dict(values)
    for name, spec in fields.items():
        if name not in out or out[name] is None:
            if spec.required:
                raise ValueError(f"{what}: {name} is required")
            out[name] = spec.default
        problem = spec.check(name, out[name])
        if problem:
            raise ValueError(f"{what}: {problem}")
    return out


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _field_problems(target: str, fields: dict[str, InputField], values: dict[str, Any],
                    partial: bool) -> list[str]:
    if not fields:
        return []  # nothing declared: the target takes any input
    out = []
    unknown = sorted(set(values) - set(fields))
    if unknown:
        out.append(f"{target} takes no input {', '.join(unknown)} "
                   f"(it takes {', '.join(sorted(fields))})")
    missing = [f for f, spec in fields.items()
               if spec.required and spec.default is None and f not in values]
    if missing and not partial:
        out.append(f"{target} needs {', '.join(missing)}")
    for name, value in values.items():
        spec = fields.get(name)
        if spec is not None and not _is_template(value):
            problem = spec.check(name, value)
            if problem:
                out.append(f"{target} input {problem}")
    return out


def _secret_input_problems(target: str, fields: dict[str, InputField],
                           values: dict[str, Any]) -> list[str]:
    """A ``secret: true`` input takes a reference (env:, file:, dir:, exec:), never the
    value: the run's input is stored and shown, the value behind it is resolved at use.
    Its template may read only operator data: a reference chosen by an event could read
    any file or run any helper."""
    out = []
    for name, value in values.items():
        spec = fields.get(name)
        if spec is None or not spec.secret or value is None:
            continue
        if _is_template(value):
            reads = untrusted_reads(value)
            if reads:
                out.append(f"{target} input {name!r} is secret and takes a reference, but "
                           f"this template reads {', '.join(reads)}: a reference must come "
                           "from a literal, inventory, entity or config, never from event "
                           "data")
            continue
        if not isinstance(value, str):
            out.append(f"{target} input {name!r} is secret: give a reference, not a "
                       f"{type(value).__name__}")
            continue
        try:
            parse_reference(value)
        except ConfigError as exc:
            out.append(f"{target} input {name!r} is secret: {exc}")
    return out


def _one_of_problems(target: str, one_of: list[str] | None, values: dict[str, Any],
                     partial: bool) -> list[str]:
    if not one_of:
        return []
    given = [n for n in one_of if n in values and values[n] is not None]
    if len(given) > 1 or (not given and not partial):
        return [f"{target} takes exactly one of {', '.join(one_of)}"
                + (f" (got {', '.join(given)})" if given else "")]
    return []


def _model_problems(target: str, model: type[BaseModel], values: dict[str, Any],
                    partial: bool) -> list[str]:
    """The keys a python action's input model refuses or needs (values are templates)."""
    names: set[str] = set()
    missing = []
    for name, info in model.model_fields.items():
        keys = {name, *(k for k in (info.alias, info.validation_alias) if isinstance(k, str))}
        names |= keys
        if info.is_required() and not keys & set(values):
            missing.append(name)
    out = []
    unknown = sorted(set(values) - names)
    if unknown and model.model_config.get("extra") == "forbid":
        out.append(f"{target} takes no input {', '.join(unknown)} "
                   f"(it takes {', '.join(sorted(names))})")
    if missing and not partial:
        out.append(f"{target} needs {', '.join(missing)}")
    return out


# the names each runner's templates are rendered with (see packs/ssh.py, http.py, publish.py)
_RUNNER_SCOPES = {"input": frozenset({"input"}),
                  "command": frozenset({"input", "raw", "entity", "config"}),
                  "other": frozenset({"input", "config"})}


def _runner_templates(spec: ActionSpec) -> list[tuple[str, Any, frozenset[str]]]:
    """(field, template, names its scope holds) of an action's runner settings."""
    other = _RUNNER_SCOPES["other"]
    if isinstance(spec, SshAction):
        return [("host", spec.host, _RUNNER_SCOPES["input"]),
                ("command", spec.command, _RUNNER_SCOPES["command"])]
    if isinstance(spec, HttpAction):
        out = [("method", spec.method, other), ("url", spec.url, other),
               ("headers", spec.headers, other), ("query", spec.query, other),
               ("json", spec.json_body, other), ("form", spec.form, other)]
        if spec.auth is not None:
            out.append(("auth.credentials", spec.auth.credentials, other))
        return out
    if isinstance(spec, PublishAction):
        return [("topic", spec.topic, other), ("payload", spec.payload, other),
                ("key", spec.key, other)]
    return []


def _template_problems(spec: ActionSpec, manifest: PackManifest) -> list[tuple[str, str]]:
    """(field, problem) for an action's runner templates: syntax, unknown names, and
    ``config.X`` when the pack declares no config field X."""
    members: dict[str, Collection[str] | None] = {}
    if manifest.config:
        members["config"] = manifest.config
    out: list[tuple[str, str]] = []
    for fld, value, scope in _runner_templates(spec):
        if value is None:
            continue
        try:
            compile_template(value, scope)
        except ValueError as exc:
            out.append((fld, str(exc)))
            continue
        for where, text in templates(value, fld):
            out.extend((where, p) for p in problems(text, scope, members=members))
    return out


def _action_lines(node: yaml.Node | None, path: Path) -> dict[str, str]:
    """Action name -> ``pack.yaml:line`` of its key under ``actions:``."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    for key, value in node.value:
        if key.value == "actions":
            return yamlfile.key_lines(value, path)
    return {}


def _load_pack(folder: Path, pack_config: dict[str, dict[str, Any]]
               ) -> tuple[Pack, list[PackError]]:
    """The pack and the problems of actions it keeps; PackError when it is unusable."""
    manifest_path = folder / "pack.yaml"
    try:
        raw, node = yamlfile.compose(manifest_path.read_text())
        manifest = PackManifest.model_validate(raw)
    except yaml.YAMLError as exc:
        where, message = yamlfile.error_where(exc, manifest_path)
        raise PackError(message, origin=where) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise PackError(f"{loc}: {msg}", origin=str(manifest_path)) from None
    try:
        config = validate_fields(manifest.config, pack_config.get(manifest.name, {}), "config")
    except ValueError as exc:
        raise PackError(f"pack {manifest.name}: {exc}", origin=str(manifest_path)) from None
    pack = Pack(manifest, folder, config)
    module = None
    lines = _action_lines(node, manifest_path)
    found: list[PackError] = []
    for short, spec in manifest.actions.items():
        action = Action(f"{manifest.name}.{short}", pack, spec, secret_inputs=frozenset(
            name for name, f in spec.input.items() if f.secret))
        if isinstance(spec, SshAction):
            action.raw_inputs = raw_inputs(spec.command)
        found += [PackError(f"actions.{short}.{fld}: {problem}",
                            origin=lines.get(short, str(manifest_path)))
                  for fld, problem in _template_problems(spec, manifest)]
        if spec.rollback is not None:
            try:
                action.rollback_input = compile_template(spec.rollback.input, WORKFLOW_SCOPE)
            except ValueError as exc:
                raise PackError(f"actions.{short}.rollback.input: {exc}",
                                origin=str(manifest_path)) from None
        if isinstance(spec, PythonAction):
            module = module or _load_module(folder, manifest.name)
            entry = spec.entry or short
            func = getattr(module, entry, None)
            if func is None or not inspect.iscoroutinefunction(func):
                raise PackError(f"actions.{short}: actions.py has no async function {entry!r}",
                                origin=str(manifest_path))
            action.func = func
            try:
                action.input_model = _input_model(func)
            except Exception as exc:  # e.g. an annotation naming what only TYPE_CHECKING imports
                raise PackError(f"actions.{short}: cannot read the signature of {entry!r}: "
                                f"{type(exc).__name__}: {exc}",
                                origin=str(folder / "actions.py")) from None
        pack.actions[action.name] = action
    return pack, found


def _load_module(folder: Path, name: str) -> ModuleType:
    path = folder / "actions.py"
    if not path.is_file():
        raise PackError("python actions need an actions.py beside pack.yaml", origin=str(folder))
    module_name = f"loopd_pack_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PackError("cannot load actions.py", origin=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses/pydantic look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken pack must not take the daemon down
        sys.modules.pop(module_name, None)
        raise PackError(f"actions.py failed to import: {type(exc).__name__}: {exc}",
                        origin=str(path)) from None
    return module


def _input_model(func: Callable[..., Any]) -> type[BaseModel] | None:
    params = list(inspect.signature(func, eval_str=True).parameters.values())
    if not params:
        return None
    annotation = params[0].annotation
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    return None
