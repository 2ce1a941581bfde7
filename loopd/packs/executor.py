"""Running one action: input validation, dry runs, timeouts, and the runner protocol.

Runner contract (every runner passes ``tests/integration/test_runner_contract.py``):

* ``run(action, input, ctx)`` performs the action once and returns its result
  as a JSON-able dict; it raises ``ActionError`` with a message naming the
  cause (``ssh web-1: authentication failed``) when the action failed.
* It never retries on its own beyond what its spec says (http: connection
  errors and 5xx, ``retries`` times); task-level retries belong to workflows.
* ``close()`` releases pooled connections (ssh per host, one http session).
* Secrets come from ``await ctx.secret(name, field)`` (resolved at that call by the
  executor's ``SecretResolver``, see loopd/catalog/backends.py) and never appear in
  results, errors or logs; an error names the credentials entry, the field and (when
  well formed) the reference, never a value.
* An action that only waits for a while (``core.sleep``, a poll interval) does so
  inside ``async with ctx.waiting():``, which gives its slots back meanwhile.

Slots: at most ``max_concurrent`` actions execute at once. An action is *started* only
once it holds its slot: ``execute(..., started=hook)`` awaits ``hook`` right then, just
before the runner is invoked, so a caller records an attempt as running only when it
really runs (a run that was still waiting for a slot when loopd died has not acted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from loopd import metrics
from loopd.catalog.backends import SecretResolver
from loopd.catalog.credentials import Credentials, Reference
from loopd.catalog.credentials import Field as CredentialField
from loopd.catalog.inventory import Inventory
from loopd.catalog.secrets import Secrets
from loopd.errors import ActionError, ActionTimeout, ConfigError, UnknownAction
from loopd.packs.registry import Action, PackRegistry, validate_fields

log = structlog.get_logger("loopd.actions")


class Hold(Protocol):
    """A slot an acting run holds (the executor's, the dispatcher's start slot); given
    back while the action only waits, taken again before it goes on."""

    def give_back(self) -> None: ...

    async def take(self) -> None: ...


class _SlotHold:
    """One executor slot, held at most once: giving back twice or after a cancelled take
    never releases the semaphore more often than it was acquired."""

    __slots__ = ("_free", "_held")

    def __init__(self, free: asyncio.Semaphore) -> None:
        self._free = free
        self._held = False

    async def take(self) -> None:
        if not self._held:
            await self._free.acquire()
            self._held = True

    def give_back(self) -> None:
        if self._held:
            self._held = False
            self._free.release()


@dataclass(slots=True)
class ActionContext:
    """What an action may read besides its input."""

    run_id: str
    task: str
    inventory: Inventory
    pack_config: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    services: dict[str, Any] = field(default_factory=dict)  # e.g. buses for `publish`
    holds: list[Hold] = field(default_factory=list)  # taken in order, given back reversed
    secrets: SecretResolver = field(default_factory=SecretResolver)  # the executor's
    # awaited right before the action acts: raises (LeaseLost) when the run is no longer
    # this replica's, so a former owner that wakes up acts on nothing
    lease: Callable[[], Awaitable[None]] | None = None

    @asynccontextmanager
    async def waiting(self) -> AsyncIterator[None]:
        """While inside, the action only waits: it holds no slot, so other runs act."""
        for hold in reversed(self.holds):
            hold.give_back()
        try:
            yield
        finally:
            # a cancel here leaves the rest untaken; every Hold gives back only what it has
            for hold in self.holds:
                await hold.take()

    def entity(self, name: str) -> dict[str, Any]:
        return self.inventory.entities.get(name) or {"name": name}

    def credentials(self, name: str) -> Credentials:
        """The inventory's credentials ``name`` (references; see ``secret`` for values)."""
        creds = self.inventory.credentials.get(name)
        if creds is None:
            raise ActionError(f"unknown credentials {name!r}")
        return creds

    async def secret(self, name: str, field: CredentialField) -> str | None:
        """Resolve one field of credentials ``name`` now (None when unset); ActionError
        names the entry, the field and the reference if well formed, never the value.

        A coroutine: a secret backend may have to ask a helper command for the value."""
        creds = self.credentials(name)
        try:
            ref = creds.reference(field)
            if not isinstance(ref, Reference):
                return ref  # unset, or a plain username
            return await self.secrets.resolve(str(ref))
        except ConfigError as exc:
            raise ActionError(f"credentials {name!r} {field}: {exc}") from None


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
                 max_concurrent: int = 64, secrets: SecretResolver | None = None) -> None:
        self.registry = registry
        self.runners = runners
        self.secrets = secrets if secrets is not None else SecretResolver()
        # Caps actions executing at once; runs waiting (confirm, approval, delay, an action
        # inside ctx.waiting()) hold no slot.
        self._slots = asyncio.Semaphore(max_concurrent)

    def action(self, name: str) -> Action:
        action = self.registry.actions.get(name)
        if action is None:
            raise UnknownAction(self.registry.check_target("action", name) or name)
        return action

    async def execute(self, name: str, raw_input: dict[str, Any], ctx: ActionContext, *,
                      started: Callable[[], Awaitable[None]] | None = None) -> ActionResult:
        """Execute action ``name`` once. ``started`` is awaited once the action holds its
        slot, just before it runs (not when its input is invalid); what it raises (a store
        failing) is loopd's, not the action's, and propagates."""
        began = time.monotonic()
        try:
            action = self.action(name)
            ctx.pack_config = action.pack.config
            ctx.secrets = self.secrets
            try:
                values = validate_fields(action.spec.input, raw_input, "input",
                                         one_of=action.spec.one_of)
            except ValueError as exc:
                raise ActionError(str(exc)) from None
            hidden = Secrets()
            if not ctx.dry_run:
                values, hidden = await self._resolve_secret_inputs(action, values)
            runner = None if ctx.dry_run else self.runners.get(action.spec.runner)
            if runner is None and not ctx.dry_run:
                raise ActionError(f"runner {action.spec.runner!r} is not available")
        except ActionError as exc:
            return self._failed(name, ctx, exc, time.monotonic() - began)
        if runner is None:  # a dry run acts on nothing: no slot
            if started is not None:
                await started()
            output = dict(action.spec.dry_run or {})
            output.setdefault("dry_run", True)
            seconds = time.monotonic() - began
            metrics.action_finished(name, "succeeded", seconds)
            return ActionResult(True, output, None, seconds)
        hold = _SlotHold(self._slots)
        try:
            await hold.take()  # waits behind the cap; nothing has acted yet
            if started is not None:
                await started()
            if ctx.lease is not None:
                await ctx.lease()
            return await self._invoke(name, action, runner, values, ctx, hold, hidden)
        finally:
            hold.give_back()

    async def _resolve_secret_inputs(self, action: Action, values: dict[str, Any]
                                     ) -> tuple[dict[str, Any], Secrets]:
        """The input with each ``secret: true`` input's reference replaced by its value
        (the caller keeps, and stores, the reference: only the runner sees the value), and
        those values, to be masked in what the runner returns."""
        secret = [n for n in action.secret_inputs if values.get(n)]
        if not secret:
            return values, Secrets()
        resolved = dict(values)
        for name in secret:
            ref = values[name]
            if not isinstance(ref, str):
                raise ActionError(f"input {name!r} is secret: give a reference, not a "
                                  f"{type(ref).__name__}")
            try:
                resolved[name] = await self.secrets.resolve(ref)
            except ConfigError as exc:
                raise ActionError(f"input {name!r} is secret: {exc}") from None
            problem = action.spec.input[name].pattern_problem(name, resolved[name])
            if problem:
                raise ActionError(f"input: {problem}")
        return resolved, Secrets(resolved[n] for n in secret)

    async def _invoke(self, name: str, action: Action, runner: Runner,
                      values: dict[str, Any], ctx: ActionContext, hold: _SlotHold,
                      hidden: Secrets) -> ActionResult:
        """Run it; whatever the runner returns or raises, a resolved secret input (in
        ``hidden``) is masked before it is logged or leaves here."""
        began = time.monotonic()
        # the slot is given back while the action only waits (ctx.waiting())
        ctx.holds = [*ctx.holds, hold]
        try:
            try:
                async with asyncio.timeout(action.spec.timeout):
                    output = await runner.run(action, values, ctx)
            except TimeoutError:
                raise ActionTimeout(f"timed out after {action.spec.timeout:g}s") from None
            seconds = time.monotonic() - began
            metrics.action_finished(name, "succeeded", seconds)
            return ActionResult(True, hidden.tree(output), None, seconds)
        except ActionError as exc:
            masked = type(exc)(hidden.text(str(exc)), output=hidden.tree(exc.output)) \
                if hidden else exc
            return self._failed(name, ctx, masked, time.monotonic() - began)
        except Exception as exc:  # task boundary: a buggy action fails its task, not loopd
            seconds = time.monotonic() - began
            metrics.action_finished(name, "failed", seconds)
            problem = hidden.text(f"{type(exc).__name__}: {exc}")
            if hidden:  # the traceback could hold the value: log the masked line only
                log.error("action crashed", action=name, run=ctx.run_id, task=ctx.task,
                          error=problem)
            else:
                log.exception("action crashed", action=name, run=ctx.run_id, task=ctx.task)
            return ActionResult(False, {}, f"{name}: {problem}", seconds)
        finally:
            ctx.holds = [h for h in ctx.holds if h is not hold]

    @staticmethod
    def _failed(name: str, ctx: ActionContext, exc: ActionError, seconds: float
                ) -> ActionResult:
        status = "timed_out" if isinstance(exc, ActionTimeout) else "failed"
        metrics.action_finished(name, status, seconds)
        log.warning("action failed", action=name, run=ctx.run_id, task=ctx.task,
                    error=str(exc))
        return ActionResult(False, {**(exc.output or {}),
                                    "timed_out": isinstance(exc, ActionTimeout)},
                            f"{name}: {exc}", seconds)

    async def close(self) -> None:
        for runner in self.runners.values():
            await runner.close()
