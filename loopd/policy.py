"""pydantic models of guard policy: per rule (``guards:``) and global (loopd.yaml).

```yaml
guards:
  max_runs: {count: 10, per: 1h}            # this rule, all keys
  max_runs_per_key: {count: 3, per: 1h}
  breaker: {failures: 3, within: 1h, cool_off: 30m, per: rule}   # or per: key
  blast_radius: {max: 2}                    # or {max: "25%"}: of the key's inventory group
  flapping: {fixes: 3, within: 6h}          # fixed that often: escalate instead
  maintenance: [{days: [sat, sun], from: "00:00", to: "23:59", timezone: Europe/Paris}]
  escalate: {action: core.log, input: {message: "{{ rule }} needs a human: {{ reason }}"}}
```
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loopd.units import parse_duration

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _dur(v: Any) -> float:
    return parse_duration(v)


class Budget(_Strict):
    count: int = Field(ge=0)
    per: float

    _d = field_validator("per", mode="before")(_dur)


class Breaker(_Strict):
    """Open after ``failures`` runs that did not fix the problem within ``within``."""

    failures: int = Field(ge=1)
    within: float
    cool_off: float
    per: Literal["rule", "key"] = "rule"

    _d = field_validator("within", "cool_off", mode="before")(_dur)


class BlastRadius(_Strict):
    """At most ``max`` entities (or a percentage) of one inventory group at once."""

    max: int | str
    group: str | None = None  # limit only this group (default: whichever group the key is in)

    @field_validator("max")
    @classmethod
    def _max(cls, v: int | str) -> int | str:
        if isinstance(v, str):
            if not v.endswith("%") or not v[:-1].replace(".", "", 1).isdigit():
                raise ValueError("max is a count or a percentage like '25%'")
        elif v < 0:
            raise ValueError("max must be >= 0")
        return v

    def limit(self, members: int) -> int:
        if isinstance(self.max, int):
            return self.max
        # at least one, or a group of 3 at 25% could never be remediated
        return max(1, int(members * float(self.max[:-1]) / 100))


class Flapping(_Strict):
    fixes: int = Field(ge=1)
    within: float

    _d = field_validator("within", mode="before")(_dur)


class Window(_Strict):
    """A maintenance window / change freeze: one-off (start, end) or weekly recurring."""

    name: str = "maintenance"
    start: datetime | None = None
    end: datetime | None = None
    days: list[str] | None = None
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None
    timezone: str = "UTC"
    rules: list[str] | None = None    # only these rules (global windows)
    groups: list[str] | None = None   # only entities of these inventory groups

    @field_validator("from_", "to", mode="before")
    @classmethod
    def _clock(cls, v: Any) -> Any:
        # YAML 1.1 reads an unquoted 22:00 as the base-60 integer 1320 (minutes)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 24 * 60:
            return f"{v // 60:02d}:{v % 60:02d}"
        return v

    @field_validator("days")
    @classmethod
    def _days(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        days = [d.lower()[:3] for d in v]
        bad = [d for d in days if d not in _DAYS]
        if bad:
            raise ValueError(f"unknown day(s) {bad}; use mon..sun")
        return days

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r}") from None
        return v

    @model_validator(mode="after")
    def _shape(self) -> Window:
        one_off = self.start is not None or self.end is not None
        recurring = self.from_ is not None or self.to is not None or self.days is not None
        if one_off == recurring:
            raise ValueError("a window is either one-off (start, end) or recurring "
                             "(days, from, to)")
        if one_off and (self.start is None or self.end is None):
            raise ValueError("a one-off window needs start and end")
        if recurring:
            for value in (self.from_, self.to):
                if value is None:
                    raise ValueError("a recurring window needs from and to (HH:MM)")
                time.fromisoformat(value)
        return self

    def active(self, now: float) -> bool:
        if self.start is not None and self.end is not None:
            start = self.start if self.start.tzinfo else self.start.replace(tzinfo=UTC)
            end = self.end if self.end.tzinfo else self.end.replace(tzinfo=UTC)
            return start.timestamp() <= now < end.timestamp()
        local = datetime.fromtimestamp(now, ZoneInfo(self.timezone))
        begin = time.fromisoformat(self.from_ or "00:00")
        finish = time.fromisoformat(self.to or "00:00")
        clock = local.time().replace(tzinfo=None)
        day = _DAYS[local.weekday()]
        if begin == finish:  # from 00:00 to 00:00: the whole day
            return self.days is None or day in self.days
        if begin < finish:
            return (self.days is None or day in self.days) and begin <= clock < finish
        # overnight (22:00-06:00): the evening belongs to `day`, the morning to the day before
        if clock >= begin:
            return self.days is None or day in self.days
        if clock < finish:
            yesterday = _DAYS[(local.weekday() - 1) % 7]
            return self.days is None or yesterday in self.days
        return False

    def applies(self, rule: str, group: str | None) -> bool:
        if self.rules is not None and rule not in self.rules:
            return False
        return self.groups is None or group in self.groups


class Escalate(_Strict):
    workflow: str | None = None
    action: str | None = None
    input: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one(self) -> Escalate:
        if (self.workflow is None) == (self.action is None):
            raise ValueError("escalate needs exactly one of workflow or action")
        return self


class RuleGuards(_Strict):
    max_runs: Budget | None = None
    max_runs_per_key: Budget | None = None
    breaker: Breaker | None = None
    blast_radius: BlastRadius | None = None
    flapping: Flapping | None = None
    maintenance: list[Window] = Field(default_factory=list)
    escalate: Escalate | None = None


class Approval(_Strict):
    within: float = 3600.0

    _d = field_validator("within", mode="before")(_dur)


class GlobalGuards(_Strict):
    """loopd.yaml ``guards:``: fleet-wide limits and windows."""

    max_runs: Budget | None = None
    blast_radius: BlastRadius | None = None
    maintenance: list[Window] = Field(default_factory=list)
    escalate: Escalate | None = None
