"""SshRunner against a real SSH server on loopback (tests/servers/ssh.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from loopd.catalog.credentials import Credentials
from loopd.catalog.inventory import Inventory
from loopd.packs.executor import ActionContext, ActionResult, Executor
from loopd.packs.registry import PackRegistry
from loopd.packs.ssh import MAX_OUTPUT, SshRunner
from tests.servers import free_port, wait_until
from tests.servers.ssh import PASSWORD, USER, SshServer

PASSWORD_ENV = "LOOPD_TEST_SSH_PASSWORD"

PACK = """
name: t
actions:
  run:
    runner: ssh
    input: {host: {required: true}, command: {required: true}}
    command: "{{ raw.command }}"
    timeout: 10s
  lenient:
    runner: ssh
    input: {host: {required: true}, command: {required: true}}
    command: "{{ raw.command }}"
    ok_exit_status: [0, 3]
  argv:
    runner: ssh
    input: {host: {required: true}, value: {required: true}, count: {type: integer}}
    command: "argv {{ input.value }} {{ input.count }}"
  hang:
    runner: ssh
    input: {host: {required: true}}
    command: sleep 30
    timeout: 0.3s
  secret:
    runner: ssh
    input: {host: {required: true}, token: {required: true, secret: true},
            status: {type: integer, default: 0}}
    command: "exit {{ input.status }} {{ input.token }}"
"""


@pytest.fixture
def registry(tmp_path: Path) -> PackRegistry:
    pack = tmp_path / "packs" / "t"
    pack.mkdir(parents=True)
    (pack / "pack.yaml").write_text(PACK)
    reg = PackRegistry.load([tmp_path / "packs"])
    assert not reg.errors, reg.errors
    return reg


@pytest.fixture
async def runner() -> AsyncIterator[SshRunner]:
    r = SshRunner(connect_timeout=5.0)
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture(autouse=True)
def password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)


def inventory(server: SshServer, **entity: Any) -> Inventory:
    return Inventory({"web-1": server.entity(**entity)},
                     {"ssh-ops": Credentials(username=USER, password=f"env:{PASSWORD_ENV}")})


async def execute(registry: PackRegistry, runner: SshRunner, inv: Inventory, action: str,
                  **input: Any) -> ActionResult:
    executor = Executor(registry, {"ssh": runner})
    return await executor.execute(f"t.{action}", {"host": "web-1", **input},
                                  ActionContext("run-1", "task", inv))


async def test_command_returns_stdout_and_exit_status(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """A command's stdout, stderr and exit status come back as the action's result."""
    result = await execute(registry, runner, inventory(ssh_server), "run",
                           command="systemctl is-active postgresql")
    assert result.ok, result.error
    assert result.output == {"host": "web-1", "command": "systemctl is-active postgresql",
                             "exit_status": 0, "stdout": "active\n", "stderr": "",
                             "truncated": False}
    assert ssh_server.host.commands == ["systemctl is-active postgresql"]


async def test_nonzero_exit_fails_naming_host_command_and_stderr(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """An exit status outside ok_exit_status fails with the host, command and last stderr
    line, and its output is the command's result (exit status, stdout, stderr)."""
    result = await execute(registry, runner, inventory(ssh_server), "run", command="exit 3")
    assert not result.ok
    assert result.error == "t.run: ssh web-1: `exit 3` exited 3: exit 3 requested"
    # the failed step keeps what the command said, for the trace and retry.when
    assert (result.output["exit_status"], result.output["command"], result.output["host"],
            result.output["stderr"]) == (3, "exit 3", "web-1", "warming up\nexit 3 requested\n")
    missing = await execute(registry, runner, inventory(ssh_server), "run", command="nosuch x")
    assert missing.error == "t.run: ssh web-1: `nosuch x` exited 127: sh: 1: nosuch: not found"


async def test_ok_exit_status_makes_a_nonzero_exit_data(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """A non-zero exit listed in ok_exit_status is a result, not a failure."""
    result = await execute(registry, runner, inventory(ssh_server), "lenient",
                           command="systemctl is-active nginx")
    assert result.ok, result.error
    assert (result.output["exit_status"], result.output["stdout"]) == (3, "failed\n")


async def test_wrong_password_is_an_authentication_failure(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rejected password fails with "authentication failed for user", never the password."""
    monkeypatch.setenv(PASSWORD_ENV, "wrong-horse-battery")
    result = await execute(registry, runner, inventory(ssh_server), "run", command="echo hi")
    assert result.error == (f"t.run: ssh web-1 (127.0.0.1:{ssh_server.port}): "
                            "authentication failed for user ops")
    assert ssh_server.host.commands == []


async def test_private_key_authentication(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner,
        tmp_path: Path) -> None:
    """A `key: file:` reference resolves to the private key text and authenticates with it."""
    key_file = tmp_path / "id_ed25519"
    key_file.write_text(ssh_server.client_key_text)
    ssh_server.passwords.clear()  # only the key can get in
    inv = Inventory({"web-1": ssh_server.entity()},
                    {"ssh-ops": Credentials(username=USER, key=f"file:{key_file}")})
    result = await execute(registry, runner, inv, "run", command="echo keyed")
    assert result.ok, result.error
    assert result.output["stdout"] == "keyed\n"


async def test_a_key_that_is_not_a_key_is_named_without_its_content(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Key text that cannot be imported fails naming the credentials, not the text."""
    monkeypatch.setenv("LOOPD_TEST_SSH_KEY", "not-a-key-but-a-secret-string")
    inv = Inventory({"web-1": ssh_server.entity()},
                    {"ssh-ops": Credentials(username=USER, key="env:LOOPD_TEST_SSH_KEY")})
    result = await execute(registry, runner, inv, "run", command="echo hi")
    assert result.error is not None
    assert "credentials ssh-ops: key is not a usable private key" in result.error
    assert "not-a-key-but-a-secret-string" not in result.error


async def test_closed_port_cannot_connect(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """A host whose SSH port is closed fails with "cannot connect" and its address."""
    port = free_port()
    result = await execute(registry, runner, inventory(ssh_server, port=port), "run",
                           command="echo hi")
    assert result.error is not None
    assert result.error.startswith(f"t.run: ssh web-1 (127.0.0.1:{port}): cannot connect: ")
    assert not result.output.get("timed_out")


async def test_unexpected_host_key_is_refused(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """A server whose host key differs from the inventory's host_key is never logged into."""
    other = SshServer().host_public_key
    result = await execute(registry, runner, inventory(ssh_server, host_key=other), "run",
                           command="echo hi")
    assert result.error is not None
    assert result.error.startswith(
        f"t.run: ssh web-1 (127.0.0.1:{ssh_server.port}): host key not trusted: ")
    assert ssh_server.host.commands == []


async def test_known_hosts_file_is_used(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner,
        tmp_path: Path) -> None:
    """An entity's known_hosts file trusts the host keys listed for its address and port."""
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{ssh_server.port} {ssh_server.host_public_key}\n")
    inv = inventory(ssh_server, host_key=None, known_hosts=str(known))
    result = await execute(registry, runner, inv, "run", command="echo trusted")
    assert result.ok, result.error


async def test_a_host_missing_from_the_inventory_is_refused_unless_allowed(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """A host not in the inventory (an event could name any) is refused before anything
    connects; with ``unlisted_hosts`` it is reached at its own name, its unknown key refused."""
    executor = Executor(registry, {"ssh": runner})
    refused = await executor.execute(
        "t.run", {"host": ssh_server.entity()["address"], "command": "echo hi"},
        ActionContext("run-1", "task", Inventory()))
    assert refused.error is not None and refused.error.startswith(
        "t.run: ssh 127.0.0.1: not in the inventory; loopd connects only to inventory hosts")
    assert ssh_server.host.commands == [] and ssh_server.connections == 0
    runner.unlisted_hosts = True
    result = await executor.execute(
        "t.run", {"host": "127.0.0.1", "command": "echo hi"},
        ActionContext("run-1", "task", Inventory()))
    # port 22 on loopback: refused (nothing there) or, if sshd runs, its key is unknown
    assert result.error is not None
    assert result.error.startswith("t.run: ssh 127.0.0.1 (127.0.0.1:22): ")
    assert "cannot connect" in result.error or "host key not trusted" in result.error


async def test_timeout_closes_the_channel(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """A command outliving the action timeout is a timed-out result and its channel closes."""
    result = await execute(registry, runner, inventory(ssh_server), "hang")
    assert not result.ok
    assert result.output == {"timed_out": True}
    assert result.error == "t.hang: timed out after 0.3s"
    await wait_until(lambda: ssh_server.host.closed_early == ["sleep 30"],
                     what="the server to see the channel closed")
    again = await execute(registry, runner, inventory(ssh_server), "run", command="echo ok")
    assert again.ok, again.error
    assert ssh_server.connections == 1  # the connection survived its closed channel


async def test_concurrent_actions_share_one_connection(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """Twenty concurrent actions on one host open one SSH connection between them."""
    inv = inventory(ssh_server)
    results = await asyncio.gather(*(execute(registry, runner, inv, "run", command=f"echo {i}")
                                     for i in range(20)))
    assert all(r.ok for r in results), [r.error for r in results]
    assert sorted(r.output["stdout"] for r in results) == sorted(f"{i}\n" for i in range(20))
    assert ssh_server.connections == 1
    assert runner.connections() == 1


async def test_dead_connection_is_reopened(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """A pooled connection the server closed is dropped and a new one opened for the action."""
    inv = inventory(ssh_server)
    assert (await execute(registry, runner, inv, "run", command="echo one")).ok
    await ssh_server.drop_connections()
    second = await execute(registry, runner, inv, "run", command="echo two")
    assert second.ok, second.error
    assert ssh_server.connections == 2
    assert ssh_server.host.count("echo two") == 1


async def test_inputs_are_shell_quoted(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """An input string reaches the command as exactly one shell word, whatever it holds."""
    nasty = "nginx; rm -rf / $(reboot) `id` 'x' \"y\"\n"
    result = await execute(registry, runner, inventory(ssh_server), "argv",
                           value=nasty, count=2)
    assert result.ok, result.error
    assert json.loads(result.output["stdout"]) == [nasty, "2"]


async def test_secrets_never_appear_in_results_or_errors(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Secret inputs show as *** and the password shows nowhere, on success or failure."""
    monkeypatch.setenv("SSH_TEST_TOKEN", "tok-123")
    inv = inventory(ssh_server)
    ok = await execute(registry, runner, inv, "secret", token="env:SSH_TEST_TOKEN")
    failed = await execute(registry, runner, inv, "secret", token="env:SSH_TEST_TOKEN",
                           status=4)
    assert ok.ok, ok.error
    assert ok.output["command"] == "exit 0 ***"
    assert failed.error == "t.secret: ssh web-1: `exit 4 ***` exited 4: exit 4 requested"
    assert ssh_server.host.commands == ["exit 0 tok-123", "exit 4 tok-123"]
    text = json.dumps([ok.output, failed.output, failed.error])
    assert "tok-123" not in text and PASSWORD not in text
    assert PASSWORD not in repr(runner._pool)


async def test_output_is_truncated_and_says_so(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """stdout keeps its first 64 KiB and stderr its last, with truncated: true."""
    inv = inventory(ssh_server)
    out = await execute(registry, runner, inv, "run", command="bigoutput 200000")
    err = await execute(registry, runner, inv, "run", command="bigoutput 200000 stderr")
    assert out.ok and err.ok
    assert len(out.output["stdout"]) == MAX_OUTPUT and out.output["truncated"] is True
    assert out.output["stdout"].startswith("0000000\n")
    assert len(err.output["stderr"]) == MAX_OUTPUT and err.output["truncated"] is True
    assert err.output["stderr"].endswith(f"{200000 // 8 - 1:07d}\n")


async def test_close_closes_pooled_connections(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """close() ends every pooled connection, which the server then sees go."""
    assert (await execute(registry, runner, inventory(ssh_server), "run", command="echo")).ok
    assert len(ssh_server.live) == 1
    await runner.close()
    assert runner.connections() == 0
    await wait_until(lambda: not ssh_server.live, what="the server to see the connection close")


# -- verbatim inputs: no newline, no NUL -------------------------------------------------

async def test_a_newline_in_a_verbatim_input_is_refused_before_anything_runs(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """A raw (verbatim) input holding a newline fails naming the input; nothing is run."""
    result = await execute(registry, runner, inventory(ssh_server), "run",
                           command="echo one\ntouch pwned")
    assert result.error == ("t.run: input command is inserted verbatim (raw.command) and "
                            "contains a newline, which would start another command: "
                            "refused, nothing was run (give the command as argv)")
    assert ssh_server.host.commands == [] and ssh_server.connections == 0


async def test_a_nul_in_any_input_is_refused_before_anything_runs(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner) -> None:
    """A NUL character, even in a quoted input, fails naming the input; nothing is run."""
    result = await execute(registry, runner, inventory(ssh_server), "argv",
                           value="nginx\x00--help")
    assert result.error == "t.argv: input value contains a NUL character: refused, nothing " \
                           "was run"
    quoted_newline = await execute(registry, runner, inventory(ssh_server), "argv",
                                   value="two\nlines")
    assert quoted_newline.ok, quoted_newline.error  # quoted, a newline is part of one word
    assert ssh_server.host.commands == ["argv 'two\nlines' "]


# -- the pool never crosses a trust boundary ------------------------------------------------

def shared_inventory(server: SshServer, tmp_path: Path, **entities: dict[str, Any]
                     ) -> Inventory:
    """``open-1`` (known_hosts: ignore) plus ``entities``, all at the same address, port
    and user; credentials ``ssh-ops`` (env), ``ssh-wrong`` and ``ssh-file`` (a file)."""
    (tmp_path / "pw").write_text(PASSWORD)
    base = {"address": "127.0.0.1", "port": server.port, "credentials": "ssh-ops"}
    return Inventory(
        {"open-1": {**base, "known_hosts": "ignore"},
         **{name: {**base, **e} for name, e in entities.items()}},
        {"ssh-ops": Credentials(username=USER, password=f"env:{PASSWORD_ENV}"),
         "ssh-wrong": Credentials(username=USER, password="env:LOOPD_TEST_SSH_WRONG"),
         "ssh-file": Credentials(username=USER, password=f"file:{tmp_path / 'pw'}")})


async def on(registry: PackRegistry, runner: SshRunner, inv: Inventory, host: str,
             command: str) -> ActionResult:
    return await Executor(registry, {"ssh": runner}).execute(
        "t.run", {"host": host, "command": command}, ActionContext("run-1", "task", inv))


async def test_a_pinned_wrong_host_key_is_refused_while_another_entity_is_connected(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner,
        tmp_path: Path) -> None:
    """An entity pinned to another host key never runs on the connection an entity that
    ignores host keys opened to the same address, port and user."""
    inv = shared_inventory(ssh_server, tmp_path,
                           **{"pinned-1": {"host_key": SshServer().host_public_key}})
    assert (await on(registry, runner, inv, "open-1", "echo open")).ok
    pinned = await on(registry, runner, inv, "pinned-1", "echo pinned")
    assert pinned.error is not None
    assert pinned.error.startswith(
        f"t.run: ssh pinned-1 (127.0.0.1:{ssh_server.port}): host key not trusted: ")
    assert ssh_server.host.commands == ["echo open"] and runner.connections() == 1


async def test_an_entity_with_no_trust_is_refused_while_another_entity_is_connected(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner,
        tmp_path: Path) -> None:
    """An entity with neither host_key nor known_hosts (the runner's default: this host is
    unknown) never runs on the connection an entity that ignores host keys opened."""
    inv = shared_inventory(ssh_server, tmp_path, **{"unknown-1": {}})
    assert (await on(registry, runner, inv, "open-1", "echo open")).ok
    unknown = await on(registry, runner, inv, "unknown-1", "echo unknown")
    assert unknown.error is not None and "host key not trusted" in unknown.error
    assert ssh_server.host.commands == ["echo open"]


async def test_a_wrong_password_fails_while_another_entity_is_connected(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials with a wrong password fail to authenticate even though an entity with
    the right ones holds a connection to the same address, port and user."""
    monkeypatch.setenv("LOOPD_TEST_SSH_WRONG", "wrong-horse-battery")
    inv = shared_inventory(ssh_server, tmp_path,
                           **{"wrong-1": {"known_hosts": "ignore", "credentials": "ssh-wrong"}})
    assert (await on(registry, runner, inv, "open-1", "echo open")).ok
    wrong = await on(registry, runner, inv, "wrong-1", "echo wrong")
    assert wrong.error == (f"t.run: ssh wrong-1 (127.0.0.1:{ssh_server.port}): "
                           "authentication failed for user ops")
    assert ssh_server.host.commands == ["echo open"]


async def test_a_revoked_password_fails_and_retires_the_connection_it_opened(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner,
        tmp_path: Path) -> None:
    """Once the password file changes, the old connection is not reused: the next action
    authenticates anew and fails, and the connection opened with the old password closes."""
    inv = shared_inventory(ssh_server, tmp_path,
                           **{"web-a": {"known_hosts": "ignore", "credentials": "ssh-file"},
                              "web-b": {"known_hosts": "ignore", "credentials": "ssh-file"}})
    assert (await on(registry, runner, inv, "web-a", "echo before")).ok
    (tmp_path / "pw").write_text("revoked-or-rotated")
    other = await on(registry, runner, inv, "web-b", "echo other")
    again = await on(registry, runner, inv, "web-a", "echo after")
    for result, host in ((other, "web-b"), (again, "web-a")):
        assert result.error == (f"t.run: ssh {host} (127.0.0.1:{ssh_server.port}): "
                                "authentication failed for user ops")
    assert ssh_server.host.commands == ["echo before"]
    await wait_until(lambda: not ssh_server.live, what="the old connection to be closed")
    text = repr(runner._pool) + repr(list(runner._pool)) + repr(runner._keys)
    assert PASSWORD not in text and "revoked-or-rotated" not in text


async def test_same_trust_and_credentials_still_share_one_connection(
        ssh_server: SshServer, registry: PackRegistry, runner: SshRunner,
        tmp_path: Path) -> None:
    """Two entities with the same address, user, host-key policy and credentials share one
    connection."""
    inv = shared_inventory(ssh_server, tmp_path, **{"open-2": {"known_hosts": "ignore"}})
    assert (await on(registry, runner, inv, "open-1", "echo one")).ok
    assert (await on(registry, runner, inv, "open-2", "echo two")).ok
    assert ssh_server.connections == 1
