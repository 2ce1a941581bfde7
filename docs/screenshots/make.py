"""Screenshots of the web UI for the README: ``.venv/bin/python docs/screenshots/make.py``.

Starts ``loopd run`` on a copy of ``config/demo.yaml`` (the simulated fleet: two faults
fixed, one escalated) on a free port with a fresh store, and saves ``incidents.png``
(while the stuck fault is still being worked on) and ``trace.png`` (once it has been
escalated: the top of that run's trace) next to this file, with Debian's chromium
(``/usr/bin/chromium``, or ``LOOPD_TEST_CHROMIUM``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.async_api import async_playwright

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("LOOPD_TEST_CHROMIUM", "/usr/bin/chromium")
FINAL = {"succeeded", "failed", "timed_out", "cancelled", "crashed", "rejected", "expired"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runs(url: str) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"{url}/v1/runs", timeout=5) as answer:
        return list(json.load(answer)["runs"])


def wait_for_runs(url: str, ended: int, active: int, timeout: float = 90.0
                  ) -> list[dict[str, object]]:
    """Poll until at least ``ended`` runs have ended and exactly ``active`` have not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = runs(url)
        except OSError:
            found = []
        final = sum(r["status"] in FINAL for r in found)
        if final >= ended and len(found) - final == active:
            return found
        time.sleep(0.2)
    raise SystemExit(f"the demo did not reach {ended} ended and {active} active runs "
                     f"within {timeout:g}s")


async def shoot(url: str) -> None:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1100, "height": 560},
                                      device_scale_factor=1)
        # the incidents page while the stuck fault is still being worked on
        await asyncio.to_thread(wait_for_runs, url, 2, 1)
        await page.goto(url + "/")
        await page.locator(".live.on").wait_for(timeout=10_000)
        await page.screenshot(path=str(HERE / "incidents.png"))
        ended = await asyncio.to_thread(wait_for_runs, url, 3, 0)
        escalated = next(str(r["id"]) for r in ended if r["outcome"] != "fixed")
        await page.set_viewport_size({"width": 1100, "height": 700})
        await page.goto(f"{url}/runs/{escalated}")
        # from the trigger to the first failed confirmation and the retry: the whole
        # page is twice as tall, and over the README's 300 KB per picture
        await page.screenshot(path=str(HERE / "trace.png"), full_page=True,
                              clip={"x": 0, "y": 0, "width": 1100, "height": 2000})
        await browser.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config"
        shutil.copytree(ROOT / "config", config)
        text = (config / "demo.yaml").read_text().replace("../packs", str(ROOT / "packs"))
        (config / "demo.yaml").write_text(
            text.replace("../var/demo.db", str(Path(tmp) / "demo.db")))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        loopd = Path(sys.executable).parent / "loopd"
        daemon = subprocess.Popen([str(loopd), "run", "-c", str(config / "demo.yaml"),
                                   "--listen", f"127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(shoot(url))
        finally:
            daemon.terminate()
            daemon.wait(timeout=15)
    for name in ("incidents.png", "trace.png"):
        print(f"{HERE / name}: {(HERE / name).stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
