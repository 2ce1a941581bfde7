"""The ingest benchmark over HTTP: Alertmanager webhook payloads of 10 alerts posted by 8
concurrent clients to the real daemon (``loopd run`` in its own process), as most users
feed it. Each POST is answered once its alerts' decisions are durable."""

from __future__ import annotations

import asyncio
import itertools
import socket
import sys
import time
from pathlib import Path

import aiohttp
import orjson

from benchmarks.common import ROOT, alerts, burst_threads, percentile, threads_cpu_s, write_rules
from benchmarks.kafka_mode import _cpu_s, _rss_mb

PER_REQUEST = 10
CLIENTS = 8
PACED = 1000  # alerts per second for the latency measurement
GROUP = {"receiver": "loopd", "groupKey": "{}:{alertname=\"x\"}", "version": "4",
         "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
         "externalURL": "http://alertmanager:9093", "status": "firing"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bodies(names: list[str], count: int) -> list[bytes]:
    """``count`` alerts in payloads of PER_REQUEST; every alert a new one (its id is its
    fingerprint, startsAt and status: past the pool, fingerprints get a cycle suffix)."""
    pool = alerts(10_000, names)
    out, batch = [], []
    for i, alert in zip(range(count), itertools.cycle(pool), strict=False):
        cycle = i // len(pool)
        batch.append({**alert, "fingerprint": f"{alert['fingerprint']}-{cycle}"}
                     if cycle else alert)
        if len(batch) == PER_REQUEST:
            out.append(orjson.dumps({**GROUP, "alerts": batch}))
            batch = []
    if batch:
        out.append(orjson.dumps({**GROUP, "alerts": batch}))
    return out


async def _post(http: aiohttp.ClientSession, url: str, body: bytes) -> None:
    async with http.post(url, data=body,
                         headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"POST answered {resp.status}: {await resp.text()}")
        await resp.read()


async def _runs_settled(session: aiohttp.ClientSession, port: int) -> None:
    """Until no run executes (``loopd_runs_active`` 0 twice in a row, 0.2 s apart)."""
    deadline, quiet = time.monotonic() + 600, 0
    while quiet < 2:
        async with session.get(f"http://127.0.0.1:{port}/metrics",
                               params={"name[]": "loopd_runs_active"}) as resp:
            text = await resp.text()
        active = next((float(line.rpartition(" ")[2]) for line in text.splitlines()
                       if line.startswith("loopd_runs_active ")), 0.0)
        quiet = quiet + 1 if active == 0 else 0
        if time.monotonic() > deadline:
            raise TimeoutError("runs still active after 10 minutes")
        await asyncio.sleep(0.2)


async def http(rules: int, events: int, folder: Path) -> dict[str, object]:
    names = write_rules(folder / "rules", rules)
    port = _free_port()
    cfg = folder / "http.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:{port}\n"
        "sources:\n  - {name: alertmanager, type: alertmanager}\n"
        f"rules: [rules]\npacks: [{ROOT / 'packs'}]\n"
        "store: {path: http.db}\nlog: {format: json, level: warning}\n"
        "engine: {queue_size: 20000}\n")
    burst = bodies(names, events + PACED * 3)
    paced, burst = burst[len(burst) - PACED * 3 // PER_REQUEST:], \
        burst[:len(burst) - PACED * 3 // PER_REQUEST]
    url = f"http://127.0.0.1:{port}/v1/alertmanager"
    daemon = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "loopd"), "run", "-c", str(cfg),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        connector = aiohttp.TCPConnector(limit=CLIENTS * 2)
        async with aiohttp.ClientSession(connector=connector) as session:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline or daemon.returncode is not None:
                    raise RuntimeError("loopd did not become ready")
                await asyncio.sleep(0.05)
            todo = iter(burst)

            async def client() -> None:
                for body in todo:  # the clients share one iterator: each body posted once
                    await _post(session, url, body)

            threads = threads_cpu_s(daemon.pid)
            began, cpu = time.perf_counter(), _cpu_s(daemon.pid)
            await asyncio.gather(*(client() for _ in range(CLIENTS)))
            elapsed = time.perf_counter() - began
            cpu = _cpu_s(daemon.pid) - cpu
            threads = burst_threads(threads, threads_cpu_s(daemon.pid), elapsed)
            sent = sum(len(orjson.loads(b)["alerts"]) for b in burst)
            # the runs the burst started finish first: latency is measured on a steady daemon
            await _runs_settled(session, port)
            # latency at a steady PACED alerts/s: POST -> answered (decisions durable)
            latencies: list[float] = []

            async def timed(body: bytes) -> None:
                t = time.perf_counter()
                await _post(session, url, body)
                latencies.append(time.perf_counter() - t)

            t0, waits = time.perf_counter(), []
            for j, body in enumerate(paced):
                delay = t0 + j * PER_REQUEST / PACED - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                waits.append(asyncio.create_task(timed(body)))
            await asyncio.gather(*waits)
        rss = _rss_mb(daemon.pid, "VmHWM")
    finally:
        daemon.terminate()
        await daemon.wait()
    from benchmarks.ingest import runs_created

    return {"events_per_s": round(sent / elapsed), "cpu_us_per_event": round(
        cpu / sent * 1e6, 1), "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 3),
        "p99_of": "a POST of 10 alerts, at 1,000 alerts/s", "runs": runs_created(
        folder / "http.db"), "clients": CLIENTS, "per_request": PER_REQUEST,
        "daemon_rss_mb": rss, "threads_cpu_s": threads}
