"""Query parameters of the API's read routes, checked one way: a bad one is a 400 that
names it (``limit``, a time in ``since``/``until``, an unknown parameter)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from aiohttp import web

from loopd.units import parse_time

MAX_LIMIT = 1000


def refuse_unknown(query: Mapping[str, str], known: Collection[str]) -> None:
    """A misspelt filter would otherwise be ignored and answer everything."""
    unknown = sorted(set(query) - set(known))
    if unknown:
        raise web.HTTPBadRequest(text=f"unknown parameter {unknown[0]!r} (use "
                                      f"{', '.join(sorted(known))})")


def limit(query: Mapping[str, str], default: int = 100) -> int:
    """``limit=``, kept within 1..1000."""
    text = query.get("limit")
    if text is None:
        return default
    try:
        return max(1, min(MAX_LIMIT, int(text)))
    except ValueError:
        raise web.HTTPBadRequest(text=f"limit must be an integer, got {text!r}") from None


def time_param(query: Mapping[str, str], name: str) -> float | None:
    """A time parameter: RFC 3339 (``2026-05-01T10:00:00Z``) or epoch seconds."""
    text = query.get(name)
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"{name}: {exc}") from None


def int_param(query: Mapping[str, str], name: str) -> int | None:
    """A positive integer parameter (a ``seq`` to page back from)."""
    text = query.get(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 2**63 - 1:  # a store's integers are 64-bit
        raise web.HTTPBadRequest(text=f"{name} must be a positive integer, got {text!r}")
    return value
