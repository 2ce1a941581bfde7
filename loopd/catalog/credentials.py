"""Credentials by reference: config names where a secret lives, never the secret.

A reference is ``SCHEME:TARGET`` with one of these schemes (resolved by
``loopd.catalog.backends.SecretResolver``, where the cache is described):

* ``env:VAR`` — the environment variable ``VAR`` (letters, digits, ``_``).
* ``file:/abs/path`` — a file's content without its trailing newline; the path
  must be absolute.
* ``dir:KEY`` — the file ``KEY`` under ``secrets.dir`` of loopd.yaml (a mounted
  Kubernetes secret: one file per key). ``KEY`` is one or more ``/``-separated
  names of letters, digits, ``.``, ``_`` and ``-``, none starting with ``.``:
  no ``..``, no absolute path, nothing outside the directory.
* ``exec:COMMAND ARGS...`` — a helper command (a vault CLI), split like a shell
  would (``shlex``) but run without one; its stdout is the value.

Nothing here ever shows a value, even a malformed one: an error names the
credentials entry and field, and shows the reference only when it is well formed
(a known scheme with a valid target). A literal password, or a value with an
unknown scheme, is reported as ``not a reference (...); the value is not shown``.
Nothing here logs.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from loopd.errors import ConfigError

Field = Literal["username", "password", "key", "token"]
FIELDS: tuple[Field, ...] = ("username", "password", "key", "token")
Scheme = Literal["env", "file", "dir", "exec"]
SCHEMES: tuple[Scheme, ...] = ("env", "file", "dir", "exec")
USAGE = "use env:VAR, file:/path, dir:KEY or exec:COMMAND"
HIDDEN = "the value is not shown"
MAX_VALUE = 64 * 1024  # bytes of a secret file or a helper's output

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIR_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


@dataclass(frozen=True, slots=True)
class Reference:
    """A well-formed reference; its text is safe to show (it holds no value)."""

    scheme: Scheme
    target: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}"

    @property
    def argv(self) -> list[str]:
        """An ``exec:`` reference's command line as words (parse_reference checked it)."""
        return shlex.split(self.target)


def parse_reference(text: str) -> Reference:
    """``text`` as a Reference, or ConfigError saying what is wrong without showing it."""
    scheme, sep, target = text.partition(":")
    if not sep or scheme not in SCHEMES:
        raise ConfigError(f"not a reference ({USAGE}); {HIDDEN}")
    problem = _target_problem(scheme, target)
    if problem:
        raise ConfigError(f"malformed {scheme}: reference: {problem}; {HIDDEN}")
    return Reference(scheme, target)


def _target_problem(scheme: str, target: str) -> str | None:
    if "\x00" in target or "\n" in target or "\r" in target:
        return "contains a line break or NUL"
    if scheme == "env":
        return None if _ENV_NAME.fullmatch(target) else \
            "expected a variable name (letters, digits and _)"
    if scheme == "file":
        return None if target.startswith("/") else "expected an absolute path (file:/path)"
    if scheme == "dir":
        return None if _DIR_KEY.fullmatch(target) else (
            "expected a key under secrets.dir (letters, digits, . _ - and /; "
            "no .., no absolute path)")
    try:  # exec
        argv = shlex.split(target)
    except ValueError:
        return "the command line does not split into words (unbalanced quotes)"
    return None if argv else "expected a command (exec:COMMAND ARGS...)"


def resolve_secret(ref: str) -> str:
    """The value behind an ``env:`` or ``file:`` reference, read now (blocking: for
    start-up and connect paths such as a broker password, ``password_ref``).

    ConfigError names the reference when it is well formed and never shows a value;
    ``dir:`` and ``exec:`` need the resolver of inventory credentials."""
    parsed = parse_reference(ref)
    if parsed.scheme == "env":
        return env_value(parsed)
    if parsed.scheme == "file":
        return file_value(Path(parsed.target), parsed)
    raise ConfigError(f"{parsed.scheme}: references work for inventory credentials only "
                      "(use env: or file: here)", origin=str(parsed))


def env_value(ref: Reference) -> str:
    value = os.environ.get(ref.target)
    if value is None:
        raise ConfigError(f"environment variable {ref.target} is not set", origin=str(ref))
    return value


def file_value(path: Path, ref: Reference) -> str:
    """A secret file's text without its trailing newline (blocking: run it in a thread)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_VALUE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read secret file: {exc.strerror}", origin=str(ref)) from None
    if len(data) > MAX_VALUE:
        raise ConfigError(f"secret file is larger than {MAX_VALUE} bytes", origin=str(ref))
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError("secret file is not UTF-8 text", origin=str(ref)) from None


class Credentials(BaseModel):
    """One named entry of the inventory's ``credentials:``: every field is a reference.

    ``password``, ``key`` and ``token`` are always references; ``username`` is a
    plain name unless it contains ``:`` (then it is a reference too). The model
    holds only references, so printing, logging or serialising it shows no
    secret; the executor's resolver reads a value at the moment it is used
    (``await ctx.secret(name, field)``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str | None = None
    password: str | None = None
    key: str | None = None
    token: str | None = None

    def reference(self, field: Field) -> Reference | str | None:
        """``field`` as a Reference; a plain username as itself; None when unset.
        ConfigError (without the value) when the field is not a well-formed reference."""
        text: str | None = getattr(self, field)
        if text is None or (field == "username" and ":" not in text):
            return text
        return parse_reference(text)

    def problems(self) -> list[tuple[Field, str]]:
        """(field, problem) for each field that is not a well-formed reference."""
        out: list[tuple[Field, str]] = []
        for field in FIELDS:
            try:
                self.reference(field)
            except ConfigError as exc:
                out.append((field, exc.message))
        return out
