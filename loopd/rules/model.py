"""pydantic models of rule files (``rules/*.yaml``): validated at the edge."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loopd.policy import Approval, RuleGuards
from loopd.units import parse_duration

Scalar = str | int | float | bool | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class On(_Strict):
    """Which events a rule looks at: cheap checks, indexed at load time."""

    source: str | None = None
    topic: str | None = None
    match: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict)

    @field_validator("match", mode="before")
    @classmethod
    def _scalars(cls, v: Any) -> Any:
        # one clear message instead of one per member of the union
        if isinstance(v, dict):
            for path, value in v.items():
                items = value if isinstance(value, list) else [value]
                if any(isinstance(i, dict | list) for i in items):
                    raise ValueError(f"{path}: expected a scalar or a list of scalars")
        return v


class Throttle(_Strict):
    """``once_within``: at most one run per key per window; ``max``/``per``: N per window."""

    once_within: float | None = None
    max: int | None = Field(default=None, ge=1)
    per: float | None = None

    @field_validator("once_within", "per", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration(v)

    @model_validator(mode="after")
    def _complete(self) -> Throttle:
        if self.once_within is None and self.max is None:
            raise ValueError("throttle needs once_within or max + per")
        if (self.max is None) != (self.per is None):
            raise ValueError("throttle max and per go together")
        return self


def _duration(v: Any) -> float | None:
    return None if v is None else parse_duration(v)


class Group(_Strict):
    """``group``: one incident per rendered ``by`` once ``count`` distinct member keys
    matched within ``within`` (loopd.decide.correlation)."""

    by: str = Field(min_length=1)
    count: int = Field(ge=2)
    within: float

    @field_validator("within", mode="before")
    @classmethod
    def _window(cls, v: Any) -> float | None:
        return _duration(v)

    @field_validator("within")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("within must be longer than 0s")
        return v


class Condition(_Strict):
    """One condition of ``all``/``any``: which events (``on``) and a test (``if``)."""

    on: On
    if_: str | None = Field(default=None, alias="if")


class Run(_Strict):
    """What to start: a pack workflow or a single pack action."""

    workflow: str | None = None
    action: str | None = None
    input: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_target(self) -> Run:
        if (self.workflow is None) == (self.action is None):
            raise ValueError("run needs exactly one of workflow or action")
        return self

    @property
    def target(self) -> str:
        return self.workflow or self.action or ""

    @property
    def kind(self) -> str:
        return "workflow" if self.workflow else "action"


class Rule(_Strict):
    name: str = Field(min_length=1, pattern=r"^\S+$")
    description: str = ""
    enabled: bool = True
    on: On = Field(default_factory=On)
    if_: str | None = Field(default=None, alias="if")
    key: str | None = None
    for_: float | None = Field(default=None, alias="for")
    throttle: Throttle | None = None
    mode: Literal["automatic", "approval", "shadow"] = "automatic"
    approval: Approval = Approval()
    run_mode: Literal["single", "restart", "queued", "parallel"] = "single"
    max_parallel: int = Field(default=2, ge=1)
    max_queued: int = Field(default=10, ge=1)
    guards: RuleGuards = RuleGuards()
    # correlation (loopd.decide.correlation): a group of keys, inhibitions, an absence,
    # several conditions for one key
    group: Group | None = None
    inhibits: list[str] = Field(default_factory=list)
    absent: float | None = None
    all: list[Condition] | None = None
    any: list[Condition] | None = None
    within: float | None = None
    run: Run
    # inputs of run.input that may carry event data into a shell verbatim
    # (an action's raw.X): an explicit, logged opt-out of loopd/packs/taint.py's check
    unsafe_shell: list[str] = Field(default_factory=list)

    @field_validator("for_", "absent", "within", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return _duration(v)

    @field_validator("absent", "within")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("must be longer than 0s")
        return v

    @property
    def conditions(self) -> list[Condition]:
        """What the rule matches: its ``all``/``any`` conditions, or its ``on`` and ``if``."""
        return self.all or self.any or [Condition(on=self.on, if_=self.if_)]

    def correlation_problems(self) -> list[tuple[str, str]]:
        """(field, problem) for correlation fields that do not go together."""
        out: list[tuple[str, str]] = []
        several = "all" if self.all is not None else "any" if self.any is not None else None
        if self.all is not None and self.any is not None:
            out.append(("any", "a rule has all or any, not both"))
        if several is not None:
            if "on" in self.model_fields_set or self.if_ is not None:
                out.append((several, f"with {several}, each condition has its own on and if "
                                     "(no top-level on/if)"))
            least = 2 if several == "all" else 1
            if len(self.conditions) < least:
                out.append((several, f"{several} needs at least {least} conditions"))
        if self.all is not None and self.within is None:
            out.append(("all", "all needs within: how close in time the conditions must "
                               "match"))
        if self.within is not None and self.all is None:
            out.append(("within", "within goes with all (a group has group.within)"))
        if self.group is not None and several is not None:
            out.append(("group", f"group cannot be combined with {several}"))
        if self.inhibits and self.group is None:
            out.append(("inhibits", "inhibits needs group: it holds back the listed rules "
                                    "for the members of an open group incident"))
        if self.name in self.inhibits:
            out.append(("inhibits", "a rule cannot inhibit itself"))
        if self.absent is not None:
            if self.for_ is not None:
                out.append(("absent", "absent cannot be combined with for: (absent is a "
                                      "duration itself)"))
            for other in ("group", "all", "any"):
                if getattr(self, other) is not None:
                    out.append(("absent", f"absent cannot be combined with {other}"))
        if self.group is not None and self.for_ is not None \
                and self.group.within < self.for_:
            out.append(("group.within", f"group.within ({self.group.within:g}s) is shorter "
                                        f"than for: ({self.for_:g}s): a member counts only "
                                        "after for:, so make within at least as long"))
        if self.group is not None and self.run_mode != "single":
            out.append(("run_mode", "a group incident's later members join it: run_mode "
                                    f"{self.run_mode} does not apply to a group rule"))
        if self.all is not None and self.for_ is not None:
            out.append(("for", "for: cannot be combined with all"))
        return out


class RuleFile(_Strict):
    rules: list[dict[str, Any]] = Field(default_factory=list)
