"""Chaos: the real daemon is killed twice and its broker restarted once during a Kafka stream.

Run alone with ``pytest -m chaos``.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, LoopdProcess, eventually
from tests.e2e.test_kafka import (
    RULE,
    decided,
    kafka_source,
    one_run_per_record,
    producing,
)
from tests.servers.kafka import KafkaBroker, create_topic

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.chaos]

TOTAL = 3000
PARTITIONS = 3
ENTITIES = 40


def in_flight(daemon: LoopdProcess) -> set[str]:
    """Runs whose action may have run without its end being recorded (retried on resume)."""
    return {r for (r,) in daemon.store_query("SELECT id FROM runs WHERE status='running'")}


async def test_kill_9_twice_and_a_broker_restart_decide_every_record_once(
        kafka_broker: KafkaBroker, kafka_topic: str, config: Config,
        loopd_factory: Factory) -> None:
    """With kill -9 twice and a broker stop/start during a keyed 3,000-record stream, every
    record is decided exactly once, each run's action runs once (twice only for a run whose
    action was executing at a kill), and no run is left interrupted without having acted."""
    if not kafka_broker.persistent:
        pytest.skip("the test broker keeps no data across a restart (no moto S3 server)")
    started = time.monotonic()
    await create_topic(kafka_broker.bootstrap, kafka_topic, partitions=PARTITIONS)
    config.sources = [kafka_source(kafka_broker, kafka_topic, request_timeout="2s",
                                   probe_interval="500ms")]
    config.rules = {"bus.yaml": [one_run_per_record("core.log")]}
    daemon = loopd_factory(config)
    retried: set[str] = set()

    def so_far() -> int:  # how far the producer may run ahead; all of it while dead
        return decided(daemon) if daemon.running else TOTAL

    # kill -9 with records flowing: the producer is at most 300 records ahead
    await daemon.start()
    async with producing(kafka_broker.bootstrap, kafka_topic, range(0, 1500), ahead_of=so_far,
                         window=300, entities=ENTITIES) as sending:
        await eventually(lambda: decided(daemon) >= 300, "300 records decided", timeout=30)
        await daemon.kill()
        kills = [decided(daemon)]
        retried |= in_flight(daemon)
        await sending

    # the broker goes away while the restarted daemon works through that backlog
    await daemon.start()
    await eventually(lambda: decided(daemon) > kills[0], "the backlog resumed", timeout=30)
    kafka_broker.stop()
    try:
        async def source_down() -> bool:
            return await daemon.metric("loopd_source_up", source="bus") == 0

        await eventually(source_down, "the source to notice the outage", timeout=20)
        outage_at = decided(daemon)
    finally:
        kafka_broker.start()

    # and kill -9 again with records flowing
    async with producing(kafka_broker.bootstrap, kafka_topic, range(1500, TOTAL),
                         ahead_of=lambda: so_far() - 1500, window=300,
                         entities=ENTITIES) as sending:
        await eventually(lambda: decided(daemon) >= 2300, "2300 records decided", timeout=60)
        await daemon.kill()
        kills.append(decided(daemon))
        retried |= in_flight(daemon)
        await sending

    await daemon.start()
    await eventually(lambda: decided(daemon) >= TOTAL, f"{TOTAL} decisions", timeout=60)
    await eventually(lambda: daemon.store_query(
        "SELECT COUNT(*) FROM runs WHERE status NOT IN ('pending', 'running', 'waiting')"
    )[0][0] >= TOTAL, f"{TOTAL} runs ended", timeout=60)
    await daemon.stop()
    print(f"chaos: killed at {kills} decisions, broker stopped at {outage_at}, "
          f"{time.monotonic() - started:.1f}s")

    rows = daemon.store_query("SELECT event_id, key, run_id FROM decisions WHERE rule=?",
                              (RULE,))
    assert 0 < kills[0] < 1500 and 1500 < kills[1] < TOTAL
    assert len(rows) == TOTAL and len({r[0] for r in rows}) == TOTAL
    assert sorted(int(r[1]) for r in rows) == list(range(TOTAL))
    runs = dict(daemon.store_query("SELECT id, status FROM runs"))
    assert set(runs) == {r[2] for r in rows}

    executed: dict[str, int] = {}
    for line in daemon.log_lines():
        if line.get("event", "").startswith("record ") and line.get("task") == "action":
            executed[line["run"]] = executed.get(line["run"], 0) + 1
    never_acted = {r for r, s in runs.items() if s == "interrupted" and r not in executed}
    assert never_acted == set(), f"{len(never_acted)} runs interrupted before they acted"
    assert {s for s in runs.values()} == {"succeeded"}, {
        s: sum(1 for v in runs.values() if v == s) for s in set(runs.values())}
    assert set(executed) == set(runs)
    twice = {run for run, n in executed.items() if n > 1}
    assert twice <= retried, f"ran twice without being in flight at a kill: {len(twice)}"
    assert max(executed.values()) <= 2
