"""How the web UI shows things: the Jinja2 environment and its filters.

Templates are files of this package, compiled once per daemon; everything a page shows
from events, runs and rules is *data* given to a template, never part of one, and
autoescape is on for every template, so an event carrying ``<script>`` shows as text.
``StrictUndefined`` turns a misspelt name in a template into an error in the tests
instead of an empty cell at 3 a.m.

Times come from the store as epoch floats, or, from the API's story of a run, as RFC
3339 strings: ``when`` takes both, shows ``units.rfc3339`` and a relative "3 min ago".
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import jinja2
import orjson
from markupsafe import Markup

from loopd.decisions import decision_guard
from loopd.units import parse_time, rfc3339

# status (of a run or a step) or outcome -> the colour class of its badge
_TONE = {
    "fixed": "ok", "succeeded": "ok", "done": "ok", "closed": "quiet", "run_created": "ok",
    "joined": "quiet",
    "failed": "bad", "not_fixed": "bad", "timed_out": "bad", "crashed": "bad",
    "rejected": "bad", "error": "bad", "expired": "bad", "interrupted": "bad",
    "inconclusive": "warn", "suppressed": "warn", "cancelled": "warn",
    "awaiting_approval": "wait", "pending": "active", "queued": "active",
    "running": "active", "waiting": "active", "open": "active",
}


def condense(decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's decisions with each stretch of consecutive ``joined`` ones as one row
    (``count``, ``until``): a long incident joins an event every few seconds, and the
    suppressions around it are what the reader looks for."""
    rows: list[dict[str, Any]] = []
    for d in decisions:
        last = rows[-1] if rows else None
        if d.get("outcome") == "joined" and last is not None and \
                last.get("outcome") == "joined":
            last["count"] += 1
            last["until"] = d.get("time")
            last["reason"] = f"{last['count']} events joined the open incident"
            continue
        rows.append({**d, "count": 1, "until": None})
    return rows


def epoch(value: Any) -> float | None:
    """An epoch float from what the store (float) or the API's story (RFC 3339) gives."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return parse_time(str(value))
    except ValueError:
        return None


def ago(seconds: float) -> str:
    """``just now``, ``42 s ago``, ``3 min ago``, ``5 h ago``, ``2 d ago`` (or ``in ...``)."""
    later = seconds < 0
    text = human_duration(abs(seconds), coarse=True)
    if abs(seconds) < 2:
        return "just now"
    return f"in {text}" if later else f"{text} ago"


def human_duration(seconds: float | None, *, coarse: bool = False) -> str:
    """``350 ms``, ``14.2 s``, ``3 min 5 s``, ``2 h 10 min``; ``coarse``: one unit only."""
    if seconds is None:
        return "-"
    if seconds < 1 and not coarse:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.0f} s" if coarse or seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min" if coarse or not secs else f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h" if coarse or not minutes else f"{hours} h {minutes} min"
    return f"{hours // 24} d"


def when(value: Any, now: float | None = None) -> Markup:
    """A time as ``<time>`` with its RFC 3339 text and how long ago it was."""
    instant = epoch(value)
    if instant is None:
        return Markup('<span class="quiet">-</span>')
    stamp = rfc3339(instant) or ""
    relative = ago((time.time() if now is None else now) - instant)
    return Markup('<time datetime="{0}" title="{0}">{0}</time> <span class="ago">{1}</span>'
                  ).format(stamp, relative)


def pretty(value: Any) -> str:
    """JSON as people read it (indented, keys in their order); escaped by the template."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode()


def segment(value: str) -> str:
    """One path segment of a URL: a sub-workflow run's id (``parent/task``) or a breaker's
    scope (``rule|key``, a key with ``/``) with every reserved character escaped (Jinja's
    ``urlencode`` keeps ``/``, which would make ``/v1/runs/a/b/approve`` a 404)."""
    return quote(value, safe="")


def tone(status: str | None) -> str:
    return _TONE.get(status or "", "quiet")


def environment() -> jinja2.Environment:
    """The UI's templates, compiled once: autoescape on, undefined names are errors."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("loopd.ui", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, auto_reload=False)
    env.filters.update(when=when, duration=human_duration, pretty=pretty, tone=tone,
                       guard=decision_guard, segment=segment)
    return env
