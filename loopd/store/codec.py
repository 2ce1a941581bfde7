"""How stores encode JSON values: orjson, total (a value JSON cannot hold becomes a note
saying so, never an error that would hold a whole batch)."""

from __future__ import annotations

import json
from typing import Any

import orjson


def dump(value: Any) -> bytes:
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # e.g. an integer beyond 64 bits from a template: orjson refuses it
        try:
            text = json.dumps(value, default=str, skipkeys=True, ensure_ascii=False)
            # a lone surrogate (text no UTF-8 can hold, e.g. out of a template) becomes
            # U+FFFD, as a decoder makes of bytes it cannot read: every store (PostgreSQL's
            # jsonb too) takes the value and reads the same one back
            return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()
        except (RecursionError, ValueError, TypeError) as exc:
            # total: a value JSON cannot hold (nested too deep, circular) is stored as a
            # note saying so, never as an error that would hold the whole batch
            return orjson.dumps({"unserializable": f"{type(exc).__name__}: {exc}"[:200]})


def load(blob: bytes | None) -> Any:
    """What ``dump`` wrote. A file written before ``dump`` replaced lone surrogates may
    hold one as a ``\\udXXX`` escape, which orjson refuses to read: the standard library
    reads it back, so a stored value never makes a read (or a restart) fail."""
    if not blob:
        return None
    try:
        return orjson.loads(blob)
    except orjson.JSONDecodeError:
        return json.loads(blob)
