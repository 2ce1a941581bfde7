"""Scrape benchmark: CPU per round of 100 targets x 1,000 series, into the real engine.

    python benchmarks/scrape.py [--targets 100] [--series 1000] [--interval 15] [--rounds 3]

A child process serves the targets locally (one aiohttp server on a port per target, text
format, node-exporter-shaped lines with two labels, values that change every request), so
its CPU is not counted. This process runs a ``type: scrape`` source feeding the real
engine (SQLite store, telemetry on, a ``for:`` rule on a tenth of the samples whose
condition holds for one in eight of those, so about 1,300 decisions a round are recorded
with their events, as a rule holding for some hosts' CPUs does): what loopd itself pays.
After one warm-up round (the first scrape of a target parses every series), it measures
``--rounds`` whole intervals: CPU seconds (user + system, every thread) per round, samples
per second of that CPU, and RSS; the warm-up round's CPU is reported too.
Prints one JSON object. With ``--no-engine`` the events are counted and dropped: the
cost of scraping alone. ``parse_samples_per_cpu_s`` is the parse alone (exposition.parse of
one target's body whose series were seen in the previous scrape, in this process), the
ceiling for everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit, machine, rss_mb
from loopd import logs
from loopd.config import EngineConfig, ScrapeSourceConfig
from loopd.daemon import tune_gc
from loopd.decide.engine import Engine
from loopd.events import Delivery
from loopd.rules.loader import load_rules
from loopd.sources.exposition import Labeler, name_filter, parse
from loopd.sources.scrape import ScrapeSource
from loopd.store.sqlite import SqliteStore

RULES = """\
rules:
  - name: cpu-busy
    on: {source: node, topic: "metrics/{host}/bench_cpu_seconds_total"}
    if: "event.labels.mode == 'm0'"
    key: "{{ vars.host }}/{{ event.labels.cpu }}"
    for: 10m
    run: {action: core.noop, input: {host: "{{ key }}"}}
"""


def body(series: int, generation: int) -> str:
    """``series`` sample lines (a HELP and TYPE every 100), values moving with
    ``generation``."""
    lines = []
    for i in range(series):
        metric = f"bench_cpu_seconds_total{i // 100}" if i >= 100 else "bench_cpu_seconds_total"
        if i % 100 == 0:
            lines += [f"# HELP {metric} Seconds the CPUs spent in each mode.",
                      f"# TYPE {metric} counter"]
        lines.append(f'{metric}{{cpu="{i % 100 // 8}",mode="m{i % 8}"}} '
                     f"{1000 + i * 3.25 + generation * 1.5:.2f}")
    return "\n".join(lines) + "\n"


def serve(targets: int, series: int, ports: Any) -> None:
    """The child process: one port per target (a target's instance is its host:port),
    each answering one of two bodies, alternating; the ports go back through ``ports``."""
    from aiohttp import web

    bodies = [body(series, g).encode() for g in range(2)]
    served: dict[int, int] = {}

    async def answer(request: web.Request) -> web.Response:
        port = request.url.port or 0
        served[port] = served.get(port, 0) + 1
        return web.Response(body=bodies[served[port] % 2],
                            content_type="text/plain", charset="utf-8")

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/metrics", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        bound = []
        for _ in range(targets):  # bound here, on ports the kernel picks: no race
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            bound.append(sock.getsockname()[1])
            await web.SockSite(runner, sock).start()
        ports.put(bound)
        await asyncio.Event().wait()

    asyncio.run(run())


def parse_rate(series: int, repeat: int = 20) -> int:
    """Samples per CPU second of exposition.parse alone, on a body whose series are known
    (every scrape but a target's first)."""
    keep = name_filter([], [])
    labeler = Labeler(keep, keep, {"instance": "127.0.0.1:1", "job": "node"}, False)
    known = parse(body(series, 0), openmetrics=False, known={}, labeler=labeler,
                  limit=series).seen
    text = body(series, 1)
    began = time.process_time()
    for _ in range(repeat):
        parse(text, openmetrics=False, known=known, labeler=labeler, limit=series)
    return round(series * repeat / (time.process_time() - began))


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(ports: list[int], series: int, interval: float, rounds: int,
                  folder: Path, engine_too: bool) -> dict[str, object]:
    (folder / "rules").mkdir()
    (folder / "rules" / "bench.yaml").write_text(RULES)
    store = SqliteStore(folder / "state.db")
    await store.open()
    engine = Engine(store, load_rules([folder / "rules"]),
                    queue_size=EngineConfig().queue_size, telemetry_sources=frozenset({"node"}))
    await engine.load()
    tune_gc()  # as `loopd run` does once it is ready
    config = ScrapeSourceConfig.model_validate({
        "type": "scrape", "name": "node", "interval": interval, "max_series": series,
        "targets": [f"127.0.0.1:{port}" for port in ports]})
    source = ScrapeSource(config)
    samples = 0

    async def count(delivery: Delivery) -> None:
        nonlocal samples
        samples += 1
        if engine_too:
            await engine.emit(delivery)

    decider = asyncio.create_task(engine.run())
    warm_cpu = cpu()
    scraping = asyncio.create_task(source.run(count))
    try:
        await asyncio.sleep(interval)  # the warm-up round: every target scraped once
        await engine.drain(timeout=600)
        warm_samples, began, began_cpu = samples, time.monotonic(), cpu()
        warm_matches = sum(engine.matches.values())
        warm_cpu = began_cpu - warm_cpu
        await asyncio.sleep(interval * rounds)
        await engine.drain(timeout=600)
        spent, elapsed = cpu() - began_cpu, time.monotonic() - began
        measured = samples - warm_samples
    finally:
        await source.close()
        await scraping
        decider.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await decider
        await store.close()
    return {"rounds": rounds, "samples": measured, "elapsed_s": round(elapsed, 1),
            # per round of every target (its up included), from what the window held
            "cpu_s_per_round": round(spent * len(ports) * (series + 1) / measured, 3),
            "first_round_cpu_s": round(warm_cpu, 3),  # every series parsed the first time
            "samples_per_cpu_s": round(measured / spent) if spent else None,
            "decisions_per_round": round((sum(engine.matches.values()) - warm_matches)
                                         * len(ports) * (series + 1) / measured),
            "telemetry_fields": sum(len(v) for v in engine.telemetry.values()),
            "peak_rss_mb": round(rss_mb(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-engine", action="store_true",
                        help="drop the events instead: what the scraping alone costs")
    args = parser.parse_args()
    logs.configure("json", "warning")
    spawn = multiprocessing.get_context("spawn")
    bound = spawn.Queue()
    server = spawn.Process(target=serve, args=(args.targets, args.series, bound), daemon=True)
    server.start()
    try:
        ports = bound.get(timeout=60)
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(measure(ports, args.series, args.interval, args.rounds,
                                         Path(tmp), not args.no_engine))
    finally:
        server.terminate()
        server.join(10)
    emit({"name": "scrape", "engine": not args.no_engine, "targets": args.targets,
          "series_per_target": args.series, "interval_s": args.interval, **result,
          "parse_samples_per_cpu_s": parse_rate(args.series),
          "machine": machine()})


if __name__ == "__main__":
    main()
