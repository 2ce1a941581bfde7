"""MQTT source: JSON messages from several topic filters, with a persistent session.

The client uses an identifier stable across restarts and distinct per replica
(``client_id`` with ``{replica}`` expanded, default ``loopd-{replica}-<name>``: a
broker disconnects the older of two clients with one id, so two replicas sharing one
would knock each other off forever) and ``clean_session=False``, so the broker keeps
the subscriptions and queues QoS 1/2 messages published while loopd is disconnected,
and delivers them after the reconnect. Every connect subscribes to every filter again
anyway (a broker that lost its state gets the subscriptions back).

Several replicas: without ``shared`` every replica receives, and decides, every message
(each with its own fresh event id unless the payload is an envelope carrying one). With
``shared: GROUP`` each filter is subscribed as ``$share/GROUP/<filter>`` and the broker
hands each message to one member of the group; the message keeps its real topic, which
is what rules see. A broker may still queue a share of the messages for a member that is
disconnected but whose session lives (mosquitto does): that replica gets them when it
comes back under the same id, which a stable replica name (a StatefulSet pod) gives.

Delivery semantics: at-least-once into the engine, as for Kafka. A QoS 1 message is
acknowledged (PUBACK) only when the engine calls ``Delivery.ack``, after its decision is
durable; a rejected message once it is counted and logged (else it would come back
forever). A message received but not yet decided when loopd dies stays unacknowledged
in the broker's session and comes again after the reconnect, where the store recognises
one already decided by its event id. An id, or a ``time``, in the payload makes that id
the same on redelivery; without either the id is a hash that includes the time of
receipt, so the source remembers the ids of what it has not acknowledged when a
connection ends, and of what it acknowledged last (a PUBACK written just before the
connection died may never have reached the broker), and gives them back to the resends
on the next one (``_Acks.same_id``); only after a restart of loopd itself is such a
message, decided but not yet acknowledged when loopd died (the moments between a commit
and its PUBACKs), decided again. This needs the
persistent session above and a QoS of 1 or more on both the publish and the
subscription; a QoS 0 message has nothing to acknowledge and is lost if loopd dies
before deciding it.

How: aiomqtt 2.5 has no manual-acknowledgement option, but the paho-mqtt 2 client it
wraps has (``manual_ack_set(True)``, then ``ack(mid, qos)``). loopd switches it on in
aiomqtt's paho client (its ``_client``: a private attribute, read in one place,
``_session``) rather than driving paho directly, which would repeat aiomqtt's whole
asyncio socket integration for one flag. Two flags aiomqtt drops, the CONNACK's
session-present and a message's DUP, are read by wrapping the paho callbacks aiomqtt
installed on that client (``_watch``). Acknowledgements go out in the order the
messages came (``_Acks``): MQTT 3.1.1 and 5 (section 4.6) require PUBACKs in order, and
the engine or a rejection may finish a later message first. An ack for a connection
that is gone is dropped: the broker redelivers that message on the next one.

``qos: 2`` subscribes at QoS 1: paho sends the PUBREC of a QoS 2 message on receipt and
keeps it only in memory until PUBREL, so after a crash the broker would consider it
delivered; at QoS 1 the broker resends it until loopd acks, and the store's
de-duplication by event id does what QoS 2's handshake would have. A message the broker
queued at QoS 2 for an earlier subscription (the session outlives it) still arrives at
QoS 2, with that weakness: the source logs a warning, once.

Backpressure: the broker sends at most its in-flight window of unacknowledged messages
(mosquitto's ``max_inflight_messages``, 20 by default; MQTT 5 "receive maximum"), so
aiomqtt's own in-memory queue stays small while the engine is busy; the rest waits in
the session at the broker, up to its per-client queue limit. The window, with the commit
latency, bounds the ingest rate (README, "MQTT specifics"). Retained messages are delivered
again on every (re)subscribe, each time with a fresh event id unless the payload is an
envelope carrying one (or a ``time``).

Payloads are JSON objects (an event envelope or the data itself), or a bare JSON number
``N``, taken as ``{"value": N}``: telemetry streams often publish plain numbers, which a
rule then reads as ``event.value``. Any other JSON (a string, an array, true, null) is
rejected, counted and logged with its topic.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import aiomqtt
import orjson
import paho.mqtt.client as paho
import structlog
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from loopd import metrics
from loopd.catalog.credentials import resolve_secret
from loopd.config import MqttSourceConfig, mqtt_client_id
from loopd.errors import ConfigError, DecodeError, EventError, SourceError
from loopd.events import JSON, Ack, Delivery, Event, decode_object, event_from_object
from loopd.sources.base import Emit, OnAssigned, replica_name, until_closed

_Sent = tuple[str, bytes, str]  # a message's topic, payload and the id its event got

# Acked messages a connection remembers for the next one. Their PUBACKs were handed to
# paho, but those written just before the connection died may never have reached the
# broker, which then resends them; it can resend no more than its in-flight window
# (mosquitto 20, MQTT 5 "receive maximum" at most 65,535, usually tens). The cost: a
# broker that reuses a freed packet id at once, resending a message loopd never got under
# the id of one remembered here with the same topic and payload, has it taken for that one.
_RECENT = 1000

log = structlog.get_logger("loopd.mqtt")


class _Acks:
    """The acknowledgements of one connection, and the event ids it hands to the next.

    Each message's ack is sent once it is acked and every message that came before it on
    this connection has been (MQTT's order). A message the broker resends (DUP flag) gets
    the event id it had on an earlier connection (``same_id``), looked up by packet id."""

    def __init__(self, client: paho.Client, resent: dict[int, _Sent]) -> None:
        """``resent``: what the last connection that came up handed on (``handover``)."""
        self._client = client
        self._seq = itertools.count()
        # (seq, mid, qos, what came: topic, payload, event id), in arrival order
        self._pending: deque[tuple[int, int, int, _Sent | None]] = deque()
        self._acked: set[int] = set()  # seqs acked out of order, waiting for those before
        self._done: deque[tuple[int, _Sent]] = deque(maxlen=_RECENT)  # acked, oldest first
        self._resent = resent
        # The broker resends first, before anything new: the first message without the
        # DUP flag ends the resends (a miss does not: a resend can be one loopd never got).
        self._resending = True
        self.session_present: bool | None = None  # from the CONNACK; None: never came up
        self.dups: set[int] = set()  # packet ids that came with the DUP flag, not yet pumped
        self.open = True

    def connected(self, session_present: bool) -> None:
        """The CONNACK: without a session the broker resends nothing, so forget it all."""
        self.session_present = session_present
        if not session_present:
            self._resent = {}
            self._resending = False

    def track(self, mid: int, qos: int, sent: _Sent | None) -> Ack:
        """The ack of a QoS >= 1 message just received (``sent``: None when rejected)."""
        seq = next(self._seq)
        self._pending.append((seq, mid, qos, sent))
        return functools.partial(self._ack, seq)

    def is_resend(self, mid: int) -> bool:
        """Whether the QoS >= 1 message ``mid`` just pumped is a resend (DUP flag)."""
        if mid in self.dups:
            self.dups.discard(mid)
            return True
        self._resending = False
        self._resent = {}
        return False

    def same_id(self, mid: int, topic: str, payload: bytes, event: Event) -> None:
        """Give a resent message the id its event had on an earlier connection: the one
        remembered under its packet id, if topic and payload are the same too (a broker
        may reuse a packet id once the message that had it is acknowledged)."""
        sent = self._resent.pop(mid, None) if self._resending else None
        if sent is not None and sent[:2] == (topic, payload):
            event.id = sent[2]

    def handover(self) -> dict[int, _Sent]:
        """What the next connection may get resent, by packet id: the remembered ids no
        resend has claimed yet (while the resends had not ended), then what this connection
        acked last, then what it did not ack; a later message with a packet id wins."""
        ids = dict(self._resent) if self._resending else {}
        ids.update(self._done)
        ids.update((mid, sent) for _, mid, _, sent in self._pending if sent is not None)
        if len(ids) > 2 * _RECENT:  # connections that never ended their resends: bounded
            ids = dict(list(ids.items())[-2 * _RECENT:])
        return ids

    def _ack(self, seq: int) -> None:
        pending = self._pending
        # A seq before the oldest pending one was sent already: a second call does nothing.
        if not self.open or not pending or seq < pending[0][0]:
            return
        self._acked.add(seq)
        while pending and pending[0][0] in self._acked:
            done, mid, qos, sent = pending.popleft()
            self._acked.discard(done)
            self._client.ack(mid, qos)  # queued for the socket, written by aiomqtt's loop
            if sent is not None:
                self._done.append((mid, sent))


def _watch(inner: paho.Client, acks: _Acks) -> None:
    """Tell ``acks`` what aiomqtt does not pass on: the CONNACK's session-present flag and
    each message's DUP flag, by wrapping the paho callbacks aiomqtt installed."""
    on_connect = cast(paho.CallbackOnConnect_v2, inner.on_connect)
    on_message = cast(paho.CallbackOnMessage, inner.on_message)

    def connected(client: paho.Client, userdata: Any, flags: paho.ConnectFlags,
                  reason_code: ReasonCode, properties: Properties | None = None) -> None:
        if not reason_code.is_failure:
            acks.connected(flags.session_present)
        on_connect(client, userdata, flags, reason_code, properties)

    def received(client: paho.Client, userdata: Any, message: paho.MQTTMessage
                 ) -> None:
        if message.dup and message.qos:
            acks.dups.add(message.mid)
        on_message(client, userdata, message)

    inner.on_connect = connected
    inner.on_message = received


class MqttSource:
    """One MQTT connection subscribed to ``config.topics`` at ``config.qos`` (2 as 1), whose
    messages are acknowledged to the broker only once the engine acks them."""

    def __init__(self, config: MqttSourceConfig, *, replica: str | None = None,
                 timeout: float = 10.0) -> None:
        """``replica`` names this process (default: ``replica_name``); ``timeout`` bounds
        connect, subscribe and disconnect, each."""
        for topic in config.topics:
            try:
                aiomqtt.Wildcard(topic)
            except ValueError:
                raise ConfigError(
                    f"invalid MQTT topic filter {topic!r}", origin=f"source {config.name}"
                ) from None
        if config.password_ref is not None:
            resolve_secret(config.password_ref)  # fail at startup, not on every reconnect
        self.config = config
        self.name = config.name
        self.client_id = mqtt_client_id(config, replica_name(replica))
        prefix = f"$share/{config.shared}/" if config.shared else ""
        self.filters = [f"{prefix}{topic}" for topic in config.topics]
        self.on_assigned: OnAssigned | None = None  # never called: nothing is partitioned
        self._timeout = timeout
        self._where = f"mqtt {config.host}:{config.port}"
        self._connected = False
        self._closed = asyncio.Event()
        # The messages unacknowledged (or acked last) when the last connection that came up
        # ended. The broker resends them on the next one under the same packet ids, and each
        # gets the id its event had, so a message without an id or time of its own is still
        # recognised as decided. A connection that never came up leaves it as it is.
        self._resent: dict[int, _Sent] = {}
        self._warned_qos2 = False

    @property
    def connected(self) -> bool:
        return self._connected

    async def run(self, emit: Emit) -> None:
        """Connect, subscribe, emit until the connection is lost (raise) or close() (return)."""
        if self._closed.is_set():
            return
        # bounded: the session's own exit waits at most self._timeout to disconnect
        await until_closed(self._session(emit), self._closed, self.name)

    async def close(self) -> None:
        self._closed.set()

    async def _session(self, emit: Emit) -> None:
        cfg = self.config
        # resolved on every connect so a rotated secret file is picked up
        password = await asyncio.to_thread(resolve_secret, cfg.password_ref) \
            if cfg.password_ref else None  # a file read: off the event loop
        client = aiomqtt.Client(
            cfg.host, cfg.port, identifier=self.client_id, username=cfg.username,
            password=password, clean_session=False, keepalive=cfg.keepalive,
            timeout=self._timeout,
        )
        # Before the connect: a redelivery of an unacked message follows the CONNACK at once.
        inner: paho.Client = client._client
        inner.manual_ack_set(True)
        acks = _Acks(inner, dict(self._resent))  # a copy: kept as is if this one fails
        _watch(inner, acks)
        try:
            # connect: paho's socket connect is bounded (5 s), CONNACK by timeout
            async with client:
                qos = min(cfg.qos, 1)  # 2 as 1: see the module docstring
                filters: list[tuple[str, int]] = [(f, qos) for f in self.filters]
                granted = await client.subscribe(filters)
                self._check_granted(granted)
                self._connected = True
                metrics.source_up(self.name, True)
                try:
                    await self._pump(client, acks, emit)
                finally:
                    self._connected = False
        except aiomqtt.MqttError as exc:
            raise SourceError(f"{exc}", origin=self._where) from exc
        finally:
            acks.open = False  # what is still undecided comes again on the next connection
            if acks.session_present is not None:  # it came up: what it got supersedes
                self._resent = acks.handover()

    def _check_granted(self, granted: Sequence[int | ReasonCode]) -> None:
        # a broker without shared subscriptions refuses "$share/..." here (0x80, or 0x9E
        # "shared subscriptions not supported" in MQTT 5): named, not silently unshared
        for topic, code in zip(self.filters, granted, strict=False):
            if code >= 0x80 if isinstance(code, int) else code.is_failure:
                raise SourceError(f"broker refused subscription to {topic!r}", origin=self._where)

    async def _pump(self, client: aiomqtt.Client, acks: _Acks, emit: Emit) -> None:
        # Raises MqttError when the connection is lost; the Supervisor reconnects.
        max_payload = self.config.max_payload
        async for message in client.messages:
            topic = message.topic.value
            origin = f"mqtt {topic}"
            raw = message.payload
            payload = bytes(raw) if isinstance(raw, bytes | bytearray) else str(raw).encode()
            resend = acks.is_resend(message.mid) if message.qos else False
            try:
                data = decode_payload(payload, max_payload=max_payload, origin=origin)
                event = event_from_object(data, source=self.name, topic=topic, origin=origin)
            except EventError as exc:
                # counted and logged, never emitted; then acked, or it would come back forever
                metrics.event_rejected(self.name, exc.reason, exc, topic=topic)
                if message.qos:
                    acks.track(message.mid, message.qos, None)()
                continue
            metrics.event_received(self.name)
            if not message.qos:  # QoS 0: nothing to acknowledge
                await emit(Delivery(event))
                continue
            if message.qos == 2 and not self._warned_qos2:
                self._warn_qos2(topic)
            if resend:
                acks.same_id(message.mid, topic, payload, event)
            ack = acks.track(message.mid, message.qos, (topic, payload, event.id))
            # blocks while the engine queue is full; the broker stops at its in-flight window
            await emit(Delivery(event, ack))

    def _warn_qos2(self, topic: str) -> None:
        # The session still holds messages queued for a QoS 2 subscription (loopd asks for
        # QoS 1 since): paho sent their PUBREC on receipt, so a crash before the decision
        # loses them. Once per source: the queue drains, new messages come at QoS 1.
        self._warned_qos2 = True
        log.warning("message received at QoS 2: it is lost if loopd dies before deciding it",
                    source=self.name, topic=topic)


_KINDS = {str: "a string", list: "an array", bool: "a boolean", type(None): "null"}


def decode_payload(payload: bytes, *, max_payload: int, origin: str) -> dict[str, JSON]:
    """An MQTT payload as event data: a JSON object as it is, a bare JSON number ``N`` as
    ``{"value": N}``; anything else is a DecodeError naming ``origin`` (the topic)."""
    if len(payload) > max_payload or payload.lstrip()[:1] in (b"{", b""):
        return decode_object(payload, max_payload=max_payload, origin=origin)
    try:
        value = orjson.loads(payload)  # never NaN or infinity: orjson refuses both
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}", origin=origin) from None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"value": value}
    kind = _KINDS.get(type(value), type(value).__name__)
    raise DecodeError(f"expected a JSON object or a bare number, got {kind}", origin=origin)
