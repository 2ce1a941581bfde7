"""The lean hot paths of issue 15 keep the meanings of what they replace: a Kafka
partition's commit point, the decision histogram observed per batch, the SQLite batch
written in one hop."""

from __future__ import annotations

import random
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram

from loopd import metrics
from loopd.events import Event
from loopd.sources.kafka import _Partition, _Record
from loopd.store.base import Batch, DecisionRecord, EventRecord, IncidentRecord
from loopd.store.sqlite import SqliteStore


def test_commit_point_follows_the_longest_acked_run_whatever_the_ack_order() -> None:
    """Over chunks with offset gaps, acked in a random order with repeats, the commit point
    is always the offset after the last of the longest acked run from the start."""
    rng = random.Random(15)
    for _ in range(50):
        offsets = sorted(rng.sample(range(400), 60))  # gaps, as after compaction
        part = _Partition()
        cuts = sorted(rng.sample(range(1, 60), 4))
        records = []
        for lo, hi in zip([0, *cuts], [*cuts, 60], strict=True):
            chunk = part.chunk(offsets[lo:hi])
            records += [_Record(Event("e", "s", "t", {}), chunk, o) for o in offsets[lo:hi]]
        order = records + rng.sample(records, 10)  # every record acked, some twice
        rng.shuffle(order)
        acked: set[int] = set()
        for record in order:
            record.ack()
            acked.add(record._offset)
            run = 0
            while run < len(offsets) and offsets[run] in acked:
                run += 1
            expected = offsets[run - 1] + 1 if run else None
            assert part.commit_at == expected


def test_decision_histogram_per_batch_equals_one_observation_per_event() -> None:
    """``events_decided`` leaves the histogram's buckets, count and sum as one ``observe``
    per event would."""
    m = metrics.Metrics()
    reference = Histogram("ref", "ref", buckets=m.decision_seconds._upper_bounds[:-1],
                          registry=CollectorRegistry())
    rng = random.Random(7)
    with metrics.using(m):
        for _ in range(20):
            done = 100.0
            received = [done - rng.choice([0.0, 0.0005, 0.001, 7.0]) - rng.random() / 50
                        for _ in range(rng.randrange(0, 300))]
            metrics.events_decided(done, received)
            for at in received:
                reference.observe(done - at)
    mine = {(s.name.replace("loopd_event_decision_seconds", "x"), s.labels.get("le")): s.value
            for s in next(iter(m.decision_seconds.collect())).samples}
    theirs = {(s.name.replace("ref", "x"), s.labels.get("le")): s.value
              for s in next(iter(reference.collect())).samples}
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert abs(mine[name] - theirs[name]) < 1e-6, name


async def test_a_batch_written_again_reports_every_decision_duplicate(tmp_path: Path) -> None:
    """A batch written in one hop is readable, and the same batch written again (its
    events redelivered) falls back to the regular path, which reports each decision as a
    duplicate and changes nothing."""
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    try:
        def batch() -> Batch:
            inc = IncidentRecord("i1", "r", "k", "open", 1.0, None, 3, None, None)
            return Batch(
                events=[EventRecord("src", f"e{n}", "t", "k", 1.0, {"n": n}) for n in range(3)],
                decisions=[DecisionRecord("src", f"e{n}", "r", "k", "joined", "open", 1.0,
                                          "i1") for n in range(3)],
                incidents={"i1": inc})
        first = await store.commit(batch())
        assert not first.duplicates
        assert await store.count_decisions(rule="r") == 3
        again = await store.commit(batch())
        assert again.duplicates == {("src", f"e{n}", "r") for n in range(3)}
        assert await store.count_decisions(rule="r") == 3
        assert (await store.get_incident("i1")) is not None
    finally:
        await store.close()
