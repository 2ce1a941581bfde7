"""Several replicas on one MQTT broker: a client id per replica, shared subscriptions.

Shared subscriptions need a broker that has them (mosquitto 2 does, for MQTT 3.1.1 and 5;
the amqtt fallback does not): those tests skip on amqtt, and fail under CI=true.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import orjson
import pydantic
import pytest

from loopd.config import MqttSinkConfig, MqttSourceConfig
from loopd.packs.publish import MqttBus, build_buses
from loopd.sources.mqtt import MqttSource
from tests.integration.test_mqtt_source import Collector, config, publish, supervised
from tests.servers import require, wait_until
from tests.servers.mqtt import MqttBroker

pytestmark = pytest.mark.mqtt


@contextlib.asynccontextmanager
async def replicas(cfg: MqttSourceConfig, *names: str
                   ) -> AsyncIterator[list[tuple[MqttSource, Collector]]]:
    """One supervised source per replica name, all built from ``cfg``, connected."""
    pairs = [(MqttSource(cfg, replica=name), Collector()) for name in names]
    async with contextlib.AsyncExitStack() as stack:
        for source, emit in pairs:
            await stack.enter_async_context(supervised(source, emit))
        await wait_until(lambda: all(s.connected for s, _ in pairs), what="every replica up")
        yield pairs


def numbers(emit: Collector) -> list[int]:
    return [int(str(e.data["n"])) for e in emit.events]


async def test_two_replicas_with_one_config_both_stay_connected(mqtt_broker: MqttBroker) -> None:
    """Two replicas with the same source config and the default client id connect as distinct
    clients, so neither disconnects the other and each receives every message once."""
    cfg = config(mqtt_broker, "mq", ["plant/#"])
    async with replicas(cfg, "r1", "r2") as pairs:
        assert [s.client_id for s, _ in pairs] == ["loopd-r1-mq", "loopd-r2-mq"]
        await publish(mqtt_broker, *[
            (f"plant/{n}", orjson.dumps({"n": n})) for n in range(20)])
        await wait_until(lambda: all(len(e.events) >= 20 for _, e in pairs),
                         what="every message at both replicas")
        assert all(s.connected for s, _ in pairs)
    for _, emit in pairs:
        assert numbers(emit) == list(range(20))


async def test_shared_subscription_splits_messages_between_replicas(
    mqtt_broker: MqttBroker,
) -> None:
    """With ``shared:``, 200 QoS 1 messages are split between two replicas, none to both and
    none lost, and each event carries the message's real topic, not the $share filter."""
    require(mqtt_broker.kind == "mosquitto", "MQTT broker with shared subscriptions (mosquitto)")
    cfg = config(mqtt_broker, "mq-shared", ["plant/+/cpu", "alerts/#"], shared="loopd")
    async with replicas(cfg, "r1", "r2") as pairs:
        assert pairs[0][0].filters == ["$share/loopd/plant/+/cpu", "$share/loopd/alerts/#"]
        await publish(mqtt_broker, *[
            (f"plant/h{n}/cpu" if n % 2 else f"alerts/h{n}", orjson.dumps({"n": n}))
            for n in range(200)])
        await wait_until(lambda: sum(len(e.events) for _, e in pairs) >= 200,
                         what="200 messages over both replicas")
    (_, a), (_, b) = pairs
    got = Counter(numbers(a) + numbers(b))
    assert sorted(got) == list(range(200))  # none lost
    assert set(got.values()) == {1}  # none delivered to both
    assert a.events and b.events  # both took a share
    for event in [*a.events, *b.events]:
        n = event.data["n"]
        assert event.topic == (f"plant/h{n}/cpu" if int(str(n)) % 2 else f"alerts/h{n}")
        assert event.origin == f"mqtt {event.topic}"


async def test_unshared_replicas_each_get_every_message_next_to_a_shared_group(
    mqtt_broker: MqttBroker,
) -> None:
    """A shared group and a plain subscription on the same topic are independent: the plain
    subscriber gets every message, the group gets each message once."""
    require(mqtt_broker.kind == "mosquitto", "MQTT broker with shared subscriptions (mosquitto)")
    shared = config(mqtt_broker, "mq-group", ["t/#"], shared="g1")
    plain = config(mqtt_broker, "mq-plain", ["t/#"])
    async with replicas(shared, "r1", "r2") as group, replicas(plain, "r1") as alone:
        await publish(mqtt_broker, *[(f"t/{n}", orjson.dumps({"n": n})) for n in range(30)])
        await wait_until(lambda: len(alone[0][1].events) >= 30
                         and sum(len(e.events) for _, e in group) >= 30,
                         what="30 messages at the plain subscriber and over the group")
    assert numbers(alone[0][1]) == list(range(30))
    assert sorted(numbers(group[0][1]) + numbers(group[1][1])) == list(range(30))


def test_client_id_template_expands_the_replica() -> None:
    """A configured client_id names the replica with {replica}, other placeholders and bad
    share groups are refused at load, and the publish bus connects as the source's id plus
    -pub, per replica."""
    base = {"type": "mqtt", "name": "mq", "topics": ["x/#"]}
    cfg = MqttSourceConfig.model_validate({**base, "client_id": "plant-{replica}"})
    assert MqttSource(cfg, replica="pod-0").client_id == "plant-pod-0"
    fixed = MqttSourceConfig.model_validate({**base, "client_id": "plant"})
    assert MqttSource(fixed, replica="pod-0").client_id == "plant"
    for bad in ({"client_id": "loopd-{host}"}, {"client_id": ""}, {"shared": "a/b"},
                {"shared": "+"}, {"shared": ""}):
        with pytest.raises(pydantic.ValidationError):
            MqttSourceConfig.model_validate({**base, **bad})

    sink = MqttSinkConfig.model_validate({"type": "mqtt", "name": "out"})
    buses = build_buses([MqttSourceConfig.model_validate(base), sink], replica="pod-1")
    ids = {name: bus.client_id for name, bus in buses.items() if isinstance(bus, MqttBus)}
    assert ids == {"mq": "loopd-pod-1-mq-pub", "out": "loopd-pod-1-out-pub"}


def test_default_replica_comes_from_loopd_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a replica given, the client id uses LOOPD_REPLICA, the name the store uses."""
    monkeypatch.setenv("LOOPD_REPLICA", "pod-7")
    cfg = MqttSourceConfig.model_validate({"type": "mqtt", "name": "mq", "topics": ["x"]})
    assert MqttSource(cfg).client_id == "loopd-pod-7-mq"
