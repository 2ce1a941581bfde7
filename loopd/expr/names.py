"""Names a template reads, checked at load time against the names its scope will hold.

A condition or template that reads a name its scope never has (``evnt.value > 90``)
compiles, and then is always undefined at run time: the rule never matches, the input
is always empty. The same holds for ``vars.X`` when the rule's topic captures no ``X``,
and for ``config.X`` when the pack declares no such config field. These functions find
such reads in the Jinja parse tree (every expression the fast path accepts is also
Jinja syntax) and return what is wrong, one message per name; text that does not parse
is left to the compiler, which reports the syntax error itself.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.defaults import DEFAULT_NAMESPACE
from jinja2.sandbox import SandboxedEnvironment

from loopd.expr.compiler import FUNCTIONS
from loopd.expr.sandbox import REMOVED_GLOBALS

# the functions both compiler paths offer, Jinja's own globals (range, dict, ...) but those
# loopd removes (lipsum), and the names Jinja binds inside loops and macros
_GLOBALS = frozenset(FUNCTIONS) | (frozenset(DEFAULT_NAMESPACE) - REMOVED_GLOBALS) | {
    "loop", "caller", "varargs", "kwargs"}
_DICT_METHODS = frozenset({"get", "keys", "values", "items"})
_PARSER = SandboxedEnvironment()


def topic_captures(pattern: str | None) -> frozenset[str] | None:
    """The ``{name}`` levels of a topic pattern; None when there is no pattern."""
    if pattern is None:
        return None
    return frozenset(level[1:-1] for level in pattern.split("/")
                     if len(level) > 2 and level[0] == "{" and level[-1] == "}")


def templates(value: Any, field: str) -> Iterator[tuple[str, str]]:
    """Every template string inside ``value`` with its dotted field."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from templates(item, f"{field}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from templates(item, f"{field}[{index}]")
    elif isinstance(value, str) and ("{{" in value or "{%" in value):
        yield field, value


@functools.lru_cache(maxsize=4096)
def _parse(text: str, expression: bool) -> nodes.Template | None:
    """The parse tree of ``text`` (None when it does not parse). Cached: a thousand rules
    repeat a handful of templates (``{{ event.labels.instance }}``), and parsing each
    again was most of loading them; the trees are only read."""
    source = text.strip()
    if expression and not (source.startswith("{{") and source.endswith("}}")):
        source = "{{ " + source + " }}"
    try:
        return _PARSER.parse(source)
    except jinja2.TemplateSyntaxError:
        return None


@functools.lru_cache(maxsize=4096)
def _reads(text: str, expression: bool) -> tuple[tuple[str, ...], frozenset[str]] | None:
    """The names ``text`` loads (in order of first read) and those it binds itself
    (``{% for x in ... %}``, ``{% set x = ... %}``); None when it does not parse. Cached
    with the tree: a thousand rules ask this of the same few texts."""
    tree = _parse(text, expression)
    if tree is None:
        return None
    loads: dict[str, None] = {}
    bound: set[str] = set()
    for node in tree.find_all(nodes.Name):
        if node.ctx == "load":
            loads.setdefault(node.name)
        else:  # store / param
            bound.add(node.name)
    return tuple(loads), frozenset(bound)


@functools.lru_cache(maxsize=4096)
def _members(text: str, expression: bool, name: str) -> tuple[str, ...]:
    """The constant members ``text`` reads from ``name``, once each, in order:
    ``name.x``, ``name['x']``, ``name.get('x')``."""
    tree = _parse(text, expression)
    if tree is None:
        return ()
    found: dict[str, None] = {}
    for attr in tree.find_all(nodes.Getattr):
        if isinstance(attr.node, nodes.Name) and attr.node.name == name and \
                attr.attr not in _DICT_METHODS:
            found.setdefault(attr.attr)
    for item in tree.find_all(nodes.Getitem):
        if isinstance(item.node, nodes.Name) and item.node.name == name and \
                isinstance(item.arg, nodes.Const) and isinstance(item.arg.value, str):
            found.setdefault(item.arg.value)
    for call in tree.find_all(nodes.Call):
        fn = call.node
        if isinstance(fn, nodes.Getattr) and fn.attr == "get" and \
                isinstance(fn.node, nodes.Name) and fn.node.name == name and call.args and \
                isinstance(call.args[0], nodes.Const) and isinstance(call.args[0].value, str):
            found.setdefault(call.args[0].value)
    return tuple(found)


def problems(text: str, names: Collection[str], *, expression: bool = False,
             members: Mapping[str, Collection[str] | None] | None = None) -> list[str]:
    """What ``text`` reads that its scope will not hold.

    ``names``: the scope's names. ``members``: for some of them, the keys they will have
    (None: the name holds nothing at all, e.g. ``vars`` without a topic pattern).
    """
    reads = _reads(text, expression)
    if reads is None:
        return []
    loads, bound = reads
    out = []
    for name in loads:
        if name not in names and name not in bound and name not in _GLOBALS:
            out.append(f"undefined name {name!r} (known names: {', '.join(sorted(names))})")
    for name, keys in (members or {}).items():
        if name not in loads:
            continue
        for member in _members(text, expression, name):
            if keys is None:
                out.append(f"{name}.{member}: {_NOTHING.get(name, f'{name} is empty here')}")
            elif member not in keys:
                have = ", ".join(sorted(keys)) or "none"
                out.append(f"{name}.{member}: no such {_WHAT.get(name, 'member')} "
                           f"(known: {have})")
    return out


_NOTHING = {"vars": "the rule has no on.topic, so vars holds no topic captures"}
_WHAT = {"vars": "topic capture", "config": "config field"}
