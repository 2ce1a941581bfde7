"""The real daemon consuming a real Kafka-protocol broker (tests/servers/kafka.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, LoopdProcess, eventually
from tests.servers.kafka import (
    KafkaBroker,
    Record,
    committed_offsets,
    create_topic,
    produce,
    producer,
    read_topic,
)

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

RULE = "record-seen"


def kafka_source(broker: KafkaBroker, topic: str, **extra: Any) -> dict[str, Any]:
    return {"name": "bus", "type": "kafka", "bootstrap": broker.bootstrap, "topics": [topic],
            "group": f"loopd-{topic}", "commit_interval": "100ms", "session_timeout": "2s",
            **extra}


def one_run_per_record(action: str = "core.noop") -> dict[str, Any]:
    """Every record on the bus starts its own run (its key is the record's ``n``)."""
    message = {"message": "record {{ event.n }} handled"} if action == "core.log" else \
        {"n": "{{ event.n }}"}
    return {"name": RULE, "on": {"source": "bus"}, "key": "{{ event.n }}",
            "run": {"action": action, "input": message}}


def decided(daemon: LoopdProcess, rule: str = RULE) -> int:
    return int(daemon.store_query("SELECT COUNT(*) FROM decisions WHERE rule=?", (rule,))[0][0])


@contextlib.asynccontextmanager
async def producing(bootstrap: str, topic: str, numbers: range, *,
                    ahead_of: Callable[[], int] | None = None, window: int = 500,
                    batch: int = 50, entities: int | None = None
                    ) -> AsyncIterator[asyncio.Task[None]]:
    """Produce ``{"n": i}`` for every i in ``numbers`` in the background, in order.

    With ``ahead_of`` (how many records are decided so far), stay at most ``window``
    records ahead of it, so records are still flowing whenever the test acts. With
    ``entities``, record i is keyed ``host-{i % entities}`` (and carries that ``host``).
    """
    def send(prod: Any, i: int) -> Any:
        if entities is None:
            return prod.send(topic, b'{"n": %d}' % i)
        host = b"host-%d" % (i % entities)
        return prod.send(topic, b'{"n": %d, "host": "%s"}' % (i, host), key=host)

    async def run() -> None:
        async with producer(bootstrap) as prod:
            for start in range(numbers.start, numbers.stop, batch):
                if ahead_of is not None:
                    def caught_up(s: int = start) -> bool:
                        assert ahead_of is not None
                        return s - numbers.start - ahead_of() < window

                    await eventually(caught_up, "the daemon to catch up with the producer",
                                     timeout=60)
                sent = [await send(prod, i)
                        for i in range(start, min(start + batch, numbers.stop))]
                await asyncio.gather(*sent)

    task = asyncio.create_task(run())
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_records_drive_decisions_and_malformed_ones_go_to_dead_letters(
        kafka_broker: KafkaBroker, kafka_topic: str, config: Config,
        loopd_factory: Factory) -> None:
    """Kafka records become runs visible in the API, and a malformed record is counted in
    /metrics and lands on the dead-letter topic with the error in its headers."""
    dlq = f"{kafka_topic}.dlq"
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    await create_topic(kafka_broker.bootstrap, dlq)
    config.sources = [kafka_source(kafka_broker, kafka_topic, dead_letter_topic=dlq)]
    config.rules = {"bus.yaml": [{
        "name": "web-down", "on": {"source": "bus", "match": {"alert": "WebDown"}},
        "key": "{{ event.host }}",
        "run": {"action": "core.log", "input": {"message": "web down on {{ key }}"}},
    }]}
    daemon = loopd_factory(config)
    await daemon.start()

    await produce(kafka_broker.bootstrap, kafka_topic, [
        Record({"alert": "WebDown", "host": "web-1"}, key="web-1"),
        Record(b"{not json", key="web-2", headers={"trace": "t-1"}),
        Record({"alert": "WebDown", "host": "web-2"}, key="web-2"),
        Record({"alert": "Other", "host": "web-3"}),
    ])

    runs = await daemon.wait_runs(2, status="succeeded", timeout=30)
    assert sorted(r["key"] for r in runs) == ["web-1", "web-2"]
    assert {r["rule"] for r in runs} == {"web-down"}
    story = await daemon.run(runs[0]["id"])
    assert story["trigger"]["source"] == "bus" and story["trigger"]["topic"] == kafka_topic
    assert [s["status"] for s in story["steps"]] == ["succeeded"]
    assert [e["outcome"] for e in story["decisions"]] == ["run_created"]

    (dead,) = await read_topic(kafka_broker.bootstrap, dlq, 1)
    headers = {k: v.decode() for k, v in dead.headers}
    assert dead.value == b"{not json" and dead.key == b"web-2"
    assert headers["trace"] == "t-1"
    assert headers["loopd-topic"] == kafka_topic and headers["loopd-offset"] == "1"
    assert headers["loopd-partition"] == "0" and headers["loopd-source"] == "bus"
    assert "malformed JSON" in headers["loopd-error"]
    assert await daemon.metric("loopd_events_rejected_total", source="bus",
                               reason="decode") == 1
    assert await daemon.metric("loopd_events_received_total", source="bus") == 3
    assert await daemon.metric("loopd_decisions_total", rule="web-down",
                               outcome="run_created") == 2
    await daemon.stop()


async def test_kill_9_mid_stream_decides_every_record_exactly_once(
        kafka_broker: KafkaBroker, kafka_topic: str, config: Config,
        loopd_factory: Factory) -> None:
    """After kill -9 in the middle of a Kafka stream and a restart on the same store, every
    record has exactly one decision and one run, and only a run whose action was executing
    at the kill ran that (idempotent) action a second time."""
    total = 3000
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    config.sources = [kafka_source(kafka_broker, kafka_topic)]
    config.rules = {"bus.yaml": [one_run_per_record("core.log")]}
    daemon = loopd_factory(config)
    await daemon.start()

    # the producer keeps 500 records ahead of the decisions, and sends the rest once
    # the daemon is dead
    async with producing(kafka_broker.bootstrap, kafka_topic, range(total),
                         ahead_of=lambda: decided(daemon) if daemon.running else total
                         ) as sending:
        await eventually(lambda: decided(daemon) >= 1000, "1000 records decided", timeout=30)
        await daemon.kill()
        at_kill = decided(daemon)
        await sending
    assert 0 < at_kill < total, f"killed after {at_kill} of {total} decisions"
    # runs whose action may have run without its end being recorded: retried on resume
    in_flight = {r for (r,) in daemon.store_query(
        "SELECT id FROM runs WHERE status='running'")}

    await daemon.start()
    await eventually(lambda: decided(daemon) >= total, f"{total} decisions", timeout=60)
    await eventually(lambda: daemon.store_query(
        "SELECT COUNT(*) FROM runs WHERE status='succeeded'")[0][0] >= total,
        f"{total} runs succeeded", timeout=60)
    await daemon.stop()

    rows = daemon.store_query(
        "SELECT event_id, outcome, key, run_id FROM decisions WHERE rule=?", (RULE,))
    assert len(rows) == total
    assert len({r[0] for r in rows}) == total  # no event decided twice
    assert {r[1] for r in rows} == {"run_created"}
    assert sorted(int(r[2]) for r in rows) == list(range(total))  # no gap, no duplicate
    runs = daemon.store_query("SELECT id, status, key FROM runs")
    assert len(runs) == total and {r[1] for r in runs} == {"succeeded"}
    assert {r[3] for r in rows} == {r[0] for r in runs}
    steps = daemon.store_query("SELECT run_id, COUNT(*) FROM steps GROUP BY run_id")
    assert len(steps) == total and {n for _, n in steps} == {1}

    executed: dict[str, int] = {}
    for line in daemon.log_lines():
        if line.get("event", "").startswith("record ") and line.get("task") == "action":
            executed[line["run"]] = executed.get(line["run"], 0) + 1
    assert set(executed) == {r[0] for r in runs}
    twice = {run for run, n in executed.items() if n > 1}
    assert twice <= in_flight, f"ran twice without being in flight at the kill: {twice}"
    assert max(executed.values()) <= 2
    assert await_nothing_else(daemon)


def await_nothing_else(daemon: LoopdProcess) -> bool:
    """Both daemons logged no error."""
    errors = [ln for ln in daemon.log_lines() if ln.get("level") in ("error", "critical")]
    assert errors == [], errors[:5]
    return True


async def test_sigterm_while_records_flow_exits_0_and_commits_what_was_decided(
        kafka_broker: KafkaBroker, kafka_topic: str, config: Config,
        loopd_factory: Factory) -> None:
    """SIGTERM while records flow exits 0 within 10 s with the offset of every decided record
    committed, so the restarted daemon consumes none of them again."""
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    source = kafka_source(kafka_broker, kafka_topic)
    config.sources = [source]
    config.rules = {"bus.yaml": [one_run_per_record()]}
    daemon = loopd_factory(config)
    await daemon.start()

    async with producing(kafka_broker.bootstrap, kafka_topic, range(100_000),
                         ahead_of=lambda: decided(daemon), window=1000):
        await eventually(lambda: decided(daemon) >= 1000, "1000 records decided", timeout=30)
        took = await daemon.stop()
    assert took < 10
    at_stop = decided(daemon)
    committed = await committed_offsets(kafka_broker.bootstrap, source["group"], kafka_topic)
    assert committed == {0: at_stop}, f"{at_stop} records decided, committed {committed}"

    await daemon.start()
    (marker,) = await produce(kafka_broker.bootstrap, kafka_topic, [{"n": "marker"}])
    await eventually(lambda: daemon.store_query(
        "SELECT COUNT(*) FROM decisions WHERE key='marker'")[0][0] == 1,
        "the record produced after the restart to be decided", timeout=60)
    # everything between the commit and the marker was produced before the stop
    assert decided(daemon) == marker + 1
    assert await daemon.metric("loopd_events_duplicate_total", source="bus") == 0
    assert await daemon.metric("loopd_events_received_total", source="bus") == marker + 1 - at_stop
    await eventually(lambda: daemon.store_query(
        "SELECT COUNT(*) FROM runs WHERE status='succeeded'") == [(marker + 1,)],
        "every run to succeed, those still active at the stop resumed")
    await daemon.stop()


async def test_broker_restart_during_consumption_loses_nothing(
        kafka_broker: KafkaBroker, kafka_topic: str, config: Config,
        loopd_factory: Factory) -> None:
    """Records produced before a broker restart (some not yet decided when it went down) and
    after it are all decided, each exactly once."""
    if not kafka_broker.persistent:
        pytest.skip("the test broker keeps no data across a restart (no moto S3 server)")
    total, before = 2000, 1500
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    config.sources = [kafka_source(kafka_broker, kafka_topic)]
    config.rules = {"bus.yaml": [one_run_per_record()]}
    daemon = loopd_factory(config)
    await daemon.start()
    async with producing(kafka_broker.bootstrap, kafka_topic, range(before)) as sending:
        await sending
    await eventually(lambda: decided(daemon) > 0, "the first records decided", timeout=30)

    kafka_broker.stop()
    await eventually(lambda: daemon.store_query("SELECT 1")[0] == (1,), "store readable")
    kafka_broker.start()
    async with producing(kafka_broker.bootstrap, kafka_topic, range(before, total)) as sending:
        await sending

    await eventually(lambda: decided(daemon) >= total, f"{total} records decided", timeout=40)
    rows = daemon.store_query("SELECT key, outcome FROM decisions WHERE rule=?", (RULE,))
    assert sorted(int(k) for k, _ in rows) == list(range(total))
    assert {o for _, o in rows} == {"run_created"}
    assert await daemon.metric("loopd_source_up", source="bus") == 1
    await daemon.stop()


async def test_sigterm_with_a_large_backlog_exits_promptly_and_loses_nothing(
        kafka_broker: KafkaBroker, kafka_topic: str, config: Config,
        loopd_factory: Factory) -> None:
    """SIGTERM in the middle of a 50,000-record backlog exits 0 within the daemon's 10 s
    shutdown budget (the source stops taking records first, so the time does not grow with
    the backlog), and after a restart every record is decided exactly once."""
    total = 50_000
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    async with producing(kafka_broker.bootstrap, kafka_topic, range(total), batch=500) as sending:
        await sending
    config.sources = [kafka_source(kafka_broker, kafka_topic)]
    # a run per record: the engine's queue is full of decisions that each start a run
    config.rules = {"bus.yaml": [one_run_per_record()]}
    daemon = loopd_factory(config)
    await daemon.start()
    await eventually(lambda: decided(daemon) >= 2000, "2000 records decided", timeout=60)
    took = await daemon.stop()
    at_stop = decided(daemon)
    print(f"SIGTERM with {total - at_stop} records of backlog: exited 0 in {took:.2f}s")
    assert 0 < at_stop < total  # stop() failed already if it took past the 10 s budget

    await daemon.start()
    await eventually(lambda: decided(daemon) >= total, f"{total} decisions", timeout=120)
    await daemon.stop()
    rows = daemon.store_query("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM decisions "
                              "WHERE rule=?", (RULE,))
    assert rows == [(total, total)]
