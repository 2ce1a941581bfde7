"""Every shipped pack has a README that names each of its actions and workflows."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopd.packs.registry import PackRegistry
from tests.unit.conftest import REPO

PACKS = REPO / "packs"
FOLDERS = sorted(p for p in PACKS.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def _named(readme: str, pack: str, name: str) -> bool:
    """``pack.name`` anywhere, or ``name`` as code (a table row, a heading)."""
    return f"{pack}.{name}" in readme or f"`{name}`" in readme


def test_every_pack_folder_is_a_loadable_pack() -> None:
    """Each folder under packs/ is a pack that loads without errors, so the README test
    below covers every pack the daemon ships."""
    registry = PackRegistry.load([PACKS])
    assert registry.errors == []
    assert sorted(p.path.name for p in registry.packs.values()) == [f.name for f in FOLDERS]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_a_pack_readme_names_each_action_and_workflow(folder: Path) -> None:
    """packs/<pack>/README.md exists and names every action of the manifest and every
    workflow file of the pack."""
    readme_path = folder / "README.md"
    assert readme_path.is_file(), f"{folder.name} has no README.md"
    readme = readme_path.read_text()
    (loaded,) = [p for p in PackRegistry.load([PACKS]).packs.values() if p.path == folder]
    actions = [name.partition(".")[2] for name in loaded.actions]
    workflows = sorted(p.stem for p in (folder / "workflows").glob("*.yaml"))
    missing = [a for a in actions + workflows if not _named(readme, loaded.name, a)]
    assert missing == [], f"{readme_path} does not name {missing}"
    assert actions or workflows, f"{folder.name} has neither actions nor workflows"
