"""MqttSource against a real broker on loopback (mosquitto, or amqtt as a fallback)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import aiomqtt
import orjson
import pytest
from structlog.testing import capture_logs

from loopd import metrics
from loopd.config import MqttSourceConfig
from loopd.errors import ConfigError, SourceError
from loopd.events import Delivery, Event
from loopd.sources.base import Emit, Supervisor
from loopd.sources.mqtt import MqttSource
from tests.servers import require, wait_until
from tests.servers.mqtt import MqttBroker

pytestmark = pytest.mark.mqtt


class Collector:
    """An emit function that records events and acks them like the engine does."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.events.append(delivery.event)
        delivery.ack()

    def payloads(self) -> list[dict[str, object]]:
        return [e.data for e in self.events]


def config(broker: MqttBroker, name: str, topics: list[str], **extra: object) -> MqttSourceConfig:
    return MqttSourceConfig.model_validate(
        {"type": "mqtt", "name": name, "host": broker.host, "port": broker.port,
         "username": broker.username, "topics": topics, "qos": 1, "keepalive": 5, **extra}
    )


async def publish(broker: MqttBroker, *messages: tuple[str, bytes]) -> None:
    """Publish at QoS 1: each publish returns once the broker has the message."""
    async with aiomqtt.Client(
        broker.host, broker.port, identifier="test-publisher", username=broker.username
    ) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


def sample(name: str, **labels: str) -> float:
    return metrics.current().registry.get_sample_value(name, labels) or 0.0


def source_up(name: str) -> float | None:
    return metrics.current().registry.get_sample_value("loopd_source_up", {"source": name})


@contextlib.asynccontextmanager
async def supervised(source: MqttSource, emit: Emit) -> AsyncIterator[Supervisor]:
    """Run ``source`` under a Supervisor (fast backoff) until the block ends."""
    supervisor = Supervisor(source, emit, min_backoff=0.05, max_backoff=0.2)
    task = asyncio.create_task(supervisor.run())
    try:
        yield supervisor
    finally:
        await supervisor.stop()
        await asyncio.wait_for(task, timeout=15)


async def test_messages_on_several_filters_become_events(mqtt_broker: MqttBroker) -> None:
    """Messages matching any of the filters (literal, ``+``, ``#``) become events with their topic,
    source and origin; others are not received.
    """
    source = MqttSource(config(mqtt_broker, "mq-filters", ["telemetry/+/cpu", "alerts/#", "exact"]))
    emit = Collector()
    async with supervised(source, emit):
        await wait_until(lambda: source.connected, what="source connected")
        await publish(
            mqtt_broker,
            ("telemetry/web-1/mem", b'{"skip": 1}'),
            ("telemetry/web-1/cpu/core0", b'{"skip": 2}'),
            ("telemetry/web-1/cpu", b'{"value": 93.5}'),
            ("alerts/disk/full", b'{"id": "a-1", "key": "db-1", "data": {"used": 0.99}}'),
            ("alerts", b'{"top": true}'),
            ("exact", b'{"last": true}'),
        )
        await wait_until(lambda: len(emit.events) >= 4, what="four events")
    assert [(e.topic, e.source, e.origin) for e in emit.events] == [
        ("telemetry/web-1/cpu", "mq-filters", "mqtt telemetry/web-1/cpu"),
        ("alerts/disk/full", "mq-filters", "mqtt alerts/disk/full"),
        ("alerts", "mq-filters", "mqtt alerts"),
        ("exact", "mq-filters", "mqtt exact"),
    ]
    assert emit.payloads() == [{"value": 93.5}, {"used": 0.99}, {"top": True}, {"last": True}]
    envelope = emit.events[1]
    assert (envelope.id, envelope.key) == ("a-1", "db-1")
    others = [emit.events[i].id for i in (0, 2, 3)]
    assert all(re.fullmatch(r"[0-9a-f]{16,}", i) for i in others) and len(set(others)) == 3


async def test_rejected_messages_are_counted_and_the_stream_continues(
    mqtt_broker: MqttBroker,
) -> None:
    """Malformed JSON, a JSON list and an oversized payload are counted in
    loopd_events_rejected_total, never emitted, and later messages still arrive.
    """
    name = "mq-rejects"
    source = MqttSource(config(mqtt_broker, name, ["in/#"], max_payload=64))
    emit = Collector()
    decode = sample("loopd_events_rejected_total", source=name, reason="decode")
    too_large = sample("loopd_events_rejected_total", source=name, reason="too_large")
    async with supervised(source, emit):
        await wait_until(lambda: source.connected, what="source connected")
        await publish(
            mqtt_broker,
            ("in/a", b'{"broken": '),
            ("in/b", b"[1, 2, 3]"),
            ("in/c", b"\xff\xfe not utf-8"),
            ("in/d", orjson.dumps({"blob": "x" * 100})),
            ("in/e", b'{"ok": 1}'),
        )
        await wait_until(lambda: len(emit.events) >= 1, what="the valid message")
        assert sample("loopd_events_rejected_total", source=name, reason="decode") == decode + 3
        assert sample("loopd_events_rejected_total", source=name, reason="too_large") == (
            too_large + 1
        )
        await publish(mqtt_broker, ("in/f", b'{"ok": 2}'))
        await wait_until(lambda: len(emit.events) >= 2, what="a message after the rejects")
    assert emit.payloads() == [{"ok": 1}, {"ok": 2}]


async def test_a_bare_number_is_a_value_and_other_bare_json_is_rejected_by_topic(
    mqtt_broker: MqttBroker,
) -> None:
    """A payload that is a plain JSON number becomes ``{"value": N}``; a bare string, array
    or boolean is rejected with a warning naming its topic, and the stream goes on."""
    name = "mq-bare"
    source = MqttSource(config(mqtt_broker, name, ["bare/#"]))
    emit = Collector()
    decode = sample("loopd_events_rejected_total", source=name, reason="decode")
    with capture_logs() as logs:
        async with supervised(source, emit):
            await wait_until(lambda: source.connected, what="source connected")
            await publish(
                mqtt_broker,
                ("bare/web-1/cpu", b"93.5"),
                ("bare/web-1/name", b'"web-1"'),
                ("bare/web-1/list", b"[1, 2]"),
                ("bare/web-1/up", b"true"),
                ("bare/web-1/load", b" 7\n"),
            )
            await wait_until(lambda: len(emit.events) >= 2, what="the two numbers")
            await wait_until(
                lambda: sample("loopd_events_rejected_total", source=name, reason="decode")
                == decode + 3, what="three rejects")
    assert [(e.topic, e.data) for e in emit.events] == [
        ("bare/web-1/cpu", {"value": 93.5}), ("bare/web-1/load", {"value": 7})]
    rejected = {entry["topic"]: entry["error"] for entry in logs
                if entry["event"] == "event rejected"}
    assert rejected == {
        "bare/web-1/name": "mqtt bare/web-1/name: expected a JSON object or a bare number, "
                           "got a string",
        "bare/web-1/list": "mqtt bare/web-1/list: expected a JSON object or a bare number, "
                           "got an array",
        "bare/web-1/up": "mqtt bare/web-1/up: expected a JSON object or a bare number, "
                         "got a boolean",
    }


async def test_broker_restart_reconnects_and_resubscribes(mqtt_broker: MqttBroker) -> None:
    """When the broker restarts, loopd_source_up drops to 0, the supervised source reconnects and
    resubscribes (back to 1), and later messages arrive. A broker stopped before loopd's
    PUBACK of t/1 reached it sends t/1 again after the restart (DUP, at least once): it
    comes with the event id it had, so the engine decides it once (mosquitto's log showed
    this under two test workers; the test then waited for exactly two events).
    """
    name = "mq-restart"
    source = MqttSource(config(mqtt_broker, name, ["t/+"]))
    emit = Collector()
    async with supervised(source, emit):
        await wait_until(lambda: source_up(name) == 1.0, what="source up")
        await publish(mqtt_broker, ("t/1", b'{"n": 1}'))
        await wait_until(lambda: len(emit.events) == 1, what="message before restart")

        mqtt_broker.stop()
        await wait_until(lambda: source_up(name) == 0.0, what="source down")
        assert not source.connected
        mqtt_broker.start()
        await wait_until(lambda: source_up(name) == 1.0, what="source up again")

        await publish(mqtt_broker, ("t/2", b'{"n": 2}'))
        await wait_until(lambda: {"n": 2} in emit.payloads(), what="message after restart")
    first, *again, last = emit.events
    assert (first.data, last.data) == ({"n": 1}, {"n": 2})
    assert [(e.id, e.data) for e in again] in ([], [(first.id, first.data)])


@pytest.mark.parametrize("restart_broker", [False, True], ids=["same-broker", "broker-restarted"])
async def test_qos1_messages_published_while_disconnected_arrive_after_reconnect(
    mqtt_broker: MqttBroker, restart_broker: bool,
) -> None:
    """QoS 1 messages published while loopd is disconnected are queued in its persistent session and
    delivered, in order, when it reconnects (also across a broker restart).
    """
    if restart_broker:
        require(mqtt_broker.persistent, "MQTT broker that persists sessions (mosquitto)")
    cfg = config(mqtt_broker, "mq-offline", ["jobs/#"])
    first = MqttSource(cfg, replica="r1")
    async with supervised(first, Collector()):  # creates the persistent session
        await wait_until(lambda: first.connected, what="first connection")

    await publish(mqtt_broker, ("jobs/a", b'{"n": 1}'), ("jobs/b", b'{"n": 2}'))
    if restart_broker:
        mqtt_broker.stop()
        mqtt_broker.start()

    second, emit = MqttSource(cfg, replica="r1"), Collector()  # the same session
    async with supervised(second, emit):
        await wait_until(lambda: len(emit.events) >= 2, what="queued messages")
        await publish(mqtt_broker, ("jobs/c", b'{"n": 3}'))
        await wait_until(lambda: len(emit.events) >= 3, what="live message")
    assert emit.payloads() == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert second.client_id == "loopd-r1-mq-offline"


async def test_close_makes_run_return_promptly(mqtt_broker: MqttBroker) -> None:
    """close() ends run() quickly, both while connected and before run() starts."""
    source = MqttSource(config(mqtt_broker, "mq-close", ["x"]))
    task = asyncio.create_task(source.run(Collector()))
    await wait_until(lambda: source.connected, what="source connected")
    await source.close()
    await asyncio.wait_for(task, timeout=2)
    assert not source.connected
    await asyncio.wait_for(source.run(Collector()), timeout=1)


async def test_connect_failure_raises_for_the_supervisor(mqtt_broker: MqttBroker) -> None:
    """With no broker listening, run() raises a SourceError naming the address instead of retrying
    itself.
    """
    mqtt_broker.stop()
    source = MqttSource(config(mqtt_broker, "mq-refused", ["x"]))
    with pytest.raises(SourceError, match=rf"mqtt 127\.0\.0\.1:{mqtt_broker.port}"):
        await asyncio.wait_for(source.run(Collector()), timeout=15)
    assert not source.connected


@contextlib.asynccontextmanager
async def hung_broker() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A TCP server that accepts connections and never answers, like a hung broker."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # until the client or the test closes the connection
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], writers
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_connect_to_a_hung_broker_times_out() -> None:
    """A broker that accepts TCP but never sends CONNACK makes run() raise SourceError after the
    timeout, not hang.
    """
    async with hung_broker() as (port, _):
        cfg = MqttSourceConfig.model_validate(
            {"type": "mqtt", "name": "mq-hung", "port": port, "topics": ["x"]}
        )
        with pytest.raises(SourceError, match="timed out"):
            await asyncio.wait_for(MqttSource(cfg, timeout=0.3).run(Collector()), timeout=10)


async def test_close_while_connecting_returns_promptly() -> None:
    """close() ends run() at once even while it waits for a CONNACK that never comes."""
    async with hung_broker() as (port, writers):
        cfg = MqttSourceConfig.model_validate(
            {"type": "mqtt", "name": "mq-hung-close", "port": port, "topics": ["x"]}
        )
        source = MqttSource(cfg, timeout=30)
        task = asyncio.create_task(source.run(Collector()))
        await wait_until(lambda: bool(writers), what="the connection attempt")
        await source.close()
        await asyncio.wait_for(task, timeout=1)
        assert not source.connected


def test_bad_configuration_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid topic filter or an unresolvable password reference raises ConfigError naming the
    culprit, never the secret.
    """
    base = {"type": "mqtt", "name": "mq-bad", "topics": ["ok/#"]}
    with pytest.raises(ConfigError, match=r"invalid MQTT topic filter 'a/#/b'"):
        MqttSource(MqttSourceConfig.model_validate({**base, "topics": ["ok", "a/#/b"]}))
    monkeypatch.delenv("LOOPD_TEST_MQTT_PASSWORD", raising=False)
    cfg = MqttSourceConfig.model_validate(
        {**base, "username": "loopd", "password_ref": "env:LOOPD_TEST_MQTT_PASSWORD"}
    )
    with pytest.raises(ConfigError, match="env:LOOPD_TEST_MQTT_PASSWORD"):
        MqttSource(cfg)
    monkeypatch.setenv("LOOPD_TEST_MQTT_PASSWORD", "s3cret")
    assert MqttSource(cfg, replica="r1").client_id == "loopd-r1-mq-bad"
