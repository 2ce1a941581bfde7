"""Run benchmark: N runs waiting for confirmation at once, resumed after a restart.

    python benchmarks/runs.py --runs 10000

Prints JSON: runs, start_per_s (triggers -> all runs waiting), runs_per_s
(confirmations delivered -> all runs fixed), resume_s (a new daemon on the same
store until every run waits again), rss_mb (peak of the process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, emit, machine, rss_mb
from loopd import logs
from loopd.config import load_config
from loopd.daemon import Daemon
from loopd.events import Delivery, Event

HERE = Path(__file__).resolve().parent


def config(folder: Path) -> Path:
    (folder / "rules").mkdir(exist_ok=True)
    (folder / "rules" / "r.yaml").write_text(
        "rules:\n  - name: wait\n    on: {source: webhook, topic: 'trigger/{host}'}\n"
        "    key: '{{ vars.host }}'\n"
        "    run: {workflow: bench.wait, input: {host: '{{ vars.host }}'}}\n")
    cfg = folder / "loopd.yaml"
    cfg.write_text(
        "listen: 127.0.0.1:0\nsources: [{name: webhook, type: webhook}]\n"
        f"rules: [rules]\npacks: [{ROOT / 'packs'}, {HERE / 'packs'}]\n"
        "store: {path: state.db}\nlog: {format: json, level: error}\n"
        )
    return cfg


async def start(cfg: Path) -> tuple[Daemon, asyncio.Task[None]]:
    daemon = Daemon(load_config(cfg))
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(on_ready=lambda _: ready.set()))
    await ready.wait()
    return daemon, task


async def until(predicate, timeout: float = 600) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        await asyncio.sleep(0.01)


async def phase_start(folder: Path, n: int) -> dict[str, object]:
    """Trigger n runs and wait until every one waits for its confirmation."""
    daemon, task = await start(config(folder))
    began = time.perf_counter()
    for i in range(n):
        await daemon.engine.emit(Delivery(Event(f"t{i}", "webhook", f"trigger/h{i}", {})))
    await until(lambda: len(daemon.tasks.hub) == n)
    start_s = time.perf_counter() - began
    daemon.stop()
    await task
    return {"start_per_s": round(n / start_s), "rss_start_mb": round(rss_mb(), 1)}


async def phase_resume(folder: Path, n: int) -> dict[str, object]:
    """A restarted daemon (a new process) resumes the n runs, then confirmations arrive."""
    began = time.perf_counter()
    daemon, task = await start(folder / "loopd.yaml")
    await until(lambda: len(daemon.tasks.hub) == n)
    resume_s = time.perf_counter() - began
    began = time.perf_counter()
    for i in range(n):
        await daemon.engine.emit(
            Delivery(Event(f"c{i}", "webhook", f"confirm/h{i}", {"ok": True})))
    await until(lambda: daemon.dispatcher.active() == 0 and len(daemon.tasks.hub) == 0)
    confirm_s = time.perf_counter() - began
    fixed = len(await daemon.store.list_runs(status="succeeded", limit=n + 1))
    daemon.stop()
    await task
    return {"resume_s": round(resume_s, 3), "runs_per_s": round(n / confirm_s),
            "fixed": fixed, "rss_resume_mb": round(rss_mb(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--phase", choices=["start", "resume"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logs.configure("json", "error")
    if args.phase == "start":
        print(json.dumps(asyncio.run(phase_start(args.dir, args.runs))))
        return
    if args.phase == "resume":
        print(json.dumps(asyncio.run(phase_resume(args.dir, args.runs))))
        return
    result: dict[str, object] = {"name": "runs", "runs": args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ("start", "resume"):  # each phase its own process: a real restart
            out = subprocess.run(
                [sys.executable, __file__, "--runs", str(args.runs), "--phase", phase,
                 "--dir", tmp], check=True, capture_output=True, text=True).stdout
            result.update(json.loads(out.strip().splitlines()[-1]))
    result["rss_mb"] = max(result["rss_start_mb"], result["rss_resume_mb"])  # type: ignore[type-var]
    result["machine"] = machine()
    emit(result)


if __name__ == "__main__":
    main()
