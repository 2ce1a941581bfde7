"""Decisions you can see, with a real daemon on loopback: ``GET /v1/decisions``,
``GET /v1/incidents/{id}``, a run's decisions, the ingest reply's duplicates, the one
check of a generic event, RFC 3339 times, and the log lines of suppressions.

"Why did nothing run?" has an answer in the API for each guard: a throttled event, a
pending ``for:``, a silenced alert and a breaker-suppressed one are each found through
``GET /v1/decisions`` with their guard and reason.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from loopd.errors import DecodeError
from loopd.simulate.input import parse_event_file, read_jsonl
from loopd.simulate.report import Meter
from loopd.units import parse_time
from tests.e2e.daemon import Config, LoopdProcess
from tests.integration.test_guards_daemon import Api, Site, am_alert, rfc3339
from tests.servers import wait_until
from tests.servers.http_targets import AlertmanagerApi


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


async def decisions(api: Api, query: str) -> list[dict[str, Any]]:
    status, body = await api.get(f"/v1/decisions?{query}")
    assert status == 200, body
    rows: list[dict[str, Any]] = body["decisions"]
    return rows


async def event(api: Api, ident: str, topic: str, key: str, **data: Any) -> dict[str, Any]:
    status, body = await api.post("/v1/events", {"id": ident, "topic": topic, "key": key,
                                                 "data": data})
    assert status == 200, body
    reply: dict[str, Any] = body
    return reply


GUARDED = """\
rules:
  - name: disk-cleanup
    on: {source: webhook, topic: disk}
    throttle: {once_within: 10m}
    run: {action: core.noop}
  - name: sustained-cpu
    on: {source: webhook, topic: cpu}
    if: "event.value > 90"
    for: 30s
    run: {action: core.noop}
"""


async def test_a_throttled_event_is_found_in_decisions_its_incident_and_its_run(
        site: Site) -> None:
    """After a run, a second event for the key within ``once_within`` is a suppressed
    decision with guard ``throttle``: in /v1/decisions, the incident's and the run's."""
    site.write(GUARDED)
    async with site.daemon() as api:
        await event(api, "d1", "disk", "db-1")
        (run,) = await api.wait_runs("disk-cleanup", 1)
        await api.wait_status(run["id"], "succeeded")
        await api.settled()
        await event(api, "d2", "disk", "db-1")
        (row,) = await decisions(api, "rule=disk-cleanup&outcome=suppressed")
        assert (row["event"], row["source"], row["key"], row["guard"]) == (
            "d2", "webhook", "db-1", "throttle")
        assert row["reason"].startswith("throttled: once within 600s (")
        assert row["time"].endswith("Z") and abs(parse_time(row["time"]) - time.time()) < 60
        assert (row["incident"], row["run"]) == (None, None)

        story = await api.run(run["id"])
        assert [(d["event"], d["outcome"], d["guard"]) for d in story["decisions"]] == [
            ("d1", "run_created", None), ("d2", "suppressed", "throttle")]
        status, incident = await api.get(f"/v1/incidents/{run['incident']}")
        assert status == 200
        assert (incident["id"], incident["status"], incident["key"]) == (
            run["incident"], "closed", "db-1")
        assert [r["id"] for r in incident["runs"]] == [run["id"]]
        assert incident["decisions"] == story["decisions"]
        assert parse_time(incident["closed"]) >= parse_time(incident["opened"])


async def test_a_pending_for_is_found_with_how_long_it_held(site: Site) -> None:
    """A ``for: 30s`` condition that has not held long enough is a suppressed decision
    with guard ``for`` and a reason saying how long it held, and no run starts."""
    site.write(GUARDED)
    async with site.daemon() as api:
        await event(api, "c1", "cpu", "web-1", value=95)
        await event(api, "c2", "cpu", "web-1", value=97)
        rows = await decisions(api, "rule=sustained-cpu")
        assert [(r["event"], r["outcome"], r["guard"]) for r in rows] == [
            ("c2", "suppressed", "for"), ("c1", "suppressed", "for")]
        assert rows[1]["reason"] == "for: held 0s of 30s"
        assert rows[0]["reason"].startswith("for: held ") and rows[0]["reason"].endswith(
            "s of 30s")
        assert await api.runs("sustained-cpu") == []
        assert await decisions(api, "rule=sustained-cpu&outcome=run_created") == []


async def test_a_silenced_alert_is_found_with_guard_silence(
        site: Site, alertmanager_api: AlertmanagerApi) -> None:
    """An alert matching an Alertmanager silence is a suppressed decision with guard
    ``silence``, found by rule and key."""
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
                "matchers": [{"name": "instance", "value": "web-1", "isRegex": False,
                              "isEqual": True}],
                "startsAt": rfc3339(now - 60), "endsAt": rfc3339(now + 3600),
                "createdBy": "ops", "comment": "rack move"}) as resp:
            assert resp.status == 200

        async def fetched() -> bool:
            _, guards = await api.get("/v1/guards")
            return bool(guards["silences"]["active"])

        await wait_until(fetched, timeout=10, what="the daemon to fetch the silence")
        _, guards = await api.get("/v1/guards")
        assert abs(parse_time(guards["silences"]["fetched"]) - time.time()) < 60
        await api.alerts(am_alert("web-1"))
        (row,) = await decisions(api, "rule=silenceable&key=web-1")
        assert (row["outcome"], row["guard"], row["source"]) == (
            "suppressed", "silence", "alertmanager")
        assert row["reason"].startswith("guard silence: ")


BREAKER = """\
rules:
  - name: broken-fix
    on: {source: alertmanager, match: {labels.alertname: HostDown}}
    key: "{{ event.labels.instance }}"
    guards:
      breaker: {failures: 2, within: 1h, cool_off: 1h}
    run: {action: core.fail, input: {reason: "still down"}}
"""


async def test_a_breaker_suppressed_alert_is_found_with_guard_breaker(site: Site) -> None:
    """Once two failed runs opened the breaker, the next alert is a suppressed decision
    with guard ``breaker``; /v1/guards shows the breaker's times in RFC 3339."""
    site.write(BREAKER)
    async with site.daemon() as api:
        for host in ("web-1", "web-2"):
            await api.alerts(am_alert(host))
            await api.settled()
        await api.alerts(am_alert("web-3"))
        (row,) = await decisions(api, "outcome=suppressed&rule=broken-fix")
        assert (row["key"], row["guard"]) == ("web-3", "breaker")
        assert row["reason"].startswith("guard breaker: ")
        _, guards = await api.get("/v1/guards")
        (breaker,) = guards["breakers"]
        assert parse_time(breaker["closes"]) - parse_time(breaker["opened"]) == \
            pytest.approx(3600, abs=0.002)


PAGED = """\
rules:
  - name: note
    on: {source: webhook, topic: note}
    run_mode: parallel
    max_parallel: 100
    run: {action: core.noop}
"""


async def test_decisions_page_back_newest_first_and_filter_by_time(site: Site) -> None:
    """``limit`` pages, ``next`` links to the older page (keeping the filters) and is null
    on the last; ``since``/``until`` take RFC 3339 or epoch seconds."""
    site.write(PAGED)
    async with site.daemon() as api:
        started = time.time()
        for n in range(5):
            await event(api, f"n{n}", "note", "k")
        await event(api, "other", "note", "elsewhere")
        await api.settled()
        seen: list[str] = []
        path: str | None = "/v1/decisions?rule=note&key=k&limit=2"
        pages = 0
        while path is not None:
            status, body = await api.get(path)
            assert status == 200, body
            seen += [d["event"] for d in body["decisions"]]
            assert body["next"] is None or "rule=note" in body["next"]
            path = body["next"]
            pages += 1
        assert seen == ["n4", "n3", "n2", "n1", "n0"] and pages == 3
        seqs = [d["seq"] for d in await decisions(api, "rule=note")]
        assert seqs == sorted(seqs, reverse=True) and len(seqs) == 6

        assert len(await decisions(api, f"rule=note&since={started - 1}")) == 6
        later = rfc3339(time.time() + 3600)
        assert await decisions(api, f"rule=note&since={later}") == []
        assert len(await decisions(api, f"rule=note&until={later}")) == 6
        assert await decisions(api, f"rule=note&until={started - 60}") == []
        assert [d["key"] for d in await decisions(api, "source=webhook&key=elsewhere")] == [
            "elsewhere"]


async def test_bad_decision_parameters_are_400s_naming_them(site: Site) -> None:
    """An unknown outcome lists the valid ones; a bad time, seq, limit or an unknown
    parameter is a 400 naming it."""
    site.write(PAGED)
    async with site.daemon() as api:
        status, body = await api.get("/v1/decisions?outcome=ignored")
        assert status == 400
        assert body["error"] == ("unknown outcome 'ignored' (use run_created, joined, queued, "
                                 "restarted, shadow, suppressed, error)")
        for query, named in (("since=yesterday", "since: bad time 'yesterday'"),
                             ("until=soon", "until: bad time 'soon'"),
                             ("before=0", "before must be a positive integer"),
                             ("before=last", "before must be a positive integer"),
                             ("before=99999999999999999999", "before must be a positive"),
                             ("since=20261201", "since: bad time '20261201'"),
                             ("limit=all", "limit must be an integer"),
                             ("guard=throttle", "unknown parameter 'guard'")):
            status, body = await api.get(f"/v1/decisions?{query}")
            assert status == 400 and body["error"].startswith(named), (query, body)
        status, body = await api.get("/v1/incidents/nope")
        assert (status, body["error"]) == (404, "no incident 'nope'")
        assert (await api.get("/healthz"))[0] == 200  # still serving


QUEUED = """\
rules:
  - name: one-at-a-time
    on: {source: webhook, topic: busy}
    run_mode: queued
    max_queued: 5
    run: {action: core.sleep, input: {seconds: 30}}
"""


async def test_an_incident_shows_its_queue_of_runs_and_its_decisions(site: Site) -> None:
    """``GET /v1/incidents/{id}``: the incident, each of its runs (the running one and
    the one queued behind it), and the decisions that made them."""
    site.write(QUEUED)
    async with site.daemon() as api:
        await event(api, "q1", "busy", "web-1")
        await event(api, "q2", "busy", "web-1")
        first, second = await api.wait_runs("one-at-a-time", 2)
        status, incident = await api.get(f"/v1/incidents/{first['incident']}")
        assert status == 200 and incident["status"] == "open"
        assert [(r["id"], r["status"]) for r in incident["runs"]] == [
            (first["id"], first["status"]), (second["id"], "queued")]
        assert [(d["event"], d["outcome"], d["run"]) for d in incident["decisions"]] == [
            ("q1", "run_created", first["id"]), ("q2", "queued", second["id"])]
        assert incident["opened"].endswith("Z") and incident["closed"] is None
        for run in (second, first):
            assert (await api.post(f"/v1/runs/{run['id']}/cancel"))[0] in (200, 202)
        await api.settled()


DUPLICATE = """\
rules:
  - name: page
    on: {source: alertmanager, match: {labels.alertname: HostDown}}
    key: "{{ event.labels.instance }}"
    run: {action: core.noop}
"""


async def test_the_same_alert_posted_twice_is_a_duplicate_and_starts_no_second_run(
        site: Site) -> None:
    """The second POST of one alert answers ``duplicates: 1`` and starts nothing; an
    alert that matches no rule is not decided, so never a duplicate."""
    site.write(DUPLICATE)
    async with site.daemon() as api:
        alert = am_alert("web-1", starts=time.time() - 30)
        unmatched = am_alert("web-2", alertname="Other")
        answers = []
        for _ in range(2):
            status, body = await api.post("/v1/alertmanager", {
                "version": "4", "status": "firing", "receiver": "loopd",
                "alerts": [alert, unmatched]})
            assert status == 200, body
            answers.append((body["accepted"], body["duplicates"]))
            await api.settled()
        assert answers == [(2, 0), (2, 1)]
        assert len(await api.runs("page")) == 1
        assert len(await decisions(api, "rule=page")) == 1


async def test_an_event_without_topic_or_object_data_is_refused_as_simulate_refuses_it(
        site: Site, tmp_path: Path) -> None:
    """POST /v1/events names the item and field of an event without ``topic`` or with a
    ``data`` that is not an object (the valid items are still decided), with the message
    ``loopd simulate`` gives for the same line."""
    site.write(PAGED)
    bad: list[dict[str, Any]] = [{"id": "a", "data": {}}, {"id": "b", "topic": "note", "data": [1]},
           {"id": "c", "topic": "note", "value": 3}]
    async with site.daemon() as api:
        status, body = await api.post("/v1/events", [{"id": "ok", "topic": "note",
                                                      "data": {}}, *bad])
        assert status == 400
        assert (body["accepted"], body["duplicates"], body["rejected"]) == (1, 0, 3)
        assert body["errors"] == [
            "webhook 127.0.0.1 /v1/events[1]: field 'topic' must be a string, got missing",
            "webhook 127.0.0.1 /v1/events[2]: field 'data' must be an object, got list",
            "webhook 127.0.0.1 /v1/events[3]: field 'data' must be an object, got missing",
        ]
        await api.settled()
        assert [d["event"] for d in await decisions(api, "rule=note")] == ["ok"]
    for n, item in enumerate(bad):
        path = tmp_path / f"bad-{n}.jsonl"
        path.write_bytes(orjson.dumps({"time": 1, **item}) + b"\n")
        with pytest.raises(DecodeError) as info:
            list(read_jsonl(parse_event_file(str(path)), Meter()))
        assert str(info.value).split(": ", 1)[1] == body["errors"][n].split(": ", 1)[1]


async def test_suppressions_log_a_debug_line_each_and_one_info_summary_a_minute(
        tmp_path: Path) -> None:
    """The real daemon at ``log.level: debug``: every suppression is a debug line with
    rule, key, source, event id, guard and reason; the info summary per rule and guard
    is logged once for a burst within a minute."""
    config = Config(root=tmp_path)
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.rules = {"r.yaml": [{"name": "sustained", "on": {"source": "webhook",
                                                            "topic": "cpu"},
                                "for": "1h", "run": {"action": "core.noop"}}]}
    config.extra = {"log": {"format": "json", "level": "debug"}}
    config.write()
    daemon = LoopdProcess(config)
    try:
        await daemon.start()
        await daemon.post("/v1/events", [{"id": f"e{n}", "topic": "cpu", "key": "web-1",
                                          "data": {}} for n in range(3)])

        def suppressed() -> list[dict[str, Any]]:
            return [line for line in daemon.log_lines()
                    if line.get("event") == "event suppressed"]

        async def logged() -> bool:
            return len(suppressed()) == 3

        await wait_until(logged, timeout=10, what="three suppression debug lines")
        lines = daemon.log_lines()
        assert {(e["event_id"], e["rule"], e["key"], e["source"], e["guard"], e["level"])
                for e in suppressed()} == {
            (f"e{n}", "sustained", "web-1", "webhook", "for", "debug") for n in range(3)}
        assert all(e["reason"].startswith("for: held ") for e in suppressed())
        summaries = [e for e in lines if e.get("guard") == "for" and e["level"] == "info"]
        assert [(e["event"], e["suppressed"]) for e in summaries] == [
            ("rule sustained: 1 event(s) suppressed by for", 1)]
        await daemon.stop()
    finally:
        await daemon.close()
