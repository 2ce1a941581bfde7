"""What may reach a shell verbatim, and which templates read untrusted data.

An ssh action's command template quotes every ``input.X`` (one shell word) but
inserts ``raw.X`` as given: those inputs are its **raw inputs**, found here by
reading the template's parse tree (``raw_inputs``), so any pack's action is covered,
not a hard-coded list. A ``raw.X`` read only as a condition (``{{ 4 if raw.fail else
0 }}``) inserts nothing and does not count; ``raw`` used as a whole (``raw[name]``)
makes every input raw.

A rule or workflow that gives a raw input a template reading anything but literals,
``inventory``, ``entity`` and the pack's ``config`` (``untrusted_reads``) would let
event data (``event``, ``vars``, ``key``, the trigger, and in a workflow everything
that flows from them: ``input``, ``ctx``, ``result``, ``item``, ``history``,
``telemetry``...) write shell syntax. The loaders refuse it unless the rule or task
lists that input in ``unsafe_shell`` (see ``shell_problems``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.defaults import DEFAULT_NAMESPACE

from loopd.expr.compiler import FUNCTIONS, WORKFLOW_SCOPE
from loopd.expr.names import templates

TRUSTED = frozenset({"inventory", "entity", "config"})
"""Operator data: the only names a raw (verbatim) input's template may read."""
SCOPE_NAMES = (WORKFLOW_SCOPE | {"event", "vars", "key", "telemetry", "now", "trigger", "raw",
                                 "rule", "reason"}) - TRUSTED
"""Names a rule's or workflow's templates get from loopd: never trusted, even rebound."""
RUNS_ITS_ARGUMENTS = frozenset({
    "sh", "bash", "dash", "zsh", "ksh", "mksh", "csh", "tcsh", "fish", "busybox", "env",
    "sudo", "doas", "su", "runuser", "setpriv", "xargs", "nohup", "timeout", "nice",
    "ionice", "setsid", "stdbuf", "chroot", "nsenter", "unshare", "watch", "ssh", "eval",
    "exec", "python", "python3", "perl", "ruby", "node", "php", "lua", "awk", "gawk",
    "mawk", "tclsh", "expect", "script", "systemd-run", "flock", "strace", "time",
})
"""Programs that run (part of) their arguments as a command or program: with one of
these as argv[0], an argument from event data could choose what runs."""
_GLOBALS = frozenset(FUNCTIONS) | frozenset(DEFAULT_NAMESPACE) | {"loop", "caller", "varargs",
                                                                  "kwargs"}
_PARSER = jinja2.Environment()
ALL = "*"  # raw_inputs: the template reads ``raw`` as a whole


def _parse(text: str) -> nodes.Template | None:
    try:
        return _PARSER.parse(text)
    except jinja2.TemplateSyntaxError:
        return None  # the compiler reports the syntax error itself


def _in_tests(tree: nodes.Node) -> set[int]:
    """ids of the nodes inside a condition (``x if TEST else y``, ``{% if TEST %}``)."""
    inside: set[int] = set()
    for node in tree.find_all((nodes.CondExpr, nodes.If)):
        test = getattr(node, "test", None)
        if isinstance(test, nodes.Node):
            inside.add(id(test))
            inside.update(id(n) for n in test.find_all(nodes.Node))
    return inside


def raw_inputs(command: str) -> frozenset[str]:
    """The inputs a command template inserts verbatim (``raw.X``); ``{ALL}`` when it reads
    ``raw`` otherwise than by a constant member."""
    tree = _parse(command)
    if tree is None:
        return frozenset()
    tests = _in_tests(tree)
    members: set[str] = set()
    whole = False
    used: set[int] = set()
    for attr in tree.find_all(nodes.Getattr):
        if isinstance(attr.node, nodes.Name) and attr.node.name == "raw":
            used.add(id(attr.node))
            if id(attr) not in tests:
                members.add(attr.attr)
    for item in tree.find_all(nodes.Getitem):
        if isinstance(item.node, nodes.Name) and item.node.name == "raw":
            used.add(id(item.node))
            if id(item) in tests:
                continue
            if isinstance(item.arg, nodes.Const) and isinstance(item.arg.value, str):
                members.add(item.arg.value)
            else:
                whole = True
    for name in tree.find_all(nodes.Name):
        if name.name == "raw" and name.ctx == "load" and id(name) not in used \
                and id(name) not in tests:
            whole = True  # {{ raw }}, raw.get(...), a loop over raw
    return frozenset({ALL}) if whole else frozenset(members)


def untrusted_reads(value: Any) -> list[str]:
    """The names outside ``TRUSTED`` that the templates inside ``value`` read, in order."""
    found: dict[str, None] = {}
    for _, text in templates(value, ""):
        tree = _parse(text)
        if tree is None:
            continue
        # a name the template binds itself ({% set %}, a loop or macro variable) is read
        # from what it was bound to, which is checked where it is read; but a name of the
        # scope stays untrusted even when rebound ({% set event = event %})
        bound = {n.name for n in tree.find_all(nodes.Name) if n.ctx != "load"} - SCOPE_NAMES
        for node in tree.find_all(nodes.Name):
            if node.ctx == "load" and node.name not in TRUSTED and node.name not in bound \
                    and node.name not in _GLOBALS:
                found.setdefault(node.name)
    return list(found)


def shell_problems(target: str, raw: Collection[str], values: dict[str, Any],
                   unsafe_shell: Collection[str], *, argv: bool) -> Iterator[str]:
    """Why giving ``values`` to action ``target`` (whose raw inputs are ``raw``; ``argv``:
    it takes an argument list) could let event data write shell syntax; an input listed
    in ``unsafe_shell`` is accepted."""
    for name in sorted(unsafe_shell):
        if name not in values:
            yield f"unsafe_shell lists {name!r}, which is not given to {target}"
        elif name != "argv" and ALL not in raw and name not in raw:
            yield (f"unsafe_shell lists {name!r}, but {target} quotes that input "
                   "(it is never passed to the shell verbatim): remove it")
    yield from _argv_problems(target, values.get("argv") if argv else None,
                              "argv" in unsafe_shell)
    for name, value in values.items():
        if name in unsafe_shell or (ALL not in raw and name not in raw):
            continue
        reads = untrusted_reads(value)
        if reads:
            instead = ("give the command as an argument list instead (argv: [prog, "
                       "\"{{ ... }}\"], each element one quoted word)" if argv else
                       "give it a literal, or a value from inventory, entity or config")
            yield (f"{target} passes input {name!r} to the shell verbatim (raw.{name}) and "
                   f"this template reads {', '.join(reads)}: event data could run commands; "
                   f"{instead}, or add unsafe_shell: [{name}] to accept the risk")


def _argv_problems(target: str, words: Any, accepted: bool) -> Iterator[str]:
    """argv is quoted word by word, but its first word chooses the program: event data
    may not choose it, nor feed a program that runs its arguments (``sh -c``, ``sudo``)."""
    if words is None:
        return
    if not isinstance(words, list):
        reads = untrusted_reads(words)
        if reads and not accepted:
            yield (f"{target} takes argv as a list, and this template builds the whole "
                   f"list from {', '.join(reads)}: event data could choose which program "
                   "runs; give argv as a YAML list whose first element is a literal")
        return
    if not words:
        return
    reads = untrusted_reads(words[0])
    if reads:
        yield (f"{target} runs the program argv[0] names, and this template reads "
               f"{', '.join(reads)}: event data could choose which program runs; name the "
               "program literally (or from inventory or config)")
        return
    program = words[0].rsplit("/", 1)[-1] if isinstance(words[0], str) else ""
    later = [r for w in words[1:] for r in untrusted_reads(w)]
    if program in RUNS_ITS_ARGUMENTS and later and not accepted:
        yield (f"{target} runs {program}, which runs its arguments as a command, and an "
               f"argument reads {', '.join(dict.fromkeys(later))}: event data could choose "
               f"what runs; call the program itself, or add unsafe_shell: [argv] to accept "
               "the risk")
