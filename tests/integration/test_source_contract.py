"""The Source contract (loopd/sources/base.py), checked the same way against every source type.

Every source runs under the real ``Supervisor`` and feeds a ``Collector`` (the
engine's place: an ``emit`` that records deliveries and acks them, or not):

* ``webhook`` and ``alertmanager``: the real API app (``loopd.api``) on a loopback
  port, its ingest handlers emitting into the collector;
* ``mqtt``: a real broker (mosquitto, or amqtt; tests/servers/mqtt.py);
* ``kafka``: the real tansu broker (tests/servers/kafka.py);
* ``sim``: the simulated fleet of ``loopd demo``, which makes its own events.

A ``Harness`` hides how a message reaches each source (an HTTP POST, an MQTT
publish, a Kafka produce); the assertions are the same for all of them.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiomqtt
import orjson
import pytest
from aiohttp import web

from loopd import metrics
from loopd.api.app import ApiContext, build_app
from loopd.config import (
    AlertmanagerSourceConfig,
    KafkaSourceConfig,
    MqttSourceConfig,
    SimSourceConfig,
    WebhookSourceConfig,
)
from loopd.events import Delivery, Event
from loopd.sources.base import Source, Supervisor
from loopd.sources.kafka import KafkaSource
from loopd.sources.mqtt import MqttSource
from loopd.sources.sim import Fleet, SimSource
from loopd.sources.webhook import PushSource
from tests.integration.test_kafka_source import Collector
from tests.servers import free_port, require, wait_until
from tests.servers.kafka import KafkaBroker, Record, create_topic, produce
from tests.servers.mqtt import MqttBroker

KINDS = ["webhook", "alertmanager", "mqtt", "kafka", "sim"]
EXTERNAL = [k for k in KINDS if k != "sim"]  # sources that read messages made by others
PROMPT = 5.0  # "promptly": close() to run() returned, with room for a loaded CI machine
SESSION = 2.0  # Kafka group session; tansu answers each JoinGroup after ~session/2


def rejected(source: str) -> float:
    """loopd_events_rejected_total of ``source``, summed over reasons."""
    return float(sum(s.value for metric in metrics.current().events_rejected.collect()
                     for s in metric.samples
                     if s.name.endswith("_total") and s.labels["source"] == source))


class Harness:
    """One source type: how to build the source and how to hand it messages."""

    kind: str
    name: str

    def source(self) -> Source:
        raise NotImplementedError

    async def setup(self) -> None:
        """Start what the source reads from (API listener, topic)."""

    async def send(self, n: int) -> None:
        """Make the source read message number ``n`` (nothing for sources that make their own)."""

    async def send_malformed(self) -> None:
        raise NotImplementedError

    def number(self, event: Event) -> int:
        """Which message ``event`` came from."""
        return int(event.data["n"])

    def expected(self, n: int) -> tuple[str, str | None]:
        """The topic and key the event of message ``n`` must have."""
        raise NotImplementedError

    async def teardown(self) -> None:
        """Release what ``setup`` started."""


class PushHarness(Harness):
    """webhook / alertmanager: POSTs to the real API, whose handlers emit into the collector."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"{kind}-{uuid.uuid4().hex[:8]}"
        cls = WebhookSourceConfig if kind == "webhook" else AlertmanagerSourceConfig
        self.config = cls.model_validate({"type": kind, "name": self.name})
        self.collector = Collector()
        self.posts: list[asyncio.Task[tuple[int, Any]]] = []
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    def source(self) -> Source:
        return PushSource(self.config)

    async def setup(self) -> None:
        harness = self

        async def emit(delivery: Delivery) -> None:  # ingest's only way in: the collector
            await harness.collector(delivery)

        ctx = ApiContext(
            control=None,  # type: ignore[arg-type]  # ingest never reaches the control facade
            emit=emit, push_sources={self.name: (self.kind, self.config.max_payload)},
            decision_timeout=30.0,
        )
        self._runner = web.AppRunner(build_app(ctx))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self._http = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}")

    @property
    def path(self) -> str:
        return f"/v1/events/{self.name}" if self.kind == "webhook" else \
            f"/v1/alertmanager/{self.name}"

    async def post(self, body: bytes) -> tuple[int, Any]:
        assert self._http is not None
        async with self._http.post(self.path, data=body,
                                   headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json()

    def payload(self, n: int) -> Any:
        if self.kind == "webhook":
            return {"id": f"e-{n}", "topic": "contract", "key": f"k-{n}", "data": {"n": n}}
        return {"version": "4", "status": "firing", "receiver": "loopd", "alerts": [{
            "status": "firing", "startsAt": "2024-05-01T10:00:00Z",
            "labels": {"alertname": "Contract", "instance": f"k-{n}", "n": str(n)},
        }]}

    async def send(self, n: int) -> None:
        # the handler answers only once the event is acked: never wait for it here
        self.posts.append(asyncio.create_task(self.post(orjson.dumps(self.payload(n)))))

    async def send_malformed(self) -> None:
        status, body = await self.post(b'{"alerts": [' if self.kind == "alertmanager"
                                       else b'{"topic": ')
        assert status == 400 and "malformed JSON" in body["error"], body

    def number(self, event: Event) -> int:
        if self.kind == "webhook":
            return int(event.data["n"])
        return int(event.data["labels"]["n"])

    def expected(self, n: int) -> tuple[str, str | None]:
        return ("contract" if self.kind == "webhook" else "Contract"), f"k-{n}"

    async def teardown(self) -> None:
        for post in self.posts:
            post.cancel()
        await asyncio.gather(*self.posts, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()


class MqttHarness(Harness):
    kind = "mqtt"

    def __init__(self, broker: MqttBroker) -> None:
        self.broker = broker
        self.name = f"mqtt-{uuid.uuid4().hex[:8]}"
        self.config = MqttSourceConfig.model_validate({
            "type": "mqtt", "name": self.name, "host": broker.host, "port": broker.port,
            "username": broker.username, "topics": ["contract/#"], "qos": 1, "keepalive": 5,
        })

    def source(self) -> Source:
        return MqttSource(self.config)

    def unreachable(self) -> Source:
        return MqttSource(self.config.model_copy(update={"port": free_port()}), timeout=2.0)

    async def publish(self, topic: str, payload: bytes) -> None:
        async with aiomqtt.Client(self.broker.host, self.broker.port,
                                  identifier=f"pub-{uuid.uuid4().hex[:8]}",
                                  username=self.broker.username) as client:
            await client.publish(topic, payload, qos=1)  # returns once the broker has it

    async def send(self, n: int) -> None:
        await self.publish(f"contract/{n}", orjson.dumps({"key": f"k-{n}", "data": {"n": n}}))

    async def send_malformed(self) -> None:
        await self.publish("contract/bad", b'{"n": ')

    def expected(self, n: int) -> tuple[str, str | None]:
        return f"contract/{n}", f"k-{n}"


class KafkaHarness(Harness):
    kind = "kafka"

    def __init__(self, broker: KafkaBroker, topic: str) -> None:
        self.broker = broker
        self.name = f"kafka-{uuid.uuid4().hex[:8]}"
        self.topic = topic
        self.config = KafkaSourceConfig.model_validate({
            "type": "kafka", "name": self.name, "bootstrap": broker.bootstrap,
            "topics": [topic], "group": f"g-{topic}", "commit_interval": 0.05,
        })

    def source(self) -> Source:
        return KafkaSource(self.config, session_timeout=SESSION)

    def unreachable(self) -> Source:
        cfg = self.config.model_copy(update={"bootstrap": f"127.0.0.1:{free_port()}"})
        return KafkaSource(cfg, session_timeout=SESSION)

    async def setup(self) -> None:
        await create_topic(self.broker.bootstrap, self.topic)

    async def send(self, n: int) -> None:
        await produce(self.broker.bootstrap, self.topic, [Record({"n": n}, key=f"k-{n}")])

    async def send_malformed(self) -> None:
        await produce(self.broker.bootstrap, self.topic, [Record(b"\xff not json")])

    def expected(self, n: int) -> tuple[str, str | None]:
        return self.topic, f"k-{n}"


class SimHarness(Harness):
    """The demo fleet: one host, one service, a telemetry event every 20 ms."""

    kind = "sim"

    def __init__(self) -> None:
        self.name = f"sim-{uuid.uuid4().hex[:8]}"
        self.config = SimSourceConfig.model_validate({
            "type": "sim", "name": self.name, "hosts": ["h1"], "services": ["svc"],
            "interval": 0.02,
        })

    def source(self) -> Source:
        return SimSource(self.config, Fleet(self.config))

    def number(self, event: Event) -> int:
        return 0  # every tick is "the same message": this host's service telemetry

    def expected(self, n: int) -> tuple[str, str | None]:
        return "telemetry/h1/svc", "h1/svc"


@dataclass
class Running:
    """A source running under a Supervisor (fast backoff) into ``emit``."""

    source: Source
    supervisor: Supervisor
    task: asyncio.Task[None]

    async def stop(self) -> float:
        """Stop the supervisor; return how long until its run() returned."""
        started = time.monotonic()
        await self.supervisor.stop()
        await asyncio.wait_for(self.task, timeout=4 * PROMPT)
        return time.monotonic() - started


async def supervise(source: Source, emit: Collector) -> Running:
    supervisor = Supervisor(source, emit, min_backoff=0.05, max_backoff=0.2)
    running = Running(source, supervisor, asyncio.create_task(supervisor.run()))
    await wait_until(lambda: source.connected or running.task.done(), what="source connected")
    if running.task.done():
        running.task.result()
    return running


@pytest.fixture(params=KINDS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    kind: str = request.param
    made: Harness
    if kind in ("webhook", "alertmanager"):
        made = PushHarness(kind)
    elif kind == "mqtt":
        made = MqttHarness(request.getfixturevalue("mqtt_broker"))
    elif kind == "kafka":
        made = KafkaHarness(request.getfixturevalue("kafka_broker"),
                            request.getfixturevalue("kafka_topic"))
    else:
        made = SimHarness()
    await made.setup()
    try:
        yield made
    finally:
        await made.teardown()


def _at_least(collector: Collector, n: int) -> bool:
    return len(collector.events) >= n


def collector_of(harness: Harness, should_ack: Callable[[Event], bool] = lambda e: True
                 ) -> Collector:
    """The collector the source must emit into (push sources emit through the API's)."""
    if isinstance(harness, PushHarness):
        harness.collector.should_ack = should_ack
        return harness.collector
    return Collector(should_ack)


# -- the contract ------------------------------------------------------------------------------

async def test_deliveries_carry_normalized_events(harness: Harness) -> None:
    """Each message becomes one Delivery whose event has an id, this source's name, the
    message's topic and key, a time and a dict of data, handed over in order."""
    emit = collector_of(harness)
    running = await supervise(harness.source(), emit)
    try:
        for n in (1, 2):
            await harness.send(n)
            await wait_until(functools.partial(_at_least, emit, n), what=f"event {n}")
    finally:
        await running.stop()
    sent = [1, 2] if harness.kind != "sim" else [0, 0]
    assert [harness.number(e) for e in emit.events[:2]] == sent
    for delivery, n in zip(emit.deliveries, sent, strict=False):
        event = delivery.event
        assert isinstance(delivery, Delivery) and callable(delivery.ack)
        assert isinstance(event.id, str) and event.id
        assert event.source == harness.name
        assert (event.topic, event.key) == harness.expected(n)
        assert isinstance(event.time, float) and event.time > 0
        assert isinstance(event.data, dict)
        assert event.origin  # names where the message came from
    assert len({e.id for e in emit.events}) == len(emit.events)


async def test_ack_may_be_called_again(harness: Harness) -> None:
    """Calling a delivery's ack a second time (a redelivered decision) changes nothing."""
    emit = collector_of(harness)
    running = await supervise(harness.source(), emit)
    try:
        await harness.send(1)
        await harness.send(2)
        await wait_until(lambda: len(emit.events) >= 2, what="two events")
        for delivery in emit.deliveries:
            delivery.ack()
        await harness.send(3)
        await wait_until(lambda: len(emit.events) >= 3, what="an event after the acks")
        assert running.source.connected
    finally:
        await running.stop()


async def test_close_ends_reading_promptly(harness: Harness) -> None:
    """Supervisor.stop() (source.close()) makes run() return within seconds, after which the
    source is no longer connected, and a closed source's run() returns at once."""
    emit = collector_of(harness)
    source = harness.source()
    running = await supervise(source, emit)
    await harness.send(1)
    await wait_until(lambda: len(emit.events) >= 1, what="one event")
    assert await running.stop() < PROMPT
    assert not source.connected
    async with asyncio.timeout(PROMPT):
        await source.run(emit)  # closed: returns without connecting again


@pytest.mark.parametrize("harness", ["mqtt", "kafka"], indirect=True)
async def test_stop_during_the_reconnect_backoff_is_prompt(harness: Harness) -> None:
    """A source whose server is unreachable fails, and stopping its Supervisor in the backoff
    before the next attempt returns at once, not when the backoff ends."""
    assert isinstance(harness, MqttHarness | KafkaHarness)
    source = harness.unreachable()
    supervisor = Supervisor(source, collector_of(harness), min_backoff=60.0, max_backoff=60.0)
    task = asyncio.create_task(supervisor.run())
    try:
        await wait_until(lambda: metrics.current().registry.get_sample_value(
            "loopd_source_up", {"source": source.name}) == 0.0, what="the connect failure")
        assert not source.connected
    finally:
        started = time.monotonic()
        await supervisor.stop()
        await asyncio.wait_for(task, timeout=4 * PROMPT)
    assert time.monotonic() - started < PROMPT


@pytest.mark.parametrize("harness", EXTERNAL, indirect=True)
async def test_a_malformed_message_is_rejected_and_reading_goes_on(harness: Harness) -> None:
    """A message that cannot become an event is counted in loopd_events_rejected_total, never
    emitted, and the messages after it still arrive."""
    emit = collector_of(harness)
    running = await supervise(harness.source(), emit)
    try:
        before = rejected(harness.name)
        await harness.send_malformed()
        await wait_until(lambda: rejected(harness.name) == before + 1, what="one rejection")
        await harness.send(1)
        await wait_until(lambda: len(emit.events) >= 1, what="the event after it")
        assert running.source.connected
    finally:
        await running.stop()
    assert [harness.number(e) for e in emit.events] == [1]


# -- what "acknowledged" means, per kind of source ----------------------------------------------

@pytest.mark.parametrize("harness", ["webhook", "alertmanager"], indirect=True)
async def test_a_push_is_answered_only_once_acked(harness: Harness) -> None:
    """An HTTP push is answered 200 only after its event is acked: a sender that got a 2xx
    knows the event was decided."""
    assert isinstance(harness, PushHarness)
    emit = collector_of(harness, should_ack=lambda e: False)
    running = await supervise(harness.source(), emit)
    try:
        await harness.send(1)
        await wait_until(lambda: len(emit.deliveries) == 1, what="the delivery")
        post = harness.posts[0]
        assert not post.done()  # the handler is still waiting for the decision
        emit.deliveries[0].ack()
        status, body = await asyncio.wait_for(post, PROMPT)
        assert (status, body["accepted"]) == (200, 1)
    finally:
        await running.stop()


@pytest.mark.parametrize("harness", ["kafka"], indirect=True)
async def test_an_unacked_kafka_record_is_redelivered_after_a_restart(harness: Harness) -> None:
    """A record whose delivery was never acked comes again to the next consumer of the group;
    the acked record before it does not."""
    first = collector_of(harness, should_ack=lambda e: e.data["n"] == 1)
    running = await supervise(harness.source(), first)
    try:
        await harness.send(1)
        await harness.send(2)
        await wait_until(lambda: len(first.events) >= 2, what="both records")
    finally:
        await running.stop()
    second = collector_of(harness)
    running = await supervise(harness.source(), second)
    try:
        await wait_until(lambda: len(second.events) >= 1, timeout=30, what="the redelivery")
    finally:
        await running.stop()
    assert [harness.number(e) for e in second.events] == [2]
    assert second.events[0].id == first.events[1].id  # the same record, recognised by id


@pytest.mark.parametrize("harness", ["mqtt"], indirect=True)
async def test_an_unacked_mqtt_message_is_redelivered_after_a_reconnect(
        harness: Harness) -> None:
    """A QoS 1 message whose delivery was never acked comes again when the persistent
    session reconnects; the acked one before it does not, and live messages follow."""
    assert isinstance(harness, MqttHarness)
    require(harness.broker.persistent, "MQTT broker that redelivers unacked messages (mosquitto)")
    first = collector_of(harness, should_ack=lambda e: e.data["n"] == 1)
    running = await supervise(harness.source(), first)
    try:
        await harness.send(1)
        await harness.send(2)
        await wait_until(lambda: len(first.events) >= 2, what="both messages")
    finally:
        await running.stop()
    second = collector_of(harness)
    running = await supervise(harness.source(), second)
    try:
        await wait_until(lambda: len(second.events) >= 1, timeout=30, what="the redelivery")
        await harness.send(3)
        await wait_until(lambda: len(second.events) >= 2, what="a live message")
    finally:
        await running.stop()
    assert [harness.number(e) for e in second.events] == [2, 3]
