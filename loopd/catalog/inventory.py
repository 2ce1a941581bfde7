"""Inventory: the entities loopd acts on and their attributes, from YAML/JSON.

```yaml
entities:
  web-1: {role: web, group: frontend, address: 10.0.0.5, credentials: ssh-web}
credentials:
  ssh-web: {username: loopd, password: "env:WEB_SSH_PASSWORD", key: "file:/etc/loopd/id_ed25519"}
```

Credentials hold references (``env:VAR``, ``file:/path``, ``dir:KEY`` or
``exec:COMMAND``, see loopd/catalog/credentials.py), never values; they are
resolved only when an action needs them and never logged or returned by the API.

A field that is not a well-formed reference (a literal password, an unknown
scheme) is a located error of ``read`` (so ``loopd check`` fails on it) that never
shows the value: ``inventory.yaml:7: credentials.ssh-web.password: not a reference
(...); the value is not shown``. ``load`` (the daemon) only warns about it, with
the same words: one bad credentials entry fails the actions that use it, not
loopd.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loopd import yamlfile
from loopd.catalog.credentials import Credentials
from loopd.errors import ConfigError

log = structlog.get_logger("loopd.inventory")


class InventoryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entities: dict[str, dict[str, Any]] = Field(default_factory=dict)
    credentials: dict[str, Credentials] = Field(default_factory=dict)


class Inventory:
    """Entities by name (what conditions and templates see) plus credential refs."""

    def __init__(self, entities: dict[str, dict[str, Any]] | None = None,
                 credentials: dict[str, Credentials] | None = None) -> None:
        self.entities: dict[str, dict[str, Any]] = entities or {}
        self.credentials: dict[str, Credentials] = credentials or {}

    def group(self, name: str) -> list[str]:
        return [k for k, v in self.entities.items() if v.get("group") == name]

    @classmethod
    def load(cls, path: Path | None) -> Inventory:
        """The inventory of ``path``; raises the first ConfigError (``read`` lists them all)."""
        inventory, errors, credential_errors = cls._read(path)
        if errors:
            raise errors[0]
        for problem in credential_errors:  # the message names entry and field, not the value
            log.warning("inventory credentials unusable", problem=str(problem))
        return inventory

    @classmethod
    def read(cls, path: Path | None) -> tuple[Inventory, list[ConfigError]]:
        """The inventory and every problem of its entities and credentials, each with its
        file:line."""
        inventory, errors, credential_errors = cls._read(path)
        return inventory, errors + credential_errors

    @classmethod
    def _read(cls, path: Path | None
              ) -> tuple[Inventory, list[ConfigError], list[ConfigError]]:
        if path is None:
            return cls(), [], []
        node: yaml.Node | None = None
        try:
            text = path.read_bytes()
            if path.suffix == ".json":
                raw = orjson.loads(text)
            else:
                raw, node = yamlfile.compose(text)
        except OSError as exc:
            raise ConfigError(f"cannot read inventory: {exc.strerror}", origin=str(path)) from None
        except yaml.YAMLError as exc:
            where, message = yamlfile.error_where(exc, path)
            raise ConfigError(message, origin=where) from None
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"invalid inventory: {exc}", origin=str(path)) from None
        try:
            parsed = InventoryFile.model_validate(raw or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{loc}: {err['msg']}", origin=str(path)) from None
        lines = _section_lines(node, path, "entities")
        errors = []
        for name, entity in parsed.entities.items():
            entity.setdefault("name", name)
            for fld, problem in entity_problems(entity, parsed.credentials):
                where = lines.get(f"{name}.{fld}", lines.get(name, str(path)))
                errors.append(ConfigError(f"entities.{name}.{fld}: {problem}", origin=where))
        lines = _section_lines(node, path, "credentials")
        credential_errors = []
        for name, creds in parsed.credentials.items():
            for cfld, problem in creds.problems():
                where = lines.get(f"{name}.{cfld}", lines.get(name, str(path)))
                credential_errors.append(
                    ConfigError(f"credentials.{name}.{cfld}: {problem}", origin=where))
        return cls(parsed.entities, parsed.credentials), errors, credential_errors


def entity_problems(entity: dict[str, Any], credentials: dict[str, Credentials]
                    ) -> list[tuple[str, str]]:
    """(field, problem) for the entity fields loopd itself reads (see loopd/packs/ssh.py):
    what would otherwise fail only when an action first reaches the host."""
    out: list[tuple[str, str]] = []
    address = entity.get("address")
    if address is not None and (not isinstance(address, str) or not address):
        out.append(("address", f"expected a host name or address, got {address!r}"))
    port = entity.get("port")
    if port is not None:
        try:
            number = int(port)
        except (TypeError, ValueError):
            number = -1
        if isinstance(port, bool) or not 0 < number < 65536:
            out.append(("port", f"expected a port number 1-65535, got {port!r}"))
    ref = entity.get("credentials")
    if ref is not None and ref not in credentials:
        known = ", ".join(sorted(credentials)) or "none"
        out.append(("credentials", f"unknown credentials {ref!r} (known: {known})"))
    host_key = entity.get("host_key")
    if host_key is not None:
        problem = _host_key_problem(host_key)
        if problem:
            out.append(("host_key", problem))
    known_hosts = entity.get("known_hosts")
    if known_hosts is not None and known_hosts != "ignore":
        if not isinstance(known_hosts, str) or not known_hosts:
            out.append(("known_hosts", f"expected a file path or 'ignore', got {known_hosts!r}"))
        elif not Path(known_hosts).expanduser().is_file():
            out.append(("known_hosts", f"file {known_hosts} does not exist "
                                       "(a known_hosts file path, or 'ignore')"))
    return out


def _host_key_problem(value: Any) -> str | None:
    import asyncssh  # only when an inventory pins host keys: it costs start-up time

    try:
        asyncssh.import_public_key(str(value))
    except (asyncssh.KeyImportError, ValueError) as exc:
        hint = " (to turn host key checking off, set known_hosts: ignore)" \
            if str(value) == "ignore" else ""
        return f"not an OpenSSH public key line ({exc}){hint}"
    return None


def _section_lines(node: yaml.Node | None, path: Path, section: str) -> dict[str, str]:
    """``name`` and ``name.field`` -> file:line, for the entries of one section
    (``entities``, ``credentials``) of a YAML inventory."""
    out: dict[str, str] = {}
    if not isinstance(node, yaml.MappingNode):
        return out
    for key, value in node.value:
        if key.value != section or not isinstance(value, yaml.MappingNode):
            continue
        for ekey, evalue in value.value:
            out[str(ekey.value)] = f"{path}:{ekey.start_mark.line + 1}"
            for fkey, fld in yamlfile.key_lines(evalue, path).items():
                out[f"{ekey.value}.{fkey}"] = fld
    return out
