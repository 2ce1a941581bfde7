"""The Kafka source's decoding: the one-step way for the common record (the event's data
as the record's value) makes exactly the Event the general way makes, and every other
record still goes the general way, with its errors."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from loopd.config import KafkaSourceConfig
from loopd.errors import EventError
from loopd.events import MAX_DEPTH, Event
from loopd.sources.kafka import KafkaSource

ALERT = {"labels": {"alertname": "NginxDown", "instance": "web-1"}, "value": 95.5,
         "status": "firing", "list": [1, {"x": None}]}


def source(**extra: Any) -> KafkaSource:
    return KafkaSource(KafkaSourceConfig.model_validate({
        "type": "kafka", "name": "alerts", "bootstrap": "127.0.0.1:9", "topics": ["t"],
        "group": "g", **extra}))


def record(value: bytes | None, *, key: bytes | None = b"k-1", timestamp: int = 1_764_000_000_123,
           headers: list[tuple[str, bytes | None]] | None = None,
           offset: int = 42) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("alerts.v1", 3, offset, timestamp, 0, key, value, None,
                          len(key or b""), len(value or b""), headers or [])


@pytest.mark.parametrize("rec", [
    record(orjson.dumps(ALERT)),
    record(orjson.dumps(ALERT), key=None),
    record(orjson.dumps(ALERT), key=b"\xff\xfe bad utf-8"),
    record(orjson.dumps(ALERT), headers=[("trace", b"abc"), ("none", None), ("bin", b"\xff")]),
    record(orjson.dumps({**ALERT, "data": "not an object: no envelope"})),
    record(b"{}"),
], ids=["bare", "no-key", "bad-key", "headers", "data-not-object", "empty-object"])
def test_the_common_record_decodes_to_the_event_the_general_way_makes(
        rec: ConsumerRecord[bytes, bytes]) -> None:
    src = source()
    fast, general = src._decode(rec), src._decode_any(rec)
    assert isinstance(fast, Event) and isinstance(general, Event)
    assert fast == general
    assert fast.id == "alerts.v1:3:42" and fast.origin == "kafka alerts.v1[3]@42"
    assert fast.time == 1_764_000_000.123


def test_a_record_without_a_timestamp_takes_the_time_of_receipt() -> None:
    before = time.time()
    event = source()._decode(record(orjson.dumps(ALERT), timestamp=-1))
    assert isinstance(event, Event) and before <= event.time <= time.time()


def test_an_envelope_keeps_its_own_id_key_time_and_headers() -> None:
    envelope = {"id": "e-1", "key": "web-1", "time": "2026-11-23T03:00:00Z",
                "headers": {"h": "1"}, "data": ALERT}
    event = source()._decode(record(orjson.dumps(envelope), headers=[("trace", b"t")]))
    assert isinstance(event, Event)
    assert (event.id, event.key, event.data) == ("e-1", "web-1", ALERT)
    # the envelope's time, not the record's
    assert event.time == datetime(2026, 11, 23, 3, tzinfo=UTC).timestamp()
    assert event.headers == {"trace": "t", "h": "1"}


@pytest.mark.parametrize(("value", "why"), [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b"", "malformed JSON"),
    (None, "malformed JSON"),
    (b'{"a": ' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), "levels deep"),
    (orjson.dumps({"pad": "x" * 2000}), "exceeds max_payload"),
], ids=["malformed", "array", "empty", "none", "too-deep", "too-large"])
def test_any_other_record_is_refused_the_general_way_naming_where(
        value: bytes | None, why: str) -> None:
    error = source(max_payload=1024)._decode(record(value))
    assert isinstance(error, EventError)
    assert why in str(error) and "kafka alerts.v1[3]@42" in str(error)
