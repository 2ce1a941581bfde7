"""The fine semantics of correlation, in process: loopd as ``loopd simulate`` builds it
(loopd.wiring.build on event time, loopd.simulate.replay.Simulation), fed JSON Lines
through the simulate reader, read back from its store. Event time makes every window
exact: group expiry, the members a run sees, the end of an inhibition when the group
incident closes, a resolved event disarming an absence, ``any`` deciding once per event,
and the storm of tests/correlation_data.py."""

from __future__ import annotations

import shutil
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import yaml

from loopd.config import LoopdConfig, load_config
from loopd.simulate.input import parse_event_file, read_events
from loopd.simulate.replay import Simulation
from loopd.store.base import DecisionQuery, DecisionRecord, RunRecord
from tests.correlation_data import GROUP_ALERT, expect, iso, storm

REPO = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000.0

HOLD = """\
input: [group, members]
tasks:
  hold:           # keeps the group incident open for 60 s of event time
    delay: 60s
    noop: true
"""


def write_config(tmp_path: Path, rules: str, entities: dict[str, dict[str, Any]] | None = None
                 ) -> LoopdConfig:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "rules.yaml").write_text(textwrap.dedent(rules))
    packs = tmp_path / "packs"
    shutil.copytree(REPO / "packs" / "core", packs / "core")
    (packs / "simtest" / "workflows").mkdir(parents=True)
    (packs / "simtest" / "pack.yaml").write_text("name: simtest\nactions: {}\n")
    (packs / "simtest" / "workflows" / "hold.yaml").write_text(HOLD)
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump({"entities": entities or {}}))
    (tmp_path / "loopd.yaml").write_text(
        "sources: [{name: webhook, type: webhook}, {name: alertmanager, type: alertmanager}]\n"
        "rules: [rules]\npacks: [packs]\ninventory: inventory.yaml\n")
    return load_config(tmp_path / "loopd.yaml")


def alert(name: str, host: str, at: float, status: str = "firing", *,
          starts: float | None = None) -> dict[str, Any]:
    """A one-alert Alertmanager notification; a resolved one keeps its startsAt."""
    return {"version": "4", "status": status, "receiver": "loopd", "alerts": [{
        "status": status, "labels": {"alertname": name, "instance": host},
        "startsAt": iso(starts if starts is not None else at),
        "endsAt": iso(at) if status == "resolved" else "0001-01-01T00:00:00Z",
        "fingerprint": f"{name}-{host}"}]}


def alert_id(name: str, host: str, starts: float, status: str = "firing") -> str:
    return f"{name}-{host}:{iso(starts)}:{status}"


class Replayed:
    def __init__(self, decisions: list[DecisionRecord], runs: list[RunRecord],
                 members: dict[str, Any]) -> None:
        self.decisions = decisions
        self.runs = runs
        self.members = members  # group incident id -> the durable kv value

    def of(self, rule: str) -> list[tuple[str, str, str | None]]:
        """(event id, outcome, reason) of a rule's decisions, in order."""
        return [(d.event_id, d.outcome, d.reason) for d in self.decisions if d.rule == rule]


async def replay(tmp_path: Path, config: LoopdConfig, *lines: dict[str, Any]) -> Replayed:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    async with Simulation(config, first_runs=10_000) as sim:
        await sim.replay(read_events([parse_event_file(str(events))]))
        found = await sim.store.decisions(DecisionQuery(limit=1_000_000))
        runs = [r for r in await sim.store.list_runs(limit=100_000) if "/" not in r.id]
        incidents = {d.incident_id for d in found if d.incident_id is not None}
        members = {i: m for i in incidents
                   if (m := await sim.store.kv_get("members", i)) is not None}
    return Replayed(sorted(found, key=lambda d: d.seq), runs, members)


RACK = {h: {"group": "rack-1", "address": f"10.0.0.{n}"} for n, h in enumerate("abcde", 1)}

GROUP_RULES = """\
rules:
  - name: rack-outage
    on: {source: alertmanager, match: {status: firing, labels.alertname: HostDown}}
    key: "{{ event.labels.instance }}"
    group: {by: "{{ inventory[key].group }}", count: 3, within: 1m}
    inhibits: [host-hung]
    run: {workflow: simtest.hold, input: {group: "{{ key }}", members: "{{ members }}"}}
  - name: host-hung
    on: {source: alertmanager, match: {status: firing, labels.alertname: HostHung}}
    key: "{{ event.labels.instance }}"
    run: {action: core.log, input: {message: "restart {{ key }}"}}
"""


async def test_a_member_older_than_the_window_no_longer_counts_and_the_run_sees_its_members(
        tmp_path: Path) -> None:
    """With ``count: 3, within: 1m``, a member whose last match is older than a minute is
    dropped: the third host brings the group to 2 of 3, the fourth opens it, and the run's
    ``members`` are the three live ones in order of arrival, each with its first match's
    time, its event and its inventory entity."""
    config = write_config(tmp_path, GROUP_RULES, RACK)
    got = await replay(tmp_path, config, *(alert(GROUP_ALERT, h, T0 + dt) for h, dt in
                                           (("a", 0), ("b", 50), ("c", 70), ("d", 80),
                                            ("d", 85), ("e", 90))))
    assert [(o, r) for _, o, r in got.of("rack-outage")] == [
        ("suppressed", "guard group: 1 of 3 members within 60s (group rack-1, member a)"),
        ("suppressed", "guard group: 2 of 3 members within 60s (group rack-1, member b)"),
        ("suppressed", "guard group: 2 of 3 members within 60s (group rack-1, member c)"),
        ("run_created", None),  # a had expired when c came; d opens it
        ("joined", "incident already open"),  # d again
        ("joined", "member e joined group rack-1 (4 members)")]
    assert {d.key for d in got.decisions} == {"rack-1"}  # the group's decisions
    (run,) = [r for r in got.runs if r.rule == "rack-outage"]
    assert run.key == "rack-1"
    assert isinstance(run.input, dict)
    members = run.input["members"]
    assert [m["key"] for m in members] == ["b", "c", "d"]
    assert [m["time"] for m in members] == [T0 + 50, T0 + 70, T0 + 80]
    assert [m["event"]["id"] for m in members] == [
        alert_id(GROUP_ALERT, h, T0 + dt) for h, dt in (("b", 50), ("c", 70), ("d", 80))]
    assert {m["event"]["source"] for m in members} == {"alertmanager"}
    assert [m["entity"] for m in members] == [{"name": h, **RACK[h]} for h in "bcd"]
    assert [m["key"] for m in got.members[str(run.incident_id)]["members"]] == [
        "b", "c", "d", "e"]


async def test_inhibition_ends_when_the_group_closes_and_still_firing_members_are_redecided(
        tmp_path: Path) -> None:
    """While the group incident is open the host rule's matches of its members are
    inhibited (a non-member of the same inventory group is not); when it closes, the last
    inhibited event of each member still firing is decided again as ``~after-<incident>``
    and remediated, a member resolved in between is not, and the group starts afresh."""
    config = write_config(tmp_path, GROUP_RULES, RACK)
    hung = "HostHung"
    got = await replay(
        tmp_path, config,
        alert(hung, "a", T0),                          # before the group: remediated
        alert(GROUP_ALERT, "a", T0 + 1), alert(GROUP_ALERT, "b", T0 + 2),
        alert(GROUP_ALERT, "c", T0 + 3),               # opens; the hold ends at T0 + 63
        alert(hung, "a", T0 + 10), alert(hung, "b", T0 + 11), alert(hung, "e", T0 + 12),
        alert(hung, "b", T0 + 20, "resolved", starts=T0 + 11),
        alert(hung, "a", T0 + 30),
        alert("Watchdog", "z", T0 + 100),              # event time moves past the close
        alert(GROUP_ALERT, "a", T0 + 110), alert(hung, "a", T0 + 120),
    )
    ((_, opened, _),) = [d for d in got.of("rack-outage") if d[1] == "run_created"]
    group = next(d.incident_id for d in got.decisions
                 if d.rule == "rack-outage" and d.outcome == "run_created")
    assert group is not None and opened == "run_created"
    inhibited = f"guard inhibited: {{}} is a member of group rack-1 of rack-outage " \
                f"(incident {group})"
    assert got.of("host-hung") == [
        (alert_id(hung, "a", T0), "run_created", None),
        (alert_id(hung, "a", T0 + 10), "suppressed", inhibited.format("a")),
        (alert_id(hung, "b", T0 + 11), "suppressed", inhibited.format("b")),
        (alert_id(hung, "e", T0 + 12), "run_created", None),   # not a member
        (alert_id(hung, "a", T0 + 30), "suppressed", inhibited.format("a")),
        (f"{alert_id(hung, 'a', T0 + 30)}~after-{group}", "run_created", None),
        (alert_id(hung, "a", T0 + 120), "run_created", None),  # no longer inhibited
    ]
    # afresh: a's new HostDown is the first member of a new window
    assert got.of("rack-outage")[-1] == (
        alert_id(GROUP_ALERT, "a", T0 + 110), "suppressed",
        "guard group: 1 of 3 members within 60s (group rack-1, member a)")
    record = got.members[group]
    assert (record["rule"], record["key"]) == ("rack-outage", "rack-1")
    assert {i["key"]: (i["count"], i["firing"]) for i in record["inhibited"]} == {
        "a": (2, True), "b": (1, False)}
    assert sorted(r.key or "" for r in got.runs if r.rule == "host-hung") == ["a", "a", "a", "e"]


async def test_a_member_decided_again_after_the_close_is_decided_at_the_close(
        tmp_path: Path) -> None:
    """In event time, the ``~after-`` decision of a member still firing is made, and
    judged (throttle), at the time the group incident closed, not at the time of the
    inhibited event it repeats (which would put it, and its run, before the close)."""
    config = write_config(tmp_path, GROUP_RULES.replace(
        'run: {action: core.log, input: {message: "restart {{ key }}"}}',
        'throttle: {once_within: 50s}\n'
        '    run: {action: core.log, input: {message: "restart {{ key }}"}}'), RACK)
    got = await replay(
        tmp_path, config,
        alert("HostHung", "a", T0),                    # remediated: throttled until T0 + 50
        *(alert(GROUP_ALERT, h, T0 + n) for n, h in enumerate("abc", 1)),
        alert("HostHung", "a", T0 + 10),               # inhibited; the group closes at T0 + 63
        alert("Watchdog", "z", T0 + 100))
    group = next(d.incident_id for d in got.decisions if d.rule == "rack-outage"
                 and d.outcome == "run_created")
    closed = next(r.finished for r in got.runs if r.rule == "rack-outage")
    assert closed == T0 + 63
    (after,) = [d for d in got.decisions if d.event_id.endswith(f"~after-{group}")]
    assert (after.time, after.outcome) == (closed, "run_created")  # once_within has passed


async def test_a_resolved_event_disarms_an_absence_and_a_silence_fires_once(
        tmp_path: Path) -> None:
    """``absent: 30s`` fires once per silence with the last event in scope (30 s of event
    time after it), a matching event with ``status: resolved`` disarms the timer, and a
    timer due after the last event's time does not fire (the recording ends there)."""
    config = write_config(tmp_path, """\
        rules:
          - name: beat-missing
            on: {source: webhook, topic: "heartbeat/{host}"}
            key: "{{ vars.host }}"
            absent: 30s
            run: {action: core.log, input: {message: "silent {{ key }}"}}
        """)

    def beat(ident: str, host: str, at: float, **data: Any) -> dict[str, Any]:
        return {"id": ident, "topic": f"heartbeat/{host}", "time": at,
                "data": {"up": 1, **data}}

    got = await replay(tmp_path, config,
                       beat("h1-1", "h1", T0), beat("h2-1", "h2", T0), beat("h3-1", "h3", T0),
                       beat("h1-2", "h1", T0 + 10, status="resolved"),
                       beat("h3-2", "h3", T0 + 20),
                       beat("h4-1", "h4", T0 + 190),  # due after the recording ends
                       {"id": "end", "topic": "other", "time": T0 + 200, "data": {}})
    fired = [d for d in got.decisions if d.rule == "beat-missing"]
    assert [(d.key, d.event_id, d.outcome, d.source) for d in fired] == [
        ("h2", "h2-1~absent", "run_created", "webhook"),
        ("h3", "h3-2~absent", "run_created", "webhook")]
    assert [d.time for d in fired] == [T0 + 30, T0 + 50]
    assert sorted(r.key or "" for r in got.runs) == ["h2", "h3"]


async def test_any_is_one_decision_per_event_whichever_conditions_it_matches(
        tmp_path: Path) -> None:
    """An ``any`` rule decides an event once even when it matches two of its conditions,
    once for an event matching one, and never for an event matching none."""
    config = write_config(tmp_path, """\
        rules:
          - name: either
            any:
              - {on: {source: webhook, topic: "x/{host}"}, if: "event.value > 1"}
              - {on: {source: webhook, topic: "x/{host}"}, if: "event.value > 3"}
              - {on: {source: webhook, topic: "y/{host}"}}
            key: "{{ vars.host }}"
            run: {action: core.log, input: {message: "either {{ key }}"}}
        """)
    got = await replay(
        tmp_path, config,
        *({"id": i, "topic": t, "time": T0 + n, "data": {"value": v}} for n, (i, t, v) in
          enumerate((("both", "x/h1", 5), ("one", "x/h2", 2), ("none", "x/h3", 0),
                     ("other", "y/h4", 0)))))
    assert [(e, o) for e, o, _ in got.of("either")] == [
        ("both", "run_created"), ("one", "run_created"), ("other", "run_created")]
    assert sorted(r.key or "" for r in got.runs) == ["h1", "h2", "h4"]


async def test_the_storm_replayed_in_event_time_groups_and_inhibits_as_computed(
        tmp_path: Path) -> None:
    """The 1,000-alert storm replayed in process opens exactly the groups that crossed
    the count, with the computed members, and inhibits exactly the computed host-rule
    matches (the durable members record agrees)."""
    data = storm(T0)
    want = expect(data.alerts, data.groups, count=5, within=120.0)
    config = write_config(tmp_path, """\
        rules:
          - name: group-outage
            on: {source: alertmanager, match: {status: firing, labels.alertname: HostDown}}
            key: "{{ event.labels.instance }}"
            group: {by: "{{ inventory[key].group }}", count: 5, within: 2m}
            inhibits: [restart-hung-host]
            run: {workflow: simtest.hold, input: {group: "{{ key }}", members: "{{ members }}"}}
          - name: restart-hung-host
            on: {source: alertmanager, match: {status: firing}}
            if: "event.labels.severity == 'critical'"
            key: "{{ event.labels.instance }}"
            throttle: {once_within: 10m}
            run: {action: core.log, input: {message: "restart {{ key }}"}}
        """, data.entities())
    got = await replay(tmp_path, config, *data.notifications())
    groups = {v["key"]: v for v in got.members.values() if v["rule"] == "group-outage"}
    assert {g: [m["key"] for m in v["members"]] for g, v in groups.items()} == want.members
    inhibited = [d for d in got.decisions
                 if d.rule == "restart-hung-host" and (d.reason or "").startswith(
                     "guard inhibited:")]
    assert sorted(d.event_id for d in inhibited) == sorted(a.event_id for a in want.inhibited)
    assert Counter(i["key"] for v in groups.values() for i in v["inhibited"]
                   for _ in range(int(i["count"]))) == want.inhibited_by_host()
    # the holds end when the replay does: the groups close, and each inhibited member's
    # last match is decided again (remediated unless its one run was within once_within)
    after = {d.key: d for d in got.decisions if "~after-" in d.event_id}
    assert {k: d.event_id.rpartition("~after-")[0] + "~after-" for k, d in after.items()
            if k is not None} == want.after_close()
    assert {k for k, d in after.items() if d.outcome == "run_created"} == want.after_runs()
    assert Counter(r.key or "" for r in got.runs if r.rule == "restart-hung-host") == Counter(
        [*want.remediated, *want.after_runs()])


ALL_RULE = """\
rules:
  - name: disk-and-io
    all:
      - {on: {source: webhook, topic: "m/{host}"}, if: "event.kind == 'disk'"}
      - {on: {source: webhook, topic: "m/{host}"}}
    key: "{{ vars.host }}"
    within: 10s
    run: {action: core.log, input: {message: "disk and io on {{ key }}"}}
"""


def metric(ident: str, host: str, at: float, kind: str) -> dict[str, Any]:
    return {"id": ident, "topic": f"m/{host}", "time": at, "data": {"kind": kind}}


async def test_all_needs_each_condition_within_the_window_and_an_event_counts_once(
        tmp_path: Path) -> None:
    """An ``all`` rule fires when each condition's latest match is within ``within`` of
    event time (a match that fell out of the window must come again), with the completing
    event, and starts afresh; an event that matches several conditions counts for the
    first one only."""
    config = write_config(tmp_path, ALL_RULE)
    got = await replay(
        tmp_path, config,
        metric("a-disk", "a", T0, "disk"), metric("a-io", "a", T0 + 11, "io"),  # too late
        metric("a-disk-2", "a", T0 + 12, "disk"),  # a-io (1 s ago) still counts: fires
        metric("b-disk", "b", T0, "disk"), metric("b-disk-2", "b", T0 + 1, "disk"),
        metric("c-io", "c", T0 + 2, "io"), metric("c-disk", "c", T0 + 9, "disk"),
        metric("c-io-2", "c", T0 + 10, "io"))  # the fire cleared c's partial matches
    outcomes = {e: o for e, o, _ in got.of("disk-and-io")}
    assert outcomes == {"a-disk": "suppressed", "a-io": "suppressed", "a-disk-2": "run_created",
                        "b-disk": "suppressed", "b-disk-2": "suppressed",  # both the first
                        "c-io": "suppressed", "c-disk": "run_created",
                        "c-io-2": "suppressed"}
    assert all((r or "").startswith("guard all: 1 of 2 conditions within 10s")
               for _, o, r in got.of("disk-and-io") if o == "suppressed")
    runs = {r.key or "": r for r in got.runs}
    assert sorted(runs) == ["a", "c"]
    assert (runs["a"].created, runs["c"].created) == (T0 + 12, T0 + 9)
    assert isinstance(runs["a"].event, dict) and runs["a"].event["id"] == "a-disk-2"


async def test_for_applies_per_member_before_the_member_counts(tmp_path: Path) -> None:
    """``for:`` combined with ``group`` holds each member key back until its condition held
    for the duration; only then does it count towards the group."""
    config = write_config(tmp_path, """\
        rules:
          - name: rack-outage
            on: {source: alertmanager, match: {status: firing, labels.alertname: HostDown}}
            key: "{{ event.labels.instance }}"
            for: 30s
            group: {by: "{{ inventory[key].group }}", count: 2, within: 1m}
            run: {workflow: simtest.hold, input: {group: "{{ key }}", members: "{{ members }}"}}
        """, RACK)
    got = await replay(tmp_path, config, *(alert(GROUP_ALERT, h, T0 + dt) for h, dt in
                                           (("a", 0), ("b", 5), ("a", 40), ("b", 45))))
    decided = got.of("rack-outage")
    assert [o for _, o, _ in decided] == ["suppressed", "suppressed", "suppressed",
                                          "run_created"]
    assert [(r or "").split(":")[0] for _, _, r in decided[:2]] == ["for", "for"]
    assert decided[2][2] == "guard group: 1 of 2 members within 60s (group rack-1, member a)"
    (run,) = got.runs
    assert isinstance(run.input, dict)
    assert [m["key"] for m in run.input["members"]] == ["a", "b"]


async def test_the_event_that_opens_a_group_is_inhibited_whatever_the_rule_order(
        tmp_path: Path) -> None:
    """Within one event the group rule is decided before the rule it inhibits, even when
    that rule comes first in the file: the member that opens the group is inhibited."""
    config = write_config(tmp_path, """\
        rules:
          - name: host-down
            on: {source: alertmanager, match: {status: firing}}
            key: "{{ event.labels.instance }}"
            run: {action: core.log, input: {message: "restart {{ key }}"}}
          - name: rack-outage
            on: {source: alertmanager, match: {status: firing, labels.alertname: HostDown}}
            key: "{{ event.labels.instance }}"
            group: {by: "{{ inventory[key].group }}", count: 3, within: 1m}
            inhibits: [host-down]
            run: {workflow: simtest.hold, input: {group: "{{ key }}", members: "{{ members }}"}}
        """, RACK)
    got = await replay(tmp_path, config,
                       *(alert(GROUP_ALERT, h, T0 + n) for n, h in enumerate("abc")))
    assert [o for _, o, _ in got.of("rack-outage")] == ["suppressed", "suppressed",
                                                        "run_created"]
    host = got.of("host-down")
    assert [(e, o) for e, o, _ in host[:3]] == [
        (alert_id(GROUP_ALERT, "a", T0), "run_created"),
        (alert_id(GROUP_ALERT, "b", T0 + 1), "run_created"),
        (alert_id(GROUP_ALERT, "c", T0 + 2), "suppressed")]
    assert (host[2][2] or "").startswith("guard inhibited: c is a member of group rack-1")
