"""The real Alertmanager (Debian's ``prometheus-alertmanager``) notifies a loopd whose API
needs a token, configured the way Alertmanager's documentation says: ``http_config``
with ``authorization: {credentials_file}`` or ``basic_auth: {username, password_file}``.

An alert is posted to Alertmanager's ``/api/v2/alerts``; Alertmanager groups it
(``group_wait: 100ms``) and posts the webhook to loopd, which decides it. With a wrong
token loopd answers 401, decides nothing, and Alertmanager logs the failed notification.
The test skips where the binary is missing (``./scripts/test`` installs it as root) and
fails under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, eventually
from tests.servers import free_port, require

pytestmark = pytest.mark.e2e

INGEST = "am-ingest-token-6c1d2e3f4a5b"
ADMIN = "admin-token-9f8e7d6c5b4a3210"
BINARY = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


class Alertmanager:
    """One real Alertmanager process on a free loopback port, its log in a file."""

    def __init__(self, root: Path, http_config: dict[str, Any], webhook: str) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "alertmanager.log"
        self.proc: asyncio.subprocess.Process | None = None
        (root / "alertmanager.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "loopd", "group_by": ["alertname", "instance"],
                      "group_wait": "100ms", "group_interval": "1s",
                      "repeat_interval": "1h"},
            "receivers": [{"name": "loopd", "webhook_configs": [{
                "url": webhook, "send_resolved": False, "http_config": http_config,
                "max_alerts": 0}]}],
        }))

    async def start(self) -> None:
        assert BINARY is not None
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                BINARY, f"--config.file={self.root / 'alertmanager.yml'}",
                f"--storage.path={self.root / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=", "--log.level=debug",
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT)
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:
                assert self.proc is not None
                assert self.proc.returncode is None, self.log.read_text()[-2000:]
                try:
                    async with http.get(f"{self.url}/-/ready") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(ready, "Alertmanager to be ready")

    async def fire(self, alertname: str, instance: str) -> None:
        alert = {"labels": {"alertname": alertname, "instance": instance,
                            "severity": "critical", "job": "node"},
                 "annotations": {"summary": f"{alertname} on {instance}"},
                 "startsAt": datetime.now(UTC).isoformat()}
        async with aiohttp.ClientSession() as http, \
                http.post(f"{self.url}/api/v2/alerts", json=[alert]) as resp:
            assert resp.status == 200, await resp.text()

    def logged(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()




@pytest.fixture
def secured(config: Config, tmp_path: Path) -> Config:
    """loopd with an alertmanager source, a rule for critical alerts, and two tokens."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "alertmanager").write_text(INGEST + "\n")
    (secrets / "root").write_text(ADMIN + "\n")
    config.sources = [{"name": "alertmanager", "type": "alertmanager"}]
    config.rules = {"alerts.yaml": [{
        "name": "page-on-critical",
        "on": {"source": "alertmanager", "match": {"status": "firing"}},
        "if": "event.labels.severity == 'critical'",
        "key": "{{ event.labels.instance }}",
        "run": {"action": "core.log", "input": {"message": "{{ event.labels.alertname }}"}},
    }]}
    config.extra = {"api": {"auth": {"tokens": [
        {"name": "alertmanager", "role": "ingest", "token": f"file:{secrets / 'alertmanager'}"},
        {"name": "root", "role": "admin", "token": f"file:{secrets / 'root'}"},
    ], "open": ["healthz"]}}}
    return config


@pytest.fixture
async def alertmanager(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    require(BINARY is not None, "prometheus-alertmanager (Debian: apt-get install "
                                "prometheus-alertmanager)")
    started: list[Alertmanager] = []

    async def start(http_config: dict[str, Any], webhook: str) -> Alertmanager:
        am = Alertmanager(tmp_path, http_config, webhook)
        started.append(am)
        await am.start()
        return am

    try:
        yield start
    finally:
        for am in started:
            await am.close()


@pytest.mark.parametrize("scheme", ["authorization", "basic_auth"])
async def test_alertmanager_with_its_token_gets_its_alert_decided(
        secured: Config, loopd_factory: Factory, alertmanager: Callable[..., Any],
        tmp_path: Path, scheme: str) -> None:
    """Alertmanager sending the ingest token from ``credentials_file`` (bearer) or as
    ``basic_auth`` password (user name: the token's name) gets its alert decided by loopd."""
    daemon = loopd_factory(secured, token=ADMIN)
    await daemon.start()
    credentials = tmp_path / "am-credentials"
    credentials.write_text(INGEST + "\n")
    http_config = ({"authorization": {"type": "Bearer", "credentials_file": str(credentials)}}
                   if scheme == "authorization" else
                   {"basic_auth": {"username": "alertmanager",
                                   "password_file": str(credentials)}})
    am = await alertmanager(http_config, f"{daemon.url}/v1/alertmanager")
    await am.fire("NodeDown", "web-1")
    (run,) = await daemon.wait_runs(1, status="succeeded")
    assert (run["rule"], run["key"]) == ("page-on-critical", "web-1")
    story = await daemon.run(run["id"])
    assert story["trigger"]["data"]["receiver"] == "loopd"
    assert await daemon.metric("loopd_api_refused_total", route="alertmanager",
                               reason="unauthenticated") == 0


async def test_alertmanager_with_a_wrong_token_gets_401_and_nothing_is_decided(
        secured: Config, loopd_factory: Factory, alertmanager: Callable[..., Any],
        tmp_path: Path) -> None:
    """A wrong token in ``credentials_file`` is refused 401: Alertmanager logs the failed
    notification, loopd logs the refusal (without the token) and decides nothing."""
    daemon = loopd_factory(secured, token=ADMIN)
    await daemon.start()
    wrong = "not-the-ingest-token-0000"
    credentials = tmp_path / "am-credentials"
    credentials.write_text(wrong + "\n")
    am = await alertmanager({"authorization": {"credentials_file": str(credentials)}},
                            f"{daemon.url}/v1/alertmanager")
    await am.fire("NodeDown", "web-1")

    async def refused() -> bool:
        return await daemon.metric("loopd_api_refused_total", route="alertmanager",
                                   reason="unauthenticated") >= 1

    await eventually(refused, "loopd to refuse Alertmanager's notification")
    await eventually(lambda: am.logged("401"), "Alertmanager to log the 401")
    assert await daemon.runs() == []
    assert await daemon.metric("loopd_events_received_total", source="alertmanager") == 0
    lines = daemon.log_lines()
    assert any(line.get("event") == "API request refused" and line.get("client") ==
               "127.0.0.1" and line.get("route") == "alertmanager" for line in lines)
    assert wrong not in daemon.log.read_text()
