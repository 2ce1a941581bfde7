"""Alertmanager webhooks (payload version 4) posted to the real daemon."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, eventually

pytestmark = pytest.mark.e2e

RULE = "page-on-critical"


def alert(name: str, instance: str, status: str = "firing", severity: str = "critical",
          starts: str = "2026-11-23T03:00:00Z", ends: str = "0001-01-01T00:00:00Z"
          ) -> dict[str, Any]:
    labels = {"alertname": name, "instance": instance, "job": "node", "severity": severity}
    return {
        "status": status, "labels": labels,
        "annotations": {"summary": f"{name} on {instance}",
                        "runbook_url": "https://runbooks.example/" + name},
        "startsAt": starts, "endsAt": ends,
        "generatorURL": f"http://prometheus:9090/graph?g0.expr=up%7Binstance%3D%22{instance}%22",
        "fingerprint": hashlib.sha1(f"{name}/{instance}".encode()).hexdigest()[:16],
    }


def notification(*alerts: dict[str, Any]) -> dict[str, Any]:
    """An Alertmanager webhook payload as Alertmanager 0.27 sends it."""
    firing = any(a["status"] == "firing" for a in alerts)
    return {
        "version": "4", "groupKey": '{}/{severity=~"critical|page"}:{alertname="NodeDown"}',
        "truncatedAlerts": 0, "status": "firing" if firing else "resolved",
        "receiver": "loopd", "groupLabels": {"alertname": alerts[0]["labels"]["alertname"]},
        "commonLabels": {"job": "node"}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "alerts": list(alerts),
    }


async def test_notifications_start_one_run_per_firing_alert_and_repeats_start_none(
        config: Config, loopd_factory: Factory) -> None:
    """A v4 notification starts one run per firing critical alert (not for resolved or
    warning ones); the same notification sent again starts nothing and is counted as
    duplicate; a new firing of the same alert within ``once_within`` is throttled."""
    config.sources = [{"name": "alertmanager", "type": "alertmanager"}]
    config.rules = {"alerts.yaml": [{
        "name": RULE,
        "on": {"source": "alertmanager", "match": {"status": "firing"}},
        "if": "event.labels.severity in ['critical', 'page']",
        "key": "{{ event.labels.instance }}",
        "throttle": {"once_within": "10m"},
        "run": {"action": "core.log", "input": {
            "message": "{{ event.labels.alertname }} on {{ key }}: {{ event.annotations.summary }}",
            "level": "warning"}},
    }]}
    daemon = loopd_factory(config)
    await daemon.start()

    payload = notification(
        alert("NodeDown", "web-1"), alert("NodeDown", "web-2"),
        alert("NodeDown", "web-3", severity="warning"),
        alert("NodeDown", "db-1", status="resolved", ends="2026-11-23T03:05:00Z"),
    )
    assert await daemon.post("/v1/alertmanager", payload) == \
        {"accepted": 4, "duplicates": 0, "rejected": 0, "errors": []}
    runs = await daemon.wait_runs(2, status="succeeded")
    assert sorted(r["key"] for r in runs) == ["web-1", "web-2"]
    story = await daemon.run(next(r["id"] for r in runs if r["key"] == "web-1"))
    assert story["steps"][0]["output"]["message"] == "NodeDown on web-1: NodeDown on web-1"
    assert story["trigger"]["data"]["receiver"] == "loopd"

    # Alertmanager repeats the notification (repeat_interval, or a retry after a timeout)
    again = await daemon.post("/v1/alertmanager", payload)
    assert (again["accepted"], again["duplicates"]) == (4, 2)  # web-3 and db-1 match no rule
    assert await daemon.metric("loopd_events_duplicate_total", source="alertmanager") == 2
    assert len(await daemon.runs()) == 2
    assert daemon.store_query("SELECT COUNT(*) FROM decisions") == [(2,)]

    # web-1 fires again (a new startsAt: a new alert instance) within once_within, after
    # its incident closed (else the event would join the open incident)
    async def closed() -> bool:
        return len((await daemon.get("/v1/incidents?status=closed"))["incidents"]) == 2

    await eventually(closed, "both incidents closed")
    await daemon.post("/v1/alertmanager", notification(
        alert("NodeDown", "web-1", starts="2026-11-23T03:07:00Z")))
    assert len(await daemon.runs()) == 2
    ((outcome, reason),) = daemon.store_query(
        "SELECT outcome, reason FROM decisions WHERE key='web-1' ORDER BY seq DESC LIMIT 1")
    assert outcome == "suppressed" and reason.startswith("throttled: once within 600s")
    (seen,) = (await daemon.get("/v1/decisions?key=web-1&outcome=suppressed"))["decisions"]
    assert (seen["guard"], seen["reason"]) == ("throttle", reason)
    assert await daemon.metric("loopd_decisions_total", rule=RULE, outcome="suppressed") == 1

    # a payload that is not Alertmanager's: 400 naming the problem, nothing decided
    status, body = await daemon.request("POST", "/v1/alertmanager", {"version": "3"})
    assert status == 400 and "version" in body["error"]
    await daemon.stop()
