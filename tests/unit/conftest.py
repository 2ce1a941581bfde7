"""Fixtures shared by the unit tests: real stores on disk, real packs, rule files."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loopd.messages import CancelRun, RunCommand, StartRun
from loopd.packs.registry import PackRegistry
from loopd.rules.loader import RuleSet, load_rules
from loopd.store.base import RunRecord
from loopd.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def packs_dir(tmp_path: Path) -> Path:
    """A packs folder holding a copy of the shipped ``core`` pack only."""
    folder = tmp_path / "packs"
    shutil.copytree(REPO / "packs" / "core", folder / "core")
    return folder


@pytest.fixture
def registry(packs_dir: Path) -> PackRegistry:
    reg = PackRegistry.load([packs_dir])
    assert reg.errors == []
    return reg


RulesFrom = Callable[..., RuleSet]


@pytest.fixture
def rules_from(tmp_path: Path, registry: PackRegistry) -> RulesFrom:
    """Write YAML text to a rule file and load it, checking targets against ``core``."""
    counter = iter(range(1_000_000))

    def load(text: str, *, name: str | None = None, check: bool = True) -> RuleSet:
        folder = tmp_path / f"rules-{next(counter)}"
        folder.mkdir()
        (folder / (name or "rules.yaml")).write_text(text)
        return load_rules([folder], registry.check_target if check else None)

    return load


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open SqliteStore on a file in tmp_path, closed after the test."""
    s = SqliteStore(tmp_path / "state" / "loopd.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@dataclass
class Sent:
    """The dispatcher's command queue, as a record: runs started, runs cancelled."""

    runs: list[RunRecord] = field(default_factory=list)
    cancels: list[CancelRun] = field(default_factory=list)

    def put_nowait(self, command: RunCommand, /) -> None:
        if isinstance(command, StartRun):
            self.runs.append(command.run)
        else:
            self.cancels.append(command)
