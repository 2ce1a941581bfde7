"""KafkaSource against a real Kafka-protocol broker on loopback (tansu: tests/servers/kafka.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from loopd import metrics
from loopd.config import KafkaSourceConfig
from loopd.errors import SourceError
from loopd.events import Delivery, Event
from loopd.sources.base import OnAssigned, Supervisor
from loopd.sources.kafka import KafkaSource
from tests.servers import free_port, require, wait_until
from tests.servers.kafka import (
    KafkaBroker,
    Record,
    committed_offsets,
    create_topic,
    produce,
    read_topic,
)

pytestmark = pytest.mark.kafka

# tansu answers every JoinGroup after ~session/2: keep it short so tests join fast
SESSION = 2.0


class Collector:
    """An emit function that records deliveries and acks those ``should_ack`` accepts."""

    def __init__(self, should_ack: Callable[[Event], bool] = lambda e: True) -> None:
        self.deliveries: list[Delivery] = []
        self.should_ack = should_ack

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if self.should_ack(delivery.event):
            delivery.ack()

    @property
    def events(self) -> list[Event]:
        return [d.event for d in self.deliveries]

    def numbers(self) -> list[Any]:
        return [e.data.get("n") for e in self.events]


def config(broker: KafkaBroker, name: str, topic: str, **extra: Any) -> KafkaSourceConfig:
    return KafkaSourceConfig.model_validate({
        "type": "kafka", "name": name, "bootstrap": broker.bootstrap, "topics": [topic],
        "group": f"g-{topic}", "commit_interval": 0.05, **extra,
    })


def sample(name: str, **labels: str) -> float:
    return metrics.current().registry.get_sample_value(name, labels) or 0.0


def committed_is(broker: KafkaBroker, cfg: KafkaSourceConfig, expected: dict[int, int | None]
                 ) -> Callable[[], Any]:
    """A wait_until predicate: the group's committed offsets equal ``expected``."""
    async def check() -> bool:
        got = await committed_offsets(broker.bootstrap, cfg.group, cfg.topics[0], len(expected))
        return got == expected
    return check


@contextlib.asynccontextmanager
async def running(source: KafkaSource, emit: Any) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``source.run(emit)`` until the block ends, then close it and await ``run``."""
    task = asyncio.create_task(source.run(emit))
    try:
        yield task
    finally:
        await source.close()
        await asyncio.wait_for(task, timeout=15)


async def test_records_become_events(kafka_broker: KafkaBroker, kafka_topic: str) -> None:
    """Records become events with the record's topic, key, headers, timestamp and a
    topic:partition:offset id, unless an envelope in the payload overrides them.
    """
    await create_topic(kafka_broker.bootstrap, kafka_topic, partitions=2)
    produced_at = time.time()
    await produce(kafka_broker.bootstrap, kafka_topic, [
        Record({"cpu": 97}, key="web-1", partition=0, headers={"trace": "abc"}),
        Record({"id": "evt-7", "key": "db-1", "time": 1_700_000_000, "data": {"cpu": 12},
                "headers": {"trace": "envelope"}},
               key="ignored", partition=1, headers={"trace": "kafka", "tenant": "ops"}),
    ])
    cfg = config(kafka_broker, "kafka-events", kafka_topic)
    before = sample("loopd_events_received_total", source=cfg.name)
    source, got = KafkaSource(cfg, session_timeout=SESSION), Collector()
    async with running(source, got):
        await wait_until(lambda: len(got.events) == 2, what="2 events")
        assert source.connected
    assert not source.connected
    by_origin = {e.origin: e for e in got.events}
    bare = by_origin[f"kafka {kafka_topic}[0]@0"]
    assert (bare.id, bare.source, bare.topic, bare.key) == (
        f"{kafka_topic}:0:0", "kafka-events", kafka_topic, "web-1")
    assert bare.data == {"cpu": 97}
    assert bare.headers == {"trace": "abc"}
    assert produced_at - 1 <= bare.time <= time.time() + 1  # the record's timestamp
    envelope = by_origin[f"kafka {kafka_topic}[1]@0"]
    assert (envelope.id, envelope.key, envelope.time) == ("evt-7", "db-1", 1_700_000_000.0)
    assert envelope.data == {"cpu": 12}
    assert envelope.headers == {"trace": "envelope", "tenant": "ops"}
    assert sample("loopd_events_received_total", source=cfg.name) - before == 2


async def test_commit_stops_at_lowest_unacked_record(
    kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    """Acks out of order commit only up to the lowest un-acked record of the partition."""
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    await produce(kafka_broker.bootstrap, kafka_topic, [{"n": n} for n in range(4)])
    cfg = config(kafka_broker, "kafka-order", kafka_topic)
    got = Collector(should_ack=lambda e: False)
    async with running(KafkaSource(cfg, session_timeout=SESSION), got):
        await wait_until(lambda: len(got.deliveries) == 4, what="4 deliveries")
        d = got.deliveries
        d[0].ack()
        d[2].ack()
        await wait_until(committed_is(kafka_broker, cfg, {0: 1}), interval=0.1, what="commit 1")
        d[1].ack()
        await wait_until(committed_is(kafka_broker, cfg, {0: 3}), interval=0.1, what="commit 3")
        d[3].ack()
        await wait_until(committed_is(kafka_broker, cfg, {0: 4}), interval=0.1, what="commit 4")


async def test_close_commits_acked_records(kafka_broker: KafkaBroker, kafka_topic: str) -> None:
    """close() commits the acked prefix even when the periodic commit has not run yet."""
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    await produce(kafka_broker.bootstrap, kafka_topic, [{"n": n} for n in range(3)])
    cfg = config(kafka_broker, "kafka-close", kafka_topic, commit_interval=3600)
    got = Collector(should_ack=lambda e: e.data["n"] < 2)
    async with running(KafkaSource(cfg, session_timeout=SESSION), got):
        await wait_until(lambda: len(got.deliveries) == 3, what="3 deliveries")
        assert await committed_is(kafka_broker, cfg, {0: None})()
    assert await committed_is(kafka_broker, cfg, {0: 2})()


async def test_new_consumer_resumes_after_committed_offset(
    kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    """A new consumer in the same group gets exactly the records after the committed offset."""
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    await produce(kafka_broker.bootstrap, kafka_topic, [{"n": n} for n in range(5)])
    cfg = config(kafka_broker, "kafka-resume", kafka_topic)
    first = Collector(should_ack=lambda e: e.data["n"] < 3)
    async with running(KafkaSource(cfg, session_timeout=SESSION), first):
        await wait_until(lambda: len(first.events) == 5, what="5 events")
    assert await committed_is(kafka_broker, cfg, {0: 3})()

    await produce(kafka_broker.bootstrap, kafka_topic, [{"n": 5}])  # sentinel: ends the stream
    second = Collector()
    async with running(KafkaSource(cfg, session_timeout=SESSION), second):
        await wait_until(lambda: 5 in second.numbers(), what="the sentinel")
        await wait_until(committed_is(kafka_broker, cfg, {0: 6}), interval=0.1, what="commit 6")
    assert second.numbers() == [3, 4, 5]


async def test_rejected_records_go_to_dead_letter_topic(
    kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    """Malformed JSON, a JSON list and an oversized record are counted, sent to the dead-letter
    topic with their origin in headers, and acked, and the records after them still arrive.
    """
    dlq = f"{kafka_topic}-dlq"
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    await create_topic(kafka_broker.bootstrap, dlq)
    bad = [b"{not json", b"[1, 2]", b'{"pad": "' + b"x" * 300 + b'"}']
    await produce(kafka_broker.bootstrap, kafka_topic, [
        {"n": 0}, Record(bad[0], key="k1", headers={"trace": "t1"}), bad[1], bad[2], {"n": 1},
    ])
    cfg = config(kafka_broker, "kafka-dlq", kafka_topic, dead_letter_topic=dlq, max_payload=200)
    decode_before = sample("loopd_events_rejected_total", source=cfg.name, reason="decode")
    large_before = sample("loopd_events_rejected_total", source=cfg.name, reason="too_large")
    got = Collector()
    async with running(KafkaSource(cfg, session_timeout=SESSION), got):
        await wait_until(lambda: len(got.events) == 2, what="2 good events")
        await wait_until(committed_is(kafka_broker, cfg, {0: 5}), interval=0.1, what="commit 5")
    assert got.numbers() == [0, 1]
    assert sample("loopd_events_rejected_total", source=cfg.name, reason="decode") \
        - decode_before == 2
    assert sample("loopd_events_rejected_total", source=cfg.name, reason="too_large") \
        - large_before == 1

    dead = await read_topic(kafka_broker.bootstrap, dlq, 3)
    assert [r.value for r in dead] == bad
    assert dead[0].key == b"k1"
    for offset, record in enumerate(dead, start=1):
        headers = {k: v.decode() for k, v in record.headers}
        assert headers["loopd-topic"] == kafka_topic
        assert (headers["loopd-partition"], headers["loopd-offset"]) == ("0", str(offset))
        assert headers["loopd-source"] == cfg.name
        assert f"kafka {kafka_topic}[0]@{offset}" in headers["loopd-error"]
    first_headers = dict(dead[0].headers)
    assert first_headers["trace"] == b"t1"
    assert b"malformed JSON" in first_headers["loopd-error"]
    assert b"expected a JSON object" in dict(dead[1].headers)["loopd-error"]
    assert b"exceeds max_payload" in dict(dead[2].headers)["loopd-error"]


async def test_blocked_emit_stops_consumption_without_loss(
    kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    """While emit blocks the source reads nothing further, and once it unblocks every record
    arrives once, in order; close() returns promptly even while emit is blocked.
    """
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    await produce(kafka_broker.bootstrap, kafka_topic, [{"n": n} for n in range(10)])
    cfg = config(kafka_broker, "kafka-backpressure", kafka_topic)
    queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=1)

    def received() -> float:
        return sample("loopd_events_received_total", source=cfg.name)

    before = received()
    source = KafkaSource(cfg, session_timeout=SESSION)
    async with running(source, queue.put) as task:
        # one delivery queued, the next one waiting in emit: nothing else is read
        await wait_until(lambda: received() - before == 2, what="2 events received")
        assert queue.full() and not task.done()
        numbers: list[int] = []
        while len(numbers) < 10:
            delivery = await asyncio.wait_for(queue.get(), timeout=15)
            numbers.append(delivery.event.data["n"])
            delivery.ack()
        assert numbers == list(range(10))
        await wait_until(committed_is(kafka_broker, cfg, {0: 10}), interval=0.1, what="commit")

        await produce(kafka_broker.bootstrap, kafka_topic, [{"n": n} for n in range(10, 13)])
        await wait_until(lambda: received() - before == 12, what="emit blocked again")
        started = time.monotonic()
        await source.close()
        await asyncio.wait_for(task, timeout=5)
        assert time.monotonic() - started < 5
    assert received() - before == 12  # nothing was read past the blocked emit
    assert await committed_is(kafka_broker, cfg, {0: 10})()


async def test_revoked_partitions_are_committed(
    kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    """When a rebalance takes partitions away, their acked records are committed first."""
    await create_topic(kafka_broker.bootstrap, kafka_topic, partitions=2)
    await produce(kafka_broker.bootstrap, kafka_topic, [
        Record({"n": n}, partition=n % 2) for n in range(4)
    ])
    cfg = config(kafka_broker, "kafka-revoke", kafka_topic, commit_interval=3600)
    first, second = Collector(), Collector()
    async with running(KafkaSource(cfg, session_timeout=SESSION), first):
        await wait_until(lambda: len(first.events) == 4, what="4 events")
        assert await committed_is(kafka_broker, cfg, {0: None, 1: None})()
        async with running(KafkaSource(cfg, session_timeout=SESSION), second):
            await wait_until(committed_is(kafka_broker, cfg, {0: 2, 1: 2}), interval=0.1,
                             what="commit on revoke")
    assert second.events == []  # everything was committed before the hand-over


async def test_supervised_source_survives_broker_restart(
    kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    """When the broker restarts mid-stream the supervisor reconnects the source, un-acked
    records are delivered again, committed ones are not, and nothing is lost.
    """
    kafka_broker.require_restartable()
    require(kafka_broker.persistent,
            "tansu with persistent storage (pip install 'moto[s3]' flask flask-cors)")
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    await produce(kafka_broker.bootstrap, kafka_topic, [{"n": n} for n in range(10)])
    cfg = config(kafka_broker, "kafka-restart", kafka_topic)
    restarted = False
    got = Collector(should_ack=lambda e: restarted or e.data["n"] < 5)
    source = KafkaSource(cfg, session_timeout=SESSION)
    supervisor = Supervisor(source, got, min_backoff=0.05, max_backoff=0.5)
    task = asyncio.create_task(supervisor.run())
    try:
        await wait_until(lambda: len(got.events) == 10, what="10 events")
        await wait_until(committed_is(kafka_broker, cfg, {0: 5}), interval=0.1, what="commit 5")

        kafka_broker.stop()
        await wait_until(lambda: not source.connected, what="source to notice the broker is gone")
        kafka_broker.start()
        restarted = True
        await produce(kafka_broker.bootstrap, kafka_topic, [{"n": n} for n in range(10, 20)])

        await wait_until(lambda: set(got.numbers()) == set(range(20)), timeout=60,
                         what="every record after the restart")
        await wait_until(committed_is(kafka_broker, cfg, {0: 20}), interval=0.1, what="commit")
        assert source.connected
        assert metrics.current().registry.get_sample_value(
            "loopd_source_up", {"source": cfg.name}) == 1
    finally:
        kafka_broker.start()  # no-op when running; later tests need the broker
        await supervisor.stop()
        await asyncio.wait_for(task, timeout=15)
    numbers = got.numbers()
    assert all(numbers.count(n) == 1 for n in range(5))  # committed: never again
    assert all(numbers.count(n) >= 2 for n in range(5, 10))  # un-acked: delivered again


async def test_run_raises_source_error_when_broker_unreachable(kafka_topic: str) -> None:
    """run() raises a SourceError naming the bootstrap address when no broker listens there."""
    bootstrap = f"127.0.0.1:{free_port()}"
    cfg = KafkaSourceConfig(type="kafka", name="kafka-down", bootstrap=bootstrap,
                            topics=[kafka_topic])
    source = KafkaSource(cfg, session_timeout=SESSION)
    with pytest.raises(SourceError, match=f"kafka {bootstrap}: cannot connect"):
        await source.run(Collector())
    assert not source.connected


class _StrayCancel:
    """A source whose run lets out a CancelledError nobody asked for, as aiokafka's fetcher
    does from ``consumer.stop()`` after a long outage, then runs normally."""

    name = "stray-cancel"
    connected = False
    on_assigned: OnAssigned | None = None

    def __init__(self) -> None:
        self.runs = 0
        self.closed = asyncio.Event()

    async def run(self, emit: Any) -> None:
        self.runs += 1
        if self.runs <= 2:
            raise asyncio.CancelledError  # not from the supervisor's task being cancelled
        self.connected = True
        try:
            await self.closed.wait()
        finally:
            self.connected = False

    async def close(self) -> None:
        self.closed.set()


async def test_supervisor_treats_a_stray_cancellation_as_a_source_failure() -> None:
    """A CancelledError out of source.run that the supervisor's task did not receive is logged,
    backed off and reconnected, while a cancellation of the supervisor's task still ends it."""
    source = _StrayCancel()
    supervisor = Supervisor(source, Collector(), min_backoff=0.01, max_backoff=0.05)
    task = asyncio.create_task(supervisor.run())
    await wait_until(lambda: source.connected, what="the third run to connect")
    assert source.runs == 3 and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not supervisor.failed


async def test_supervised_source_survives_an_outage_longer_than_its_timeouts(
    kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    """After a broker outage several times longer than the source's request timeout (commits
    and probes time out, clients are stopped against a dead broker), the supervisor is still
    running, the source reconnects and every record is delivered; nothing ends silently."""
    kafka_broker.require_restartable()
    require(kafka_broker.persistent,
            "tansu with persistent storage (pip install 'moto[s3]' flask flask-cors)")
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    await produce(kafka_broker.bootstrap, kafka_topic, [{"n": n} for n in range(5)])
    cfg = config(kafka_broker, "kafka-outage", kafka_topic, request_timeout="1s",
                 probe_interval="200ms")
    got = Collector()
    source = KafkaSource(cfg, session_timeout=SESSION)
    supervisor = Supervisor(source, got, min_backoff=0.05, max_backoff=0.5)
    task = asyncio.create_task(supervisor.run())
    try:
        await wait_until(lambda: len(got.events) == 5, what="5 events")
        kafka_broker.stop()
        stopped = time.monotonic()
        await wait_until(lambda: not source.connected, what="source to notice the outage")
        # the outage outlasts the request timeout several times over: every reconnect fails
        await wait_until(lambda: time.monotonic() - stopped > 6 * cfg.request_timeout,
                         timeout=30, what="a long outage")
        assert not task.done(), "the supervisor ended during the outage"
        kafka_broker.start()
        await produce(kafka_broker.bootstrap, kafka_topic, [{"n": n} for n in range(5, 10)])
        await wait_until(lambda: set(got.numbers()) == set(range(10)), timeout=60,
                         what="every record after the outage")
        assert source.connected and not task.done()
        assert sample("loopd_source_up", source=cfg.name) == 1
    finally:
        kafka_broker.start()
        await supervisor.stop()
        await asyncio.wait_for(task, timeout=15)
    assert not supervisor.failed


async def test_a_record_too_large_to_dead_letter_whole_sends_its_metadata(
    kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    """A poison record over 1 MiB within max_payload is dead-lettered whole, one over
    max_payload and the producer's request size is dead-lettered as its metadata (truncated
    value, size and error in headers); both are acked and the records after them arrive."""
    dlq = f"{kafka_topic}-dlq"
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    await create_topic(kafka_broker.bootstrap, dlq)
    within = b"{not json " + b"x" * (1536 * 1024)  # 1.5 MiB, under max_payload
    over = b'{"pad": "' + b"y" * (3 * 1024 * 1024) + b'"}'  # 3 MiB, over max_payload
    await produce(kafka_broker.bootstrap, kafka_topic, [
        {"n": 0}, Record(within, key="k1"), Record(over, key="k2"), {"n": 1},
    ])
    cfg = config(kafka_broker, "kafka-dlq-large", kafka_topic, dead_letter_topic=dlq,
                 max_payload="2MiB")
    got = Collector()
    async with running(KafkaSource(cfg, session_timeout=SESSION), got):
        await wait_until(lambda: len(got.events) == 2, timeout=30, what="2 good events")
        await wait_until(committed_is(kafka_broker, cfg, {0: 4}), interval=0.1, what="commit 4")
    assert got.numbers() == [0, 1]

    whole, meta = await read_topic(kafka_broker.bootstrap, dlq, 2)
    assert whole.value == within and whole.key == b"k1"
    assert b"malformed JSON" in dict(whole.headers)["loopd-error"]
    headers = {k: v.decode() for k, v in meta.headers}
    assert meta.key == b"k2" and meta.value == over[:1024]
    assert headers["loopd-truncated"] == "true" and headers["loopd-size"] == str(len(over))
    assert (headers["loopd-topic"], headers["loopd-partition"], headers["loopd-offset"]) == (
        kafka_topic, "0", "2")
    assert "exceeds max_payload" in headers["loopd-error"]


async def test_a_small_fetch_limit_bounds_fetches_but_a_larger_record_still_comes(
        kafka_broker: KafkaBroker, kafka_topic: str) -> None:
    """``fetch_max_bytes`` bounds what one fetch brings (the memory a backlog takes), and
    is a soft limit: a record larger than it still comes, alone, and the partition goes
    on after it in order."""
    await create_topic(kafka_broker.bootstrap, kafka_topic, partitions=4)
    pad = "x" * 1000
    records = [Record({"n": i, "pad": pad}, partition=i % 4) for i in range(80)]
    for partition in (1, 3):  # larger than a whole fetch, amid the others
        records.insert(40, Record({"n": f"big-{partition}", "pad": "y" * 20_000},
                                  partition=partition))
    await produce(kafka_broker.bootstrap, kafka_topic, records)
    cfg = config(kafka_broker, "kafka-fetch", kafka_topic, fetch_max_bytes="4KiB")
    assert cfg.fetch_max_bytes == 4096
    source, got = KafkaSource(cfg, session_timeout=SESSION), Collector()
    async with running(source, got):
        await wait_until(lambda: len(got.events) == 82, what="82 events")
    for partition in range(4):  # each partition whole and in order
        assert [e.data["n"] for e in got.events if f"[{partition}]@" in e.origin] == [
            r.value["n"] for r in records if r.partition == partition]
    for wrong in (100, "4GiB"):  # below a KiB; beyond the protocol's 32-bit field
        with pytest.raises(ValueError, match="fetch_max_bytes"):
            config(kafka_broker, "kafka-fetch", kafka_topic, fetch_max_bytes=wrong)
