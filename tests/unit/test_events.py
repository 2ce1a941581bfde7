"""Building events from decoded JSON: nesting depth bounded, deterministic ids, times."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from loopd.errors import DecodeError
from loopd.events import MAX_DEPTH, decode_object, event_from_object, parse_time
from loopd.units import parse_time as units_parse_time
from loopd.units import rfc3339


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


@pytest.mark.parametrize(("value", "expected"), [
    (1_796_000_000, 1_796_000_000.0), ("1796000000.5", 1_796_000_000.5),
    (1_796_000_000_123, 1_796_000_000.123), ("2026-12-01T00:00:00Z", 1_796_083_200.0),
    (0, 0.0),
])
def test_event_times_are_epoch_seconds_milliseconds_or_rfc_3339(value: Any, expected: float
                                                                 ) -> None:
    assert parse_time(value, origin="t") == pytest.approx(expected)


@pytest.mark.parametrize("value", [1e17, -99999999999, -1, "1969-12-31T23:59:59Z",
                                   float("nan"), float("inf"), True, "yesterday"])
def test_event_times_no_calendar_holds_are_refused_naming_the_origin(value: Any) -> None:
    """A time before 1970 or past 9999 would make every view of its run fail: refused."""
    with pytest.raises(DecodeError, match=r"^t: time"):
        parse_time(value, origin="t")


def test_times_are_shown_in_rfc_3339_and_never_fail() -> None:
    """The API's one time format; a stored time no calendar holds shows as its number."""
    assert rfc3339(1_796_083_200.1234) == "2026-12-01T00:00:00.123Z"
    assert rfc3339(None) is None
    assert rfc3339(1e17) == "1e+17"


@pytest.mark.parametrize("text", ["2026", "20261201", "1e17", "nan", "soon"])
def test_a_query_time_that_is_a_date_in_digits_or_not_a_time_is_refused(text: str) -> None:
    """since=20261201 is not 1970: the API asks for RFC 3339 or epoch seconds after 2000."""
    with pytest.raises(ValueError, match="bad time"):
        units_parse_time(text)
    assert units_parse_time("0") == 0.0
    assert units_parse_time("2026-12-01T00:00:00") == 1_796_083_200.0
