"""Ingest benchmark: events -> rules -> durable decisions.

    python benchmarks/ingest.py --rules 10 100 1000 --events 100000 [--mode inproc kafka http]
    python benchmarks/ingest.py --rules 1000 --long     # 1,000,000 events, rate per 100,000
    python benchmarks/ingest.py --rules 1000 --long --mode kafka   # ... through Kafka, RSS too
    python benchmarks/ingest.py --rules 1000 --events 100000 --correlation group mix
    python benchmarks/ingest.py --rules 1000 --mode kafka --match 0.5   # issue 15's workload

Prints one JSON object per line: name, mode, rules, events, events_per_s,
cpu_us_per_event (the process's CPU, every thread, per event), runs (created), p99_ms
(event -> durable decision at a paced 1,000 events/s), rss_mb, startup_s (the
daemon process from exec to ready, with that many rules), matched; per_100k (the rate
of each 100,000 events, inproc and kafka runs of 200,000 or more; kafka also
rss_mb_per_100k, the daemon's RSS as each 100,000 was decided). Mode ``http`` posts Alertmanager
payloads of 10 alerts from 8 concurrent clients to ``loopd run`` (benchmarks/http_mode.py);
its p99 is a POST's answer at 1,000 alerts/s.

Rows also give ``threads_cpu_s``: the burst's wall time and the CPU seconds of the
measured process's main thread (``loop``) and of its other threads (``others``): when they
add up to the wall time, the threads took turns.

``--match RATIO`` (default 0.1): the share of alerts that satisfy a rule; every row
says which (``match``). Issue 15 measured the peer and set its targets with half the
records matching (0.5): five times the durable decisions per event, most of them an
event joining an incident already open, and about 5,000 runs instead of 1,000.

``--correlation VARIANT...`` (in-process; benchmarks/correlation.py says what each
variant's rules are): ``--rounds`` rounds (default 3), each running ``none`` and the
variants, in an order that alternates between rounds, every run in a fresh process.
Each row also has the correlation state's slots (``state_storm``: at the end of the
burst, with the peak; ``state_after``: once the engine's clock moved past every window
and a few unmatched events went through; ``state_storm2``/``state_after2``: the same
for a second storm of one pool's worth, its peak the first one's when the state is
bounded by the windows), the current RSS at those points and the decisions by outcome;
a last line gives the medians and each variant's ratio to ``none`` (and to ``family``,
the same matches without correlation).
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

from benchmarks import common, correlation
from benchmarks.common import (
    ROOT,
    alerts,
    burst_threads,
    emit,
    machine,
    percentile,
    rss_mb,
    threads_cpu_s,
    write_rules,
)
from loopd.cli import run_loop
from loopd.config import load_config
from loopd.daemon import Daemon, tune_gc
from loopd.events import Delivery, Event
from loopd.sources.webhook import alertmanager_events
from loopd.store.sqlite import SqliteStore

POOL = 10_000
LONG = 1_000_000  # --long: the rate must stay steady as the store grows
SEGMENT = 100_000  # ... measured per this many events


def make_config(folder: Path, extra_sources: str = "", inventory: Path | None = None) -> Path:
    cfg = folder / "loopd.yaml"
    cfg.write_text(
        "listen: 127.0.0.1:0\n"
        "sources:\n  - {name: alertmanager, type: alertmanager}\n" + extra_sources +
        f"rules: [rules]\npacks: [{ROOT / 'packs'}]\n"
        "store: {path: state.db}\nlog: {format: json, level: warning}\n"
        "engine: {queue_size: 20000}\n" + (f"inventory: {inventory}\n" if inventory else ""))
    return cfg


def payload_pool(rule_names: list[str]) -> list[bytes]:
    group = {"receiver": "loopd", "groupKey": "{}:{alertname=\"x\"}", "version": "4",
             "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
             "externalURL": "http://alertmanager:9093", "status": "firing"}
    return [orjson.dumps({**group, "alerts": [a]}) for a in alerts(POOL, rule_names)]


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return round(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


async def inproc(rules: int, events: int, folder: Path,
                 variant: str | None = None) -> dict[str, object]:
    """``variant`` None: the plain benchmark as it always was; a correlation variant
    (``none`` too) loads the benchmark's inventory and runs the engine on a clock the
    phase after the burst can move on."""
    instead = correlation.correlated(variant) if variant is not None else None
    names = write_rules(folder / "rules", rules, instead)
    pool = payload_pool(names)
    inventory = correlation.write_inventory(folder / "inventory.json") \
        if variant is not None else None
    daemon = Daemon(load_config(make_config(folder, inventory=inventory)))
    clock = correlation.SkewedClock()
    if variant is not None:
        # Daemon builds on a WallClock; the engine's own clock is the time correlation
        # windows and absence timers run on (runs keep the wall clock: they only end)
        daemon.engine.clock = clock
    ready = asyncio.Event()

    def up(_: object) -> None:  # as `loopd run` does once it is ready
        tune_gc()
        ready.set()

    runner = asyncio.create_task(daemon.run(on_ready=up))
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

    threads_before = threads_cpu_s()
    started, cpu_started = time.perf_counter(), time.process_time()
    for i, t in zip(range(events), itertools.cycle(templates), strict=False):
        await engine.emit(Delivery(Event(str(i), t.source, t.topic, t.data, t.key, t.time), ack))
    await engine.drain(timeout=600)
    elapsed = time.perf_counter() - started
    cpu_us = (time.process_time() - cpu_started) / events * 1e6  # every thread's CPU
    threads = burst_threads(threads_before, threads_cpu_s(), elapsed)
    segments = [round(SEGMENT / (b - a)) for a, b in zip([started, *marks], marks,
                                                         strict=False)]
    matched = sum(engine.matches.values())
    extra: dict[str, object] = {}
    if variant is not None:
        # CPU seconds of the process (every thread) for the burst: on a shared machine
        # less at the mercy of the neighbours than the wall clock
        extra["events_per_cpu_s"] = round(events / (time.process_time() - cpu_started))
        extra["state_storm"] = correlation.state(engine)
        extra["rss_storm_mb"] = current_rss_mb()

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
    if variant is not None:
        extra.update(await after_windows(daemon, clock, base + 3000, templates))
    store = daemon.store
    assert isinstance(store, SqliteStore)
    runs = runs_created(store.path)
    daemon.stop()
    await runner
    if variant is not None:
        extra["decisions"] = correlation.decisions(folder / "state.db")
    return {"events_per_s": round(events / elapsed), "cpu_us_per_event": round(cpu_us, 1),
            "runs": runs, "threads_cpu_s": threads,
            **({"per_100k": segments} if len(segments) > 1 else {}),
            "p99_ms": round(
        percentile(latencies, 0.99) * 1000, 3), "p50_ms": round(
        percentile(latencies, 0.5) * 1000, 3), "matched": matched, "acked": acked,
        "decode_us": round(decode_us, 2), **extra}


async def after_windows(daemon: Daemon, clock: correlation.SkewedClock, base: int,
                        templates: list[Event]) -> dict[str, object]:
    """Time moves on past every window (the engine's clock jumps) and the state must
    empty (``state_after``); then the pool once more, a second storm (``state_storm2``:
    its peak is the first storm's if state is bounded by the windows, not by history),
    and past the windows again (``state_after2``)."""
    engine = daemon.engine
    out: dict[str, object] = {}
    clock.skew += correlation.LONGEST_WINDOW_S + 1
    out["state_after"], base = await until_empty(daemon, base)
    out["rss_after_mb"] = current_rss_mb()
    for i, t in enumerate(templates):
        await engine.emit(Delivery(Event(str(base + i), t.source, t.topic, t.data, t.key,
                                         t.time)))
    await engine.drain(timeout=600)
    out["state_storm2"] = correlation.state(engine)
    clock.skew += correlation.LONGEST_WINDOW_S + 1
    out["state_after2"], _ = await until_empty(daemon, base + len(templates))
    out["rss_after2_mb"] = current_rss_mb()
    return out


async def until_empty(daemon: Daemon, base: int) -> tuple[dict[str, int], int]:
    """Alerts no rule watches go through (the engine sweeps expired state with every
    batch) and the runs due absences start end, until the correlation state is empty or
    60 s passed; the state then, and the next free event id."""
    engine = daemon.engine
    deadline = time.perf_counter() + 60
    while True:
        for _ in range(100):  # an alert nobody watches: the engine decides nothing for it
            await engine.emit(Delivery(Event(f"{base}", "alertmanager", "", {
                "status": "firing", "labels": {"alertname": "BenchTick", "instance": "x"}})))
            base += 1
        await engine.drain(timeout=60)
        await daemon.dispatcher.drain(timeout=60)  # the runs the fired absences started
        await engine.drain(timeout=60)
        state = correlation.state(engine)
        if state["total"] == 0 or time.perf_counter() > deadline:
            return state, base
        await asyncio.sleep(0.05)  # a benchmark's poll: the runs' ends are the engine's


def runs_created(db: Path) -> int:
    """Runs in the store file (starvation shows as few runs for many matches)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])


def startup(folder: Path) -> float:
    """Seconds from exec of `loopd run` to /healthz answering, with the folder's rules,
    loopd's modules compiled as an installed loopd has them (pip compiles a package as
    it installs it; an editable checkout compiles on first import, unless
    PYTHONDONTWRITEBYTECODE is set, as on this project's machines, where every start
    compiled all of loopd again: about 0.2 s)."""
    import compileall

    import loopd

    compileall.compile_dir(Path(loopd.__file__).parent, quiet=1)
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


def _match(text: str) -> float:
    try:
        return common.match_ratio(text)
    except ValueError as exc:  # argparse shows this one's message
        raise argparse.ArgumentTypeError(str(exc)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--mode", nargs="+", default=["inproc"],
                        choices=["inproc", "kafka", "http"])
    parser.add_argument("--long", action="store_true",
                        help="1,000,000 events, with the rate of every 100,000 (inproc, kafka)")
    parser.add_argument("--correlation", nargs="+", choices=correlation.VARIANTS[1:],
                        help="compare these correlation variants with none (in-process)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--match", type=_match, default=common.MATCH_RATIO,
                        help="the share of alerts that satisfy a rule (default 0.1; issue "
                        "15's workload: 0.5)")
    args = parser.parse_args()
    # the rows' processes (and the alerts they build) take it from the environment
    os.environ["LOOPD_BENCH_MATCH"] = str(args.match)
    if args.long:
        args.events = LONG
    if args.correlation:
        compare(args.rules, args.events, args.correlation, args.rounds)
        return
    for mode in args.mode:
        for rules in args.rules:
            # each measurement in a fresh process so RSS and startup are its own
            cmd = [sys.executable, __file__, "--one", mode, str(rules), str(args.events)]
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})


def compare(rule_counts: list[int], events: int, variants: list[str], rounds: int) -> None:
    """Each round runs ``none`` and ``variants``, forwards in even rounds and backwards in
    odd ones, so a drift of the (shared) machine weighs on every variant alike."""
    for rules in rule_counts:
        rows: list[dict[str, object]] = []
        order = ["none", *variants]
        for round_ in range(rounds):
            for variant in order if round_ % 2 == 0 else order[::-1]:
                cmd = [sys.executable, __file__, "--one", "inproc", str(rules), str(events),
                       variant]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                     env={**os.environ, "PYTHONHASHSEED": "0"}).stdout
                row = orjson.loads(out.strip().splitlines()[-1])
                row["round"] = round_
                emit(row)
                rows.append(row)
        emit({**correlation.summary(rows), "rules": rules, "events": events,
              "machine": machine()})


def one(mode: str, rules: int, events: int, variant: str | None = None) -> None:
    from loopd import logs

    logs.configure("json", "warning")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if mode == "inproc":  # on the loop `loopd run` runs on (uvloop when installed)
            result = run_loop(inproc(rules, events, folder, variant))
        elif mode == "http":
            from benchmarks.http_mode import http
            result = asyncio.run(http(rules, events, folder))
        else:
            from benchmarks.kafka_mode import kafka
            result = asyncio.run(kafka(rules, events, folder))
        result["rss_mb"] = result.pop("daemon_rss_mb", None) or round(rss_mb(), 1)
        inventory = folder / "inventory.json"
        # the same rules (and inventory) behind the webhook sources
        make_config(folder, inventory=inventory if inventory.exists() else None)
        result["startup_s"] = round(startup(folder), 3)
    named = {} if variant is None else {"correlation": variant}
    emit({"name": f"ingest-{mode}", "mode": mode, "rules": rules, "events": events,
          "match": common.MATCH_RATIO, **named,
          **result, "machine": machine()})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
            sys.argv[5] if len(sys.argv) > 5 else None)
    else:
        main()
