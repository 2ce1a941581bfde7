"""Guards in a real daemon on loopback: approval, restart mode, resolved alerts, silences,
the circuit breaker and ``/v1/guards``, and a storm of 1,000 alerts.

Each test writes a loopd.yaml, its rules and the shipped ``core`` pack into
tmp_path and starts a ``Daemon`` on 127.0.0.1:0 (SQLite store in tmp_path); a
restart is a new Daemon on the same files. Runs that would block for long are
``core.sleep`` runs the test cancels through the API before it stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from loopd import metrics
from loopd.config import load_config
from loopd.daemon import Daemon
from loopd.units import parse_time
from tests.servers import wait_until
from tests.servers.http_targets import AlertmanagerApi

REPO = Path(__file__).resolve().parents[2]


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def notification(*alerts: dict[str, Any]) -> dict[str, Any]:
    """An Alertmanager webhook payload (version 4) carrying ``alerts``."""
    return {"version": "4", "groupKey": "{}:{}", "status": "firing", "receiver": "loopd",
            "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://alertmanager.example:9093", "alerts": list(alerts)}


def am_alert(host: str, *, fingerprint: str | None = None, status: str = "firing",
             alertname: str = "HostDown", starts: float | None = None,
             **labels: str) -> dict[str, Any]:
    starts = time.time() if starts is None else starts
    return {"status": status, "labels": {"alertname": alertname, "instance": host, **labels},
            "annotations": {}, "startsAt": rfc3339(starts),
            "endsAt": rfc3339(time.time()) if status == "resolved" else "0001-01-01T00:00:00Z",
            "generatorURL": "", "fingerprint": fingerprint or f"fp-{host}"}


def sample(name: str, **labels: str) -> float:
    return metrics.current().registry.get_sample_value(name, labels) or 0.0


@dataclass
class Api:
    daemon: Daemon
    http: aiohttp.ClientSession

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(path) as resp:
            return resp.status, await resp.json()

    async def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.post(path, data=orjson.dumps(body),
                                  headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json()

    async def alerts(self, *alerts: dict[str, Any]) -> None:
        status, body = await self.post("/v1/alertmanager", notification(*alerts))
        assert (status, body["accepted"]) == (200, len(alerts)), body

    async def runs(self, rule: str | None = None) -> list[dict[str, Any]]:
        status, body = await self.get("/v1/runs?limit=1000")
        assert status == 200
        # oldest first: the API answers newest first (two runs may share a millisecond)
        return [r for r in reversed(body["runs"]) if rule is None or r["rule"] == rule]

    async def run(self, run_id: str) -> dict[str, Any]:
        status, body = await self.get(f"/v1/runs/{run_id}")
        assert status == 200, body
        story: dict[str, Any] = body
        return story

    async def wait_status(self, run_id: str, *statuses: str) -> dict[str, Any]:
        """Wait until the run reaches one of ``statuses``; return its story."""
        story: dict[str, Any] = {}

        async def reached() -> bool:
            story.update(await self.run(run_id))
            return story["status"] in statuses

        await wait_until(reached, timeout=10, what=f"run {run_id} to be {statuses}")
        return story

    async def wait_runs(self, rule: str, count: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        async def enough() -> bool:
            found[:] = await self.runs(rule)
            return len(found) >= count

        await wait_until(enough, timeout=10, what=f"{count} run(s) of {rule}")
        return found

    async def settled(self) -> None:
        """Every accepted event decided and every run ended (outcome events decided too)."""
        await self.daemon.engine.drain(timeout=10)
        await self.daemon.dispatcher.drain(timeout=20)
        await self.daemon.engine.drain(timeout=10)

    async def metrics_text(self) -> str:
        async with self.http.get("/metrics") as resp:
            return await resp.text()


async def _until_ready(run: Awaitable[None], ready: asyncio.Event) -> asyncio.Task[None]:
    task = asyncio.ensure_future(run)
    waiter = asyncio.ensure_future(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=20,
                                 return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        if task.done():
            task.result()  # raises what stopped the daemon
        raise AssertionError("daemon did not become ready within 20s")
    return task


@dataclass
class Site:
    """A loopd installation in tmp_path: config, rules, core pack, inventory, store."""

    root: Path

    def write(self, rules: str, config: str = "", inventory: str | None = None) -> None:
        (self.root / "rules").mkdir(exist_ok=True)
        (self.root / "rules" / "rules.yaml").write_text(rules)
        if not (self.root / "packs" / "core").exists():
            shutil.copytree(REPO / "packs" / "core", self.root / "packs" / "core")
        inv = ""
        if inventory is not None:
            (self.root / "inventory.yaml").write_text(inventory)
            inv = "inventory: inventory.yaml\n"
        (self.root / "loopd.yaml").write_text(f"""\
listen: 127.0.0.1:0
sources:
  - {{name: webhook, type: webhook}}
  - {{name: alertmanager, type: alertmanager, max_payload: 4MiB}}
rules: [rules]
packs: [packs]
store: {{path: var/loopd.db}}
{inv}{config}""")

    @contextlib.asynccontextmanager
    async def daemon(self) -> AsyncIterator[Api]:
        daemon = Daemon(load_config(self.root / "loopd.yaml"))
        assert [str(e) for e in daemon.engine.ruleset.errors] == []
        ready = asyncio.Event()
        task = await _until_ready(daemon.run(on_ready=lambda _: ready.set()), ready)
        try:
            async with aiohttp.ClientSession(
                    base_url=f"http://127.0.0.1:{daemon.port}") as http:
                with metrics.using(daemon.metrics):  # sample() reads this daemon's registry
                    yield Api(daemon, http)
        finally:
            daemon.stop()
            await asyncio.wait_for(task, 20)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


# -- approval ----------------------------------------------------------------------------

APPROVAL = """\
rules:
  - name: approve-me
    on: {source: alertmanager, match: {labels.alertname: HostDown}}
    key: "{{ event.labels.instance }}"
    mode: approval
    approval: {within: 1h}
    run: {action: core.noop, input: {host: "{{ key }}"}}
"""


async def test_an_approval_rule_waits_until_the_run_is_approved(site: Site) -> None:
    """A run of an approval rule stays ``awaiting_approval`` until POST .../approve starts it."""
    site.write(APPROVAL)
    async with site.daemon() as api:
        await api.alerts(am_alert("web-1"))
        (run,) = await api.runs("approve-me")
        assert run["status"] == "awaiting_approval"
        status, body = await api.post(f"/v1/runs/{run['id']}/approve?reason=go")
        assert (status, body) == (202, {"id": run["id"], "approved": True})
        story = await api.wait_status(run["id"], "succeeded")
        assert story["steps"][0]["output"] == {"host": "web-1"}
        assert story["context"]["approved"]["reason"] == "go"
        status, body = await api.post(f"/v1/runs/{run['id']}/approve")
        assert (status, body["error"]) == (409, f"run {run['id']} is not awaiting approval")


async def test_a_rejected_run_ends_rejected_and_an_unanswered_one_expires(site: Site) -> None:
    """Reject ends the run ``rejected`` with the reason; no answer within ``approval.within``
    ends it ``expired``; neither acts."""
    site.write(APPROVAL.replace("within: 1h", "within: 300ms"))
    async with site.daemon() as api:
        await api.alerts(am_alert("web-1"))
        (run,) = await api.runs("approve-me")
        story = await api.wait_status(run["id"], "expired")
        assert story["reason"] == "approval expired before anyone decided"
        assert story["steps"] == [] and story["outcome"] == "cancelled"
    site.write(APPROVAL)
    async with site.daemon() as api:
        await api.alerts(am_alert("web-2"))
        run = (await api.runs("approve-me"))[-1]
        assert (run["key"], run["status"]) == ("web-2", "awaiting_approval")
        status, _ = await api.post(f"/v1/runs/{run['id']}/reject?reason=not%20now")
        assert status == 202
        story = await api.wait_status(run["id"], "rejected")
        assert (story["reason"], story["steps"]) == ("rejected: not now", [])


async def test_a_run_awaiting_approval_survives_a_restart(site: Site) -> None:
    """After a restart the run still awaits approval, and approving it then starts it."""
    site.write(APPROVAL)
    async with site.daemon() as api:
        await api.alerts(am_alert("web-1"))
        (run,) = await api.runs("approve-me")
    async with site.daemon() as api:
        assert (await api.run(run["id"]))["status"] == "awaiting_approval"

        async def approved() -> bool:  # the resumed gate opens once the dispatcher resumed
            status, _ = await api.post(f"/v1/runs/{run['id']}/approve")
            return status == 202

        await wait_until(approved, timeout=10, what="the resumed run to take the approval")
        await api.wait_status(run["id"], "succeeded")


async def test_cancelling_a_run_awaiting_approval_keeps_the_active_gauge_right(
    site: Site,
) -> None:
    """A run cancelled through the API before it was approved never counted as active."""
    site.write(APPROVAL)
    async with site.daemon() as api:
        active = sample("loopd_runs_active")
        await api.alerts(am_alert("web-1"))
        (run,) = await api.runs("approve-me")
        status, _ = await api.post(f"/v1/runs/{run['id']}/cancel")
        assert status == 202
        story = await api.wait_status(run["id"], "cancelled")
        assert story["reason"] == "cancelled through the API"
        assert sample("loopd_runs_active") == active


# -- run mode restart ---------------------------------------------------------------------

RESTART = """\
rules:
  - name: restart-mode
    on: {source: webhook, topic: hung}
    run_mode: restart
    run: {action: core.sleep, input: {seconds: 30}}
  - name: restart-gated
    on: {source: webhook, topic: gated}
    run_mode: restart
    mode: approval
    run: {action: core.noop}
"""


async def test_restart_mode_cancels_the_run_in_progress_and_starts_a_new_one(
    site: Site,
) -> None:
    """A new event for a ``restart`` rule cancels the incident's run, acting or not yet
    approved, with the event named in the reason, and starts a new run."""
    site.write(RESTART)
    async with site.daemon() as api:
        await api.post("/v1/events", {"id": "e1", "topic": "hung", "key": "web-1", "data": {}})
        (first,) = await api.runs("restart-mode")
        await api.wait_status(first["id"], "running")
        await api.post("/v1/events", {"id": "e2", "topic": "hung", "key": "web-1", "data": {}})
        story = await api.wait_status(first["id"], "cancelled")
        assert story["reason"] == "restarted by event e2"
        second = (await api.wait_runs("restart-mode", 2))[1]
        await api.wait_status(second["id"], "running")
        assert [e["outcome"] for e in (await api.run(second["id"]))["decisions"]] == [
            "run_created", "restarted"]

        await api.post("/v1/events", {"id": "g1", "topic": "gated", "key": "db-1", "data": {}})
        await api.post("/v1/events", {"id": "g2", "topic": "gated", "key": "db-1", "data": {}})
        gated = await api.wait_runs("restart-gated", 2)
        story = await api.wait_status(gated[0]["id"], "cancelled")
        assert story["reason"] == "restarted by event g2"
        assert (await api.run(gated[1]["id"]))["status"] == "awaiting_approval"

        for run in (second, gated[1]):
            assert (await api.post(f"/v1/runs/{run['id']}/cancel"))[0] == 202
        await api.settled()


async def test_restart_mode_cancels_a_run_not_yet_dispatched(site: Site) -> None:
    """Two events for one key in one burst: the first run is cancelled before it acts."""
    site.write(RESTART)
    async with site.daemon() as api:
        status, _ = await api.post("/v1/events", [
            {"id": "b1", "topic": "gated", "key": "db-2", "data": {}},
            {"id": "b2", "topic": "gated", "key": "db-2", "data": {}}])
        assert status == 200
        first, second = await api.wait_runs("restart-gated", 2)
        story = await api.wait_status(first["id"], "cancelled")
        assert (story["reason"], story["steps"]) == ("restarted by event b2", [])
        assert (await api.run(second["id"]))["status"] == "awaiting_approval"
        assert (await api.post(f"/v1/runs/{second['id']}/cancel"))[0] == 202
        await api.settled()


# -- resolved alerts ---------------------------------------------------------------------

async def test_a_resolved_alert_cancels_the_run_that_has_not_acted_yet(site: Site) -> None:
    """A run awaiting approval is cancelled when its alert (same fingerprint) resolves,
    with a reason naming the resolution; its incident closes."""
    site.write(APPROVAL)
    async with site.daemon() as api:
        fired = time.time() - 60
        await api.alerts(am_alert("web-1", fingerprint="fp-one", starts=fired),
                         am_alert("web-2", fingerprint="fp-two", starts=fired))
        one, two = await api.runs("approve-me")
        await api.alerts(am_alert("web-1", fingerprint="fp-one", starts=fired,
                                  status="resolved"))
        story = await api.wait_status(one["id"], "cancelled")
        assert story["reason"] == (f"alert resolved (fp-one:{rfc3339(fired)}:resolved) "
                                   "before the run acted")
        assert story["steps"] == []
        assert (await api.run(two["id"]))["status"] == "awaiting_approval"  # not its alert

        async def closed() -> bool:
            _, incidents = await api.get("/v1/incidents?status=closed")
            return [i["key"] for i in incidents["incidents"]] == ["web-1"]

        await wait_until(closed, timeout=10, what="web-1's incident to close")
        assert (await api.post(f"/v1/runs/{two['id']}/cancel"))[0] == 202


async def test_an_alert_resolved_in_the_same_burst_never_acts(site: Site) -> None:
    """An alert that fires and resolves in one burst (a backlog replayed after downtime)
    starts a run that is cancelled before it acts, even though it was not dispatched yet."""
    site.write("""\
rules:
  - name: burst
    on: {source: alertmanager, match: {labels.alertname: HostDown}}
    key: "{{ event.labels.instance }}"
    run: {action: core.noop}
""")
    async with site.daemon() as api:
        fired = time.time() - 60
        await api.alerts(am_alert("web-1", starts=fired),
                         am_alert("web-1", starts=fired, status="resolved"))
        await api.settled()
        (run,) = await api.runs("burst")
        story = await api.run(run["id"])
        assert (story["status"], story["steps"]) == ("cancelled", [])
        assert story["reason"] == (f"alert resolved (fp-web-1:{rfc3339(fired)}:resolved) "
                                   "before the run acted")
        _, incidents = await api.get("/v1/incidents?status=open")
        assert incidents["incidents"] == []


async def test_a_resolved_alert_does_not_cancel_a_run_that_already_acts(site: Site) -> None:
    """Once a run has started acting, its alert resolving does not cancel it."""
    site.write("""\
rules:
  - name: acting
    on: {source: alertmanager, match: {labels.alertname: HostDown}}
    key: "{{ event.labels.instance }}"
    run: {action: core.sleep, input: {seconds: 30}}
""")
    async with site.daemon() as api:
        fired = time.time() - 60
        await api.alerts(am_alert("web-1", starts=fired))
        (run,) = await api.runs("acting")
        await api.wait_status(run["id"], "running")
        await api.alerts(am_alert("web-1", starts=fired, status="resolved"))
        await api.daemon.engine.drain(timeout=10)
        story = await api.run(run["id"])
        assert story["status"] == "running"
        assert [e["outcome"] for e in story["decisions"]] == ["run_created", "joined"]
        assert (await api.post(f"/v1/runs/{run['id']}/cancel"))[0] == 202
        story = await api.wait_status(run["id"], "cancelled")
        assert story["reason"] == "cancelled through the API"


# -- silences ----------------------------------------------------------------------------

async def test_a_silence_created_in_alertmanager_suppresses_matching_alerts(
    site: Site, alertmanager_api: AlertmanagerApi,
) -> None:
    """The daemon refreshes Alertmanager's silences; a silenced alert is suppressed with
    guard ``silence`` while an alert the silence does not match still runs."""
    site.write("""\
rules:
  - name: silenceable
    on: {source: alertmanager, match: {labels.alertname: HostDown}}
    key: "{{ event.labels.instance }}"
    run: {action: core.noop}
""", config=f"alertmanager: {{url: '{alertmanager_api.url}', refresh: 50ms}}\n")
    async with site.daemon() as api:
        now = time.time()
        async with api.http.post(f"{alertmanager_api.url}/api/v2/silences", json={
            "matchers": [{"name": "instance", "value": "web-[12]", "isRegex": True,
                          "isEqual": True}],
            "startsAt": rfc3339(now - 60), "endsAt": rfc3339(now + 3600),
            "createdBy": "ops", "comment": "rack move"}) as resp:
            assert resp.status == 200

        async def fetched() -> bool:
            _, guards = await api.get("/v1/guards")
            return bool(guards["silences"]["active"])

        await wait_until(fetched, timeout=10, what="the daemon to fetch the silence")
        before = sample("loopd_guard_suppressions_total", rule="silenceable", guard="silence")
        await api.alerts(am_alert("web-1"), am_alert("web-2"), am_alert("web-3"))
        await api.settled()
        assert [r["key"] for r in await api.runs("silenceable")] == ["web-3"]
        assert sample("loopd_guard_suppressions_total", rule="silenceable",
                      guard="silence") - before == 2
        _, guards = await api.get("/v1/guards")
        assert guards["silences"]["error"] is None


# -- circuit breaker and GET /v1/guards ------------------------------------------------------

BREAKER = """\
rules:
  - name: broken-fix
    on: {source: alertmanager, match: {labels.alertname: HostDown}}
    key: "{{ event.labels.instance }}"
    guards:
      breaker: {failures: 2, within: 1h, cool_off: 1h}
      escalate:
        action: core.log
        input: {message: "{{ rule }} needs a human: {{ reason }}", level: error}
    run: {action: core.fail, input: {reason: "still down"}}
"""


async def test_the_breaker_opens_escalates_once_survives_a_restart_and_closes_by_api(
    site: Site,
) -> None:
    """Two failed runs open the breaker (loopd_circuit_open=1, one escalation run); later
    alerts are suppressed, also after a restart, until POST .../close closes it."""
    site.write(BREAKER)
    async with site.daemon() as api:
        await api.alerts(am_alert("web-1"))
        await api.settled()
        await api.alerts(am_alert("web-2"))
        await api.settled()
        runs = await api.runs("broken-fix")
        assert [(r.get("action"), r["status"]) for r in runs] == [
            ("core.fail", "failed"), ("core.fail", "failed"), ("core.log", "succeeded")]
        escalation = await api.run(runs[2]["id"])
        why = "2 runs not fixed within 3600s (last on web-2: failed)"
        assert escalation["input"]["message"] == f"broken-fix needs a human: {why}"
        assert (escalation["reason"], escalation["incident"]) == (f"escalation: {why}", None)
        assert 'loopd_circuit_open{rule="broken-fix"} 1.0' in await api.metrics_text()
        _, guards = await api.get("/v1/guards")
        (breaker,) = guards["breakers"]
        assert (breaker["scope"], breaker["state"]) == ("broken-fix", "open")
        assert parse_time(breaker["closes"]) == pytest.approx(parse_time(breaker["opened"]) + 3600)

        before = sample("loopd_guard_suppressions_total", rule="broken-fix", guard="breaker")
        await api.alerts(am_alert("web-3"))
        await api.settled()
        assert len(await api.runs("broken-fix")) == 3
        assert sample("loopd_guard_suppressions_total", rule="broken-fix",
                      guard="breaker") - before == 1

    async with site.daemon() as api:  # restart: still open, no second escalation
        await api.alerts(am_alert("web-4"))
        await api.settled()
        assert len(await api.runs("broken-fix")) == 3
        _, guards = await api.get("/v1/guards")
        assert [b["scope"] for b in guards["breakers"]] == ["broken-fix"]

        status, body = await api.post("/v1/guards/breakers/broken-fix/close")
        assert (status, body) == (200, {"scope": "broken-fix", "state": "closed"})
        assert 'loopd_circuit_open{rule="broken-fix"} 0.0' in await api.metrics_text()
        assert (await api.get("/v1/guards"))[1]["breakers"] == []
        status, body = await api.post("/v1/guards/breakers/broken-fix/close")
        assert status == 404 and "no open circuit breaker 'broken-fix'" in body["error"]
        await api.alerts(am_alert("web-5"))
        await api.settled()
        assert [r["key"] for r in await api.runs("broken-fix")][-1] == "web-5"

    async with site.daemon() as api:  # closing was saved too
        assert (await api.get("/v1/guards"))[1]["breakers"] == []


async def test_a_per_key_breaker_is_closed_by_its_rule_and_key(site: Site) -> None:
    """A ``per: key`` breaker has the scope ``rule|key``; closing it lets that key run again."""
    site.write(BREAKER.replace("cool_off: 1h}", "cool_off: 1h, per: key}"))
    async with site.daemon() as api:
        for i in range(2):
            await api.alerts(am_alert("web-1", fingerprint=f"fp-{i}"))
            await api.settled()
        await api.alerts(am_alert("web-1", fingerprint="fp-2"), am_alert("web-2"))
        await api.settled()
        assert [r["key"] for r in await api.runs("broken-fix")] == [
            "web-1", "web-1", "web-1", "web-2"]  # the third web-1 run is the escalation
        _, guards = await api.get("/v1/guards")
        assert [b["scope"] for b in guards["breakers"]] == ["broken-fix|web-1"]
        status, _ = await api.post("/v1/guards/breakers/broken-fix%7Cweb-1/close")
        assert status == 200
        await api.alerts(am_alert("web-1", fingerprint="fp-3"))
        await api.settled()
        assert len(await api.runs("broken-fix")) == 5


async def test_guards_endpoint_shows_budgets_left_and_active_windows(site: Site) -> None:
    """GET /v1/guards lists each budget's remaining runs, the fleet budget, the active
    maintenance windows and the entities under remediation; /metrics has the budgets."""
    site.write("""\
rules:
  - name: budgeted
    on: {source: alertmanager, match: {labels.alertname: HostDown}}
    key: "{{ event.labels.instance }}"
    guards:
      max_runs: {count: 3, per: 1h}
      maintenance: [{name: never, start: 2000-01-01T00:00:00Z, end: 2000-01-02T00:00:00Z}]
    run: {action: core.sleep, input: {seconds: 30}}
  - name: frozen
    on: {source: webhook}
    guards:
      maintenance: [{name: always, start: 2000-01-01T00:00:00Z, end: 2100-01-01T00:00:00Z}]
    run: {action: core.noop}
""", config="""\
guards:
  max_runs: {count: 10, per: 1h}
  maintenance:
    - {name: freeze, start: 2000-01-01T00:00:00Z, end: 2100-01-01T00:00:00Z, rules: [other]}
    - {name: past, start: 2000-01-01T00:00:00Z, end: 2000-01-02T00:00:00Z}
""", inventory="entities:\n  web-1: {group: web}\n  web-2: {group: web}\n")
    async with site.daemon() as api:
        await api.alerts(am_alert("web-1"), am_alert("web-2"))
        status, guards = await api.get("/v1/guards")
        assert status == 200
        assert guards["budgets"] == [
            {"rule": "budgeted", "remaining": 1, "count": 3, "per_s": 3600.0},
            {"rule": "*", "remaining": 8, "count": 10, "per_s": 3600.0}]
        assert guards["windows_active"] == ["freeze", "frozen:always"]
        assert guards["under_remediation"] == {"web": ["web-1", "web-2"]}
        assert guards["breakers"] == [] and guards["silences"] is None
        assert 'loopd_budget_remaining{rule="budgeted"} 1.0' in await api.metrics_text()
        for run in await api.runs("budgeted"):
            await api.wait_status(run["id"], "running")
            assert (await api.post(f"/v1/runs/{run['id']}/cancel"))[0] == 202
        await api.settled()
        assert (await api.get("/v1/guards"))[1]["under_remediation"] == {}


# -- the storm ---------------------------------------------------------------------------

STORM = """\
rules:
  - name: storm
    on: {source: alertmanager, match: {status: firing, labels.alertname: HostDown}}
    key: "{{ event.labels.instance }}"
    throttle: {max: 2, per: 1h}
    run_mode: queued
    max_queued: 1
    guards:
      max_runs: {count: 90, per: 1h}
      max_runs_per_key: {count: 5, per: 1h}
    run: {action: core.sleep, input: {seconds: 0.02}}
"""


async def test_a_storm_of_1000_alerts_for_50_hosts_stays_within_the_limits(
    site: Site,
) -> None:
    """1,000 alerts for 50 hosts in one burst start at most the fleet budget of runs, at most
    two per host, and never two runs for one host at the same time."""
    site.write(STORM, config="guards:\n  max_runs: {count: 80, per: 1h}\n")
    hosts = [f"node-{i:02d}" for i in range(50)]
    now = time.time()
    alerts = [am_alert(hosts[i % 50], fingerprint=f"fp-{i}", starts=now - 1000 + i)
              for i in range(1000)]
    async with site.daemon() as api:
        before = sample("loopd_guard_suppressions_total", rule="storm", guard="budget")
        posts = [api.alerts(*alerts[i:i + 100]) for i in range(0, 1000, 100)]
        await asyncio.gather(*posts)  # ten notifications at once
        await api.settled()
        assert await api.daemon.store.count_decisions(rule="storm") == 1000
        runs = await api.runs("storm")
        suppressed = sample("loopd_guard_suppressions_total", rule="storm",
                            guard="budget") - before

    assert len(runs) == 80  # the fleet budget binds before the rule's 90
    assert all(r["status"] == "succeeded" for r in runs)
    assert suppressed > 0
    per_host: dict[str, list[tuple[str, str]]] = {}  # RFC 3339 times sort as times
    for r in runs:
        per_host.setdefault(r["key"], []).append((r["started"], r["finished"]))
    assert max(len(v) for v in per_host.values()) == 2  # the throttle: two per host
    for host, spans in per_host.items():
        spans.sort()
        for (_, finished), (started, _) in itertools.pairwise(spans):
            assert started >= finished, f"{host} had two runs at once"
    # the limits did not serialise the fleet: different hosts ran side by side
    spans = sorted(s for v in per_host.values() for s in v)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))


QUEUED = """\
rules:
  - name: queued-mode
    on: {source: webhook, topic: busy}
    run_mode: queued
    run: {action: core.sleep, input: {seconds: 30}}
"""


async def test_a_queued_run_is_listed_and_cancelled_through_the_api(site: Site) -> None:
    """A run waiting in a ``queued`` incident shows under ``?status=queued`` and
    ``POST /v1/runs/{id}/cancel`` takes it out of the queue as cancelled."""
    site.write(QUEUED)
    async with site.daemon() as api:
        await api.post("/v1/events", {"id": "q1", "topic": "busy", "key": "web-1", "data": {}})
        (first,) = await api.wait_runs("queued-mode", 1)
        await api.wait_status(first["id"], "running")
        await api.post("/v1/events", {"id": "q2", "topic": "busy", "key": "web-1", "data": {}})
        status, body = await api.get("/v1/runs?status=queued")
        assert status == 200
        (queued,) = body["runs"]
        status, body = await api.post(f"/v1/runs/{queued['id']}/cancel")
        assert (status, body["status"]) == (200, "cancelled")
        story = await api.run(queued["id"])
        assert (story["status"], story["outcome"]) == ("cancelled", "cancelled")
        status, _ = await api.post(f"/v1/runs/{first['id']}/cancel")
        assert status == 202
        await api.wait_status(first["id"], "cancelled")
