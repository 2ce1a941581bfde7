"""A real workflow engine for tests: the pieces loopd.daemon wires, minus sources and rules.

``Harness`` owns a packs folder in ``tmp_path`` holding the shipped ``core`` pack and a
test pack ``t`` (``pack.yaml`` + ``actions.py`` below: small async actions that record
every call in ``Calls``, which they reach through ``ctx.services["calls"]``, so the
record survives reloading the pack and restarting the engine), a ``SqliteStore``, an
``Executor`` with a ``PythonRunner``, and one ``Process``: the run half of one loopd
process (``TaskKinds``, ``WorkflowRunner``, ``Dispatcher``), built by
``loopd.wiring.build_runs`` as the daemon builds it. ``restart()`` stops that
process the way loopd.daemon does at shutdown (``dispatcher.shutting_down = True``,
then cancel) and starts a new one on the same store that resumes what was in flight.

Tests write workflows with ``load(name=yaml)``, start runs with ``start``/``run``, and
wait with ``wait`` (the dispatcher draining) or ``tests.servers.wait_until``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopd.catalog.inventory import Inventory
from loopd.errors import PackError
from loopd.messages import RunEnded, StartRun
from loopd.packs.executor import Executor
from loopd.packs.python import PythonRunner
from loopd.packs.registry import PackRegistry
from loopd.runs import states
from loopd.runs.approvals import Approvals
from loopd.runs.dispatcher import API_CANCEL, Dispatcher
from loopd.runs.runner import WorkflowRunner
from loopd.runs.tasks import TaskKinds
from loopd.store.base import RunRecord, StepRecord
from loopd.store.sqlite import SqliteStore
from loopd.wiring import build_runs
from loopd.workflow.loader import load_workflows
from tests.servers import wait_until

REPO = Path(__file__).resolve().parents[1]

PACK_YAML = """\
name: t
actions:
  echo:                 # returns its value
    runner: python
    idempotent: true
    timeout: 5s
    input: {value: {type: any}}
  flaky:                # fails `fails` times per key, then succeeds
    runner: python
    idempotent: true
    timeout: 5s
    input:
      key: {type: string, required: true}
      fails: {type: integer, default: 1}
  slow:                 # takes `seconds`; Calls.peak is the most running at once
    runner: python
    idempotent: true
    timeout: 5s
    input: {seconds: {type: number, required: true}, key: {type: any}}
  deploy:               # not idempotent, compensated by t.undeploy
    runner: python
    timeout: 5s
    input: {name: {type: string, required: true}}
    rollback:
      action: t.undeploy
      input: {name: "{{ input.name }}", version: "{{ result.version }}"}
  undeploy:
    runner: python
    idempotent: true
    timeout: 5s
    input: {name: {type: string, required: true}, version: {type: string}}
  notify:               # not idempotent, nothing to compensate
    runner: python
    timeout: 5s
    input: {message: {type: string, required: true}}
  hold:                 # not idempotent; waits for Calls.gate unless its key is free
    runner: python
    timeout: 30s
    input: {key: {type: string, required: true}}
  hold_idempotent:
    runner: python
    entry: hold
    idempotent: true
    timeout: 30s
    input: {key: {type: string, required: true}}
"""

ACTIONS_PY = '''\
"""Test actions: each records its call in ctx.services["calls"] (tests.workflow_harness.Calls)."""

import asyncio

from loopd.errors import ActionError


async def echo(input, ctx):
    ctx.services["calls"].record("echo", ctx.task, input)
    return {"value": input.get("value")}


async def flaky(input, ctx):
    calls = ctx.services["calls"]
    calls.record("flaky", ctx.task, input)
    attempt = calls.count("flaky", key=input["key"])
    if attempt <= input["fails"]:
        raise ActionError(f"{input['key']} failed on attempt {attempt}")
    return {"attempts": attempt, "key": input["key"]}


async def slow(input, ctx):
    calls = ctx.services["calls"]
    calls.record("slow", ctx.task, input)
    calls.running += 1
    calls.peak = max(calls.peak, calls.running)
    try:
        await asyncio.sleep(input["seconds"])
    finally:
        calls.running -= 1
    return {"slept": input["seconds"], "key": input.get("key")}


async def deploy(input, ctx):
    ctx.services["calls"].record("deploy", ctx.task, input)
    return {"version": input["name"] + "-v2"}


async def undeploy(input, ctx):
    ctx.services["calls"].record("undeploy", ctx.task, input)
    return {}


async def notify(input, ctx):
    ctx.services["calls"].record("notify", ctx.task, input)
    return {"sent": True}


async def hold(input, ctx):
    calls = ctx.services["calls"]
    calls.record("hold", ctx.task, input)
    if input["key"] not in calls.free:
        await calls.gate.wait()
    return {"key": input["key"]}
'''


@dataclass
class Call:
    action: str
    task: str
    input: dict[str, Any]


@dataclass
class Calls:
    """Every call the test pack's actions received, and the knobs they read."""

    log: list[Call] = field(default_factory=list)
    running: int = 0
    peak: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # releases `hold`
    free: set[str] = field(default_factory=set)  # `hold` keys that do not wait

    def record(self, action: str, task: str, input: dict[str, Any]) -> None:
        self.log.append(Call(action, task, dict(input)))

    def of(self, action: str) -> list[dict[str, Any]]:
        return [c.input for c in self.log if c.action == action]

    def count(self, action: str, **match: Any) -> int:
        return sum(1 for c in self.log if c.action == action
                   and all(c.input.get(k) == v for k, v in match.items()))


@dataclass
class Finished:
    """A run as the store has it once the dispatcher is done with it."""

    run: RunRecord
    steps: list[StepRecord]

    @property
    def status(self) -> str:
        return self.run.status

    @property
    def outcome(self) -> str | None:
        return self.run.outcome

    @property
    def reason(self) -> str | None:
        return self.run.reason

    @property
    def ctx(self) -> dict[str, Any]:
        ctx: dict[str, Any] = self.run.ctx
        return ctx

    @property
    def tasks(self) -> list[str]:
        return [s.task for s in self.steps]

    def of(self, task: str) -> list[StepRecord]:
        return [s for s in self.steps if s.task == task]


class Process:
    """The workflow half of one loopd process, as loopd.wiring builds it; the runs that
    end are told to ``put_nowait`` (where the daemon's engine has its inbox)."""

    def __init__(self, harness: Harness) -> None:
        h = harness
        runs = build_runs(h.store, h.executor, lambda: h.registry, inventory=h.inventory,
                          ended=self, services={"calls": h.calls})
        self.kinds, self.runner, self.dispatcher = runs.kinds, runs.workflows, runs.dispatcher
        self.approvals: Approvals = runs.approvals
        self.incidents: list[tuple[str, str]] = []
        self._task: asyncio.Task[None] | None = None

    def put_nowait(self, ended: RunEnded, /) -> None:
        """A run ended (what the engine's inbox receives): incidents it would close."""
        if ended.run.incident_id is not None:
            self.incidents.append((ended.run.incident_id, ended.run.outcome or ""))
        ended.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self.dispatcher.run(), name="test-dispatcher")

    async def stop(self) -> None:
        """Stop like loopd.daemon at shutdown: runs still active stay as they are stored."""
        self.dispatcher.shutting_down = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def write_packs(root: Path) -> Path:
    """A packs folder with the shipped ``core`` pack and the test pack ``t``; returns
    ``t``'s folder (its workflows go in ``workflows/``)."""
    shutil.copytree(REPO / "packs" / "core", root / "core")
    pack = root / "t"
    (pack / "workflows").mkdir(parents=True)
    (pack / "pack.yaml").write_text(PACK_YAML)
    (pack / "actions.py").write_text(ACTIONS_PY)
    return pack


def load_packs(root: Path, **workflows: str) -> PackRegistry:
    """Write ``t.<name>`` workflows (dedented YAML) under ``root`` and load every pack."""
    for name, text in workflows.items():
        (root / "t" / "workflows" / f"{name}.yaml").write_text(
            textwrap.dedent(text).lstrip("\n"))
    registry = PackRegistry.load([root])
    load_workflows(registry)
    return registry


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "packs"
        self.pack = write_packs(self.root)
        self.calls = Calls()
        self.inventory = Inventory({"web-1": {"role": "web"}, "web-2": {"role": "web"}})
        self.store = SqliteStore(tmp_path / "loopd.db")
        self.registry = PackRegistry()
        self.executor = Executor(self.registry, {"python": PythonRunner()})
        self.process = Process(self)

    def load(self, **workflows: str) -> PackRegistry:
        """Write ``t.<name>`` workflows and (re)load the packs; fail on any error."""
        errors = self.load_with_errors(**workflows)
        assert errors == [], [str(e) for e in errors]
        return self.registry

    def load_with_errors(self, **workflows: str) -> list[PackError]:
        self.registry = load_packs(self.root, **workflows)
        self.executor.registry = self.registry
        return self.registry.errors

    @property
    def kinds(self) -> TaskKinds:
        return self.process.kinds

    @property
    def runner(self) -> WorkflowRunner:
        return self.process.runner

    @property
    def dispatcher(self) -> Dispatcher:
        return self.process.dispatcher

    @property
    def approvals(self) -> Approvals:
        return self.process.approvals

    def cancel(self, run: RunRecord | str) -> bool:
        """Cancel a run as the API does (whether or not it acts already)."""
        run_id = run if isinstance(run, str) else run.id
        return self.dispatcher.cancel(run_id, API_CANCEL, acting_too=True)

    async def start(self, workflow: str, *, entity: str = "web-1",
                    incident: str | None = None, **input: Any) -> RunRecord:
        """Create a durable run and hand it to the dispatcher, as the engine does."""
        if "." not in workflow:
            workflow = f"t.{workflow}"
        run = RunRecord(uuid.uuid4().hex[:12], incident, "test-rule", entity, "workflow",
                        workflow, input, states.PENDING, time.time())
        await self.store.save_run(run)
        self.dispatcher.commands.put_nowait(StartRun(run))
        return run

    async def wait(self, run: RunRecord | str, timeout: float = 10.0) -> Finished:
        """Wait until the dispatcher is idle; return the run as stored, with its steps."""
        run_id = run if isinstance(run, str) else run.id
        await self.dispatcher.drain(timeout)
        stored = await self.store.get_run(run_id)
        assert stored is not None, f"no run {run_id}"
        return Finished(stored, await self.store.steps(run_id))

    async def run(self, workflow: str, *, entity: str = "web-1", **input: Any) -> Finished:
        return await self.wait(await self.start(workflow, entity=entity, **input))

    async def waiting_for_evidence(self, count: int = 1) -> None:
        await wait_until(lambda: len(self.kinds.hub) == count, timeout=5,
                         what=f"{count} run(s) to wait for evidence")

    async def crash(self) -> None:
        """Stop this process as loopd.daemon does at shutdown: active runs stay stored as
        they are (``dispatcher.shutting_down``), to be resumed by the next process."""
        await self.process.stop()

    async def resume(self) -> Process:
        """Start a new process on the same store; it resumes what was in flight."""
        self.process = Process(self)
        await self.process.dispatcher.resume()
        self.process.start()
        return self.process

    async def restart(self) -> Process:
        await self.crash()
        return await self.resume()

    async def stored(self, run: RunRecord | str) -> RunRecord:
        stored = await self.store.get_run(run if isinstance(run, str) else run.id)
        assert stored is not None
        return stored


@contextlib.asynccontextmanager
async def open_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """A started Harness; everything it started is stopped and closed on exit.

    Test modules wrap it in their own fixture::

        @pytest.fixture
        async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
            async with open_harness(tmp_path) as h:
                yield h
    """
    h = Harness(tmp_path)
    await h.store.open()
    h.process.start()
    try:
        yield h
    finally:
        h.calls.gate.set()
        await h.process.stop()
        await h.executor.close()
        await h.store.close()
