"""The publish runner and the buses it writes to (Kafka topics, MQTT topics).

A bus is named after a kafka or mqtt source (it reuses that broker's address)
or a ``sinks:`` entry of loopd.yaml for brokers loopd only writes to. Each bus
connects lazily on first use, keeps one producer/client, and reconnects once
when a publish finds the connection dead. Run outcome events are published
through the same buses (``outcomes: {bus, topic}``). An MQTT bus connects as its
source's client id with ``-pub`` added (so ``{replica}`` is in it: two replicas never
share one id, which would make the broker disconnect one of them at every connect).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from loopd.catalog.credentials import resolve_secret
from loopd.catalog.secrets import Secrets
from loopd.config import (
    KafkaSinkConfig,
    KafkaSourceConfig,
    MqttSinkConfig,
    MqttSourceConfig,
    mqtt_client_id,
)
from loopd.errors import ActionError, ConditionError
from loopd.expr.compiler import WORKFLOW_SCOPE, Compiled, compile_template
from loopd.packs.executor import ActionContext
from loopd.packs.manifest import PublishAction
from loopd.packs.registry import Action
from loopd.sources.base import replica_name

if TYPE_CHECKING:  # the client libraries load when a bus first connects
    import aiomqtt
    from aiokafka import AIOKafkaProducer

_TIMEOUT = 10.0
_SCOPE = WORKFLOW_SCOPE | {"config"}


class Bus(Protocol):
    name: str

    async def publish(self, topic: str, payload: bytes, key: str | None) -> None: ...

    async def close(self) -> None: ...


class KafkaBus:
    def __init__(self, name: str, bootstrap: str) -> None:
        self.name = name
        self.bootstrap = bootstrap
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> AIOKafkaProducer:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                            request_timeout_ms=int(_TIMEOUT * 1000))
                try:
                    async with asyncio.timeout(_TIMEOUT):
                        await producer.start()
                except (KafkaError, OSError, TimeoutError) as exc:
                    await producer.stop()
                    raise ActionError(f"kafka bus {self.name} ({self.bootstrap}): "
                                      f"cannot connect: {exc or type(exc).__name__}") from None
                except asyncio.CancelledError:
                    # the action's own timeout (or a cancelled run) interrupted the start:
                    # never leave a half-started producer behind, then let the cancel through
                    await asyncio.shield(producer.stop())
                    raise
                self._producer = producer
            return self._producer

    async def publish(self, topic: str, payload: bytes, key: str | None) -> None:
        from aiokafka.errors import KafkaError

        producer = await self._connect()
        try:
            async with asyncio.timeout(_TIMEOUT):
                await producer.send_and_wait(topic, payload,
                                             key=key.encode() if key is not None else None)
        except (KafkaError, TimeoutError) as exc:
            raise ActionError(f"kafka bus {self.name}: publish to {topic} failed: "
                              f"{exc or type(exc).__name__}") from None

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


class MqttBus:
    def __init__(self, config: MqttSourceConfig | MqttSinkConfig, replica: str) -> None:
        self.name = config.name
        self.config = config
        self.client_id = f"{mqtt_client_id(config, replica)}-pub"
        self._client: aiomqtt.Client | None = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> aiomqtt.Client:
        import aiomqtt

        async with self._lock:
            if self._client is None:
                cfg = self.config
                # a file read: off the event loop
                password = await asyncio.to_thread(resolve_secret, cfg.password_ref) \
                    if cfg.password_ref else None
                client = aiomqtt.Client(cfg.host, cfg.port, username=cfg.username,
                                        password=password, timeout=_TIMEOUT,
                                        identifier=self.client_id)
                try:
                    await client.__aenter__()
                except aiomqtt.MqttError as exc:
                    raise ActionError(f"mqtt bus {self.name} ({cfg.host}:{cfg.port}): "
                                      f"cannot connect: {exc}") from None
                self._client = client
            return self._client

    async def publish(self, topic: str, payload: bytes, key: str | None) -> None:
        import aiomqtt

        for attempt in (1, 2):
            client = await self._connect()
            try:
                await client.publish(topic, payload, qos=1, timeout=_TIMEOUT)
                return
            except ValueError as exc:  # paho refuses the topic (a wildcard, too long, empty)
                raise ActionError(f"mqtt bus {self.name}: publish to {topic!r} refused: "
                                  f"{exc}") from None
            except aiomqtt.MqttError as exc:
                await self._drop()
                if attempt == 2:
                    raise ActionError(f"mqtt bus {self.name}: publish to {topic} failed: "
                                      f"{exc}") from None

    async def _drop(self) -> None:
        import aiomqtt

        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):  # already gone
                await client.__aexit__(None, None, None)

    async def close(self) -> None:
        await self._drop()


def build_buses(configs: list[Any], *, replica: str | None = None) -> dict[str, Bus]:
    """name -> Bus for every kafka and mqtt source or sink; ``replica`` names this process
    in MQTT client ids (default: ``LOOPD_REPLICA``, else the host name)."""
    replica = replica_name(replica)
    buses: dict[str, Bus] = {}
    for cfg in configs:
        if isinstance(cfg, KafkaSourceConfig | KafkaSinkConfig):
            buses[cfg.name] = KafkaBus(cfg.name, cfg.bootstrap)
        elif isinstance(cfg, MqttSourceConfig | MqttSinkConfig):
            buses[cfg.name] = MqttBus(cfg, replica)
    return buses


def encode(payload: Any) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return orjson.dumps(payload, default=str)


class PublishRunner:
    """``runner: publish``: render topic, key and payload, send to the named bus."""

    def __init__(self, buses: dict[str, Bus]) -> None:
        self.buses = buses
        self._compiled: dict[str, tuple[Compiled, Compiled, Compiled | None]] = {}

    def _compile(self, action: Action) -> tuple[Compiled, Compiled, Compiled | None]:
        compiled = self._compiled.get(action.name)
        if compiled is None:
            spec = action.spec
            assert isinstance(spec, PublishAction)
            try:
                compiled = (compile_template(spec.topic, _SCOPE),
                            compile_template(spec.payload, _SCOPE),
                            compile_template(spec.key, _SCOPE) if spec.key else None)
            except ValueError as exc:
                raise ActionError(f"template: {exc}") from None
            self._compiled[action.name] = compiled
        return compiled

    async def run(self, action: Action, input: dict[str, Any], ctx: ActionContext
                  ) -> dict[str, Any]:
        spec = action.spec
        assert isinstance(spec, PublishAction)
        bus = self.buses.get(spec.bus)
        if bus is None:
            known = ", ".join(sorted(self.buses)) or "none configured"
            raise ActionError(f"unknown bus {spec.bus!r} (buses: {known})")
        topic_t, payload_t, key_t = self._compile(action)
        scope = {"input": input, "config": ctx.pack_config}
        try:
            topic = str(topic_t(scope))
            payload = payload_t(scope)
            key = str(key_t(scope)) if key_t is not None else None
        except ConditionError as exc:
            raise ActionError(f"template: {exc}") from None
        data = encode(payload)
        # a secret input rendered into the topic or key must not show in the result or error
        hidden = Secrets(input.get(k) for k in action.secret_inputs)
        try:
            await bus.publish(topic, data, key)
        except ActionError as exc:
            raise ActionError(hidden.text(str(exc))) from None
        result: dict[str, Any] = hidden.tree(
            {"bus": spec.bus, "topic": topic, "key": key, "bytes": len(data)})
        return result

    async def close(self) -> None:
        for bus in self.buses.values():
            await bus.close()
