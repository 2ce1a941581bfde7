"""Fixtures of the end-to-end tests: the real ``loopd`` CLI as a subprocess.

``loopd_factory(config, env=...)`` returns a ``LoopdProcess`` (not started);
every daemon made by it is killed at teardown if still running, and when the
test failed, the tail of each daemon's log is attached to the report.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.daemon import Config, LoopdProcess

Factory = Callable[..., LoopdProcess]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for daemon in getattr(item, "_loopd_daemons", []):
            report.sections.append((f"loopd log ({daemon.config.root.name})", daemon.tail(80)))


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(root=tmp_path)


@pytest.fixture
async def loopd_factory(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    daemons: list[LoopdProcess] = []
    request.node._loopd_daemons = daemons

    def make(config: Config, env: dict[str, str] | None = None, **options: Any
             ) -> LoopdProcess:
        daemon = LoopdProcess(config, env, **options)  # token=, ssl=: see LoopdProcess
        daemons.append(daemon)
        return daemon

    try:
        yield make
    finally:
        for daemon in daemons:
            await daemon.close()
