"""MQTT payloads: JSON objects as they are, bare numbers as ``{"value": N}``, the rest refused."""

from __future__ import annotations

import pytest

from loopd.errors import DecodeError, PayloadTooLarge
from loopd.sources.mqtt import decode_payload


@pytest.mark.parametrize("payload, data", [
    (b"42", {"value": 42}), (b" 3.5\n", {"value": 3.5}), (b"-1e3", {"value": -1000.0}),
    (b"0", {"value": 0}), (b'{"value": 1, "host": "a"}', {"value": 1, "host": "a"}),
    (b'  {"data": {"x": 1}}', {"data": {"x": 1}}),
])
def test_objects_and_bare_numbers_are_event_data(payload: bytes, data: object) -> None:
    """An object is the data (or an envelope, read later); a plain number is its value."""
    assert decode_payload(payload, max_payload=1024, origin="mqtt t/x") == data


@pytest.mark.parametrize("payload, message", [
    (b'"web-1"', "expected a JSON object or a bare number, got a string"),
    (b"[1, 2]", "expected a JSON object or a bare number, got an array"),
    (b"true", "expected a JSON object or a bare number, got a boolean"),
    (b"null", "expected a JSON object or a bare number, got null"),
    (b"NaN", "malformed JSON"),
    (b"1e999", "malformed JSON"),
    (b"", "malformed JSON"),
    (b"on", "malformed JSON"),
])
def test_other_payloads_are_refused_naming_the_topic(payload: bytes, message: str) -> None:
    """A bare string, array, boolean or null, a non-finite number or no JSON at all is a
    DecodeError whose text starts with the topic."""
    with pytest.raises(DecodeError) as info:
        decode_payload(payload, max_payload=1024, origin="mqtt telemetry/web-1/cpu")
    assert str(info.value).startswith(f"mqtt telemetry/web-1/cpu: {message}")


def test_an_oversized_number_is_too_large() -> None:
    """max_payload holds for bare numbers too."""
    with pytest.raises(PayloadTooLarge):
        decode_payload(b"1" * 65, max_payload=64, origin="mqtt t/x")
