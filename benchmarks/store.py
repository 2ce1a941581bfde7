"""Store benchmark: SQLite vs PostgreSQL, group commit at work.

    python benchmarks/store.py                      # starts a PostgreSQL of its own
    python benchmarks/store.py --dsn postgresql://loopd@db/bench   # or uses yours

Prints JSON, one object per store and measure:

* ``commit``: batches of 1, 100 and 2,000 decisions committed one after another (each
  decision with its event, a new incident and its run, as the engine writes them):
  ``commits_per_s`` and ``decisions_per_s``.
* ``save_step``: 1,000 runs saving a step at the same moment (concurrent writers):
  ``steps_per_s`` and, for Postgres, ``transactions`` (how many group commits it took).

The PostgreSQL the benchmark starts runs with ``fsync=off`` (the test server's settings,
``tests/servers/postgres.py``): the numbers compare round trips and statements, not
disks. SQLite runs with its defaults (WAL, ``synchronous=NORMAL``) in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit, machine
from loopd.store.base import (
    Batch,
    DecisionRecord,
    EventRecord,
    IncidentRecord,
    RunRecord,
    StepRecord,
    Store,
)
from loopd.store.postgres import PostgresStore
from loopd.store.sqlite import SqliteStore

SIZES = (1, 100, 2000)


def decided(n: int, tag: str) -> Batch:
    """What the engine writes for ``n`` events that each open an incident and start a run."""
    batch = Batch()
    now = time.time()
    for i in range(n):
        ident = f"{tag}-{i}"
        key = f"host-{ident}"
        batch.events.append(EventRecord("alertmanager", ident, "alerts", key, now,
                                        {"labels": {"alertname": "HostDown", "instance": key},
                                         "value": 95.0}))
        inc = IncidentRecord(f"inc-{ident}", "r", key, "open", now, run_id=f"run-{ident}")
        batch.incidents[inc.id] = inc
        batch.decisions.append(DecisionRecord("alertmanager", ident, "r", key, "run_created",
                                              None, now, inc.id, f"run-{ident}"))
        batch.runs.append(RunRecord(f"run-{ident}", inc.id, "r", key, "action", "core.noop",
                                    {"host": key}, "pending", now))
    return batch


async def commits(store: Store, size: int, seconds: float) -> dict[str, Any]:
    done = decisions = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or done < 3:
        await store.commit(decided(size, f"b{size}-{done}-{uuid.uuid4().hex[:6]}"))
        done += 1
        decisions += size
    elapsed = time.perf_counter() - start
    return {"batch": size, "commits": done, "commits_per_s": round(done / elapsed, 1),
            "decisions_per_s": round(decisions / elapsed, 1)}


async def steps(store: Store, writers: int) -> dict[str, Any]:
    batch = decided(writers, f"steps-{uuid.uuid4().hex[:6]}")
    await store.commit(batch)
    before = getattr(store, "commits", None)
    now = time.time()
    start = time.perf_counter()
    await asyncio.gather(*(store.save_step(StepRecord(r.id, 1, "restart", "core.noop", 1,
                                                      "succeeded", now, now, {"host": r.key},
                                                      {"exit_status": 0}))
                           for r in batch.runs))
    elapsed = time.perf_counter() - start
    out: dict[str, Any] = {"writers": writers, "seconds": round(elapsed, 4),
                           "steps_per_s": round(writers / elapsed, 1)}
    if before is not None:
        out["transactions"] = getattr(store, "commits", 0) - before
    return out


async def measure(name: str, store: Store, seconds: float, writers: int) -> None:
    await store.open()
    try:
        for size in SIZES:
            emit({"store": name, "measure": "commit", **await commits(store, size, seconds)})
        emit({"store": name, "measure": "save_step", **await steps(store, writers)})
    finally:
        await store.close()


async def main(args: argparse.Namespace) -> None:
    emit({"machine": machine()})
    with tempfile.TemporaryDirectory(prefix="loopd-bench-") as folder:
        await measure("sqlite", SqliteStore(Path(folder) / "loopd.db", replica="bench"),
                      args.seconds, args.writers)
    server = None
    dsn = args.dsn
    if dsn is None:
        from tests.servers.postgres import start_postgres

        server = start_postgres()
        if server is None:
            emit({"store": "postgres", "skipped": "no PostgreSQL binaries; give --dsn"})
            return
        dsn = server.dsn(server.create_database())
    try:
        await measure("postgres", PostgresStore(dsn, replica="bench"), args.seconds,
                      args.writers)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="a PostgreSQL database to use (default: start one)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size")
    parser.add_argument("--writers", type=int, default=1000, help="concurrent save_step")
    asyncio.run(main(parser.parse_args()))
