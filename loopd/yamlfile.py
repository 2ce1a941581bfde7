"""YAML as loopd reads it: YAML 1.2 booleans, so ``on:`` stays the key "on".

PyYAML follows YAML 1.1, where ``on``, ``off``, ``yes``, ``no`` are booleans;
rule files use ``on:`` as a key, so only ``true``/``false`` are booleans here.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

# libyaml's parser when PyYAML was built with it (about 10x faster on big rule sets)
_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Loader(_Base):  # type: ignore[misc]
    """SafeLoader with YAML 1.2 booleans."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def load(text: str | bytes) -> Any:
    return yaml.load(text, Loader=Loader)
