"""Event data never reaches a shell unquoted, nor becomes an option: shown with a real shell.

``shell_host`` (tests/servers/ssh.py) runs every command line with ``/bin/sh -c`` in a
scratch directory, so an injected ``touch pwned`` really creates a file and a path of
``-delete`` given to the real ``find`` really deletes. The first tests go the whole way
an alert goes: a real ``Daemon`` on loopback, an Alertmanager payload, a rule, the
shipped linux pack, the ssh runner; the others run the pack's actions directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from loopd.catalog.credentials import Credentials
from loopd.catalog.inventory import Inventory
from loopd.config import load_config
from loopd.daemon import Daemon
from loopd.packs.executor import ActionContext, ActionResult, Executor
from loopd.packs.registry import PackRegistry
from loopd.packs.ssh import SshRunner
from tests.servers.ssh import PASSWORD, USER, SshServer

REPO = Path(__file__).resolve().parents[2]
PASSWORD_ENV = "LOOPD_TEST_SHELL_PASSWORD"

# each would create a file if it reached the shell as shell syntax
PAYLOADS = ["nginx; touch pwned1 #", "$(touch pwned2)", "`touch pwned3`",
            "nginx\ntouch pwned4 #"]

def journal_rule(input: str) -> str:
    """A rule passing an alert label to linux.run_command with ``input`` (YAML flow)."""
    return f"""\
rules:
  - name: tail-journal
    on: {{source: alertmanager, match: {{labels.alertname: ServiceDown}}}}
    key: "{{{{ event.labels.service }}}}"
    run:
      action: linux.run_command
      input: {{host: web-1, {input}}}
"""


RAW_RULE = journal_rule('command: "journalctl -u {{ event.labels.service }} -n 20"')
ARGV_RULE = journal_rule('argv: [printf, "[%s]", "{{ event.labels.service }}"]')


def notification(*services: str) -> dict[str, Any]:
    """An Alertmanager webhook payload (version 4), one firing alert per service label."""
    alerts = [{"status": "firing", "labels": {"alertname": "ServiceDown", "service": s},
               "annotations": {}, "startsAt": "2026-01-01T00:00:00Z",
               "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "",
               "fingerprint": f"fp-{i}"} for i, s in enumerate(services)]
    return {"version": "4", "groupKey": "{}:{}", "status": "firing", "receiver": "loopd",
            "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://alertmanager.example:9093", "alerts": alerts}


@contextlib.asynccontextmanager
async def daemon(root: Path, rules: str, host: SshServer) -> AsyncIterator[Daemon]:
    """A Daemon on 127.0.0.1:0 with ``rules``, the shipped linux pack and ``host``."""
    (root / "rules").mkdir()
    (root / "rules" / "rules.yaml").write_text(rules)
    (root / "packs").mkdir()
    (root / "packs" / "linux").symlink_to(REPO / "packs" / "linux")
    (root / "inventory.yaml").write_text(json.dumps({
        "entities": {"web-1": host.entity()},
        "credentials": {"ssh-ops": {"username": USER, "password": f"env:{PASSWORD_ENV}"}}}))
    (root / "loopd.yaml").write_text("""\
listen: 127.0.0.1:0
sources: [{name: alertmanager, type: alertmanager}]
rules: [rules]
packs: [packs]
inventory: inventory.yaml
store: {path: var/loopd.db}
""")
    d = Daemon(load_config(root / "loopd.yaml"))
    ready = asyncio.Event()
    task = asyncio.ensure_future(d.run(on_ready=lambda _: ready.set()))
    try:
        async with asyncio.timeout(20):
            await ready.wait()
        yield d
    finally:
        d.stop()
        await asyncio.wait_for(task, 20)


async def alert(d: Daemon, *services: str) -> None:
    """Post the alerts and wait until every run they started has ended."""
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{d.port}") as http, \
            http.post("/v1/alertmanager", data=orjson.dumps(notification(*services)),
                      headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()
    await d.engine.drain(timeout=10)
    await d.dispatcher.drain(timeout=20)


async def stdouts(d: Daemon) -> list[str]:
    """The stdout of every run's one action, through GET /v1/runs/{id}."""
    out = []
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{d.port}") as http:
        async with http.get("/v1/runs?limit=100") as resp:
            runs = (await resp.json())["runs"]
        for run in runs:
            async with http.get(f"/v1/runs/{run['id']}") as resp:
                story = await resp.json()
            assert story["status"] == "succeeded", story
            out += [step["output"]["stdout"] for step in story["steps"]]
    return sorted(out)


@pytest.fixture(autouse=True)
def password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)


async def test_a_raw_command_rule_built_from_alert_labels_runs_nothing(
        tmp_path: Path, shell_host: SshServer) -> None:
    """Labels carrying ;, $(), backticks or a newline into run_command's raw command create
    no file on a real shell, because the rule is refused at load naming file:line and input."""
    assert shell_host.shell is not None
    async with daemon(tmp_path, RAW_RULE, shell_host) as d:
        await alert(d, *PAYLOADS)
        errors = [str(e) for e in d.engine.ruleset.errors]
    assert shell_host.shell.files() == []
    assert shell_host.host.commands == []
    (error,) = errors
    assert error.startswith(f"{tmp_path / 'rules' / 'rules.yaml'}:5 tail-journal run.input: "
                            "linux.run_command passes input 'command' to the shell verbatim")
    assert "reads event" in error and "argv: [" in error and "unsafe_shell: [command]" in error


async def test_argv_gives_each_label_to_the_program_as_one_word(
        tmp_path: Path, shell_host: SshServer) -> None:
    """With run_command's argv, every label reaches the real program as exactly one argument."""
    assert shell_host.shell is not None
    async with daemon(tmp_path, ARGV_RULE, shell_host) as d:
        assert d.engine.ruleset.errors == []
        await alert(d, *PAYLOADS)
        printed = await stdouts(d)
    assert shell_host.shell.files() == []
    assert printed == sorted(f"[{p}]" for p in PAYLOADS)
    assert len(shell_host.host.commands) == 4


# -- the linux pack's actions, directly ----------------------------------------------------

@pytest.fixture
async def linux(tmp_path: Path) -> AsyncIterator[tuple[PackRegistry, Executor]]:
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "linux").symlink_to(REPO / "packs" / "linux")
    registry = PackRegistry.load([packs])
    assert registry.errors == []
    executor = Executor(registry, {"ssh": SshRunner(connect_timeout=5.0)})
    try:
        yield registry, executor
    finally:
        await executor.close()


async def act(linux: tuple[PackRegistry, Executor], host: SshServer, action: str,
              **input: Any) -> ActionResult:
    inv = Inventory({"web-1": host.entity()},
                    {"ssh-ops": Credentials(username=USER, password=f"env:{PASSWORD_ENV}")})
    return await linux[1].execute(f"linux.{action}", {"host": "web-1", **input},
                                  ActionContext("run-1", "task", inv,
                                                pack_config=linux[0].packs["linux"].config))


async def test_a_path_of_delete_deletes_nothing_with_the_real_find(
        linux: tuple[PackRegistry, Executor], shell_host: SshServer) -> None:
    """clean_directory refuses a path of -delete (it would delete every file with the real
    find) before anything runs, naming the input and its pattern."""
    assert shell_host.shell is not None
    for name in ("a.log", "b.log"):
        (shell_host.shell.root / name).write_text("keep me\n")
    result = await act(linux, shell_host, "clean_directory", path="-delete")
    assert shell_host.shell.files() == ["a.log", "b.log"]
    assert result.error == ("linux.clean_directory: input: path: '-delete' does not match "
                            "its pattern /[^\\n\\x00]*")
    assert shell_host.host.commands == []


async def test_clean_directory_deletes_only_old_files_with_the_real_find(
        linux: tuple[PackRegistry, Executor], shell_host: SshServer) -> None:
    """The real find (through the fake sudo) deletes the files older than N days, no other."""
    assert shell_host.shell is not None
    logs = shell_host.shell.root / "logs"
    logs.mkdir()
    old, new = logs / "old.log", logs / "new.log"
    old.write_text("x")
    new.write_text("y")
    month_ago = time.time() - 30 * 86400
    os.utime(old, (month_ago, month_ago))
    result = await act(linux, shell_host, "clean_directory", path=str(logs))
    assert result.ok, result.error
    assert result.output["stdout"] == f"{old}\n"
    assert shell_host.shell.files() == ["logs/new.log"]


async def test_disk_usage_puts_end_of_options_before_the_path_for_the_real_df(
        linux: tuple[PackRegistry, Executor], shell_host: SshServer) -> None:
    """disk_usage runs `df -P -- PATH`, which the real df accepts; a path like --help is
    refused before anything runs."""
    result = await act(linux, shell_host, "disk_usage", path="/")
    assert result.ok, result.error
    assert result.output["command"] == "df -P -- /"
    assert result.output["stdout"].startswith("Filesystem")
    refused = await act(linux, shell_host, "disk_usage", path="--help")
    assert refused.error is not None and "path: '--help' does not match" in refused.error
    assert shell_host.host.commands == ["df -P -- /"]


async def test_a_service_named_help_is_refused_before_systemctl_runs(
        linux: tuple[PackRegistry, Executor], ssh_server: SshServer) -> None:
    """restart_service with service --help (systemctl would print its help and exit 0, a
    "successful restart") fails validation and runs nothing."""
    result = await act(linux, ssh_server, "restart_service", service="--help")
    assert not result.ok
    assert result.error is not None and result.error.startswith(
        "linux.restart_service: input: service: '--help' does not match its pattern ")
    assert ssh_server.host.commands == []
    ok = await act(linux, ssh_server, "restart_service", service="nginx")
    assert ok.ok, ok.error
    assert ssh_server.host.commands == ["sudo -n systemctl restart -- nginx"]


async def test_run_command_takes_exactly_one_of_argv_and_command(
        linux: tuple[PackRegistry, Executor], shell_host: SshServer) -> None:
    """run_command refuses both or neither of argv/command, and an argv element that is
    not one word, before anything runs; argv runs each element as one word."""
    both = await act(linux, shell_host, "run_command", argv=["true"], command="true")
    neither = await act(linux, shell_host, "run_command")
    nested = await act(linux, shell_host, "run_command", argv=["printf", ["a", "b"]])
    assert both.error == "linux.run_command: input: give exactly one of argv, command " \
                         "(got argv, command)"
    assert neither.error == "linux.run_command: input: give exactly one of argv, command"
    assert nested.error == ("linux.run_command: input argv: a list of words holds a list or "
                            "a mapping; each element must be one string or number")
    assert shell_host.host.commands == []
    ok = await act(linux, shell_host, "run_command", argv=["printf", "%s|", "a b", "$(x)", 7])
    assert ok.ok, ok.error
    assert ok.output["stdout"] == "a b|$(x)|7|"
