"""Credentials by reference: config names where a secret lives, never the secret.

References: ``env:VAR`` (an environment variable) or ``file:/path`` (a file's
content without its trailing newline, e.g. a mounted Kubernetes secret).
Errors name the reference, never the value; nothing here logs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from loopd.errors import ConfigError

Field = Literal["username", "password", "key", "token"]


def resolve_secret(ref: str) -> str:
    """Return the secret ``ref`` points to, or raise ConfigError naming ``ref``."""
    scheme, sep, target = ref.partition(":")
    if not sep or not target:
        raise ConfigError("credential reference must be env:VAR or file:/path", origin=ref)
    if scheme == "env":
        value = os.environ.get(target)
        if value is None:
            raise ConfigError(f"environment variable {target} is not set", origin=ref)
        return value
    if scheme == "file":
        try:
            return Path(target).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read secret file: {exc.strerror}", origin=ref) from None
        except UnicodeDecodeError:
            raise ConfigError("secret file is not UTF-8 text", origin=ref) from None
    raise ConfigError(f"unknown credential scheme {scheme!r} (use env: or file:)", origin=ref)


class Credentials(BaseModel):
    """One named entry of the inventory's ``credentials:``: every field is a reference.

    ``password``, ``key`` and ``token`` are always references; ``username`` is a
    plain name unless it contains ``:`` (then it is a reference too). The model
    holds only references, so printing, logging or serialising it shows no
    secret; ``resolve(field)`` reads the secret at the moment it is used.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str | None = None
    password: str | None = None
    key: str | None = None
    token: str | None = None

    def resolve(self, field: Field) -> str | None:
        """The value behind ``field`` now (None when unset); ConfigError names the reference."""
        ref: str | None = getattr(self, field)
        if ref is None or (field == "username" and ":" not in ref):
            return ref
        return resolve_secret(ref)
