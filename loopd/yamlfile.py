"""YAML as loopd reads it: YAML 1.2 booleans, so ``on:`` stays the key "on".

PyYAML follows YAML 1.1, where ``on``, ``off``, ``yes``, ``no`` are booleans;
rule files use ``on:`` as a key, so only ``true``/``false`` are booleans here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

# libyaml's parser when PyYAML was built with it (about 10x faster on big rule sets)
_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Loader(_Base):  # type: ignore[misc]
    """SafeLoader with YAML 1.2 booleans."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def load(text: str | bytes) -> Any:
    return yaml.load(text, Loader=Loader)


def compose(text: str | bytes) -> tuple[Any, yaml.Node | None]:
    """The document and its node tree (for line numbers); raises yaml.YAMLError."""
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        data = _construct(loader, node) if node is not None else None
    finally:
        loader.dispose()
    return data, node


_MAP, _SEQ, _STR = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq",
                    "tag:yaml.org,2002:str")
# the scalars whose value PyYAML's loader makes in one step (no collection, no generator)
_SCALARS = frozenset(f"tag:yaml.org,2002:{t}"
                     for t in ("null", "bool", "int", "float", "binary", "timestamp"))


class _Unusual(Exception):
    """A node the plain walk leaves to PyYAML (see ``_construct``)."""


# what PyYAML's scalar constructors raise for a value their tag cannot read (``!!int x``:
# ValueError, ``!!bool maybe``: KeyError), bare, without the node's line
_UNREADABLE = (ValueError, TypeError, KeyError, OverflowError)


def _scalar(loader: Any, node: yaml.ScalarNode) -> Any:
    try:
        return loader.construct_object(node)
    except _UNREADABLE:
        tag = node.tag.rpartition(":")[2]
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.value!r} is not a valid !!{tag}", node.start_mark) from None


def _first_unreadable(loader: Any, root: yaml.Node) -> None:
    """Raise the ConstructorError of the first scalar (document order) its tag cannot
    read; nothing when every one reads."""
    # the failed construct_document left the nodes it was in the middle of as recursive
    loader.constructed_objects, loader.recursive_objects = {}, {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            if node.tag in _SCALARS:
                _scalar(loader, node)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in reversed(node.value) for n in reversed(pair))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))


def _construct(loader: Any, root: yaml.Node) -> Any:
    """The document of ``root``, as ``loader.construct_document`` makes it, in one walk:
    PyYAML's constructor went through generators and checks for every node, half of the
    time a 1,000-rule file took to load. Plain mappings, sequences and strings are built
    here (an alias is the same object, as there); numbers, booleans, null, binary and
    timestamps are the loader's own; anything else (a merge key, a collection key, the
    ``=`` value key, another tag, a collection tag on a scalar) leaves the whole document
    to the loader, so what it makes and the errors it raises stay PyYAML's. (A document
    with several scalars that cannot be read, ``!!int x``, names the first in document
    order, at its line, as a ConstructorError: PyYAML raised a bare ValueError or
    KeyError, which ended ``loopd check`` in a traceback.)"""
    made: dict[int, Any] = {}  # collection node -> its value (aliases, recursion)

    def walk(node: yaml.Node) -> Any:
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _STR:
                return node.value
            if node.tag in _SCALARS:
                return _scalar(loader, node)
            raise _Unusual
        done = made.get(id(node))
        if done is not None:
            return done
        if isinstance(node, yaml.MappingNode) and node.tag == _MAP:
            mapping: dict[Any, Any] = {}
            made[id(node)] = mapping
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):  # (a merge key's tag is unusual)
                    raise _Unusual
                mapping[walk(key)] = walk(value)
            return mapping
        if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
            items: list[Any] = []
            made[id(node)] = items
            items.extend(walk(item) for item in node.value)
            return items
        raise _Unusual

    try:
        return walk(root)
    except _Unusual:
        pass
    try:
        return loader.construct_document(root)
    except _UNREADABLE:
        _first_unreadable(loader, root)  # the scalar, at its line
        raise


def error_where(exc: yaml.YAMLError, path: Path | str) -> tuple[str, str]:
    """``(file:line, "invalid YAML: what")`` for a YAML error: every loader says it alike."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    return where, f"invalid YAML: {getattr(exc, 'problem', None) or exc}"


def key_lines(node: yaml.Node | None, path: Path | str) -> dict[str, str]:
    """Top-level key -> ``file:line`` of a mapping node (empty for anything else)."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): f"{path}:{k.start_mark.line + 1}" for k, _ in node.value}


def line_of(node: yaml.Node | None, keys: Sequence[str | int], path: Path | str) -> str:
    """``file:line`` of the deepest of ``keys`` (mapping keys and list indexes from the
    root) that the node tree has: a missing field points at the mapping that lacks it."""
    where = str(path)
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if found is None:
                break
            where, node = f"{path}:{found[0].start_mark.line + 1}", found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) \
                and 0 <= key < len(node.value):
            node = node.value[key]
            where = f"{path}:{node.start_mark.line + 1}"
        else:
            break
    return where
