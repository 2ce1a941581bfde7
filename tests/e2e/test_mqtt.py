"""The real daemon subscribed to a real MQTT broker (tests/servers/mqtt.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import orjson
import pytest

from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, LoopdProcess, eventually
from tests.servers.mqtt import MqttBroker

pytestmark = [pytest.mark.e2e, pytest.mark.mqtt]


def mqtt_source(broker: MqttBroker, **extra: Any) -> dict[str, Any]:
    return {"name": "telemetry", "type": "mqtt", "host": broker.host, "port": broker.port,
            "topics": ["telemetry/#"], "username": broker.username, **extra}


@contextlib.asynccontextmanager
async def mqtt_client(broker: MqttBroker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(broker.host, broker.port, username=broker.username,
                              identifier=None, timeout=10) as client:
        yield client


async def publish(broker: MqttBroker, messages: list[tuple[str, Any]]) -> None:
    """Publish (topic, JSON payload) pairs at QoS 1, in order."""
    async with mqtt_client(broker) as client:
        for topic, payload in messages:
            await client.publish(topic, orjson.dumps(payload), qos=1)


async def not_ready(daemon: LoopdProcess) -> bool:
    status, _ = await daemon.request("GET", "/readyz")
    return status == 503


def decisions(daemon: LoopdProcess, rule: str, key: str | None = None
              ) -> list[tuple[str, str | None, float]]:
    """(outcome, reason, time) of a rule's decisions, in order."""
    sql = "SELECT outcome, reason, time FROM decisions WHERE rule=?"
    params: tuple[Any, ...] = (rule,)
    if key is not None:
        sql, params = sql + " AND key=?", (rule, key)
    return [(o, r, float(t)) for o, r, t in daemon.store_query(sql + " ORDER BY seq", params)]


async def test_for_rule_fires_only_after_the_condition_held_for_its_duration(
        mqtt_broker: MqttBroker, config: Config, loopd_factory: Factory) -> None:
    """A ``for: 1s`` rule on MQTT telemetry starts a run once the condition has held for a
    second on one host, and never for a host whose condition broke in between."""
    config.sources = [mqtt_source(mqtt_broker)]
    config.rules = {"cpu.yaml": [{
        "name": "cpu-high", "on": {"source": "telemetry", "topic": "telemetry/{host}/cpu"},
        "if": "event.value > 90", "key": "{{ vars.host }}", "for": "1s",
        "throttle": {"once_within": "10m"},
        "run": {"action": "core.log", "input": {"message": "cpu high on {{ key }}"}},
    }]}
    daemon = loopd_factory(config)
    await daemon.start()

    # Like an agent reporting both hosts, paced by the daemon: the next samples go out once
    # the previous web-1 sample is decided. web-1 stays high; web-2 dips every other time.
    # It goes on until web-1 fired and web-2 was high over more than the rule's second.
    def fired() -> bool:
        return any(o == "run_created" for o, _, _ in decisions(daemon, "cpu-high", "web-1"))

    def web2_span() -> float:
        times = [t for _, _, t in decisions(daemon, "cpu-high", "web-2")]
        return times[-1] - times[0] if times else 0.0

    sent = 0
    async with mqtt_client(mqtt_broker) as client:
        while not (fired() and web2_span() > 1.2):
            assert sent < 5000, "no run after 5000 samples"
            await client.publish("telemetry/web-1/cpu", b'{"value": 97}', qos=1)
            value = 95 if sent % 2 == 0 else 40
            await client.publish("telemetry/web-2/cpu", b'{"value": %d}' % value, qos=1)
            sent += 1

            def decided(n: int = sent) -> bool:
                return len(decisions(daemon, "cpu-high", "web-1")) >= n

            await eventually(decided, "the web-1 sample to be decided")

    web1 = decisions(daemon, "cpu-high", "web-1")
    outcomes = [o for o, _, _ in web1]
    fired_at = outcomes.index("run_created")
    before, fired_decision = web1[:fired_at], web1[fired_at]
    assert before and all(o == "suppressed" and (r or "").startswith("for: held")
                          for o, r, _ in before)
    assert fired_decision[2] - before[0][2] >= 1.0  # held a whole second, by loopd's clock
    # acting re-arms `for:`: later samples wait out the duration again, join the open
    # incident, or are throttled once it is closed; none starts a second run
    assert all(o == "joined"
               or (o == "suppressed" and (r or "").startswith(("throttled", "for: held")))
               for o, r, _ in web1[fired_at + 1:])
    web2 = decisions(daemon, "cpu-high", "web-2")
    assert {o for o, _, _ in web2} == {"suppressed"}
    assert all(r == "for: held 0s of 1s" for _, r, _ in web2)  # every dip restarted it

    (run,) = await daemon.wait_runs(1, status="succeeded")
    assert run["key"] == "web-1" and run["rule"] == "cpu-high"
    story = await daemon.run(run["id"])
    assert story["steps"][0]["output"] == {"message": "cpu high on web-1"}
    assert story["trigger"]["topic"] == "telemetry/web-1/cpu"
    await daemon.stop()


async def test_broker_restart_loses_no_message(
        mqtt_broker: MqttBroker, config: Config, loopd_factory: Factory) -> None:
    """Messages published before an MQTT broker restart and right after it are all decided,
    each exactly once."""
    if not mqtt_broker.persistent:
        pytest.skip(f"{mqtt_broker.kind} keeps no session across a restart")
    config.sources = [mqtt_source(mqtt_broker)]
    config.rules = {"jobs.yaml": [{
        "name": "job", "on": {"source": "telemetry", "topic": "telemetry/jobs"},
        "key": "{{ event.n }}", "run": {"action": "core.noop", "input": {"n": "{{ event.n }}"}},
    }]}
    daemon = loopd_factory(config)
    await daemon.start()

    def job(n: int) -> tuple[str, Any]:  # an envelope id, so a redelivery is recognised
        return "telemetry/jobs", {"id": f"job-{n}", "data": {"n": n}}

    await publish(mqtt_broker, [job(n) for n in range(50)])
    await eventually(lambda: len(decisions(daemon, "job")) == 50, "50 jobs decided")
    mqtt_broker.stop()
    await eventually(lambda: not_ready(daemon), "loopd to notice the broker is gone")
    mqtt_broker.start()
    await publish(mqtt_broker, [job(n) for n in range(50, 100)])

    await eventually(lambda: len(decisions(daemon, "job")) >= 100, "100 jobs decided",
                     timeout=30)
    keys = [k for (k,) in daemon.store_query("SELECT key FROM decisions WHERE rule='job'")]
    assert sorted(map(int, keys)) == list(range(100))
    await daemon.wait_runs(100, status="succeeded")
    assert await daemon.metric("loopd_source_up", source="telemetry") == 1
    await daemon.stop()
