"""HTTP push sources: generic events and Alertmanager webhooks.

They have no connection of their own: the API's handlers parse the request
with the functions below and hand the events to the engine; the handler
answers only once every event is decided and durable (or rejected), so a
sender that gets a 2xx knows nothing is lost. The Source objects exist so the
supervisor, ``/readyz`` and ``loopd_source_up`` treat every source alike.
"""

from __future__ import annotations

import hashlib
from typing import Any

from loopd import metrics
from loopd.config import AlertmanagerSourceConfig, WebhookSourceConfig
from loopd.errors import DecodeError, PayloadTooLarge
from loopd.events import JSON, Event, check_depth, event_from_object, parse_time
from loopd.sources.base import Emit, StoppableSource

_ALERT_FIELDS = ("status", "labels", "annotations", "startsAt", "endsAt", "generatorURL",
                 "fingerprint")
_GROUP_FIELDS = ("receiver", "groupKey", "groupLabels", "commonLabels", "commonAnnotations",
                 "externalURL", "truncatedAlerts")


class PushSource(StoppableSource):
    """A source fed by the API: up while the daemon serves HTTP."""

    def __init__(self, config: WebhookSourceConfig | AlertmanagerSourceConfig) -> None:
        super().__init__(config.name)
        self.config = config

    async def run(self, emit: Emit) -> None:
        self._connected = True
        metrics.source_up(self.name, True)
        try:
            await self._stop.wait()
        finally:
            self._connected = False


def _check_size(body: bytes, max_payload: int, origin: str) -> None:
    if len(body) > max_payload:
        raise PayloadTooLarge(
            f"payload of {len(body)} bytes exceeds max_payload {max_payload}", origin=origin)


def generic_events(body: JSON, *, source: str, origin: str, shallow: bool = False
                   ) -> list[Event | DecodeError]:
    """One event per object: a single object or a list of them (each checked alone).

    The one check of a generic event, for ``POST /v1/events`` and ``loopd simulate``
    alike: an object with a string ``topic`` and an object ``data`` (a bare payload is
    refused here, unlike on a broker topic, where the topic comes from the broker).
    ``shallow``: the body is known not to nest too deep (``events.shallow_bytes``)."""
    items = body if isinstance(body, list) else [body]
    out: list[Event | DecodeError] = []
    for index, item in enumerate(items):
        where = f"{origin}[{index}]" if isinstance(body, list) else origin
        if not isinstance(item, dict):
            out.append(DecodeError(f"expected a JSON object, got {type(item).__name__}",
                                   origin=where))
            continue
        try:
            topic = _require(item, "topic", str, where, "a string")
            if not topic.strip():
                raise DecodeError("field 'topic' must not be empty", origin=where)
            _require(item, "data", dict, where, "an object")
            out.append(event_from_object(item, source=source, topic=topic, origin=where,
                                         shallow=shallow))
        except DecodeError as exc:
            out.append(exc)
    return out


def _require(obj: dict[str, Any], name: str, kind: type, where: str,
             what: str | None = None) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind):
        got = "missing" if value is None else type(value).__name__
        raise DecodeError(f"field {name!r} must be {what or kind.__name__}, got {got}",
                          origin=where)
    return value


def alertmanager_events(body: JSON, *, source: str, origin: str, shallow: bool = False
                        ) -> list[Event | DecodeError]:
    """One event per alert of an Alertmanager webhook payload (version 4).

    The event's data is the alert (status, labels, annotations, startsAt,
    endsAt, generatorURL, fingerprint) plus the group fields (receiver,
    groupKey, groupLabels, commonLabels, commonAnnotations, externalURL). Its
    id is fingerprint + startsAt + status, so a repeated notification of the
    same alert state is recognised as a duplicate. ``shallow``: the body is known not
    to nest too deep (``events.shallow_bytes`` of its bytes), so no value is walked.
    """
    if not isinstance(body, dict):
        raise DecodeError(f"expected an Alertmanager payload object, got {type(body).__name__}",
                          origin=origin)
    version = body.get("version")
    if version is not None and str(version) != "4":
        raise DecodeError(f"unsupported Alertmanager payload version {version!r} (want 4)",
                          origin=origin)
    alerts = _require(body, "alerts", list, origin)
    group = {k: body.get(k) for k in _GROUP_FIELDS if k in body}
    if not shallow:
        check_depth(group, origin=origin)
    out: list[Event | DecodeError] = []
    for index, alert in enumerate(alerts):
        where = f"{origin} alerts[{index}]"
        try:
            out.append(_alert_event(alert, group, source, where, shallow))
        except DecodeError as exc:
            out.append(exc)
    return out


def _alert_event(alert: Any, group: dict[str, Any], source: str, where: str,
                 shallow: bool) -> Event:
    if not isinstance(alert, dict):
        raise DecodeError(f"an alert must be an object, got {type(alert).__name__}", origin=where)
    if not shallow:
        check_depth(alert, origin=where)
    status = _require(alert, "status", str, where)
    if status not in ("firing", "resolved"):
        raise DecodeError(f"status must be firing or resolved, got {status!r}", origin=where)
    labels = _require(alert, "labels", dict, where)
    annotations = alert.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise DecodeError("field 'annotations' must be dict", origin=where)
    starts = _require(alert, "startsAt", str, where)
    starts_ts = parse_time(starts, origin=where)
    ends = alert.get("endsAt")
    fingerprint = alert.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        canon = ",".join(f"{k}={labels[k]}" for k in sorted(labels))
        fingerprint = hashlib.sha1(canon.encode(), usedforsecurity=False).hexdigest()[:16]
    data = {k: alert.get(k) for k in _ALERT_FIELDS}
    data.update(labels=labels, annotations=annotations, fingerprint=fingerprint, **group)
    when = starts_ts
    if status == "resolved" and isinstance(ends, str) and not ends.startswith("0001-"):
        when = parse_time(ends, origin=where)
    instance = labels.get("instance")
    return Event(
        id=f"{fingerprint}:{starts}:{status}", source=source,
        topic=str(labels.get("alertname", "")), data=data,
        key=str(instance) if instance is not None else None, time=when, origin=where,
    )
