"""Guards on the engine and a real SQLite store: run modes, budgets, breaker, blast radius,
flapping, resolved alerts, silences, maintenance windows and shadow mode.

The engine runs on event time (a VirtualClock it moves to each event's time) so a test
moves the clock by giving its events later times; runs do not execute here: a test ends
a run the way the dispatcher does, with ``RunEnded`` into the engine's inbox. Times
start three days ago, inside the engine's restart memory, so a "restart" (a new Engine
on the same database file) sees the same history. Metrics are global: tests compare
deltas on their own rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loopd import metrics
from loopd.catalog.inventory import Inventory
from loopd.catalog.silences import Silences, parse_silences
from loopd.clock import VirtualClock
from loopd.decide.engine import Engine
from loopd.decide.guards import Guards
from loopd.events import Delivery, Event
from loopd.messages import CancelRun, RunEnded
from loopd.policy import GlobalGuards
from loopd.rules.loader import RuleSet
from loopd.runs import states
from loopd.store.base import RunRecord
from loopd.store.sqlite import SqliteStore
from tests.servers.http_targets import AlertmanagerApi
from tests.unit.conftest import RulesFrom, Sent

T0 = float(int(time.time())) - 3 * 86400  # event time of each test's first event
HOUR = 3600.0


def alert(ident: str, host: str, at: float, *, status: str = "firing",
          alertname: str = "HostDown", fingerprint: str | None = None,
          **labels: str) -> Event:
    """An event as the Alertmanager source builds it."""
    return Event(id=ident, source="alertmanager", topic=alertname, key=host, time=at, data={
        "status": status, "fingerprint": fingerprint or f"fp-{host}",
        "labels": {"alertname": alertname, "instance": host, **labels}})


def sample(name: str, **labels: str) -> float:
    return metrics.current().registry.get_sample_value(name, labels) or 0.0


@dataclass
class Loop:
    engine: Engine
    store: SqliteStore
    db: Path
    sent: Sent

    @property
    def runs(self) -> list[RunRecord]:
        return self.sent.runs

    async def feed(self, *events: Event) -> None:
        """Emit the events and wait until each is decided, stored and acknowledged."""
        for event in events:
            await self.engine.emit(Delivery(event))
        await self.engine.drain(timeout=10)

    async def end(self, run: RunRecord, outcome: str = states.FIXED) -> None:
        """End a run the way the dispatcher does: stored final, then the engine told."""
        run.status = states.SUCCEEDED if outcome == states.FIXED else states.FAILED
        run.outcome, run.finished = outcome, time.time()
        await self.store.save_run(run)
        self.engine.inbox.put_nowait(RunEnded(run))
        await self.engine.drain(timeout=10)

    def decisions(self, rule: str | None = None) -> list[tuple[str, str, str | None]]:
        """(event id, outcome, reason) of every durable decision, in order."""
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            rows = conn.execute(
                "SELECT event_id, outcome, reason, rule FROM decisions ORDER BY seq").fetchall()
        return [(e, o, r) for e, o, r, name in rows if rule is None or name == rule]

    def outcomes(self, rule: str | None = None) -> list[str]:
        return [o for _, o, _ in self.decisions(rule)]

    def remediations(self) -> list[RunRecord]:
        return [r for r in self.runs if not (r.reason or "").startswith("escalation")]

    def escalations(self) -> list[RunRecord]:
        return [r for r in self.runs if (r.reason or "").startswith("escalation")]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "loopd.db"


@contextlib.asynccontextmanager
async def engine_on(db: Path, rules: RuleSet, *, config: GlobalGuards | None = None,
                    inventory: Inventory | None = None, silences: Silences | None = None,
                    ) -> AsyncIterator[Loop]:
    """An engine with guards on the store file ``db``, loaded as the daemon loads it."""
    assert rules.errors == []
    store = SqliteStore(db)
    await store.open()
    inventory = inventory or Inventory()
    sent = Sent()
    engine = Engine(store, rules, inventory=inventory, clock=VirtualClock(), event_time=True,
                    commands=sent, guards=Guards(config or GlobalGuards(), inventory, silences))
    await engine.load()
    task = asyncio.create_task(engine.run())
    try:
        yield Loop(engine, store, db, sent)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()


def fleet(groups: dict[str, int]) -> Inventory:
    """An inventory with ``n`` hosts ``<group>-<i>`` per group."""
    return Inventory({f"{g}-{i}": {"group": g} for g, n in groups.items()
                      for i in range(1, n + 1)})


def rule(name: str, *, extra: str = "", match: str = "labels.alertname: HostDown",
         action: str = "core.noop") -> str:
    return f"""
rules:
  - name: {name}
    on: {{source: alertmanager, match: {{{match}}}}}
    key: "{{{{ event.labels.instance }}}}"
{extra}
    run: {{action: {action}, input: {{host: "{{{{ key }}}}"}}}}
"""


ESCALATE = """\
      escalate:
        action: core.log
        input: {message: "{{ rule }} on {{ key }}: {{ reason }}"}
"""


# -- run modes --------------------------------------------------------------------------

async def test_single_mode_joins_new_events_to_the_open_incident(
    db: Path, rules_from: RulesFrom,
) -> None:
    """In ``single`` mode a second alert for an open incident joins it and starts nothing."""
    async with engine_on(db, rules_from(rule("single"))) as loop:
        await loop.feed(alert("a1", "web-1", T0), alert("a2", "web-1", T0 + 1),
                        alert("b1", "web-2", T0 + 2))
        assert [r.key for r in loop.runs] == ["web-1", "web-2"]
        first = loop.runs[0]
        assert loop.decisions()[1] == ("a2", "joined", "incident already open")
        await loop.end(first)
        await loop.feed(alert("a3", "web-1", T0 + 3))  # the incident closed: a new one
        assert [r.key for r in loop.runs] == ["web-1", "web-2", "web-1"]
        assert loop.runs[2].incident_id != first.incident_id


async def test_queued_mode_runs_one_after_another_up_to_max_queued(
    db: Path, rules_from: RulesFrom,
) -> None:
    """``queued`` keeps at most ``max_queued`` runs waiting and starts each when one ends."""
    text = rule("queued", extra="    run_mode: queued\n    max_queued: 2")
    async with engine_on(db, rules_from(text)) as loop:
        await loop.feed(*(alert(f"q{i}", "web-1", T0 + i) for i in range(4)))
        assert loop.outcomes() == ["run_created", "queued", "queued", "joined"]
        assert loop.decisions()[3][2] == "queue full (2)"
        (first,) = loop.runs  # only the first is handed to the dispatcher
        queued = [r for r in await loop.store.runs_in_status((states.QUEUED,))]
        assert len(queued) == 2 and all(r.incident_id == first.incident_id for r in queued)

        await loop.end(first)
        assert [r.id for r in loop.runs[1:]] == [queued[0].id]
        assert loop.runs[1].status == states.PENDING
        assert (await loop.store.get_run(queued[0].id)).status == states.PENDING  # type: ignore[union-attr]
        await loop.end(loop.runs[1])
        await loop.end(loop.runs[2])
        assert [r.id for r in loop.runs[1:]] == [q.id for q in queued]
        incidents = await loop.store.list_incidents(status="closed")
        assert [i.id for i in incidents] == [first.incident_id]


async def test_parallel_mode_runs_up_to_max_parallel(db: Path, rules_from: RulesFrom) -> None:
    """``parallel`` starts a run per event up to ``max_parallel`` active, then joins."""
    text = rule("parallel", extra="    run_mode: parallel\n    max_parallel: 2")
    async with engine_on(db, rules_from(text)) as loop:
        await loop.feed(*(alert(f"p{i}", "web-1", T0 + i) for i in range(3)))
        assert loop.outcomes() == ["run_created", "run_created", "joined"]
        assert loop.decisions()[2][2] == "2 runs active (max_parallel 2)"
        assert len({r.incident_id for r in loop.runs}) == 1
        await loop.end(loop.runs[0])
        await loop.feed(alert("p3", "web-1", T0 + 3))
        assert loop.outcomes()[-1] == "run_created" and len(loop.runs) == 3


async def test_restart_mode_hands_the_old_run_to_the_dispatcher_to_cancel(
    db: Path, rules_from: RulesFrom,
) -> None:
    """``restart`` records ``restarted``, asks the dispatcher to cancel the run in progress
    (acting or not), after starting it."""
    text = rule("restart", extra="    run_mode: restart")
    async with engine_on(db, rules_from(text)) as loop:
        await loop.feed(alert("r1", "web-1", T0), alert("r2", "web-1", T0 + 1))
        assert loop.outcomes() == ["run_created", "restarted"]
        assert loop.sent.cancels == [CancelRun(loop.runs[0].id, "restarted by event r2",
                                               acting_too=True)]
        incident = loop.engine.open_incident("restart", "web-1")
        assert incident is not None and incident.run_id == loop.runs[1].id


# -- budgets ----------------------------------------------------------------------------

async def test_a_rule_budget_suppresses_runs_beyond_its_count_within_the_window(
    db: Path, rules_from: RulesFrom,
) -> None:
    """``max_runs: {count: 2, per: 1h}`` allows two runs per hour over all keys."""
    text = rule("budget-rule", extra="    guards: {max_runs: {count: 2, per: 1h}}")
    before = sample("loopd_guard_suppressions_total", rule="budget-rule", guard="budget")
    async with engine_on(db, rules_from(text)) as loop:
        await loop.feed(*(alert(f"b{i}", f"web-{i}", T0 + i) for i in range(4)))
        assert loop.outcomes() == ["run_created", "run_created", "suppressed", "suppressed"]
        assert loop.decisions()[2][2] == \
            "guard budget: rule budget of 2 runs per 3600s is spent"
        assert sample("loopd_guard_suppressions_total", rule="budget-rule",
                      guard="budget") - before == 2
        assert metrics.current().registry.get_sample_value(
            "loopd_budget_remaining", {"rule": "budget-rule"}) == 0
        await loop.feed(alert("later", "web-9", T0 + HOUR + 1))  # the first start is out
        assert loop.outcomes()[-1] == "run_created"


async def test_a_key_budget_limits_one_key_and_not_the_others(
    db: Path, rules_from: RulesFrom,
) -> None:
    """``max_runs_per_key`` stops a key that keeps coming back; other keys still run."""
    text = rule("budget-key", extra="    guards: {max_runs_per_key: {count: 2, per: 1h}}")
    async with engine_on(db, rules_from(text)) as loop:
        for i in range(3):
            await loop.feed(alert(f"k{i}", "web-1", T0 + i))
            if loop.engine.open_incident("budget-key", "web-1"):
                await loop.end(loop.runs[-1])
        await loop.feed(alert("other", "web-2", T0 + 5))
        assert loop.outcomes() == ["run_created", "run_created", "suppressed", "run_created"]
        assert loop.decisions()[2][2] == \
            "guard budget: key budget of 2 runs per 3600s is spent"


async def test_the_fleet_budget_counts_runs_of_every_rule(
    db: Path, rules_from: RulesFrom,
) -> None:
    """``guards.max_runs`` in loopd.yaml caps runs over all rules together."""
    rules = rules_from(rule("fleet-a", match="labels.alertname: A")
                       + rule("fleet-b", match="labels.alertname: B").replace("rules:\n", ""))
    config = GlobalGuards.model_validate({"max_runs": {"count": 3, "per": "1h"}})
    async with engine_on(db, rules, config=config) as loop:
        await loop.feed(alert("a1", "h1", T0, alertname="A"), alert("b1", "h2", T0 + 1,
                                                                     alertname="B"),
                        alert("a2", "h3", T0 + 2, alertname="A"),
                        alert("b2", "h4", T0 + 3, alertname="B"))
        assert len(loop.runs) == 3
        assert loop.decisions()[-1] == (
            "b2", "suppressed", "guard budget: fleet budget of 3 runs per 3600s is spent")


async def test_budgets_are_rebuilt_from_the_runs_after_a_restart(
    db: Path, rules_from: RulesFrom,
) -> None:
    """Runs started before a restart still count against the budget after it."""
    rules = rules_from(rule("budget-restart", extra="    guards: {max_runs: {count: 2, per: 1h}}"))
    async with engine_on(db, rules) as loop:
        await loop.feed(alert("x1", "web-1", T0), alert("x2", "web-2", T0 + 1))
        assert len(loop.runs) == 2
    async with engine_on(db, rules) as loop:
        await loop.feed(alert("x3", "web-3", T0 + 2))
        assert loop.runs == []
        assert loop.outcomes()[-1] == "suppressed"
        await loop.feed(alert("x4", "web-4", T0 + HOUR + 1))
        assert len(loop.runs) == 1


# -- circuit breaker -------------------------------------------------------------------

BREAKER = rule("breaker", extra="""    guards:
      breaker: {failures: 2, within: 1h, cool_off: 10m}
""" + ESCALATE)


async def test_the_breaker_opens_after_runs_that_did_not_fix_escalates_once_and_cools_off(
    db: Path, rules_from: RulesFrom,
) -> None:
    """Two not-fixed runs within the hour open the breaker: matches are suppressed, one
    escalation run starts, and the breaker closes again ``cool_off`` after it opened."""
    suppressed = sample("loopd_guard_suppressions_total", rule="breaker", guard="breaker")
    async with engine_on(db, rules_from(BREAKER)) as loop:
        await loop.feed(alert("f1", "web-1", T0))
        await loop.end(loop.runs[0], states.NOT_FIXED)
        await loop.feed(alert("f2", "web-2", T0 + 60))
        await loop.end(loop.runs[1], states.INCONCLUSIVE)  # opens at T0 + 60
        assert sample("loopd_circuit_open", rule="breaker") == 1
        (escalation,) = loop.escalations()
        assert (escalation.kind, escalation.target, escalation.key) == (
            "action", "core.log", "web-2")
        assert escalation.input["message"].startswith(
            "breaker on web-2: 2 runs not fixed within 3600s (last on web-2: inconclusive)")

        await loop.feed(alert("f3", "web-3", T0 + 120), alert("f4", "web-4", T0 + 659))
        assert loop.outcomes()[-2:] == ["suppressed", "suppressed"]
        assert loop.decisions()[-1][2] == ("guard breaker: circuit open since 2 runs not "
                                           "fixed within 3600s (last on web-2: inconclusive)")
        assert len(loop.escalations()) == 1  # once, however many matches come
        assert sample("loopd_guard_suppressions_total", rule="breaker",
                      guard="breaker") - suppressed == 2

        await loop.feed(alert("f5", "web-5", T0 + 660))  # cool-off over
        assert loop.outcomes()[-1] == "run_created"
        assert sample("loopd_circuit_open", rule="breaker") == 0


async def test_fixed_and_cancelled_runs_never_open_the_breaker(
    db: Path, rules_from: RulesFrom,
) -> None:
    """Only not-fixed, failed and inconclusive outcomes count as breaker failures."""
    async with engine_on(db, rules_from(BREAKER)) as loop:
        for i, outcome in enumerate([states.FIXED, states.OUTCOME_CANCELLED, states.FIXED,
                                     states.OUTCOME_FAILED]):
            await loop.feed(alert(f"o{i}", f"web-{i}", T0 + i))
            await loop.end(loop.runs[-1], outcome)
        await loop.feed(alert("next", "web-9", T0 + 10))
        assert loop.outcomes()[-1] == "run_created"
        assert loop.escalations() == []


async def test_runs_that_only_notified_never_open_the_breaker(
    db: Path, rules_from: RulesFrom,
) -> None:
    """Outcome ``done`` (succeeded without confirming) is not a breaker failure."""
    async with engine_on(db, rules_from(BREAKER)) as loop:
        for i in range(3):
            await loop.feed(alert(f"d{i}", "web-1", T0 + i))
            await loop.end(loop.runs[-1], states.DONE)
        await loop.feed(alert("next", "web-1", T0 + 10))
        assert loop.outcomes()[-1] == "run_created"
        assert loop.escalations() == []


async def test_an_open_breaker_survives_a_restart(db: Path, rules_from: RulesFrom) -> None:
    """The breaker's state is in the store: after a restart it is still open, and the
    escalation does not start a second time."""
    rules = rules_from(BREAKER)
    async with engine_on(db, rules) as loop:
        for i in range(2):
            await loop.feed(alert(f"s{i}", f"web-{i}", T0 + i))
            await loop.end(loop.runs[-1], states.NOT_FIXED)
        assert len(loop.escalations()) == 1
    async with engine_on(db, rules) as loop:
        await loop.feed(alert("s2", "web-2", T0 + 30))
        assert loop.runs == []
        _, outcome, reason = loop.decisions()[-1]
        assert outcome == "suppressed"
        assert (reason or "").startswith("guard breaker: circuit open since 2 runs not fixed")
        assert loop.engine.close_breaker("breaker")  # for every replica: in the store too
        await loop.engine.drain(5.0)
        await loop.feed(alert("s3", "web-3", T0 + 40))
        assert len(loop.runs) == 1


async def test_a_per_key_breaker_stops_only_that_key(db: Path, rules_from: RulesFrom) -> None:
    """``per: key`` counts failures per key: the failing key stops, the others still run."""
    text = BREAKER.replace("cool_off: 10m}", "cool_off: 10m, per: key}")
    async with engine_on(db, rules_from(text)) as loop:
        for i in range(2):
            await loop.feed(alert(f"w{i}", "web-1", T0 + i))
            await loop.end(loop.runs[-1], states.NOT_FIXED)
        await loop.feed(alert("again", "web-1", T0 + 5), alert("other", "web-2", T0 + 6))
        assert loop.outcomes()[-2:] == ["suppressed", "run_created"]
        assert set(loop.engine.guards.breakers) == {"breaker|web-1"}


# -- blast radius ----------------------------------------------------------------------

async def test_blast_radius_limits_how_many_entities_of_a_group_are_remediated(
    db: Path, rules_from: RulesFrom,
) -> None:
    """``blast_radius: {max: 50%}`` of a 4-host group lets 2 be remediated at once."""
    text = rule("blast", extra='    guards: {blast_radius: {max: "50%"}}')
    suppressed = sample("loopd_guard_suppressions_total", rule="blast", guard="blast_radius")
    async with engine_on(db, rules_from(text), inventory=fleet({"web": 4, "db": 2})) as loop:
        await loop.feed(*(alert(f"w{i}", f"web-{i}", T0 + i) for i in (1, 2, 3)),
                        alert("d1", "db-1", T0 + 4))
        assert [r.key for r in loop.runs] == ["web-1", "web-2", "db-1"]
        assert loop.decisions()[2] == ("w3", "suppressed", "guard blast_radius: 2 of 4 "
                                       "entities of group web under remediation (max 50%)")
        assert sample("loopd_guard_suppressions_total", rule="blast",
                      guard="blast_radius") - suppressed == 1
        await loop.end(loop.runs[0])  # web-1 fixed: room for one more
        await loop.feed(alert("w3-again", "web-3", T0 + 10))
        assert loop.runs[-1].key == "web-3"


async def test_a_key_already_under_remediation_is_not_counted_twice(
    db: Path, rules_from: RulesFrom,
) -> None:
    """Another rule (or run) for an entity already being remediated does not use more radius."""
    rules = rules_from(
        rule("blast-a", match="labels.alertname: A",
             extra="    guards: {blast_radius: {max: 1}}")
        + rule("blast-b", match="labels.alertname: B",
               extra="    guards: {blast_radius: {max: 1}}").replace("rules:\n", ""))
    async with engine_on(db, rules, inventory=fleet({"web": 3})) as loop:
        await loop.feed(alert("a1", "web-1", T0, alertname="A"),
                        alert("b1", "web-1", T0 + 1, alertname="B"),
                        alert("b2", "web-2", T0 + 2, alertname="B"))
        assert [(r.rule, r.key) for r in loop.runs] == [("blast-a", "web-1"),
                                                        ("blast-b", "web-1")]
        assert loop.outcomes() == ["run_created", "run_created", "suppressed"]
        await loop.end(loop.runs[0])  # web-1 is still under remediation by blast-b
        await loop.feed(alert("b3", "web-3", T0 + 3, alertname="B"))
        assert loop.outcomes()[-1] == "suppressed"


async def test_blast_radius_can_name_the_group_it_limits(
    db: Path, rules_from: RulesFrom,
) -> None:
    """``group: db`` limits the db group only; a global radius applies to rules without one."""
    rules = rules_from(
        rule("blast-db", match="labels.alertname: A",
             extra="    guards: {blast_radius: {max: 1, group: db}}")
        + rule("blast-global", match="labels.alertname: B").replace("rules:\n", ""))
    config = GlobalGuards.model_validate({"blast_radius": {"max": 1}})
    async with engine_on(db, rules, config=config,
                         inventory=fleet({"web": 3, "db": 3})) as loop:
        await loop.feed(*(alert(f"w{i}", f"web-{i}", T0 + i, alertname="A") for i in (1, 2)),
                        *(alert(f"d{i}", f"db-{i}", T0 + 5 + i, alertname="A") for i in (1, 2)))
        assert [r.key for r in loop.runs] == ["web-1", "web-2", "db-1"]
        await loop.feed(alert("g1", "web-3", T0 + 10, alertname="B"))  # web: 2 busy, max 1
        assert loop.decisions()[-1][2] == ("guard blast_radius: 2 of 3 entities of group web "
                                           "under remediation (max 1)")


async def test_blast_radius_survives_a_restart(db: Path, rules_from: RulesFrom) -> None:
    """Entities under remediation are rebuilt from the open incidents at restart."""
    rules = rules_from(rule("blast-restart", extra="    guards: {blast_radius: {max: 1}}"))
    inventory = fleet({"web": 3})
    async with engine_on(db, rules, inventory=inventory) as loop:
        await loop.feed(alert("r1", "web-1", T0))
        assert len(loop.runs) == 1
    async with engine_on(db, rules, inventory=inventory) as loop:
        await loop.feed(alert("r2", "web-2", T0 + 1))
        assert loop.runs == [] and loop.outcomes()[-1] == "suppressed"
        assert loop.engine.guards.remediating["web"] == {"web-1": 1}


# -- flapping --------------------------------------------------------------------------

FLAPPING = rule("flapping", extra="""    guards:
      flapping: {fixes: 2, within: 6h}
""" + ESCALATE)


async def test_a_fix_that_does_not_hold_escalates_once_instead_of_repeating(
    db: Path, rules_from: RulesFrom,
) -> None:
    """The same key fixed twice within 6h: the third alert escalates instead of a third fix,
    the fourth starts nothing, and other keys are not affected."""
    async with engine_on(db, rules_from(FLAPPING)) as loop:
        for i in range(2):
            await loop.feed(alert(f"f{i}", "web-1", T0 + i * 600))
            await loop.end(loop.runs[-1], states.FIXED)
        await loop.feed(alert("f2", "web-1", T0 + 1200))
        reason = "fixed 2 times within 21600s: the fix does not hold"
        assert loop.decisions()[-1] == ("f2", "suppressed", f"guard flapping: {reason}")
        (escalation,) = loop.escalations()
        assert escalation.input == {"message": f"flapping on web-1: {reason}"}
        await loop.feed(alert("f3", "web-1", T0 + 1300), alert("g", "web-2", T0 + 1301))
        assert loop.outcomes()[-2:] == ["suppressed", "run_created"]
        assert len(loop.escalations()) == 1
        assert len(loop.remediations()) == 3
        # once the fixes are older than the window the key is remediated again
        await loop.feed(alert("f4", "web-1", T0 + 600 + 6 * HOUR))
        assert loop.outcomes()[-1] == "run_created"


async def test_flapping_escalates_only_once_across_a_restart(
    db: Path, rules_from: RulesFrom,
) -> None:
    """A key that already escalated for flapping does not escalate again after a restart."""
    rules = rules_from(FLAPPING)
    async with engine_on(db, rules) as loop:
        for i in range(2):
            await loop.feed(alert(f"f{i}", "web-1", T0 + i))
            await loop.end(loop.runs[-1], states.FIXED)
        await loop.feed(alert("f2", "web-1", T0 + 2))
        assert len(loop.escalations()) == 1
    async with engine_on(db, rules) as loop:
        await loop.feed(alert("f3", "web-1", T0 + 3))
        assert loop.outcomes()[-1] == "suppressed"
        assert loop.runs == []


# -- resolved alerts -------------------------------------------------------------------

async def test_a_resolved_alert_never_starts_a_run(db: Path, rules_from: RulesFrom) -> None:
    """A resolved alert is suppressed (guard resolved) unless the rule asks for resolutions."""
    rules = rules_from(rule("any-status") + rule(
        "on-resolved", match="status: resolved, labels.alertname: HostDown").replace(
            "rules:\n", ""))
    before = sample("loopd_guard_suppressions_total", rule="any-status", guard="resolved")
    async with engine_on(db, rules) as loop:
        await loop.feed(alert("r1", "web-1", T0, status="resolved"))
        assert [r.rule for r in loop.runs] == ["on-resolved"]
        assert loop.decisions("any-status") == [
            ("r1", "suppressed", "guard resolved: a resolved alert never starts a run")]
        assert sample("loopd_guard_suppressions_total", rule="any-status",
                      guard="resolved") - before == 1


async def test_a_resolved_alert_cancels_the_queued_runs_of_its_incident(
    db: Path, rules_from: RulesFrom,
) -> None:
    """Runs queued behind the current one are cancelled when their alert resolves."""
    text = rule("queued-resolve", extra="    run_mode: queued")
    async with engine_on(db, rules_from(text)) as loop:
        await loop.feed(alert("q1", "web-1", T0, fingerprint="fp"),
                        alert("q2", "web-1", T0 + 1, fingerprint="fp"))
        (queued,) = await loop.store.runs_in_status((states.QUEUED,))
        await loop.feed(alert("ok", "web-1", T0 + 2, status="resolved", fingerprint="fp"))
        stored = await loop.store.get_run(queued.id)
        assert stored is not None
        assert (stored.status, stored.reason) == (states.CANCELLED,
                                                  "alert resolved before it ran")
        # the active run is the dispatcher's to cancel if it has not acted yet
        assert loop.sent.cancels == [CancelRun(loop.runs[0].id,
                                               "alert resolved (ok) before the run acted")]
        await loop.end(loop.runs[0])
        assert len(loop.runs) == 1  # nothing left to start


# -- silences --------------------------------------------------------------------------

def silence(matchers: list[tuple[str, str, bool, bool]], hours: float = 1.0) -> dict[str, Any]:
    now = time.time()

    def rfc(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")

    return {"matchers": [{"name": n, "value": v, "isRegex": r, "isEqual": e}
                         for n, v, r, e in matchers],
            "startsAt": rfc(now - 60), "endsAt": rfc(now + hours * HOUR),
            "createdBy": "ops", "comment": "planned work"}


async def test_a_silence_in_alertmanager_suppresses_matching_alerts(
    db: Path, rules_from: RulesFrom, alertmanager_api: AlertmanagerApi,
) -> None:
    """Once the silences are fetched, an alert they match is suppressed (guard silence);
    an alert they do not match still runs."""
    silences = Silences(alertmanager_api.url)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{alertmanager_api.url}/api/v2/silences", json=silence(
                [("alertname", "HostDown", False, True), ("instance", "web-1", False, True)]),
                ) as resp:
            sid = (await resp.json())["silenceID"]
        now = time.time()
        async with engine_on(db, rules_from(rule("silenced")), silences=silences) as loop:
            await loop.feed(alert("before", "web-1", now))  # not fetched yet: runs
            await silences.fetch(http)
            assert silences.error is None and [s.id for s in silences.active] == [sid]
            await loop.feed(alert("s1", "web-1", now + 1, fingerprint="other"),
                            alert("s2", "web-2", now + 2))
            assert [r.key for r in loop.runs] == ["web-1", "web-2"]
            assert loop.decisions()[1] == ("s1", "joined", "incident already open")
            await loop.end(loop.runs[0])
            await loop.feed(alert("s3", "web-1", now + 3, fingerprint="third"))
            assert loop.decisions()[-1] == (
                "s3", "suppressed", f"guard silence: silenced in Alertmanager by {sid}")


async def test_regex_and_negative_matchers_select_what_a_silence_covers(
    db: Path, rules_from: RulesFrom, alertmanager_api: AlertmanagerApi,
) -> None:
    """``instance=~web-.*`` with ``env!=prod`` silences web hosts outside prod only."""
    silences = Silences(alertmanager_api.url)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{alertmanager_api.url}/api/v2/silences", json=silence(
                [("instance", "web-.*", True, True), ("env", "prod", False, False)])) as resp:
            assert resp.status == 200
        await silences.fetch(http)
    now = time.time()
    async with engine_on(db, rules_from(rule("regex")), silences=silences) as loop:
        await loop.feed(alert("1", "web-1", now, env="staging"),
                        alert("2", "web-2", now, env="prod"),
                        alert("3", "db-1", now, env="staging"),
                        alert("4", "xweb-3", now, env="staging"))  # a full match only
        assert sorted(str(r.key) for r in loop.runs) == ["db-1", "web-2", "xweb-3"]
        assert loop.outcomes() == ["suppressed", "run_created", "run_created", "run_created"]


def test_only_active_silences_are_kept_and_bad_regexes_are_skipped() -> None:
    """Expired and pending silences are dropped; a silence with a bad regex is ignored whole,
    since dropping only that matcher would silence more alerts than the operator meant."""
    body = [
        {"id": "a", "status": {"state": "active"}, "endsAt": "2099-01-01T00:00:00Z",
         "matchers": [{"name": "job", "value": "node", "isRegex": False}]},
        {"id": "b", "status": {"state": "expired"}, "endsAt": "2000-01-01T00:00:00Z",
         "matchers": [{"name": "job", "value": "node", "isRegex": False}]},
        {"id": "c", "status": {"state": "pending"}, "endsAt": "2099-01-01T00:00:00Z",
         "matchers": []},
        {"id": "d", "status": {"state": "active"}, "endsAt": "2099-01-01T00:00:00Z",
         "matchers": [{"name": "job", "value": "(", "isRegex": True},
                      {"name": "env", "value": "lab", "isRegex": False}]},
    ]
    active = parse_silences(body, time.time())
    assert [s.id for s in active] == ["a"]
    assert active[0].matches({"job": "node", "env": "prod"})
    assert not active[0].matches({"job": "web"})


async def test_silences_keep_the_last_good_list_when_alertmanager_fails(
    alertmanager_api: AlertmanagerApi,
) -> None:
    """A failed refresh keeps the silences already known and records the error."""
    silences = Silences(alertmanager_api.url)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{alertmanager_api.url}/api/v2/silences",
                             json=silence([("job", "node", False, True)])):
            pass
        await silences.fetch(http)
        alertmanager_api.fail_next(1, status=503)
        await silences.fetch(http)
    assert len(silences.active) == 1
    assert silences.error is not None and "503" in silences.error
    assert silences.match({"job": "node"}, time.time()) is not None


# -- maintenance windows ---------------------------------------------------------------

async def test_global_windows_apply_to_the_rules_and_groups_they_name(
    db: Path, rules_from: RulesFrom,
) -> None:
    """A global freeze stops everything; a scoped window only its rules and groups."""
    rules = rules_from(rule("mw-a", match="labels.alertname: A")
                       + rule("mw-b", match="labels.alertname: B").replace("rules:\n", ""))
    day = 86400.0
    start = datetime.fromtimestamp(T0 + day, UTC).isoformat()
    end = datetime.fromtimestamp(T0 + 2 * day, UTC).isoformat()
    config = GlobalGuards.model_validate({"maintenance": [
        {"name": "freeze", "start": start, "end": end},
        {"name": "db-patching", "start": datetime.fromtimestamp(T0, UTC).isoformat(),
         "end": start, "rules": ["mw-a"], "groups": ["db"]},
    ]})
    before = sample("loopd_guard_suppressions_total", rule="mw-a", guard="maintenance")
    async with engine_on(db, rules, config=config, inventory=fleet({"web": 2, "db": 2})) as loop:
        await loop.feed(alert("1", "db-1", T0 + 1, alertname="A"),    # patching: rule, group
                        alert("2", "web-1", T0 + 2, alertname="A"),   # another group
                        alert("3", "db-2", T0 + 3, alertname="B"),    # another rule
                        alert("4", "web-2", T0 + day, alertname="A"),  # the freeze
                        alert("5", "nowhere", T0 + day + 1, alertname="B"))
        assert [r.key for r in loop.runs] == ["web-1", "db-2"]
        assert loop.decisions()[0][2] == "guard maintenance: maintenance window db-patching " \
                                         "is active"
        assert loop.decisions()[3][2] == "guard maintenance: maintenance window freeze " \
                                         "is active"
        assert loop.outcomes()[4] == "suppressed"
        assert sample("loopd_guard_suppressions_total", rule="mw-a",
                      guard="maintenance") - before == 2


async def test_a_rule_window_recurs_weekly_and_can_be_limited_to_groups(
    db: Path, rules_from: RulesFrom,
) -> None:
    """A rule's own weekly window holds on its days and hours, for the groups it names."""
    text = rule("mw-rule", extra="""    guards:
      maintenance:
        - {name: nightly, from: "22:00", to: "06:00", groups: [db]}
""")
    night = datetime(2024, 1, 5, 23, 0, tzinfo=UTC).timestamp()  # well before T0: no memory
    async with engine_on(db, rules_from(text), inventory=fleet({"web": 1, "db": 2})) as loop:
        await loop.feed(alert("n1", "db-1", night), alert("n2", "web-1", night + 1),
                        alert("d1", "db-2", night + 8 * HOUR))  # 07:00: outside
        assert [r.key for r in loop.runs] == ["web-1", "db-2"]
        assert loop.decisions()[0][2] == \
            "guard maintenance: maintenance window nightly is active"


# -- shadow mode and the order of the guards -------------------------------------------------

async def test_shadow_mode_records_what_would_run_and_runs_nothing(
    db: Path, rules_from: RulesFrom,
) -> None:
    """A shadow rule decides ``shadow`` ("would run"), starts no run, and throttles and
    budgets still apply as if it had run."""
    text = rule("shadow", extra="""    mode: shadow
    throttle: {once_within: 10m}
    guards: {max_runs: {count: 2, per: 1h}}""")
    async with engine_on(db, rules_from(text)) as loop:
        await loop.feed(alert("s1", "web-1", T0), alert("s2", "web-1", T0 + 1),
                        alert("s3", "web-2", T0 + 2), alert("s4", "web-3", T0 + 3))
        assert loop.runs == []
        assert await loop.store.list_runs() == []
        assert await loop.store.list_incidents() == []
        assert loop.decisions() == [
            ("s1", "shadow", "would run action core.noop (shadow mode)"),
            ("s2", "suppressed", "throttled: once within 600s (599s left)"),
            ("s3", "shadow", "would run action core.noop (shadow mode)"),
            ("s4", "suppressed", "guard budget: rule budget of 2 runs per 3600s is spent"),
        ]


async def test_the_first_guard_that_says_no_is_the_one_recorded(
    db: Path, rules_from: RulesFrom, alertmanager_api: AlertmanagerApi,
) -> None:
    """Guards are checked in order (silence, maintenance, breaker, flapping, budgets, blast
    radius): an alert stopped by several is recorded with the first."""
    text = rule("ordered", extra="""    guards:
      max_runs: {count: 1, per: 1h}
      blast_radius: {max: 1}
      maintenance: [{name: freeze, start: 2000-01-01T00:00:00Z, end: 2000-01-02T00:00:00Z}]
""")
    silences = Silences(alertmanager_api.url)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{alertmanager_api.url}/api/v2/silences",
                             json=silence([("instance", "web-3", False, True)])):
            pass
        await silences.fetch(http)
    freeze = datetime(2000, 1, 1, 12, tzinfo=UTC).timestamp()
    async with engine_on(db, rules_from(text), inventory=fleet({"web": 3}),
                         silences=silences) as loop:
        await loop.feed(alert("1", "web-1", T0),              # runs: budget and radius used
                        alert("2", "web-2", T0 + 1),          # budget before blast radius
                        alert("3", "web-3", freeze))          # silence before maintenance
        assert [o for _, o, _ in loop.decisions()] == ["run_created", "suppressed",
                                                       "suppressed"]
        assert [(r or "").split(":")[0] for _, _, r in loop.decisions()[1:]] == [
            "guard budget", "guard silence"]
        await loop.feed(alert("4", "web-2", freeze + 1))     # maintenance before budget
        assert (loop.decisions()[-1][2] or "").startswith("guard maintenance")
