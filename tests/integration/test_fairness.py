"""Runs are not starved by a Kafka backlog (issue 15): a run decided while 100,000 records
wait on the topic starts, ends, and has its end recorded (incident closed, start slot
free) within a second, not once the backlog has drained.

The daemon runs in this process against the tansu broker (tests/servers/kafka.py); one
record in a hundred matches a rule whose run is ``core.noop``, so each run is over at
once and every delay measured is loopd's own: from the decision (the run created) to the
run started, and from the run's end to its incident closed. The times come from the
store, written by the engine and the dispatcher on one wall clock.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from loopd.config import load_config
from loopd.daemon import Daemon
from tests.integration.test_api import _until_ready
from tests.servers import wait_until
from tests.servers.kafka import KafkaBroker, create_topic, producer

pytestmark = pytest.mark.kafka

BACKLOG = 100_000
EVERY = 100  # one record in EVERY starts a run
PARTITIONS = 4
BOUND = 1.0  # seconds: the bound on a run's start or end delay

RULES = """\
rules:
  - name: act
    on: {source: bus, match: {kind: act}}
    key: "{{ event.host }}"
    run: {action: core.noop, input: {host: "{{ event.host }}"}}
"""


async def _backlog(bootstrap: str, topic: str) -> None:
    await create_topic(bootstrap, topic, PARTITIONS)
    async with producer(bootstrap) as prod:
        sent = []
        for i in range(BACKLOG):
            act = i % EVERY == 0
            value = {"kind": "act", "host": f"h{i}"} if act else {"kind": "noise", "n": i}
            sent.append(await prod.send(topic, orjson.dumps(value), key=str(i).encode()))
            if len(sent) >= 5000:
                await asyncio.gather(*sent)
                sent.clear()
        await asyncio.gather(*sent)


def _daemon(root: Path, bootstrap: str, topic: str) -> Daemon:
    (root / "rules").mkdir()
    (root / "rules" / "act.yaml").write_text(RULES)
    (root / "loopd.yaml").write_text(
        "listen: 127.0.0.1:0\n"
        f"sources:\n  - {{name: bus, type: kafka, topics: [{topic}], bootstrap: '{bootstrap}',"
        f" group: g-{topic}, session_timeout: 2s, telemetry: false}}\n"
        f"rules: [rules]\npacks: [{Path(__file__).resolve().parents[2] / 'packs'}]\n"
        "store: {path: var/loopd.db}\nlog: {format: json, level: warning}\n")
    return Daemon(load_config(root / "loopd.yaml"))


async def test_runs_start_and_end_while_a_backlog_drains(
        kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path) -> None:
    """Every run decided while a 100,000-record backlog drains starts within a second of
    its decision and has its incident closed within a second of its end (within a quarter
    of the drain, when a slow machine makes that longer)."""
    await _backlog(kafka_broker.bootstrap, kafka_topic)
    daemon = _daemon(tmp_path, kafka_broker.bootstrap, kafka_topic)
    ready = asyncio.Event()
    task = await _until_ready(daemon.run(on_ready=lambda _: ready.set()), ready)
    try:
        began = time.monotonic()
        await wait_until(lambda: daemon.metrics.value(
            "loopd_events_received_total", source="bus") >= BACKLOG, timeout=600,
            interval=0.1, what="the backlog consumed")
        await daemon.engine.drain(timeout=120)
        await daemon.dispatcher.drain(timeout=120)
        await daemon.engine.drain(timeout=120)
        drained = time.monotonic() - began
        runs = await daemon.store.list_runs(limit=10_000)
        incidents = {i.id: i for i in await daemon.store.list_incidents(limit=10_000)}
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 60)
    assert len(runs) == BACKLOG // EVERY  # every matching record started one run
    starts = sorted(r.started - r.created for r in runs if r.started is not None)
    ends = sorted(closed - r.finished for r in runs
                  if r.finished is not None and r.incident_id is not None
                  and (closed := incidents[r.incident_id].closed) is not None)
    assert len(starts) == len(ends) == len(runs), "a run never started, ended or closed"
    # the runs are spread over the drain (one record in a hundred), so starvation shows
    # as delays of the order of the drain time (a run decided early waits until the end).
    # A busy machine stretches the drain and every delay with it: the bound is the
    # issue's second, or a quarter of the drain when the machine made that longer (here
    # the drain takes 5-6 s: starved runs would wait up to that long)
    limit = max(BOUND, drained / 4)
    worst = (f"drain {drained:.1f}s, slowest start {starts[-1]:.3f}s, slowest end "
             f"{ends[-1]:.3f}s, limit {limit:.2f}s")
    assert starts[-1] <= limit, worst
    assert ends[-1] <= limit, worst
