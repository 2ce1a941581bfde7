"""Several ``loopd run`` replicas on one store and one Kafka consumer group (issue #10).

Each replica is a real daemon process with its own ``LOOPD_REPLICA`` name and its own
folder (config, logs); they share one store (PostgreSQL, the issue's target, or a SQLite
file) and one consumer group on the tansu broker. In the chaos and fencing tests every
remediation ends in a POST to the ``Receiver`` (a non-idempotent action), which records
the run id it was made for and the replica that made it (a header set from the replica's
own pack config), so a duplicate side effect, or one made by a replica that lost its
lease, is visible.

* chaos: three replicas, 10,000 keyed Kafka records and 1,000 Alertmanager alerts, two
  of the replicas killed with ``kill -9`` mid-stream and restarted;
* fencing: a replica frozen with ``SIGSTOP`` past its lease writes and acts on nothing
  once it is thawed;
* a ``for:`` window keeps its start when its partition moves to another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from loopd.runs import states
from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, LoopdProcess, SharedStore
from tests.e2e.test_kafka import kafka_source
from tests.servers import wait_until
from tests.servers.http_targets import Target
from tests.servers.kafka import KafkaBroker, Record, create_topic, produce, producer

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

LEASE = 5.0  # store.lease of every replica: silent this long, a replica loses its runs
FINAL = tuple(str(s) for s in states.FINAL)
ACTIVE = tuple(str(s) for s in states.ACTIVE)
ACT = "cluster.act"


# -- the receiver of every action -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    run: str
    key: str
    replica: str
    at: float  # time.time() when it arrived


class Receiver(Target):
    """``POST /act``: records the call (run id, key, the replica that sent it), then
    answers after ``delay`` s, so runs are in flight when a test kills a replica; a call
    for a key in ``held`` is answered only once the test sets its event."""

    def __init__(self, delay: float = 0.2) -> None:
        super().__init__()
        self.delay = delay
        self.calls: list[Call] = []
        self.held: dict[str, asyncio.Event] = {}

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/act", self._act)

    async def _act(self, request: web.Request) -> web.Response:
        body = await request.json()
        key = str(body["key"])
        self.calls.append(Call(str(body["run"]), key,
                               request.headers.get("X-Loopd-Replica", "?"), time.time()))
        gate = self.held.get(key)
        if gate is not None:
            await gate.wait()
        else:
            await asyncio.sleep(self.delay)  # the remote side's work, not a test wait
        return web.json_response({"ok": True})

    async def stop(self) -> None:
        for gate in self.held.values():
            gate.set()
        await super().stop()

    def per_run(self) -> Counter[str]:
        return Counter(c.run for c in self.calls)


@contextlib.asynccontextmanager
async def receiving(delay: float = 0.2) -> AsyncIterator[Receiver]:
    receiver = Receiver(delay)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


# -- replicas ---------------------------------------------------------------------------

PACK = """\
name: cluster
version: 0.0.1
description: the non-idempotent remediation of the cluster tests
config:
  url: {type: string, required: true}
  replica: {type: string, required: true}
actions:
  act:
    runner: http
    method: POST
    url: "{{ config.url }}/act"
    headers: {X-Loopd-Replica: "{{ config.replica }}"}
    json: {run: "{{ input.run }}", key: "{{ input.key }}"}
    input:
      run: {type: string, required: true}
      key: {type: string, required: true}
    retries: 0
    timeout: 60s
    idempotent: false
"""


def workflow(delay: float | None) -> str:
    """One action for the run's host, after ``delay`` s (a timer the run's owner keeps)."""
    wait = f"    delay: {delay:g}s\n" if delay else ""
    return ("input: [host]\ntasks:\n  act:\n" + wait + f"    action: {ACT}\n"
            '    input: {run: "{{ run.id }}", key: "{{ ctx.host }}"}\n')


def store_section(store: SharedStore, lease: float = LEASE) -> dict[str, Any]:
    """The ``store:`` section of every replica's loopd.yaml."""
    return store.config(lease=f"{lease:g}s")


def replica(factory: Factory, root: Path, name: str, store: SharedStore, receiver: Receiver,
            *, sources: list[dict[str, Any]], rules: list[dict[str, Any]],
            delay: float | None = None, guards: dict[str, Any] | None = None
            ) -> LoopdProcess:
    """One replica: its own folder, config and ``LOOPD_REPLICA``; the shared store."""
    config = Config(root=root / name)
    config.sources = sources
    config.rules = {"cluster.yaml": rules}
    config.pack_config["cluster"] = {"url": receiver.url, "replica": name}
    config.add_pack("cluster", {"pack.yaml": PACK,
                                "workflows/remediate.yaml": workflow(delay),
                                "workflows/act_now.yaml": workflow(None)})
    config.extra["store"] = store_section(store)
    if guards is not None:
        config.extra["guards"] = guards
    config.write()
    return factory(config, env={"LOOPD_REPLICA": name, **store.env})


@pytest.fixture
async def shared_store(request: pytest.FixtureRequest, tmp_path: Path
                       ) -> AsyncIterator[SharedStore]:
    """The store the replicas share; parametrized ``postgres`` (a database of its own on
    the test PostgreSQL server) or ``sqlite`` (one file)."""
    kind = getattr(request, "param", "postgres")
    if kind == "postgres":
        store = SharedStore(dsn=request.getfixturevalue("postgres_dsn"))
    else:
        store = SharedStore(path=tmp_path / "shared" / "loopd.db")
    try:
        yield store
    finally:
        await store.close()


async def runs_of(store: SharedStore, owner: str) -> dict[str, int]:
    """Active runs owned by ``owner``: id -> epoch."""
    marks = ",".join("?" * len(ACTIVE))
    rows = await store.query(
        f"SELECT id, epoch FROM runs WHERE owner=? AND status IN ({marks})", (owner, *ACTIVE))
    return {str(r[0]): int(r[1]) for r in rows}


async def count(store: SharedStore, sql: str, params: tuple[Any, ...] = ()) -> int:
    return int(await store.scalar(sql, params) or 0)


def lease_lost_lines(daemon: LoopdProcess) -> list[dict[str, Any]]:
    """The daemon's log lines saying it lost a run's lease (``metrics.lease_lost``)."""
    return [ln for ln in daemon.log_lines() if str(ln.get("event", "")).startswith("lease lost")]


# -- 1. chaos ---------------------------------------------------------------------------

RECORDS = 10_000
ALERTS = 1_000
HOSTS = 40
PARTITIONS = 6
BUDGET = 50
RUN_DELAY = 2.0  # each run waits this long before it acts: runs are in flight at a kill
ALERT_BATCH = 20


def record(i: int) -> Record:
    """Record ``i`` of the stream, keyed by its host; every 163rd one is hot."""
    host = f"host-{i % HOSTS}"
    return Record({"n": i, "host": host, "cpu": 95 if i % 163 == 0 else 20}, key=host)


def hot(i: int) -> bool:
    return i % 163 == 0


def alert(i: int) -> dict[str, Any]:
    """Alert ``i``: every 25th (from the 4th) a NodeDown a rule acts on, the rest DiskFull."""
    name = "NodeDown" if i % 25 == 3 else "DiskFull"
    instance = f"node-{i % 30}"
    return {
        "status": "firing",
        "labels": {"alertname": name, "instance": instance, "job": "node",
                   "severity": "critical"},
        "annotations": {"summary": f"{name} on {instance}"},
        "startsAt": "2026-11-23T03:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph", "fingerprint": f"{i:016x}",
    }


def notification(alerts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"version": "4", "groupKey": "{}:{job=\"node\"}", "truncatedAlerts": 0,
            "status": "firing", "receiver": "loopd", "groupLabels": {"job": "node"},
            "commonLabels": {"job": "node"}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093", "alerts": alerts}


CHAOS_RULES: list[dict[str, Any]] = [
    # a decision for every record and every alert (`for: 1h` never fires): none lost
    {"name": "seen", "on": {"source": "bus"}, "key": "{{ event.host }}", "for": "1h",
     "run": {"action": "core.noop"}},
    {"name": "alert-seen", "on": {"source": "alertmanager"},
     "key": "{{ event.labels.instance }}", "for": "1h", "run": {"action": "core.noop"}},
    {"name": "cpu-high", "on": {"source": "bus"}, "if": "event.cpu > 90",
     "key": "{{ event.host }}",
     "run": {"workflow": "cluster.remediate", "input": {"host": "{{ event.host }}"}}},
    {"name": "node-down", "on": {"source": "alertmanager",
                                 "match": {"status": "firing", "labels.alertname": "NodeDown"}},
     "key": "{{ event.labels.instance }}",
     "run": {"workflow": "cluster.remediate", "input": {"host": "{{ event.labels.instance }}"}}},
]


async def produce_paced(bootstrap: str, topic: str, decided: Callable[[], Awaitable[int]],
                        *, window: int = 600, batch: int = 100) -> None:
    """Produce the whole stream, staying at most ``window`` records ahead of the
    decisions, so records are still flowing whenever the test kills a replica."""
    async with producer(bootstrap) as prod:
        for start in range(0, RECORDS, batch):
            async def caught_up(s: int = start) -> bool:
                return s - await decided() < window

            await wait_until(caught_up, timeout=90, interval=0.05,
                             what=f"the replicas to decide up to record {start - window}")
            sent = []
            for i in range(start, min(start + batch, RECORDS)):
                rec = record(i)
                assert rec.key is not None
                sent.append(await prod.send(topic, rec.encoded(), key=rec.key.encode()))
            await asyncio.gather(*sent)


async def post_alerts(replicas: list[LoopdProcess], decided: Callable[[], Awaitable[int]]
                      ) -> int:
    """Post the alerts in batches spread round-robin over the live replicas, interleaved
    with the Kafka stream; every 5th batch is posted to a second replica too (Alertmanager
    sends a group again). A post that fails (its replica died) goes to the next one, as a
    Service would route it. Returns how many posts were made."""
    batches = [[alert(i) for i in range(s, s + ALERT_BATCH)] for s in range(0, ALERTS, ALERT_BATCH)]
    per_batch = RECORDS // len(batches)
    posts = 0
    async with aiohttp.ClientSession() as http:
        async def deliver(body: bytes, first: int) -> None:
            nonlocal posts
            deadline = time.monotonic() + 60
            turn = first
            while True:
                target = replicas[turn % len(replicas)]
                turn += 1
                if not target.running:
                    continue
                try:
                    async with http.post(target.url + "/v1/alertmanager", data=body,
                                         headers={"Content-Type": "application/json"},
                                         timeout=aiohttp.ClientTimeout(total=20)) as resp:
                        if resp.status == 200:
                            posts += 1
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                assert time.monotonic() < deadline, "no replica accepted an alert batch in 60 s"
                await asyncio.sleep(0.05)  # every replica refused: Alertmanager's retry pause

        for n, batch in enumerate(batches):
            async def reached(n: int = n) -> bool:
                return await decided() >= n * per_batch

            await wait_until(reached, timeout=90, interval=0.05,
                             what=f"the stream to reach alert batch {n}")
            body = orjson.dumps(notification(batch))
            await deliver(body, n)
            if n % 5 == 0:
                await deliver(body, n + 1)
    return posts


@dataclass
class Kill:
    name: str
    at: float                # time.time() of the kill
    runs: dict[str, int]     # its active runs then: id -> epoch


@pytest.mark.kafka
@pytest.mark.parametrize("shared_store", ["postgres", "sqlite"], indirect=True)
async def test_three_replicas_survive_two_kill_9s_deciding_every_event_once_acting_once(
        kafka_broker: KafkaBroker, kafka_topic: str, shared_store: SharedStore,
        tmp_path: Path, loopd_factory: Factory) -> None:
    """Three replicas share a 10,000-record keyed stream and 1,000 alerts posted to any of
    them; two are killed with kill -9 while their runs wait, later restarted: every event
    is decided exactly once, every run ends and acts at most once, a killed replica's runs
    are finished by a survivor within lease + 5 s, and the fleet budget of 50 runs holds
    across the replicas."""
    store, began = shared_store, time.monotonic()
    await create_topic(kafka_broker.bootstrap, kafka_topic, partitions=PARTITIONS)
    sources = [kafka_source(kafka_broker, kafka_topic),
               {"name": "alertmanager", "type": "alertmanager"}]
    guards = {"max_runs": {"count": BUDGET, "per": "1h"}}
    async with receiving(delay=0.2) as receiver:
        names = ["a", "b", "c"]
        replicas = {n: replica(loopd_factory, tmp_path, n, store, receiver, sources=sources,
                               rules=CHAOS_RULES, delay=RUN_DELAY, guards=guards)
                    for n in names}
        await asyncio.gather(*(r.start() for r in replicas.values()))

        async def decided() -> int:
            return await count(store, "SELECT COUNT(*) FROM decisions WHERE rule=?",
                               ("seen",))

        kills: list[Kill] = []

        async def kill_when(name: str, at: int) -> Kill:
            """kill -9 ``name`` once it holds a run and ``at`` records are decided, or the
            fleet budget is nearly spent (after it no run starts: a replica holding none
            then never will, however many records are decided)."""
            async def ready() -> bool:
                if not await runs_of(store, name):
                    return False
                return await decided() >= at or await count(
                    store, "SELECT COUNT(*) FROM runs") >= BUDGET - 10

            await wait_until(ready, timeout=90, interval=0.05,
                             what=f"replica {name} holding a run, and {at} records decided "
                                  "or the budget nearly spent")
            await replicas[name].kill()
            kill = Kill(name, time.time(), await runs_of(store, name))
            kills.append(kill)
            return kill

        async def taken_over(kill: Kill) -> None:
            """Wait until every run the killed replica held has ended (or lease + 15 s)."""
            ids = tuple(kill.runs)
            marks = ",".join("?" * len(ids))

            async def ended() -> bool:
                return await count(store, f"SELECT COUNT(*) FROM runs WHERE id IN ({marks}) "
                                   f"AND status IN ({','.join('?' * len(FINAL))})",
                                   (*ids, *FINAL)) == len(ids)

            with contextlib.suppress(AssertionError):  # judged below, with the details
                await wait_until(ended, timeout=LEASE + 15, interval=0.1,
                                 what=f"the runs of killed replica {kill.name} to end")

        streaming = asyncio.create_task(
            produce_paced(kafka_broker.bootstrap, kafka_topic, decided))
        alerting = asyncio.create_task(post_alerts(list(replicas.values()), decided))
        try:
            await taken_over(await kill_when("a", 2000))
            await taken_over(await kill_when("b", 4000))  # c alone now
            await asyncio.gather(replicas["a"].start(), replicas["b"].start())
            await streaming
            posts = await alerting
        finally:
            for task in (streaming, alerting):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        async def all_decided() -> bool:
            return (await decided() == RECORDS and await count(
                store, "SELECT COUNT(*) FROM decisions WHERE rule=?", ("alert-seen",)) == ALERTS)

        await wait_until(all_decided, timeout=60, interval=0.2,
                         what=f"{RECORDS} records and {ALERTS} alerts decided")

        async def all_ended() -> bool:
            return await count(store, "SELECT COUNT(*) FROM runs WHERE status IN "
                               f"({','.join('?' * len(ACTIVE))})", ACTIVE) == 0

        await wait_until(all_ended, timeout=LEASE + 30, interval=0.2, what="every run to end")
        await asyncio.gather(*(r.stop() for r in replicas.values()))

    runs = {str(r[0]): r[1:] for r in await store.query(
        "SELECT id, status, owner, epoch, finished, rule FROM runs")}
    decisions = await store.query("SELECT rule, outcome, reason, run_id FROM decisions")
    by_rule = Counter(str(d[0]) for d in decisions)
    ends = [runs[run][3] - k.at for k in kills for run in k.runs if runs[run][3] is not None]
    print(f"cluster chaos on {store.kind}: {len(runs)} runs, kills "
          f"{[(k.name, len(k.runs)) for k in kills]}, their runs ended at most "
          f"{max(ends, default=0):.1f}s after the kill, {posts} alert posts, "
          f"{len(receiver.calls)} calls, {time.monotonic() - began:.1f}s")

    # Every guarantee is judged, then all that failed are reported together: one run of
    # this test costs a minute, and which guarantees broke together tells why.
    problems: list[str] = []

    def check(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)

    # every event decided exactly once (the decision is unique per event and rule, so a
    # count short of the events is an event lost, never one decided twice)
    expected = {"seen": RECORDS, "cpu-high": sum(1 for i in range(RECORDS) if hot(i)),
                "alert-seen": ALERTS, "node-down": sum(1 for i in range(ALERTS) if i % 25 == 3)}
    for rule, n in expected.items():
        check(by_rule[rule] == n, f"rule {rule}: {by_rule[rule]} decisions for {n} events")

    # none lost: every run a decision created exists, every run ended
    created = {str(d[3]) for d in decisions if d[1] == "run_created"}
    check(created == set(runs), f"{len(created ^ set(runs))} runs and run_created "
                                "decisions without each other")
    status = {run: str(r[0]) for run, r in runs.items()}
    check(set(status.values()) <= set(FINAL), f"runs not ended: {Counter(status.values())}")

    # the fleet budget holds across the replicas, and was reached (so it was tested)
    check(len(runs) <= BUDGET, f"fleet budget exceeded: {len(runs)} runs across the "
                               f"replicas, the budget is {BUDGET}")
    check(any(d[1] == "suppressed" and "budget" in str(d[2]) for d in decisions),
          "the fleet budget was never reached: nothing about it was tested")

    # every run acted at most once; only a run acting at a kill may end interrupted
    calls = receiver.per_run()
    check(set(calls) <= set(runs), "calls for runs the store does not know")
    twice = {run: n for run, n in calls.items() if n > 1}
    check(twice == {}, f"{len(twice)} runs acted more than once: {twice}")
    silent = [run for run, s in status.items() if s == "succeeded" and calls[run] != 1]
    check(silent == [], f"{len(silent)} runs succeeded without acting")
    in_flight = {run for k in kills for run in k.runs}
    odd = {run: s for run, s in status.items() if s != "succeeded" and run not in in_flight}
    check(odd == {}, f"runs not in flight at a kill that did not succeed: {odd}")

    # the killed replicas' runs: finished by a survivor within lease + 5 s of the kill
    check([k.name for k in kills] == ["a", "b"] and all(k.runs for k in kills),
          f"kills: {kills}")
    for kill in kills:
        late = {}
        for run, epoch in kill.runs.items():
            _, owner, new_epoch, finished, _ = runs[run]
            if owner == kill.name or new_epoch <= epoch or finished is None \
                    or finished - kill.at > LEASE + 5:
                late[run] = (owner, new_epoch, None if finished is None
                             else round(finished - kill.at, 1))
        check(late == {}, f"{len(late)} of the {len(kill.runs)} runs of killed replica "
                          f"{kill.name} not finished by a survivor within {LEASE + 5:g} s "
                          f"(owner, epoch, s after the kill): {late}")
    assert problems == [], "\n".join(problems)


# -- 2. fencing -------------------------------------------------------------------------

FENCE_DELAY = 6.0


@pytest.mark.parametrize("shared_store", ["postgres", "sqlite"], indirect=True)
async def test_a_replica_frozen_past_its_lease_writes_and_acts_on_nothing_once_thawed(
        shared_store: SharedStore, tmp_path: Path, loopd_factory: Factory) -> None:
    """A replica frozen (SIGSTOP) with two runs waiting in a delay and one inside a slow
    action loses them to the other replica after its lease; thawed (SIGCONT), it changes
    no run or step row and makes no call, and it logs the lost lease."""
    store = shared_store
    sources = [{"name": "webhook", "type": "webhook"}]
    rules = [
        {"name": "fence", "on": {"source": "webhook", "topic": "fence"},
         "key": "{{ event.key }}",
         "run": {"workflow": "cluster.remediate", "input": {"host": "{{ event.key }}"}}},
        {"name": "slow", "on": {"source": "webhook", "topic": "slow"},
         "key": "{{ event.key }}",
         "run": {"workflow": "cluster.act_now", "input": {"host": "{{ event.key }}"}}},
    ]
    async with receiving() as receiver:
        receiver.held["slow-1"] = release = asyncio.Event()
        a, b = (replica(loopd_factory, tmp_path, n, store, receiver, sources=sources,
                        rules=rules, delay=FENCE_DELAY) for n in ("a", "b"))
        await asyncio.gather(a.start(), b.start())
        await a.post("/v1/events", [{"topic": "fence", "key": "fence-1", "data": {}},
                                    {"topic": "fence", "key": "fence-2", "data": {}},
                                    {"topic": "slow", "key": "slow-1", "data": {}}])

        async def held_by_a() -> bool:
            return len(await runs_of(store, "a")) == 3 and len(receiver.calls) == 1

        await wait_until(held_by_a, timeout=20, interval=0.05,
                         what="three runs held by a, one of them inside its action")
        before = await runs_of(store, "a")
        a.signal(signal.SIGSTOP)
        frozen_at = time.time()
        try:
            async def owned_by_b() -> bool:
                rows = await store.query(
                    f"SELECT owner, epoch FROM runs WHERE id IN ({','.join('?' * 3)})",
                    tuple(before))
                return all(r[0] == "b" for r in rows)

            await wait_until(owned_by_b, timeout=LEASE + 15, interval=0.1,
                             what="b to take over the runs of frozen replica a")
            took = time.time() - frozen_at
            release.set()  # the slow action answers a, which is still frozen

            async def ended() -> bool:
                return await count(store, f"SELECT COUNT(*) FROM runs WHERE status IN "
                                   f"({','.join('?' * len(FINAL))})", FINAL) == 3

            await wait_until(ended, timeout=FENCE_DELAY + 15, interval=0.1,
                             what="b to finish the runs it took over")
            runs_then = await store.query(
                "SELECT id, status, owner, epoch, version, finished FROM runs ORDER BY id")
            steps_then = await store.query(
                "SELECT run_id, seq, task, attempt, status, finished, error FROM steps "
                "ORDER BY run_id, seq")
            calls_then = len(receiver.calls)
        finally:
            a.signal(signal.SIGCONT)
        thawed_at = time.time()

        def a_gave_up() -> bool:
            return {ln.get("run") for ln in lease_lost_lines(a)} >= set(before)

        # a's delays are over and its slow action has its answer: thawed, it tries
        with contextlib.suppress(AssertionError):  # judged below, after what matters more
            await wait_until(a_gave_up, timeout=LEASE + 10, interval=0.1,
                             what="a to log the lost lease of each run")

        async def a_alive() -> bool:
            return await count(store, "SELECT COUNT(*) FROM replicas WHERE name=? AND "
                               "heartbeat > ?", ("a", thawed_at)) == 1

        await wait_until(a_alive, timeout=LEASE + 5, interval=0.1,
                         what="a to beat its heart again after the thaw")
        await asyncio.gather(a.stop(), b.stop())

    print(f"fencing on {store.kind}: taken over {took:.1f}s after the freeze")
    by_a = [c for c in receiver.calls if c.replica == "a"]
    assert [c.key for c in by_a] == ["slow-1"] and by_a[0].at < frozen_at, \
        f"a acted after it was frozen: {by_a}"
    assert len(receiver.calls) == calls_then == 3  # b: fence-1, fence-2; slow-1 by a
    assert receiver.per_run() == Counter(set(before)), "a run acted twice, or not at all"
    runs_now = await store.query(
        "SELECT id, status, owner, epoch, version, finished FROM runs ORDER BY id")
    assert runs_now == runs_then, "a changed run rows after it lost the lease"
    assert await store.query("SELECT run_id, seq, task, attempt, status, finished, error "
                             "FROM steps ORDER BY run_id, seq") == steps_then, \
        "a changed step rows after it lost the lease"
    status = {str(r[0]): (str(r[1]), str(r[2]), int(r[3])) for r in runs_now}
    for run, epoch in before.items():
        assert status[run][1] == "b" and status[run][2] > epoch, status
    assert sorted(s[0] for s in status.values()) == ["interrupted", "succeeded", "succeeded"]
    assert {ln.get("run") for ln in lease_lost_lines(a)} == set(before), \
        "a did not log the lost lease of each run"


# -- 3. a for: window across a rebalance ------------------------------------------------

FOR_S = 10.0
FOR_KEY = "host-for"


def held_seconds(reason: str) -> float | None:
    m = re.match(r"for: held (\d+)s of", reason or "")
    return float(m.group(1)) if m else None


@pytest.mark.kafka
@pytest.mark.parametrize("shared_store", ["postgres", "sqlite"], indirect=True)
async def test_a_for_window_keeps_its_start_when_its_partition_moves_and_fires_once(
        kafka_broker: KafkaBroker, kafka_topic: str, shared_store: SharedStore,
        tmp_path: Path, loopd_factory: Factory) -> None:
    """A ``for: 10s`` rule whose condition holds on one key fires once, no sooner than 10 s
    after the condition began to hold, when the replica deciding that key is killed in
    the middle of the window and its partition moves to the other replica, which carries
    the window on from its start (the store) instead of starting it again."""
    store = shared_store
    await create_topic(kafka_broker.bootstrap, kafka_topic, partitions=2)
    sources = [kafka_source(kafka_broker, kafka_topic)]
    rules = [
        {"name": "seen", "on": {"source": "bus"}, "key": "{{ event.host }}", "for": "1h",
         "run": {"action": "core.noop"}},
        {"name": "sustained", "on": {"source": "bus"}, "if": "event.cpu > 90",
         "key": "{{ event.host }}", "for": f"{FOR_S:g}s",
         "run": {"action": "core.log", "input": {"message": "hot for 10s: {{ key }}"}}},
    ]
    async with receiving() as receiver:
        replicas = {n: replica(loopd_factory, tmp_path, n, store, receiver, sources=sources,
                               rules=rules) for n in ("a", "b")}
        await asyncio.gather(*(r.start() for r in replicas.values()))

        async def each_has_a_partition() -> bool:
            await produce(kafka_broker.bootstrap, kafka_topic, [
                Record({"host": "warm", "cpu": 0}, key="warm", partition=p) for p in (0, 1)])
            seen = [await r.metric("loopd_decisions_total", rule="seen", outcome="suppressed")
                    for r in replicas.values()]
            return all(n > 0 for n in seen)

        await wait_until(each_has_a_partition, timeout=60, interval=0.5,
                         what="the group to give each replica a partition")

        sent = 0

        async def hot_stream() -> None:
            """The key's condition holds for 16 s (a record every 250 ms on partition 0)."""
            nonlocal sent
            async with producer(kafka_broker.bootstrap) as prod:
                end = time.monotonic() + FOR_S + 6
                while time.monotonic() < end:
                    await prod.send_and_wait(kafka_topic, orjson.dumps(
                        {"host": FOR_KEY, "cpu": 95}), key=FOR_KEY.encode(), partition=0)
                    sent += 1
                    await asyncio.sleep(0.25)  # the telemetry's own pace

        streaming = asyncio.create_task(hot_stream())
        try:
            async def decider() -> str | None:
                for name, r in replicas.items():
                    if await r.metric("loopd_decisions_total", rule="sustained",
                                      outcome="suppressed") > 0:
                        return name
                return None

            async def mid_window() -> bool:
                times = [float(t) for (t,) in await store.query(
                    "SELECT time FROM decisions WHERE rule='sustained'")]
                return bool(times) and max(times) - min(times) >= FOR_S / 2 - 1

            await wait_until(mid_window, timeout=30, interval=0.1,
                             what="the for: window to be half through")
            holder = await decider()
            assert holder is not None
            await replicas[holder].kill()
            killed_at = time.time()
            await streaming
        finally:
            streaming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await streaming
        other = next(r for n, r in replicas.items() if n != holder)

        async def all_decided() -> bool:
            return await count(store, "SELECT COUNT(*) FROM decisions WHERE rule='seen' AND "
                               "key=?", (FOR_KEY,)) == sent

        await wait_until(all_decided, timeout=30, interval=0.2,
                         what=f"all {sent} records of {FOR_KEY} decided")
        await other.stop()

    rows = sorted((float(t), str(o), str(r or "")) for t, o, r in await store.query(
        "SELECT time, outcome, reason FROM decisions WHERE rule='sustained'"))
    began = rows[0][0]
    fired = [t for t, o, _ in rows if o == "run_created"]
    print(f"for: across a rebalance on {store.kind}: killed {holder} at "
          f"{killed_at - began:.1f}s, {sent} records, fired at "
          f"{[round(t - began, 1) for t in fired]} s")
    assert len(fired) <= 1, f"the rule fired {len(fired)} times"
    assert all(t - began >= FOR_S for t in fired), "fired before the condition held for 10 s"
    # the survivor carried the window on from its start (rebuilt from the store), so the
    # seconds held that its decisions report never fall back
    window = [held_seconds(r) for t, o, r in rows if not fired or t < fired[0]]
    assert None not in window, window
    restarted = [(x, y) for x, y in itertools.pairwise(window)
                 if x is not None and y is not None and y < x]
    assert restarted == [], f"the window started again after the move: held {window}"
    assert len(fired) == 1, "the rule never fired"
    assert fired[0] > killed_at  # decided by the survivor
    assert await count(store, "SELECT COUNT(*) FROM runs WHERE rule='sustained'") == 1
