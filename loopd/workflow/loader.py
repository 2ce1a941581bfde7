"""Load, compile and check the workflows of every pack.

Everything that can be caught before a run is caught here and reported as
``PackError`` with ``file:line task field``: unknown actions, tasks and
sub-workflows, template syntax errors, inputs an action does not take or that fail
their pattern, run data (``ctx``, ``input``, ``result``, ``item``...) given to an input
an action's command runs verbatim (unless the task lists it in ``unsafe_shell``, then
logged at every load), and transition cycles with no way out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml
from pydantic import ValidationError

from loopd import yamlfile
from loopd.errors import ConfigError, PackError
from loopd.expr.compiler import (
    WORKFLOW_SCOPE,
    Compiled,
    compile_expression,
    compile_template,
)
from loopd.expr.names import problems, templates
from loopd.expr.topics import TopicMatcher, compile_topic_pattern
from loopd.packs.registry import PackRegistry
from loopd.rules.compile import Path as DataPath
from loopd.workflow.model import RESULT_WORDS, Task, Workflow

SCOPE = WORKFLOW_SCOPE
log = structlog.get_logger("loopd.workflows")


@dataclass(slots=True)
class CompiledEvidence:
    """A confirm task's event evidence. ``topic`` and ``match`` values are templates,
    rendered with the run's context when the task starts (``telemetry/{{ ctx.host }}/cpu``),
    which makes the evidence about this run's entity; ``condition`` says whether an event
    about it shows the fix worked."""

    source: str | None
    topic: Compiled | None
    match: tuple[tuple[DataPath, Compiled], ...]
    condition: Compiled | None
    topic_prefix: str = ""  # what every topic it can match starts with (replicas store those)


@dataclass(slots=True)
class Evidence:
    """CompiledEvidence rendered for one run: what the hub's waiter matches on."""

    source: str | None
    topic: TopicMatcher | None
    match: tuple[tuple[DataPath, frozenset[Any]], ...]
    condition: Compiled | None
    literal_topic: str | None = None  # the topic when the pattern has no wildcard
    pattern: str | None = None  # the rendered topic pattern, as the run's trace shows it


def render_evidence(ev: CompiledEvidence, scope: dict[str, Any]) -> Evidence:
    """Render for one run; raises ConditionError or ConfigError naming the part."""
    pattern = str(ev.topic(scope)) if ev.topic is not None else None
    topic = compile_topic_pattern(pattern) if pattern is not None else None
    literal = pattern if pattern is not None and not any(
        c in pattern for c in "+#{") else None
    match = []
    for path, value in ev.match:
        rendered = value(scope)
        match.append((path, frozenset(rendered if isinstance(rendered, list) else [rendered])))
    return Evidence(ev.source, topic, tuple(match), ev.condition, literal, pattern)


@dataclass(slots=True)
class CompiledTask:
    name: str
    task: Task
    origin: str
    input: Compiled
    publish: Compiled | None
    items: Compiled | None
    transitions: list[tuple[str | Compiled, list[str]]]
    retry_when: Compiled | None
    evidence: CompiledEvidence | None = None
    query: Compiled | None = None
    message: Compiled | None = None   # approval message, succeed outcome, fail reason

    @property
    def kind(self) -> str:
        return self.task.kind


@dataclass(slots=True)
class CompiledWorkflow:
    name: str
    model: Workflow
    origin: str
    tasks: dict[str, CompiledTask] = field(default_factory=dict)


def load_workflows(registry: PackRegistry) -> None:
    """Add every pack's workflows to ``registry.workflows``; errors to ``registry.errors``."""
    found: dict[str, tuple[Path, Workflow, dict[str, str]]] = {}
    for pack in registry.packs.values():
        folder = pack.path / "workflows"
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.y*ml")):
            name = f"{pack.name}.{path.stem}"
            try:
                found[name] = (path, *_read(path))
            except PackError as exc:
                registry.errors.append(exc)
    for action in registry.actions.values():
        rollback = action.spec.rollback
        if rollback is not None and rollback.action not in registry.actions:
            registry.errors.append(PackError(
                f"action {action.name} rollback: "
                f"{registry.check_target('action', rollback.action)}",
                origin=str(action.pack.path / "pack.yaml")))
    known = set(found)
    # declared inputs first: a task may start a sub-workflow compiled after it
    registry.workflow_inputs.update({name: wf.input for name, (_, wf, _) in found.items()})
    for name, (path, wf, lines) in found.items():
        try:
            registry.workflows[name] = _compile(name, path, wf, lines, registry, known)
        except PackError as exc:
            registry.errors.append(exc)
            del registry.workflow_inputs[name]


def _read(path: Path) -> tuple[Workflow, dict[str, str]]:
    try:
        raw, node = yamlfile.compose(path.read_text())
    except OSError as exc:
        raise PackError(f"cannot read: {exc.strerror}", origin=str(path)) from None
    except yaml.YAMLError as exc:
        where, message = yamlfile.error_where(exc, path)
        raise PackError(message, origin=where) from None
    lines: dict[str, str] = {}
    if node is not None and isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            lines[k.value] = f"{path}:{k.start_mark.line + 1}"
            if k.value == "tasks" and isinstance(v, yaml.MappingNode):
                for tk, _ in v.value:
                    lines[f"tasks.{tk.value}"] = f"{path}:{tk.start_mark.line + 1}"
    try:
        return Workflow.model_validate(raw), lines
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        where = lines.get(".".join(loc[:2]), lines.get(loc[0], str(path))) if loc else str(path)
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        raise PackError(f"{'.'.join(loc)}: {msg}", origin=where) from None


def _compile(name: str, path: Path, wf: Workflow, lines: dict[str, str],
             registry: PackRegistry, workflows: set[str]) -> CompiledWorkflow:
    out = CompiledWorkflow(name, wf, lines.get("tasks", str(path)))
    if wf.start is not None and wf.start not in wf.tasks:
        raise PackError(f"start: unknown task {wf.start!r}", origin=lines.get("start", str(path)))
    for tname, task in wf.tasks.items():
        origin = lines.get(f"tasks.{tname}", str(path))

        def fail(fld: str, msg: str, origin: str = origin, tname: str = tname) -> PackError:
            return PackError(f"task {tname} {fld}: {msg}", origin=origin)

        def tmpl(value: Any, fld: str) -> Compiled:
            try:
                compiled = compile_template(value, SCOPE)
            except ValueError as exc:
                raise fail(fld, str(exc)) from None
            for where, text in templates(value, fld):
                for problem in problems(text, SCOPE):
                    raise fail(where, problem)
            return compiled

        def expr(text: str, fld: str) -> Compiled:
            try:
                compiled = compile_expression(text, SCOPE)
            except ValueError as exc:
                raise fail(fld, str(exc)) from None
            for problem in problems(text, SCOPE, expression=True):
                raise fail(fld, problem)
            return compiled

        if task.action is not None:
            problem = registry.check_target("action", task.action)
            if problem:
                raise fail("action", problem)
            for problem in registry.check_input("action", task.action, task.input,
                                                partial=task.with_items is not None,
                                                unsafe_shell=task.unsafe_shell):
                raise fail("input", problem)
            if task.unsafe_shell:  # at every load: the opt-out stays visible
                log.warning("workflow task passes run data to a shell verbatim (unsafe_shell)",
                            workflow=name, task=tname, origin=origin,
                            inputs=list(task.unsafe_shell))
        elif task.unsafe_shell:
            raise fail("unsafe_shell", "only an action task passes input to a shell")
        if task.workflow is not None:
            if task.workflow not in workflows:
                raise fail("workflow", registry.check_target("workflow", task.workflow)
                           or f"unknown workflow {task.workflow!r}")
            for problem in registry.check_input("workflow", task.workflow, task.input):
                raise fail("input", problem)
        transitions: list[tuple[str | Compiled, list[str]]] = []
        for i, tr in enumerate(task.next):
            for target in tr.do:
                if target not in wf.tasks:
                    raise fail(f"next[{i}].do", f"unknown task {target!r}")
            when: str | Compiled = tr.when if tr.when in RESULT_WORDS else expr(
                tr.when, f"next[{i}].when")
            transitions.append((when, tr.do))
        for member in task.join or []:
            if member not in wf.tasks:
                raise fail("join", f"unknown task {member!r}")
        ctask = CompiledTask(
            name=tname, task=task, origin=origin, input=tmpl(task.input, "input"),
            publish=tmpl(task.publish, "publish") if task.publish else None,
            items=tmpl(task.with_items, "with_items") if task.with_items is not None else None,
            transitions=transitions,
            retry_when=expr(task.retry.when, "retry.when") if task.retry and task.retry.when
            else None,
        )
        if task.confirm is not None:
            ev = task.confirm.event
            if ev is not None:
                topic = None
                if ev.topic is not None:
                    topic = tmpl(ev.topic, "confirm.event.topic")
                    if "{{" not in ev.topic:  # a constant pattern: check it now
                        try:
                            compile_topic_pattern(ev.topic)
                        except ConfigError as exc:
                            raise fail("confirm.event.topic", exc.message) from None
                match = tuple((tuple(k.split(".")), tmpl(v, f"confirm.event.match.{k}"))
                              for k, v in ev.match.items())
                ctask.evidence = CompiledEvidence(
                    ev.source, topic, match,
                    expr(ev.if_, "confirm.event.if") if ev.if_ else None,
                    literal_prefix(ev.topic))
            if task.confirm.promql is not None:
                ctask.query = tmpl(task.confirm.promql, "confirm.query")
        message = task.approval.message if task.approval else task.succeed or task.fail
        if message:
            ctask.message = tmpl(message, task.kind)
        out.tasks[tname] = ctask
    _check_cycles(out, lines, path)
    return out


def literal_prefix(pattern: str | None) -> str:
    """The part of a topic pattern (or template) before its first capture, wildcard or
    template: every topic it matches starts with it."""
    if pattern is None:
        return ""
    cuts = [i for i in (pattern.find(c) for c in "{+#*") if i >= 0]
    return pattern[:min(cuts)] if cuts else pattern


def _check_cycles(wf: CompiledWorkflow, lines: dict[str, str], path: Path) -> None:
    """Refuse a set of tasks that can only ever transition among themselves."""
    graph = {n: {t for _, targets in ct.transitions for t in targets}
             for n, ct in wf.tasks.items()}
    for scc in _sccs(graph):
        if len(scc) == 1:
            (only,) = scc
            if only not in graph[only]:
                continue
        trapped = True
        for n in scc:
            ct = wf.tasks[n]
            words = {w for w, _ in ct.transitions if isinstance(w, str)}
            covers = "always" in words or {"succeeded", "failed"} <= words
            leaves = any(t not in scc for t in graph[n])
            if leaves or not covers or ct.kind in ("succeed", "fail"):
                trapped = False
                break
        if trapped:
            first = sorted(scc)[0]
            raise PackError(
                f"tasks {', '.join(sorted(scc))} form a transition cycle with no way out",
                origin=lines.get(f"tasks.{first}", str(path)))


def _sccs(graph: dict[str, set[str]]) -> list[set[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out
