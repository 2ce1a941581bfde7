"""./scripts/run installs only when it has to, then always runs the daemon.

The script's only logic is that decision, so it runs here against a stand-in .venv
whose ``python`` is the real interpreter except that ``-m pip`` is recorded (an
install would take minutes and the network), and whose ``loopd`` records its
arguments instead of starting a daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.unit.conftest import REPO

FAKE_PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "pip $*" >> "$RUN_LOG"
  printf '#!/bin/sh\\necho "loopd $*" >> "$RUN_LOG"\\n' > "$(dirname "$0")/loopd"
  chmod +x "$(dirname "$0")/loopd"
  exit 0
fi
exec {python} "$@"
"""


def _checkout(tmp_path: Path) -> Path:
    """A folder with scripts/run, pyproject.toml and the stand-in .venv."""
    root = tmp_path / "loopd"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "run", root / "scripts" / "run")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON.format(python=sys.executable))
    (bin_dir / "python").chmod(0o755)
    return root


def _start(root: Path, log: Path) -> list[str]:
    """Run ./scripts/run once; the lines it logged (pip installs, loopd starts)."""
    log.unlink(missing_ok=True)
    subprocess.run([str(root / "scripts" / "run"), "--listen", "127.0.0.1:0"], check=True,
                   env={**os.environ, "RUN_LOG": str(log)}, timeout=60)
    return log.read_text().splitlines()


def test_scripts_run_installs_only_when_the_environment_or_pyproject_changed(
        tmp_path: Path) -> None:
    """The first start installs and writes the stamp; a second start only runs loopd; a
    changed pyproject.toml, a lost stamp or a missing loopd script installs again."""
    root = _checkout(tmp_path)
    log = tmp_path / "run.log"
    start = "loopd run -c config/loopd.yaml --listen 127.0.0.1:0"
    first = _start(root, log)
    assert [line.split()[0] for line in first] == ["pip", "loopd"]
    assert "install" in first[0] and "-e .[fast]" in first[0]
    assert first[1] == start
    assert (root / ".venv" / ".loopd-installed").is_file()

    assert _start(root, log) == [start]

    with (root / "pyproject.toml").open("a") as f:
        f.write("\n# a new dependency would go here\n")
    assert [line.split()[0] for line in _start(root, log)] == ["pip", "loopd"]
    assert _start(root, log) == [start]

    (root / ".venv" / ".loopd-installed").unlink()
    assert [line.split()[0] for line in _start(root, log)] == ["pip", "loopd"]

    (root / ".venv" / "bin" / "loopd").unlink()
    assert [line.split()[0] for line in _start(root, log)] == ["pip", "loopd"]
