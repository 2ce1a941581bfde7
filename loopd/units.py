"""Sizes and durations as people write them in YAML."""

from __future__ import annotations

from datetime import UTC, datetime

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


EARLIEST = 946_684_800.0  # 2000-01-01T00:00:00Z: a smaller epoch is a date written as digits
LATEST = 253_402_300_799.0  # 9999-12-31T23:59:59Z: the last second a calendar date holds


def rfc3339(when: float | None) -> str | None:
    """Epoch seconds -> ``2026-12-01T16:39:41.123Z`` (UTC, milliseconds): how the API, the
    UI and the terminal show a time."""
    if when is None:
        return None
    try:
        stamp = datetime.fromtimestamp(when, UTC)
    except (OverflowError, OSError, ValueError):  # a stored time no calendar holds
        return str(when)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def parse_time(text: str) -> float:
    """``2026-12-01T16:39:41Z`` (any RFC 3339 / ISO 8601 time; UTC when it names no zone)
    or epoch seconds -> epoch seconds; ``ValueError`` naming the accepted forms."""
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"bad time {text!r}")
        if 0 < value < EARLIEST or value > LATEST:
            # since=20261201 is a date written as digits, not a time in 1970
            raise ValueError(f"bad time {text!r}: epoch seconds between 2000 and 9999, or "
                             "RFC 3339 (2026-05-01T10:00:00Z)")
        return value
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"bad time {text!r}: use RFC 3339 (2026-05-01T10:00:00Z) "
                         "or epoch seconds") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def seconds(duration: float | None) -> float | None:
    """A duration as the API shows it: seconds, rounded to milliseconds."""
    return None if duration is None else round(duration, 3)
