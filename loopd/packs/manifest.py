"""pydantic models of ``pack.yaml``: a pack's actions, their runners and inputs.

```yaml
name: linux
version: 1.0.0
description: Services, disks and commands on Linux hosts over SSH
config:                       # validated against loopd.yaml `packs: {linux: {...}}`
  sudo: {type: boolean, default: true}
actions:
  restart_service:
    runner: ssh               # python | ssh | http | publish (discriminates the fields below)
    input:
      host: {type: string, required: true}
      service: {type: string, required: true, pattern: "[A-Za-z0-9_.:@][A-Za-z0-9_.:@-]*"}
    command: "sudo systemctl restart -- {{ input.service }}"
    timeout: 60s
    idempotent: true          # safe to retry after a crash
    rollback: {action: linux.start_service, input: {host: "{{ input.host }}"}}
    dry_run: {exit_status: 0, stdout: ""}
```

``pattern`` (a regular expression a string input must match as a whole; each string
of an array input) is checked before anything runs and, for constants, by ``loopd
check``: quoting makes one shell word, not a safe word (``-delete`` as a path is an
option), so inputs that become operands declare what they look like. ``one_of``
lists inputs of which exactly one must be given (``run_command``: ``argv`` or
``command``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from loopd.units import parse_duration

FieldType = Literal["string", "integer", "number", "boolean", "object", "array", "any"]
_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "object": (dict,), "array": (list,),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputField(_Strict):
    type: FieldType = "string"
    required: bool = False
    default: Any = None
    description: str = ""
    # takes a reference (env:, file:, dir:, exec:) that the executor resolves just before
    # the runner is called: the run's stored input holds the reference, never the value
    secret: bool = False
    enum: list[Any] | None = None
    pattern: str | None = None  # a string (or each string of an array) must fullmatch it
    _regex: re.Pattern[str] | None = PrivateAttr(default=None)

    @field_validator("pattern")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"pattern {v!r} is not a regular expression: {exc}") from None
        return v

    def model_post_init(self, context: Any) -> None:
        if self.pattern is not None:
            self._regex = re.compile(self.pattern)

    def check(self, name: str, value: Any) -> str | None:
        """None when ``value`` fits, else what is wrong with it."""
        if self.type == "any" or value is None:
            return None
        types = _PY_TYPES[self.type]
        if isinstance(value, bool) and self.type in ("integer", "number"):
            return f"{name}: expected {self.type}, got boolean"
        if not isinstance(value, types):
            return f"{name}: expected {self.type}, got {type(value).__name__}"
        if self.enum is not None and value not in self.enum:
            return f"{name}: {value!r} is not one of {self.enum}"
        if self.secret:  # the value is a reference: its pattern applies to what it gives
            return None
        return self.pattern_problem(name, value)

    def pattern_problem(self, name: str, value: Any) -> str | None:
        """None when ``value`` (or each string of a list) matches ``pattern``."""
        if self._regex is not None:
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and self._regex.fullmatch(item) is None:
                    shown = "the value" if self.secret else _short(item)
                    return f"{name}: {shown} does not match its pattern {self.pattern}"
        return None


def _short(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


class Rollback(_Strict):
    action: str
    input: dict[str, Any] = Field(default_factory=dict)


class _Action(_Strict):
    description: str = ""
    input: dict[str, InputField] = Field(default_factory=dict)
    one_of: list[str] | None = None  # exactly one of these inputs must be given
    timeout: float = 60.0
    idempotent: bool = False
    rollback: Rollback | None = None
    dry_run: dict[str, Any] | None = None

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @model_validator(mode="after")
    def _one_of_declared(self) -> _Action:
        unknown = [n for n in self.one_of or () if n not in self.input]
        if unknown:
            raise ValueError(f"one_of names undeclared input(s) {', '.join(unknown)}")
        return self


class PythonAction(_Action):
    runner: Literal["python"]
    entry: str | None = None  # function in the pack's actions.py; default: the action's name


class SshAction(_Action):
    runner: Literal["ssh"]
    command: str
    host: str = "{{ input.host }}"
    ok_exit_status: list[int] = Field(default_factory=lambda: [0])


class HttpAuth(_Strict):
    type: Literal["basic", "bearer"]
    credentials: str  # a key of the inventory's credentials, or a template resolving to one


class HttpAction(_Action):
    runner: Literal["http"]
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, Any] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")
    form: dict[str, Any] | None = None
    auth: HttpAuth | None = None
    expect: list[int] = Field(default_factory=lambda: [200, 201, 202, 204])
    retries: int = Field(default=2, ge=0)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PublishAction(_Action):
    runner: Literal["publish"]
    bus: str  # the name of a kafka or mqtt source/sink in loopd.yaml
    topic: str
    payload: Any = None
    key: str | None = None


ActionSpec = Annotated[
    PythonAction | SshAction | HttpAction | PublishAction, Field(discriminator="runner")
]


class PackManifest(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    version: str = "0.0.0"
    description: str = ""
    config: dict[str, InputField] = Field(default_factory=dict)
    actions: dict[str, ActionSpec] = Field(default_factory=dict)
