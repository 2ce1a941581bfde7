"""MqttSource acknowledges a message to the broker only when its delivery is acked.

Each test holds some acks back, closes the source, and connects again under the same
client id (the persistent session): what the broker sends again is what was never
acknowledged to it. Needs a broker that redelivers unacknowledged messages (mosquitto).
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import aiomqtt
import orjson
import pytest
from structlog.testing import capture_logs

from loopd.events import Delivery, Event
from loopd.rules.loader import load_rules
from loopd.sources.base import Emit
from loopd.sources.mqtt import MqttSource
from tests.integration.test_mqtt_source import config, sample, supervised
from tests.servers import require, wait_until
from tests.servers.mqtt import MqttBroker, link_proxy
from tests.unit.test_engine import GatedStore, decisions, running

pytestmark = pytest.mark.mqtt


class Held:
    """An emit function that keeps every delivery and acks only those ``ack_now`` picks."""

    def __init__(self, ack_now: frozenset[int] = frozenset(), forward: Emit | None = None
                 ) -> None:
        self.deliveries: list[Delivery] = []
        self._ack_now = ack_now
        self._forward = forward  # hand each delivery on (to an engine, which acks it)

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if number(delivery.event) in self._ack_now:
            delivery.ack()
        if self._forward is not None:
            await self._forward(delivery)

    @property
    def events(self) -> list[Event]:
        return [d.event for d in self.deliveries]

    def numbers(self) -> list[int]:
        return [number(e) for e in self.events]


def number(event: Event) -> int:
    value = event.data["n"]
    assert isinstance(value, int)
    return value


async def publish(broker: MqttBroker, numbers: list[int | bytes], *, qos: int = 1) -> None:
    """Publish ``{"id": "m-N", "data": {"n": N}}`` for each N (raw bytes as they are)."""
    async with aiomqtt.Client(broker.host, broker.port, identifier="test-publisher",
                              username=broker.username) as client:
        for n in numbers:
            payload = n if isinstance(n, bytes) else orjson.dumps(
                {"id": f"m-{n}", "data": {"n": n}})
            await client.publish(f"acks/{n!r}", payload, qos=qos)


async def receive(broker: MqttBroker, name: str, emit: Held, count: int, *,
                  live: list[int | bytes] | None = None, **extra: object) -> None:
    """Run a source named ``name`` (client id ``loopd-r1-<name>``), publish ``live`` once it
    is connected, and close it when ``emit`` has ``count`` deliveries."""
    source = MqttSource(config(broker, name, ["acks/#"], **extra), replica="r1")
    async with supervised(source, emit):
        await wait_until(lambda: source.connected, what="source connected")
        if live:
            await publish(broker, live, qos=2)
        await wait_until(lambda: len(emit.deliveries) >= count, timeout=30,
                         what=f"{count} deliveries")


@pytest.fixture
def broker(mqtt_broker: MqttBroker) -> MqttBroker:
    require(mqtt_broker.persistent, "MQTT broker that redelivers unacked messages (mosquitto)")
    return mqtt_broker


async def test_only_acked_messages_are_not_redelivered_and_acks_go_in_order(
        broker: MqttBroker) -> None:
    """An unacked message comes again on the next connection with its event id; a message
    acked after one that is not is held back too (PUBACKs go in arrival order), and once
    everything is acked nothing comes again."""
    await receive(broker, "mq-ack", Held(), 0)  # creates the persistent session
    await publish(broker, [1, 2, 3])
    first = Held(ack_now=frozenset({1, 3}))
    await receive(broker, "mq-ack", first, 3)
    assert first.numbers() == [1, 2, 3]

    second = Held(ack_now=frozenset({2, 3}))
    await receive(broker, "mq-ack", second, 2)
    assert second.numbers() == [2, 3]
    assert [e.id for e in second.events] == ["m-2", "m-3"]

    third = Held(ack_now=frozenset({4}))
    await publish(broker, [4])
    await receive(broker, "mq-ack", third, 1)
    assert third.numbers() == [4]


async def test_an_ack_after_the_connection_is_gone_changes_nothing(
        broker: MqttBroker) -> None:
    """A delivery acked once its connection has closed (and acked twice) is not acked on
    the broker: the message comes again on the next connection."""
    await receive(broker, "mq-late", Held(), 0)
    await publish(broker, [1])
    first = Held()
    await receive(broker, "mq-late", first, 1)
    first.deliveries[0].ack()
    first.deliveries[0].ack()
    again = Held(ack_now=frozenset({1}))
    await receive(broker, "mq-late", again, 1)
    assert again.numbers() == [1]


async def test_a_rejected_message_is_acked_in_its_turn(broker: MqttBroker) -> None:
    """A rejected message is acked at once when nothing before it waits, so it never comes
    again; one behind an unacked message is acked after it, so it comes again with it."""
    name = "mq-reject-ack"
    rejected = sample("loopd_events_rejected_total", source=name, reason="decode")
    await receive(broker, name, Held(), 0)
    await publish(broker, [b'{"n": ', 2, b"[3]"])
    first = Held()
    await receive(broker, name, first, 1)
    await wait_until(lambda: sample("loopd_events_rejected_total", source=name,
                                    reason="decode") == rejected + 2, what="two rejections")

    second = Held(ack_now=frozenset({2}))
    await receive(broker, name, second, 1)
    await wait_until(lambda: sample("loopd_events_rejected_total", source=name,
                                    reason="decode") == rejected + 3, what="[3] again")

    await publish(broker, [4])
    third = Held(ack_now=frozenset({4}))
    await receive(broker, name, third, 1)
    assert (first.numbers(), second.numbers(), third.numbers()) == ([2], [2], [4])
    assert sample("loopd_events_rejected_total", source=name, reason="decode") == rejected + 3


@pytest.mark.parametrize(("qos", "redelivered"), [(2, True), (0, False)])
async def test_qos_2_is_received_at_qos_1_and_qos_0_is_never_redelivered(
        broker: MqttBroker, qos: int, redelivered: bool) -> None:
    """``qos: 2`` subscribes at QoS 1, so an unacked QoS 2 publish comes again; at
    ``qos: 0`` there is nothing to acknowledge and nothing comes again."""
    name = f"mq-qos{qos}"
    first = Held()
    await receive(broker, name, first, 1, live=[1], qos=qos)
    second = Held()  # the live message 2 comes after a redelivered 1
    await receive(broker, name, second, 2 if redelivered else 1, live=[2], qos=qos)
    assert second.numbers() == ([1, 2] if redelivered else [2])


async def test_a_message_is_acked_only_after_the_engine_committed_its_decision(
        broker: MqttBroker, tmp_path: Path) -> None:
    """While the engine's commit is held, the message it decided is not acknowledged: a new
    connection gets it again. Once decisions commit, the redelivery is recorded as a
    duplicate and acknowledged, and nothing comes again after that."""
    name = "mq-engine"
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text(
        f"rules:\n  - {{name: seen, on: {{source: {name}}}, run: {{action: core.noop}}}}\n")
    db = tmp_path / "loopd.db"
    async with running(db, load_rules([tmp_path / "rules"], None), gated=True) as r:
        gated = cast(GatedStore, r.store)
        gated.gate.clear()
        await receive(broker, name, Held(), 0)
        await publish(broker, [1])
        source = MqttSource(config(broker, name, ["acks/#"]), replica="r1")
        async with supervised(source, r.engine.emit):
            await wait_until(lambda: gated.waiting == 1, what="the decision's commit")
        assert decisions(db) == []

        again = Held()
        await receive(broker, name, again, 1)  # never acknowledged: here it is again
        gated.gate.set()
        await r.engine.drain(timeout=10)
        assert [e for e, _, _ in decisions(db)] == ["m-1"]

        duplicate = Held(forward=r.engine.emit)  # the redelivery: a duplicate, acked
        await receive(broker, name, duplicate, 1)
        await r.engine.drain(timeout=10)
        assert duplicate.deliveries[0].duplicate
    after = Held(ack_now=frozenset({2}))
    await receive(broker, name, after, 1, live=[2])
    assert (again.numbers(), after.numbers()) == ([1], [2])
    assert [e for e, _, _ in decisions(db)] == ["m-1"]


async def test_a_message_resent_after_a_reconnect_keeps_its_event_id(
        broker: MqttBroker) -> None:
    """A message without an id or time of its own that was not acknowledged when the
    connection dropped (here: a broker restart) comes again with the event id it had, so
    the store recognises it; a new message with the same payload afterwards is new."""
    emit = Held()
    source = MqttSource(config(broker, "mq-resent", ["acks/#"]), replica="r1")
    async with supervised(source, emit):
        await wait_until(lambda: source.connected, what="source connected")
        await publish(broker, [b'{"n": 1}', b'{"n": 2}'])
        await wait_until(lambda: len(emit.deliveries) >= 2, what="two messages")
        broker.stop()
        broker.start()
        await wait_until(lambda: len(emit.deliveries) >= 4, timeout=30, what="the resends")
        await publish(broker, [b'{"n": 1}'])
        await wait_until(lambda: len(emit.deliveries) >= 5, what="a new message")
    ids = [e.id for e in emit.events]
    assert emit.numbers() == [1, 2, 1, 2, 1]
    assert ids[2:4] == ids[:2] and ids[4] not in ids[:4]


async def test_a_failed_reconnect_keeps_the_event_ids_for_the_resends(
        broker: MqttBroker) -> None:
    """Reconnect attempts that never reach the broker (an outage after a blip) do not make
    the source forget the event ids of the unacknowledged messages: once the link is back,
    the resends of messages without an id or time of their own still get them."""
    emit = Held()
    async with link_proxy(broker) as proxy:
        # timeout: a refused attempt (closed before CONNACK) waits for it this long
        source = MqttSource(config(broker, "mq-refused", ["acks/#"], port=proxy.port),
                            replica="r1", timeout=1.0)
        async with supervised(source, emit):
            await wait_until(lambda: source.connected, what="source connected")
            await publish(broker, [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}'])
            await wait_until(lambda: len(emit.deliveries) >= 3, what="three messages")
            proxy.refuse = True
            proxy.cut()
            await wait_until(lambda: proxy.refused >= 2, what="two failed reconnects")
            proxy.refuse = False
            await wait_until(lambda: len(emit.deliveries) >= 6, timeout=30, what="the resends")
    ids = [e.id for e in emit.events]
    assert emit.numbers() == [1, 2, 3, 1, 2, 3]
    assert ids[3:] == ids[:3]


@pytest.mark.parametrize("fail_once", [False, True])
async def test_a_puback_lost_with_the_connection_keeps_the_event_ids_for_the_resends(
        broker: MqttBroker, fail_once: bool) -> None:
    """A message acked just before the connection died, whose PUBACK never reached the
    broker, is resent first (before the unacked ones): it and every resend after it get
    the event ids they had, also after a failed reconnect, and a new message with the same
    payload afterwards is new."""
    emit = Held()
    async with link_proxy(broker) as proxy:
        # timeout: a refused attempt (closed before CONNACK) waits for it this long
        source = MqttSource(config(broker, "mq-lost-ack", ["acks/#"], port=proxy.port),
                            replica="r1", timeout=1.0)
        async with supervised(source, emit):
            await wait_until(lambda: source.connected, what="source connected")
            await publish(broker, [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}'])
            await wait_until(lambda: len(emit.deliveries) >= 3, what="three messages")
            proxy.swallow = True
            emit.deliveries[0].ack()
            await wait_until(lambda: proxy.swallowed > 0, what="the PUBACK, swallowed")
            proxy.refuse = fail_once
            proxy.cut()
            await wait_until(lambda: proxy.refused >= int(fail_once), what="a failed reconnect")
            proxy.swallow = proxy.refuse = False
            await wait_until(lambda: len(emit.deliveries) >= 6, timeout=30, what="the resends")
            await publish(broker, [b'{"n": 1}'])
            await wait_until(lambda: len(emit.deliveries) >= 7, what="a new message")
    ids = [e.id for e in emit.events]
    assert emit.numbers() == [1, 2, 3, 1, 2, 3, 1]
    assert ids[3:6] == ids[:3] and ids[6] not in ids[:6]


async def test_a_message_queued_at_qos_2_arrives_with_one_warning(broker: MqttBroker) -> None:
    """Messages a session queued for an earlier QoS 2 subscription still arrive at QoS 2
    (paho acknowledges their receipt at once): they are delivered, and the source warns
    once, not per message."""
    name = "mq-queued-qos2"
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"loopd-r1-{name}",
                              username=broker.username, clean_session=False) as earlier:
        await earlier.subscribe("acks/#", qos=2)
    await publish(broker, [1, 2], qos=2)
    emit = Held(ack_now=frozenset({1, 2}))
    with capture_logs() as logs:
        await receive(broker, name, emit, 2, qos=2)
    assert emit.numbers() == [1, 2]
    warned = [e for e in logs if "QoS 2" in str(e["event"])]
    assert [(e["log_level"], e["source"]) for e in warned] == [("warning", name)]
