"""Correlation as the operator sees it, with a real daemon on loopback: a group incident's
members and inhibited matches in ``GET /v1/incidents`` and ``/v1/incidents/{id}``, its
run's story, the web UI's pages (incidents, the decisions explorer's guard filter, the
rules page), and the same group in ``loopd simulate``'s report for the same alerts.

Expected members and inhibitions are computed here from the alerts sent and the
inventory, independently of loopd: distinct members per group in order of arrival, the
group opening at the ``count``-th, and the inhibited rule held back for members from
then on.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from loopd.config import load_config
from loopd.simulate.input import parse_event_file, read_events
from loopd.simulate.replay import Simulation
from loopd.units import parse_time
from tests.integration.test_guards_daemon import Api, Site, am_alert, notification
from tests.servers import wait_until

GROUP_RULES = """\
rules:
  - name: frontend-outage
    on: {source: alertmanager, match: {status: firing, labels.alertname: HostDown}}
    key: "{{ event.labels.instance }}"
    group: {by: "{{ inventory[key].group }}", count: 3, within: 2m}
    inhibits: [restart-hung-host]
    mode: approval
    approval: {within: 1h}
    run: {action: core.log, input: {message: "{{ key }} is down"}}
  - name: restart-hung-host
    on: {source: alertmanager, match: {status: firing, labels.alertname: HostDown}}
    key: "{{ event.labels.instance }}"
    run: {action: core.noop}
  - name: disk-cleanup
    on: {source: webhook, topic: disk}
    run: {action: core.noop}
  - name: disk-and-io
    all:
      - {on: {source: webhook, topic: "metrics/{host}/disk_free"}, if: "event.value < 0.1"}
      - {on: {source: webhook, topic: "metrics/{host}/io_wait"}, if: "event.value > 0.3"}
    key: "{{ vars.host }}"
    within: 10m
    run: {action: core.noop}
  - name: heartbeat-missing
    on: {source: webhook, topic: "heartbeat/{host}"}
    key: "{{ vars.host }}"
    absent: 5m
    run: {action: core.noop}
"""
INVENTORY = {"web-1": "frontend", "web-2": "frontend", "web-3": "frontend",
             "web-4": "frontend", "db-1": "backend"}
COUNT = 3
GROUP_RULE, HOST_RULE = "frontend-outage", "restart-hung-host"


def inventory_yaml() -> str:
    return "entities:\n" + "".join(f"  {host}: {{group: {group}}}\n"
                                   for host, group in INVENTORY.items())


def arrivals(t0: float) -> list[dict[str, Any]]:
    """The alerts, one notification each, in this order: web-1, web-2, db-1, web-3 (it
    completes the frontend group), web-4, then web-4 again in a new episode."""
    hosts = ["web-1", "web-2", "db-1", "web-3", "web-4"]
    alerts = [am_alert(h, starts=t0 + i) for i, h in enumerate(hosts)]
    alerts.append(am_alert("web-4", fingerprint="fp-web-4-again", starts=t0 + 10))
    return alerts


def expected(alerts: list[dict[str, Any]]
             ) -> tuple[dict[str, list[str]], Counter[str], list[bool]]:
    """Per group that reached COUNT, its members in order of arrival; per member, how
    many of its host-rule matches came while its group was open (inhibited); and for
    each alert, whether it was inhibited."""
    members: dict[str, list[str]] = defaultdict(list)
    held: Counter[str] = Counter()
    flags = []
    for alert in alerts:
        host = alert["labels"]["instance"]
        group = INVENTORY[host]
        if host not in members[group]:
            members[group].append(host)
        inhibited = len(members[group]) >= COUNT  # the opening member is held back too
        held[host] += inhibited
        flags.append(inhibited)
    return ({g: m for g, m in members.items() if len(m) >= COUNT},
            +held, flags)  # +: only the members held back at least once


async def post_alerts(api: Api, alerts: list[dict[str, Any]]) -> None:
    for alert in alerts:  # one notification each: the order of arrival is the list's
        await api.alerts(alert)
    await api.daemon.engine.drain(timeout=10)


async def group_incident(api: Api) -> dict[str, Any]:
    status, body = await api.get("/v1/incidents?limit=1000")
    assert status == 200, body
    (found,) = [i for i in body["incidents"] if i["rule"] == GROUP_RULE]
    status, incident = await api.get(f"/v1/incidents/{found['id']}")
    assert status == 200, incident
    assert incident["member_count"] == found["member_count"]
    detail: dict[str, Any] = incident
    return detail


async def host_decisions(api: Api) -> dict[str, list[dict[str, Any]]]:
    """restart-hung-host's decisions per key, oldest first."""
    status, body = await api.get(f"/v1/decisions?rule={HOST_RULE}&limit=1000")
    assert status == 200, body
    per_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in reversed(body["decisions"]):
        per_key[row["key"]].append(row)
    return per_key


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = Site(tmp_path)
    site.write(GROUP_RULES, inventory=inventory_yaml())
    return site


async def test_a_group_incident_lists_its_members_and_the_matches_it_inhibited(
        site: Site) -> None:
    """The group incident's API answer lists the members in order of arrival with the id
    and source of each one's first event and RFC 3339 times, and each inhibited
    (rule, member) with its count; the list gives its member count."""
    t0 = time.time()
    alerts = arrivals(t0)
    groups, held, _ = expected(alerts)
    async with site.daemon() as api:
        await post_alerts(api, alerts)
        incident = await group_incident(api)
        assert (incident["key"], incident["status"]) == ("frontend", "open")
        assert [m["key"] for m in incident["members"]] == groups["frontend"]
        assert incident["member_count"] == len(groups["frontend"])
        # each member's first event is its first alert: the host rule decided that event
        first = {key: rows[0] for key, rows in (await host_decisions(api)).items()}
        assert [(m["event_id"], m["source"]) for m in incident["members"]] == [
            (first[k]["event"], "alertmanager") for k in groups["frontend"]]
        for m in incident["members"]:
            assert m["time"].endswith("Z") and m["last"].endswith("Z")
            assert t0 - 1 <= parse_time(m["time"]) <= parse_time(m["last"]) <= time.time() + 1
        assert {(i["rule"], i["key"]): i["count"] for i in incident["inhibited"]} == {
            (HOST_RULE, k): n for k, n in held.items()}
        assert all(i["last"].endswith("Z") for i in incident["inhibited"])
        # the backend group never reached the count: no incident, db-1 decided normally
        status, body = await api.get("/v1/incidents?limit=1000")
        assert status == 200
        assert [i["key"] for i in body["incidents"] if i["rule"] == GROUP_RULE] == [
            "frontend"]
        assert all("member_count" not in i for i in body["incidents"]
                   if i["rule"] != GROUP_RULE)


async def test_inhibited_and_group_suppressions_are_decisions_with_their_guards(
        site: Site) -> None:
    """The host rule's matches for members of the open group are suppressed with guard
    ``inhibited`` naming the incident, the others ran; the group rule's events before
    the count are suppressed with guard ``group``."""
    alerts = arrivals(time.time())
    groups, held, flags = expected(alerts)
    async with site.daemon() as api:
        await post_alerts(api, alerts)
        incident = await group_incident(api)
        per_key = await host_decisions(api)
        got = {k: [(r["outcome"], r["guard"]) for r in rows] for k, rows in per_key.items()}
        # every host not held back alerts once here, so it ran (no incident joined)
        want: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        for alert, inhibited in zip(alerts, flags, strict=True):
            want[alert["labels"]["instance"]].append(
                ("suppressed", "inhibited") if inhibited else ("run_created", None))
        assert got == dict(want)
        for host in held:
            for row in per_key[host]:
                assert incident["id"] in row["reason"] and "frontend" in row["reason"]
        status, body = await api.get(f"/v1/decisions?rule={GROUP_RULE}&outcome=suppressed")
        assert status == 200
        before_count = [*groups["frontend"][:COUNT - 1], "db-1"]
        assert sorted(r["event"] for r in body["decisions"]) == sorted(
            per_key[h][0]["event"] for h in before_count)
        assert {r["guard"] for r in body["decisions"]} == {"group"}


async def test_the_run_story_and_the_web_pages_show_the_group(site: Site) -> None:
    """The group run's story has the group's members and inhibited matches; the incidents
    page shows "frontend: N members" with a row per member and per inhibited match, the
    decisions explorer's guard filter keeps only that guard's suppressions, and the rules
    page shows the rule's group and inhibitions; the run's trace lists the members."""
    alerts = arrivals(time.time())
    groups, held, _ = expected(alerts)
    async with site.daemon() as api:
        await post_alerts(api, alerts)
        incident = await group_incident(api)
        story = await api.run(incident["run"])
        assert [m["key"] for m in story["group"]["members"]] == groups["frontend"]
        assert story["group"]["inhibited"] == incident["inhibited"]

        page = await html(api, "/")
        assert f"frontend: {len(groups['frontend'])} members" in page
        for key in groups["frontend"]:
            assert f'data-member="{key}"' in page
        for key in held:
            assert f'data-rule="{HOST_RULE}" data-member="{key}"' in page

        inhibited = await html(api, "/decisions?guard=inhibited")
        assert inhibited.count('class="decision suppressed"') == sum(held.values())
        assert f"/decisions?rule={GROUP_RULE}" not in inhibited.split("<tbody>")[1]
        grouped = await html(api, f"/decisions?guard=group&rule={GROUP_RULE}")
        assert grouped.count('class="decision suppressed"') == COUNT - 1 + 1  # + db-1
        refused = await html(api, "/decisions?guard=group&outcome=joined", status=400)
        assert "a guard names a suppressed decision" in refused

        trace = await html(api, f"/runs/{incident['run']}")
        group_part = trace.split('id="group"')[1].split("</li>")[0]
        assert f"{len(groups['frontend'])} members" in group_part
        rows = group_part.split('tr class="member" data-member="')[1:]
        assert [row.split('"')[0] for row in rows] == groups["frontend"]

        rules = await html(api, "/rules")
        row = rules.split(f'id="rule-{GROUP_RULE}"')[1].split("</tr>")[0]
        assert "group by" in row and "3 members within 2 min" in row
        assert f'href="#rule-{HOST_RULE}"' in row


async def html(api: Api, path: str, status: int = 200) -> str:
    async with api.http.get(path) as resp:
        assert resp.status == status, path
        return await resp.text()


async def test_the_members_stay_after_the_group_incident_closes(site: Site) -> None:
    """Once the group's run is approved and ends, the closed incident still lists its
    members and inhibited matches, and the members still firing are decided again."""
    alerts = arrivals(time.time())
    groups, held, _ = expected(alerts)
    async with site.daemon() as api:
        await post_alerts(api, alerts)
        incident = await group_incident(api)
        status, body = await api.post(f"/v1/runs/{incident['run']}/approve")
        assert status == 202, body
        await api.wait_status(incident["run"], "succeeded")

        async def closed() -> bool:
            return bool((await group_incident(api))["status"] == "closed")

        await wait_until(closed, timeout=10, what="the group incident to close")
        await api.settled()
        after = await group_incident(api)
        assert [m["key"] for m in after["members"]] == groups["frontend"]
        assert after["inhibited"] == incident["inhibited"]
        redecided = {k: rows[-1] for k, rows in (await host_decisions(api)).items()
                     if rows[-1]["event"].endswith(f"~after-{incident['id']}")}
        assert set(redecided) == set(held)
        assert {r["outcome"] for r in redecided.values()} == {"run_created"}


async def test_an_ordinary_incident_has_no_members(site: Site) -> None:
    """An incident of a rule without ``group`` answers empty members and inhibited
    lists, and no member count in the list."""
    async with site.daemon() as api:
        status, body = await api.post("/v1/events", {"id": "d1", "topic": "disk",
                                                     "key": "db-1", "data": {}})
        assert status == 200, body
        (run,) = await api.wait_runs("disk-cleanup", 1)
        status, incident = await api.get(f"/v1/incidents/{run['incident']}")
        assert status == 200
        assert (incident["members"], incident["inhibited"], incident["member_count"]) == (
            [], [], 0)
        assert "group" not in await api.run(run["id"])
        status, body = await api.get("/v1/incidents")
        assert all("member_count" not in i for i in body["incidents"])


async def test_loopd_simulate_reports_the_same_group_as_the_daemon(
        site: Site, tmp_path: Path) -> None:
    """The same alerts replayed by ``loopd simulate`` give a report whose group incident
    has the daemon's members (and first events) and inhibited matches."""
    t0 = time.time() - 3600
    alerts = arrivals(t0)
    recording = tmp_path / "alerts.jsonl"
    recording.write_bytes(b"".join(orjson.dumps(notification(a)) + b"\n" for a in alerts))
    async with site.daemon() as api:
        await post_alerts(api, alerts)
        incident = await group_incident(api)
    config = load_config(tmp_path / "loopd.yaml")
    async with Simulation(config) as sim:
        report = await sim.replay(read_events([parse_event_file(str(recording))]))
    (group,) = report.data["groups"]
    assert (group["rule"], group["key"]) == (GROUP_RULE, "frontend")
    assert [(m["key"], m["event_id"], m["source"]) for m in group["members"]] == [
        (m["key"], m["event_id"], m["source"]) for m in incident["members"]]
    first_start: dict[str, float] = {}
    for a in alerts:  # event time is the simulation's clock: a member's first startsAt
        first_start.setdefault(a["labels"]["instance"], parse_time(a["startsAt"]))
    assert [m["time"] for m in group["members"]] == pytest.approx(
        [first_start[m["key"]] for m in group["members"]])
    assert {(i["rule"], i["key"]): i["count"] for i in group["inhibited"]} == {
        (i["rule"], i["key"]): i["count"] for i in incident["inhibited"]}
    text = report.render()
    assert f"{GROUP_RULE}  frontend: {len(group['members'])} member(s)" in text
    assert f"held back {HOST_RULE}: " in text


async def test_the_rules_api_and_page_show_all_and_absent_and_the_explorer_finds_all(
        site: Site) -> None:
    """``GET /v1/rules`` gives each rule's correlation (null for an ordinary one), the
    rules page shows an ``all`` rule's conditions and window and an ``absent`` rule's
    silence, and a partial ``all`` match is found by the explorer's guard filter."""
    async with site.daemon() as api:
        status, body = await api.get("/v1/rules")
        assert status == 200
        shown = {r["name"]: r["correlation"] for r in body["rules"]}
        assert shown["disk-cleanup"] is None
        assert shown["heartbeat-missing"] == {"absent": 300.0}
        assert shown[GROUP_RULE] == {
            "group": {"by": "{{ inventory[key].group }}", "count": 3, "within": 120.0},
            "inhibits": [HOST_RULE]}
        assert shown["disk-and-io"]["within"] == 600.0
        assert [(c["topic"], c["if"]) for c in shown["disk-and-io"]["all"]] == [
            ("metrics/{host}/disk_free", "event.value < 0.1"),
            ("metrics/{host}/io_wait", "event.value > 0.3")]

        rules = await html(api, "/rules")
        row = rules.split('id="rule-disk-and-io"')[1].split("</tr>")[0]
        assert "all of 2 within 10 min" in row
        assert "metrics/{host}/disk_free if event.value &lt; 0.1" in row
        assert "absent for 5 min" in rules.split('id="rule-heartbeat-missing"')[1]

        status, _ = await api.post("/v1/events", {"id": "df1", "topic": "metrics/db-1/disk_free",
                                                  "data": {"value": 0.05}})
        assert status == 200
        page = await html(api, "/decisions?guard=all")
        assert page.count('class="decision suppressed"') == 1
        assert "guard all: 1 of 2 conditions within 600s" in page


async def test_a_members_repeated_match_moves_its_last_time(tmp_path: Path) -> None:
    """A member's later match in the open group (no inhibition involved) moves its
    ``last`` in the incident's members to that match's arrival."""
    site = Site(tmp_path)
    site.write(GROUP_RULES.replace("    inhibits: [restart-hung-host]\n", ""),
               inventory=inventory_yaml())
    t0 = time.time()
    async with site.daemon() as api:
        await post_alerts(api, [am_alert(h, starts=t0 + i)
                                for i, h in enumerate(["web-1", "web-2", "web-3"])])
        before = {m["key"]: m for m in (await group_incident(api))["members"]}
        sent = time.time()
        await post_alerts(api, [am_alert("web-1", fingerprint="fp-web-1-again",
                                         starts=t0 + 10)])
        after = {m["key"]: m for m in (await group_incident(api))["members"]}
    assert after["web-1"]["time"] == before["web-1"]["time"]
    assert parse_time(after["web-1"]["last"]) >= sent - 0.01
    assert after["web-2"] == before["web-2"]


async def test_after_a_restart_the_group_lists_its_members_and_still_inhibits(
        site: Site) -> None:
    """After a restart of the daemon, the open group incident still lists the members it
    had, a member that alerts then joins the list, and its host match is held back."""
    t0 = time.time()
    alerts = arrivals(t0)
    first, later = alerts[:4], alerts[4:5]  # web-1, web-2, db-1, web-3 | web-4
    groups, held, _ = expected(first + later)
    async with site.daemon() as api:
        await post_alerts(api, first)
        before = await group_incident(api)
    async with site.daemon() as api:
        assert (await group_incident(api))["members"] == before["members"]
        await post_alerts(api, later)
        after = await group_incident(api)
    assert after["id"] == before["id"]
    assert [m["key"] for m in after["members"]] == groups["frontend"]
    assert {(i["rule"], i["key"]): i["count"] for i in after["inhibited"]} == {
        (HOST_RULE, k): n for k, n in held.items()}
