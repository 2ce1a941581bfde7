"""Running one action: input validation, dry runs, timeouts, and the runner protocol.

Runner contract (every runner passes ``tests/integration/test_runner_contract.py``):

* ``run(action, input, ctx)`` performs the action once and returns its result
  as a JSON-able dict; it raises ``ActionError`` with a message naming the
  cause (``ssh web-1: authentication failed``) when the action failed.
* It never retries on its own beyond what its spec says (http: connection
  errors and 5xx, ``retries`` times); task-level retries belong to workflows.
* ``close()`` releases pooled connections (ssh per host, one http session).
* Secrets come from ``ctx.secret(name, field)`` (resolved at that call) and
  never appear in results, errors or logs.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from loopd import metrics
from loopd.catalog.credentials import Credentials
from loopd.catalog.credentials import Field as CredentialField
from loopd.catalog.inventory import Inventory
from loopd.errors import ActionError, ActionTimeout, ConfigError, UnknownAction
from loopd.packs.registry import Action, PackRegistry, validate_fields

log = structlog.get_logger("loopd.actions")


@dataclass(slots=True)
class ActionContext:
    """What an action may read besides its input."""

    run_id: str
    task: str
    inventory: Inventory
    pack_config: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    services: dict[str, Any] = field(default_factory=dict)  # e.g. buses for `publish`

    def entity(self, name: str) -> dict[str, Any]:
        return self.inventory.entities.get(name) or {"name": name}

    def credentials(self, name: str) -> Credentials:
        """The inventory's credentials ``name`` (references; see ``secret`` for values)."""
        creds = self.inventory.credentials.get(name)
        if creds is None:
            raise ActionError(f"unknown credentials {name!r}")
        return creds

    def secret(self, name: str, field: CredentialField) -> str | None:
        """Resolve one field of credentials ``name`` now; ActionError names the reference."""
        try:
            return self.credentials(name).resolve(field)
        except ConfigError as exc:
            raise ActionError(f"credentials {name!r}: {exc}") from None


@dataclass(slots=True)
class ActionResult:
    ok: bool
    output: dict[str, Any]
    error: str | None
    seconds: float


class Runner(Protocol):
    async def run(self, action: Action, input: dict[str, Any], ctx: ActionContext
                  ) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class Executor:
    """Finds the action, validates its input, applies its timeout, times it."""

    def __init__(self, registry: PackRegistry, runners: dict[str, Runner], *,
                 max_concurrent: int = 64) -> None:
        self.registry = registry
        self.runners = runners
        # Caps actions executing at once; runs waiting (confirm, approval, delay) hold no slot.
        self._slots = asyncio.Semaphore(max_concurrent)

    def action(self, name: str) -> Action:
        action = self.registry.actions.get(name)
        if action is None:
            raise UnknownAction(self.registry.check_target("action", name) or name)
        return action

    async def execute(self, name: str, raw_input: dict[str, Any], ctx: ActionContext
                      ) -> ActionResult:
        started = time.monotonic()
        try:
            action = self.action(name)
            ctx.pack_config = action.pack.config
            try:
                values = validate_fields(action.spec.input, raw_input, "input")
            except ValueError as exc:
                raise ActionError(str(exc)) from None
            if ctx.dry_run:
                output = dict(action.spec.dry_run or {})
                output.setdefault("dry_run", True)
            else:
                runner = self.runners.get(action.spec.runner)
                if runner is None:
                    raise ActionError(f"runner {action.spec.runner!r} is not available")
                try:
                    async with self._slots, asyncio.timeout(action.spec.timeout):
                        output = await runner.run(action, values, ctx)
                except TimeoutError:
                    raise ActionTimeout(f"timed out after {action.spec.timeout:g}s") from None
            seconds = time.monotonic() - started
            metrics.action_finished(name, "succeeded", seconds)
            return ActionResult(True, output, None, seconds)
        except ActionError as exc:
            seconds = time.monotonic() - started
            status = "timed_out" if isinstance(exc, ActionTimeout) else "failed"
            metrics.action_finished(name, status, seconds)
            log.warning("action failed", action=name, run=ctx.run_id, task=ctx.task,
                        error=str(exc))
            return ActionResult(False, {"timed_out": isinstance(exc, ActionTimeout)},
                                f"{name}: {exc}", seconds)
        except Exception as exc:  # task boundary: a buggy action fails its task, not loopd
            seconds = time.monotonic() - started
            metrics.action_finished(name, "failed", seconds)
            log.exception("action crashed", action=name, run=ctx.run_id, task=ctx.task)
            return ActionResult(False, {}, f"{name}: {type(exc).__name__}: {exc}", seconds)

    async def close(self) -> None:
        for runner in self.runners.values():
            await runner.close()
