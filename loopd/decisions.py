"""What a stored decision says: its possible outcomes, and the guard a suppression names.

A suppressed decision is stored with a reason (``guard breaker: open until ...``,
``for: held 14s of 30s``, ``throttled: once within 600s (12s left)``); the API, the UI
and the terminal read the guard back out of it with ``decision_guard``, here alone.
"""

from __future__ import annotations

# every outcome a decision can have (loopd.decide: incidents, and the engine's own error
# and ``for:`` suppression)
OUTCOMES = ("run_created", "joined", "queued", "restarted", "shadow", "suppressed", "error")


def decision_guard(reason: str | None) -> str | None:
    """The guard a suppressed decision's reason names, or None when it names none (a
    joined event, an error, a shadow run): ``guard breaker: open ...`` -> ``breaker``,
    ``guard: budget ...`` -> ``budget``, ``for: held 14s of 30s`` -> ``for``,
    ``throttled: ...`` -> ``throttle``."""
    if not reason:
        return None
    head, sep, rest = reason.partition(":")
    if not sep:
        return None
    if head == "guard":
        words = rest.split()
        return words[0] if words else None
    if head.startswith("guard "):
        return head[6:].strip() or None
    if head == "for":
        return "for"
    if head == "throttled":
        return "throttle"
    return None
