"""The Runner contract (loopd/packs/executor.py), checked the same way against every runner:
python (a pack's actions.py), ssh (tests/servers/ssh.py) and http (tests/servers/http_targets.py).

Each runner gets a pack ``c`` with the same four actions, written in its own terms:

* ``ok``: succeeds and returns something built from its ``value`` input;
* ``fail``: fails (the target refuses);
* ``slow``: never finishes within its 300 ms timeout;
* ``secret``: authenticates with the inventory's credentials ``svc`` (and, for ssh, a
  ``secret: true`` input); with ``fail: true`` it is refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from loopd.catalog.credentials import Credentials
from loopd.catalog.inventory import Inventory
from loopd.errors import ActionError
from loopd.packs.executor import ActionContext, ActionResult, Executor, Runner
from loopd.packs.http import HttpRunner
from loopd.packs.python import PythonRunner
from loopd.packs.registry import PackRegistry
from loopd.packs.ssh import SshRunner
from tests.servers.http_targets import HttpEcho
from tests.servers.ssh import PASSWORD, USER, SshServer

VALUE = "contract-value-42"
TOKEN = "input-token-0123456789"  # a `secret: true` input (ssh)

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

    async def execute(self, action: str, **input: Any) -> ActionResult:
        executor = Executor(self.registry, {self.name: self.runner})
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
              secret_input={"token": TOKEN})
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


@pytest.fixture(params=["python_kit", "ssh_kit", "http_kit"])
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
