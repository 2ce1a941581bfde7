"""MQTT test broker: mosquitto on a free loopback port, or amqtt when mosquitto is missing.

``mqtt_broker`` is function-scoped: each test gets its own broker (and its own
persistent sessions), which it may ``stop()`` and ``start()`` again on the same
port. mosquitto keeps sessions and queued QoS 1 messages on disk across a
restart (``persistent`` is true); the amqtt fallback keeps them in memory only,
and only for clients that send a username (amqtt never queues for anonymous
sessions), so clients should connect with ``broker.username``; any password.
Set ``LOOPD_TEST_MQTT_BROKER=amqtt`` to use the fallback even when mosquitto is
installed. The system mosquitto on 1883 is never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, require, wait_port

_MOSQUITTO_PLACES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """mosquitto on PATH, or in sbin (often not on a non-root PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in _MOSQUITTO_PLACES if os.access(p, os.X_OK)), None)


def find_amqtt() -> str | None:
    script = Path(sys.executable).parent / "amqtt"
    return str(script) if os.access(script, os.X_OK) else shutil.which("amqtt")


class MqttBroker:
    """A broker subprocess on ``host:port`` with its config and data in ``workdir``."""

    def __init__(self, workdir: Path, *, mosquitto: str | None, amqtt: str | None) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.username = "loopd-test"  # accepted without a password by both brokers
        self.workdir = workdir
        self.log_path = workdir / "broker.log"
        self._proc: subprocess.Popen[bytes] | None = None
        if mosquitto:
            self.kind, self.persistent = "mosquitto", True
            self._argv = [mosquitto, "-c", str(self._mosquitto_conf())]
        elif amqtt:
            self.kind, self.persistent = "amqtt", False
            self._argv = [amqtt, "-c", str(self._amqtt_conf())]
        else:
            raise RuntimeError("no MQTT broker available")

    def _mosquitto_conf(self) -> Path:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {data}/\n"
            # as root mosquitto would switch to user "mosquitto", which cannot write data/
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            f"log_dest file {self.log_path}\n"
            "log_type all\n"
            "max_queued_messages 10000\n"
        )
        return conf

    def _amqtt_conf(self) -> Path:
        conf = self.workdir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n"
            # "anonymous" would accept everyone but make every session non-persistent
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: false\n"
        )
        return conf

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start (or restart) the broker on the same port; return once it listens."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        try:
            wait_port(self.port, timeout=20.0)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.kind} did not start:\n{self.log_tail()}") from None

    def stop(self) -> None:
        """Stop gracefully (mosquitto saves its sessions to disk on SIGTERM)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no broker log)"


class LinkProxy:
    """A TCP proxy on loopback in front of a broker, to break the link the way a network
    does: ``cut()`` aborts every connection (a blip), ``refuse`` closes each new one before
    it reaches the broker (an outage that fails reconnect attempts), and ``swallow`` drops
    what the client sends (so acknowledgements written just before a cut are lost)."""

    def __init__(self, broker: MqttBroker) -> None:
        self.host = broker.host
        self.port = 0
        self.refuse = False
        self.swallow = False
        self.refused = 0  # connections closed by ``refuse``
        self.swallowed = 0  # bytes dropped by ``swallow``
        self._broker = broker
        self._server: asyncio.Server | None = None
        self._links: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        for writer in self._links:
            writer.transport.abort()
        self._links.clear()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
                    ) -> None:
        if self.refuse:
            self.refused += 1
            client_w.transport.abort()
            return
        broker_r, broker_w = await asyncio.open_connection(self._broker.host, self._broker.port)
        self._links += [client_w, broker_w]
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(self._pipe(client_r, broker_w, up=True),
                                 self._pipe(broker_r, client_w, up=False))
        finally:
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    up: bool) -> None:
        try:
            while data := await reader.read(65536):
                if up and self.swallow:
                    self.swallowed += len(data)
                    continue
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # cut
        finally:
            writer.transport.abort()


@contextlib.asynccontextmanager
async def link_proxy(broker: MqttBroker) -> AsyncIterator[LinkProxy]:
    """A LinkProxy to ``broker``, listening on a free loopback port until the block ends."""
    proxy = LinkProxy(broker)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


@pytest.fixture
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MqttBroker]:
    """A fresh MQTT broker on a free loopback port, stopped after the test."""
    forced = os.environ.get("LOOPD_TEST_MQTT_BROKER", "")
    mosquitto = None if forced == "amqtt" else find_mosquitto()
    amqtt = find_amqtt()
    require(bool(mosquitto or amqtt), "MQTT broker (mosquitto or amqtt)")
    broker = MqttBroker(tmp_path_factory.mktemp("mqtt"), mosquitto=mosquitto, amqtt=amqtt)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
