"""``loopd demo``: the closed loop on a simulated fleet, run as a user would."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_demo_fixes_two_faults_and_escalates_the_stuck_one(tmp_path: Path) -> None:
    """`loopd demo --exit` detects three faults, fixes and verifies two, escalates one, exits 0."""
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    text = (config / "demo.yaml").read_text().replace("../packs", str(ROOT / "packs"))
    (config / "demo.yaml").write_text(text.replace("../var/demo.db", str(tmp_path / "demo.db")))
    loopd = Path(sys.executable).parent / "loopd"
    done = subprocess.run(
        [str(loopd), "demo", "--exit", "-c", str(config / "demo.yaml"),
         "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "web-2/nginx      degraded" in out and "db-1/postgres    degraded (stuck)" in out
    assert out.count("succeeded: fixed") == 2
    assert "3 runs: 2 fixed and verified from telemetry, 1 escalated to a human." in out
    assert "ESCALATED: postgres on db-1" in done.stderr
