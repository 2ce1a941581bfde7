"""Secrets never leave loopd: not in a run's rendered input, an HTTP error, or the API.

A real daemon on loopback (SQLite store, its own pack) for the API, and the http
runner against ``tests/servers/http_targets.py`` for error messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from loopd.catalog.credentials import Credentials
from loopd.catalog.inventory import Inventory
from loopd.config import load_config
from loopd.daemon import Daemon
from loopd.packs.executor import ActionContext, Executor
from loopd.packs.http import HttpRunner
from loopd.packs.registry import PackRegistry
from loopd.packs.ssh import SshRunner
from tests.servers import wait_until
from tests.servers.http_targets import HttpEcho
from tests.servers.ssh import PASSWORD as SSH_PASSWORD
from tests.servers.ssh import USER, SshServer

HOOK = "https://hooks.example.com/services/T0/B1/Zz-hook-secret-1"
PASSWORD = "pw-from-event-0123456789"
WRONG = "wrong-token-from-env-5555"

PACK = """
name: s
actions:
  use:
    runner: python
    input:
      hook: {type: string, secret: true}
      password: {type: string}
      note: {type: string}
"""

ACTIONS = '''
async def use(input, ctx):
    return {"echo": input, "line": "note=" + input["note"]}
'''

RULES = """
rules:
  - name: leak
    on: {source: webhook, topic: leak}
    run:
      action: s.use
      input: {hook: "env:REDACT_HOOK", password: "{{ event.pw }}", note: "kept"}
"""

HTTP_PACK = """
name: h
config: {url: {type: string, required: true}}
actions:
  call:
    runner: http
    url: "{{ config.url }}/bearer"
    auth: {type: bearer, credentials: svc}
"""

SECRET_CONFIG_PACK = """
name: hook
config: {url: {type: string, secret: true}}
actions:
  post:
    runner: http
    method: POST
    url: "{{ config.url }}"
"""

SSH_PACK = """
name: x
actions:
  echo:
    runner: ssh
    input: {host: {required: true}, token: {required: true, secret: true}}
    command: "echo {{ input.token }}"
"""
TOKEN = "ssh-token-0123456789"


@pytest.fixture
async def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                 ) -> AsyncIterator[tuple[Daemon, aiohttp.ClientSession]]:
    monkeypatch.setenv("REDACT_HOOK", HOOK)
    (tmp_path / "packs" / "s").mkdir(parents=True)
    (tmp_path / "packs" / "s" / "pack.yaml").write_text(PACK)
    (tmp_path / "packs" / "s" / "actions.py").write_text(ACTIONS)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "leak.yaml").write_text(RULES)
    (tmp_path / "loopd.yaml").write_text("""\
listen: 127.0.0.1:0
sources: [{name: webhook, type: webhook}]
rules: [rules]
packs: [packs]
store: {path: var/loopd.db}
""")
    d = Daemon(load_config(tmp_path / "loopd.yaml"))
    ready = asyncio.Event()
    task = asyncio.ensure_future(d.run(on_ready=lambda _: ready.set()))
    try:
        await wait_until(lambda: ready.is_set() or task.done(), what="daemon ready")
        if task.done():
            task.result()
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{d.port}") as http:
            yield d, http
    finally:
        d.stop()
        await asyncio.wait_for(task, 20)


async def test_api_shows_no_secret_of_a_run(
        daemon: tuple[Daemon, aiohttp.ClientSession]) -> None:
    """GET /v1/runs/{id} masks secret inputs (whose value, behind a reference, reaches only
    the action) and secret-looking keys in the run's rendered input, its trigger, and every
    step's input and output."""
    d, http = daemon
    event = {"topic": "leak", "data": {"pw": PASSWORD}}
    async with http.post("/v1/events", data=orjson.dumps(event),
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status < 300, await resp.text()
    await d.engine.drain(timeout=10)
    await d.dispatcher.drain(timeout=10)
    async with http.get("/v1/runs") as resp:
        runs = (await resp.json())["runs"]
    assert [r["status"] for r in runs] == ["succeeded"], runs
    async with http.get(f"/v1/runs/{runs[0]['id']}") as resp:
        text = await resp.text()
    story = orjson.loads(text)
    assert story["input"] == {"hook": "***", "password": "***", "note": "kept"}
    assert story["steps"][-1]["output"]["echo"]["hook"] == "***"
    assert story["steps"][-1]["output"]["line"] == "note=kept"
    for secret in (HOOK, PASSWORD, "Zz-hook-secret-1"):
        assert secret not in text


async def test_http_error_message_hides_the_credential(
        tmp_path: Path, http_echo: HttpEcho, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused request whose body echoes the token it was sent names the refusal, not
    the token."""
    monkeypatch.setenv("REDACT_WRONG", WRONG)
    (tmp_path / "packs" / "h").mkdir(parents=True)
    (tmp_path / "packs" / "h" / "pack.yaml").write_text(HTTP_PACK)
    registry = PackRegistry.load([tmp_path / "packs"], {"h": {"url": http_echo.url}})
    runner = HttpRunner(backoff=0.001)
    inventory = Inventory(credentials={"svc": Credentials(token="env:REDACT_WRONG")})
    try:
        result = await Executor(registry, {"http": runner}).execute(
            "h.call", {}, ActionContext("run-1", "task", inventory))
    finally:
        await runner.close()
    assert not result.ok and result.error is not None
    assert "unexpected status 401" in result.error and "bad token: Bearer ***" in result.error
    assert WRONG not in result.error + orjson.dumps(result.output).decode()


async def test_ssh_output_hides_what_the_remote_side_echoes(
        tmp_path: Path, ssh_server: SshServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote command that prints a secret input shows it neither in the rendered command
    nor in its stdout."""
    monkeypatch.setenv("REDACT_SSH_PW", SSH_PASSWORD)
    monkeypatch.setenv("REDACT_SSH_TOKEN", TOKEN)
    (tmp_path / "packs" / "x").mkdir(parents=True)
    (tmp_path / "packs" / "x" / "pack.yaml").write_text(SSH_PACK)
    registry = PackRegistry.load([tmp_path / "packs"])
    inventory = Inventory({"web-1": ssh_server.entity(credentials="svc")},
                          {"svc": Credentials(username=USER, password="env:REDACT_SSH_PW")})
    runner = SshRunner(connect_timeout=5.0)
    try:
        result = await Executor(registry, {"ssh": runner}).execute(
            "x.echo", {"host": "web-1", "token": "env:REDACT_SSH_TOKEN"},
            ActionContext("run-1", "t", inventory))
    finally:
        await runner.close()
    assert result.ok, result.error
    assert result.output["command"] == "echo ***"
    assert result.output["stdout"].strip() == "***"
    assert TOKEN not in orjson.dumps(result.output).decode()


async def test_a_secret_pack_config_field_may_be_a_reference(
        tmp_path: Path, http_echo: HttpEcho, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``secret`` pack config field given as ``env:VAR`` is resolved at use and masked in
    the result; an unresolvable one fails naming the field and reference, not a value."""
    (tmp_path / "packs" / "hook").mkdir(parents=True)
    (tmp_path / "packs" / "hook" / "pack.yaml").write_text(SECRET_CONFIG_PACK)
    hook = f"{http_echo.url}/echo?key=Zz-config-hook-secret-7"
    monkeypatch.setenv("REDACT_HOOK", hook)
    monkeypatch.delenv("REDACT_UNSET", raising=False)
    runner = HttpRunner(backoff=0.001)
    try:
        results = []
        for ref in ("env:REDACT_HOOK", "env:REDACT_UNSET"):
            registry = PackRegistry.load([tmp_path / "packs"], {"hook": {"url": ref}})
            results.append(await Executor(registry, {"http": runner}).execute(
                "hook.post", {}, ActionContext("run-1", "task", Inventory())))
    finally:
        await runner.close()
    ok, unset = results
    assert ok.ok, ok.error
    assert ok.output["json"]["query"] == {"key": ["***"]} and ok.output["url"].endswith("/***")
    assert "Zz-config-hook-secret-7" not in orjson.dumps(ok.output).decode()
    assert unset.error == ("hook.post: pack config hook.url: env:REDACT_UNSET: environment "
                           "variable REDACT_UNSET is not set")


async def test_the_store_keeps_a_secret_inputs_reference_never_its_value(
        daemon: tuple[Daemon, aiohttp.ClientSession]) -> None:
    """A ``secret: true`` input is stored (run input, step input) as the reference it was
    given; the value behind it reached the action, and is in no byte of the state files."""
    d, http = daemon
    async with http.post("/v1/events", data=orjson.dumps({"topic": "leak", "data": {}}),
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status < 300, await resp.text()
    await d.engine.drain(timeout=10)
    await d.dispatcher.drain(timeout=10)
    runs = await d.store.list_runs(limit=10)
    assert [r.status for r in runs] == ["succeeded"]
    assert runs[0].input is not None and runs[0].input["hook"] == "env:REDACT_HOOK"
    steps = await d.store.steps(runs[0].id)
    assert steps[-1].input is not None and steps[-1].input["hook"] == "env:REDACT_HOOK"
    assert steps[-1].output is not None
    assert steps[-1].output["echo"]["hook"] == "https://hooks.example.com/***"
    state = d.config.store.path
    for path in (state, state.with_name(state.name + "-wal")):
        if path.exists():
            assert HOOK.encode() not in path.read_bytes(), path
