"""Building events from decoded JSON: nesting depth bounded, deterministic ids."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from loopd.errors import DecodeError
from loopd.events import MAX_DEPTH, decode_object, event_from_object


def nested(levels: int) -> dict[str, Any]:
    """An object ``levels`` containers deep (the outer object is level 1)."""
    obj: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        obj = {"a": obj}
    return obj


def test_nesting_deeper_than_the_limit_is_a_decode_error_naming_depth_and_origin() -> None:
    """An object nested 1,000 levels deep is a DecodeError that names its depth and origin."""
    payload = b'{"a":' * 999 + b'{"leaf":1}' + b"}" * 999  # orjson writes only 255 deep
    obj = decode_object(payload, max_payload=1 << 20, origin="kafka t[0]@7")
    with pytest.raises(DecodeError) as caught:
        event_from_object(obj, source="k", topic="t", origin="kafka t[0]@7")
    assert "nested 1000 levels deep" in str(caught.value)
    assert f"limit {MAX_DEPTH}" in str(caught.value)
    assert caught.value.origin == "kafka t[0]@7"
    assert caught.value.reason == "decode"


def test_lists_count_as_levels_and_the_limit_itself_is_accepted() -> None:
    """Exactly MAX_DEPTH levels (lists included) decode; one more is refused."""
    ok: Any = 1
    for _ in range(MAX_DEPTH - 2):
        ok = [ok]
    # the envelope, its data object and MAX_DEPTH - 2 lists: MAX_DEPTH levels
    event = event_from_object({"data": {"x": ok}}, source="s", topic="t", origin="o")
    assert event.data == {"x": ok}
    with pytest.raises(DecodeError, match=f"nested {MAX_DEPTH + 1} levels deep"):
        event_from_object({"data": {"x": [ok]}}, source="s", topic="t", origin="o")


def test_an_event_without_id_gets_a_deterministic_id_from_its_content() -> None:
    """The same id-less event with its own time gets the same id; any field changes it."""
    body = {"topic": "disk", "key": "db-1", "time": 1714557600, "data": {"used": 0.95}}

    def ident(obj: dict[str, Any], source: str = "webhook") -> str:
        return event_from_object(obj, source=source, topic=str(obj.get("topic", "")),
                                 origin="o").id

    first = ident(body)
    assert first == ident(orjson.loads(orjson.dumps(body)))
    assert first == ident({"data": {"used": 0.95}, "time": 1714557600, "key": "db-1",
                           "topic": "disk"})  # key order does not matter
    assert first != ident(body, source="other")
    for change in ({"topic": "cpu"}, {"key": "db-2"}, {"time": 1714557601},
                   {"data": {"used": 0.96}}):
        assert first != ident({**body, **change}), change
    assert ident({**body, "id": "given"}) == "given"
