"""``loopd demo``: the closed loop on one machine, narrated in the terminal.

Runs the daemon on ``config/demo.yaml``: a simulated fleet (``type: sim``
source) whose services degrade on a schedule; loopd detects each one,
restarts it, confirms recovery from telemetry, and escalates the fault that no
restart fixes. The terminal shows what happens as it happens; afterwards the
API stays up so the runs can be inspected (``--exit`` stops instead).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from loopd.config import LoopdConfig
from loopd.daemon import Daemon
from loopd.runs import states
from loopd.sources.sim import Fleet
from loopd.store.base import RunRecord

_MARK: dict[str, str] = {
    states.FIXED: "fixed", states.NOT_FIXED: "NOT FIXED", states.INCONCLUSIVE: "no evidence",
    states.OUTCOME_FAILED: "FAILED -> escalated", states.OUTCOME_CANCELLED: "cancelled",
    states.DONE: "done (nothing confirmed)"}


class Narrator:
    """Prints each change of the fleet and of the runs once, as a timeline."""

    def __init__(self, daemon: Daemon, fleet: Fleet, out: TextIO) -> None:
        self.daemon = daemon
        self.fleet = fleet
        self.out = out
        self.started = time.monotonic()
        self._seen_history: dict[tuple[str, str], int] = {}
        self._seen_runs: dict[str, str] = {}
        self.finished: list[RunRecord] = []

    def say(self, who: str, what: str) -> None:
        print(f"{time.monotonic() - self.started:6.1f}s  {who:<16} {what}", file=self.out,
              flush=True)

    async def step(self) -> None:
        for (host, name), svc in self.fleet.services.items():
            seen = self._seen_history.get((host, name), 0)
            for line in svc.history[seen:]:
                self.say(f"{host}/{name}", line.split(maxsplit=1)[1])
            self._seen_history[(host, name)] = len(svc.history)
        for run in reversed(await self.daemon.store.list_runs(limit=200)):
            before = self._seen_runs.get(run.id)
            if before == run.status:
                continue
            self._seen_runs[run.id] = run.status
            who = run.key or "-"
            if run.status in states.FINAL:
                took = (run.finished or 0) - run.created
                verdict = _MARK.get(run.outcome or "", run.outcome or run.status)
                self.say(who, f"run {run.id[-6:]} {run.status}: {verdict} ({took:.1f}s)")
                self.finished.append(run)
            elif before is None:
                self.say(who, f"run {run.id[-6:]} started: {run.target}")
            elif run.status == states.WAITING:
                self.say(who, f"run {run.id[-6:]} waiting for telemetry to confirm the fix")

    def quiet(self) -> bool:
        return (self.fleet.done and self.daemon.dispatcher.active() == 0
                and not self.daemon.engine.open_incidents())


async def demo(config: LoopdConfig, *, exit_when_done: bool, out: TextIO = sys.stdout) -> int:
    daemon = Daemon(config)
    if not daemon.fleets:
        print("loopd demo: the config has no `type: sim` source", file=sys.stderr)
        return 2
    fleet = next(iter(daemon.fleets.values()))
    ready = asyncio.Event()
    runner = asyncio.create_task(daemon.run(on_ready=lambda _: ready.set()), name="daemon")
    await ready.wait()
    fleet.started = time.monotonic()
    narrator = Narrator(daemon, fleet, out)
    hosts = ", ".join(sorted({h for h, _ in fleet.services}))
    print(f"loopd demo: watching a simulated fleet ({hosts}); faults are coming...\n",
          file=out, flush=True)
    try:
        # settle for a few seconds after the last fault so late runs show up
        calm_since: float | None = None
        while True:
            await narrator.step()
            if narrator.quiet():
                calm_since = calm_since or time.monotonic()
                if time.monotonic() - calm_since > 2.0:
                    break
            else:
                calm_since = None
            await asyncio.sleep(0.2)
        fixed = sum(r.outcome == states.FIXED for r in narrator.finished)
        escalated = len(narrator.finished) - fixed
        api = f"http://127.0.0.1:{daemon.port}"
        print(f"\n{len(narrator.finished)} runs: {fixed} fixed and verified from telemetry, "
              f"{escalated} escalated to a human.\nInspect them: {api}/v1/runs  "
              f"(one run: {api}/v1/runs/<id>)", file=out, flush=True)
        if not exit_when_done:
            print("The API stays up; Ctrl-C stops the demo.", file=out, flush=True)
            await runner
            return 0
    finally:
        daemon.stop()
        await runner
    return 0
