"""The sim pack: acts on the simulated fleet of ``loopd demo`` (loopd/sources/sim.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from loopd.errors import ActionError
from loopd.packs.executor import ActionContext


class ServiceInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str
    service: str


async def restart_service(input: ServiceInput, ctx: ActionContext) -> dict[str, Any]:
    fleet = ctx.services.get("sim")
    if fleet is None:
        raise ActionError("no simulated fleet: configure a source with type: sim")
    try:
        return dict(fleet.restart(input.host, input.service))
    except KeyError as exc:
        raise ActionError(str(exc.args[0])) from None
