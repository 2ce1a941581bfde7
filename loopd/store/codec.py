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
            return json.dumps(value, default=str, skipkeys=True).encode()
        except (RecursionError, ValueError, TypeError) as exc:
            # total: a value JSON cannot hold (nested too deep, circular) is stored as a
            # note saying so, never as an error that would hold the whole batch
            return orjson.dumps({"unserializable": f"{type(exc).__name__}: {exc}"[:200]})


def load(blob: bytes | None) -> Any:
    return orjson.loads(blob) if blob else None
