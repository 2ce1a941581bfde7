"""``loopd demo``: the closed loop on one machine, narrated in the terminal.

Runs the daemon on ``config/demo.yaml``: a simulated fleet (``type: sim``
source) whose services degrade on a schedule; loopd detects each one,
restarts it, confirms recovery from telemetry, and escalates the fault that no
restart fixes. The terminal shows what happens as it happens; afterwards the
API stays up so the runs can be inspected (``--exit`` stops instead).

Every demo starts from fresh state: its store and the daemon's log live in a new
directory (``fresh_state``), whatever the config's ``store:`` says, so a second demo
within the rule's throttle window fixes its faults again, and its summary counts its
own runs only. The log goes to a file there, not to the terminal, so no log record
(the escalation's multi-line message) breaks into the timeline.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from loopd.config import LoopdConfig
from loopd.daemon import Daemon
from loopd.errors import StoreError
from loopd.runs import states
from loopd.sources.sim import Fleet
from loopd.store.base import RunRecord

_MARK: dict[str, str] = {
    states.FIXED: "fixed", states.NOT_FIXED: "NOT FIXED", states.INCONCLUSIVE: "no evidence",
    states.OUTCOME_FAILED: "FAILED", states.OUTCOME_CANCELLED: "cancelled",
    states.DONE: "done (nothing confirmed)"}

# In one poll several things may have happened within the same tenth of a second (the
# fleet's history has that resolution): a run starts before the restart it makes, and
# ends after the recovery that confirmed it.
_STARTED, _FLEET, _ENDED = 0, 1, 2


@dataclass(frozen=True, slots=True)
class State:
    """Where one demo keeps its store and the daemon's log."""

    folder: Path

    @property
    def store(self) -> Path:
        return self.folder / "demo.db"

    @property
    def log(self) -> Path:
        return self.folder / "loopd.log"


def fresh_state(config: LoopdConfig) -> tuple[LoopdConfig, State]:
    """``config`` with its store moved to a new SQLite file of its own (a new directory
    under the system's temporary one, kept after the demo so it can be looked at)."""
    state = State(Path(tempfile.mkdtemp(prefix="loopd-demo-")))
    store = config.store.model_copy(update={"type": "sqlite", "path": state.store})
    return config.model_copy(update={"store": store}), state


class Narrator:
    """Prints each change of the fleet and of the runs once, as a timeline in the order
    things happened."""

    def __init__(self, daemon: Daemon, fleet: Fleet, out: TextIO) -> None:
        self.daemon = daemon
        self.fleet = fleet
        self.out = out
        # the fleet's history counts from fleet.started (monotonic), a run's times are
        # wall-clock: both are shown as seconds since this moment
        self.started = fleet.started
        self.started_wall = time.time() - (time.monotonic() - fleet.started)
        self._seen_history: dict[tuple[str, str], int] = {}
        self._seen_runs: dict[str, str] = {}
        self.finished: list[RunRecord] = []

    def say(self, at: float, who: str, what: str) -> None:
        print(f"{at:6.1f}s  {who:<16} {what}", file=self.out, flush=True)

    async def step(self) -> None:
        lines: list[tuple[float, int, str, str]] = []
        for (host, name), svc in self.fleet.services.items():
            seen = self._seen_history.get((host, name), 0)
            for line in svc.history[seen:]:
                when, what = line.split(maxsplit=1)  # "  3.0s restarted"
                lines.append((float(when.rstrip("s")), _FLEET, f"{host}/{name}", what))
            self._seen_history[(host, name)] = len(svc.history)
        for run in await self.daemon.store.list_runs(limit=200):
            if "/" in run.id:  # a sub-workflow's run: its parent tells the story
                continue
            lines += self._run_lines(run)
        for at, _, who, what in sorted(lines, key=lambda line: (round(line[0], 1), line[1])):
            self.say(at, who, what)

    def _run_lines(self, run: RunRecord) -> list[tuple[float, int, str, str]]:
        before = self._seen_runs.get(run.id)
        if before == run.status:
            return []
        self._seen_runs[run.id] = run.status
        who = run.key or "-"
        lines = []
        if before is None:
            lines.append((run.created - self.started_wall, _STARTED, who,
                          f"run {run.id} started: {run.target}"))
        if run.status in states.FINAL:
            end = run.finished or time.time()
            verdict = _MARK.get(run.outcome or "", run.outcome or run.status)
            verdict += f" ({end - run.created:.1f}s)"
            if run.outcome != states.FIXED and run.reason:
                verdict += f": {run.reason}"
            lines.append((end - self.started_wall, _ENDED, who,
                          f"run {run.id} {run.status}: {verdict}"))
            self.finished.append(run)
        return lines

    def quiet(self) -> bool:
        return (self.fleet.done and self.daemon.dispatcher.active() == 0
                and not self.daemon.engine.open_incidents())

    def elapsed(self) -> float:
        return time.monotonic() - self.started


async def demo(config: LoopdConfig, state: State, *, exit_when_done: bool,
               out: TextIO = sys.stdout) -> int:
    """Run the scenario; OSError when the API cannot listen (the CLI explains it)."""
    daemon = Daemon(config)
    if not daemon.fleets:
        print("loopd demo: the config has no `type: sim` source", file=sys.stderr)
        return 2
    fleet = next(iter(daemon.fleets.values()))
    ready = asyncio.Event()
    runner = asyncio.create_task(daemon.run(on_ready=lambda _: ready.set()), name="daemon")
    waiting = asyncio.create_task(ready.wait(), name="demo-ready")
    # a daemon that cannot start (the port is taken) ends before it is ready: its error
    # is the demo's, at once
    await asyncio.wait({runner, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.is_set():
        waiting.cancel()
        await runner  # raises what stopped it
        return 2
    fleet.started = time.monotonic()
    narrator = Narrator(daemon, fleet, out)
    hosts = ", ".join(sorted({h for h, _ in fleet.services}))
    print(f"loopd demo: watching a simulated fleet ({hosts}); faults are coming...\n",
          file=out, flush=True)
    try:
        if not await _narrate(narrator, runner):
            print("\nloopd demo: stopped.", file=out, flush=True)
            return 0
        fixed = sum(r.outcome == states.FIXED for r in narrator.finished)
        escalated = len(narrator.finished) - fixed
        print(f"\n{len(narrator.finished)} runs: {fixed} fixed and verified from telemetry, "
              f"{escalated} escalated to a human.", file=out, flush=True)
        if exit_when_done:
            print(f"State and log of this demo: {state.folder} (the next demo starts afresh).",
                  file=out, flush=True)
            return 0
        url = f"http://127.0.0.1:{daemon.port}"
        cli = _command()
        print(f"Inspect them: {cli} runs --url {url}, then {cli} show --url {url} <run id>\n"
              f"  (or in a browser: {url}/, or the API: {url}/v1/runs)\n"
              "The API stays up; Ctrl-C stops the demo.", file=out, flush=True)
        await runner
        print("\nloopd demo: stopped.", file=out, flush=True)
        return 0
    finally:
        daemon.stop()
        await runner


async def _narrate(narrator: Narrator, runner: asyncio.Task[None]) -> bool:
    """Narrate until the scenario is over (True) or the daemon stopped (Ctrl-C: False)."""
    calm_since: float | None = None  # settle for a while after the last fault: late runs
    while not runner.done():
        try:
            await narrator.step()
        except StoreError:  # closed under it: Ctrl-C stopped the daemon meanwhile
            await asyncio.wait({runner}, timeout=5.0)
            if runner.done():
                return False
            raise
        if narrator.quiet():
            calm_since = calm_since or narrator.elapsed()
            if narrator.elapsed() - calm_since > 2.0:
                return True
        else:
            calm_since = None
        await asyncio.sleep(0.2)
    return False


def _command() -> str:
    """How to run loopd again from here: ``loopd`` when that is the one on PATH, else the
    path this one was started by (``.venv/bin/loopd`` after ./scripts/run)."""
    started = Path(sys.argv[0])
    found = shutil.which("loopd")
    if found is not None and started.name == "loopd" and Path(found).resolve() == \
            started.resolve():
        return "loopd"
    return str(started) if started.name == "loopd" else "loopd"
