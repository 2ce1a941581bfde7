"""Topic patterns for rules: MQTT wildcards plus named captures, compiled once.

A pattern is ``/``-separated levels, each one of:

* a literal (``telemetry``), matched exactly;
* ``+``: any single level (as in MQTT, a level may be empty);
* ``{name}``: any single level, captured under ``name`` (an identifier);
* ``#``: zero or more levels, only as the last level (``a/#`` matches ``a``).

As in MQTT, a pattern starting with a wildcard does not match topics starting
with ``$`` (``$SYS/...``). A match returns the captured levels, ``{}`` when
the pattern captures nothing; no match returns ``None``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from loopd.errors import ConfigError

TopicMatcher = Callable[[str], dict[str, str] | None]

_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def compile_topic_pattern(pattern: str) -> TopicMatcher:
    """Compile ``pattern`` into a matcher; raise ConfigError naming the bad level."""
    if not pattern:
        raise ConfigError("empty topic pattern")
    levels = pattern.split("/")
    names: set[str] = set()
    parts: list[str] = []
    for index, level in enumerate(levels):
        if level == "#":
            if index != len(levels) - 1:
                raise ConfigError(f"topic pattern {pattern!r}: '#' must be the last level")
            # "a/#" also matches "a" itself, as in MQTT
            parts.append("(?:/.*)?" if index else ".*")
            continue
        sep = "/" if index else ""
        if level == "+":
            parts.append(sep + "[^/]*")
        elif capture := _CAPTURE.fullmatch(level):
            name = capture.group(1)
            if name in names:
                raise ConfigError(f"topic pattern {pattern!r}: capture {{{name}}} appears twice")
            names.add(name)
            parts.append(f"{sep}(?P<{name}>[^/]*)")
        elif any(ch in level for ch in "+#{}"):
            raise ConfigError(
                f"topic pattern {pattern!r}: level {level!r} mixes a wildcard with text "
                "(use '+', '#' or '{name}' as a whole level)"
            )
        else:
            parts.append(sep + re.escape(level))
    if not names and not any(level in ("+", "#") for level in levels):
        def match_literal(topic: str) -> dict[str, str] | None:
            return {} if topic == pattern else None

        return match_literal

    wildcard_first = levels[0] in ("+", "#") or bool(_CAPTURE.fullmatch(levels[0]))
    prefix = "(?!\\$)" if wildcard_first else ""
    fullmatch = re.compile(prefix + "".join(parts), re.DOTALL).fullmatch

    def match(topic: str) -> dict[str, str] | None:
        found = fullmatch(topic)
        return found.groupdict() if found is not None else None

    return match
