"""Event: one normalized message; Delivery: an event plus how to acknowledge it."""

from __future__ import annotations

import hashlib
import itertools
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from loopd.errors import DecodeError, PayloadTooLarge
from loopd.units import LATEST

JSON = Any
Ack = Callable[[], None]

# Deeper than this is refused at decode: deeply nested data is never a real event, and
# recursive code further on (serializers, templates) would fail on it, wedging the stream.
MAX_DEPTH = 64


def _no_ack() -> None:
    return None


class _Empty(dict[str, str]):
    """The one empty ``headers`` / ``vars`` every event without any shares (most have
    none: a dict each was a measurable part of an event's cost). Read-only: whoever has
    headers to give assigns a new dict."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]  # a shared constant, never changed
        return 0

    def _refuse(self, *args: object, **kwargs: object) -> Any:
        raise TypeError("an event's empty headers/vars are shared: assign a new dict")

    __setitem__ = __delitem__ = _refuse
    update = setdefault = pop = popitem = clear = __ior__ = _refuse


NONE: dict[str, str] = _Empty()


@dataclass(slots=True)
class Event:
    """One normalized message from any source.

    ``data`` is the decoded payload (an object); rules match on dotted paths
    inside it. ``vars`` holds values captured from the topic pattern of the
    source (``telemetry/{host}/cpu`` -> ``{"host": "web-1"}``). ``origin``
    names where the message came from, for error messages and logs.
    """

    id: str
    source: str
    topic: str
    data: dict[str, JSON]
    key: str | None = None
    time: float = field(default_factory=time.time)
    headers: dict[str, str] = NONE  # shared and read-only while empty: assign, never mutate
    vars: dict[str, str] = NONE
    origin: str = ""

    def to_json(self) -> dict[str, JSON]:
        return {
            "id": self.id, "source": self.source, "topic": self.topic, "key": self.key,
            "time": self.time, "headers": self.headers, "vars": self.vars, "data": self.data,
        }


@dataclass(slots=True)
class Delivery:
    """An event handed from a source to the engine.

    The engine calls ``ack`` exactly once, after the decision about the event
    is durable (or once it knows there is nothing to decide). A source must not
    consider the message consumed before that (Kafka commits its offset then).
    Before it does, the engine sets ``duplicate`` when the event (its source and id) was
    already decided, so nothing new was (the ingest reply counts them).
    """

    event: Event
    ack: Ack = _no_ack
    received: float = field(default_factory=time.monotonic)
    duplicate: bool = False


class OwnAck(Delivery):
    """A delivery that knows how to acknowledge itself (``_ack``): the one object a source
    makes per message, with no closure per message; its ``ack`` cannot be replaced."""

    __slots__ = ()

    def __init__(self, event: Event) -> None:
        self.event = event
        self.received = time.monotonic()
        self.duplicate = False

    @property
    def ack(self) -> Ack:
        return self._ack

    @ack.setter
    def ack(self, value: Ack) -> None:
        raise AttributeError(f"a {type(self).__name__} acknowledges itself")

    def _ack(self) -> None:
        raise NotImplementedError


_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count(1)


def new_id() -> str:
    """Unique across processes (random prefix per process) and cheap (a counter)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def decode_object(payload: bytes, *, max_payload: int, origin: str) -> dict[str, JSON]:
    """Decode a JSON object payload, or raise an EventError naming ``origin``."""
    if len(payload) > max_payload:
        raise PayloadTooLarge(
            f"payload of {len(payload)} bytes exceeds max_payload {max_payload}", origin=origin
        )
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}", origin=origin) from None
    if not isinstance(data, dict):
        raise DecodeError(
            f"expected a JSON object, got {type(data).__name__}", origin=origin
        )
    return data


def nesting_depth(value: JSON, *, stop: int | None = None) -> int:
    """How many containers (objects and lists) deep ``value`` goes; iterative, so any
    depth orjson accepts is measured without recursion. ``stop``: give up once that deep
    (the answer is then ``stop``)."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    # level by level: one list per level, no tuple per child (the hot path of every
    # event: a typical alert is two levels of a handful of values)
    while level:
        depth += 1
        if stop is not None and depth >= stop:
            return depth
        below: list[JSON] = []
        for node in level:
            for child in (node.values() if isinstance(node, dict) else node):
                if isinstance(child, dict | list):
                    below.append(child)
        level = below
    return depth


def shallow_bytes(payload: bytes, limit: int = MAX_DEPTH) -> bool:
    """True when JSON ``payload`` cannot nest deeper than ``limit``: it has no more opening
    brackets than that (a cheap test in C that spares walking the decoded value)."""
    return payload.count(b"{") + payload.count(b"[") <= limit


def check_depth(value: JSON, *, origin: str, limit: int = MAX_DEPTH) -> None:
    """Raise a DecodeError naming the depth and ``origin`` when ``value`` nests too deep."""
    if nesting_depth(value, stop=limit + 1) > limit:
        depth = nesting_depth(value)
        raise DecodeError(f"nested {depth} levels deep (limit {limit})", origin=origin)


def content_id(source: str, topic: str, key: str | None, when: float,
               data: dict[str, JSON]) -> str:
    """The id of an event sent without one: a hash of what it says, so a retry of the
    same event is recognised as a duplicate (canonical JSON: keys sorted)."""
    canon = orjson.dumps([source, topic, key, when, data],
                         option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.blake2b(canon, digest_size=16).hexdigest()


def parse_time(value: JSON, *, origin: str) -> float:
    """Epoch seconds (a number, or a string of digits; milliseconds past year 5138) or an
    RFC 3339 / ISO 8601 string (UTC when it names no zone) -> epoch seconds.

    A string of digits is epoch seconds like the number it spells, never an ISO 8601 basic
    date: ``"20140307"`` is not taken for 2014-03-07 here and for 1970-08-22 elsewhere.
    NaN and infinity are refused: they order before or after every time."""
    if isinstance(value, bool):
        raise DecodeError(f"time must be a number or RFC 3339 string, got {value!r}", origin=origin)
    if isinstance(value, str) and value.strip().replace(".", "", 1).isdigit():
        value = float(value)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise DecodeError(f"time {value!r} is not a finite number", origin=origin)
        # milliseconds since epoch are common on Kafka; anything past year 5138 is ms
        seconds = float(value) / 1000.0 if value > 1e11 else float(value)
        if not 0 <= seconds <= LATEST:
            raise DecodeError(f"time {value!r} is out of range (epoch seconds or "
                              "milliseconds from 1970 to 9999)", origin=origin)
        return seconds
    if isinstance(value, str):
        try:  # Python 3.11 reads RFC 3339 including "Z" and fractional seconds
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise DecodeError(f"time {value!r} is not RFC 3339", origin=origin) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        if parsed.timestamp() < 0:
            raise DecodeError(f"time {value!r} is before 1970", origin=origin)
        return parsed.timestamp()
    raise DecodeError(
        f"time must be a number or RFC 3339 string, got {type(value).__name__}", origin=origin
    )


def event_from_object(
    obj: dict[str, JSON], *, source: str, topic: str, origin: str, default_id: str | None = None,
    default_key: str | None = None, shallow: bool = False,
) -> Event:
    """Build an Event from a generic JSON envelope or a bare payload.

    An envelope has a ``data`` object and optionally ``id``, ``topic``, ``key``,
    ``time`` and ``headers``; anything else is taken as the data itself. Nesting
    deeper than MAX_DEPTH is a DecodeError (``shallow``: the caller knows it cannot be,
    e.g. from ``shallow_bytes`` of the payload). Without an id (and ``default_id``), the id
    is ``content_id`` of source, topic, key, time and data; the time is the event's own,
    or the time of receipt when it has none (so such an event is never a duplicate).
    """
    if not shallow:
        check_depth(obj, origin=origin)
    if isinstance(obj.get("data"), dict):
        data: dict[str, JSON] = obj["data"]
        ident = obj.get("id", default_id)
        key = obj.get("key", default_key)
        topic = obj.get("topic", topic)
        headers = obj.get("headers") or {}
        when = obj.get("time")
        for name, value, types in (
            ("id", ident, (str, int, type(None))), ("key", key, (str, type(None))),
            ("topic", topic, (str,)), ("headers", headers, (dict,)),
        ):
            if not isinstance(value, types):
                raise DecodeError(
                    f"field {name!r} has wrong type {type(value).__name__}", origin=origin
                )
    else:
        data, ident, key, headers, when = obj, default_id, default_key, {}, None
    at = parse_time(when, origin=origin) if when is not None else time.time()
    return Event(
        id=str(ident) if ident is not None else content_id(source, topic, key, at, data),
        source=source,
        topic=topic,
        data=data,
        key=key,
        time=at,
        headers={str(k): str(v) for k, v in headers.items()} if headers else NONE,
        origin=origin,
    )
