"""The one exception hierarchy of loopd.

Every error loopd raises on purpose is a ``LoopdError``; catch the narrowest
class that makes sense::

    LoopdError
     ├── ConfigError            loopd.yaml, a rule file or a pack is invalid
     │    ├── RuleError         one rule is invalid (file:line rule field)
     │    └── PackError         one pack or workflow is invalid
     ├── EventError             a message could not become an Event
     │    ├── DecodeError       not JSON / not an object / wrong types
     │    └── PayloadTooLarge   over the source's max_payload
     ├── ConditionError         a condition or template failed at evaluation time
     ├── StoreError             the state store failed or has an unknown schema (transient:
     │    │                     the store is down; hold and retry)
     │    └── StoreRejected     the store refused a record (not transient: never retried)
     ├── SourceError            a source could not connect or lost its connection
     ├── IllegalTransition      a run's status was to move along no edge of its table
     └── ActionError            an action failed (the run records it)
          ├── ActionTimeout     the action did not finish in time
          └── UnknownAction     the workflow names an action no pack provides

Errors carry ``origin``: where the culprit came from (``rules/web.yaml:12``,
``kafka alerts[0]@1532``, ``mqtt telemetry/web-1/cpu``), so every message
names the problem and its place.
"""

from __future__ import annotations

from typing import Any


class LoopdError(Exception):
    """Base of every error loopd raises on purpose."""

    def __init__(self, message: str, *, origin: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.origin = origin

    def __str__(self) -> str:
        return f"{self.origin}: {self.message}" if self.origin else self.message


class ConfigError(LoopdError):
    """Configuration (loopd.yaml, rules, packs, inventory) is invalid."""


class RuleError(ConfigError):
    """One rule is invalid; the others keep working."""

    def __init__(
        self, message: str, *, origin: str | None = None, rule: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, origin=origin)
        self.rule = rule
        self.field = field

    def __str__(self) -> str:
        where = " ".join(p for p in (self.origin, self.rule, self.field) if p)
        return f"{where}: {self.message}" if where else self.message


class PackError(ConfigError):
    """A pack manifest, action or workflow is invalid."""


class EventError(LoopdError):
    """A message could not be turned into an Event."""

    reason = "invalid"


class DecodeError(EventError):
    """The payload is not valid JSON, not an object, or has wrong types."""

    reason = "decode"


class PayloadTooLarge(EventError):
    """The payload exceeds the source's ``max_payload``."""

    reason = "too_large"


class ConditionError(LoopdError):
    """A compiled condition or template failed while evaluating."""


class StoreError(LoopdError):
    """The state store failed or holds a schema this version cannot read.

    A plain ``StoreError`` is transient (disk full, locked, unreachable): the
    writer holds what it has and retries with backoff."""


class StoreRejected(StoreError):
    """The store refused one of the records it was given (it cannot be serialized, or a
    constraint failed): retrying the same records can never succeed."""


class LeaseLost(StoreError):
    """A run's lease is no longer this replica's (another took it over after this one was
    silent for longer than the lease): the write was refused and nothing of it is stored.
    The run's task must stop at once, write nothing more and act on nothing."""


class SourceError(LoopdError):
    """A source could not connect, or lost its connection."""


class IllegalTransition(LoopdError):
    """A run's status was to move where the transition table (loopd.runs.states) has no
    edge: a bug in loopd, named with the run and both statuses."""

    def __init__(self, run_id: str, current: str, wanted: str) -> None:
        super().__init__(f"run {run_id}: no transition from {current} to {wanted}")
        self.run_id, self.current, self.wanted = run_id, current, wanted


class ActionError(LoopdError):
    """An action failed; the run records the reason, and ``output`` as the step's output
    when the action has one to show (a command's exit status, stdout and stderr)."""

    def __init__(self, message: str, *, origin: str | None = None,
                 output: dict[str, Any] | None = None) -> None:
        super().__init__(message, origin=origin)
        self.output = output


class ActionTimeout(ActionError):
    """An action did not finish within its timeout."""


class UnknownAction(ActionError):
    """A rule or workflow names an action that no pack provides."""
