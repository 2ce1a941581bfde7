"""The linux and netdev packs end to end: real WorkflowRunner, real SSH server, real store."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loopd.catalog.credentials import Credentials
from loopd.catalog.inventory import Inventory
from loopd.events import Event
from loopd.packs.executor import Executor
from loopd.packs.http import HttpRunner
from loopd.packs.python import PythonRunner
from loopd.packs.registry import PackRegistry
from loopd.packs.ssh import SshRunner
from loopd.runs import states
from loopd.runs.runner import WorkflowRunner
from loopd.runs.tasks import TaskKinds
from loopd.store.base import RunRecord, StepRecord
from loopd.store.sqlite import SqliteStore
from loopd.wiring import build_runs
from loopd.workflow.loader import load_workflows
from tests.servers import wait_until
from tests.servers.http_targets import ServiceNow
from tests.servers.ssh import PASSWORD, USER, SshServer

PACKS = Path(__file__).resolve().parents[2] / "packs"
USED_PACKS = ("core", "linux", "netdev", "servicenow")


@dataclass
class Finished:
    run: RunRecord
    status: str
    reason: str | None
    outcome: str
    steps: list[StepRecord]

    @property
    def tasks(self) -> list[str]:
        return [s.task for s in self.steps]


@dataclass
class Loop:
    """What loopd.daemon builds to run workflows, minus sources, rules and the API."""

    store: SqliteStore
    registry: PackRegistry
    kinds: TaskKinds
    workflows: WorkflowRunner
    executor: Executor

    async def start(self, workflow: str, key: str, **input: Any
                    ) -> tuple[RunRecord, asyncio.Task[tuple[str, str | None]]]:
        run = RunRecord(uuid.uuid4().hex, None, "test-rule", key, "workflow", workflow, input,
                        states.PENDING, time.time())
        await self.store.save_run(run)
        return run, asyncio.create_task(self.workflows.execute(run, resumed=False))

    async def finish(self, run: RunRecord, task: asyncio.Task[tuple[str, str | None]]
                     ) -> Finished:
        async with asyncio.timeout(30):
            status, reason = await task
        return Finished(run, status, reason, self.workflows.outcome(run, status),
                        await self.store.steps(run.id))

    async def run(self, workflow: str, key: str, **input: Any) -> Finished:
        return await self.finish(*await self.start(workflow, key, **input))

    async def waiting(self) -> None:
        await wait_until(lambda: len(self.kinds.hub) == 1, what="the run to wait for evidence")


@pytest.fixture
async def loop(tmp_path: Path, ssh_server: SshServer, servicenow: ServiceNow,
               monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Loop]:
    monkeypatch.setenv("LOOPD_TEST_SSH_PASSWORD", PASSWORD)
    monkeypatch.setenv("LOOPD_TEST_SN_PASSWORD", servicenow.password)
    packs = tmp_path / "packs"  # only the packs under test, whatever else is being written
    packs.mkdir()
    for name in USED_PACKS:
        (packs / name).symlink_to(PACKS / name)
    registry = PackRegistry.load([packs], {"servicenow": {"instance": servicenow.url}})
    load_workflows(registry)
    assert not registry.errors, [str(e) for e in registry.errors]
    inventory = Inventory(
        {"web-1": ssh_server.entity(role="web"), "edge-1": ssh_server.entity(role="router")},
        {"ssh-ops": Credentials(username=USER, password="env:LOOPD_TEST_SSH_PASSWORD"),
         "servicenow": Credentials(username=servicenow.username,
                                     password="env:LOOPD_TEST_SN_PASSWORD")})
    store = SqliteStore(tmp_path / "loopd.db")
    await store.open()
    executor = Executor(registry, {"python": PythonRunner(), "ssh": SshRunner(),
                                   "http": HttpRunner()})
    runs = build_runs(store, executor, lambda: registry, inventory=inventory,
                      services={"store": store})
    kinds, workflows = runs.kinds, runs.workflows
    try:
        yield Loop(store, registry, kinds, workflows, executor)
    finally:
        await executor.close()
        await store.close()


def telemetry(topic: str, **data: Any) -> Event:
    return Event(id=uuid.uuid4().hex, source="mqtt", topic=topic, data=data)


# -- linux ---------------------------------------------------------------------------------

async def test_restart_and_verify_fixes_a_failed_service(
        loop: Loop, ssh_server: SshServer) -> None:
    """A failed service is restarted once and the run succeeds when telemetry says it is ok."""
    run, task = await loop.start("linux.restart_and_verify", "web-1", host="web-1",
                                 service="nginx")
    await loop.waiting()
    assert ssh_server.host.services["nginx"] == "active"
    loop.kinds.hub.offer(telemetry("telemetry/web-2/service/nginx", status="ok"))  # other host
    loop.kinds.hub.offer(telemetry("telemetry/web-1/service/nginx", status="ok"))
    done = await loop.finish(run, task)
    assert (done.status, done.outcome) == (states.SUCCEEDED, "fixed")
    assert done.tasks == ["restart", "verify", "fixed"]
    assert run.ctx["restart"]["exit_status"] == 0
    assert run.ctx["verify"]["event"]["topic"] == "telemetry/web-1/service/nginx"
    assert ssh_server.host.commands == ["sudo -n systemctl restart -- nginx"]


async def test_restart_and_verify_retries_a_failed_restart(
        loop: Loop, ssh_server: SshServer) -> None:
    """A restart that fails is retried, and the second attempt's success goes on to verify."""
    ssh_server.host.failing_restarts["nginx"] = 1
    run, task = await loop.start("linux.restart_and_verify", "web-1", host="web-1",
                                 service="nginx")
    await loop.waiting()
    loop.kinds.hub.offer(telemetry("telemetry/web-1/service/nginx", healthy=True))
    done = await loop.finish(run, task)
    assert done.status == states.SUCCEEDED
    assert [(s.task, s.attempt, s.status) for s in done.steps[:2]] == [
        ("restart", 1, states.FAILED), ("restart", 2, states.SUCCEEDED)]
    assert ssh_server.host.count("systemctl restart nginx") == 2


async def test_restart_and_verify_escalates_with_the_history(
        loop: Loop, ssh_server: SshServer) -> None:
    """A missing unit is not retried; the run fails with a reason that holds its history."""
    done = await loop.run("linux.restart_and_verify", "web-1", host="web-1", service="nosuch")
    assert done.status == states.FAILED
    assert done.tasks == ["restart", "escalate"]
    assert done.reason is not None
    assert done.reason.startswith("nosuch on web-1 is not fixed by loopd. What happened:\n")
    assert "restart: failed (linux.restart_service: ssh web-1: " \
           "`sudo -n systemctl restart -- nosuch` exited 5: " in done.reason
    assert ssh_server.host.count("systemctl restart nosuch") == 1


async def test_free_disk_and_verify_cleans_old_files(
        loop: Loop, ssh_server: SshServer) -> None:
    """Old files are deleted once and disk telemetry below the threshold confirms the fix."""
    run, task = await loop.start("linux.free_disk_and_verify", "web-1", host="web-1",
                                 path="/var/log/app", mount="/var", threshold=80)
    await loop.waiting()
    loop.kinds.hub.offer(telemetry("telemetry/web-1/disk", mount="/", used_percent=40))
    loop.kinds.hub.offer(telemetry("telemetry/web-1/disk", mount="/var", used_percent=45))
    done = await loop.finish(run, task)
    assert (done.status, done.outcome) == (states.SUCCEEDED, "fixed")
    assert run.ctx["deleted_files"] == 2
    assert sorted(ssh_server.host.files) == ["/var/log/app/app.log", "/var/log/app/app.log.1"]
    assert ssh_server.host.mounts["/var"].percent == 45
    assert ssh_server.host.commands == [
        "sudo -n find /var/log/app -xdev -type f -mtime +7 -name '*' -print -delete"]


# -- netdev --------------------------------------------------------------------------------

async def baseline(loop: Loop, device: str) -> Any:
    saved = await loop.store.kv_get("netdev.baseline", device)
    return saved["config"] if saved else None


async def test_drift_first_run_records_the_baseline(loop: Loop, ssh_server: SshServer) -> None:
    """With no baseline yet, the running config becomes the device's baseline."""
    original = ssh_server.host.config
    done = await loop.run("netdev.drift", "edge-1", device="edge-1")
    assert (done.status, done.outcome) == (states.SUCCEEDED, states.DONE)
    assert done.tasks == ["fetch", "compare", "first_baseline", "baseline_recorded"]
    assert await baseline(loop, "edge-1") == original
    assert ssh_server.host.commands == ["show running-config"]


async def test_drift_is_detected_ticketed_and_restored(
        loop: Loop, ssh_server: SshServer, servicenow: ServiceNow) -> None:
    """Drift opens an incident with the diff, the baseline is pushed back once and verified."""
    original = ssh_server.host.config
    assert (await loop.run("netdev.drift", "edge-1", device="edge-1")).status == states.SUCCEEDED
    ssh_server.host.config = original.replace("09:00:00", "11:42:00").replace(
        " description uplink\n", " description uplink\n shutdown\n")
    done = await loop.run("netdev.drift", "edge-1", device="edge-1", mode="restore")
    assert (done.status, done.outcome) == (states.SUCCEEDED, "fixed"), done.reason
    assert done.tasks == ["fetch", "compare", "ticket", "decide", "restore", "refetch",
                          "recompare", "restored"]
    assert ssh_server.host.config == original
    pushes = [c for c in ssh_server.host.commands if c.startswith("configure replace")]
    assert len(pushes) == 1
    (incident,) = servicenow.incidents
    assert incident["short_description"] == "Configuration drift on edge-1 (loopd will restore it)"
    assert "+ shutdown" in incident["description"]
    assert "09:00:00" not in incident["description"]  # the timestamp line is not configuration
    assert done.run.ctx["incident_number"] == incident["number"]


async def test_drift_of_a_timestamp_only_is_no_drift(loop: Loop, ssh_server: SshServer) -> None:
    """A config whose only change is its "Last configuration change" line is in sync."""
    assert (await loop.run("netdev.drift", "edge-1", device="edge-1")).status == states.SUCCEEDED
    ssh_server.host.config = ssh_server.host.config.replace("09:00:00", "12:00:00")
    done = await loop.run("netdev.drift", "edge-1", device="edge-1", mode="restore")
    assert (done.status, done.outcome) == (states.SUCCEEDED, states.DONE)
    assert done.tasks[-1] == "in_sync"
    assert not any(c.startswith("configure") for c in ssh_server.host.commands)


async def test_drift_in_record_mode_accepts_the_new_config(
        loop: Loop, ssh_server: SshServer, servicenow: ServiceNow) -> None:
    """In record mode (no ticket) the drifted config becomes the baseline and nothing is pushed."""
    assert (await loop.run("netdev.drift", "edge-1", device="edge-1")).status == states.SUCCEEDED
    ssh_server.host.config += "logging host 10.0.0.9\n"
    done = await loop.run("netdev.drift", "edge-1", device="edge-1", mode="record",
                          ticket=False)
    assert (done.status, done.outcome) == (states.SUCCEEDED, states.DONE)
    assert done.tasks[-1] == "recorded"
    assert "+logging host 10.0.0.9" in done.run.ctx["compare"]["diff"]
    assert await baseline(loop, "edge-1") == ssh_server.host.config
    assert servicenow.incidents == []
    assert not any(c.startswith("configure") for c in ssh_server.host.commands)
