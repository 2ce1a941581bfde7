"""An in-process SSH server for the tests: a tiny fake Linux host and network device.

``ssh_server`` (function scope) listens on ``127.0.0.1`` with
``asyncssh.listen(port=0)`` and a freshly generated ed25519 host key. It takes
password auth (``ops`` / ``PASSWORD``) and public-key auth (``client_key`` is
authorized for ``ops``), and counts the connections it accepted.

Every command line is recorded in ``host.commands`` (so tests can assert that
something happened exactly once), split with ``shlex`` like a POSIX shell would
(so quoting is really tested), stripped of a leading ``sudo [-n]`` and run by a
plain dict of fake commands:

* ``systemctl restart|start|stop|is-active|status UNIT`` on ``host.services``
  (``host.failing_restarts[unit] = n`` makes the next n restarts fail);
* ``df -P [PATH]`` and ``find PATH ... -mtime +N [-name PAT] [-print] -delete``
  on ``host.mounts`` and ``host.files`` (deleting frees space on the mount);
* ``show running-config`` prints ``host.config``; ``configure replace [TEXT]``
  sets it from its argument or stdin;
* ``argv ARGS...`` prints its arguments as JSON; ``echo``; ``exit N``;
  ``bigoutput N [stderr]`` writes N bytes; ``sleep N`` waits N seconds or until
  the client closes the channel (recorded in ``host.closed_early``);
* anything else exits 127.

``shell_host`` is the same server in front of a real shell, so that injection can
show: each command line is run by ``/bin/sh -c`` in a scratch directory
(``shell.root``, cwd and ``HOME``) with a minimal environment (``PATH`` is a private
``bin`` with a ``sudo`` that drops ``-n`` and runs the rest, then ``/usr/bin:/bin``),
stdin closed and a timeout. ``nginx; touch pwned`` there really creates
``pwned``. ``host.commands`` still records every line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest

USER = "ops"
PASSWORD = "s3cret-pw"  # tests assert it never shows in a result or error

Result = tuple[int, str, str]


@dataclass
class Mount:
    size_kb: int
    used_kb: int

    @property
    def percent(self) -> int:
        return -(-self.used_kb * 100 // self.size_kb)  # df rounds up


@dataclass
class FakeHost:
    services: dict[str, str] = field(default_factory=lambda: {
        "nginx": "failed", "postgresql": "active", "cron": "active"})
    failing_restarts: dict[str, int] = field(default_factory=dict)
    mounts: dict[str, Mount] = field(default_factory=lambda: {
        "/": Mount(10_000_000, 4_000_000), "/var": Mount(1_000_000, 950_000)})
    # path -> (age in days, size in KiB)
    files: dict[str, tuple[int, int]] = field(default_factory=lambda: {
        "/var/log/app/app.log": (0, 10_000), "/var/log/app/app.log.1": (3, 100_000),
        "/var/log/app/app.log.2": (9, 200_000), "/var/log/app/app.log.3": (30, 300_000),
    })
    config: str = ("! Last configuration change at 09:00:00 UTC Mon Nov 2 2026\n"
                   "hostname edge-1\n!\ninterface eth0\n ip address 10.0.0.1/24\n"
                   " description uplink\n!\nntp server 10.0.0.254\n")
    commands: list[str] = field(default_factory=list)
    closed_early: list[str] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self, command: str) -> int:
        """How many received command lines equal ``command`` (sudo stripped)."""
        return sum(1 for c in self.commands if _strip_sudo(c) == command)

    def mount_of(self, path: str) -> tuple[str, Mount]:
        best = max((m for m in self.mounts
                    if path == m or path.startswith(m.rstrip("/") + "/")), key=len)
        return best, self.mounts[best]


def _strip_sudo(line: str) -> str:
    for prefix in ("sudo -n ", "sudo "):
        if line.startswith(prefix):
            line = line[len(prefix):]
            break
    return line.replace(" -- ", " ")  # `systemctl restart -- nginx` counts as without


# -- the fake commands: argv (without sudo) -> (exit status, stdout, stderr) ------------

def _systemctl(host: FakeHost, argv: list[str]) -> Result:
    if argv[2:3] == ["--"]:  # end of options: what follows is the unit
        argv = argv[:2] + argv[3:]
    elif any(a.startswith("-") for a in argv[1:]):  # as the real one: an option anywhere
        return 0, "systemctl [OPTIONS...] COMMAND ...\n", ""
    if len(argv) != 3:
        return 1, "", "usage: systemctl VERB UNIT\n"
    verb, unit = argv[1], argv[2].removesuffix(".service")
    state = host.services.get(unit)
    if verb == "is-active":
        state = state or "inactive"
        return (0 if state == "active" else 3), f"{state}\n", ""
    if state is None:
        if verb == "status":
            return 4, "", f"Unit {unit}.service could not be found.\n"
        return 5, "", f"Failed to {verb} {unit}.service: Unit {unit}.service not found.\n"
    if verb == "status":
        running = "active (running)" if state == "active" else state
        return (0 if state == "active" else 3), \
            f"* {unit}.service\n     Active: {running}\n", ""
    if verb in ("restart", "start"):
        if verb == "restart" and host.failing_restarts.get(unit, 0) > 0:
            host.failing_restarts[unit] -= 1
            host.services[unit] = "failed"
            return 1, "", (f"Job for {unit}.service failed because the control process "
                           "exited with error code.\n")
        host.services[unit] = "active"
        return 0, "", ""
    if verb == "stop":
        host.services[unit] = "inactive"
        return 0, "", ""
    return 1, "", f"Unknown command verb {verb}.\n"


def _df(host: FakeHost, argv: list[str]) -> Result:
    paths = [a for a in argv[1:] if not a.startswith("-")] or ["/"]
    if "--" in argv:
        paths = argv[argv.index("--") + 1:] or ["/"]
    lines = ["Filesystem     1024-blocks    Used Available Capacity Mounted on"]
    for path in paths:
        name, m = host.mount_of(path)
        lines.append(f"/dev/vd{len(name)}  {m.size_kb} {m.used_kb} {m.size_kb - m.used_kb} "
                     f"{m.percent}% {name}")
    return 0, "\n".join(lines) + "\n", ""


def _find(host: FakeHost, argv: list[str]) -> Result:
    root, args = argv[1].rstrip("/") or "/", argv[2:]
    older, pattern = -1, "*"
    for flag, value in zip(args, [*args[1:], ""], strict=True):
        if flag == "-mtime":
            older = int(value.lstrip("+"))
        elif flag == "-name":
            pattern = value
    if not any(p.startswith(root + "/") for p in host.files) and root not in host.mounts:
        return 1, "", f"find: '{root}': No such file or directory\n"
    hits = sorted(p for p, (age, _) in host.files.items()
                  if p.startswith(root + "/") and age > older
                  and fnmatch.fnmatch(p.rsplit("/", 1)[1], pattern))
    if "-delete" in args:
        for path in hits:
            _, size = host.files.pop(path)
            host.mount_of(path)[1].used_kb -= size
    out = "".join(f"{p}\n" for p in hits) if "-print" in args else ""
    return 0, out, ""


def _show(host: FakeHost, argv: list[str]) -> Result:
    if argv[1:] == ["running-config"]:
        return 0, host.config, ""
    return 1, "", "% Invalid input detected\n"


def _argv(host: FakeHost, argv: list[str]) -> Result:
    return 0, json.dumps(argv[1:]) + "\n", ""


def _echo(host: FakeHost, argv: list[str]) -> Result:
    return 0, " ".join(argv[1:]) + "\n", ""


def _exit(host: FakeHost, argv: list[str]) -> Result:
    status = int(argv[1]) if len(argv) > 1 else 0
    return status, "some output\n", f"warming up\nexit {status} requested\n"


def _bigoutput(host: FakeHost, argv: list[str]) -> Result:
    size = int(argv[1])
    text = "".join(f"{i:07d}\n" for i in range(size // 8 + 1))[:size]
    return (0, "", text) if argv[2:] == ["stderr"] else (0, text, "")


COMMANDS: dict[str, Callable[[FakeHost, list[str]], Result]] = {
    "systemctl": _systemctl, "df": _df, "find": _find, "show": _show, "argv": _argv,
    "echo": _echo, "exit": _exit, "bigoutput": _bigoutput,
}


async def _configure(host: FakeHost, argv: list[str], process: asyncssh.SSHServerProcess[str]
                     ) -> Result:
    if argv[1:2] != ["replace"]:
        return 1, "", "% Invalid input detected\n"
    host.config = argv[2] if len(argv) > 2 else await process.stdin.read()
    return 0, "Configuration replaced\n", ""


async def _sleep(host: FakeHost, argv: list[str], process: asyncssh.SSHServerProcess[str]
                 ) -> Result | None:
    host.started.set()
    try:
        async with asyncio.timeout(float(argv[1])):
            await process.channel.wait_closed()
    except TimeoutError:
        return 0, "", ""
    host.closed_early.append(shlex.join(argv))
    return None


ASYNC_COMMANDS: dict[str, Callable[[FakeHost, list[str], asyncssh.SSHServerProcess[str]],
                                   Awaitable[Result | None]]] = {
    "configure": _configure, "sleep": _sleep,
}


SUDO = """#!/bin/sh
# the shell host's sudo: runs the command as the same user
[ "$1" = -n ] && shift
exec "$@"
"""


@dataclass
class Shell:
    """Where the shell host runs commands: ``root`` (cwd, HOME) and its private ``bin``."""

    root: Path
    bin: Path
    timeout: float = 10.0

    @classmethod
    def create(cls, base: Path) -> Shell:
        root, bin_dir = base / "scratch", base / "bin"
        root.mkdir(parents=True)
        bin_dir.mkdir(parents=True)
        sudo = bin_dir / "sudo"
        sudo.write_text(SUDO)
        sudo.chmod(0o755)
        return cls(root, bin_dir)

    def files(self) -> list[str]:
        """Every file under ``root``, relative and sorted."""
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                      if not p.is_dir())

    async def run(self, line: str) -> Result:
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.root), "LC_ALL": "C"}
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", line, cwd=self.root, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(self.timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return 124, "", f"sh: timed out after {self.timeout:g}s\n"
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


class SshServer:
    """The listening server, its fake host, and what tests need to reach it."""

    def __init__(self, shell: Shell | None = None) -> None:
        self.shell = shell
        self.host = FakeHost()
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.passwords = {USER: PASSWORD}
        self.authorized = {USER: {self.client_key.export_public_key()}}
        self.connections = 0
        self.live: list[asyncssh.SSHServerConnection] = []
        self.port = 0
        self._acceptor: asyncssh.SSHAcceptor | None = None

    @property
    def host_public_key(self) -> str:
        """The server's host key as an OpenSSH public key line (for ``host_key``)."""
        return self.host_key.export_public_key().decode().strip()

    @property
    def client_key_text(self) -> str:
        return self.client_key.export_private_key().decode()

    def entity(self, **extra: Any) -> dict[str, Any]:
        """An inventory entity pointing at this server, host key pinned."""
        return {"address": "127.0.0.1", "port": self.port, "credentials": "ssh-ops",
                "host_key": self.host_public_key, **extra}

    async def start(self) -> None:
        self._acceptor = await asyncssh.listen(
            "127.0.0.1", 0, server_host_keys=[self.host_key],
            server_factory=lambda: _Server(self), process_factory=self._handle,
            keepalive_interval=0)
        self.port = self._acceptor.get_port()

    async def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
        for conn in list(self.live):
            conn.close()
            await conn.wait_closed()

    async def drop_connections(self) -> None:
        """Close every client connection from the server side (a restart, a reboot)."""
        for conn in list(self.live):
            conn.close()
            await conn.wait_closed()

    async def _handle(self, process: asyncssh.SSHServerProcess[str]) -> None:
        line = process.command or ""
        self.host.commands.append(line)
        if self.shell is not None:
            status, out, err = await self.shell.run(line)
            process.stdout.write(out)
            process.stderr.write(err)
            process.exit(status)
            return
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            process.stderr.write(f"sh: syntax error: {exc}\n")
            process.exit(2)
            return
        if argv[:1] == ["sudo"]:
            argv = argv[2:] if argv[1:2] == ["-n"] else argv[1:]
        name = argv[0] if argv else ""
        result: Result | None
        if name in ASYNC_COMMANDS:
            result = await ASYNC_COMMANDS[name](self.host, argv, process)
        elif name in COMMANDS:
            result = COMMANDS[name](self.host, argv)
        else:
            result = 127, "", f"sh: 1: {name}: not found\n"
        if result is None:  # the client went away
            return
        status, out, err = result
        if out:
            process.stdout.write(out)
        if err:
            process.stderr.write(err)
        process.exit(status)


class _Server(asyncssh.SSHServer):
    def __init__(self, owner: SshServer) -> None:
        self.owner = owner
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.owner.connections += 1
        self.owner.live.append(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn in self.owner.live:
            self.owner.live.remove(self.conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return self.owner.passwords.get(username) == password

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return key.export_public_key() in self.owner.authorized.get(username, set())


@pytest.fixture
async def ssh_server() -> AsyncIterator[SshServer]:
    server = SshServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def shell_host(tmp_path: Path) -> AsyncIterator[SshServer]:
    """An SSH server whose commands a real ``/bin/sh`` runs in ``server.shell.root``."""
    server = SshServer(Shell.create(tmp_path / "shell-host"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
