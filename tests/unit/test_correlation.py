"""Correlation in the engine on a real SQLite store: group, inhibits, absent, all, any, and
their state across a restart (a new Engine on the same file, loaded as the daemon does)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from loopd.catalog.inventory import Inventory
from loopd.decide.correlation import MEMBERS, NAMESPACE
from loopd.events import Delivery, Event
from loopd.rules.loader import RuleSet
from loopd.store.base import Batch, CommitResult, Store
from tests.servers import wait_until
from tests.unit.conftest import RulesFrom
from tests.unit.test_engine import Running, decisions, event_time, reasons, running


def alert(ident: str, host: str, *, at: float, name: str = "HostDown",
          status: str = "firing") -> Event:
    return Event(id=ident, source="alertmanager", topic="alerts", key=host, time=at,
                 data={"status": status, "labels": {"alertname": name, "instance": host},
                       "fingerprint": f"fp-{name}-{host}"})


def inventory(**groups: list[str]) -> Inventory:
    return Inventory({h: {"group": g} for g, hosts in groups.items() for h in hosts})


GROUP = """
rules:
  - name: outage
    on: {source: alertmanager, match: {status: firing, labels.alertname: HostDown}}
    group: {by: "{{ inventory[key].group }}", count: 3, within: 2m}
    inhibits: [restart-host]
    run: {action: core.noop, input: {host: "{{ key }}", value: "{{ members }}"}}
  - name: restart-host
    on: {source: alertmanager, match: {status: firing, labels.alertname: HostDown}}
    run: {action: core.noop, input: {host: "{{ key }}"}}
"""


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "loopd.db"


def outcome(db: Path, rule: str) -> list[tuple[str, str]]:
    return [(e, o) for e, r, o in decisions(db) if r == rule]


@pytest.fixture
def group_rules(rules_from: RulesFrom) -> RuleSet:
    rules = rules_from(GROUP)
    assert not rules.errors, rules.errors
    return rules


async def test_a_group_opens_at_its_count_and_inhibits_its_members(
        db: Path, group_rules: RuleSet) -> None:
    """Two members are held (guard group) while the host rule acts for them; the third
    opens one group incident whose input lists the members, and from then on the host
    rule's matches for members are inhibited; a fourth member joins."""
    inv = inventory(front=["w1", "w2", "w3", "w4"])
    t = 1_000_000.0
    async with running(db, group_rules, inventory=inv, **event_time()) as r:
        await r.feed(*(alert(f"a{i}", f"w{i}", at=t + i) for i in (1, 2, 3, 4)),
                     alert("a5", "w1", at=t + 5))
        group_run = next(run for run in r.runs if run.rule == "outage")
        members = await r.store.kv_get(MEMBERS, group_run.incident_id or "")
    assert outcome(db, "outage") == [("a1", "suppressed"), ("a2", "suppressed"),
                                     ("a3", "run_created"), ("a4", "joined"), ("a5", "joined")]
    assert outcome(db, "restart-host") == [("a1", "run_created"), ("a2", "run_created"),
                                           ("a3", "suppressed"), ("a4", "suppressed"),
                                           ("a5", "suppressed")]  # w1 is a member now
    assert group_run.key == "front"
    assert [m["key"] for m in group_run.input["value"]] == ["w1", "w2", "w3"]
    assert group_run.input["value"][0]["event"]["id"] == "a1"
    assert "guard group: 2 of 3 members within 120s (group front, member w2)" in reasons(db)
    assert any(x and x.startswith("guard inhibited: w3 is a member of group front of outage")
               for x in reasons(db))
    assert [m["key"] for m in members["members"]] == ["w1", "w2", "w3", "w4"]
    assert {(i["rule"], i["key"]) for i in members["inhibited"]} == {
        ("restart-host", "w1"), ("restart-host", "w3"), ("restart-host", "w4")}


async def test_members_older_than_the_window_do_not_count(
        db: Path, group_rules: RuleSet) -> None:
    """A member whose last match is older than ``within`` has left the group."""
    inv = inventory(front=["w1", "w2", "w3"])
    t = 1_000_000.0
    async with running(db, group_rules, inventory=inv, **event_time()) as r:
        await r.feed(alert("a1", "w1", at=t), alert("a2", "w2", at=t + 100),
                     alert("a3", "w3", at=t + 130), alert("a4", "w1", at=t + 140))
    assert outcome(db, "outage") == [("a1", "suppressed"), ("a2", "suppressed"),
                                     ("a3", "suppressed"), ("a4", "run_created")]


async def test_closing_the_group_decides_still_firing_members_again(
        db: Path, group_rules: RuleSet) -> None:
    """When the group incident closes, inhibition ends: an inhibited member whose alert
    did not resolve is decided again for the host rule; a resolved one is not."""
    inv = inventory(front=["w1", "w2", "w3", "w4"])
    t = time.time()
    async with running(db, group_rules, inventory=inv) as r:
        await r.feed(*(alert(f"a{i}", f"w{i}", at=t) for i in (1, 2, 3, 4)),
                     alert("r4", "w4", at=t, status="resolved"))
        group_run = next(run for run in r.runs if run.rule == "outage")
        await r.close_incident_of(group_run)
    assert ("a3~after-" + (group_run.incident_id or ""), "run_created") in outcome(
        db, "restart-host")
    assert not any(e.startswith("a4~after") for e, _ in outcome(db, "restart-host"))


async def test_a_partial_group_survives_a_restart_and_opens_once(
        db: Path, group_rules: RuleSet) -> None:
    """Members held before a restart still count after it; a redelivered member event
    is a duplicate, and the group opens exactly once."""
    inv = inventory(front=["w1", "w2", "w3"])
    t = 1_000_000.0
    async with running(db, group_rules, inventory=inv, **event_time()) as r:
        await r.feed(alert("a1", "w1", at=t), alert("a2", "w2", at=t + 1))
    async with running(db, group_rules, inventory=inv, **event_time()) as r:
        await r.feed(alert("a2", "w2", at=t + 1), alert("a3", "w3", at=t + 2))
    assert outcome(db, "outage") == [("a1", "suppressed"), ("a2", "suppressed"),
                                     ("a3", "run_created")]


ABSENT = """
rules:
  - name: heartbeat-missing
    on: {source: telemetry, topic: "heartbeat/{host}"}
    key: "{{ vars.host }}"
    absent: 5m
    run: {action: core.noop, input: {host: "{{ key }}"}}
"""


def beat(ident: str, host: str, at: float, **data: Any) -> Event:
    return Event(id=ident, source="telemetry", topic=f"heartbeat/{host}", data=data,
                 time=at)


async def test_an_absence_fires_once_per_silence_with_the_last_event(
        db: Path, rules_from: RulesFrom) -> None:
    """In event time, a key silent for ``absent`` fires once (the last event's id with
    ``~absent``) at the time it was due; the next event re-arms it; a resolved event
    disarms it."""
    t = 1_000_000.0
    rules = rules_from(ABSENT)
    async with running(db, rules, **event_time()) as r:
        await r.feed(beat("b1", "h1", t), beat("b2", "h1", t + 60), beat("c1", "h2", t + 61),
                     beat("c2", "h2", t + 62, status="resolved"),
                     beat("x", "h3", t + 400), beat("b3", "h1", t + 500),
                     beat("y", "h3", t + 1000))
    # h1 fires at t+360; h2 was disarmed; h3 fires at t+700; h1, silent again after
    # b3, fires at t+800 into its incident, still open
    assert outcome(db, "heartbeat-missing") == [
        ("b2~absent", "run_created"), ("x~absent", "run_created"), ("b3~absent", "joined")]
    assert [run.created for run in r.runs] == [t + 360, t + 700]


async def test_an_absence_armed_before_a_restart_fires_after_it_once(
        db: Path, rules_from: RulesFrom) -> None:
    """The timer is durable: a new engine on the store fires it when due, and a third
    engine after that does not fire it again."""
    rules = rules_from(ABSENT.replace("5m", "1s"))
    async with running(db, rules) as r:
        await r.feed(beat("b1", "h1", time.time()))
    async with running(db, rules) as r:
        await until("the absence fired after the restart", lambda: outcome(
            db, "heartbeat-missing") == [("b1~absent", "run_created")], r)
    async with running(db, rules) as r:
        await r.feed(beat("other", "h9", time.time()))
    assert outcome(db, "heartbeat-missing") == [("b1~absent", "run_created")]


async def _tick() -> None:
    await asyncio.sleep(0.05)  # the engine's own timer fires the absence; poll its result


ALL = """
rules:
  - name: disk-and-io
    all:
      - {on: {source: node, topic: "metrics/{host}/disk_free"}, if: "event.value < 0.1"}
      - {on: {source: node, topic: "metrics/{host}/io_wait"}, if: "event.value > 0.3"}
    key: "{{ vars.host }}"
    within: 10m
    run: {action: core.noop, input: {host: "{{ key }}", value: "{{ matched }}"}}
  - name: either
    any:
      - {on: {source: node, topic: "metrics/{host}/disk_free"}, if: "event.value < 0.1"}
      - {on: {source: node, topic: "metrics/{host}/+"}}
    key: "{{ vars.host }}"
    run: {action: core.noop, input: {host: "{{ key }}"}}
"""


def metric(ident: str, host: str, name: str, value: float, at: float) -> Event:
    return Event(id=ident, source="node", topic=f"metrics/{host}/{name}",
                 data={"value": value}, time=at)


async def test_all_needs_every_condition_within_the_window_and_any_decides_once(
        db: Path, rules_from: RulesFrom) -> None:
    """One condition alone is held (guard all); both within 10m fire once, with the
    matched events; both further apart than the window do not; an ``any`` rule decides
    an event once even when two of its conditions match it."""
    t = 1_000_000.0
    rules = rules_from(ALL)
    assert not rules.errors, rules.errors
    async with running(db, rules, **event_time()) as r:
        await r.feed(metric("d1", "h1", "disk_free", 0.05, t),
                     metric("i1", "h1", "io_wait", 0.5, t + 60),
                     metric("d2", "h2", "disk_free", 0.05, t + 100),
                     metric("i2", "h2", "io_wait", 0.5, t + 800))
    assert outcome(db, "disk-and-io") == [("d1", "suppressed"), ("i1", "run_created"),
                                          ("d2", "suppressed"), ("i2", "suppressed")]
    run = next(run for run in r.runs if run.rule == "disk-and-io")
    assert [m["id"] for m in run.input["value"]] == ["d1", "i1"]
    assert [e for e, _ in outcome(db, "either")] == ["d1", "i1", "d2", "i2"]


@pytest.mark.parametrize(("text", "field", "message"), [
    ("group: {by: x, count: 1, within: 1m}", "group.count", "greater than or equal to 2"),
    ("group: {by: x, count: 2, within: 1m}\n    inhibits: [nope]", "inhibits", "unknown"),
    ("inhibits: [restart]", "inhibits", "inhibits needs group"),
    ("group: {by: x, count: 2, within: 1m}\n    for: 5m", "group.within", "shorter than"),
    ("absent: 1m\n    for: 1m", "absent", "cannot be combined with for"),
    ("within: 1m", "within", "within goes with all"),
])
def test_loopd_check_names_each_correlation_mistake(
        rules_from: RulesFrom, text: str, field: str, message: str) -> None:
    """Each bad combination of correlation fields is an error naming its field."""
    rules = rules_from(f"""
rules:
  - name: bad
    on: {{source: alertmanager}}
    {text}
    run: {{action: core.noop, input: {{host: x}}}}
  - name: restart
    on: {{source: alertmanager}}
    run: {{action: core.noop, input: {{host: x}}}}
""")
    assert [r.name for r in rules.rules] == ["restart"]
    assert any(e.field == field and message in e.message for e in rules.errors), rules.errors


def replica(db: Path, rules: RuleSet, name: str, **options: Any
            ) -> contextlib.AbstractAsyncContextManager[Running]:
    """One replica's engine on the shared store file, loaded as the daemon loads it."""
    return running(db, rules, replica=name, **options)


@contextlib.asynccontextmanager
async def held_on_b(db: Path, group_rules: RuleSet) -> AsyncIterator[tuple[Running, Running]]:
    """Replicas a and b sharing the store: a opens the group incident of front (w1-w3),
    b reads it and holds back its host rule's match for w2 (event b2)."""
    inv = inventory(front=["w1", "w2", "w3"])
    t = time.time()
    async with replica(db, group_rules, "a", inventory=inv) as a, \
            replica(db, group_rules, "b", inventory=inv) as b:
        a.engine.shared = b.engine.shared = True
        await a.feed(*(alert(f"a{i}", f"w{i}", at=t) for i in (1, 2, 3)))
        await b.engine.follow_timers()
        await b.feed(alert("b2", "w2", at=t))
        yield a, b


async def until(what: str, check: Callable[[], bool], *engines: Running) -> None:
    deadline = time.monotonic() + 20
    while not check():
        assert time.monotonic() < deadline, what
        for r in engines:
            await r.engine.drain(timeout=10)
        await _tick()


async def test_a_group_moved_to_another_replica_opens_there_once(
        db: Path, group_rules: RuleSet) -> None:
    """Members decided on replica a count on replica b after the partitions moved (b reads
    them from the store), and the group opens once, at b."""
    inv = inventory(front=["w1", "w2", "w3"])
    t = time.time()
    async with replica(db, group_rules, "a", inventory=inv) as a:
        await a.feed(alert("a1", "w1", at=t), alert("a2", "w2", at=t))
        async with replica(db, group_rules, "b", inventory=inv) as b:
            await a.feed(alert("a1", "w1", at=t))  # redelivered at a: a duplicate
            await b.engine.refresh_timers()  # the rebalance moved the partitions to b
            await b.feed(alert("a2", "w2", at=t), alert("a3", "w3", at=t))
    assert outcome(db, "outage") == [("a1", "suppressed"), ("a2", "suppressed"),
                                     ("a3", "run_created")]
    assert [run.key for run in b.runs if run.rule == "outage"] == ["front"]


async def test_an_absence_rearmed_on_another_replica_fires_once(
        db: Path, rules_from: RulesFrom) -> None:
    """a armed h1; after a rebalance b gets h1's next heartbeat: a, still holding its
    older timer, checks the store when it is due and does not fire for the older event;
    when the newer one is due, both hold it and the store lets one of them fire."""
    rules = rules_from(ABSENT.replace("5m", "1s"))
    async with replica(db, rules, "a") as a:
        await a.feed(beat("b1", "h1", time.time()))
        async with replica(db, rules, "b") as b:
            await b.engine.refresh_timers()
            await b.feed(beat("b2", "h1", time.time()))
            await until("b fired h1's absence",
                        lambda: ("b2~absent", "run_created") in outcome(
                            db, "heartbeat-missing"), a, b)
    assert outcome(db, "heartbeat-missing") == [("b2~absent", "run_created")]
    assert [run.key for run in (*a.runs, *b.runs)] == ["h1"]


async def test_members_decided_on_two_replicas_open_the_group_and_inhibit_on_both(
        db: Path, group_rules: RuleSet) -> None:
    """Webhooks reach any replica: members split between a and b count together (a reads
    the group's rows back once its batch is written) and the group opens once; after b
    reads the store, its host rule's matches for the members are inhibited too."""
    inv = inventory(front=["w1", "w2", "w3", "w4"])
    t = time.time()
    async with replica(db, group_rules, "a", inventory=inv) as a, \
            replica(db, group_rules, "b", inventory=inv) as b:
        a.engine.shared = b.engine.shared = True  # what loopd.cluster sets
        await a.feed(alert("a1", "w1", at=t))
        await b.feed(alert("a2", "w2", at=t))
        await a.feed(alert("a3", "w3", at=t))
        await b.engine.follow_timers()
        await b.feed(alert("a4", "w2", at=t))
    # a4 at b: b's memory has the three members (read at follow), opens, and the store
    # makes it join a's incident
    assert outcome(db, "outage") == [("a1", "suppressed"), ("a2", "suppressed"),
                                     ("a3", "suppressed"), ("a3~group", "run_created"),
                                     ("a4", "joined")]
    (run,) = [run for run in a.runs if run.rule == "outage"]
    assert sorted(m["key"] for m in run.input["value"]) == ["w1", "w2", "w3"]
    assert ("a4", "suppressed") in outcome(db, "restart-host")
    assert any(x and x.startswith("guard inhibited: w2 is a member of group front")
               for x in reasons(db))


async def test_a_match_held_back_on_another_replica_is_listed_and_decided_again(
        db: Path, group_rules: RuleSet) -> None:
    """b holds back a member's host match for a's open group incident: a merges it into
    the incident's members row at its next poll, and decides it again when it closes."""
    async with held_on_b(db, group_rules) as (a, _):
        await a.engine.follow_timers()
        await a.engine.drain(timeout=10)
        (run,) = [r for r in a.runs if r.rule == "outage"]
        members = await a.store.kv_get(MEMBERS, run.incident_id or "")
        held = {(i["rule"], i["key"], i["event_id"]) for i in members["inhibited"]}
        assert ("restart-host", "w2", "b2") in held
        await a.close_incident_of(run)
    # decided again at a: it joins w2's host incident, which a2 opened and is still open
    assert (f"b2~after-{run.incident_id}", "joined") in outcome(db, "restart-host")
    assert ("b2", "suppressed") in outcome(db, "restart-host")


async def test_after_a_restart_a_group_window_passes_at_its_oldest_member(
        db: Path, group_rules: RuleSet) -> None:
    """The rows come back in key order, but the group's window is armed at its oldest
    member's last match: that member's row is forgotten when its window passes, not when
    the first member in key order would leave."""
    inv = inventory(front=["w1", "w2"])
    t = 1_000_000.0
    async with running(db, group_rules, inventory=inv, **event_time()) as r:
        await r.feed(alert("a2", "w2", at=t), alert("a1", "w1", at=t + 50))
    async with running(db, group_rules, inventory=inv, **event_time()) as r:
        await r.feed(Event(id="tick", source="other", topic="tick", data={}, time=t + 130))
        rows = [name for name, _ in await r.store.kv_scan(NAMESPACE)]
    assert rows == ['["g","outage","front","w1"]']


async def test_an_event_redelivered_after_its_absence_fired_is_no_second_decision(
        db: Path, rules_from: RulesFrom) -> None:
    """The event that armed an absence, delivered again after the absence fired (in the
    same batch, its incident still open), fires nothing again: the one ``~absent``
    decision keeps its run, and no second decision is made for it."""
    t = 1_000_000.0
    rules = rules_from(ABSENT)
    async with running(db, rules, **event_time()) as r:
        await r.feed(beat("b1", "h1", t), beat("x", "h3", t + 400), beat("b1", "h1", t),
                     beat("y", "h3", t + 1000))
    assert outcome(db, "heartbeat-missing") == [
        ("b1~absent", "run_created"), ("x~absent", "run_created")]
    assert [run.key for run in r.runs] == ["h1", "h3"]


async def test_a_redelivered_event_that_armed_an_absence_fires_it_once(
        db: Path, rules_from: RulesFrom) -> None:
    """The event that armed an absence, delivered again after it fired (and after its
    incident closed), is a duplicate: no second ``~absent`` decision and no second run."""
    t = 1_000_000.0
    rules = rules_from(ABSENT)
    async with running(db, rules, **event_time()) as r:
        await r.feed(beat("b1", "h1", t), beat("x", "h3", t + 400))
        (run,) = r.runs
        await r.close_incident_of(run)
        await r.feed(beat("b1", "h1", t), beat("y", "h3", t + 1000))
    assert outcome(db, "heartbeat-missing") == [
        ("b1~absent", "run_created"), ("x~absent", "run_created")]
    assert [run.key for run in r.runs] == ["h1", "h3"]


def held_rows(rows: list[tuple[str, Any]]) -> list[str]:
    """The kv keys of matches held back for another replica's group incident."""
    return [name for name, _ in rows if name.startswith('["i",')]


async def test_a_match_held_back_for_a_group_closed_before_its_holder_merged_it_is_released(
        db: Path, group_rules: RuleSet) -> None:
    """b holds back a member's host match for a's open group incident, and a closes the
    incident before it merged b's row: the next replica to follow the store deletes the
    row and decides the match again, as the close would have."""
    async with held_on_b(db, group_rules) as (a, b):
        assert len(held_rows(await b.store.kv_scan(NAMESPACE))) == 1
        (run,) = [r for r in a.runs if r.rule == "outage"]
        await a.close_incident_of(run)  # a never merged b's row
        await b.engine.follow_timers()
        await b.engine.drain(timeout=10)
        await a.engine.follow_timers()
        await a.engine.drain(timeout=10)
        left = held_rows(await a.store.kv_scan(NAMESPACE))
    assert left == []
    assert [e for e, _ in outcome(db, "restart-host")
            if e.startswith("b2~after")] == [f"b2~after-{run.incident_id}"]


async def test_a_foreign_group_gone_leaves_no_fingerprints_behind(
        db: Path, group_rules: RuleSet) -> None:
    """The alert fingerprints of matches b held back for a's group incident are forgotten
    at b once the incident is no longer open."""
    async with held_on_b(db, group_rules) as (a, b):
        assert b.engine.correlation._fingerprints
        (run,) = [r for r in a.runs if r.rule == "outage"]
        await a.engine.follow_timers()
        await a.engine.drain(timeout=10)
        await a.close_incident_of(run)
        await b.engine.follow_timers()
        assert not b.engine.correlation.foreign_groups
        assert not b.engine.correlation._fingerprints


@pytest.mark.parametrize("change", ["renamed", "disabled"])
async def test_a_reload_that_takes_an_open_group_rule_away_decides_its_held_matches_again(
        db: Path, rules_from: RulesFrom, change: str) -> None:
    """A reload renames or disables a group rule whose incident is open: it inhibits
    nothing any more, so its still-firing inhibited matches are decided again at the
    reload, once (not again when the incident closes later)."""
    inv = inventory(front=["w1", "w2", "w3", "w4"])
    t = time.time()
    async with running(db, rules_from(GROUP), inventory=inv) as r:
        await r.feed(*(alert(f"a{i}", f"w{i}", at=t) for i in (1, 2, 3, 4)))
        (run,) = [run for run in r.runs if run.rule == "outage"]
        reloaded = (GROUP.replace("name: outage", "name: rack-outage") if change == "renamed"
                    else GROUP.replace("    inhibits:", "    enabled: false\n    inhibits:"))
        rules = rules_from(reloaded)
        assert not rules.errors, rules.errors
        r.engine.swap_rules(rules)
        await r.engine.drain(timeout=10)
        await r.close_incident_of(run)
    again = [(e, o) for e, o in outcome(db, "restart-host") if "~after-" in e]
    assert again == [(f"a3~after-{run.incident_id}", "run_created"),
                     (f"a4~after-{run.incident_id}", "run_created")]


async def test_a_member_whose_records_the_store_rejects_counts_nowhere(
        db: Path, group_rules: RuleSet) -> None:
    """One event of a batch carries data the store refuses: only that event gets an error
    decision, its correlation rows go with it while the other member of the batch counts,
    and memory is what was committed: the group opens with the committed members only."""
    inv = inventory(front=["w1", "w2", "w3", "w4"])
    t = time.time()
    bad = alert("bad", "w2", at=float("nan"))  # its event row breaks NOT NULL
    async with running(db, group_rules, inventory=inv) as r:
        await r.feed(alert("a1", "w1", at=t), bad)
        rows = [name for name, _ in await r.store.kv_scan(NAMESPACE)]
        assert rows == ['["g","outage","front","w1"]']
        await r.feed(alert("a3", "w3", at=t))
        await r.feed(alert("a4", "w4", at=t))
    assert outcome(db, "outage") == [("a1", "suppressed"), ("bad", "error"),
                                     ("a3", "suppressed"), ("a4", "run_created")]
    (run,) = [run for run in r.runs if run.rule == "outage"]
    assert [m["key"] for m in run.input["value"]] == ["w1", "w3", "w4"]


async def test_the_event_that_armed_an_absence_delivered_again_does_not_move_it(
        db: Path, rules_from: RulesFrom) -> None:
    """A redelivery of the event that armed an absence (not fired yet) is no new event:
    the timer stays due when the first delivery armed it, in memory and in the store."""
    rules = rules_from(ABSENT)
    slot = ("heartbeat-missing", "h1")
    async with running(db, rules) as r:
        await r.feed(beat("b1", "h1", time.time()))
        due = r.engine.correlation.absences[slot].due
        await r.feed(beat("b1", "h1", time.time()))
        assert r.engine.correlation.absences[slot].due == due
        (stored,) = [v for _, v in await r.store.kv_scan(NAMESPACE)]
    assert stored["due"] == due


class HeldStore:
    """A store whose commit of a batch deciding ``event`` waits until ``go`` is set."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.holds: dict[str, asyncio.Event] = {}
        self.waiting: set[str] = set()

    def hold(self, event: str) -> asyncio.Event:
        self.holds[event] = asyncio.Event()
        return self.holds[event]

    async def commit(self, batch: Batch) -> CommitResult:
        for event in {d.event_id for d in batch.decisions} & set(self.holds):
            self.waiting.add(event)
            await self.holds[event].wait()
            self.waiting.discard(event)
        return await self.inner.commit(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_memory_read_again_after_a_rejection_keeps_the_batches_written_after_it(
        db: Path, group_rules: RuleSet) -> None:
    """Correlation memory read again from the store after a rejected batch waits for the
    batches decided before it to be written: a member decided while the rejected batch
    was being committed still counts."""
    inv = inventory(front=["w1", "w2"], back=["w9", "w10", "w11"])
    t = time.time()
    bad = alert("bad", "w2", at=float("nan"))  # its event row breaks NOT NULL
    async with running(db, group_rules, inventory=inv) as r:
        held = HeldStore(r.store)
        r.engine.store = cast(Store, held)
        go_bad, go_b9 = held.hold("bad"), held.hold("b9")
        for event in (alert("a1", "w1", at=t), bad):
            await r.engine.emit(Delivery(event))
        await wait_until(lambda: "bad" in held.waiting, what="the batch with bad committing")
        await r.engine.emit(Delivery(alert("b9", "w9", at=t)))  # decided meanwhile
        await wait_until(lambda: r.engine.queue.empty(), what="b9 decided")
        go_bad.set()  # rejected; then the batch of b9 is committed, slowly
        await wait_until(lambda: "b9" in held.waiting, what="the batch with b9 committing")
        await r.engine.emit(Delivery(alert("b10", "w10", at=t)))
        await wait_until(lambda: r.engine.committer.waiting or r.engine.queue.empty(),
                         what="b10 taken")
        go_b9.set()
        await r.engine.drain(timeout=10)
        await r.feed(alert("b11", "w11", at=t))
    assert outcome(db, "outage") == [("a1", "suppressed"), ("bad", "error"),
                                     ("b9", "suppressed"), ("b10", "suppressed"),
                                     ("b11", "run_created")]


async def test_a_rejected_event_held_back_by_a_group_is_not_decided_again_at_its_close(
    db: Path, rules_from: RulesFrom,
) -> None:
    """The members row of a group incident is written with every part of a batch: the
    matches a rejected event made in it (held back, a member) are taken out before
    memory is read again, so the rejected event counts nowhere, also not at the close."""
    rules = rules_from(GROUP)
    inv = inventory(front=["w1", "w2", "w3", "w4"], back=["w9"])
    t = time.time()
    async with running(db, rules, inventory=inv) as r:
        await r.feed(*(alert(f"a{i}", f"w{i}", at=t) for i in (1, 2, 3)))
        (run,) = [x for x in r.runs if x.rule == "outage"]
        bad = alert("bad", "w4", at=float("nan"))  # its event row breaks NOT NULL
        await r.feed(alert("g9", "w9", at=t), bad)  # one batch: a good part, a rejected one
        assert ("bad", "error") in outcome(db, "restart-host")
        await r.feed(alert("g10", "w9", at=t))  # the next batch reads memory again
        row = await r.store.kv_get(MEMBERS, run.incident_id or "")
        assert [i["event_id"] for i in row["inhibited"]] == ["a3"]
        assert "w4" not in [m["key"] for m in row["members"]]
        await r.close_incident_of(run)
    again = [(e, o) for e, o in outcome(db, "restart-host") if "~after-" in e]
    assert again == [(f"a3~after-{run.incident_id}", "run_created")]


async def test_memory_is_not_read_again_while_the_batches_before_it_are_not_written(
    db: Path, rules_from: RulesFrom,
) -> None:
    """After a rejection, memory is read from the store once the batches decided before
    are written; while one is not (the store stalls writes past the wait), the next batch
    tries again, so what that batch wrote is never lost from memory."""
    rules = rules_from(GROUP)
    inv = inventory(front=["w1", "w2"], back=["w9", "w10", "w11"])
    t = time.time()
    bad = alert("bad", "w2", at=float("nan"))
    async with running(db, rules, inventory=inv) as r:
        r.engine.committer.catch_up_timeout = 0.3  # stands for the 60 s of a stalled store
        held = HeldStore(r.store)
        r.engine.store = cast(Store, held)
        go_bad, go_b9 = held.hold("bad"), held.hold("b9")
        for event in (alert("a1", "w1", at=t), bad):
            await r.engine.emit(Delivery(event))
        await wait_until(lambda: "bad" in held.waiting, what="bad committing")
        await r.engine.emit(Delivery(alert("b9", "w9", at=t)))
        await wait_until(lambda: r.engine.queue.empty(), what="b9 decided")
        go_bad.set()
        await wait_until(lambda: "b9" in held.waiting, what="b9 committing")
        await r.engine.emit(Delivery(alert("b10", "w10", at=t)))
        await asyncio.sleep(1.0)  # longer than the wait: b9 is not written yet
        go_b9.set()
        await r.engine.drain(timeout=10)
        await r.feed(alert("b11", "w11", at=t))  # the third member of back: it opens
    assert ("b11", "run_created") in outcome(db, "outage")
