"""Correlation state across the daemon's life: the real daemon (tests/e2e/daemon.py) is
killed (``kill -9``) in the middle of a group window, an open group's inhibition, absence
timers and a partial ``all``, and started again on the same SQLite file: nothing is lost
and nothing fires twice. A reload that disables an absence rule disarms its timer."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.e2e.daemon import Config, LoopdProcess, eventually, store_query

pytestmark = pytest.mark.e2e

Daemons = Callable[[Config], LoopdProcess]


@pytest.fixture
async def daemon_of() -> AsyncIterator[Daemons]:
    """``daemon_of(config)``: a LoopdProcess, killed at teardown if still running."""
    made: list[LoopdProcess] = []

    def make(config: Config) -> LoopdProcess:
        made.append(LoopdProcess(config))
        return made[-1]

    try:
        yield make
    finally:
        for daemon in made:
            await daemon.close()


def decided(daemon: LoopdProcess, rule: str) -> list[tuple[str, str, str]]:
    """(event id, outcome, reason) of a rule's decisions, in order."""
    return [(str(e), str(o), str(r)) for e, o, r in daemon.store_query(
        "SELECT event_id, outcome, reason FROM decisions WHERE rule=? ORDER BY seq", (rule,))]


def executed(daemon: LoopdProcess, prefix: str) -> Counter[str]:
    """How often each run's action logged a message starting with ``prefix``, over every
    start of the daemon."""
    found: Counter[str] = Counter()
    for line in daemon.log_lines():
        if str(line.get("event", "")).startswith(prefix) and "run" in line:
            found[str(line["run"])] += 1
    return found


async def restart(daemon: LoopdProcess) -> None:
    await daemon.kill()
    await daemon.start()


def alert(name: str, host: str, status: str = "firing") -> dict[str, Any]:
    return {"version": "4", "status": status, "receiver": "loopd", "alerts": [{
        "status": status, "labels": {"alertname": name, "instance": host},
        "startsAt": "2026-12-01T20:00:00Z",
        "endsAt": "2026-12-01T20:05:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
        "fingerprint": f"{name}-{host}"}]}


def hostdown(host: str) -> dict[str, Any]:
    return alert("HostDown", host)


def group_rule(within: str = "5m", **extra: Any) -> dict[str, Any]:
    """``edge-outage``: HostDown members grouped by inventory group, 3 within ``within``."""
    return {"name": "edge-outage",
            "on": {"source": "alertmanager",
                   "match": {"status": "firing", "labels.alertname": "HostDown"}},
            "key": "{{ event.labels.instance }}",
            "group": {"by": "{{ inventory[key].group }}", "count": 3, "within": within},
            "run": {"action": "core.log", "input": {"message": "outage of {{ key }}"}},
            **extra}


def group_config(tmp_path: Path, *rules: dict[str, Any]) -> Config:
    config = Config(root=tmp_path)
    config.sources = [{"name": "alertmanager", "type": "alertmanager"}]
    config.entities = {h: {"group": "edge"} for h in ("edge-1", "edge-2", "edge-3")}
    config.rules = {"group.yaml": list(rules)}
    return config


async def test_a_group_window_survives_kill_9_and_opens_exactly_once(
        tmp_path: Path, daemon_of: Daemons) -> None:
    """Two of three members before a kill -9 still count after the restart: the third
    opens the group incident with all three members, once, and the same alerts sent again
    after another kill -9 are duplicates that open nothing."""
    daemon = daemon_of(group_config(tmp_path, group_rule()))
    await daemon.start()
    for host in ("edge-1", "edge-2"):
        await daemon.post("/v1/alertmanager", hostdown(host))
    await restart(daemon)
    await daemon.post("/v1/alertmanager", hostdown("edge-3"))
    rows = decided(daemon, "edge-outage")
    assert [(o, r) for _, o, r in rows[:2]] == [
        ("suppressed", "guard group: 1 of 3 members within 300s (group edge, member edge-1)"),
        ("suppressed", "guard group: 2 of 3 members within 300s (group edge, member edge-2)")]
    assert [o for _, o, _ in rows] == ["suppressed", "suppressed", "run_created"]
    (run,) = await daemon.wait_runs(1, status="succeeded")
    assert run["key"] == "edge"
    ((record,),) = daemon.store_query("SELECT value FROM kv WHERE namespace='members' AND "
                                      "key=?", (run["incident"],))
    assert [m["key"] for m in orjson.loads(record)["members"]] == ["edge-1", "edge-2", "edge-3"]

    await restart(daemon)
    for host in ("edge-1", "edge-2", "edge-3"):  # Alertmanager repeating itself
        answer = await daemon.post("/v1/alertmanager", hostdown(host))
        assert answer["duplicates"] == 1
    assert len(decided(daemon, "edge-outage")) == 3
    incidents = (await daemon.get("/v1/incidents?limit=100"))["incidents"]
    assert [(i["rule"], i["key"]) for i in incidents] == [("edge-outage", "edge")]
    assert executed(daemon, "outage of ") == Counter({run["id"]: 1})
    await daemon.stop()


def heartbeat_config(tmp_path: Path) -> Config:
    config = Config(root=tmp_path)
    config.sources = [{"name": "node", "type": "webhook"}]
    config.rules = {"beat.yaml": [
        {"name": name, "on": {"source": "node", "topic": "heartbeat/{host}"},
         "key": "{{ vars.host }}", "absent": after,
         "run": {"action": "core.log", "input": {"message": f"{name}: {{{{ key }}}}"}}}
        for name, after in (("beat-short", "1s"), ("beat-long", "5s"))]}
    return config


async def test_absence_timers_armed_before_kill_9_fire_once_after_the_restart(
        tmp_path: Path, daemon_of: Daemons) -> None:
    """Absence timers armed before a kill -9 fire after the restart, each once: the one
    whose due time passed while the daemon was down fires at start, the one due later fires
    at its time, and neither fires again after another kill -9."""
    daemon = daemon_of(heartbeat_config(tmp_path))
    await daemon.start()
    sent_at = time.time()  # the timers are armed after this, at the event's arrival
    await daemon.post("/v1/events/node", {"id": "beat-h1", "topic": "heartbeat/h1",
                                          "data": {"up": 1}})
    armed_by = time.time()
    await daemon.kill()
    assert decided(daemon, "beat-long") == []  # arming records no decision
    await eventually(lambda: time.time() - armed_by > 1.5, "beat-short's due time to pass")
    await daemon.start()
    await eventually(lambda: len(decided(daemon, "beat-long")) >= 1, "beat-long to fire")
    for rule in ("beat-short", "beat-long"):
        assert [(e, o) for e, o, _ in decided(daemon, rule)] == [
            ("beat-h1~absent", "run_created")]
    long_at = float(daemon.store_query(
        "SELECT time FROM decisions WHERE rule='beat-long'")[0][0])
    assert long_at >= sent_at + 5  # at its time, not at the restart
    # both runs end before the next kill -9: a core action still running at a crash is
    # run again after it (core is idempotent), which the count below would take for a
    # timer firing twice (seen in CI on a loaded machine: beat-long's run acted twice)
    await daemon.wait_runs(2, status="succeeded")

    await restart(daemon)
    # a timer of h2 armed and fired after this restart: any due timer of h1 had its turn
    await daemon.post("/v1/events/node", {"id": "beat-h2", "topic": "heartbeat/h2",
                                          "data": {"up": 1}})
    await eventually(lambda: any(e == "beat-h2~absent" for e, _, _ in
                                 decided(daemon, "beat-short")), "h2's beat-short to fire")
    assert [e for e, _, _ in decided(daemon, "beat-short")] == ["beat-h1~absent",
                                                               "beat-h2~absent"]
    assert [e for e, _, _ in decided(daemon, "beat-long")] == ["beat-h1~absent"]
    fired = {str(r) for (r,) in daemon.store_query(
        "SELECT run_id FROM decisions WHERE event_id LIKE '%~absent'")}
    await daemon.wait_runs(len(fired), status="succeeded")
    acted = executed(daemon, "beat-")
    assert len(fired) >= 3 and fired <= set(acted) and set(acted.values()) == {1}
    # a fired timer's row is gone with it: what is left armed is h2's beat-long (5 s)
    armed = {tuple(orjson.loads(k)) for (k,) in daemon.store_query(
        "SELECT key FROM kv WHERE namespace='correlation'")}
    assert armed <= {("a", "beat-long", "h2")}
    await daemon.stop()


async def test_a_partial_all_survives_kill_9_and_completes_after_the_restart(
        tmp_path: Path, daemon_of: Daemons) -> None:
    """The first condition of an ``all`` matched before a kill -9 completes with the second
    one after the restart: one run."""
    config = Config(root=tmp_path)
    config.sources = [{"name": "node", "type": "webhook"}]
    config.rules = {"all.yaml": [{
        "name": "disk-and-io",
        "all": [{"on": {"source": "node", "topic": "metrics/{host}/disk_free"},
                 "if": "event.value < 0.1"},
                {"on": {"source": "node", "topic": "metrics/{host}/io_wait"},
                 "if": "event.value > 0.3"}],
        "key": "{{ vars.host }}", "within": "5m",
        "run": {"action": "core.log", "input": {"message": "disk and io: {{ key }}"}},
    }]}
    daemon = daemon_of(config)
    await daemon.start()
    await daemon.post("/v1/events/node", {"id": "disk-1", "topic": "metrics/h1/disk_free",
                                          "data": {"value": 0.02}})
    ((event_id, outcome, reason),) = decided(daemon, "disk-and-io")
    assert (event_id, outcome) == ("disk-1", "suppressed")
    assert reason.startswith("guard all: 1 of 2 conditions within 300s")
    await restart(daemon)
    await daemon.post("/v1/events/node", {"id": "io-1", "topic": "metrics/h1/io_wait",
                                          "data": {"value": 0.9}})
    assert [(e, o) for e, o, _ in decided(daemon, "disk-and-io")] == [
        ("disk-1", "suppressed"), ("io-1", "run_created")]
    (run,) = await daemon.wait_runs(1, status="succeeded")
    assert run["key"] == "h1"
    assert executed(daemon, "disk and io: ") == Counter({run["id"]: 1})
    await daemon.stop()


HOLD_UNTIL_SWITCH_UP = """\
input: [group, members]
tasks:
  wait:
    confirm:
      event: {source: alertmanager, match: {status: resolved, labels.alertname: SwitchDown}}
      within: 10m
"""


async def switch_up(daemon: LoopdProcess, incident: str) -> None:
    """Resolve SwitchDown until the group incident closes: a resumed run's confirm task
    waits again a moment after /readyz, and an event before that is not its evidence, so
    the switch's recovery is told again (a new alert each time) until it is heard."""
    def closed() -> bool:
        return daemon.store_query("SELECT status FROM incidents WHERE id=?",
                                  (incident,)) == [("closed",)]

    for n in range(20):
        payload = alert("SwitchDown", f"core-{n}", "resolved")
        await daemon.post("/v1/alertmanager", payload)
        with contextlib.suppress(AssertionError):
            await eventually(closed, "the group incident to close", timeout=1)
            return
    raise AssertionError("the group run never heard the switch come back")


async def test_an_open_group_keeps_inhibiting_after_kill_9_and_releases_its_members_once(
        tmp_path: Path, daemon_of: Daemons) -> None:
    """A group incident open before a kill -9 still inhibits its members' host alerts after
    the restart, under the same incident, and when it closes each member still firing is
    decided again once (``~after-<incident>``) and remediated; the one whose alert resolved
    meanwhile is not."""
    config = group_config(tmp_path, group_rule(inhibits=["edge-host"], run={
        "workflow": "corr.hold", "input": {"group": "{{ key }}", "members": "{{ members }}"}}), {
        "name": "edge-host",
        "on": {"source": "alertmanager",
               "match": {"status": "firing", "labels.alertname": "HostHung"}},
        "key": "{{ event.labels.instance }}",
        "run": {"action": "core.log", "input": {"message": "restart {{ key }}"}}})
    config.add_pack("corr", {"pack.yaml": "name: corr\nactions: {}\n",
                             "workflows/hold.yaml": HOLD_UNTIL_SWITCH_UP})
    daemon = daemon_of(config)
    await daemon.start()
    for host in ("edge-1", "edge-2", "edge-3"):
        await daemon.post("/v1/alertmanager", alert("HostDown", host))
    ((incident,),) = daemon.store_query(
        "SELECT id FROM incidents WHERE rule='edge-outage' AND status='open'")
    await daemon.post("/v1/alertmanager", alert("HostHung", "edge-1"))
    await restart(daemon)
    repeat = await daemon.post("/v1/alertmanager", alert("HostHung", "edge-1"))
    assert repeat["duplicates"] == 1  # Alertmanager repeating itself: not counted again
    await daemon.post("/v1/alertmanager", alert("HostHung", "edge-2"))
    await daemon.post("/v1/alertmanager", alert("HostHung", "edge-3"))
    await daemon.post("/v1/alertmanager", alert("HostHung", "edge-3", "resolved"))
    held = [(e, o, r) for e, o, r in decided(daemon, "edge-host")]
    assert [(e.split(":")[0], o) for e, o, _ in held] == [
        ("HostHung-edge-1", "suppressed"), ("HostHung-edge-2", "suppressed"),
        ("HostHung-edge-3", "suppressed")]
    assert {r for _, _, r in held} == {
        f"guard inhibited: edge-{n} is a member of group edge of edge-outage "
        f"(incident {incident})" for n in (1, 2, 3)}

    ((stored,),) = daemon.store_query(
        "SELECT value FROM kv WHERE namespace='members' AND key=?", (incident,))
    assert {(i["rule"], i["key"], i["count"], i["firing"])
            for i in orjson.loads(stored)["inhibited"]} == {
        ("edge-host", "edge-1", 1, True), ("edge-host", "edge-2", 1, True),
        ("edge-host", "edge-3", 1, False)}

    await restart(daemon)  # the group run is resumed, waiting for the switch
    await switch_up(daemon, incident)
    await eventually(lambda: len(decided(daemon, "edge-host")) >= 5,
                     "the members still firing decided again")
    again = decided(daemon, "edge-host")[3:]
    assert sorted((e.split("~")[0].split(":")[0], e.rpartition("~")[2], o)
                  for e, o, _ in again) == [
        ("HostHung-edge-1", f"after-{incident}", "run_created"),
        ("HostHung-edge-2", f"after-{incident}", "run_created")]
    runs = await daemon.wait_runs(2, rule="edge-host", status="succeeded")
    assert sorted(r["key"] for r in runs) == ["edge-1", "edge-2"]
    assert sorted(executed(daemon, "restart ").values()) == [1, 1]
    await daemon.stop()


async def test_disabling_an_absence_rule_by_reload_disarms_its_timer(
        tmp_path: Path, daemon_of: Daemons) -> None:
    """``enabled: false`` (``POST /v1/reload``) disarms an armed absence timer: it never
    fires, while the same timer of a rule left enabled does; enabled again, the rule
    re-arms on its next matching event and fires once."""
    config = Config(root=tmp_path)
    config.sources = [{"name": "node", "type": "webhook"}]

    def rules(enabled: bool) -> list[dict[str, Any]]:
        return [{"name": name, "on": {"source": "node", "topic": "heartbeat/{host}"},
                 "key": "{{ vars.host }}", "absent": "3s", "enabled": on,
                 "run": {"action": "core.log", "input": {"message": f"{name} {{{{ key }}}}"}}}
                for name, on in (("beat-kept", True), ("beat-toggled", enabled))]

    config.rules = {"beat.yaml": rules(True)}
    daemon = daemon_of(config)
    await daemon.start()
    await daemon.post("/v1/events/node", {"id": "b-1", "topic": "heartbeat/h1",
                                          "data": {"up": 1}})
    config.write_rules("beat.yaml", rules(False))
    await daemon.post("/v1/reload")
    await eventually(lambda: len(decided(daemon, "beat-kept")) >= 1, "beat-kept to fire")
    assert decided(daemon, "beat-toggled") == []

    config.write_rules("beat.yaml", rules(True))
    await daemon.post("/v1/reload")
    await daemon.post("/v1/events/node", {"id": "b-2", "topic": "heartbeat/h1",
                                          "data": {"up": 1}})
    await eventually(lambda: len(decided(daemon, "beat-toggled")) >= 1, "beat-toggled to fire")
    assert [e for e, _, _ in decided(daemon, "beat-toggled")] == ["b-2~absent"]
    await eventually(lambda: len(decided(daemon, "beat-kept")) >= 2, "beat-kept to fire again")
    assert [e for e, _, _ in decided(daemon, "beat-kept")] == ["b-1~absent", "b-2~absent"]
    assert [e for e, _, _ in decided(daemon, "beat-toggled")] == ["b-2~absent"]
    await daemon.stop()


async def test_group_members_whose_window_passed_while_down_no_longer_count(
        tmp_path: Path, daemon_of: Daemons) -> None:
    """Members rebuilt from the store after a kill -9 still expire with their window: two
    members whose 1 s window passed while the daemon was down leave the third alone."""
    daemon = daemon_of(group_config(tmp_path, group_rule("1s")))
    await daemon.start()
    for host in ("edge-1", "edge-2"):
        await daemon.post("/v1/alertmanager", hostdown(host))
    posted = time.time()
    await daemon.kill()
    await eventually(lambda: time.time() - posted > 1.5, "the window to pass")
    await daemon.start()
    await daemon.post("/v1/alertmanager", hostdown("edge-3"))
    assert [(o, r) for _, o, r in decided(daemon, "edge-outage")][2:] == [
        ("suppressed", "guard group: 1 of 3 members within 1s (group edge, member edge-3)")]
    assert await daemon.runs() == []
    await daemon.stop()



def replicas(tmp_path: Path, rules: dict[str, list[dict[str, Any]]]
             ) -> tuple[LoopdProcess, LoopdProcess, Path]:
    """Two daemons (replicas ``one`` and ``two``, each its own folder and logs) on one
    SQLite store; the store's path."""
    shared = tmp_path / "shared.db"
    made = []
    for name in ("one", "two"):
        config = Config(root=tmp_path / name, extra={"store": {"path": str(shared)}})
        config.sources = [{"name": "node", "type": "webhook"},
                          {"name": "alertmanager", "type": "alertmanager"}]
        config.entities = {f"{g}-{n}": {"group": g} for g in ("edge", "core") for n in (1, 2, 3)}
        config.rules = rules
        made.append(LoopdProcess(config, {"LOOPD_REPLICA": name}))
    return made[0], made[1], shared


def decided_in(store: Path, rule: str) -> list[tuple[str, str]]:
    return [(str(e), str(o)) for e, o in store_query(
        store, "SELECT event_id, outcome FROM decisions WHERE rule=? ORDER BY seq", (rule,))]


async def test_group_members_posted_to_two_replicas_open_one_group_with_all_of_them(
        tmp_path: Path) -> None:
    """Two daemons on one store, members posted to either: three members open one group
    incident with all three, once, whether the replicas polled each other's state in
    between (store.poll: the third member's event opens it) or the members came back to
    back (the store, not a replica's memory, knows the members: ``<id>~group`` opens it)."""
    one, two, store = replicas(tmp_path, {"group.yaml": [group_rule()]})
    try:
        await one.start()
        await two.start()
        await one.post("/v1/alertmanager", hostdown("edge-1"))
        await two.post("/v1/alertmanager", hostdown("edge-2"))
        posted = time.time()  # two polls of the replicas (store.poll: 1 s)
        await eventually(lambda: time.time() - posted > 2.5, "the replicas to poll")
        await one.post("/v1/alertmanager", hostdown("edge-3"))
        assert [o for _, o in decided_in(store, "edge-outage")] == [
            "suppressed", "suppressed", "run_created"]
        ((incident,),) = store_query(store, "SELECT id FROM incidents")
        ((stored,),) = store_query(
            store, "SELECT value FROM kv WHERE namespace='members' AND key=?", (incident,))
        assert [m["key"] for m in orjson.loads(stored)["members"]] == [
            "edge-1", "edge-2", "edge-3"]

        for daemon, host in ((one, "core-1"), (two, "core-2"), (one, "core-3")):
            await daemon.post("/v1/alertmanager", hostdown(host))
        # back to back, neither replica knew all three: the one that wrote the third reads
        # the group back and opens it, for the newest member's event
        await eventually(lambda: len(decided_in(store, "edge-outage")) >= 7,
                         "the core group to open")
        core_3 = "HostDown-core-3:2026-12-01T20:00:00Z:firing"
        assert decided_in(store, "edge-outage")[3:] == [
            (f"HostDown-core-{n}:2026-12-01T20:00:00Z:firing", "suppressed") for n in (1, 2, 3)
        ] + [(f"{core_3}~group", "run_created")]
        incidents = dict(store_query(store, "SELECT key, id FROM incidents"))
        assert sorted(incidents) == ["core", "edge"]
        ((stored,),) = store_query(store, "SELECT value FROM kv WHERE namespace='members' "
                                   "AND key=?", (incidents["core"],))
        members = orjson.loads(stored)["members"]
        assert [m["time"] for m in members] == sorted(m["time"] for m in members), \
            f"members not in order of arrival: {[(m['key'], m['time']) for m in members]}"
        assert [m["key"] for m in members] == ["core-1", "core-2", "core-3"]
        await eventually(lambda: store_query(
            store, "SELECT COUNT(*) FROM runs WHERE status='succeeded'") == [(2,)], "2 runs")
        acted = executed(one, "outage of ") + executed(two, "outage of ")
        assert sorted(acted.values()) == [1, 1]
        await one.stop()
        await two.stop()
    finally:
        await one.close()
        await two.close()


async def test_an_absence_rearmed_on_the_other_replica_fires_once_and_both_keep_running(
        tmp_path: Path) -> None:
    """A key's heartbeats posted to one replica, then to the other: its absence fires once,
    for the last heartbeat, and both daemons keep running (the replica whose firing the
    store finds already decided takes it as a duplicate) and stop cleanly."""
    beat = heartbeat_config(tmp_path).rules["beat.yaml"][0]  # beat-short: absent 1s
    one, two, store = replicas(tmp_path, {"beat.yaml": [beat]})
    try:
        await one.start()
        await two.start()
        await one.post("/v1/events/node", {"id": "hb-1", "topic": "heartbeat/h1",
                                           "data": {"up": 1}})
        await two.post("/v1/events/node", {"id": "hb-2", "topic": "heartbeat/h1",
                                           "data": {"up": 1}})
        await eventually(lambda: len(decided_in(store, "beat-short")) >= 1, "the absence")
        await eventually(lambda: time.time() - float(store_query(
            store, "SELECT MAX(time) FROM decisions")[0][0]) > 1.5, "the other to try too")
        assert decided_in(store, "beat-short") == [("hb-2~absent", "run_created")]
        assert one.running and two.running, "a replica died:\n" + one.tail(30) + two.tail(30)
        await one.stop()
        await two.stop()
    finally:
        await one.close()
        await two.close()
