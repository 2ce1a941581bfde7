"""The core pack: log, noop, fail, sleep, set."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict

from loopd.errors import ActionError
from loopd.packs.executor import ActionContext

log = structlog.get_logger("loopd.core")


class LogInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    level: Literal["debug", "info", "warning", "error"] = "info"


class FailInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = "failed on purpose"


class SleepInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float


async def log_(input: LogInput, ctx: ActionContext) -> dict[str, Any]:
    getattr(log, input.level)(input.message, run=ctx.run_id, task=ctx.task)
    return {"message": input.message}


async def noop(input: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    return dict(input)


async def fail(input: FailInput, ctx: ActionContext) -> dict[str, Any]:
    raise ActionError(input.reason)


async def sleep(input: SleepInput, ctx: ActionContext) -> dict[str, Any]:
    async with ctx.waiting():  # sleeping is not acting: other runs' actions take the slot
        await asyncio.sleep(input.seconds)
    return {"slept": input.seconds}


async def set_(input: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    return dict(input)
