"""Sizes and durations as people write them in YAML."""

from __future__ import annotations

_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "kb": 1000, "mib": 1024**2, "mb": 1000**2}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value: int | str) -> int:
    """``1048576``, ``"512KiB"``, ``"1MiB"`` -> bytes."""
    if isinstance(value, int):
        return value
    text = value.strip().lower()
    digits = text.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = text[len(digits):].strip()
    if unit not in _SIZE_UNITS or not digits:
        raise ValueError(f"bad size {value!r} (use bytes or KiB/MiB)")
    return int(float(digits) * _SIZE_UNITS[unit])


def parse_duration(value: int | float | str) -> float:
    """``30``, ``"500ms"``, ``"10m"``, ``"1h30m"`` -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"bad duration {value!r} (use e.g. 30s, 10m, 1h)")
    text, total, number = value.strip().lower(), 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in _DURATION_UNITS or not number:
            raise ValueError(f"bad duration {value!r} (use e.g. 30s, 10m, 1h)")
        total += float(number) * _DURATION_UNITS[unit]
        number = ""
        i += len(unit)
    if number:  # trailing bare number means seconds
        total += float(number)
    return total
