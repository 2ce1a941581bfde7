"""The inputs of ``loopd simulate``: event files, read and merged in time order.

* JSON Lines: a generic event ``{id?, source?, topic, key?, time, data}`` (source
  ``webhook`` by default) or an Alertmanager webhook payload (version 4, one event per
  alert, source ``alertmanager``) per line;
* CSV telemetry ``timestamp,value``: host = file stem unless ``FILE:host=NAME``, topic
  ``telemetry/<host>/<metric>`` (metric ``value`` unless ``FILE:metric=NAME``), data
  ``{"value": float}``, key = host.

Times (event time is the simulation's clock): epoch seconds, or milliseconds, as a
number or a string of digits, or RFC 3339 / ISO 8601 (``2014-03-07T10:00:00Z``,
``2014-03-07 10:00:00``; UTC when no zone is named). A time before ``EARLIEST`` (2000) is
refused: it is a date written as digits (``20140307`` would be 1970-08-22 in epoch
seconds) or a clock that was never set, and replayed it would pass every deadline at once.
CSV values must be finite numbers (``nan`` and ``inf`` are refused).

Each file is read lazily, line by line, counting the bytes read in a Meter (for the
progress line); the first invalid line raises ``DecodeError`` naming ``FILE:LINE``.
"""

from __future__ import annotations

import contextlib
import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from loopd.errors import DecodeError
from loopd.events import Event, parse_time
from loopd.simulate.report import Meter, iso
from loopd.sources.webhook import alertmanager_events, generic_events
from loopd.units import EARLIEST

CSV_SOURCE = "telemetry"
WEBHOOK_SOURCE = "webhook"
ALERTMANAGER_SOURCE = "alertmanager"
_OPTIONS = ("host", "metric")


@dataclass(frozen=True, slots=True)
class EventFile:
    path: Path
    kind: str  # "csv" | "jsonl"
    host: str | None = None
    metric: str = "value"


def parse_event_file(arg: str) -> EventFile:
    """``FILE`` or ``FILE:host=NAME,metric=NAME`` (the options are for CSV telemetry)."""
    path, options = arg, {}
    head, sep, tail = arg.rpartition(":")
    if sep and head and "=" in tail and "/" not in tail:
        path = head
        for part in tail.split(","):
            name, eq, value = (s.strip() for s in part.partition("="))
            if not eq or name not in _OPTIONS or not value:
                raise DecodeError(f"bad option {part!r} (use FILE:host=NAME,metric=NAME)",
                                  origin=arg)
            options[name] = value
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix == ".csv":
        kind = "csv"
    elif suffix in (".jsonl", ".json", ".ndjson"):
        kind = "jsonl"
    else:  # sniff: JSON Lines start with an object
        try:
            with file.open("rb") as f:
                kind = "jsonl" if f.read(64).lstrip().startswith(b"{") else "csv"
        except OSError as exc:
            raise DecodeError(f"cannot read: {exc.strerror}", origin=path) from None
    if options and kind != "csv":
        raise DecodeError("host= and metric= are options of CSV telemetry files", origin=arg)
    return EventFile(file, kind, options.get("host"), options.get("metric", "value"))


def _json_line(line: bytes, where: str) -> list[Event]:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}", origin=where) from None
    if not isinstance(obj, dict):
        raise DecodeError(f"expected a JSON object, got {type(obj).__name__}", origin=where)
    if "alerts" in obj:
        items = alertmanager_events(obj, source=ALERTMANAGER_SOURCE, origin=where)
    else:
        source = obj.get("source", WEBHOOK_SOURCE)
        if not isinstance(source, str) or not source:
            raise DecodeError("field 'source' must be a non-empty string", origin=where)
        if obj.get("time") is None:
            raise DecodeError("field 'time' is required: event time is the simulation's clock",
                              origin=where)
        # topic and data: the check POST /v1/events makes too
        items = generic_events(obj, source=source, origin=where)
    events = []
    for item in items:
        if isinstance(item, DecodeError):
            raise item
        _check_time(item.time, where)
        events.append(item)
    if len(events) > 1:  # the alerts of one notification, in time order
        events.sort(key=event_time)
    return events


def read_jsonl(spec: EventFile, meter: Meter) -> Iterator[Event]:
    with _open(spec.path) as f:
        for lineno, line in enumerate(f, 1):
            meter.bytes += len(line)
            line = line.strip()
            if line:
                yield from _json_line(line, f"{spec.path}:{lineno}")


def _check_time(when: float, where: str) -> float:
    if when < EARLIEST:
        at = iso(when) if when >= 0 else "before 1970"
        raise DecodeError(
            f"time {when:.15g} is epoch seconds {at}, before {iso(EARLIEST)}: if it is a "
            "date, write it as RFC 3339 (2014-03-07T00:00:00Z)", origin=where)
    return when


def read_csv(spec: EventFile, source: str, meter: Meter) -> Iterator[Event]:
    host = spec.host or spec.path.stem
    metric = spec.metric
    topic = f"telemetry/{host}/{metric}"
    with _open(spec.path) as f:
        header = f.readline()
        meter.bytes += len(header)
        columns = [c.strip().lower() for c in header.decode("utf-8-sig", "replace").split(",")]
        if "timestamp" not in columns or "value" not in columns:
            raise DecodeError("the header must name the columns timestamp and value, got "
                              f"{header.strip().decode(errors='replace')!r}",
                              origin=f"{spec.path}:1")
        ti, vi = columns.index("timestamp"), columns.index("value")
        width = max(ti, vi) + 1
        for lineno, raw in enumerate(f, 2):
            meter.bytes += len(raw)
            where = f"{spec.path}:{lineno}"
            try:
                line = raw.decode().strip()
            except UnicodeDecodeError:
                raise DecodeError("not UTF-8 text", origin=where) from None
            if not line:
                continue
            cells = line.split(",")
            if len(cells) < width:
                raise DecodeError(f"expected {len(columns)} columns, got {len(cells)}",
                                  origin=where)
            stamp = cells[ti].strip()
            try:
                value = float(cells[vi])
            except ValueError:
                raise DecodeError(f"value {cells[vi].strip()!r} is not a number",
                                  origin=where) from None
            if not math.isfinite(value):  # a rule's `event.value > 90` is never true for nan
                raise DecodeError(f"value {cells[vi].strip()!r} is not a finite number",
                                  origin=where)
            when = _check_time(parse_time(stamp, origin=where), where)
            yield Event(id=f"{host}/{metric}@{stamp}", source=source, topic=topic,
                        data={"value": value}, key=host, time=when, origin=where)


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Any]:
    try:
        f = path.open("rb")
    except OSError as exc:
        raise DecodeError(f"cannot read: {exc.strerror}", origin=str(path)) from None
    with f:
        yield f


def read_events(files: list[EventFile], *, csv_source: str = CSV_SOURCE,
                meter: Meter | None = None) -> Iterator[Event]:
    """Every file's events, merged in time order (ties: the files' order)."""
    meter = meter if meter is not None else Meter()
    streams = [read_csv(f, csv_source, meter) if f.kind == "csv" else read_jsonl(f, meter)
               for f in files]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=event_time)


def event_time(event: Event) -> float:
    return event.time
