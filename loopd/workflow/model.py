"""pydantic models of workflow files (``packs/<pack>/workflows/<name>.yaml``).

A workflow is a stateless template: inputs, tasks, transitions. Each task is
exactly one kind: ``action``, ``workflow`` (a sub-workflow), ``confirm``,
``approval``, ``rollback``, ``succeed``, ``fail`` or ``noop``; any task can
``delay`` first, be ``retry``-ed, ``join`` branches and ``publish`` values into the
run context; an action task can fan out ``with_items``, and list in ``unsafe_shell``
the inputs it knowingly lets run data (``ctx``, ``input``, ``item``...) reach a shell
verbatim through.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loopd.packs.manifest import InputField
from loopd.units import parse_duration

_KINDS = ("action", "workflow", "confirm", "approval", "rollback", "succeed", "fail", "noop")
RESULT_WORDS = ("succeeded", "failed", "inconclusive", "timed_out", "always")


def _dur(v: Any) -> float | None:
    return None if v is None else parse_duration(v)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Retry(_Strict):
    count: int = Field(ge=0)
    delay: float = 0.0
    backoff: float = Field(default=1.0, ge=1.0)
    max_delay: float = 3600.0
    when: str | None = None  # retry only when this condition on `result` holds

    _d = field_validator("delay", "max_delay", mode="before")(lambda v: parse_duration(v))


class Transition(_Strict):
    when: str = "succeeded"  # a result word or a condition on `result`/`status`/`ctx`
    do: list[str]

    @field_validator("do", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class EventEvidence(_Strict):
    source: str | None = None
    topic: str | None = None
    match: dict[str, Any] = Field(default_factory=dict)
    if_: str | None = Field(default=None, alias="if")  # success when true; else counter-evidence


class Confirm(_Strict):
    event: EventEvidence | None = None
    query: str | None = None  # PromQL; true when the result is non-empty and non-zero
    or_query: str | None = None  # synonym of query when used together with event
    within: float
    interval: float = 15.0

    _d = field_validator("within", "interval", mode="before")(lambda v: parse_duration(v))

    @model_validator(mode="after")
    def _evidence(self) -> Confirm:
        if self.event is None and self.query is None and self.or_query is None:
            raise ValueError("confirm needs an event, a query, or both")
        if self.query is not None and self.or_query is not None:
            raise ValueError("query and or_query are the same setting; give one")
        return self

    @property
    def promql(self) -> str | None:
        return self.query or self.or_query


class Approval(_Strict):
    within: float = 3600.0
    message: str = ""

    _d = field_validator("within", mode="before")(lambda v: parse_duration(v))


class Task(_Strict):
    action: str | None = None
    workflow: str | None = None
    confirm: Confirm | None = None
    approval: Approval | None = None
    rollback: Literal["all"] | list[str] | None = None
    # the outcome to report: a value of loopd.runs.states.Outcome (bounded metric labels)
    succeed: Literal["fixed", "not_fixed", "inconclusive", "failed", "cancelled",
                     "done"] | None = None
    fail: str | None = None     # the reason
    noop: bool | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    publish: dict[str, Any] = Field(default_factory=dict)
    retry: Retry | None = None
    delay: float | None = None
    timeout: float | None = None
    with_items: str | list[Any] | None = None
    concurrency: int = Field(default=8, ge=1)
    join: list[str] | None = None
    next: list[Transition] = Field(default_factory=list)
    # inputs of an action task that may carry run data into a shell verbatim (the action's
    # raw.X): an explicit, logged opt-out of loopd/packs/taint.py's check
    unsafe_shell: list[str] = Field(default_factory=list)

    _d = field_validator("delay", "timeout", mode="before")(lambda v: _dur(v))

    @field_validator("next", mode="before")
    @classmethod
    def _next(cls, v: Any) -> Any:
        if isinstance(v, str):  # `next: verify` = on success go to verify
            return [{"when": "succeeded", "do": v}]
        if isinstance(v, dict):  # a single transition
            return [v]
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> Task:
        kinds = [k for k in _KINDS if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError(f"a task is exactly one of {', '.join(_KINDS)}; got {kinds}")
        if self.with_items is not None and self.action is None:
            raise ValueError("with_items needs an action: a sub-workflow task cannot fan out "
                             "(start one run per item from a rule, or fan out its action)"
                             if self.workflow is not None else "with_items needs an action")
        return self

    @property
    def kind(self) -> str:
        return next((k for k in _KINDS if getattr(self, k) is not None), "noop")


class Workflow(_Strict):
    description: str = ""
    input: dict[str, InputField] = Field(default_factory=dict)
    timeout: float | None = None
    start: str | None = None
    tasks: dict[str, Task] = Field(min_length=1)

    _d = field_validator("timeout", mode="before")(lambda v: _dur(v))

    @field_validator("input", mode="before")
    @classmethod
    def _inputs(cls, v: Any) -> Any:
        if isinstance(v, list):  # `input: [host, service]` = required strings
            return {name: {"type": "any", "required": True} for name in v}
        return v

    @property
    def first(self) -> str:
        return self.start or next(iter(self.tasks))
