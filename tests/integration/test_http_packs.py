"""The shipped HTTP packs (servicenow, prometheus, notify, http) against fake APIs on loopback,
through the Executor and, for workflows and confirm tasks, a real WorkflowRunner."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from loopd.catalog.credentials import Credentials
from loopd.catalog.inventory import Inventory
from loopd.packs.executor import ActionContext, ActionResult, Executor
from loopd.packs.http import HttpRunner, compile_http
from loopd.packs.manifest import HttpAction
from loopd.packs.python import PythonRunner
from loopd.packs.registry import PackRegistry
from loopd.runs import states
from loopd.runs.evidence import PromQL
from loopd.store.base import RunRecord
from loopd.store.sqlite import SqliteStore
from loopd.wiring import build_runs
from loopd.workflow.loader import load_workflows
from tests.servers.http_targets import (
    AlertmanagerApi,
    HttpEcho,
    PrometheusApi,
    ServiceNow,
    SlackWebhook,
)

PACKS = Path(__file__).resolve().parents[2] / "packs"
MINE = ("http", "servicenow", "prometheus", "notify")

REMEDIATE = """
input: [host]
tasks:
  restart:
    action: core.fail
    input: {reason: "nginx did not start on {{ ctx.host }}"}
    next: [{when: failed, do: escalate}]
  escalate:
    workflow: servicenow.escalate
    input:
      short_description: "nginx on {{ ctx.host }} not fixed by loopd"
      cmdb_ci: "{{ ctx.host }}"
      notes: "{{ history }}"
    publish: {ticket: "{{ result.incident_number }}"}
"""

VERIFY = """
input: [host]
tasks:
  verify:
    confirm:
      query: 'up{instance="{{ ctx.host }}"} == 1'
      within: %s
      interval: 50ms
"""


class Loop:
    """Packs (the shipped HTTP packs, core, and a test pack ``t``), runners and a store."""

    def __init__(self, tmp_path: Path, registry: PackRegistry, inventory: Inventory) -> None:
        self.tmp_path, self.registry, self.inventory = tmp_path, registry, inventory
        self.http = HttpRunner(backoff=0.001)
        self.executor = Executor(registry, {"python": PythonRunner(), "http": self.http})

    async def action(self, name: str, input: dict[str, Any]) -> ActionResult:
        return await self.executor.execute(name, input, ActionContext("run-1", "t", self.inventory))

    async def workflow(self, target: str, input: dict[str, Any], *,
                       prometheus: PromQL | None = None) -> RunRecord:
        """Run a workflow to its end the way the dispatcher does; return its record."""
        store = SqliteStore(self.tmp_path / "loopd.db")
        await store.open()
        try:
            runner = build_runs(store, self.executor, lambda: self.registry,
                                inventory=self.inventory, prometheus=prometheus).workflows
            run = RunRecord(f"run-{target}", None, "nginx-down", "web-1", "workflow", target,
                            input, states.PENDING, time.time())
            status, reason = await runner.execute(run, resumed=False)
            run.status, run.reason, run.finished = status, reason, time.time()
            run.outcome = runner.outcome(run, status)
            await store.save_run(run)
            return run
        finally:
            await store.close()


@pytest_asyncio.fixture
async def loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, servicenow: ServiceNow,
               prometheus_api: PrometheusApi, alertmanager_api: AlertmanagerApi,
               slack_webhook: SlackWebhook) -> AsyncIterator[Loop]:
    root = tmp_path / "packs"
    root.mkdir()
    for name in ("core", *MINE):  # only these: other packs may be half-written right now
        (root / name).symlink_to(PACKS / name)
    test_pack = root / "t"
    (test_pack / "workflows").mkdir(parents=True)
    (test_pack / "pack.yaml").write_text("name: t\n")
    (test_pack / "workflows" / "remediate.yaml").write_text(REMEDIATE)
    (test_pack / "workflows" / "verify.yaml").write_text(VERIFY % "10s")
    (test_pack / "workflows" / "verify_briefly.yaml").write_text(VERIFY % "300ms")
    registry = PackRegistry.load([root], {
        "servicenow": {"instance": servicenow.url},
        "prometheus": {"url": prometheus_api.url, "alertmanager_url": alertmanager_api.url},
        "notify": {"webhook_url": slack_webhook.webhook_url},
    })
    load_workflows(registry)
    assert not registry.errors, registry.errors
    monkeypatch.setenv("SN_PASSWORD", servicenow.password)
    inventory = Inventory(credentials={
        "servicenow": Credentials(username=servicenow.username, password="env:SN_PASSWORD"),
    })
    harness = Loop(tmp_path, registry, inventory)
    yield harness
    await harness.http.close()


def test_shipped_packs_load_without_errors() -> None:
    """The packs folder loads the http, servicenow, prometheus and notify packs cleanly,
    and every template of their http actions compiles."""
    registry = PackRegistry.load([PACKS])
    load_workflows(registry)
    mine = [e for e in registry.errors if any(f"packs/{p}/" in str(e) for p in MINE)]
    assert mine == []
    for action in registry.actions.values():
        if action.pack.name in MINE and isinstance(action.spec, HttpAction):
            compile_http(action.spec)
    assert {"http.request", "servicenow.create_incident", "servicenow.update_incident",
            "servicenow.add_work_note", "servicenow.update_cmdb_ci", "prometheus.query",
            "prometheus.create_silence", "prometheus.list_silences",
            "prometheus.expire_silence", "prometheus.list_alerts",
            "notify.slack"} <= set(registry.actions)
    assert "servicenow.escalate" in registry.workflows


# -- servicenow ------------------------------------------------------------------------


async def test_create_incident_posts_to_the_table_api(loop: Loop, servicenow: ServiceNow
                                                      ) -> None:
    """create_incident POSTs the fields given (no others) and returns the result envelope."""
    result = await loop.action("servicenow.create_incident", {
        "short_description": "disk full on web-1", "urgency": "2", "impact": 3,
        "cmdb_ci": "web-1", "work_notes": "loopd tried cleanup"})
    assert result.ok, result.error
    record = result.output["json"]["result"]
    assert result.output["status"] == 201 and record["number"] == "INC0010001"
    assert servicenow.incidents == [record] and record["cmdb_ci"] == "web-1"
    assert servicenow.notes(record["sys_id"]) == ["loopd tried cleanup"]
    seen = servicenow.requests[0]
    assert (seen.method, seen.path) == ("POST", "/api/now/table/incident")
    assert seen.json == {"short_description": "disk full on web-1", "urgency": "2",
                         "impact": 3, "cmdb_ci": "web-1", "work_notes": "loopd tried cleanup"}
    assert seen.headers["Accept"] == "application/json"
    assert seen.query == {"sysparm_exclude_reference_link": ["true"]}


async def test_update_incident_and_work_note_patch_the_record(loop: Loop,
                                                              servicenow: ServiceNow) -> None:
    """update_incident resolves with close code and notes; add_work_note appends a note."""
    created = await loop.action("servicenow.create_incident", {"short_description": "x"})
    sys_id = created.output["json"]["result"]["sys_id"]
    note = await loop.action("servicenow.add_work_note",
                             {"sys_id": sys_id, "work_notes": "restart attempted"})
    resolved = await loop.action("servicenow.update_incident", {
        "sys_id": sys_id, "state": "6", "close_code": "Solved (Permanently)",
        "close_notes": "fixed by loopd", "work_notes": "confirmed by telemetry"})
    assert note.ok and resolved.ok, (note.error, resolved.error)
    record = servicenow.tables["incident"][sys_id]
    assert (record["state"], record["close_code"], record["close_notes"]) == (
        "6", "Solved (Permanently)", "fixed by loopd")
    assert servicenow.notes(sys_id) == ["restart attempted", "confirmed by telemetry"]
    assert servicenow.requests[-1].method == "PATCH"
    assert servicenow.requests[-1].path == f"/api/now/table/incident/{sys_id}"


async def test_update_cmdb_ci_patches_the_ci_class_table(loop: Loop, servicenow: ServiceNow
                                                         ) -> None:
    """update_cmdb_ci PATCHes /api/now/table/{class}/{sys_id} with the fields given."""
    ci = servicenow.add("cmdb_ci_linux_server", {"name": "web-1"})
    result = await loop.action("servicenow.update_cmdb_ci", {
        "sys_id": ci, "class": "cmdb_ci_linux_server",
        "fields": {"operational_status": "1", "u_last_remediation": "restart nginx"}})
    assert result.ok, result.error
    record = servicenow.tables["cmdb_ci_linux_server"][ci]
    assert record["operational_status"] == "1"
    assert record["u_last_remediation"] == "restart nginx"
    missing = await loop.action("servicenow.update_cmdb_ci", {"sys_id": ci, "fields": {}})
    assert not missing.ok and missing.error is not None
    assert f"PATCH {servicenow.url}/api/now/table/cmdb_ci/{ci}: unexpected status 404" \
        in missing.error


async def test_servicenow_outage_is_retried_and_a_bad_password_is_not(
        loop: Loop, servicenow: ServiceNow, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 503 is retried into a single incident; a 401 fails at once without the password."""
    servicenow.fail_next(1, 503, "Service Unavailable")
    ok = await loop.action("servicenow.create_incident", {"short_description": "x"})
    assert ok.ok and ok.output["attempts"] == 2 and len(servicenow.incidents) == 1
    monkeypatch.setenv("SN_PASSWORD", "wrong-password-123")
    denied = await loop.action("servicenow.create_incident", {"short_description": "y"})
    assert not denied.ok and denied.error is not None
    assert "unexpected status 401 Unauthorized: " in denied.error
    assert "User Not Authenticated" in denied.error and "wrong-password-123" not in denied.error
    assert len(servicenow.requests) == 3


async def test_escalate_workflow_records_the_incident(loop: Loop, servicenow: ServiceNow
                                                      ) -> None:
    """servicenow.escalate opens an incident with the notes and publishes sys_id and number."""
    run = await loop.workflow("servicenow.escalate", {
        "short_description": "nginx on web-1 not fixed", "notes": "restart: failed"})
    assert (run.status, run.reason, run.outcome) == (states.SUCCEEDED, None, states.DONE)
    (incident,) = servicenow.incidents
    assert run.ctx["incident_sys_id"] == incident["sys_id"]
    assert run.ctx["incident_number"] == incident["number"]
    assert (incident["short_description"], incident["urgency"]) == (
        "nginx on web-1 not fixed", "2")
    (note,) = servicenow.notes(incident["sys_id"])
    assert note.startswith("loopd escalated web-1 (run run-servicenow.escalate, rule nginx-down)")
    assert "restart: failed" in note


async def test_escalation_carries_the_calling_runs_history(loop: Loop, servicenow: ServiceNow
                                                           ) -> None:
    """A failed remediation escalates through the sub-workflow with its history as a note."""
    run = await loop.workflow("t.remediate", {"host": "web-1"})
    assert run.status == states.SUCCEEDED, run.reason
    (incident,) = servicenow.incidents
    assert run.ctx["ticket"] == incident["number"]
    assert incident["cmdb_ci"] == "web-1"
    (note,) = servicenow.notes(incident["sys_id"])
    assert "restart: failed (core.fail: nginx did not start on web-1) -> escalate" in note


# -- prometheus and alertmanager -------------------------------------------------------


async def test_prometheus_query_returns_the_series(loop: Loop, prometheus_api: PrometheusApi
                                                   ) -> None:
    """prometheus.query GETs /api/v1/query and returns Prometheus' data in the result."""
    prometheus_api.set_vector("up == 0", ({"instance": "web-1", "job": "node"}, 0))
    result = await loop.action("prometheus.query", {"query": "up == 0"})
    assert result.ok, result.error
    data = result.output["json"]["data"]
    assert data["resultType"] == "vector"
    assert data["result"][0]["metric"] == {"instance": "web-1", "job": "node"}
    assert prometheus_api.requests[0].query == {"query": ["up == 0"]}


async def test_silences_are_created_listed_and_expired(loop: Loop,
                                                       alertmanager_api: AlertmanagerApi
                                                       ) -> None:
    """A silence is created for a duration, silences its alert, is listed, then expired."""
    alertmanager_api.fire(alertname="NginxDown", instance="web-1")
    created = await loop.action("prometheus.create_silence", {
        "matchers": {"alertname": "NginxDown", "instance": "web-1"}, "duration": "30m",
        "comment": "loopd is restarting nginx"})
    assert created.ok, created.error
    sid = created.output["silenceID"]
    silence = alertmanager_api.silences[sid]
    assert silence["matchers"][0] == {"name": "alertname", "value": "NginxDown",
                                      "isRegex": False, "isEqual": True}
    assert (silence["createdBy"], silence["comment"]) == ("loopd", "loopd is restarting nginx")
    alerts = await loop.action("prometheus.list_alerts", {"filter": ['instance="web-1"']})
    assert alerts.output["json"][0]["status"]["silencedBy"] == [sid]
    listed = await loop.action("prometheus.list_silences",
                               {"filter": ['alertname="NginxDown"']})
    assert [(s["id"], s["status"]["state"]) for s in listed.output["json"]] == [(sid, "active")]
    expired = await loop.action("prometheus.expire_silence", {"silence_id": sid})
    assert expired.ok, expired.error
    assert alertmanager_api.state(silence) == "expired"
    assert alertmanager_api.requests[-1].path == f"/api/v2/silence/{sid}"
    again = await loop.action("prometheus.expire_silence", {"silence_id": sid})
    assert not again.ok and again.error is not None and "already expired" in again.error


async def test_silence_window_follows_the_duration(loop: Loop,
                                                   alertmanager_api: AlertmanagerApi) -> None:
    """startsAt/endsAt are RFC 3339 and `duration` apart; a list of matchers is sent as is."""
    created = await loop.action("prometheus.create_silence", {
        "matchers": [{"name": "instance", "value": "web-.*", "isRegex": True}],
        "starts_at": "2030-01-01T00:00:00Z", "duration": "2h"})
    assert created.ok, created.error
    assert (created.output["startsAt"], created.output["endsAt"]) == (
        "2030-01-01T00:00:00.000Z", "2030-01-01T02:00:00.000Z")
    sent = alertmanager_api.requests[0].json
    assert sent["matchers"] == [{"name": "instance", "value": "web-.*", "isRegex": True,
                                 "isEqual": True}]


# -- notify and http ---------------------------------------------------------------------


async def test_slack_message_reaches_the_webhook(loop: Loop, slack_webhook: SlackWebhook
                                                 ) -> None:
    """notify.slack posts {text, blocks} to the configured webhook and hides its URL."""
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*fixed* web-1"}}]
    result = await loop.action("notify.slack", {"text": "fixed web-1", "blocks": blocks})
    assert result.ok, result.error
    assert slack_webhook.messages == [{"text": "fixed web-1", "blocks": blocks}]
    assert result.output["text"] == "ok"
    assert result.output["url"] == f"{slack_webhook.url}/***"
    assert slack_webhook.path not in orjson.dumps(result.output).decode()


async def test_slack_refusal_names_slacks_reason(loop: Loop, slack_webhook: SlackWebhook,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty message to the webhook a `url` reference names fails with Slack's `no_text`,
    and the webhook path stays hidden."""
    monkeypatch.setenv("SLACK_OTHER_CHANNEL", slack_webhook.webhook_url)
    result = await loop.action("notify.slack", {"text": "", "url": "env:SLACK_OTHER_CHANNEL"})
    assert not result.ok and result.error is not None
    assert result.error == (f"notify.slack: http POST {slack_webhook.url}/***: "
                            "unexpected status 400 Bad Request: no_text")


async def test_http_request_sends_any_method(loop: Loop, http_echo: HttpEcho,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """http.request sends the method, query, JSON and bearer auth its input describes."""
    monkeypatch.setenv("ECHO_TOKEN", http_echo.token)
    loop.inventory.credentials["echo"] = Credentials(token="env:ECHO_TOKEN")
    result = await loop.action("http.request", {
        "method": "PATCH", "url": f"{http_echo.url}/echo", "query": {"dry": False},
        "json": {"drain": True, "note": None}, "auth": "bearer", "credentials": "echo"})
    assert result.ok, result.error
    echoed = result.output["json"]
    assert (echoed["method"], echoed["query"], echoed["body"]) == (
        "PATCH", {"dry": ["false"]}, {"drain": True})
    assert http_echo.requests[0].headers["Authorization"] == f"Bearer {http_echo.token}"
    assert echoed["headers"]["Authorization"] == "Bearer ***"
    refused = await loop.action("http.request", {"url": f"{http_echo.url}/status/409",
                                                 "retries": 0})
    assert refused.error == (f"http.request: http GET {http_echo.url}/status/409: "
                             "unexpected status 409 Conflict: status 409 from echo")


# -- confirmation through PromQL -------------------------------------------------------


@pytest_asyncio.fixture
async def promql(prometheus_api: PrometheusApi) -> AsyncIterator[PromQL]:
    client = PromQL(prometheus_api.url, timeout=5.0)
    yield client
    await client.close()


async def test_confirm_query_succeeds_when_prometheus_returns_a_series(
        loop: Loop, prometheus_api: PrometheusApi, promql: PromQL) -> None:
    """A confirm task's PromQL query holds as soon as Prometheus returns a series."""
    prometheus_api.set_vector('up{instance="web-1"} == 1', ({"instance": "web-1"}, 1))
    run = await loop.workflow("t.verify", {"host": "web-1"}, prometheus=promql)
    assert (run.status, run.outcome) == (states.SUCCEEDED, states.FIXED)
    assert run.ctx["verify"] == {"status": states.SUCCEEDED, "evidence": "query"}
    assert prometheus_api.queries == ['up{instance="web-1"} == 1']


async def test_confirm_query_is_inconclusive_when_prometheus_errs(
        loop: Loop, prometheus_api: PrometheusApi, promql: PromQL) -> None:
    """A confirm task whose query only gets errors from Prometheus ends inconclusive."""
    prometheus_api.error = (422, "execution", "query processing would load too many samples")
    run = await loop.workflow("t.verify_briefly", {"host": "web-1"}, prometheus=promql)
    assert run.outcome == states.INCONCLUSIVE
    assert run.ctx["verify"]["status"] == "inconclusive"
    assert run.ctx["verify"]["error"] == "no evidence within 0.3s"
    assert len(prometheus_api.queries) >= 2
