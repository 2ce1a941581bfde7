"""The http pack: ``request``, one HTTP request described entirely by its input."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loopd.errors import ActionError
from loopd.packs.executor import ActionContext
from loopd.packs.http import SECRET_HEADERS, HttpRequest, authorization, new_session, send


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    url: str
    headers: dict[str, Any] | None = None
    query: dict[str, Any] | None = None
    json_body: Any = Field(default=None, alias="json")
    form: dict[str, Any] | None = None
    expect: list[int] = Field(default_factory=lambda: [200, 201, 202, 204])
    retries: int = Field(default=2, ge=0, le=10)
    auth: Literal["basic", "bearer"] | None = None
    credentials: str | None = None


async def request(input: RequestInput, ctx: ActionContext) -> dict[str, Any]:
    headers = dict(input.headers or {})
    secrets = [v for k, v in headers.items() if k.lower() in SECRET_HEADERS]
    if input.auth is not None:
        if not input.credentials:
            raise ActionError(f"auth {input.auth} needs credentials (an inventory name)")
        value, hidden = await authorization(input.auth, input.credentials, ctx)
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        headers["Authorization"] = value
        secrets += hidden
    req = HttpRequest(input.method, input.url, headers, dict(input.query or {}),
                      input.json_body, input.form,
                      tuple(s for s in secrets if isinstance(s, str)))
    async with new_session() as session:  # one request: the session lives as long as it
        return await send(session, req, expect=input.expect, retries=input.retries)
