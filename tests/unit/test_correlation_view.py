"""How correlation is shown: a group incident's stored members as the API's rows, the
suppressions of one guard read page by page from a real store, a rule's correlation
fields, and the group part of ``loopd show``'s story."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from loopd.api.correlation import correlation_of, group_view
from loopd.api.decisions import guarded
from loopd.config import load_config
from loopd.rules.model import Rule
from loopd.simulate.input import parse_event_file, read_events
from loopd.simulate.replay import Simulation
from loopd.store.base import Batch, DecisionQuery, DecisionRecord, IncidentRecord
from loopd.store.memory import MemoryStore
from loopd.story import Paint, Story
from loopd.ui.views import environment
from loopd.units import parse_time
from tests.integration.test_guards_daemon import am_alert, notification

T0 = 1_796_000_000.0  # 2026-11-30T...Z, any fixed instant

STORED = {  # the kv value the decision side writes under the incident's id (spec.md)
    "rule": "frontend-outage", "key": "frontend",
    "members": [
        {"key": "web-1", "time": T0, "last": T0 + 30.5,
         "event": {"id": "a1", "source": "alertmanager", "topic": "HostDown",
                   "key": "web-1", "time": T0, "data": {"status": "firing"}}},
        {"key": "web-2", "time": T0 + 1, "last": T0 + 1,
         "event": {"id": "a2", "source": "alertmanager", "topic": "HostDown",
                   "key": "web-2", "time": T0 + 1, "data": {}}},
    ],
    "inhibited": [{"rule": "restart-hung-host", "key": "web-2", "count": 3,
                   "first": T0 + 1, "last": T0 + 20.25, "event_id": "a7",
                   "source": "alertmanager", "firing": True}],
}


def test_a_stored_group_becomes_member_and_inhibited_rows_with_rfc3339_times() -> None:
    """The stored members value becomes the API's rows: members in order of arrival with
    first and last match as RFC 3339 and their first event's id and source, and the
    inhibited (rule, member) with its count and last time."""
    view = group_view(STORED)
    assert view["member_count"] == 2
    assert [(m["key"], m["event_id"], m["source"]) for m in view["members"]] == [
        ("web-1", "a1", "alertmanager"), ("web-2", "a2", "alertmanager")]
    first = view["members"][0]
    assert first["time"].endswith("Z") and parse_time(first["time"]) == pytest.approx(T0)
    assert parse_time(first["last"]) == pytest.approx(T0 + 30.5)
    (held,) = view["inhibited"]
    assert (held["rule"], held["key"], held["count"]) == ("restart-hung-host", "web-2", 3)
    assert parse_time(held["last"]) == pytest.approx(T0 + 20.25)
    assert set(held) == {"rule", "key", "count", "last"}  # the API's fields, no event data


def test_an_incident_without_members_has_empty_lists() -> None:
    """An incident with no stored members (an ordinary rule's) shows no members and no
    inhibited matches rather than failing."""
    assert group_view(None) == {"members": [], "member_count": 0, "inhibited": []}


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def _decision(n: int, outcome: str, reason: str | None) -> DecisionRecord:
    return DecisionRecord("alertmanager", f"e{n}", "restart-hung-host", f"web-{n % 7}",
                          outcome, reason, T0 + n)


async def test_the_guard_filter_pages_through_one_guards_suppressions(
        store: MemoryStore) -> None:
    """Reading the suppressions of one guard returns only those (newest first), a page at
    a time, each page's ``before`` leading to the next until the last one says none."""
    reasons = {0: "guard inhibited: web-0 is a member of group frontend",
               1: "guard group: 1 of 3 members within 2m (group frontend)",
               2: "throttled: once within 600s (12s left)"}
    rows = [_decision(n, "joined" if n % 5 == 4 else "suppressed",
                      None if n % 5 == 4 else reasons[n % 3]) for n in range(300)]
    await store.commit(Batch(decisions=rows))
    expected = [f"e{n}" for n in reversed(range(300)) if n % 5 != 4 and n % 3 == 0]
    got: list[str] = []
    before: int | None = None
    pages = 0
    while True:
        page, before = await guarded(store.decisions,
                                     DecisionQuery(limit=25, before=before), "inhibited",
                                     scan=120)
        got += [d.event_id for d in page]
        assert all(d.outcome == "suppressed" for d in page)
        pages += 1
        if before is None:
            break
        assert pages < 100, "the pages never end"
    assert got == expected


async def test_the_guard_filter_keeps_the_other_filters(store: MemoryStore) -> None:
    """The guard filter narrows the query's other filters (here a key), it does not
    replace them."""
    await store.commit(Batch(decisions=[
        _decision(n, "suppressed", "guard group: 2 of 3 members within 2m (group fe)")
        for n in range(30)]))
    page, after = await guarded(store.decisions, DecisionQuery(key="web-3", limit=100),
                                "group")
    assert [d.event_id for d in page] == [f"e{n}" for n in reversed(range(30)) if n % 7 == 3]
    assert after is None


def test_a_rules_correlation_lists_group_inhibits_absent_all_and_any() -> None:
    """Each correlation field of a rule is shown with durations in seconds; an ordinary
    rule has none."""
    group = Rule.model_validate({
        "name": "frontend-outage", "on": {"source": "alertmanager"},
        "group": {"by": "{{ inventory[key].group }}", "count": 3, "within": "2m"},
        "inhibits": ["restart-hung-host"], "run": {"action": "core.noop"}})
    assert correlation_of(group) == {
        "group": {"by": "{{ inventory[key].group }}", "count": 3, "within": 120.0},
        "inhibits": ["restart-hung-host"]}
    absent = Rule.model_validate({"name": "hb", "on": {"source": "telemetry"},
                                  "absent": "5m", "run": {"action": "core.noop"}})
    assert correlation_of(absent) == {"absent": 300.0}
    both = Rule.model_validate({
        "name": "disk-and-io", "within": "10m", "run": {"action": "core.noop"},
        "all": [{"on": {"source": "node", "topic": "metrics/{host}/disk_free"},
                 "if": "event.value < 0.1"},
                {"on": {"source": "node", "topic": "metrics/{host}/io_wait"}}]})
    assert correlation_of(both) == {"within": 600.0, "all": [
        {"source": "node", "topic": "metrics/{host}/disk_free", "match": {},
         "if": "event.value < 0.1"},
        {"source": "node", "topic": "metrics/{host}/io_wait", "match": {}, "if": None}]}
    either = Rule.model_validate({"name": "either", "run": {"action": "core.noop"},
                                  "any": [{"on": {"source": "a"}}]})
    assert correlation_of(either) == {"any": [
        {"source": "a", "topic": None, "match": {}, "if": None}]}
    plain = Rule.model_validate({"name": "plain", "run": {"action": "core.noop"}})
    assert correlation_of(plain) is None


def test_loopd_show_lists_the_members_and_the_matches_held_back() -> None:
    """The story of a group incident's run names the group and its member count, each
    member with when it first matched and its first event, and each inhibited
    (rule, member) with its count."""
    run = {"id": "r1", "status": "succeeded", "workflow": "netdev.check_uplink",
           "rule": "frontend-outage", "key": "frontend", "created": T0 + 2,
           "group": {"rule": "frontend-outage", "key": "frontend", **group_view(STORED)}}
    lines = Story(Paint(False), lambda _: None).lines(run)
    text = "\n".join(lines)
    assert "group    frontend: 2 members" in lines
    member_lines = [line for line in lines if "first event" in line]
    assert len(member_lines) == 2
    assert "web-1" in member_lines[0] and "alertmanager/a1" in member_lines[0]
    assert "(last " in member_lines[0] and "(last " not in member_lines[1]
    assert "web-2" in member_lines[1] and "alertmanager/a2" in member_lines[1]
    assert "restart-hung-host  web-2  x3" in text


def test_the_incident_list_names_a_large_groups_first_members_and_how_many_more() -> None:
    """A group of 60 members shows as "frontend: 60 members" with the first 50 members
    in order of arrival and a line saying 10 more are listed by the API."""
    members = [{"key": f"web-{i}", "time": T0 + i, "last": T0 + i,
                "event": {"id": f"a{i}", "source": "alertmanager"}} for i in range(60)]
    incident = IncidentRecord("i1", "frontend-outage", "frontend", "open", T0 + 2)
    html = environment().get_template("_incidents.html").render(
        incidents=[incident], runs_of={}, waiting=0, now=T0 + 100, shown=50,
        groups={"i1": group_view({"rule": "frontend-outage", "key": "frontend",
                                  "members": members, "inhibited": []})})
    assert "frontend: 60 members" in html
    shown = [part.split('"')[0] for part in html.split('tr class="member" data-member="')[1:]]
    assert shown == [f"web-{i}" for i in range(50)]
    assert "and 10 more members" in html and "/v1/incidents/i1" in html


# -- the README's example ------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
README_INVENTORY = """\
entities:
  web-1: {group: frontend, uplink: sw-3, address: 127.0.0.1}
  web-2: {group: frontend, uplink: sw-3, address: 127.0.0.1}
  web-3: {group: frontend, uplink: sw-3, address: 127.0.0.1}
  sw-3: {address: 127.0.0.1}
"""


def readme_rules() -> str:
    """The first YAML block of the README's Correlation section, as written there."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Correlation"):]
    start = section.index("```yaml\n") + len("```yaml\n")
    return section[start:section.index("```\n", start)]


async def test_the_readme_correlation_rules_run_with_the_shipped_packs(
        tmp_path: Path) -> None:
    """The README's correlation rules load with the shipped packs, and three hosts of
    one group down together start one ``netdev.check_uplink`` run whose ticket names
    the group's members in order of arrival, the third host's restart held back."""
    shutil.copytree(REPO / "packs", tmp_path / "packs")
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "correlation.yaml").write_text(readme_rules())
    (tmp_path / "inventory.yaml").write_text(README_INVENTORY)
    (tmp_path / "loopd.yaml").write_text(
        "sources: [{name: alertmanager, type: alertmanager}, {name: telemetry, type: webhook},"
        " {name: node, type: webhook}]\nrules: [rules]\npacks: [packs]\n"
        "inventory: inventory.yaml\n"
        "pack_config: {servicenow: {instance: 'https://example.service-now.com'}}\n")
    t0 = time.time() - 3600
    hosts = ["web-1", "web-2", "web-3"]
    recording = tmp_path / "alerts.jsonl"
    recording.write_bytes(b"".join(orjson.dumps(notification(am_alert(h, starts=t0 + i)))
                                   + b"\n" for i, h in enumerate(hosts)))
    async with Simulation(load_config(tmp_path / "loopd.yaml")) as sim:
        assert [str(e) for e in (*sim.registry.errors, *sim.ruleset.errors)] == []
        report = await sim.replay(read_events([parse_event_file(str(recording))]))
        runs = await sim.store.list_runs(limit=100)
        (uplink,) = [r for r in runs if r.target == "netdev.check_uplink"]
        steps = {s.task: s for s in await sim.store.steps(uplink.id)}
    assert (uplink.rule, uplink.key, uplink.input["device"]) == (
        "frontend-outage", "frontend", "sw-3")
    assert [m["key"] for m in uplink.input["members"]] == hosts
    ticket = steps["ticket"]
    assert ticket.input["short_description"].startswith("3 hosts of frontend down together")
    assert ticket.input["work_notes"].endswith(": " + ", ".join(hosts))
    by_rule = report.data["rules"]["by_rule"]
    assert by_rule["restart-hung-host"]["suppressions"] == {"inhibited": 1}
    assert by_rule["frontend-outage"]["suppressions"] == {"group": 2}


async def test_the_example_storm_gives_one_group_that_holds_the_restarts_back() -> None:
    """``examples/storm.jsonl`` replayed with ``examples/correlation`` (the README's rules)
    gives one frontend group of every frontend host in order of alerting, the host
    restarts held back from the third on, and a check_uplink run that ends 2 minutes
    after the first member's alert resolved; db-1, alone in its group, is restarted."""
    example = REPO / "examples" / "correlation"
    rules = (example / "rules" / "correlation.yaml").read_text()
    assert readme_rules() in rules, "the example's rules are the README's"
    payloads = [orjson.loads(line) for line in
                (REPO / "examples" / "storm.jsonl").read_text().splitlines()]
    alerts = [a for p in payloads for a in p["alerts"]]
    firing = sorted((parse_time(a["startsAt"]), a["labels"]["instance"]) for a in alerts
                    if a["status"] == "firing")
    web = [host for _, host in firing if host.startswith("web-")]
    back = min(parse_time(a["endsAt"]) for a in alerts
               if a["status"] == "resolved" and a["labels"]["instance"] == web[0])
    async with Simulation(load_config(example / "loopd.yaml")) as sim:
        report = await sim.replay(read_events([parse_event_file(
            str(REPO / "examples" / "storm.jsonl"))]))
        runs = await sim.store.list_runs(limit=100)
    (group,) = report.data["groups"]
    assert [m["key"] for m in group["members"]] == web
    assert [(i["key"], i["count"]) for i in group["inhibited"]] == [(h, 1) for h in web[2:]]
    (uplink,) = [r for r in runs if r.target == "netdev.check_uplink"]
    assert uplink.outcome == "done" and uplink.finished is not None
    assert uplink.finished == pytest.approx(back + 120)  # settle: 2m after the first is back
    restarted = sorted(r.key or "" for r in runs if r.rule == "restart-hung-host")
    assert restarted == sorted(["db-1", *web[:2]])
