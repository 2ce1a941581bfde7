"""Ingest benchmark: events -> rules -> durable decisions.

    python benchmarks/ingest.py --rules 10 100 1000 --events 100000 [--mode inproc kafka http]
    python benchmarks/ingest.py --rules 1000 --long     # 1,000,000 events, rate per 100,000

Prints one JSON object per line: name, mode, rules, events, events_per_s,
cpu_us_per_event (the process's CPU, every thread, per event), runs (created), p99_ms
(event -> durable decision at a paced 1,000 events/s), rss_mb, startup_s (the
daemon process from exec to ready, with that many rules), matched; per_100k (the rate
of each 100,000 events, inproc runs of 200,000 or more). Mode ``http`` posts Alertmanager
payloads of 10 alerts from 8 concurrent clients to ``loopd run`` (benchmarks/http_mode.py);
its p99 is a POST's answer at 1,000 alerts/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, alerts, emit, machine, percentile, rss_mb, write_rules
from loopd.config import load_config
from loopd.daemon import Daemon
from loopd.events import Delivery, Event
from loopd.sources.webhook import alertmanager_events
from loopd.store.sqlite import SqliteStore

POOL = 10_000
LONG = 1_000_000  # --long: the rate must stay steady as the store grows
SEGMENT = 100_000  # ... measured per this many events


def make_config(folder: Path, extra_sources: str = "") -> Path:
    cfg = folder / "loopd.yaml"
    cfg.write_text(
        "listen: 127.0.0.1:0\n"
        "sources:\n  - {name: alertmanager, type: alertmanager}\n" + extra_sources +
        f"rules: [rules]\npacks: [{ROOT / 'packs'}]\n"
        "store: {path: state.db}\nlog: {format: json, level: warning}\n"
        "engine: {queue_size: 20000}\n")
    return cfg


def payload_pool(rule_names: list[str]) -> list[bytes]:
    group = {"receiver": "loopd", "groupKey": "{}:{alertname=\"x\"}", "version": "4",
             "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
             "externalURL": "http://alertmanager:9093", "status": "firing"}
    return [orjson.dumps({**group, "alerts": [a]}) for a in alerts(POOL, rule_names)]


async def inproc(rules: int, events: int, folder: Path) -> dict[str, object]:
    names = write_rules(folder / "rules", rules)
    pool = payload_pool(names)
    daemon = Daemon(load_config(make_config(folder)))
    ready = asyncio.Event()
    runner = asyncio.create_task(daemon.run(on_ready=lambda _: ready.set()))
    await ready.wait()
    engine = daemon.engine
    acked = 0
    marks: list[float] = []  # when each SEGMENT of events was acked (a long run's steadiness)

    def ack() -> None:
        nonlocal acked
        acked += 1
        if acked % SEGMENT == 0:
            marks.append(time.perf_counter())

    def events_from(i: int, body: bytes) -> list[Event]:
        out = []
        for ev in alertmanager_events(orjson.loads(body), source="alertmanager", origin="bench"):
            if isinstance(ev, Event):
                ev.id = f"{i}"
                out.append(ev)
        return out

    # Decoding belongs to the source; it is measured apart and the engine is fed Events.
    began = time.perf_counter()
    templates = [ev for i, body in enumerate(pool) for ev in events_from(i, body)]
    decode_us = (time.perf_counter() - began) / len(pool) * 1e6

    started, cpu = time.perf_counter(), time.process_time()  # every thread's CPU
    for i, t in zip(range(events), itertools.cycle(templates), strict=False):
        await engine.emit(Delivery(Event(str(i), t.source, t.topic, t.data, t.key, t.time), ack))
    await engine.drain(timeout=600)
    elapsed = time.perf_counter() - started
    cpu_us = (time.process_time() - cpu) / events * 1e6
    segments = [round(SEGMENT / (b - a)) for a, b in zip([started, *marks], marks,
                                                         strict=False)]
    matched = sum(engine.matches.values())

    # the runs the burst started finish first: latency is measured on a steady daemon
    await daemon.dispatcher.drain(timeout=600)
    await engine.drain(timeout=600)
    # latency at a steady 1,000 events/s: event handed in -> decision durable and acked
    latencies: list[float] = []

    def timed_ack(sent: float) -> Delivery:
        def done() -> None:
            latencies.append(time.perf_counter() - sent)
        return Delivery(Event("x", "alertmanager", "", {}), done)

    base = events
    t0 = time.perf_counter()
    for j in range(3000):
        target = t0 + j / 1000
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = pool[j % POOL]
        for ev in events_from(base + j, body):
            d = timed_ack(time.perf_counter())
            d.event = ev
            await engine.emit(d)
    await engine.drain(timeout=60)
    store = daemon.store
    assert isinstance(store, SqliteStore)
    runs = runs_created(store.path)
    daemon.stop()
    await runner
    return {"events_per_s": round(events / elapsed), "cpu_us_per_event": round(cpu_us, 1),
            "runs": runs, **({"per_100k": segments} if len(segments) > 1 else {}),
            "p99_ms": round(
        percentile(latencies, 0.99) * 1000, 3), "p50_ms": round(
        percentile(latencies, 0.5) * 1000, 3), "matched": matched, "acked": acked,
        "decode_us": round(decode_us, 2)}


def runs_created(db: Path) -> int:
    """Runs in the store file (starvation shows as few runs for many matches)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])


def startup(folder: Path) -> float:
    """Seconds from exec of `loopd run` to /healthz answering, with the folder's rules."""
    cfg = folder / "startup.yaml"
    port = 18999
    cfg.write_text((folder / "loopd.yaml").read_text().replace("127.0.0.1:0",
                                                               f"127.0.0.1:{port}")
                   .replace("state.db", "startup.db"))
    exe = Path(sys.executable).parent / "loopd"
    began = time.perf_counter()
    proc = subprocess.Popen([str(exe), "run", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    return time.perf_counter() - began
            except OSError:
                if proc.poll() is not None or time.perf_counter() - began > 30:
                    raise RuntimeError("loopd did not start") from None
                time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--mode", nargs="+", default=["inproc"],
                        choices=["inproc", "kafka", "http"])
    parser.add_argument("--long", action="store_true",
                        help="1,000,000 events, with the rate of every 100,000 (inproc)")
    args = parser.parse_args()
    if args.long:
        args.events = LONG
    for mode in args.mode:
        for rules in args.rules:
            # each measurement in a fresh process so RSS and startup are its own
            cmd = [sys.executable, __file__, "--one", mode, str(rules), str(args.events)]
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})


def one(mode: str, rules: int, events: int) -> None:
    from loopd import logs

    logs.configure("json", "warning")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if mode == "inproc":
            result = asyncio.run(inproc(rules, events, folder))
        elif mode == "http":
            from benchmarks.http_mode import http
            result = asyncio.run(http(rules, events, folder))
        else:
            from benchmarks.kafka_mode import kafka
            result = asyncio.run(kafka(rules, events, folder))
        result["rss_mb"] = result.pop("daemon_rss_mb", None) or round(rss_mb(), 1)
        make_config(folder)  # the same rules behind the webhook sources
        result["startup_s"] = round(startup(folder), 3)
    emit({"name": f"ingest-{mode}", "mode": mode, "rules": rules, "events": events, **result,
          "machine": machine()})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
