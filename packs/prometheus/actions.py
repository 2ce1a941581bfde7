"""The prometheus pack's python action: ``create_silence``.

A python action because a silence needs ``startsAt``/``endsAt`` computed from
"now" and a duration, which templates cannot do. It sends through
``loopd.packs.http.send``, so errors and retries are the http runner's.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loopd.config import parse_duration
from loopd.errors import ActionError
from loopd.packs.executor import ActionContext
from loopd.packs.http import HttpRequest, new_session, send


class Matcher(BaseModel):
    """One Alertmanager API v2 matcher."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    value: str
    isRegex: bool = False
    isEqual: bool = True


class SilenceInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    matchers: list[Matcher] = Field(min_length=1)
    duration: float = 3600.0
    starts_at: datetime | None = None
    created_by: str = "loopd"
    comment: str = "silenced by loopd"

    @field_validator("matchers", mode="before")
    @classmethod
    def _from_labels(cls, v: Any) -> Any:
        if isinstance(v, dict):  # {alertname: X, instance: y}: equality matchers
            return [{"name": k, "value": str(val)} for k, val in v.items()]
        return v

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        seconds = parse_duration(v)
        if seconds <= 0:
            raise ValueError("duration must be positive")
        return seconds


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def create_silence(input: SilenceInput, ctx: ActionContext) -> dict[str, Any]:
    base = ctx.pack_config.get("alertmanager_url")
    if not base:
        raise ActionError("pack config alertmanager_url is not set "
                          "(loopd.yaml pack_config.prometheus.alertmanager_url)")
    starts = input.starts_at or datetime.now(UTC)
    if starts.tzinfo is None:
        starts = starts.replace(tzinfo=UTC)
    ends = datetime.fromtimestamp(starts.timestamp() + input.duration, UTC)
    body = {
        "matchers": [m.model_dump() for m in input.matchers],
        "startsAt": _rfc3339(starts), "endsAt": _rfc3339(ends),
        "createdBy": input.created_by, "comment": input.comment,
    }
    req = HttpRequest("POST", f"{str(base).rstrip('/')}/api/v2/silences",
                      {"Accept": "application/json"}, json_body=body)
    async with new_session() as session:
        result = await send(session, req, expect=(200,))
    reply = result["json"]
    silence_id = reply.get("silenceID") if isinstance(reply, dict) else None
    if not silence_id:
        raise ActionError(f"alertmanager answered without a silenceID: {str(reply)[:200]}")
    return {"silenceID": silence_id, "startsAt": body["startsAt"], "endsAt": body["endsAt"],
            "matchers": body["matchers"]}
