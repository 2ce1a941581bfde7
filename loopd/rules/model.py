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
    run: Run
    # inputs of run.input that may carry event data into a shell verbatim
    # (an action's raw.X): an explicit, logged opt-out of loopd/packs/taint.py's check
    unsafe_shell: list[str] = Field(default_factory=list)

    @field_validator("for_", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration(v)


class RuleFile(_Strict):
    rules: list[dict[str, Any]] = Field(default_factory=list)
