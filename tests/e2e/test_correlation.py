"""Correlation (issue 14) in the real daemon: an alert storm grouped into one incident per
group with its host rule inhibited (and ``loopd simulate`` agreeing), absence on a real
MQTT stream, and ``all`` across an HTTP source and an MQTT source.

Every expected result is computed in the test from what it sent (tests/correlation_data.py
for the storm), never read back from loopd first."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from tests.correlation_data import GROUP_ALERT, Expected, Storm, expect, storm
from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, LoopdProcess, eventually
from tests.servers.mqtt import MqttBroker

pytestmark = pytest.mark.e2e

LOOPD = Path(sys.executable).parent / "loopd"
GROUP_RULE = "group-outage"
HOST_RULE = "restart-hung-host"
COUNT = 5
WITHIN = 120.0

OUTAGE_WORKFLOW = """\
input: [group, members]
tasks:
  announce:
    action: core.log
    input: {message: "outage of {{ ctx.group }}"}
    next: wait
  wait:   # holds the group incident open for the whole test
    confirm:
      event: {source: alertmanager, match: {status: resolved, labels.alertname: SwitchDown}}
      within: 10m
"""


def storm_config(config: Config, data: Storm) -> None:
    config.sources = [{"name": "alertmanager", "type": "alertmanager"}]
    config.entities = data.entities()
    config.add_pack("corr", {"pack.yaml": "name: corr\nactions: {}\n",
                             "workflows/outage.yaml": OUTAGE_WORKFLOW})
    config.rules = {"storm.yaml": [
        {"name": GROUP_RULE,
         "on": {"source": "alertmanager",
                "match": {"status": "firing", "labels.alertname": GROUP_ALERT}},
         "key": "{{ event.labels.instance }}",
         "group": {"by": "{{ inventory[key].group }}", "count": COUNT, "within": "2m"},
         "inhibits": [HOST_RULE],
         "run": {"workflow": "corr.outage",
                 "input": {"group": "{{ key }}", "members": "{{ members }}"}}},
        {"name": HOST_RULE,
         "on": {"source": "alertmanager", "match": {"status": "firing"}},
         "if": "event.labels.severity == 'critical'",
         "key": "{{ event.labels.instance }}",
         "throttle": {"once_within": "10m"},
         "run": {"action": "core.log",
                 "input": {"message": "restart {{ key }} ({{ event.labels.alertname }})"}}},
    ]}


async def all_decisions(daemon: LoopdProcess, **query: str) -> list[dict[str, Any]]:
    """Every decision matching ``query`` (GET /v1/decisions, all pages), oldest first."""
    path: str | None = "/v1/decisions?" + "&".join(
        f"{k}={v}" for k, v in {**query, "limit": "1000"}.items())
    out: list[dict[str, Any]] = []
    while path is not None:
        page = await daemon.get(path)
        out.extend(page["decisions"])
        path = page["next"]
    return sorted(out, key=lambda d: int(d["seq"]))


async def simulate_cli(config: Config, events: Path) -> dict[str, Any]:
    """``loopd simulate`` as a user runs it; its JSON report."""
    report = config.root / "report.json"
    proc = await asyncio.create_subprocess_exec(
        str(LOOPD), "simulate", "-c", str(config.path), "--events", str(events),
        "--report", str(report), "--no-progress", cwd=config.root,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode() + out.decode()
    answer: dict[str, Any] = orjson.loads(report.read_bytes())
    return answer


async def test_an_alert_storm_becomes_one_incident_per_group_with_its_hosts_inhibited(
        config: Config, loopd_factory: Factory) -> None:
    """1,000 alerts for 50 hosts in 3 inventory groups, posted in a burst: each group that
    crossed the count has exactly one incident with the members in order of arrival, the
    host rule's matches for its members are suppressed as inhibited (and only those),
    every host remediated is remediated by one run whose action ran once, and ``loopd
    simulate`` on the same alerts opens the same groups with the same members and
    inhibits as many matches."""
    data = storm(float(int(time.time())))
    want = expect(data.alerts, data.groups, count=COUNT, within=WITHIN)
    # a meaningful storm: two groups cross, one does not; members acted on before their
    # group opened, and inhibited after
    assert len(want.members) == 2 and len(want.below) == 1
    assert want.inhibited and want.remediated & {m for ms in want.members.values() for m in ms}
    storm_config(config, data)
    daemon = loopd_factory(config)
    await daemon.start()

    for payload in data.notifications():  # each answer comes once its alerts are decided
        answer = await daemon.post("/v1/alertmanager", payload)
        assert (answer["accepted"], answer["rejected"]) == (len(payload["alerts"]), 0)

    incidents = [i for i in (await daemon.get("/v1/incidents?limit=1000"))["incidents"]
                 if i["rule"] == GROUP_RULE]
    assert sorted(i["key"] for i in incidents) == sorted(want.members)  # one per group
    first_hostdown = {a.host: a for a in reversed(data.alerts) if a.name == GROUP_ALERT}
    by_group: dict[str, str] = {}
    for incident in incidents:
        group = incident["key"]
        by_group[group] = incident["id"]
        assert incident["status"] == "open"
        story = await daemon.get(f"/v1/incidents/{incident['id']}")
        assert [m["key"] for m in story["members"]] == want.members[group]
        assert [m["event_id"] for m in story["members"]] == [
            first_hostdown[m].event_id for m in want.members[group]]
        assert {m["source"] for m in story["members"]} == {"alertmanager"}
        inhibited = Counter(a.host for a in want.inhibited if data.groups[a.host] == group)
        assert {i["key"]: i["count"] for i in story["inhibited"]} == dict(inhibited)
        assert {i["rule"] for i in story["inhibited"]} == {HOST_RULE}

    await check_group_decisions(daemon, want, by_group)
    await check_host_decisions(daemon, data, want, by_group)
    await check_runs_acted_once(daemon, want)

    report = await simulate_cli(config, data.write_jsonl(config.root / "storm.jsonl"))
    check_simulate_report(report, want)
    await daemon.stop()


async def check_group_decisions(daemon: LoopdProcess, want: Expected,
                                by_group: dict[str, str]) -> None:
    decided = await all_decisions(daemon, rule=GROUP_RULE)
    outcomes = Counter(d["outcome"] for d in decided)
    assert outcomes == Counter(run_created=len(want.members),
                               suppressed=len(want.below_count), joined=len(want.joined))
    assert {d["event"]: d["reason"] for d in decided if d["outcome"] == "joined"} == want.joined
    opened = {d["event"]: d for d in decided if d["outcome"] == "run_created"}
    assert set(opened) == {a.event_id for a in want.opened_by.values()}
    for group, alert in want.opened_by.items():
        assert (opened[alert.event_id]["key"], opened[alert.event_id]["incident"]) == (
            group, by_group[group])
    below = {d["event"]: d for d in decided if d["outcome"] == "suppressed"}
    assert {d["guard"] for d in below.values()} == {"group"}
    assert {e: (d["key"], d["reason"]) for e, d in below.items()} == {
        e: (g, f"guard group: {n} of {COUNT} members within {WITHIN:g}s (group {g}, member "
               f"{m})") for e, (g, m, n) in want.below_count.items()}


async def check_host_decisions(daemon: LoopdProcess, data: Storm, want: Expected,
                               by_group: dict[str, str]) -> None:
    suppressed = await all_decisions(daemon, rule=HOST_RULE, outcome="suppressed")
    inhibited = [d for d in suppressed if d["guard"] == "inhibited"]
    assert sorted(d["event"] for d in inhibited) == sorted(a.event_id for a in want.inhibited)
    for d in inhibited:
        group = data.groups[d["key"]]
        assert d["reason"] == (f"guard inhibited: {d['key']} is a member of group {group} of "
                               f"{GROUP_RULE} (incident {by_group[group]})")
    # the rest were throttled: the one run per host happened before
    assert {d["guard"] for d in suppressed if d["guard"] != "inhibited"} <= {"throttle"}
    decided = await all_decisions(daemon, rule=HOST_RULE)
    assert len(decided) == want.host_matches  # every match decided once


async def check_runs_acted_once(daemon: LoopdProcess, want: Expected) -> None:
    runs = await daemon.wait_runs(len(want.remediated), rule=HOST_RULE, status="succeeded")
    host_runs = await daemon.runs(rule=HOST_RULE)
    assert len(host_runs) == len(runs)  # none still running, none failed
    assert sorted(r["key"] for r in host_runs) == sorted(want.remediated)  # one per host
    group_runs = await daemon.runs(rule=GROUP_RULE)
    assert sorted(r["key"] for r in group_runs) == sorted(want.members)
    for run in group_runs:
        story = await daemon.wait_run(run["id"], lambda s: len(s["steps"]) >= 1)
        members = story["input"]["members"]
        assert [m["key"] for m in members] == want.opening[run["key"]]
        assert all(m["entity"]["group"] == run["key"] for m in members)
        assert [m["event"]["id"] for m in members][-1] == want.opened_by[run["key"]].event_id
    executed: Counter[str] = Counter()
    for line in daemon.log_lines():
        event = str(line.get("event", ""))
        if event.startswith(("restart ", "outage of ")) and "run" in line:
            executed[line["run"]] += 1
    assert set(executed) == {r["id"] for r in host_runs + group_runs}
    assert set(executed.values()) == {1}


def check_simulate_report(report: dict[str, Any], want: Expected) -> None:
    """The simulate report's group incidents, members and inhibited count."""
    groups = [g for g in report["groups"] if g["rule"] == GROUP_RULE]
    assert sorted(g["key"] for g in groups) == sorted(want.members)  # one incident each
    for group in groups:
        key = group["key"]
        assert [m["key"] for m in group["members"]] == want.members[key]
        inhibited = Counter(a.host for a in want.inhibited if a.host in want.members[key])
        assert {i["key"]: i["count"] for i in group["inhibited"]} == dict(inhibited)
        assert group["inhibited_matches"] == inhibited.total()
    assert report["suppressions"]["by_guard"]["inhibited"] == len(want.inhibited)
    by_rule = report["rules"]["by_rule"]
    # the replay ends the group runs (their confirmation times out), so the groups close
    # and their inhibited members are decided again: once each, remediated unless throttled
    assert by_rule[HOST_RULE]["decisions"]["run_created"] == len(want.remediated) + len(
        want.after_runs())
    assert sum(by_rule[HOST_RULE]["decisions"].values()) == want.host_matches + len(
        want.after_close())
    assert by_rule[GROUP_RULE]["decisions"]["run_created"] == len(want.members)


# -- absence on MQTT -------------------------------------------------------------------------


@dataclass
class Heartbeats:
    """Publishes ``{"id": "hb-<host>-<n>"}`` on ``heartbeat/<host>`` every 0.2 s for each
    host in ``beating``; ``last`` is the id last published per host."""

    client: aiomqtt.Client
    beating: set[str]
    last: dict[str, str] = field(default_factory=dict)
    sent: int = 0

    async def run(self) -> None:
        while True:
            for host in sorted(self.beating):
                if host not in self.beating:  # stopped while the one before was sent
                    continue
                self.sent += 1
                ident = self.last[host] = f"hb-{host}-{self.sent}"  # before it goes out
                await self.client.publish(f"heartbeat/{host}",
                                          orjson.dumps({"id": ident, "data": {"up": 1}}), qos=1)
            await asyncio.sleep(0.2)  # the heartbeat period, not a wait for loopd

    def stop(self, host: str) -> str:
        """Stop ``host``'s heartbeats; the id of its last one."""
        self.beating.discard(host)
        return self.last[host]


@contextlib.asynccontextmanager
async def heartbeats(broker: MqttBroker, *hosts: str) -> AsyncIterator[Heartbeats]:
    async with aiomqtt.Client(broker.host, broker.port, username=broker.username,
                              identifier=None, timeout=10) as client:
        beats = Heartbeats(client, set(hosts))
        task = asyncio.create_task(beats.run())
        try:
            yield beats
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def rows(daemon: LoopdProcess, rule: str) -> list[tuple[str, str, str, str]]:
    """(key, event id, source, outcome) of a rule's decisions, in order."""
    return [(str(k), str(e), str(s), str(o)) for k, e, s, o in daemon.store_query(
        "SELECT key, event_id, source, outcome FROM decisions WHERE rule=? ORDER BY seq",
        (rule,))]


@pytest.mark.mqtt
async def test_absence_fires_once_per_silence_on_a_real_mqtt_stream(
        mqtt_broker: MqttBroker, config: Config, loopd_factory: Factory) -> None:
    """With heartbeats every 0.2 s and ``absent: 2s``, a host that stops fires the rule once
    (one run, for its last heartbeat's id + ``~absent``) and not again while silent; after
    it beats again and stops again it fires a second time; the host that keeps beating
    never fires."""
    config.sources = [{"name": "telemetry", "type": "mqtt", "host": mqtt_broker.host,
                       "port": mqtt_broker.port, "topics": ["heartbeat/#"], "qos": 1,
                       "username": mqtt_broker.username}]
    config.rules = {"beat.yaml": [{
        "name": "heartbeat-missing",
        "on": {"source": "telemetry", "topic": "heartbeat/{host}"},
        "key": "{{ vars.host }}", "absent": "2s",
        "run": {"action": "core.log", "input": {"message": "no heartbeat from {{ key }}"}},
    }]}
    daemon = loopd_factory(config)
    await daemon.start()
    async with heartbeats(mqtt_broker, "h1", "h2") as beats:
        await eventually(lambda: beats.sent >= 10, "ten heartbeats published")
        last = beats.stop("h1")
        await eventually(lambda: len(rows(daemon, "heartbeat-missing")) >= 1,
                         "h1's silence to fire", timeout=20)
        fired_at = time.monotonic()
        assert rows(daemon, "heartbeat-missing") == [
            ("h1", f"{last}~absent", "telemetry", "run_created")]
        # silent for another absence period and more: no second firing
        await eventually(lambda: time.monotonic() - fired_at > 2.5, "2.5 s more of silence")
        assert len(rows(daemon, "heartbeat-missing")) == 1

        beats.beating.add("h1")
        sent = beats.sent
        await eventually(lambda: beats.sent >= sent + 10, "h1 beating again")
        again = beats.stop("h1")
        await eventually(lambda: len(rows(daemon, "heartbeat-missing")) >= 2,
                         "h1's second silence to fire", timeout=20)
        assert rows(daemon, "heartbeat-missing") == [
            ("h1", f"{last}~absent", "telemetry", "run_created"),
            ("h1", f"{again}~absent", "telemetry", "run_created")]
        # checked while h2 still beats (once it stops, its own silence would fire)
        runs = await daemon.wait_runs(2, status="succeeded")
        assert [r["key"] for r in runs] == ["h1", "h1"]
        stories = [await daemon.run(r["id"]) for r in runs]
        assert [s["steps"][0]["output"] for s in stories] == [
            {"message": "no heartbeat from h1"}] * 2
        # the last heartbeat before each silence is the run's event
        assert sorted((s["trigger"]["id"], s["trigger"]["topic"], s["trigger"]["data"])
                      for s in stories) == sorted(
            (f"{ident}~absent", "heartbeat/h1", {"up": 1}) for ident in (last, again))
        assert all(k != "h2" for k, *_ in rows(daemon, "heartbeat-missing"))
    await daemon.stop()


# -- all across two sources ------------------------------------------------------------------


@pytest.mark.mqtt
async def test_all_across_an_http_source_and_an_mqtt_source_fires_only_within_the_window(
        mqtt_broker: MqttBroker, config: Config, loopd_factory: Factory) -> None:
    """An ``all`` rule over a disk condition posted to ``POST /v1/events`` and an IO
    condition on MQTT: one condition alone is suppressed ``guard all``; both within the
    window start one run; both further apart than ``within`` start none."""
    config.sources = [{"name": "node", "type": "webhook"},
                      {"name": "telemetry", "type": "mqtt", "host": mqtt_broker.host,
                       "port": mqtt_broker.port, "topics": ["metrics/#"], "qos": 1,
                       "username": mqtt_broker.username}]
    config.rules = {"all.yaml": [{
        "name": "disk-and-io",
        "all": [{"on": {"source": "node", "topic": "metrics/{host}/disk_free"},
                 "if": "event.value < 0.1"},
                {"on": {"source": "telemetry", "topic": "metrics/{host}/io_wait"},
                 "if": "event.value > 0.3"}],
        "key": "{{ vars.host }}", "within": "2s",
        "run": {"action": "core.log", "input": {"message": "{{ key }}: disk full and IO"}},
    }]}
    daemon = loopd_factory(config)
    await daemon.start()
    # connected once, so that an IO message goes out as soon as its disk event is decided
    client = aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, identifier=None,
                            username=mqtt_broker.username, timeout=10)
    async with client:
        await all_cases(daemon, client)
    await daemon.stop()


async def all_cases(daemon: LoopdProcess, client: aiomqtt.Client) -> None:
    async def disk(host: str) -> None:
        await daemon.post("/v1/events/node", {"id": f"disk-{host}", "topic":
                                              f"metrics/{host}/disk_free",
                                              "data": {"value": 0.05}})

    async def io(host: str) -> None:
        await client.publish(f"metrics/{host}/io_wait", orjson.dumps(
            {"id": f"io-{host}", "data": {"value": 0.5}}), qos=1)

    def outcome(event_id: str) -> tuple[str, str] | None:
        found = daemon.store_query("SELECT outcome, reason FROM decisions WHERE event_id=?",
                                   (event_id,))
        return (str(found[0][0]), str(found[0][1])) if found else None

    await disk("far")  # its IO comes later than the window
    far_at = time.time()
    await disk("alone")
    await disk("both")
    await io("both")
    await eventually(lambda: outcome("io-both") is not None, "the IO event of 'both' decided")
    def one_of_two(event_id: str) -> bool:
        found = outcome(event_id)
        return found is not None and found[0] == "suppressed" and found[1].startswith(
            "guard all: 1 of 2 conditions within 2s")

    assert one_of_two("disk-far") and one_of_two("disk-alone") and one_of_two("disk-both")
    both = outcome("io-both")
    assert both is not None and both[0] == "run_created"

    await eventually(lambda: time.time() - far_at > 2.5, "the window of 'far' to pass")
    await io("far")
    await eventually(lambda: outcome("io-far") is not None, "the IO event of 'far' decided")
    assert one_of_two("io-far")
    decided = await all_decisions(daemon, rule="disk-and-io", outcome="suppressed")
    assert {d["guard"] for d in decided} == {"all"} and len(decided) == 4
    (run,) = await daemon.wait_runs(1, status="succeeded")
    assert run["key"] == "both"
    assert (await daemon.run(run["id"]))["steps"][0]["output"] == {
        "message": "both: disk full and IO"}
    assert len(await daemon.runs()) == 1
    # partial matches expire with their window, and their durable rows go with them: once
    # the window passed, the one left is far's IO (the completed one was cleared at once)
    assert [tuple(orjson.loads(k)) for (k,) in daemon.store_query(
        "SELECT key FROM kv WHERE namespace='correlation'")] == [("p", "disk-and-io", "far")]
