"""Secret backends and their cache: ``await resolver.resolve(ref)`` is the value now.

The schemes are described in ``loopd.catalog.credentials``; here is how each is read:

* ``env:`` — ``os.environ`` at the moment of use.
* ``file:`` and ``dir:`` — read in a worker thread (never on the event loop), at most
  64 KiB, UTF-8, trailing newline dropped. ``dir:KEY`` is ``secrets.dir/KEY``; the
  resolved path (after symlinks, which Kubernetes uses for its ``..data`` swap) must
  stay inside ``secrets.dir``.
* ``exec:`` — ``asyncio.create_subprocess_exec`` (no shell), stdin closed, in its own
  process group, within ``secrets.exec_timeout`` (then the group is killed). Exit 0:
  stdout without its trailing newline is the value (empty is an error). Otherwise the
  error gives the exit status and the first line of stderr, *sanitized*: at most 120
  characters, words that look like prose are kept and every other word (a token, a
  path, a long number: what a secret looks like) is shown as ``***``. stderr is never
  shown or logged verbatim, stdout never.

Cache (loopd.yaml ``secrets:``): a value is kept in memory, never anywhere else, for
``ttl`` seconds (env/file/dir, default 0: read at each use, so a rotated file is seen
at once) or ``exec_ttl`` (default 300: a vault is not asked for every action). At most
``max_cached`` values are kept (least recently used go first); a failure is never
cached, and concurrent uses of one ``exec:`` reference share one helper run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections import OrderedDict
from pathlib import Path

from loopd.catalog.credentials import MAX_VALUE, Reference, env_value, file_value, parse_reference
from loopd.errors import ConfigError

MAX_STDERR_LINE = 120
_PROSE = re.compile(r"[(\[\"']?([A-Za-z][a-z]{0,19}|[A-Z]{1,8}|\d{1,4})[)\]\"',.:;!?]*")


class SecretResolver:
    """Resolves references (see the module docstring); holds values in memory only."""

    __slots__ = ("_cache", "_pending", "dir", "exec_timeout", "exec_ttl", "max_cached", "ttl")

    def __init__(self, *, dir: Path | None = None, ttl: float = 0.0, exec_ttl: float = 300.0,
                 exec_timeout: float = 10.0, max_cached: int = 1024) -> None:
        self.dir = dir
        self.ttl = ttl
        self.exec_ttl = exec_ttl
        self.exec_timeout = exec_timeout
        self.max_cached = max_cached
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()  # ref -> value, until
        self._pending: dict[str, asyncio.Future[str]] = {}

    def __repr__(self) -> str:  # never the values
        return f"SecretResolver({len(self._cache)} cached)"

    async def resolve(self, text: str) -> str:
        """The value behind reference ``text``; ConfigError names the reference (when well
        formed) and the problem, never a value."""
        ref = parse_reference(text)
        key = str(ref)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[1] > now:
                self._cache.move_to_end(key)
                return hit[0]
            del self._cache[key]
        pending = self._pending.get(key)
        if pending is not None:  # another use is asking the helper already: share its answer
            return await asyncio.shield(pending)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await self._read(ref)
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, ConfigError)
                                 else ConfigError("secret lookup was interrupted", origin=key))
            future.exception()  # retrieved: nobody else may be waiting
            raise
        else:
            future.set_result(value)
            self._keep(key, value, self.exec_ttl if ref.scheme == "exec" else self.ttl)
            return value
        finally:
            del self._pending[key]

    def forget(self) -> None:
        """Drop every cached value (e.g. on reload)."""
        self._cache.clear()

    def _keep(self, key: str, value: str, ttl: float) -> None:
        if ttl <= 0 or self.max_cached <= 0:
            return
        self._cache[key] = (value, time.monotonic() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)

    async def _read(self, ref: Reference) -> str:
        if ref.scheme == "env":
            return env_value(ref)
        if ref.scheme == "file":
            return await asyncio.to_thread(file_value, Path(ref.target), ref)
        if ref.scheme == "dir":
            return await asyncio.to_thread(self._dir_value, ref)
        return await self._exec(ref)

    def _dir_value(self, ref: Reference) -> str:
        if self.dir is None:
            raise ConfigError("dir: references need secrets.dir in loopd.yaml", origin=str(ref))
        base = self.dir.resolve()
        path = (base / ref.target).resolve()
        if not path.is_relative_to(base):
            raise ConfigError("the key leads outside secrets.dir", origin=str(ref))
        return file_value(path, ref)

    async def _exec(self, ref: Reference) -> str:
        argv = ref.argv
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise ConfigError(f"cannot run the helper: {exc.strerror or type(exc).__name__}",
                              origin=str(ref)) from None
        try:
            try:
                async with asyncio.timeout(self.exec_timeout):
                    out, err, status = await asyncio.gather(
                        _read_limited(proc.stdout), _read_limited(proc.stderr), proc.wait())
            except TimeoutError:
                raise ConfigError(f"the helper did not answer within {self.exec_timeout:g}s",
                                  origin=str(ref)) from None
        except BaseException:
            # timed out or cancelled: leave nothing running, not even a child the helper
            # left behind holding its pipes (it runs in its own session: one group)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.returncode is None:
                await proc.wait()
            raise
        if status != 0:
            why = f"killed by signal {-status}" if status < 0 else f"exited {status}"
            line = sanitized_line(err)
            raise ConfigError(f"the helper {why}" + (f": {line}" if line else ""),
                              origin=str(ref))
        if len(out) > MAX_VALUE:
            raise ConfigError(f"the helper printed more than {MAX_VALUE} bytes", origin=str(ref))
        try:
            value = out.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigError("the helper printed no UTF-8 text", origin=str(ref)) from None
        if not value:
            raise ConfigError("the helper printed nothing", origin=str(ref))
        return value


async def _read_limited(stream: asyncio.StreamReader | None) -> bytes:
    """Up to MAX_VALUE + 1 bytes; the rest is read and dropped so the helper can exit."""
    if stream is None:
        return b""
    data = await stream.read(MAX_VALUE + 1)
    kept = bytearray(data)
    while data:
        data = await stream.read(64 * 1024)
        if len(kept) <= MAX_VALUE:
            kept += data[:MAX_VALUE + 1 - len(kept)]
    return bytes(kept)


def sanitized_line(stderr: bytes) -> str:
    """The first non-empty line of ``stderr`` with every word that does not look like
    prose replaced by ``***``, at most MAX_STDERR_LINE characters."""
    text = stderr[:4096].decode("utf-8", "replace")
    first = next((line for line in text.splitlines() if line.strip()), "")
    words = ["".join(c for c in w if c.isprintable()) for w in first.split()]
    shown = " ".join(w if _PROSE.fullmatch(w) else "***" for w in words if w)
    return shown if len(shown) <= MAX_STDERR_LINE else shown[:MAX_STDERR_LINE - 1] + "…"
