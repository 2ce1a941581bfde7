"""Memory benchmark: RSS stays flat under 1,000,000 distinct entity keys.

    python benchmarks/memory.py [--events 1000000]

Feeds the in-process engine (real SQLite store) events with a new key each: half from a
telemetry source that no rule matches (the telemetry catalog keeps their fields), half
alerts matching a throttled rule (each starts a run, whose end the benchmark reports
back at once, so the incident closes and only guard memory remains). Prints one JSON
object: current RSS in MiB at 0, 25, 50, 75 and 100 % of the events, with the engine's
default bounds (engine.telemetry_max_keys, engine.guard_memory_max_keys: 100,000).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit, machine, rss_mb
from loopd import logs, metrics
from loopd.decide.engine import Engine
from loopd.events import Delivery, Event
from loopd.messages import RunCommand, RunEnded, StartRun
from loopd.rules.loader import load_rules
from loopd.store.sqlite import SqliteStore

RULES = """\
rules:
  - name: restart
    on: {source: alertmanager}
    key: "{{ event.labels.instance }}"
    throttle: {once_within: 1h}
    run: {action: core.noop, input: {host: "{{ key }}"}}
"""


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Finisher:
    """Where the engine sends its run commands: every run ends at once, fixed."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.runs = 0

    def put_nowait(self, command: RunCommand, /) -> None:
        if isinstance(command, StartRun) and self.engine is not None:
            run = command.run
            run.status, run.outcome = "succeeded", "fixed"
            self.runs += 1
            self.engine.inbox.put_nowait(RunEnded(run))


async def measure(events: int, folder: Path) -> dict[str, object]:
    (folder / "rules").mkdir()
    (folder / "rules" / "bench.yaml").write_text(RULES)
    ruleset = load_rules([folder / "rules"])
    store = SqliteStore(folder / "state.db")
    await store.open()
    finisher = Finisher()
    engine = Engine(store, ruleset, commands=finisher, queue_size=20_000,
                    telemetry_sources=frozenset({"metrics"}))
    finisher.engine = engine
    await engine.load()
    task = asyncio.create_task(engine.run())
    marks = {0: round(current_rss_mb(), 1)}
    checkpoints = {events * q // 4 for q in (1, 2, 3, 4)}
    began = time.perf_counter()
    now = time.time()
    for i in range(events):
        host = f"host-{i}"
        if i % 2:
            event = Event(str(i), "alertmanager", "alerts", {
                "status": "firing", "labels": {"alertname": "Down", "instance": host}},
                key=host, time=now)
        else:
            event = Event(str(i), "metrics", "cpu", {"cpu": 97.5, "mem": 61.0, "disk": 12.0},
                          key=host, time=now)
        await engine.emit(Delivery(event))
        if i + 1 in checkpoints:
            await engine.drain(timeout=600)
            marks[i + 1] = round(current_rss_mb(), 1)
    elapsed = time.perf_counter() - began
    await engine.drain(timeout=600)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await store.close()
    evictions = {f"{s.labels['what']}/{s.labels['reason']}": int(s.value)
                 for m in metrics.current().memory_evictions.collect() for s in m.samples
                 if s.name.endswith("_total")}
    return {"rss_mb_at": marks, "peak_rss_mb": round(rss_mb(), 1),
            "events_per_s": round(events / elapsed), "runs": finisher.runs,
            "telemetry_keys": len(engine.telemetry),
            "throttle_keys": len(engine.guards.key_starts), "evictions": evictions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    logs.configure("json", "warning")
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(measure(args.events, Path(tmp)))
    emit({"name": "memory-distinct-keys", "mode": "inproc", "events": args.events, **result,
          "machine": machine()})


if __name__ == "__main__":
    main()
