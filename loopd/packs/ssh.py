"""The ssh runner: one command on one inventory host, over a pooled asyncssh connection.

An ``ssh`` action (``SshAction``) names its target with ``host`` (a template,
default ``{{ input.host }}``, rendered with ``{"input": input}``) and its
``command`` (a template rendered with ``input``, ``raw``, ``entity``, ``config``).
Both are compiled once per template text and cached.

Target: the host name is looked up in the inventory (``ctx.entity(name)``); a name that
is not there is refused unless the runner was built with ``unlisted_hosts`` (loopd.yaml
``ssh: {unlisted_hosts: true}``), since an event may choose the name:

* ``address`` (default: the name itself), ``port`` (default 22);
* ``credentials``: a name in the inventory's ``credentials``; ``username``,
  ``password`` and ``key`` are resolved from their references
  (``env:VAR``/``file:/path``). ``key`` resolves to the private key **text**
  (OpenSSH or PEM, unencrypted), typically ``file:/etc/loopd/id_ed25519``.
  With credentials, only what they give is tried (no agent, no ``~/.ssh``
  keys); without, asyncssh's defaults apply (local user, agent, default keys);
* host key checking: ``host_key`` (an OpenSSH public key line, the only key
  accepted), else ``known_hosts`` (a file path, or ``ignore`` to disable
  checking), else the runner's ``known_hosts`` (default: ``~/.ssh/known_hosts``;
  an unknown host is refused). ``~/.ssh/config`` is not read: the inventory is
  the whole configuration.

Shell safety. Event data is untrusted; four layers keep it from becoming shell
syntax or an option:

* Quoting: in ``command``, every string value of ``input`` is passed through
  ``shlex.quote`` before it is interpolated (a list becomes quoted words joined by
  spaces: that is how ``linux.run_command``'s ``argv`` works), so ``{{ input.service
  }}`` is always one shell word: ``nginx; rm -rf /`` arrives as one argument, never as
  a second command. ``entity`` (inventory) and ``config`` (the pack's configuration)
  are operator data and are inserted verbatim.
* ``raw.X`` inserts input X verbatim: an explicit, reviewable opt-out (a ``raw.X``
  read only as a condition, ``{{ 4 if raw.fail else 0 }}``, inserts nothing). Which
  inputs are raw is read from the template (``loopd/packs/taint.py``), and the rule and
  workflow loaders (so ``loopd check``, start-up and reload) refuse a rule or task that
  gives a raw input a template reading anything but literals, ``inventory``,
  ``entity`` and ``config``, unless it lists the input in ``unsafe_shell: [X]`` (then
  a warning names it at every load). Here, a raw input holding a newline, or any
  input holding a NUL, fails the action before anything connects.
* Options: quoting makes one word, not a safe word (``-delete`` as a path is a find
  expression). Pack commands put ``--`` before operands where the tool takes it, and
  inputs that become operands declare a ``pattern`` (manifest.py), checked before
  anything runs.
* Inputs declared ``secret: true`` are shown as ``***`` in the command that results
  and errors report.

Connections are pooled per ``(address, port, username, host-key policy, credential
identity)``: the policy is the pinned key's fingerprint, the known_hosts file, ``ignore``
or the runner's default; the identity is the credentials' name and an HMAC of the
resolved username, password and key under a random per-runner salt (never the secret
itself). So an entity with another (or no) host-key trust, or another or changed
password, never rides a connection someone else authenticated; when an entity's key
changes (a rotated password file), its old connection is closed once unused. Concurrent
actions with the same key share one connection (at most ``max_sessions`` channels at
once, below OpenSSH's ``MaxSessions`` of 10). A connection found closed is dropped and
opened again, once per action; a connection that dies while a command runs fails the
action (the command may have run; task retries decide).

Result: ``{host, command, exit_status, stdout, stderr, truncated}``. stdout
keeps its first ``max_output`` bytes, stderr its last (errors come last);
``truncated`` says whether either was cut. An exit status outside the action's
``ok_exit_status`` raises ``ActionError`` with the host, the command and the
last line of stderr, carrying the same result as its ``output``: the failed step keeps
the exit status, stdout and stderr for the trace (and ``retry.when``). When the
Executor's timeout cancels a command, its channel is sent ``TERM`` and closed, even if
it was still being opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import structlog

from loopd.catalog.secrets import MASK, Secrets
from loopd.errors import ActionError
from loopd.expr.compiler import WORKFLOW_SCOPE, Compiled, compile_template
from loopd.packs.executor import ActionContext
from loopd.packs.manifest import SshAction
from loopd.packs.registry import Action
from loopd.packs.taint import ALL

log = structlog.get_logger("loopd.ssh")

COMMAND_SCOPE = WORKFLOW_SCOPE | {"raw", "config"}
PoolKey = tuple[str, int, str | None, str, str]
"""(address, port, username, host-key policy, credential identity)"""
MAX_OUTPUT = 64 * 1024
_READ_CHUNK = 32 * 1024


@dataclass(slots=True)
class _Target:
    """Where and as whom to connect; the secrets never show in its repr."""

    name: str
    address: str
    port: int
    username: str | None
    credentials: str | None = None
    password: str | None = field(default=None, repr=False)
    key_text: str | None = field(default=None, repr=False)
    known_hosts: Any = ()
    trust: str = "default"       # the host-key policy, as a name (see pool_key)
    identity: str = "ambient"    # the credentials, as a salted digest (see pool_key)

    @property
    def where(self) -> str:
        return f"ssh {self.name} ({self.address}:{self.port})"

    @property
    def pool_key(self) -> PoolKey:
        return (self.address, self.port, self.username, self.trust, self.identity)


@dataclass(slots=True)
class _Pooled:
    lock: asyncio.Lock
    sessions: asyncio.Semaphore
    conn: asyncssh.SSHClientConnection | None = None
    users: int = 0          # actions using (or waiting for) this connection right now
    retired: bool = False   # out of the pool: closed once its last user is done


class SshRunner:
    """The Runner for ``runner: ssh`` actions (see the module docstring)."""

    def __init__(self, *, connect_timeout: float = 10.0, keepalive_interval: float = 30.0,
                 max_output: int = MAX_OUTPUT, max_sessions: int = 8,
                 known_hosts: str | tuple[()] | None = (), unlisted_hosts: bool = False
                 ) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.max_output = max_output
        self.max_sessions = max_sessions
        self.known_hosts = known_hosts  # () = asyncssh's default, None = no checking
        self.unlisted_hosts = unlisted_hosts  # reach a host missing from the inventory
        self._templates: dict[tuple[str, str], Compiled] = {}
        self._pool: dict[PoolKey, _Pooled] = {}
        self._keys: dict[str, PoolKey] = {}  # inventory name -> its target's last pool key
        self._salt = secrets.token_bytes(32)  # per process: digests compare only here

    # -- the Runner protocol -------------------------------------------------------

    async def run(self, action: Action, input: dict[str, Any], ctx: ActionContext
                  ) -> dict[str, Any]:
        spec = action.spec
        if not isinstance(spec, SshAction):
            raise ActionError(f"the ssh runner cannot run a {spec.runner} action")
        _refuse_control_characters(input, action.raw_inputs)  # before anything connects
        host = self._render_host(spec, input)
        if host not in ctx.inventory.entities and not self.unlisted_hosts:
            raise ActionError(f"ssh {host}: not in the inventory; loopd connects only to "
                              "inventory hosts (an event could name any host): add it, or "
                              "set ssh: {unlisted_hosts: true} in loopd.yaml")
        entity = ctx.entity(host)
        command = self._render_command(spec, input, entity, ctx.pack_config)
        secrets = [name for name in action.secret_inputs if input.get(name)]
        shown = command if not secrets else self._render_command(
            spec, input, entity, ctx.pack_config, mask=secrets)
        target = await self._target(host, entity, ctx)
        pooled = self._pooled(target)
        pooled.users += 1
        try:
            async with pooled.sessions:
                process = await self._start(pooled, target, command, shown)
                finished = False
                try:
                    out, err = await asyncio.gather(
                        _read(process.stdout, self.max_output, keep="head"),
                        _read(process.stderr, self.max_output, keep="tail"),
                        return_exceptions=True)
                    if isinstance(out, BaseException) or isinstance(err, BaseException):
                        lost = out if isinstance(out, BaseException) else err
                        raise ActionError(f"{target.where}: connection lost while `{shown}` "
                                          f"was running: {lost}")
                    await process.wait_closed()
                    finished = True
                finally:
                    if not finished:  # cancelled (action timeout) or lost: never leak it
                        _abandon(process)
        finally:
            pooled.users -= 1
            if pooled.retired and pooled.users == 0 and pooled.conn is not None:
                pooled.conn.close()  # its last user is done: close what nothing can reuse
        # the remote side may echo a password or a secret input: never show it
        hidden = Secrets([target.password, *(input[name] for name in secrets)])
        try:
            result = self._result(spec, target, shown, process, out, err)
        except ActionError as exc:
            raise ActionError(hidden.text(str(exc)), output=hidden.tree(exc.output)) from None
        masked: dict[str, Any] = hidden.tree(result)
        return masked

    async def close(self) -> None:
        pooled, self._pool = list(self._pool.values()), {}
        conns = [p.conn for p in pooled if p.conn is not None]
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):  # a peer that never answers the close
                    await conn.wait_closed()

    def connections(self) -> int:
        """How many pooled connections are open (for tests and the API)."""
        return sum(1 for p in self._pool.values()
                   if p.conn is not None and not p.conn.is_closed())

    # -- templates -----------------------------------------------------------------

    def _compiled(self, what: str, text: str) -> Compiled:
        compiled = self._templates.get((what, text))
        if compiled is None:
            names = WORKFLOW_SCOPE if what == "host" else COMMAND_SCOPE
            try:
                compiled = compile_template(text, names)
            except ValueError as exc:
                raise ActionError(f"ssh {what} template: {exc}") from None
            self._templates[(what, text)] = compiled
        return compiled

    def _render_host(self, spec: SshAction, input: dict[str, Any]) -> str:
        host = self._compiled("host", spec.host)({"input": input})
        if not isinstance(host, str) or not host:
            raise ActionError(f"ssh host template {spec.host!r} gave {host!r}, not a host name")
        return host

    def _render_command(self, spec: SshAction, input: dict[str, Any], entity: dict[str, Any],
                        config: dict[str, Any], mask: list[str] | None = None) -> str:
        """The command to run; with ``mask``, the one to show (those inputs as ``***``)."""
        quoted = {k: _quote(k, v) for k, v in input.items()}
        if mask:
            input = {**input, **dict.fromkeys(mask, MASK)}
            quoted.update(dict.fromkeys(mask, MASK))
        scope = {"input": quoted, "raw": input, "entity": entity, "config": config}
        command = self._compiled("command", spec.command)(scope)
        if not isinstance(command, str) or not command.strip():
            raise ActionError(f"ssh command template {spec.command!r} gave an empty command")
        return command

    # -- connections ---------------------------------------------------------------

    def _pooled(self, target: _Target) -> _Pooled:
        """The pool entry of the target's key; an entry the target used before under
        another key (its password or host key changed) is retired unless another host
        still uses it."""
        key = target.pool_key
        before = self._keys.get(target.name)
        self._keys[target.name] = key
        if before is not None and before != key and before not in self._keys.values():
            old = self._pool.pop(before, None)
            if old is not None:
                old.retired = True
                if old.users == 0 and old.conn is not None:
                    old.conn.close()
                log.info("ssh credentials or host key changed, retiring the old connection",
                         host=target.name)
        pooled = self._pool.get(key)
        if pooled is None:
            pooled = self._pool[key] = _Pooled(asyncio.Lock(),
                                               asyncio.Semaphore(self.max_sessions))
        return pooled

    async def _target(self, host: str, entity: dict[str, Any], ctx: ActionContext) -> _Target:
        address = str(entity.get("address") or host)
        try:
            port = int(entity.get("port") or 22)
        except (TypeError, ValueError):
            raise ActionError(f"ssh {host}: inventory port {entity.get('port')!r} is not a number"
                              ) from None
        target = _Target(host, address, port, None)
        cred_name = entity.get("credentials")
        if cred_name:
            name = target.credentials = str(cred_name)
            target.username = await ctx.secret(name, "username")
            target.password = await ctx.secret(name, "password")
            target.key_text = await ctx.secret(name, "key")
            # who we log in as, never the secret: a changed password is another identity
            material = json.dumps([target.username, target.password, target.key_text])
            digest = hmac.new(self._salt, material.encode(), hashlib.sha256).hexdigest()
            target.identity = f"credentials {name} #{digest[:24]}"
        target.known_hosts, target.trust = self._known_hosts(target, entity)
        return target

    def _known_hosts(self, target: _Target, entity: dict[str, Any]) -> tuple[Any, str]:
        """asyncssh's ``known_hosts`` for the target, and the policy's name for the pool."""
        host_key = entity.get("host_key")
        if host_key:
            try:
                key = asyncssh.import_public_key(str(host_key))
            except (asyncssh.KeyImportError, ValueError) as exc:
                raise ActionError(f"{target.where}: inventory host_key is not an SSH public "
                                  f"key: {exc}") from None
            return ([key], [], []), f"host_key {key.get_fingerprint()}"
        known = entity.get("known_hosts")
        if known == "ignore":
            return None, "ignore"
        if known:
            path = Path(str(known)).expanduser()
            if not path.is_file():
                raise ActionError(f"{target.where}: known_hosts file {path} does not exist")
            return str(path), f"known_hosts {path}"
        return self.known_hosts, f"runner known_hosts {self.known_hosts!r}"

    async def _start(self, pooled: _Pooled, target: _Target, command: str, shown: str
                     ) -> asyncssh.SSHClientProcess[bytes]:
        """Open a channel running ``command``; reconnect once if the connection was dead."""
        for attempt in (1, 2):
            conn = await self._connection(pooled, target)
            try:
                return await _open_process(conn, command)
            except asyncssh.ChannelOpenError as exc:
                if not conn.is_closed():  # the server refused a session on a live connection
                    raise ActionError(f"{target.where}: cannot open a session: {exc.reason}"
                                      ) from None
                self._drop(pooled, conn)
                if attempt == 2:
                    raise ActionError(f"{target.where}: connection lost: {exc.reason}") from None
                log.info("ssh connection was dead, reconnecting", host=target.name)
            except (asyncssh.Error, OSError) as exc:
                self._drop(pooled, conn)
                raise ActionError(f"{target.where}: connection lost while starting `{shown}`: "
                                  f"{exc}") from None
        raise AssertionError("unreachable")

    async def _connection(self, pooled: _Pooled, target: _Target
                          ) -> asyncssh.SSHClientConnection:
        # One connect at a time per pool key: concurrent actions wait and share it.
        async with pooled.lock:
            conn = pooled.conn
            if conn is not None and conn.is_closed():
                log.info("ssh connection closed by peer, dropping it", host=target.name)
                pooled.conn = conn = None
            if conn is None:
                conn = pooled.conn = await self._connect(target)
            return conn

    def _drop(self, pooled: _Pooled, conn: asyncssh.SSHClientConnection) -> None:
        if pooled.conn is conn:
            pooled.conn = None
        conn.close()

    async def _connect(self, t: _Target) -> asyncssh.SSHClientConnection:
        options: dict[str, Any] = {
            "port": t.port, "known_hosts": t.known_hosts, "config": None,
            "connect_timeout": self.connect_timeout,
            "keepalive_interval": self.keepalive_interval,
        }
        if t.username:
            options["username"] = t.username
        if t.credentials is not None:  # only what the credentials give, nothing ambient
            options["agent_path"] = None
            options["client_keys"] = [self._private_key(t)] if t.key_text else None
            options["password"] = t.password
        user = t.username or "(local user)"
        try:
            conn = await asyncssh.connect(t.address, **options)
        except asyncssh.PermissionDenied:
            raise ActionError(f"{t.where}: authentication failed for user {user}") from None
        except asyncssh.HostKeyNotVerifiable as exc:
            raise ActionError(f"{t.where}: host key not trusted: {exc.reason} (set host_key "
                              "or known_hosts for it in the inventory)") from None
        except asyncssh.DisconnectError as exc:
            raise ActionError(f"{t.where}: cannot connect: {exc.reason}") from None
        except TimeoutError:  # connect_timeout, not the action's (that one cancels us)
            raise ActionError(f"{t.where}: cannot connect: timed out after "
                              f"{self.connect_timeout:g}s") from None
        except OSError as exc:
            raise ActionError(f"{t.where}: cannot connect: {exc.strerror or exc}") from None
        log.info("ssh connected", host=t.name, address=t.address, port=t.port, user=user)
        return conn

    def _private_key(self, t: _Target) -> asyncssh.SSHKey:
        try:
            return asyncssh.import_private_key(t.key_text or "")
        except (asyncssh.KeyImportError, ValueError) as exc:
            # exc names the format problem, never the key's content
            raise ActionError(f"{t.where}: credentials {t.credentials}: key is not a usable "
                              f"private key (give its text, e.g. key: file:/path/id_ed25519): "
                              f"{exc}") from None

    # -- results -------------------------------------------------------------------

    def _result(self, spec: SshAction, target: _Target, shown: str,
                process: asyncssh.SSHClientProcess[bytes], out: tuple[bytes, bool],
                err: tuple[bytes, bool]) -> dict[str, Any]:
        stdout = out[0].decode("utf-8", "replace")
        stderr = err[0].decode("utf-8", "replace")
        status = process.exit_status
        result = {"host": target.name, "command": shown, "exit_status": status,
                  "stdout": stdout, "stderr": stderr, "truncated": out[1] or err[1]}
        if process.exit_signal is not None:
            signal = process.exit_signal[0]
            raise ActionError(f"ssh {target.name}: `{shown}` was killed by signal {signal}"
                              + _last_line(stderr, stdout), output=result)
        if status is None:
            raise ActionError(f"ssh {target.name}: `{shown}` ended without an exit status",
                              output=result)
        if status not in spec.ok_exit_status:
            # the step keeps what the command printed: the trace shows why it failed
            raise ActionError(f"ssh {target.name}: `{shown}` exited {status}"
                              + _last_line(stderr, stdout), output=result)
        return result

def _quote(name: str, value: Any) -> Any:
    """Shell-quote what a command template interpolates (see the module docstring)."""
    if isinstance(value, str):
        return shlex.quote(value)
    if isinstance(value, list):
        if any(isinstance(v, dict | list) for v in value):
            raise ActionError(f"input {name}: a list of words holds a list or a mapping; "
                              "each element must be one string or number")
        return " ".join(shlex.quote(str(v)) for v in value)
    if isinstance(value, dict):
        return {k: _quote(f"{name}.{k}", v) for k, v in value.items()}
    return value  # numbers, booleans, None: nothing a shell would interpret


def _refuse_control_characters(input: dict[str, Any], raw: frozenset[str]) -> None:
    """No input may hold a NUL; a verbatim (``raw.``) one no newline (a second command)."""
    for name, value in input.items():
        if _holds(value, "\0"):
            raise ActionError(f"input {name} contains a NUL character: refused, nothing "
                              "was run")
        if (name in raw or ALL in raw) and _holds(value, "\n"):
            raise ActionError(f"input {name} is inserted verbatim (raw.{name}) and contains "
                              "a newline, which would start another command: refused, "
                              "nothing was run (give the command as argv)")


def _holds(value: Any, char: str) -> bool:
    if isinstance(value, str):
        return char in value
    if isinstance(value, list):
        return any(_holds(v, char) for v in value)
    if isinstance(value, dict):
        return any(_holds(k, char) or _holds(v, char) for k, v in value.items())
    return False


async def _open_process(conn: asyncssh.SSHClientConnection, command: str
                        ) -> asyncssh.SSHClientProcess[bytes]:
    """Start ``command``; if we are cancelled meanwhile, close the channel once it opens."""
    opening: asyncio.Future[asyncssh.SSHClientProcess[bytes]] = asyncio.ensure_future(
        conn.create_process(command, encoding=None, stdin=asyncssh.DEVNULL))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_when_open)
        raise


def _close_when_open(opening: asyncio.Future[asyncssh.SSHClientProcess[bytes]]) -> None:
    if opening.cancelled() or opening.exception() is not None:
        return
    _abandon(opening.result())


def _abandon(process: asyncssh.SSHClientProcess[bytes]) -> None:
    """Ask the command to stop and close its channel (no await: we may be cancelled)."""
    with contextlib.suppress(OSError, asyncssh.Error):
        process.terminate()
    process.close()


async def _read(stream: asyncssh.SSHReader[bytes], limit: int, *, keep: str
                ) -> tuple[bytes, bool]:
    """Read to EOF keeping at most ``limit`` bytes (the head or the tail); and if cut."""
    buf = bytearray()
    cut = False
    while chunk := await stream.read(_READ_CHUNK):
        if keep == "head":
            room = limit - len(buf)
            if len(chunk) > room:
                cut = True
            buf += chunk[:max(room, 0)]
        else:
            buf += chunk
            if len(buf) > limit:
                cut = True
                del buf[:len(buf) - limit]
    return bytes(buf), cut


def _last_line(*texts: str) -> str:
    for text in texts:
        lines = [line for line in text.splitlines() if line.strip()]
        if lines:
            return f": {lines[-1].strip()[:300]}"
    return ""
