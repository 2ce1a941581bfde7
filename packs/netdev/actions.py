"""The netdev pack's python actions: baselines of device configs in loopd's store.

A baseline is kept under ``kv("netdev.baseline", device)`` as
``{"config": text, "saved": unix time, "run": run id}``, so it survives restarts
and is shared by every loopd replica that shares the store.
"""

from __future__ import annotations

import difflib
import re
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from loopd.errors import ActionError
from loopd.packs.executor import ActionContext
from loopd.store.base import Store

NAMESPACE = "netdev.baseline"
MAX_DIFF = 16 * 1024


class CompareInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str
    config: str
    truncated: bool = False
    ignore: list[str] = Field(default_factory=list)  # pack.yaml gives the defaults


class SaveInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str
    config: str
    truncated: bool = False


def _store(ctx: ActionContext) -> Store:
    store: Store | None = ctx.services.get("store")
    if store is None:
        raise ActionError("netdev baselines need loopd's store (services['store'])")
    return store


def _refuse_partial(device: str, truncated: bool) -> None:
    if truncated:
        raise ActionError(f"the running config of {device} was truncated by the ssh runner "
                          "(max_output): refusing to use a partial config")


def _lines(config: str, ignore: list[re.Pattern[str]]) -> list[str]:
    """Config lines without trailing blanks, trailing empty lines and ignored lines."""
    lines = [line.rstrip() for line in config.splitlines()
             if not any(p.search(line) for p in ignore)]
    while lines and not lines[-1]:
        lines.pop()
    return lines


async def compare_to_baseline(input: CompareInput, ctx: ActionContext) -> dict[str, Any]:
    _refuse_partial(input.device, input.truncated)
    try:
        ignore = [re.compile(p) for p in input.ignore]
    except re.error as exc:
        raise ActionError(f"ignore: invalid regular expression {exc.pattern!r}: {exc}") from None
    saved = await _store(ctx).kv_get(NAMESPACE, input.device)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), str):
        return {"has_baseline": False, "drift": False, "diff": "", "baseline": None,
                "baseline_saved": None}
    baseline = _lines(saved["config"], ignore)
    running = _lines(input.config, ignore)
    diff = "\n".join(difflib.unified_diff(baseline, running, f"{input.device} baseline",
                                          f"{input.device} running", lineterm=""))
    if len(diff) > MAX_DIFF:
        diff = diff[:MAX_DIFF] + "\n... (diff truncated)"
    return {"has_baseline": True, "drift": baseline != running, "diff": diff,
            "baseline": saved["config"], "baseline_saved": saved.get("saved")}


async def save_baseline(input: SaveInput, ctx: ActionContext) -> dict[str, Any]:
    _refuse_partial(input.device, input.truncated)
    if not input.config.strip():
        raise ActionError(f"refusing to save an empty config as the baseline of {input.device}")
    saved = time.time()
    await _store(ctx).kv_put(NAMESPACE, input.device,
                             {"config": input.config, "saved": saved, "run": ctx.run_id})
    return {"device": input.device, "saved": saved, "lines": len(input.config.splitlines())}
