"""``loopd simulate`` in process (loopd/simulate.py): recorded events replayed through the
real rules, engine decisions and workflows with event time as the clock, actions in dry
run, confirmations satisfied by later events, deadlines expiring as event time passes."""

from __future__ import annotations

import operator
import shutil
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from loopd.config import LoopdConfig, load_config
from loopd.errors import DecodeError
from loopd.runs import states
from loopd.simulate.input import parse_event_file, read_events
from loopd.simulate.replay import Simulation, run_simulation
from loopd.simulate.report import Report
from loopd.store.base import RunRecord, StepRecord

REPO = Path(__file__).resolve().parents[2]
NAB = REPO / "../shared/data/nab"
T0 = 1_700_000_000.0


def write_config(tmp_path: Path, rules: str, **workflows: str) -> LoopdConfig:
    """loopd.yaml with the webhook, alertmanager and telemetry sources, ``rules`` as the one rule
    file, the shipped core pack and a pack ``simtest`` holding ``workflows``."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "rules.yaml").write_text(textwrap.dedent(rules))
    packs = tmp_path / "packs"
    shutil.copytree(REPO / "packs" / "core", packs / "core")
    (packs / "simtest" / "workflows").mkdir(parents=True)
    (packs / "simtest" / "pack.yaml").write_text("name: simtest\nactions: {}\n")
    for name, text in workflows.items():
        (packs / "simtest" / "workflows" / f"{name}.yaml").write_text(textwrap.dedent(text))
    (tmp_path / "loopd.yaml").write_text(
        "sources: [{name: webhook, type: webhook}, {name: alertmanager, type: alertmanager},\n"
        "          {name: telemetry, type: webhook}]\n"  # the CSV events' source
        "rules: [rules]\npacks: [packs]\n")
    return load_config(tmp_path / "loopd.yaml")


def write_jsonl(path: Path, *lines: dict[str, Any] | str) -> Path:
    path.write_bytes(b"".join(
        (line.encode() if isinstance(line, str) else orjson.dumps(line)) + b"\n"
        for line in lines))
    return path


async def simulate(config: LoopdConfig, *files: str
                   ) -> tuple[Report, list[RunRecord], dict[str, list[StepRecord]]]:
    """Replay; return the report, the runs and their steps, as the store has them."""
    async with Simulation(config, first_runs=10_000) as sim:
        report = await sim.replay(read_events([parse_event_file(f) for f in files]))
        runs = [r for r in await sim.store.list_runs(limit=100_000) if "/" not in r.id]
        steps = {r.id: await sim.store.steps(r.id) for r in runs}
    return report, runs, steps


def by_key(runs: list[RunRecord]) -> dict[str, RunRecord]:
    found = {r.key or "": r for r in runs}
    assert len(found) == len(runs), "one run per key expected"
    return found


# -- a `for:` rule on real telemetry --------------------------------------------------------


def nab_series(name: str) -> list[tuple[float, float]]:
    """(epoch seconds, value) of a NAB CSV, read here independently of loopd."""
    rows = []
    for line in (NAB / name).read_text().splitlines()[1:]:
        stamp, value = line.split(",")
        when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        rows.append((when.timestamp(), float(value)))
    return rows


def expected_starts(series: list[tuple[float, float]], threshold: float, hold: float
                    ) -> set[float]:
    """Where a run must start: at the sample where the condition has held at every
    sample for ``hold`` seconds; then the rule re-arms, so the next run needs the
    condition to hold for ``hold`` again from the next sample (no throttle; each run
    ends at once, so its incident is closed before the next sample)."""
    starts, since = set(), None
    for when, value in series:
        if value <= threshold:
            since = None
            continue
        since = when if since is None else since
        if when - since >= hold:
            starts.add(when)
            since = None
    return starts


FOR_RULE = """\
rules:
  - name: cpu-held
    on: {source: telemetry, topic: "telemetry/{host}/cpu"}
    if: "event.value > %s"
    key: "{{ vars.host }}"
    for: 15m
    run: {action: core.noop, input: {value: "{{ event.value }}"}}
"""


async def test_a_for_rule_starts_runs_exactly_where_the_series_held_above_the_threshold(
        tmp_path: Path) -> None:
    """On two real NAB CPU series merged in time order, a `value > T for 15m` rule starts
    a run at exactly the samples where the series had been above T for 15 minutes of
    event time (then re-arms), on the right host, and nowhere else."""
    series = {"web-1": nab_series("ec2_cpu_utilization_77c1ca.csv"),
              "web-2": nab_series("ec2_cpu_utilization_ac20cd.csv")}
    values = sorted(v for _, v in series["web-1"])
    threshold = round(values[int(len(values) * 0.9)], 3)  # the top tenth of web-1's samples
    expected = {(host, when) for host, rows in series.items()
                for when in expected_starts(rows, threshold, 15 * 60)}
    assert len({h for h, _ in expected}) == 2 and len(expected) > 20  # a meaningful test
    config = write_config(tmp_path, FOR_RULE % threshold)
    report, runs, _ = await simulate(
        config, f"{NAB}/ec2_cpu_utilization_77c1ca.csv:host=web-1,metric=cpu",
        f"{NAB}/ec2_cpu_utilization_ac20cd.csv:host=web-2,metric=cpu")
    assert {(r.key, r.created) for r in runs} == expected
    assert {(r.status, r.outcome) for r in runs} == {(states.SUCCEEDED, states.DONE)}
    assert all(r.finished == r.created for r in runs)  # a dry-run action takes no time
    data = report.data
    assert data["events"]["read"] == len(series["web-1"]) + len(series["web-2"])
    assert data["runs"]["created"] == len(expected)
    assert data["rules"]["by_rule"]["cpu-held"]["decisions"]["run_created"] == len(expected)
    assert data["suppressions"]["by_guard"]["for"] > 0
    assert data["incidents"] == {"opened": len(expected), "open_at_end": 0,
                                 "by_rule": {"cpu-held": {"opened": len(expected),
                                                          "open_at_end": 0,
                                                          "events": len(expected)}}}
    assert data["time"]["first"] == min(series["web-1"][0][0], series["web-2"][0][0])


# -- confirmations and deadlines on event time ------------------------------------------------

TRIGGER_RULE = """\
rules:
  - name: fix-cpu
    on: {source: webhook, topic: "alerts/{host}"}
    key: "{{ vars.host }}"
    run: {workflow: simtest.cool_down, input: {host: "{{ vars.host }}"}}
"""

COOL_DOWN = """\
input: [host]
tasks:
  act:
    action: core.log
    input: {message: "restart the busy service on {{ ctx.host }}"}
    next: verify
  verify:
    confirm:
      event: {topic: "telemetry/{{ ctx.host }}/cpu", if: "event.value < 50"}
      within: 10m
"""


def trigger(host: str, at: float) -> dict[str, Any]:
    return {"id": f"alert-{host}-{at}", "topic": f"alerts/{host}", "time": at,
            "data": {"state": "bad"}}


def cpu(host: str, at: float, value: float) -> dict[str, Any]:
    return {"topic": f"telemetry/{host}/cpu", "key": host, "time": at, "data": {"value": value}}


async def test_confirmations_are_decided_by_later_events_and_deadlines_on_event_time(
        tmp_path: Path) -> None:
    """A later event in the file confirms a run (fixed, at that event's time); evidence
    after the deadline comes too late (inconclusive, ended at the deadline instant);
    counter-evidence alone is not fixed; a deadline past the last event expires when
    the replay ends."""
    config = write_config(tmp_path, TRIGGER_RULE, cool_down=COOL_DOWN)
    events = write_jsonl(
        tmp_path / "events.jsonl",
        trigger("web-1", T0), trigger("web-2", T0), trigger("web-3", T0),
        cpu("web-3", T0 + 60, 95),            # counter-evidence: still busy
        cpu("web-1", T0 + 120, 20),           # the fix worked, 2 minutes later
        trigger("web-4", T0 + 800),
        cpu("web-2", T0 + 900, 20))           # 15 minutes later: past the 10m deadline
    report, found, steps = await simulate(config, str(events))
    runs = by_key(found)
    outcome = {k: (r.status, r.outcome, r.finished) for k, r in runs.items()}
    assert outcome == {
        "web-1": (states.SUCCEEDED, states.FIXED, T0 + 120),
        "web-2": (states.SUCCEEDED, states.INCONCLUSIVE, T0 + 600),
        "web-3": (states.FAILED, states.NOT_FIXED, T0 + 600),
        "web-4": (states.SUCCEEDED, states.INCONCLUSIVE, T0 + 800 + 600),
    }
    assert runs["web-1"].ctx["verify"]["event"]["data"] == {"value": 20}
    act, verify = steps[runs["web-1"].id]
    assert (act.task, act.started, act.finished, act.output) == (
        "act", T0, T0, {"dry_run": True})
    assert (verify.task, verify.started, verify.finished) == ("verify", T0, T0 + 120)
    data = report.data
    assert data["runs"]["by_workflow"] == {"simtest.cool_down": {
        "fixed": 1, "not_fixed": 1, "inconclusive": 2, "failed": 0, "cancelled": 0, "done": 0}}
    assert [(r["key"], r["start"], r["end"], r["outcome"]) for r in data["runs"]["first"]] == [
        ("web-1", T0, T0 + 120, "fixed"), ("web-2", T0, T0 + 600, "inconclusive"),
        ("web-3", T0, T0 + 600, "not_fixed"), ("web-4", T0 + 800, T0 + 1400, "inconclusive")]
    assert data["time"]["simulated_until"] >= T0 + 1400
    assert data["events"]["fed_back"] == 4  # each run's outcome event, as the daemon does


DELAYED = """\
input: [host]
timeout: 30m
tasks:
  wait:
    delay: 5m
    action: core.log
    input: {message: "after a while"}
    next: verify
  verify:
    confirm:
      event: {topic: "telemetry/{{ ctx.host }}/cpu", if: "event.value < 50"}
      within: 1h
"""


async def test_delays_and_the_run_timeout_run_on_event_time(tmp_path: Path) -> None:
    """A task's delay and the workflow's timeout are measured in event time: the action
    runs 5 minutes of event time after the trigger, the run times out 30 minutes after
    it started, however fast the replay is."""
    config = write_config(tmp_path, TRIGGER_RULE.replace("cool_down", "delayed"),
                          delayed=DELAYED)
    events = write_jsonl(tmp_path / "events.jsonl", trigger("web-1", T0),
                         cpu("web-1", T0 + 7200, 10))
    _, runs, steps = await simulate(config, str(events))
    run = by_key(runs)["web-1"]
    assert (run.status, run.started, run.finished) == (states.TIMED_OUT, T0, T0 + 1800)
    wait, verify = steps[run.id]
    assert (wait.task, wait.started) == ("wait", T0 + 300)
    assert (verify.task, verify.status, verify.finished) == (
        "verify", states.TIMED_OUT, T0 + 1800)


ASK = """\
input: [host]
tasks:
  ask: {approval: {within: 30m, message: "restart {{ ctx.host }}?"}, next: act}
  act: {action: core.log, input: {message: "restarting"}}
"""


async def test_nobody_approves_in_a_simulation_so_approvals_expire_on_event_time(
        tmp_path: Path) -> None:
    """An approval task expires `within` after it started, in event time: the run ends
    expired (outcome cancelled) and its action never runs."""
    config = write_config(tmp_path, TRIGGER_RULE.replace("cool_down", "ask"), ask=ASK)
    events = write_jsonl(tmp_path / "events.jsonl", trigger("web-1", T0),
                         cpu("web-1", T0 + 60, 10))
    _, runs, steps = await simulate(config, str(events))
    (run,) = runs
    assert (run.status, run.outcome, run.finished) == (
        states.EXPIRED, states.OUTCOME_CANCELLED, T0 + 1800)
    assert [(s.task, s.status, s.finished) for s in steps[run.id]] == [
        ("ask", states.EXPIRED, T0 + 1800)]


BUDGET_RULES = """\
rules:
  - name: budgeted
    on: {source: webhook, topic: "alerts/{host}"}
    key: "{{ vars.host }}"
    guards: {max_runs_per_key: {count: 2, per: 1h}}
    run: {action: core.noop}
  - name: breaker
    on: {source: webhook, topic: "check/{host}"}
    key: "{{ vars.host }}"
    guards: {breaker: {failures: 2, within: 2h, cool_off: 1h}}
    run: {workflow: simtest.cool_down, input: {host: "{{ vars.host }}"}}
"""


async def test_guards_count_their_windows_in_event_time(tmp_path: Path) -> None:
    """A per-key budget slides with event time; a circuit breaker opens when the second
    run ends unconfirmed at its deadline (between two events) and closes a cool-off
    later, counted from that deadline."""
    config = write_config(tmp_path, BUDGET_RULES, cool_down=COOL_DOWN)
    events = write_jsonl(tmp_path / "events.jsonl", *sorted(
        [{"topic": "alerts/web-1", "time": T0 + i * 1000, "data": {}} for i in range(9)]
        + [{"topic": "check/db-1", "time": T0 + at, "data": {}}
           for at in (0, 900, 1800, 2700, 3600, 4500, 4800, 5400, 6300)],
        key=operator.itemgetter("time")))
    report, runs, _ = await simulate(config, str(events))
    budgeted = sorted(r.created - T0 for r in runs if r.rule == "budgeted")
    assert budgeted == [0, 1000, 4000, 5000, 8000]  # at most 2 in any hour of event time
    # the breaker's runs end inconclusive 10 minutes after they start; the second opens it
    # at T0 + 900 + 600 = T0 + 1500 (not at the latest event before, T0 + 1000) until
    # T0 + 5100: events at 1800 .. 4800 are suppressed; the third, ending at 6000, opens
    # it again: 6300 is suppressed too
    breaker = sorted((r.created - T0, r.outcome) for r in runs if r.rule == "breaker")
    assert breaker == [(0, states.INCONCLUSIVE), (900, states.INCONCLUSIVE),
                       (5400, states.INCONCLUSIVE)]
    rules = report.data["rules"]["by_rule"]
    assert rules["budgeted"]["suppressions"] == {"budget": 4}
    assert rules["breaker"]["suppressions"] == {"breaker": 6}
    assert report.data["suppressions"]["examples"]["budget"].startswith("guard budget: ")


# -- Alertmanager payloads --------------------------------------------------------------------

ALERT_RULE = """\
rules:
  - name: high-load
    on: {source: alertmanager, match: {status: firing, labels.alertname: HighLoad}}
    key: "{{ event.labels.instance }}"
    run: {workflow: simtest.wait_resolved, input: {host: "{{ event.labels.instance }}"}}
"""

WAIT_RESOLVED = """\
input: [host]
tasks:
  act:
    action: core.log
    input: {message: "shed load on {{ ctx.host }}"}
    next: verify
  verify:
    confirm:
      event:
        source: alertmanager
        match: {status: resolved, labels.alertname: HighLoad, labels.instance: "{{ ctx.host }}"}
      within: 30m
"""


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def payload(*alerts: tuple[str, str, float, float | None]) -> dict[str, Any]:
    """An Alertmanager webhook payload (version 4): (instance, status, starts, ends)."""
    return {"version": "4", "receiver": "loopd", "status": alerts[0][1], "alerts": [
        {"status": status, "labels": {"alertname": "HighLoad", "instance": host},
         "annotations": {"summary": "load"}, "startsAt": iso(starts),
         "endsAt": iso(ends) if ends else "0001-01-01T00:00:00Z"}
        for host, status, starts, ends in alerts]}


async def test_alertmanager_payloads_replay_one_event_per_alert(tmp_path: Path) -> None:
    """Each alert of a payload is an event at its startsAt (endsAt when resolved); a
    repeated notification is a duplicate; the resolved alert confirms its run."""
    config = write_config(tmp_path, ALERT_RULE, wait_resolved=WAIT_RESOLVED)
    events = write_jsonl(
        tmp_path / "alerts.jsonl",
        payload(("web-1", "firing", T0, None), ("web-2", "firing", T0 + 30, None)),
        payload(("web-1", "firing", T0, None)),                      # repeated notification
        payload(("web-1", "resolved", T0, T0 + 300)))
    report, runs, _ = await simulate(config, str(events))
    assert {k: (r.outcome, r.created, r.finished) for k, r in by_key(runs).items()} == {
        "web-1": (states.FIXED, T0, T0 + 300),
        "web-2": (states.INCONCLUSIVE, T0 + 30, T0 + 30 + 1800)}
    ev = report.data["events"]
    assert (ev["read"], ev["duplicates"], ev["by_source"]) == (4, 1, {"alertmanager": 4})
    assert report.data["rules"]["by_rule"]["high-load"]["matches"] == 2


# -- inputs -----------------------------------------------------------------------------------


async def test_an_invalid_line_stops_the_replay_naming_file_and_line(tmp_path: Path) -> None:
    """The first invalid line ends the replay with `FILE:LINE: what is wrong`."""
    config = write_config(tmp_path, TRIGGER_RULE, cool_down=COOL_DOWN)
    cases = {
        "bad.jsonl": ("{\"topic\": \"a\", \"time\": 1700000000, \"data\": {}}\n{not json\n",
                      ":2: malformed JSON"),
        "notime.jsonl": ("{\"topic\": \"a\", \"data\": {}}\n", ":1: field 'time' is required"),
        "alert.jsonl": ("{\"alerts\": [{\"status\": \"firing\"}]}\n",
                        ":1 alerts[0]: field 'labels' must be dict"),
        "bad.csv": ("timestamp,value\n2014-01-01 00:00:00,1\n2014-01-01 00:05:00,high\n",
                    ":3: value 'high' is not a number"),
        "nohead.csv": ("2014-01-01 00:00:00,1\n", ":1: the header must name the columns"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DecodeError) as caught:
            await run_simulation(config, [parse_event_file(str(tmp_path / name))])
        assert str(caught.value).startswith(f"{tmp_path / name}{message}"), str(caught.value)


async def test_times_that_are_not_a_recordings_and_values_that_are_not_finite_are_refused(
    tmp_path: Path,
) -> None:
    """A date written as digits (20140307, which epoch seconds would make 1970-08-22) and a
    nan or inf value stop the replay naming FILE:LINE; the same date in RFC 3339, a
    string of epoch digits and NAB's `2014-03-07 10:00:00` are read as the times they are."""
    config = write_config(tmp_path, TRIGGER_RULE, cool_down=COOL_DOWN)
    cases = {
        "date.csv": ("timestamp,value\n20140307,1\n", ":2: time 20140307 is epoch seconds "
                     "1970-08-22T02:31:47Z, before 2000-01-01T00:00:00Z: if it is a date, "
                     "write it as RFC 3339"),
        "date.jsonl": ('{"topic": "a", "time": "20140307", "data": {}}\n', ":1: time 20140307"),
        "nan.csv": ("timestamp,value\n2014-03-07 10:00:00,1\n2014-03-07 10:05:00,nan\n",
                    ":3: value 'nan' is not a finite number"),
        "inf.csv": ("timestamp,value\n2014-03-07 10:00:00,-inf\n",
                    ":2: value '-inf' is not a finite number"),
        "huge.jsonl": ('{"topic": "a", "time": 1700000000, "data": {"value": 1e999}}\n',
                       ":1: malformed JSON"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DecodeError) as caught:
            await run_simulation(config, [parse_event_file(str(tmp_path / name))])
        assert str(caught.value).startswith(f"{tmp_path / name}{message}"), str(caught.value)
    good = tmp_path / "good.jsonl"
    write_jsonl(good, {"topic": "a", "time": "2014-03-07T00:00:00Z", "data": {}},
                {"topic": "a", "time": "1394186400", "data": {}})
    csv = tmp_path / "nab.csv"
    csv.write_text("timestamp,value\n2014-03-07 12:00:00,1.5\n")
    times = [e.time for e in read_events([parse_event_file(str(good)),
                                          parse_event_file(str(csv))])]
    assert times == [1394150400.0, 1394186400.0, 1394193600.0]


async def test_events_out_of_time_order_are_counted_and_named_by_file_and_line(
    tmp_path: Path,
) -> None:
    """A row older than the one before it is decided at the clock's time, counted, and the
    report names its FILE:LINE, its time and the clock's."""
    config = write_config(tmp_path, TRIGGER_RULE, cool_down=COOL_DOWN)
    csv = tmp_path / "cpu.csv"
    csv.write_text("timestamp,value\n2014-03-07 10:00:00,1\n2014-03-07 10:10:00,1\n"
                   "2014-03-07 10:05:00,1\n2014-03-07 10:15:00,1\n")
    report = await run_simulation(config, [parse_event_file(str(csv))])
    events = report.data["events"]
    assert events["out_of_order"] == 1
    assert events["out_of_order_first"] == [{
        "origin": f"{csv}:4", "time": "2014-03-07T10:05:00Z", "clock": "2014-03-07T10:10:00Z"}]
    assert (f"  out of time order: {csv}:4 at 2014-03-07T10:05:00Z, decided at "
            "2014-03-07T10:10:00Z") in report.render().splitlines()


def test_event_file_arguments_name_the_host_and_metric_of_csv_telemetry(tmp_path: Path) -> None:
    """`FILE:host=NAME,metric=NAME` sets a CSV's host and metric; the format follows the
    extension, else the first byte; options on JSON Lines are refused."""
    csv = tmp_path / "cpu.csv"
    csv.write_text("timestamp,value\n1700000000,2.5\n")
    spec = parse_event_file(f"{csv}:host=web-9,metric=cpu")
    assert (spec.kind, spec.host, spec.metric) == ("csv", "web-9", "cpu")
    (event,) = read_events([spec])
    assert (event.source, event.topic, event.key, event.time, event.data) == (
        "telemetry", "telemetry/web-9/cpu", "web-9", 1_700_000_000.0, {"value": 2.5})
    (plain,) = read_events([parse_event_file(str(csv))], csv_source="mqtt")
    assert (plain.source, plain.topic, plain.key) == ("mqtt", "telemetry/cpu/value", "cpu")
    sniffed = tmp_path / "events.log"
    sniffed.write_text('{"topic": "t", "time": 1, "data": {}}\n')
    assert parse_event_file(str(sniffed)).kind == "jsonl"
    with pytest.raises(DecodeError, match="options of CSV telemetry files"):
        parse_event_file(f"{sniffed}:host=x")
    with pytest.raises(DecodeError, match="bad option 'colour=red'"):
        parse_event_file(f"{csv}:colour=red")


