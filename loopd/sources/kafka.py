"""KafkaSource: a consumer group whose offsets follow the engine's acknowledgements.

Each record becomes one Delivery (one object: ``_Record``); the records of one fetch
of a partition share one ``_Chunk`` of offsets. Offsets are committed by loopd, never by
aiokafka: per partition, the commit point is the offset after the longest run
of acknowledged records from the start of what this consumer was handed, so a
slow decision on one record holds back the commit (not the stream) and a
crash redelivers it. Commits happen every ``commit_interval``, before
partitions are revoked in a rebalance, and on close.

``run`` returns or raises when the broker is unreachable (commit or metadata
probe fails or times out); the supervisor then builds a new consumer, which
resumes from the committed offsets. Acknowledgements for records of an older
consumer or of a revoked partition are ignored: those records are redelivered.

Several replicas share one consumer group (``group``), so each partition, and each
entity key (records are keyed by entity), is consumed by one replica at a time. When a
rebalance revokes partitions, what is acked on them is committed first and the rest of
their bookkeeping dropped; their unacked records go to the new owner, whose store
recognises a record this replica had already decided. When it assigns partitions this
consumer did not own just before, ``on_assigned`` is awaited before any record of them
is emitted: the engine rebuilds its caches for the keys that moved. With
``group_instance_id`` (static membership, KIP-345, ``{replica}`` expanded) a restarted
replica rejoins as the same member: the group waits up to ``session_timeout`` for it
instead of rebalancing at once, and stopping sends no LeaveGroup (its partitions move
only once the session expires). tansu 0.6 takes static members but mishandles the rejoin
of one (the group then rebalances every few seconds): leave it off there.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)

from loopd import metrics
from loopd.config import KafkaSourceConfig, expand_replica
from loopd.errors import EventError, SourceError
from loopd.events import (
    NONE,
    Delivery,
    Event,
    OwnAck,
    decode_object,
    event_from_object,
    shallow_bytes,
)
from loopd.sources.base import Emit, OnAssigned, offer_of, replica_name

log = structlog.get_logger("loopd.kafka")

# Every broker call is bounded by ``config.request_timeout``; asyncio.timeout, not wait_for,
# which can swallow a cancellation on Python 3.11 and leave a loop running after close.
# Every ``config.probe_interval`` run checks that the broker still answers (an all-topics
# metadata request: cheap on loopd-sized clusters, and it fails at once when it is gone).
_MAX_RECORDS = 500
# room for the dead-letter headers and the record batch framing around the value
_HEADER_ROOM = 64 * 1024
# the value kept in a dead letter whose record is too large to be sent whole
_TRUNCATED = 1024
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)
# on_assigned rebuilds caches from the store; the group waits for it (the consumer sends
# heartbeats meanwhile), so it may take long, but not forever
_ASSIGN_TIMEOUT = 120.0


class _Chunk:
    """The offsets of one fetch of one partition, in order, and how many of them from the
    start are acked (``done``); those acked ahead of an unacked one wait in ``early``."""

    __slots__ = ("done", "early", "offsets", "part")

    def __init__(self, part: _Partition, offsets: list[int]) -> None:
        self.part = part
        self.offsets = offsets
        self.done = 0
        self.early: set[int] | None = None

    def ack(self, offset: int) -> None:
        offsets, done = self.offsets, self.done
        if done < len(offsets) and offsets[done] == offset:  # the common case: in order
            done += 1
            early = self.early
            while early and done < len(offsets) and offsets[done] in early:
                early.discard(offsets[done])
                done += 1
            self.done = done
            if self.part.pending[0] is self:
                self.part.moved()
        elif done < len(offsets) and offset > offsets[done]:
            if self.early is None:
                self.early = set()
            self.early.add(offset)
        # else: acked already (a duplicate ack)


class _Partition:
    """Chunks handed out on one partition, in order: the commit point is the offset after
    the longest acked run from the start of the oldest chunk not fully acked."""

    __slots__ = ("commit_at", "committed", "pending")

    def __init__(self) -> None:
        self.pending: deque[_Chunk] = deque()
        self.commit_at: int | None = None
        self.committed: int | None = None

    def chunk(self, offsets: list[int]) -> _Chunk:
        chunk = _Chunk(self, offsets)
        self.pending.append(chunk)
        return chunk

    def moved(self) -> None:
        pending = self.pending
        while pending:
            chunk = pending[0]
            if not chunk.done:
                return
            # offsets may have gaps (compaction, txn markers): the one after the last acked
            self.commit_at = chunk.offsets[chunk.done - 1] + 1
            if chunk.done < len(chunk.offsets):
                return
            pending.popleft()


class _Record(OwnAck):
    """A Kafka record's delivery: the one object made per record; ``ack()`` acks its
    offset in its chunk (no closure or ``functools.partial`` per record)."""

    __slots__ = ("_chunk", "_offset")

    def __init__(self, event: Event, chunk: _Chunk, offset: int) -> None:
        super().__init__(event)
        self._chunk = chunk
        self._offset = offset

    def _ack(self) -> None:
        self._chunk.ack(self._offset)


class _Session:
    """State of one consumer connection; dropped whole when ``run`` ends.

    ``ready`` holds the partitions of the current assignment whose records may be emitted
    (``on_assigned`` has returned for them); ``settled`` is set once an assignment is
    ready and cleared at every revoke. aiokafka installs an assignment, and may fetch for
    it, before it calls the listener, so ``_consume`` waits on these, not on the fetch.
    """

    def __init__(self, source: str, consumer: AIOKafkaConsumer, timeout: float,
                 on_assigned: Callable[[], OnAssigned | None]) -> None:
        self.source = source
        self.timeout = timeout
        self.consumer = consumer
        self.on_assigned = on_assigned  # read at each assignment: the source's hook now
        self.partitions: dict[TopicPartition, _Partition] = {}
        self.commit_lock = asyncio.Lock()
        self.generation = 0  # bumped at every revoke: records fetched before it are stale
        self.ready: set[TopicPartition] = set()
        self.revoked: set[TopicPartition] = set()  # the assignment just before this one
        self.settled = asyncio.Event()
        self.failed: SourceError | None = None  # on_assigned raised: the session is over

    def track(self, tp: TopicPartition, records: list[Any]) -> _Chunk:
        """The chunk of ``records`` (one fetch of ``tp``, in offset order)."""
        part = self.partitions.get(tp)
        if part is None:
            part = self.partitions[tp] = _Partition()
        return part.chunk([r.offset for r in records])

    async def commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        """Commit every partition whose contiguous acked prefix moved; bounded in time."""
        try:
            async with asyncio.timeout(self.timeout), self.commit_lock:
                tps = self.partitions.keys() if only is None else only
                due = {
                    tp: p.commit_at for tp in tps
                    if (p := self.partitions.get(tp)) is not None
                    and p.commit_at is not None and p.commit_at != p.committed
                }
                if not due:
                    return
                await self.consumer.commit(due)
                for tp, offset in due.items():
                    if (p := self.partitions.get(tp)) is not None:
                        p.committed = offset
        except (CommitFailedError, IllegalStateError) as exc:
            # the group rebalanced under us: the partitions are revoked (the listener
            # drops them) and their records come again to whoever owns them now
            log.warning("commit skipped, group rebalanced", source=self.source, error=str(exc))
        except (KafkaError, TimeoutError) as exc:
            raise SourceError(f"commit failed: {exc or type(exc).__name__}") from exc


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits and forgets revoked partitions; runs ``on_assigned`` for new ones.

    aiokafka awaits these in its group coordinator task (concurrently with ``_consume``,
    whose records of revoked partitions may still be in the engine's queue) and swallows
    what they raise, so they raise nothing: a failed hook is kept on the session for
    ``_consume`` to raise.
    """

    def __init__(self, session: _Session) -> None:
        self._session = session

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        session = self._session
        session.settled.clear()  # nothing of the next assignment is emitted before it is set
        session.ready.clear()
        # commit what is decided before another member takes these partitions over
        try:
            await session.commit(revoked)
        except SourceError as exc:
            log.warning("commit on revoke failed", source=session.source, error=str(exc))
        session.generation += 1
        session.revoked = set(revoked)
        for tp in revoked:
            session.partitions.pop(tp, None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        session = self._session
        moved = assigned - session.revoked
        hook = session.on_assigned()
        if moved and hook is not None:
            started = time.monotonic()
            try:
                async with asyncio.timeout(_ASSIGN_TIMEOUT):
                    await hook()
            except Exception as exc:  # supervised boundary: the session ends, run() reports
                failed = SourceError(
                    f"on_assigned failed for {len(moved)} new partition(s): "
                    f"{type(exc).__name__}: {exc}", origin=f"kafka group {session.source}")
                failed.__cause__ = exc
                session.failed = failed
                session.settled.set()  # wakes _consume, which raises it
                return
            log.info("partitions assigned, caches rebuilt", source=session.source,
                     partitions=sorted(f"{tp.topic}[{tp.partition}]" for tp in moved),
                     seconds=round(time.monotonic() - started, 3))
        session.ready = set(assigned)
        session.settled.set()


class KafkaSource:
    """Consumes ``config.topics`` in consumer group ``config.group``; see the module doc.

    ``session_timeout`` is the group session: how long the group waits for a silent
    member before its partitions move (some brokers also hold each join that long).
    """

    def __init__(self, config: KafkaSourceConfig, *, replica: str | None = None,
                 session_timeout: float | None = None) -> None:
        """``replica`` names this process in ``group_instance_id`` (default:
        ``replica_name``); ``session_timeout`` overrides the config's."""
        self.name = config.name
        self.config = config
        self.on_assigned: OnAssigned | None = None
        self.group_instance_id = (
            expand_replica(config.group_instance_id, replica_name(replica))
            if config.group_instance_id is not None else None
        )
        timeout = config.session_timeout if session_timeout is None else session_timeout
        self._session_timeout_ms = int(timeout * 1000)
        self._connected = False
        self._closing = asyncio.Event()
        self._finished: asyncio.Event | None = None
        self._session: _Session | None = None
        self._timeout = config.request_timeout
        # the dead-letter producer carries a record up to max_payload whole, with headers
        self._max_request = max(1024 * 1024, config.max_payload + _HEADER_ROOM)
        self._max_payload = config.max_payload

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions whose records this source emits now: the group's current
        assignment once ``on_assigned`` has run for it, empty during a rebalance."""
        session = self._session
        return frozenset(session.ready) if session is not None else frozenset()

    async def run(self, emit: Emit) -> None:
        if self._closing.is_set():
            return
        cfg = self.config
        consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.bootstrap, group_id=cfg.group, enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset, session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=max(100, self._session_timeout_ms // 3),
            group_instance_id=self.group_instance_id,
            # aiokafka's default, 50 MiB, let one response of a backlog (and the buffer it
            # was read into, and its records) hold 15 MB of a 140 MB daemon
            fetch_max_bytes=cfg.fetch_max_bytes,
            max_partition_fetch_bytes=min(cfg.fetch_max_bytes, 1024 * 1024),
        )
        producer = (
            AIOKafkaProducer(bootstrap_servers=cfg.bootstrap, max_request_size=self._max_request)
            if cfg.dead_letter_topic else None
        )
        session = _Session(self.name, consumer, self._timeout, lambda: self.on_assigned)
        self._session = session
        self._finished = finished = asyncio.Event()
        lost = False
        try:
            try:
                # start() only bootstraps; the group join runs in the background once subscribed
                async with asyncio.timeout(self._timeout):
                    await consumer.start()
                    if producer is not None:
                        await producer.start()
            except (KafkaError, TimeoutError, OSError) as exc:
                lost = True
                raise SourceError(f"cannot connect: {exc or type(exc).__name__}",
                                  origin=f"kafka {cfg.bootstrap}") from exc
            consumer.subscribe(cfg.topics, listener=_Rebalance(session))
            self._connected = True
            metrics.source_up(self.name, True)
            await self._until_first_done(
                self._consume(session, producer, emit), self._watch(session)
            )
        except SourceError:
            lost = True
            raise
        finally:
            self._connected = False
            session.ready.clear()
            try:
                if not lost:  # flush what was decided; pointless against a dead broker
                    await session.commit()
            except SourceError as exc:
                log.warning("final commit failed", source=self.name, error=str(exc))
            finally:
                await self._stop(consumer, producer)
                finished.set()

    async def close(self) -> None:
        """Make ``run`` return, after it committed and stopped its clients."""
        self._closing.set()
        if self._finished is None:
            return
        try:
            # run's teardown is a bounded commit and two bounded stops
            async with asyncio.timeout(4 * self._timeout):
                await self._finished.wait()
        except TimeoutError:
            log.warning("source did not stop in time", source=self.name)

    async def _until_first_done(self, *work: Any) -> None:
        """Run the coroutines and ``close``; return at the first to finish, re-raising its error."""
        tasks = [asyncio.create_task(w) for w in (*work, self._closing.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc

    async def _consume(
        self, session: _Session, producer: AIOKafkaProducer | None, emit: Emit
    ) -> None:
        name, offer = self.name, offer_of(emit)
        while True:
            # no timeout needed: getmany returns after timeout_ms with whatever it has
            batches = await session.consumer.getmany(timeout_ms=500, max_records=_MAX_RECORDS)
            generation = session.generation
            for tp, records in batches.items():
                if not records or not await self._ready(session, tp, generation):
                    continue  # fetched for an assignment that is gone: refetched if ours
                chunk = session.track(tp, records)
                deliveries: list[Delivery] = []
                for record in records:
                    event = self._decode(record)
                    if isinstance(event, Event):
                        deliveries.append(_Record(event, chunk, record.offset))
                        continue
                    metrics.event_rejected(name, event.reason, event, topic=record.topic,
                                           partition=record.partition, offset=record.offset)
                    if producer is not None:
                        await self._dead_letter(producer, record, event)
                    chunk.ack(record.offset)  # rejected (and dead-lettered): nothing to decide
                handed = 0
                while handed < len(deliveries):
                    if session.generation != generation:
                        break  # a rebalance while we emitted: the owner refetches from the commit
                    if offer is not None:  # what fits, at once
                        n = offer(deliveries, handed)
                        if n:
                            # counted as handed over (a blocked emit shows as nothing more
                            # received)
                            metrics.event_received(name, n)
                            handed += n
                            continue
                    metrics.event_received(name)
                    # blocks while the engine's queue is full: that is the backpressure
                    await emit(deliveries[handed])
                    handed += 1
            # aiokafka hands out buffered records without suspending: yield once per fetch,
            # so runs ending and the engine's writer never wait for a backlog to drain
            await asyncio.sleep(0)

    @staticmethod
    async def _ready(session: _Session, tp: TopicPartition, generation: int) -> bool:
        """Whether records of ``tp`` fetched at ``generation`` may be emitted, once the
        assignment's ``on_assigned`` has run; raise if it failed."""
        # no timeout: the listener's hook is bounded, and a revoke clears and re-sets it
        await session.settled.wait()
        if session.failed is not None:
            raise session.failed
        return session.generation == generation and tp in session.ready

    def _decode(self, record: Any) -> Event | EventError:
        """The record's event, or why it cannot be one (synchronous: most records need
        no await, and a coroutine per record was a measurable part of its cost).

        The common record, a JSON object that is the event's data itself (no envelope),
        small and shallow enough, is built here in one step: the same Event as
        ``_decode_any`` makes of it, without its checks and calls (a quarter of the
        consumer's time went to decoding). Anything else goes the general way."""
        payload: bytes = record.value or b""
        if len(payload) <= self._max_payload and shallow_bytes(payload):
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return self._decode_any(record)  # which says why
            if type(obj) is dict and type(obj.get("data")) is not dict:
                topic, partition, offset = record.topic, record.partition, record.offset
                key, stamp, headers = record.key, record.timestamp, record.headers
                return Event(
                    f"{topic}:{partition}:{offset}", self.name, topic, obj,
                    key.decode(errors="replace") if key is not None else None,
                    stamp / 1000.0 if stamp is not None and stamp >= 0 else time.time(),
                    {k: v.decode(errors="replace") for k, v in headers if v is not None}
                    if headers else NONE,
                    NONE, f"kafka {topic}[{partition}]@{offset}")
        return self._decode_any(record)

    def _decode_any(self, record: Any) -> Event | EventError:
        """``_decode`` of any record: an envelope, a payload too large or too deep, bytes
        that are no JSON object."""
        topic, partition, offset = record.topic, record.partition, record.offset
        origin = f"kafka {topic}[{partition}]@{offset}"
        payload: bytes = record.value or b""
        try:
            obj = decode_object(payload, max_payload=self.config.max_payload, origin=origin)
            event = event_from_object(
                obj, source=self.name, topic=topic, origin=origin,
                default_id=f"{topic}:{partition}:{offset}",
                default_key=record.key.decode(errors="replace") if record.key is not None else None,
                shallow=shallow_bytes(payload),
            )
        except EventError as exc:
            return exc
        envelope_time = isinstance(obj.get("data"), dict) and obj.get("time") is not None
        if not envelope_time and record.timestamp is not None and record.timestamp >= 0:
            event.time = record.timestamp / 1000.0
        if record.headers:
            kafka = {k: v.decode(errors="replace") for k, v in record.headers if v is not None}
            event.headers = {**kafka, **event.headers}
        return event

    async def _dead_letter(self, producer: AIOKafkaProducer, record: Any, exc: EventError) -> None:
        """Send the original bytes with why and where they failed; ack only once it is stored.

        A record too large to be sent whole (over ``max_payload`` and the producer's request
        size, or refused by the broker) is dead-lettered as its metadata: the headers, its
        size, and the first ``_TRUNCATED`` bytes of its value, so it never blocks its partition.
        """
        value: bytes = record.value or b""
        headers = [*(record.headers or ()), *(
            (k, v.encode()) for k, v in (
                ("loopd-error", str(exc)), ("loopd-topic", record.topic),
                ("loopd-partition", str(record.partition)), ("loopd-offset", str(record.offset)),
                ("loopd-source", self.name), ("loopd-size", str(len(value))),
            )
        )]
        whole = len(value) + sum(len(k) + len(v or b"") for k, v in headers) + len(
            record.key or b"") < self._max_request - _HEADER_ROOM // 2
        if whole:
            try:
                await self._send(producer, value, record.key, headers)
                return
            except _TOO_LARGE as too_large:
                log.warning("dead letter refused whole, sending its metadata", source=self.name,
                            topic=record.topic, partition=record.partition,
                            offset=record.offset, size=len(value), error=str(too_large))
        own = [(k, v) for k, v in headers if k.startswith("loopd-")]
        await self._send(producer, value[:_TRUNCATED], record.key,
                         [*own, ("loopd-truncated", b"true")])

    async def _send(self, producer: AIOKafkaProducer, value: bytes, key: bytes | None,
                    headers: list[tuple[str, bytes]]) -> None:
        topic = self.config.dead_letter_topic
        try:
            async with asyncio.timeout(self._timeout):
                await producer.send_and_wait(topic, value, key=key, headers=headers)
        except _TOO_LARGE:
            raise
        except (KafkaError, TimeoutError) as exc2:
            # not acked: after the reconnect the record comes again and is retried
            raise SourceError(f"dead-letter send failed: {exc2 or type(exc2).__name__}",
                              origin=f"kafka {topic}") from exc2

    async def _watch(self, session: _Session) -> None:
        """Commit every ``commit_interval``; raise SourceError once the broker stops answering."""
        interval = self.config.commit_interval
        probe = self.config.probe_interval
        last_commit = last_probe = time.monotonic()
        while True:
            await asyncio.sleep(max(0.05, min(interval, probe)))
            now = time.monotonic()
            if now - last_commit >= interval:
                last_commit = now
                await session.commit()
            if now - last_probe >= probe:
                last_probe = now
                try:
                    # a metadata request: aiokafka itself reconnects forever and never says
                    async with asyncio.timeout(self._timeout):
                        await session.consumer.topics()
                except (KafkaError, TimeoutError) as exc:
                    raise SourceError(f"broker unreachable: {exc or type(exc).__name__}",
                                      origin=f"kafka {self.config.bootstrap}") from exc

    async def _stop(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer | None) -> None:
        for client in (consumer, producer):
            if client is None:
                continue
            try:
                async with asyncio.timeout(self._timeout):
                    await client.stop()
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                # after a long outage aiokafka's fetcher lets its own cancellation out of
                # stop(): not ours, so stop the other client too and report it as lost
                log.warning("client stop failed", source=self.name,
                            error=f"stray {type(exc).__name__} from the client")
            except (KafkaError, TimeoutError, OSError) as exc:
                log.warning("client stop failed", source=self.name, error=str(exc))
