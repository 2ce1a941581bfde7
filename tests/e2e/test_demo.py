"""``loopd demo``: the closed loop on a simulated fleet, run as a user would."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
LOOPD = Path(sys.executable).parent / "loopd"
DEMO = ROOT / "config" / "demo.yaml"
pytestmark = pytest.mark.e2e


def demo_env(tmp_path: Path) -> dict[str, str]:
    """The demo's fresh state goes under ``tmp_path`` (TMPDIR), not the machine's /tmp."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOPD_")}
    return {**base, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}


def run_ids(out: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"run (\S+) started", out)))


def assert_told_in_order(out: str) -> None:
    """Each run starts before the restart it makes; timeline times never go back."""
    lines = [line for line in out.splitlines() if re.match(r"\s+\d+\.\ds  ", line)]
    times = [float(line.split()[0].rstrip("s")) for line in lines]
    assert times == sorted(times), out
    for run_id in run_ids(out):
        start = next(i for i, line in enumerate(lines) if f"run {run_id} started" in line)
        who = lines[start].split()[1]
        restarts = [i for i, line in enumerate(lines) if line.split()[1:3] == [who, "restarted"]]
        assert restarts and restarts[0] > start, out


def assert_the_story(out: str, attempt: int) -> None:
    """Three faults detected, two fixed and verified, one escalated; only this demo's own
    runs counted, told in order with full run ids."""
    assert "web-2/nginx      degraded" in out and "db-1/postgres    degraded (stuck)" in out
    assert out.count("succeeded: fixed") == 2, f"demo {attempt}:\n{out}"
    assert "3 runs: 2 fixed and verified from telemetry, 1 escalated to a human." in out
    assert len(run_ids(out)) == 3 and all(len(i) == 20 for i in run_ids(out)), out
    assert_told_in_order(out)


def demo_logs(tmp_path: Path) -> dict[Path, str]:
    """Each demo's state folder under ``tmp_path`` and the daemon log in it."""
    return {f: (f / "loopd.log").read_text() for f in sorted(tmp_path.glob("loopd-demo-*"))}


async def test_each_demo_starts_afresh_and_the_one_left_up_stops_on_ctrl_c(
        tmp_path: Path) -> None:
    """A `loopd demo --exit`, then a `loopd demo` (within the rule's 10-minute throttle):
    each detects three faults, fixes and verifies two, escalates one and counts only its
    own runs, in a timeline in the order things happened, with no log record in it. The
    first exits; the second keeps its API up, where each run id it printed is found at
    /v1/runs/<id>, until Ctrl-C stops it with exit 0 and no traceback."""
    done = await asyncio.create_subprocess_exec(
        str(LOOPD), "demo", "--exit", "-c", str(DEMO), "--listen", f"127.0.0.1:{free_port()}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=demo_env(tmp_path))
    out_b, err_b = await asyncio.wait_for(done.communicate(), 120)
    assert done.returncode == 0, err_b.decode()[-2000:]
    assert err_b == b""  # the daemon's log is in the state folder, not here
    assert_the_story(out_b.decode(), 1)
    assert "/v1/runs" not in out_b.decode()  # --exit: no API left to point at
    (folder,) = re.findall(r"State and log of this demo: (\S+) ", out_b.decode())
    assert list(demo_logs(tmp_path)) == [Path(folder)]

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        str(LOOPD), "demo", "-c", str(DEMO), "--listen", f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=demo_env(tmp_path))
    assert proc.stdout is not None and proc.stderr is not None
    try:
        out = ""
        async with asyncio.timeout(120):
            while "Ctrl-C stops the demo" not in out:
                line = await proc.stdout.readline()
                assert line, f"the demo ended early:\n{out}"
                out += line.decode()
        assert_the_story(out, 2)
        assert f"loopd runs --url http://127.0.0.1:{port}" in out
        async with aiohttp.ClientSession() as http:
            for run_id in run_ids(out):
                async with http.get(f"http://127.0.0.1:{port}/v1/runs/{run_id}") as resp:
                    assert resp.status == 200, run_id
                    assert (await resp.json())["id"] == run_id
        proc.send_signal(signal.SIGINT)
        rest, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert "loopd demo: stopped." in rest.decode()
    assert "Traceback" not in err.decode() and "Traceback" not in rest.decode()
    logs = demo_logs(tmp_path)  # one folder of state per demo, each its own escalation
    assert len(logs) == 2 and Path(folder) in logs
    assert all("ESCALATED: postgres on db-1" in log for log in logs.values())


def test_a_taken_port_fails_at_once_with_a_hint(tmp_path: Path) -> None:
    """When the API's port is taken the demo exits 2 at once, naming the address and how to
    give it another port, instead of waiting silently."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(LOOPD), "demo", "-c", str(DEMO), "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, check=False, env=demo_env(tmp_path))
    assert done.returncode == 2
    assert done.stdout == ""
    err = done.stderr.splitlines()
    assert err[0].startswith("loopd demo: cannot start: ") and "address already in use" in err[0]
    assert err[1] == (f"  hint: something listens on 127.0.0.1:{port} already (./scripts/run, "
                      "another loopd?): stop it, or give the demo another port: loopd demo "
                      f"--listen 127.0.0.1:{port + 1}")
