"""The Runner contract (loopd/packs/executor.py), checked the same way against every runner:
python (a pack's actions.py), ssh (tests/servers/ssh.py), http (tests/servers/http_targets.py)
and publish, once over a Kafka bus (tansu, tests/servers/kafka.py) and once over an MQTT bus
(tests/servers/mqtt.py), its buses built from sink configs by ``build_buses``.

Each runner gets a pack ``c`` with the same four actions, written in its own terms:

* ``ok``: succeeds and returns something built from its ``value`` input;
* ``fail``: fails (the target refuses);
* ``slow``: never finishes within its 300 ms timeout;
* ``secret``: authenticates with the inventory's credentials ``svc`` (and, for ssh and
  publish, a ``secret: true`` input); with ``fail: true`` it is refused.

For publish, "the target refuses" is a bus whose broker is not listening, "never finishes"
a bus whose broker accepts the connection and never answers, the credential is the MQTT
bus's password (Kafka buses have none), and ``secret`` refused is a message the client
refuses to send (an MQTT topic with a wildcard, a Kafka record over the size limit).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from loopd.catalog.credentials import Credentials
from loopd.catalog.inventory import Inventory
from loopd.config import KafkaSinkConfig, MqttSinkConfig
from loopd.errors import ActionError
from loopd.packs.executor import ActionContext, ActionResult, Executor, Runner
from loopd.packs.http import HttpRunner
from loopd.packs.publish import PublishRunner, build_buses
from loopd.packs.python import PythonRunner
from loopd.packs.registry import PackRegistry
from loopd.packs.ssh import SshRunner
from tests.servers import free_port, wait_until
from tests.servers.http_targets import HttpEcho
from tests.servers.kafka import KafkaBroker, create_topic, read_topic
from tests.servers.mqtt import MqttBroker
from tests.servers.ssh import PASSWORD, USER, SshServer

VALUE = "contract-value-42"
TOKEN = "input-token-0123456789"  # the value behind a `secret: true` input
TOKEN_REF = "env:CONTRACT_SECRET_INPUT"  # what the input is given: a reference

PYTHON_PACK = """
name: c
actions:
  ok: {runner: python, input: {value: {required: true}}}
  fail: {runner: python, input: {value: {required: true}}}
  slow: {runner: python, timeout: 300ms}
  secret: {runner: python, input: {fail: {type: boolean, default: false}}}
"""

PYTHON_ACTIONS = '''
import asyncio

from loopd.config import KafkaSinkConfig, MqttSinkConfig
from loopd.errors import ActionError


async def ok(input, ctx):
    return {"value": input["value"], "count": 1, "ratio": 0.5, "tags": ["a", None, True]}


async def fail(input, ctx):
    raise ActionError(f"the target refused {input['value']}")


async def slow(input, ctx):
    await asyncio.sleep(30)


async def secret(input, ctx):
    creds = ctx.credentials("svc")
    if input["fail"]:
        raise ActionError(f"login refused for {creds!r}")
    return {"user": creds.username, "as": repr(creds)}
'''

SSH_PACK = """
name: c
actions:
  ok:
    runner: ssh
    input: {host: {required: true}, value: {required: true}}
    command: "echo {{ input.value }}"
  fail:
    runner: ssh
    input: {host: {required: true}, value: {required: true}}
    command: "exit 3 {{ input.value }}"
  slow:
    runner: ssh
    input: {host: {required: true}}
    command: sleep 30
    timeout: 300ms
  secret:
    runner: ssh
    input:
      host: {required: true}
      token: {required: true, secret: true}
      fail: {type: boolean, default: false}
    command: "exit {{ 4 if raw.fail else 0 }} {{ input.token }}"
"""

HTTP_PACK = """
name: c
config: {url: {type: string, required: true}}
actions:
  ok:
    runner: http
    method: POST
    url: "{{ config.url }}/echo"
    input: {value: {required: true}}
    json: {value: "{{ input.value }}"}
  fail:
    runner: http
    url: "{{ config.url }}/status/409"
    input: {value: {required: true}}
    query: {value: "{{ input.value }}"}
  slow:
    runner: http
    url: "{{ config.url }}/echo"
    timeout: 300ms
  secret:
    runner: http
    url: "{{ config.url }}/bearer"
    input: {fail: {type: boolean, default: false}}
    auth: {type: bearer, credentials: "{{ 'svc_wrong' if input.fail else 'svc' }}"}
"""

PUBLISH_PACK = """
name: c
config: {prefix: {type: string, required: true}}
actions:
  ok:
    runner: publish
    bus: main
    topic: "{{ config.prefix }}SEP{{ input.value }}"
    key: "{{ input.value }}"
    input: {value: {required: true}}
    payload: {value: "{{ input.value }}"}
  fail:
    runner: publish
    bus: down
    topic: "{{ config.prefix }}SEPfail"
    input: {value: {required: true}}
    payload: {value: "{{ input.value }}"}
  slow:
    runner: publish
    bus: hang
    topic: "{{ config.prefix }}SEPslow"
    timeout: 300ms
    payload: {}
  secret:
    runner: publish
    bus: main
    topic: "{{ config.prefix }}SEP{{ REFUSED if input.fail else 'secret' }}"
    key: "{{ input.token }}"
    input:
      token: {required: true, secret: true}
      fail: {type: boolean, default: false}
    payload: "{{ input.token * OVERSIZE if input.fail else input.token }}"
"""


@dataclass
class Kit:
    """One runner, its pack ``c``, and what the contract checks need to know about it."""

    name: str
    runner: Runner
    registry: PackRegistry
    inventory: Inventory
    secrets: tuple[str, ...]          # must never show in a result or an error
    fail_cause: str                   # part of the failure's message that names the cause
    base: dict[str, Any] = field(default_factory=dict)  # input every action takes (host)
    secret_input: dict[str, Any] = field(default_factory=dict)  # what `secret` also takes
    before_slow: Callable[[], None] = lambda: None
    received: Callable[[str], Any] | None = None  # publish: awaits the message on a topic

    async def execute(self, action: str, **input: Any) -> ActionResult:
        runner = self.name.partition("-")[0]  # publish-kafka and publish-mqtt: publish
        executor = Executor(self.registry, {runner: self.runner})
        return await executor.execute(f"c.{action}", {**self.base, **input},
                                      ActionContext("run-1", "task", self.inventory))


def pack(tmp_path: Path, manifest: str, actions: str | None = None,
         config: dict[str, Any] | None = None) -> PackRegistry:
    folder = tmp_path / "packs" / "c"
    folder.mkdir(parents=True)
    (folder / "pack.yaml").write_text(manifest)
    if actions is not None:
        (folder / "actions.py").write_text(actions)
    registry = PackRegistry.load([tmp_path / "packs"], {"c": config} if config else None)
    assert registry.errors == [], [str(e) for e in registry.errors]
    return registry


@pytest.fixture(autouse=True)
def secret_input_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTRACT_SECRET_INPUT", TOKEN)


@pytest.fixture
async def python_kit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Kit]:
    secret = "python-pw-0123456789"
    monkeypatch.setenv("CONTRACT_PW", secret)
    inventory = Inventory(credentials={
        "svc": Credentials(username="loopd", password="env:CONTRACT_PW")})
    runner = PythonRunner()
    yield Kit("python", runner, pack(tmp_path, PYTHON_PACK, PYTHON_ACTIONS), inventory,
              (secret,), "the target refused contract-value-42")
    await runner.close()


@pytest.fixture
async def ssh_kit(tmp_path: Path, ssh_server: SshServer, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[Kit]:
    monkeypatch.setenv("CONTRACT_PW", PASSWORD)
    inventory = Inventory({"web-1": ssh_server.entity(credentials="svc")},
                          {"svc": Credentials(username=USER, password="env:CONTRACT_PW")})
    runner = SshRunner(connect_timeout=5.0)
    yield Kit("ssh", runner, pack(tmp_path, SSH_PACK), inventory, (PASSWORD, TOKEN),
              f"ssh web-1: `exit 3 {VALUE}` exited 3", base={"host": "web-1"},
              secret_input={"token": TOKEN_REF})
    await runner.close()


@pytest.fixture
async def http_kit(tmp_path: Path, http_echo: HttpEcho, monkeypatch: pytest.MonkeyPatch
                   ) -> AsyncIterator[Kit]:
    wrong = "wrong-token-9876543210"
    monkeypatch.setenv("CONTRACT_TOKEN", http_echo.token)
    monkeypatch.setenv("CONTRACT_WRONG", wrong)
    inventory = Inventory(credentials={"svc": Credentials(token="env:CONTRACT_TOKEN"),
                                       "svc_wrong": Credentials(token="env:CONTRACT_WRONG")})
    runner = HttpRunner(backoff=0.001)
    yield Kit("http", runner, pack(tmp_path, HTTP_PACK, config={"url": http_echo.url}),
              inventory, (http_echo.token, wrong),
              f"http GET {http_echo.url}/status/409: unexpected status 409 Conflict",
              before_slow=http_echo.hang_next)
    await runner.close()


@pytest.fixture
async def silent_broker() -> AsyncIterator[int]:
    """A port that accepts connections and never answers (a hung broker)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the client gives up

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


def publish_pack(tmp_path: Path, sep: str, refused: str, oversize: int, prefix: str
                 ) -> PackRegistry:
    manifest = PUBLISH_PACK.replace("SEP", sep).replace("REFUSED", repr(refused)).replace(
        "OVERSIZE", str(oversize))
    return pack(tmp_path, manifest, config={"prefix": prefix})


@pytest.fixture
async def kafka_kit(tmp_path: Path, kafka_broker: KafkaBroker, silent_broker: int
                    ) -> AsyncIterator[Kit]:
    prefix = f"c-{uuid.uuid4().hex[:8]}"
    for topic in (f"{prefix}-{VALUE}", f"{prefix}-secret"):
        await create_topic(kafka_broker.bootstrap, topic)
    down = free_port()
    runner = PublishRunner(build_buses([
        KafkaSinkConfig(type="kafka", name="main", bootstrap=kafka_broker.bootstrap),
        KafkaSinkConfig(type="kafka", name="down", bootstrap=f"127.0.0.1:{down}"),
        KafkaSinkConfig(type="kafka", name="hang", bootstrap=f"127.0.0.1:{silent_broker}"),
    ]))

    async def received(topic: str) -> Any:
        return (await read_topic(kafka_broker.bootstrap, topic, 1))[0].value

    # a record over aiokafka's max_request_size (1 MiB) is refused before it is sent
    yield Kit("publish-kafka", runner,
              publish_pack(tmp_path, "-", "secret", 100_000, prefix), Inventory(),
              (TOKEN,), f"kafka bus down (127.0.0.1:{down}): cannot connect",
              secret_input={"token": TOKEN_REF}, received=received)
    await runner.close()


@pytest.fixture
async def mqtt_kit(tmp_path: Path, mqtt_broker: MqttBroker, silent_broker: int,
                   monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Kit]:
    secret = "mqtt-pw-0123456789"
    monkeypatch.setenv("CONTRACT_PW", secret)
    prefix = f"c-{uuid.uuid4().hex[:8]}"
    down = free_port()
    bus = {"type": "mqtt", "host": mqtt_broker.host, "username": mqtt_broker.username,
           "password_ref": "env:CONTRACT_PW"}
    runner = PublishRunner(build_buses([
        MqttSinkConfig.model_validate({**bus, "name": "main", "port": mqtt_broker.port}),
        MqttSinkConfig.model_validate({**bus, "name": "down", "port": down}),
        MqttSinkConfig.model_validate({**bus, "name": "hang", "port": silent_broker}),
    ]))
    subscriber = aiomqtt.Client(mqtt_broker.host, mqtt_broker.port,
                                identifier=f"sub-{prefix}", username=mqtt_broker.username)
    await subscriber.__aenter__()
    await subscriber.subscribe(f"{prefix}/#", qos=1)
    got: dict[str, bytes] = {}

    async def collect() -> None:
        async for message in subscriber.messages:
            assert isinstance(message.payload, bytes)
            got[message.topic.value] = message.payload

    collecting = asyncio.create_task(collect())

    async def received(topic: str) -> Any:
        await wait_until(lambda: topic in got, what=f"a message on {topic}")
        return got[topic]

    yield Kit("publish-mqtt", runner,
              publish_pack(tmp_path, "/", "+/refused", 1, prefix), Inventory(),
              (secret, TOKEN), f"mqtt bus down ({mqtt_broker.host}:{down}): cannot connect",
              secret_input={"token": TOKEN_REF}, received=received)
    await runner.close()
    collecting.cancel()
    await asyncio.gather(collecting, return_exceptions=True)
    await subscriber.__aexit__(None, None, None)


@pytest.fixture(params=["python_kit", "ssh_kit", "http_kit", "kafka_kit", "mqtt_kit"])
def kit(request: pytest.FixtureRequest) -> Kit:
    found: Kit = request.getfixturevalue(request.param)
    return found


def shown(result: ActionResult) -> str:
    return orjson.dumps(result.output).decode() + (result.error or "")


# -- the contract ------------------------------------------------------------------------------

async def test_success_returns_a_json_able_dict(kit: Kit) -> None:
    """A successful action returns a dict that survives a JSON round trip unchanged."""
    result = await kit.execute("ok", value=VALUE)
    assert (result.ok, result.error) == (True, None)
    assert isinstance(result.output, dict)
    assert orjson.loads(orjson.dumps(result.output)) == result.output
    assert VALUE in shown(result)
    assert result.seconds >= 0


async def test_failure_is_a_result_naming_the_action_and_the_cause(kit: Kit) -> None:
    """A failed action is ok=False with an error `pack.action: cause`, never an exception."""
    result = await kit.execute("fail", value=VALUE)
    assert result.ok is False
    assert result.error is not None and result.error.startswith("c.fail: ")
    assert kit.fail_cause in result.error
    assert result.output.get("timed_out") is False


async def test_the_runner_itself_raises_action_error(kit: Kit) -> None:
    """Called directly, a runner reports a failed action by raising ActionError."""
    action = kit.registry.actions["c.fail"]
    ctx = ActionContext("run-1", "task", kit.inventory, pack_config=action.pack.config)
    with pytest.raises(ActionError) as caught:
        await kit.runner.run(action, {**kit.base, "value": VALUE}, ctx)
    assert kit.fail_cause in str(caught.value)


async def test_invalid_input_names_the_action_and_the_field(kit: Kit) -> None:
    """Input that does not fit the action's schema fails before the runner is called."""
    result = await kit.execute("ok")
    assert (result.ok, result.error) == (False, "c.ok: input: value is required")


async def test_timeout_is_timed_out(kit: Kit) -> None:
    """An action outliving its timeout is ok=False, timed_out, and says after how long."""
    kit.before_slow()
    result = await kit.execute("slow")
    assert (result.ok, result.output) == (False, {"timed_out": True})
    assert result.error == "c.slow: timed out after 0.3s"
    assert 0.3 - 0.01 <= result.seconds < 5


async def test_secrets_never_appear_in_output_or_error(kit: Kit) -> None:
    """Credentials (and secret inputs) used by an action show in neither its result nor its
    error, whether it succeeds or is refused."""
    ok = await kit.execute("secret", **kit.secret_input)
    refused = await kit.execute("secret", fail=True, **kit.secret_input)
    assert ok.ok, ok.error
    assert not refused.ok and refused.error is not None
    assert refused.error.startswith("c.secret: ")
    for result in (ok, refused):
        text = shown(result)
        assert [s for s in kit.secrets if s in text] == [], text


async def test_close_is_idempotent(kit: Kit) -> None:
    """close() after use releases the runner's resources and may be called again."""
    assert (await kit.execute("ok", value=VALUE)).ok
    await kit.runner.close()
    await kit.runner.close()


@pytest.mark.parametrize("kit", ["kafka_kit", "mqtt_kit"], indirect=True)
async def test_publish_reaches_the_broker(kit: Kit) -> None:
    """A successful publish is on the broker, under the topic its result names, with the
    rendered payload."""
    result = await kit.execute("ok", value=VALUE)
    assert result.ok, result.error
    assert kit.received is not None
    assert orjson.loads(await kit.received(result.output["topic"])) == {"value": VALUE}


@pytest.mark.parametrize("kit", ["kafka_kit", "mqtt_kit"], indirect=True)
async def test_a_message_the_client_refuses_is_an_action_error(kit: Kit) -> None:
    """A message the bus client refuses to send (an MQTT topic with a wildcard, a Kafka record
    over the size limit) is an ActionError naming the bus and the topic."""
    action = kit.registry.actions["c.secret"]
    ctx = ActionContext("run-1", "task", kit.inventory, pack_config=action.pack.config)
    with pytest.raises(ActionError) as caught:
        await kit.runner.run(action, {"token": TOKEN, "fail": True}, ctx)
    assert str(caught.value).startswith(f"{kit.name.partition('-')[2]} bus main: publish to ")
    assert TOKEN not in str(caught.value)
