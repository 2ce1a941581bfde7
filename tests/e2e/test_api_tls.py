"""The real ``loopd run``: a rotated TLS certificate is served after SIGHUP, and a
non-loopback listen without auth stops the start with exit code 2."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme

from tests.e2e.conftest import Factory
from tests.e2e.daemon import LOOPD, Config, eventually
from tests.servers import free_port

pytestmark = pytest.mark.e2e

VIEWER = "viewer-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


def write_cert(ca: trustme.CA, name: str, cert: Path, key: Path) -> None:
    leaf = ca.issue_cert("127.0.0.1", common_name=name)
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))


async def served_name(port: int, ctx: ssl.SSLContext) -> str:
    """The common name of the certificate a new connection to ``port`` is handshaken with."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        peer = writer.get_extra_info("ssl_object").getpeercert()
        return str(dict(x[0] for x in peer["subject"])["commonName"])
    finally:
        writer.close()
        await writer.wait_closed()


async def status_with(url: str, token: str, ctx: ssl.SSLContext) -> int:
    """The status of ``GET /v1/runs`` with ``token``, on a new connection."""
    async with aiohttp.ClientSession() as http, http.get(
            f"{url}/v1/runs", ssl=ctx, headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status


async def test_sighup_serves_a_rotated_certificate_to_new_connections(
        config: Config, loopd_factory: Factory, tmp_path: Path) -> None:
    """After the certificate and token files are replaced and loopd gets SIGHUP, new
    connections are handshaken with the new certificate (from another CA) and the old
    token is refused, without a restart."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    write_cert(old_ca, "loopd-before", cert, key)
    (tmp_path / "viewer").write_text(VIEWER)
    (tmp_path / "admin").write_text(ADMIN)
    config.extra = {"api": {"tls": {"cert": str(cert), "key": str(key)}, "auth": {"tokens": [
        {"name": "dash", "role": "viewer", "token": f"file:{tmp_path / 'viewer'}"},
        {"name": "root", "role": "admin", "token": f"file:{tmp_path / 'admin'}"}]}}}
    client = ssl.create_default_context()
    old_ca.configure_trust(client)
    new_ca.configure_trust(client)
    daemon = loopd_factory(config, ssl=client, token=ADMIN)
    await daemon.start()
    assert await served_name(daemon.port, client) == "loopd-before"
    assert (await daemon.get("/v1/runs"))["runs"] == []
    assert await status_with(daemon.url, VIEWER, client) == 200

    write_cert(new_ca, "loopd-after", cert, key)
    (tmp_path / "viewer").write_text(VIEWER + "-rotated")
    daemon.signal(signal.SIGHUP)

    async def rotated() -> bool:
        return await served_name(daemon.port, client) == "loopd-after"

    await eventually(rotated, "new connections to get the rotated certificate")
    only_new = ssl.create_default_context()
    new_ca.configure_trust(only_new)
    assert await served_name(daemon.port, only_new) == "loopd-after"

    async def new_token_accepted() -> bool:
        return await status_with(daemon.url, VIEWER + "-rotated", client) == 200

    await eventually(new_token_accepted, "the rotated viewer token to be accepted")
    assert await status_with(daemon.url, VIEWER, client) == 401
    assert daemon.starts == 1 and daemon.running
    await daemon.stop()


async def test_a_non_loopback_listen_without_auth_exits_2_naming_the_fix(
        config: Config) -> None:
    """``loopd run --listen 0.0.0.0:PORT`` with no ``api.auth`` refuses to start (exit 2)
    and says how to fix it."""
    path = config.write()
    proc = await asyncio.create_subprocess_exec(
        str(LOOPD), "run", "-c", str(path), "--listen", f"0.0.0.0:{free_port()}",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=config.root)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2
    assert b"refusing to listen on 0.0.0.0:" in err and b"without authentication" in err
