"""The HTTP API of a real daemon on loopback: ingest, runs, rules, reload, health and bad input.

Each test starts a real ``Daemon`` (SQLite store in tmp_path, the shipped core
pack, its own rule files) listening on 127.0.0.1:0 and talks to it over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import shutil
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from ssl import SSLContext
from typing import Any, cast

import aiohttp
import orjson
import pytest

from loopd import metrics
from loopd.api.principal import ROUTE_ROLES, Role
from loopd.config import load_config
from loopd.daemon import Daemon
from loopd.store.base import Store
from loopd.store.sqlite import SqliteStore
from loopd.units import parse_time
from tests.servers import wait_until
from tests.unit.test_arbiter import FlakyStore

REPO = Path(__file__).resolve().parents[2]

RULES = """\
rules:
  - name: page-on-critical
    on: {source: alertmanager, match: {status: firing}}
    if: "{{ event.labels.severity in ['critical', 'page'] }}"
    key: "{{ event.labels.instance }}"
    throttle: {once_within: 10m}
    run:
      action: core.log
      input:
        message: >-
          {{ event.labels.alertname }} on {{ event.labels.instance }}:
          {{ event.annotations.summary }}
        level: warning
  - name: note-resolved
    on: {source: alertmanager, match: {status: resolved}}
    key: "{{ event.labels.instance }}"
    run: {action: core.noop, input: {resolved: "{{ event.labels.alertname }}"}}
  - name: hot-disk
    on: {source: webhook, topic: disk}
    if: "event.used > 0.9"
    run: {action: core.set, input: {host: "{{ key }}", used: "{{ event.used }}"}}
"""

BROKEN = """\
rules:
  - name: misspelt
    on: {source: webhook}
    iff: "event.value > 1"
    run: {action: core.noop}
"""

# A real Alertmanager webhook notification (payload version 4): one group, three alerts.
ALERTMANAGER: dict[str, Any] = {
    "version": "4",
    "groupKey": '{}/{severity=~"critical|warning"}:{alertname="NginxDown"}',
    "truncatedAlerts": 0,
    "status": "firing",
    "receiver": "loopd",
    "groupLabels": {"alertname": "NginxDown"},
    "commonLabels": {"alertname": "NginxDown", "job": "nginx"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager.example:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "NginxDown", "instance": "web-1:9113", "job": "nginx",
                       "severity": "critical"},
            "annotations": {"summary": "nginx is down on web-1:9113"},
            "startsAt": "2024-05-01T10:00:00.000Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example:9090/graph?g0.expr=nginx_up+%3D%3D+0",
            "fingerprint": "5f8e2b1c9a0d3e47",
        },
        {
            "status": "firing",
            "labels": {"alertname": "NginxDown", "instance": "web-2:9113", "job": "nginx",
                       "severity": "warning"},
            "annotations": {"summary": "nginx is down on web-2:9113"},
            "startsAt": "2024-05-01T10:00:30.000Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example:9090/graph?g0.expr=nginx_up+%3D%3D+0",
            "fingerprint": "0c3b7d9e1f2a4b68",
        },
        {
            "status": "resolved",
            "labels": {"alertname": "NginxDown", "instance": "web-3:9113", "job": "nginx",
                       "severity": "critical"},
            "annotations": {"summary": "nginx is down on web-3:9113"},
            "startsAt": "2024-05-01T09:40:00.000Z",
            "endsAt": "2024-05-01T09:55:00.000Z",
            "generatorURL": "http://prometheus.example:9090/graph?g0.expr=nginx_up+%3D%3D+0",
            "fingerprint": "9a1d5e7c3b2f0e84",
        },
    ],
}


def sample(name: str, **labels: str) -> float:
    return metrics.current().registry.get_sample_value(name, labels) or 0.0


@dataclass
class Api:
    daemon: Daemon
    http: aiohttp.ClientSession
    rules_dir: Path

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(path) as resp:
            return resp.status, await resp.json()

    async def post(self, path: str, body: Any = None, *, data: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        if data is None:
            data = orjson.dumps(body)
        headers = {"Content-Type": "application/json", **(headers or {})}
        async with self.http.post(path, data=data, headers=headers) as resp:
            assert resp.content_type == "application/json", await resp.text()
            return resp.status, await resp.json()

    async def settled(self) -> None:
        """Wait until every accepted event is decided and every run has ended."""
        await self.daemon.engine.drain(timeout=10)
        await self.daemon.dispatcher.drain(timeout=10)
        await self.daemon.engine.drain(timeout=10)  # outcome events of finished runs

    async def runs(self, rule: str | None = None) -> list[dict[str, Any]]:
        status, body = await self.get("/v1/runs")
        assert status == 200
        return [r for r in body["runs"] if rule is None or r["rule"] == rule]


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


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "alerts.yaml").write_text(RULES)
    (rules_dir / "zz-broken.yaml").write_text(BROKEN)
    shutil.copytree(REPO / "packs" / "core", tmp_path / "packs" / "core")
    (tmp_path / "loopd.yaml").write_text("""\
listen: 127.0.0.1:0
sources:
  - {name: webhook, type: webhook, max_payload: 4KiB}
  - {name: alertmanager, type: alertmanager, max_payload: 16KiB}
rules: [rules]
packs: [packs]
store: {path: var/loopd.db}
""")
    async with serving(tmp_path / "loopd.yaml", rules_dir) as api:
        yield api


@contextlib.asynccontextmanager
async def serving(config: Path, rules_dir: Path, *, token: str | None = None,
                  ssl: SSLContext | None = None) -> AsyncIterator[Api]:
    """A real Daemon on ``config`` until the block ends, with an HTTP client on its API
    (sending ``token`` as a bearer token; over HTTPS trusting ``ssl`` when given)."""
    daemon = Daemon(load_config(config))
    # sample() reads this daemon's registry: pytest-asyncio hands a fixture's context to the test
    metrics.use(daemon.metrics)
    ready = asyncio.Event()
    task = await _until_ready(daemon.run(on_ready=lambda _: ready.set()), ready)
    scheme = "http" if ssl is None else "https"
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    try:
        async with aiohttp.ClientSession(
                base_url=f"{scheme}://127.0.0.1:{daemon.port}", headers=headers,
                connector=aiohttp.TCPConnector(ssl=ssl) if ssl is not None else None) as http:
            yield Api(daemon, http, rules_dir)
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 20)


async def test_alertmanager_notification_runs_the_rule_and_shows_the_run(api: Api) -> None:
    """Each alert of a v4 notification is an event; the matching rule's run shows its steps."""
    received = sample("loopd_events_received_total", source="alertmanager")
    status, body = await api.post("/v1/alertmanager", ALERTMANAGER)
    assert (status, body) == (200, {"accepted": 3, "duplicates": 0, "rejected": 0,
                                    "errors": []})
    assert sample("loopd_events_received_total", source="alertmanager") - received == 3
    await api.settled()

    (paged,) = await api.runs("page-on-critical")  # web-2 is only a warning
    (resolved,) = await api.runs("note-resolved")
    assert (paged["key"], paged["action"], paged["status"], paged["outcome"]) == (
        "web-1:9113", "core.log", "succeeded", "done")
    assert resolved["key"] == "web-3:9113"

    status, story = await api.get(f"/v1/runs/{paged['id']}")
    assert status == 200
    message = "NginxDown on web-1:9113: nginx is down on web-1:9113"
    assert story["input"] == {"message": message, "level": "warning"}
    (step,) = story["steps"]
    assert (step["action"], step["status"], step["attempt"]) == ("core.log", "succeeded", 1)
    assert step["input"] == {"message": message, "level": "warning"}
    assert step["output"] == {"message": message}
    assert parse_time(step["finished"]) >= parse_time(step["started"])
    assert step["started"].endswith("Z") and step["duration_s"] == round(step["duration_s"], 3)
    assert story["trigger"]["data"]["labels"]["instance"] == "web-1:9113"
    assert story["trigger"]["data"]["receiver"] == "loopd"  # group fields come along
    assert story["trigger"]["time"] == "2024-05-01T10:00:00.000Z"  # the alert's startsAt
    assert paged["created"].endswith("Z") and paged["duration_s"] == round(
        paged["duration_s"], 3)
    assert [e["outcome"] for e in story["decisions"]] == ["run_created"]

    status, incidents = await api.get("/v1/incidents?status=closed")
    assert status == 200
    assert {i["key"] for i in incidents["incidents"]} == {"web-1:9113", "web-3:9113"}


async def test_a_repeated_notification_starts_no_second_run(api: Api) -> None:
    """Alertmanager re-sending the same alert state is recognised and decides nothing new."""
    duplicates = sample("loopd_events_duplicate_total", source="alertmanager")
    for _ in range(3):
        status, body = await api.post("/v1/alertmanager", ALERTMANAGER)
        assert status == 200 and body["accepted"] == 3
        await api.settled()
    assert len(await api.runs("page-on-critical")) == 1
    assert len(await api.runs("note-resolved")) == 1
    # web-2 matched no rule, so only web-1 and web-3 are duplicates
    assert sample("loopd_events_duplicate_total", source="alertmanager") - duplicates == 4


def _without(alert_index: int, field: str) -> dict[str, Any]:
    payload = copy.deepcopy(ALERTMANAGER)
    del payload["alerts"][alert_index][field]
    return payload


BAD_BODIES = [
    pytest.param("/v1/alertmanager", b'{"version": "4", "alerts": [', "decode",
                 "malformed JSON", id="malformed-json"),
    pytest.param("/v1/alertmanager", orjson.dumps([ALERTMANAGER]), "decode",
                 "expected an Alertmanager payload object, got list", id="list-not-object"),
    pytest.param("/v1/alertmanager", orjson.dumps({"version": "4", "receiver": "loopd"}),
                 "decode", "field 'alerts' must be list, got missing", id="alerts-missing"),
    pytest.param("/v1/alertmanager", orjson.dumps({"version": "4", "alerts": {"a": 1}}),
                 "decode", "field 'alerts' must be list, got dict", id="alerts-wrong-type"),
    pytest.param("/v1/alertmanager", orjson.dumps({**ALERTMANAGER, "version": "3"}),
                 "decode", "unsupported Alertmanager payload version '3'", id="old-version"),
    pytest.param("/v1/events", b"\xff\xfe not json", "decode", "malformed JSON",
                 id="events-not-json"),
]


@pytest.mark.parametrize("path, data, reason, message", BAD_BODIES)
async def test_malformed_payloads_are_rejected_and_counted(
    api: Api, path: str, data: bytes, reason: str, message: str,
) -> None:
    """Bad payloads get a 400 JSON error naming the problem and origin, counted by reason."""
    source = "alertmanager" if "alertmanager" in path else "webhook"
    before = sample("loopd_events_rejected_total", source=source, reason=reason)
    status, body = await api.post(path, data=data)
    assert status == 400 and body["status"] == 400
    assert message in body["error"]
    assert f"{source} 127.0.0.1 {path}" in body["error"]  # the origin
    assert sample("loopd_events_rejected_total", source=source, reason=reason) - before == 1
    assert (await api.get("/healthz"))[0] == 200  # and the daemon keeps serving
    status, _ = await api.post("/v1/alertmanager", ALERTMANAGER)
    assert status == 200


@pytest.mark.parametrize("index, field, message", [
    (1, "labels", "alerts[1]: field 'labels' must be dict, got missing"),
    (1, "startsAt", "alerts[1]: field 'startsAt' must be str, got missing"),
    (1, "status", "alerts[1]: field 'status' must be str, got missing"),
])
async def test_an_alert_missing_fields_is_rejected_alone(
    api: Api, index: int, field: str, message: str,
) -> None:
    """An alert without labels/startsAt/status is rejected by name; its siblings are decided."""
    before = sample("loopd_events_rejected_total", source="alertmanager", reason="decode")
    status, body = await api.post("/v1/alertmanager", _without(index, field))
    assert status == 400
    assert (body["accepted"], body["rejected"]) == (2, 1)
    (error,) = body["errors"]
    assert error.endswith(message) and "alertmanager 127.0.0.1 /v1/alertmanager" in error
    assert sample("loopd_events_rejected_total", source="alertmanager", reason="decode") \
        - before == 1
    await api.settled()
    assert [r["key"] for r in await api.runs("page-on-critical")] == ["web-1:9113"]


@pytest.mark.parametrize("alert_patch, message", [
    ({"labels": "alertname=NginxDown"}, "field 'labels' must be dict, got str"),
    ({"status": "pending"}, "status must be firing or resolved, got 'pending'"),
    ({"startsAt": "yesterday"}, "time 'yesterday' is not RFC 3339"),
    ({"annotations": ["summary"]}, "field 'annotations' must be dict"),
])
async def test_alert_fields_of_the_wrong_type_are_named(
    api: Api, alert_patch: dict[str, Any], message: str,
) -> None:
    """A field of the wrong type in one alert is reported with the alert's index."""
    payload = copy.deepcopy(ALERTMANAGER)
    payload["alerts"][0].update(alert_patch)
    status, body = await api.post("/v1/alertmanager", payload)
    assert status == 400
    assert body["accepted"] == 2
    assert body["errors"][0].endswith(f"alerts[0]: {message}")


@pytest.mark.parametrize("where", ["alert", "group"])
async def test_an_alertmanager_payload_nested_too_deep_names_where(
    api: Api, where: str,
) -> None:
    """A payload with enough brackets to nest too deep is walked: an alert nested 100
    levels deep is rejected with its index and the others decided; group fields nested
    that deep refuse the whole payload (every alert carries them)."""
    payload = copy.deepcopy(ALERTMANAGER)
    deep: Any = 1
    for _ in range(99):
        deep = {"a": deep}
    if where == "alert":
        payload["alerts"][1]["annotations"]["deep"] = deep
        status, body = await api.post("/v1/alertmanager", payload)
        assert status == 400
        assert body["accepted"] == 2
        assert body["errors"][0].endswith("alerts[1]: nested 101 levels deep (limit 64)")
    else:
        payload["commonLabels"] = {"deep": deep}
        status, body = await api.post("/v1/alertmanager", payload)
        assert status == 400
        assert body["error"].endswith("/v1/alertmanager: nested 101 levels deep (limit 64)")


@pytest.mark.parametrize("path, limit", [("/v1/alertmanager", 16 * 1024),
                                         ("/v1/events", 4 * 1024)])
async def test_a_payload_over_max_payload_is_refused_with_413(
    api: Api, path: str, limit: int,
) -> None:
    """A body larger than the source's max_payload is refused with 413 and counted."""
    source = "alertmanager" if "alertmanager" in path else "webhook"
    before = sample("loopd_events_rejected_total", source=source, reason="too_large")
    big = orjson.dumps({"data": {"blob": "x" * limit}})
    status, body = await api.post(path, data=big)
    assert status == 413
    assert f"exceeds max_payload {limit} of source {source!r}" in body["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: checked after reading
        for i in range(0, len(big), 1024):
            yield big[i:i + 1024]

    status, body = await api.post(path, data=chunks())
    assert status == 413
    assert sample("loopd_events_rejected_total", source=source, reason="too_large") \
        - before == 2
    assert (await api.get("/healthz"))[0] == 200


async def test_generic_events_are_decided_one_by_one(api: Api) -> None:
    """``POST /v1/events`` takes one event or a list; bad items are named, good ones decided."""
    status, body = await api.post("/v1/events", [
        {"id": "d1", "topic": "disk", "key": "db-1", "data": {"used": 0.95}},
        {"id": "d2", "topic": "disk", "key": "db-2", "data": {"used": 0.5}},
        {"id": "d3", "topic": "disk", "key": 42, "data": {"used": 0.99}},
        "not an event",
        {"topic": 7, "used": 1},
        {"topic": " ", "data": {"used": 1}},
        {"topic": "disk", "time": 1e17, "data": {"used": 1}},
    ])
    assert status == 400
    assert (body["accepted"], body["rejected"]) == (2, 5)
    assert body["errors"] == [
        "webhook 127.0.0.1 /v1/events[2]: field 'key' has wrong type int",
        "webhook 127.0.0.1 /v1/events[3]: expected a JSON object, got str",
        "webhook 127.0.0.1 /v1/events[4]: field 'topic' must be a string, got int",
        "webhook 127.0.0.1 /v1/events[5]: field 'topic' must not be empty",
        "webhook 127.0.0.1 /v1/events[6]: time 1e+17 is out of range (epoch seconds or "
        "milliseconds from 1970 to 9999)",
    ]
    status, body = await api.post("/v1/events", {"id": "d4", "topic": "disk", "key": "db-3",
                                                 "data": {"used": 0.97}})
    assert (status, body["accepted"]) == (200, 1)
    await api.settled()
    runs = await api.runs("hot-disk")
    assert sorted(r["key"] for r in runs) == ["db-1", "db-3"]
    status, story = await api.get(f"/v1/runs/{runs[0]['id']}")
    assert story["steps"][0]["output"] == story["input"]


async def test_health_readiness_and_metrics(api: Api) -> None:
    """/healthz is ok, /readyz lists sources once they are up, /metrics exposes loopd_*."""
    assert await api.get("/healthz") == (200, {"status": "ok"})

    async def ready() -> bool:
        return (await api.get("/readyz"))[0] == 200

    await wait_until(ready, what="/readyz to report ready")
    assert (await api.get("/readyz"))[1] == {
        "ready": True, "sources": {"webhook": True, "alertmanager": True}, "store": True}
    await api.post("/v1/alertmanager", ALERTMANAGER)
    async with api.http.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    for name in ("loopd_events_received_total", "loopd_events_rejected_total",
                 "loopd_rule_matches_total", "loopd_decisions_total", "loopd_rules_loaded",
                 "loopd_event_decision_seconds_bucket"):
        assert name in text, name
    assert 'loopd_events_received_total{source="alertmanager"}' in text
    assert "web-1" not in text  # no unbounded labels: never a host or an event id


async def test_metrics_name_filter_keeps_only_the_named_samples(api: Api) -> None:
    """``/metrics?name[]=...`` (the Prometheus client libraries' filter) renders only the
    samples named: a probe polling one counter does not render every rule's series."""
    await api.post("/v1/alertmanager", ALERTMANAGER)
    async with api.http.get("/metrics", params=[
            ("name[]", "loopd_events_received_total"),
            ("name[]", "loopd_event_decision_seconds_count")]) as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = [line.partition("{")[0].partition(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")]
    assert set(samples) == {"loopd_events_received_total",
                            "loopd_event_decision_seconds_count"}
    assert 'loopd_events_received_total{source="alertmanager"} ' in text
    async with api.http.get("/metrics", params={"name[]": "no_such_metric"}) as resp:
        assert resp.status == 200
        assert await resp.text() == ""


async def test_rules_endpoint_shows_match_counts_and_load_errors(api: Api) -> None:
    """GET /v1/rules lists each rule with its match count, and the load errors by place."""
    await api.post("/v1/alertmanager", ALERTMANAGER)
    status, body = await api.get("/v1/rules")
    assert status == 200
    rules = {r["name"]: r for r in body["rules"]}
    assert set(rules) == {"page-on-critical", "note-resolved", "hot-disk"}
    assert rules["page-on-critical"]["matches"] == 1
    assert rules["note-resolved"]["matches"] == 1
    assert rules["hot-disk"]["matches"] == 0
    assert rules["page-on-critical"]["run"] == {"action": "core.log"}
    assert rules["page-on-critical"]["throttle"]["once_within"] == 600
    assert rules["page-on-critical"]["origin"] == f"{api.rules_dir / 'alerts.yaml'}:2"
    assert body["errors"] == [f"{api.rules_dir / 'zz-broken.yaml'}:4 misspelt iff: unknown field"]


async def test_reload_picks_up_changes_and_keeps_good_rules(api: Api) -> None:
    """POST /v1/reload loads a changed rule file, reports a broken one, keeps the good rules."""
    (api.rules_dir / "zz-broken.yaml").write_text(BROKEN.replace("iff:", "if:"))
    (api.rules_dir / "new.yaml").write_text("""\
rules:
  - name: disk-full
    on: {source: webhook, topic: full}
    run: {action: core.noop}
  - name: bad-target
    on: {source: webhook}
    run: {action: core.teleport}
""")
    status, body = await api.post("/v1/reload")
    assert status == 422  # the good rules are active; the errors say what was not loaded
    assert body["rules"] == 5 and body["kept"] == []
    new = api.rules_dir / "new.yaml"
    assert body["errors"] == [
        f"{new}:7 bad-target run.action: pack 'core' has no action 'teleport'"]
    _, listed = await api.get("/v1/rules")
    assert {r["name"] for r in listed["rules"]} == {
        "page-on-critical", "note-resolved", "hot-disk", "misspelt", "disk-full"}
    assert listed["errors"] == body["errors"]
    # the new rule decides right away, the old ones still do
    await api.post("/v1/events", {"id": "f1", "topic": "full", "key": "db-1", "data": {}})
    await api.post("/v1/alertmanager", ALERTMANAGER)
    await api.settled()
    assert [r["key"] for r in await api.runs("disk-full")] == ["db-1"]
    assert len(await api.runs("page-on-critical")) == 1


async def test_unknown_things_are_json_404s(api: Api) -> None:
    """Unknown runs, routes and push sources answer a JSON 404 naming what is missing."""
    assert await api.get("/v1/runs/nope") == (404, {"error": "no run 'nope'", "status": 404})
    status, body = await api.get("/v1/nothing-here")
    assert status == 404 and body["status"] == 404 and body["error"]
    status, body = await api.post("/v1/alertmanager/other", ALERTMANAGER)
    assert (status, body["error"]) == (404, "no alertmanager source named 'other'")
    status, body = await api.post("/v1/runs/nope/cancel")
    assert (status, body["error"]) == (404, "no run 'nope'")


async def test_bad_query_parameters_are_400s(api: Api) -> None:
    """An unknown status filter or a non-numeric limit is a 400 naming the parameter."""
    assert await api.get("/v1/runs?status=sleeping") == (
        400, {"error": "unknown status 'sleeping'", "status": 400})
    status, body = await api.get("/v1/runs?limit=lots")
    assert (status, body["error"]) == (400, "limit must be an integer, got 'lots'")
    status, body = await api.get("/v1/incidents?status=maybe")
    assert (status, body["error"]) == (400, "status must be open or closed")


async def test_a_rule_failing_on_an_event_does_not_stop_the_daemon(api: Api) -> None:
    """An event that makes a condition raise is counted as a rule error; serving goes on."""
    errors = sample("loopd_rule_errors_total", rule="hot-disk")
    status, body = await api.post("/v1/events", {"id": "x1", "topic": "disk", "key": "db-1",
                                                 "data": {"used": "almost full"}})
    assert (status, body["accepted"]) == (200, 1)
    assert sample("loopd_rule_errors_total", rule="hot-disk") - errors == 1
    status, body = await api.post("/v1/events", {"id": "x2", "topic": "disk", "key": "db-1",
                                                 "data": {"used": 0.99}})
    assert (status, body["accepted"]) == (200, 1)
    await api.settled()
    assert [r["key"] for r in await api.runs("hot-disk")] == ["db-1"]


async def test_readiness_is_false_while_the_store_fails(api: Api) -> None:
    """/readyz answers 503 with ``store: false`` while commits fail (the event waits, not
    acknowledged), and 200 again once the store takes the held batch."""
    engine = api.daemon.engine
    flaky = FlakyStore(cast(SqliteStore, engine.store))
    engine.store = cast(Store, flaky)
    flaky.down = True
    post = asyncio.create_task(api.post("/v1/alertmanager", ALERTMANAGER))

    async def status() -> int:
        return (await api.get("/readyz"))[0]

    async def not_ready() -> bool:
        return await status() == 503

    await wait_until(not_ready, what="/readyz to say the store fails")
    assert (await api.get("/readyz"))[1]["store"] is False
    # not liveness: restarting loopd would not bring the store back
    assert (await api.get("/healthz"))[0] == 200
    assert not post.done()  # not decided, so not answered
    flaky.down = False
    assert (await post)[0] == 200
    assert await status() == 200


async def test_every_route_is_named_and_has_a_role(api: Api) -> None:
    """Every route of the API (the audit trail's included) has a name in ROUTE_ROLES, and
    GET /v1/audit needs an admin."""
    assert api.daemon.runner is not None
    names = {r.name for r in api.daemon.runner.app.router.routes()
             if r.method != "HEAD"}
    assert None not in names
    assert names == set(ROUTE_ROLES)
    assert ROUTE_ROLES["audit"] is Role.ADMIN
    assert await api.get("/v1/audit") == (200, {"audit": []})
    assert (await api.post("/v1/no-such-route"))[0] == 404
    assert await api.get("/v1/audit") == (200, {"audit": []})  # an unknown path: no record
