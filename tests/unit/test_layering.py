"""The package layering: no import cycle between loopd packages, nothing imports upward."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "loopd"

# What each package may import (besides the bottom modules errors, events, units, yamlfile,
# metrics). Lower layers come first; a package never imports one listed after it.
BOTTOM = {"errors", "events", "units", "yamlfile", "metrics", "logs", "clock", "policy",
          "__version__", "loopd"}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "loopd"


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("").parts
        me = rel[0] if rel[0] != "__init__" else "loopd"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.split(".")[0] == "loopd":
                names = ([f"loopd.{a.name}" for a in node.names] if node.module == "loopd"
                         else [node.module])
                for name in names:
                    if _unit(name) != me:
                        edges[me].add(_unit(name))
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_packages() -> None:
    """No loopd package imports another that (directly or not) imports it back."""
    assert _cycle(_graph()) is None


def test_ground_floor_and_language_do_not_import_upward() -> None:
    """expr imports only the bottom; rules and packs never import workflow, decide or runs."""
    edges = _graph()
    assert edges["expr"] <= BOTTOM, edges["expr"]
    for low in ("rules", "packs", "catalog", "store", "sources", "expr"):
        assert not edges[low] & {"workflow", "decide", "runs", "daemon", "api", "simulate"}, (
            low, edges[low])


def test_the_api_sees_loopd_only_through_the_control_facade() -> None:
    """loopd/api imports neither the engine, the dispatcher nor the daemon: only Control
    (and events for the ingest path, run state names for queries)."""
    for path in (ROOT / "api").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in ("loopd.decide.engine", "loopd.runs.dispatcher",
                                           "loopd.daemon", "loopd.wiring"), (path, node.module)
                assert not node.module.startswith("loopd.decide"), (path, node.module)
