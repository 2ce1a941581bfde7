"""pydantic's validation errors said the way loopd's files are written.

pydantic reports a location in its own terms (``sources.0.kafka.topics``, with the union
member it tried in the middle) and a message in Python's (``Value error, ...``, ``Input
should be a valid dictionary``, ``Input tag 'x' found using 'type' does not match any of
the expected tags``). A person wrote YAML: ``Problem`` keeps only the keys and indexes
they wrote (``sources[0].topics``) and a message in YAML's words. The input value is never
part of a message (it may be a secret); validators that quote a value do so on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

Path = tuple[str | int, ...]
"""Keys and list indexes from the document's root, as written."""

_PLAIN = {
    "extra_forbidden": "unknown field",
    "missing": "is required",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "path_type": "must be a path",
}
_SHOULD = re.compile(r"^(?:Input|String|List|Value|Dictionary|Tuple|Set) should ")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong at ``path`` of the document."""

    path: Path
    message: str

    @property
    def field(self) -> str:
        """``sources[2].type``: the path as one would point at it in the file."""
        out = ""
        for part in self.path:
            if isinstance(part, int):
                out += f"[{part}]"
            else:
                out += f".{part}" if out else part
        return out


def problems(exc: ValidationError, document: object,
             kinds: Mapping[str, tuple[str, Sequence[str]]] | None = None) -> list[Problem]:
    """Every error of ``exc`` (raised validating ``document``) as a ``Problem``.

    ``kinds`` names the discriminated unions by their top-level key: ``{"sources":
    ("source", ["webhook", ...])}`` makes a missing or unknown ``type`` read "unknown
    source type 'x' (expected one of webhook, ...)".
    """
    found = [_walk(err, document) for err in exc.errors()]
    return _merged([_problem(err, path, kinds or {})
                    for err, path in _one_member_per_union(found, document)])


Member = tuple[Path, str]
"""Where pydantic tried a union's member, and the member's name (``AuthConfig``,
``literal['none']``, a discriminated union's tag)."""


def _walk(err: ErrorDetails, document: object) -> tuple[ErrorDetails, Path, Member | None]:
    """The error, its path in ``document``, and the union member it came from: the parts
    of pydantic's location that are not in the document name union members."""
    node: Any = document
    path: list[str | int] = []
    member: Member | None = None
    loc = err["loc"]
    for i, part in enumerate(loc):
        if _has(node, part):
            node = node[part]
        elif not (i == len(loc) - 1 and err["type"] == "missing"):  # not the missing key
            member = (tuple(path), str(part))
            continue
        path.append(part)
    return err, tuple(path), member


def _one_member_per_union(found: list[tuple[ErrorDetails, Path, Member | None]],
                          document: object) -> list[tuple[ErrorDetails, Path]]:
    """The errors less those of union members the value was plainly not meant for: a
    mapping given to ``auth: AuthConfig | Literal["none"]`` is an AuthConfig whose fields
    are wrong, not also "should be 'none'"."""
    tried: dict[Path, set[str]] = {}
    for _, _, member in found:
        if member is not None:
            tried.setdefault(member[0], set()).add(member[1])
    kept = []
    for err, path, member in found:
        if member is not None and _is_mapping_at(document, member[0]):
            models = {m for m in tried[member[0]] if m[:1].isupper()}  # model classes
            if models and member[1] not in models:
                continue
        kept.append((err, path))
    return kept


def _has(node: object, part: str | int) -> bool:
    if isinstance(node, Mapping):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _is_mapping_at(document: object, path: Path) -> bool:
    node: Any = document
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    return isinstance(node, Mapping)


def _problem(err: ErrorDetails, path: Path,
             kinds: Mapping[str, tuple[str, Sequence[str]]]) -> Problem:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = str(ctx.get("discriminator", "type")).strip("'")
        noun, tags = kinds.get(str(path[0]) if path else "", ("", ()))
        if not tags:
            tags = str(ctx.get("expected_tags", "")).replace("'", "").split(", ")
        expected = ", ".join(t for t in tags if t)
        if kind == "union_tag_not_found":
            return Problem((*path, key),
                           f"is required (one of {expected})" if expected else "is required")
        what = f"{noun} {key}" if noun else key
        return Problem((*path, key), f"unknown {what} {ctx['tag']!r} (expected one of "
                                     f"{expected})")
    if kind == "too_short" and ctx.get("min_length") == 1:
        return Problem(path, "must not be empty")
    if kind in _PLAIN:
        return Problem(path, _PLAIN[kind])
    message = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return Problem(path, _SHOULD.sub("must ", message))


def _merged(found: list[Problem]) -> list[Problem]:
    """One problem per path: "must be a mapping" and "must be 'none'" for one value are
    "must be a mapping or 'none'"."""
    by_path: dict[Path, list[str]] = {}
    for problem in found:
        messages = by_path.setdefault(problem.path, [])
        if problem.message not in messages:
            messages.append(problem.message)
    out = []
    for path, messages in by_path.items():
        if len(messages) > 1 and all(m.startswith("must be ") for m in messages):
            text = "must be " + " or ".join(m.removeprefix("must be ") for m in messages)
        else:
            text = "; ".join(messages)
        out.append(Problem(path, text))
    return out
