"""MQTT at-least-once: the real daemon is killed (kill -9) several times during a QoS 1 stream.

loopd acknowledges a message to the broker only after its decision is committed, so a
message it had received but not yet decided at a kill stays in its persistent session and
comes again after the restart; one decided but not yet acknowledged comes again too and is
a duplicate in the store (same event id). Needs mosquitto, whose log shows the resends
(the amqtt fallback does not redeliver unacknowledged messages).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aiomqtt
import orjson
import pytest

from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, LoopdProcess, eventually
from tests.servers import require
from tests.servers.mqtt import MqttBroker

pytestmark = [pytest.mark.e2e, pytest.mark.mqtt]

TOTAL = 2000
RULE = "message-seen"
KILL_AT = (300, 800, 1300)  # kill -9 once this many messages are decided


def decided(daemon: LoopdProcess) -> int:
    return int(daemon.store_query("SELECT COUNT(*) FROM decisions WHERE rule=?", (RULE,))[0][0])


def in_flight(daemon: LoopdProcess) -> set[str]:
    """Runs whose action may have run without its end being recorded (retried on resume)."""
    return {r for (r,) in daemon.store_query("SELECT id FROM runs WHERE status='running'")}


@contextlib.asynccontextmanager
async def publishing(broker: MqttBroker, ahead_of: Callable[[], int], window: int = 300
                     ) -> AsyncIterator[asyncio.Task[None]]:
    """Publish ``{"id": "m-N", "data": {"n": N}}`` for N in 0..TOTAL-1 at QoS 1 in the
    background, in order, at most ``window`` messages ahead of ``ahead_of()``."""
    async def run() -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier="test-publisher",
                                  username=broker.username, timeout=10) as client:
            for start in range(0, TOTAL, 50):
                # paced by the daemon, so messages are still flowing whenever it is killed
                def caught_up(s: int = start) -> bool:
                    return s - ahead_of() < window

                await eventually(caught_up, "the daemon to catch up with the publisher",
                                 timeout=60)
                for n in range(start, min(start + 50, TOTAL)):
                    payload = orjson.dumps({"id": f"m-{n}", "data": {"n": n}})
                    await client.publish(f"stream/{n % 40}", payload, qos=1)

    task = asyncio.create_task(run())
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_kill_9_mid_stream_three_times_decides_every_message_once(
        mqtt_broker: MqttBroker, config: Config, loopd_factory: Factory) -> None:
    """With kill -9 three times during a 2,000-message QoS 1 stream into a persistent session,
    every message is decided exactly once (2,000 distinct event ids, each key once), and each
    run's action runs once (twice only for a run that was executing at a kill)."""
    require(mqtt_broker.persistent, "MQTT broker that redelivers unacked messages (mosquitto)")
    config.sources = [{"name": "stream", "type": "mqtt", "host": mqtt_broker.host,
                       "port": mqtt_broker.port, "topics": ["stream/#"], "qos": 1,
                       "username": mqtt_broker.username}]
    config.rules = {"stream.yaml": [{
        "name": RULE, "on": {"source": "stream"}, "key": "{{ event.n }}",
        "run": {"action": "core.log", "input": {"message": "message {{ event.n }} handled"}},
    }]}
    daemon = loopd_factory(config)
    retried: set[str] = set()
    kills: list[int] = []

    def so_far() -> int:  # how far the publisher may run ahead; all of it while dead
        return decided(daemon) if daemon.running else TOTAL

    await daemon.start()  # subscribes: the broker keeps the session from now on
    async with publishing(mqtt_broker, so_far) as sending:
        for at in KILL_AT:
            def reached(at: int = at) -> bool:
                return decided(daemon) >= at

            await eventually(reached, f"{at} decided", timeout=30)
            await daemon.kill()
            kills.append(decided(daemon))
            retried |= in_flight(daemon)
            await daemon.start()
        await sending
    await eventually(lambda: decided(daemon) >= TOTAL, f"{TOTAL} decisions", timeout=60)
    await eventually(lambda: daemon.store_query(
        "SELECT COUNT(*) FROM runs WHERE status NOT IN ('pending', 'running', 'waiting')"
    )[0][0] >= TOTAL, f"{TOTAL} runs ended", timeout=60)
    await daemon.stop()
    # mosquitto logs a resend of an unacknowledged message with the DUP flag: "(d1, q1, ..."
    redelivered = sum(1 for line in mqtt_broker.log_path.read_text(errors="replace")
                      .splitlines() if "Sending PUBLISH to" in line and "(d1," in line)
    print(f"mqtt at-least-once: killed at {kills} decisions, {redelivered} redelivered")

    assert all(k < TOTAL for k in kills) and kills == sorted(kills)
    assert redelivered > 0  # the kills left messages unacknowledged, and they came again
    rows = daemon.store_query("SELECT event_id, key, run_id FROM decisions WHERE rule=?",
                              (RULE,))
    assert len(rows) == TOTAL and len({r[0] for r in rows}) == TOTAL
    assert sorted(int(r[1]) for r in rows) == list(range(TOTAL))
    runs = dict(daemon.store_query("SELECT id, status FROM runs"))
    assert set(runs) == {r[2] for r in rows}
    assert set(runs.values()) == {"succeeded"}

    executed: dict[str, int] = {}
    for line in daemon.log_lines():
        if line.get("event", "").startswith("message ") and line.get("task") == "action":
            executed[line["run"]] = executed.get(line["run"], 0) + 1
    assert set(executed) == set(runs)
    twice = {run for run, n in executed.items() if n > 1}
    assert twice <= retried, f"ran twice without being in flight at a kill: {len(twice)}"
    assert max(executed.values()) <= 2
