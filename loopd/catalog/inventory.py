"""Inventory: the entities loopd acts on and their attributes, from YAML/JSON.

```yaml
entities:
  web-1: {role: web, group: frontend, address: 10.0.0.5, credentials: ssh-web}
credentials:
  ssh-web: {username: loopd, password: "env:WEB_SSH_PASSWORD", key: "file:/etc/loopd/id_ed25519"}
```

Credentials hold references (``env:VAR`` or ``file:/path``), never values;
they are resolved only when an action needs them and never logged or returned
by the API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loopd import yamlfile
from loopd.catalog.credentials import Credentials
from loopd.errors import ConfigError


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
        if path is None:
            return cls()
        try:
            text = path.read_bytes()
            raw = orjson.loads(text) if path.suffix == ".json" else yamlfile.load(text)
        except OSError as exc:
            raise ConfigError(f"cannot read inventory: {exc.strerror}", origin=str(path)) from None
        except (yaml.YAMLError, orjson.JSONDecodeError) as exc:
            raise ConfigError(f"invalid inventory: {exc}", origin=str(path)) from None
        try:
            parsed = InventoryFile.model_validate(raw or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{loc}: {err['msg']}", origin=str(path)) from None
        for name, entity in parsed.entities.items():
            entity.setdefault("name", name)
            ref = entity.get("credentials")
            if ref is not None and ref not in parsed.credentials:
                raise ConfigError(f"entities.{name}.credentials: unknown credentials {ref!r}",
                                  origin=str(path))
        return cls(parsed.entities, parsed.credentials)
