"""Simulation benchmark: ``loopd simulate`` on NAB telemetry with the shipped rules.

    python benchmarks/simulate.py --copies 5 --alerts 0.02 --format jsonl csv

The ten NAB CPU series (../shared/data/nab, 5-minute samples) are replayed ``--copies``
times as a fleet: copy c of series S is host ``S-c``, its timestamps shifted by c
minutes; after a sample, with probability ``--alerts``, comes an Alertmanager
notification about the host (a critical alert: most start a run). Rules: the shipped
``rules/examples.yaml`` (``high-cpu-sustained``: ``for: 5m`` + throttle, and
``log-critical-alerts``) plus one rule whose workflow acts and waits for the CPU to come
down (a confirm task fed by the replay). ``jsonl`` is one time-ordered JSON Lines file;
``csv`` is one CSV file per host, merged by the replay.

The real CLI runs as a subprocess (``loopd simulate ... --report``); prints one JSON object
per format: events, runs and their outcomes, seconds and events_per_s of the replay (from
the report), total_s of the command, its peak RSS (from the report), and the machine.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, alert_corpus, emit, machine

NAB = ROOT.parent / "shared" / "data" / "nab"
SERIES = sorted(NAB.glob("*cpu_utilization*.csv"))

RULES = """\
rules:
  - name: cpu-sustained-fix
    on: {source: webhook, topic: "telemetry/{host}/cpu"}
    if: "event.value > 95"
    key: "{{ vars.host }}"
    for: 10m
    throttle: {once_within: 1h}
    run: {workflow: simbench.cool_down, input: {host: "{{ vars.host }}"}}
"""

PACK = "name: simbench\nactions: {}\n"

WORKFLOW = """\
input: [host]
tasks:
  act:
    action: core.log
    input: {message: "would restart the busy service on {{ ctx.host }}"}
    next: verify
  verify:
    confirm:
      event: {source: webhook, topic: "telemetry/{{ ctx.host }}/cpu", if: "event.value < 80"}
      within: 30m
"""


def series() -> list[tuple[str, list[tuple[float, float]]]]:
    out = []
    for path in SERIES:
        rows = []
        for line in path.read_text().splitlines()[1:]:
            stamp, value = line.split(",")
            when = datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp()
            rows.append((when, float(value)))
        out.append((path.stem, rows))
    return out


def write_inputs(folder: Path, copies: int, fmt: str, alerts: float) -> list[str]:
    """The event files (as ``--events`` arguments) of the fleet."""
    rng = random.Random(7)
    corpus = [a for a in alert_corpus() if a["severity"] == "critical"][:50]
    lines: list[tuple[float, bytes]] = []
    args: list[str] = []
    for stem, rows in series():
        for c in range(copies):
            host, shift = f"{stem}-{c}", 60.0 * c
            if fmt == "csv":
                path = folder / f"{host}.csv"
                path.write_text("timestamp,value\n" + "".join(
                    f"{t + shift:.0f},{v}\n" for t, v in rows))
                args.append(f"{path}:metric=cpu")
            for t, v in rows:
                if fmt == "jsonl":
                    lines.append((t + shift, orjson.dumps({
                        "id": f"{host}@{t + shift:.0f}", "topic": f"telemetry/{host}/cpu",
                        "key": host, "time": t + shift, "data": {"value": v}})))
                if rng.random() < alerts:  # an Alertmanager notification about this host
                    alert = rng.choice(corpus)
                    at = datetime.fromtimestamp(t + shift + 1, UTC).isoformat()
                    lines.append((t + shift + 1, orjson.dumps({"version": "4", "alerts": [{
                        "status": "firing", "startsAt": at, "endsAt": "0001-01-01T00:00:00Z",
                        "labels": {"alertname": alert["alert"], "severity": "critical",
                                   "instance": host},
                        "annotations": {"summary": alert["summary"]}}]})))
    lines.sort(key=lambda item: item[0])
    path = folder / "events.jsonl"
    path.write_bytes(b"\n".join(line for _, line in lines) + b"\n")
    return [str(path), *args]


def config(folder: Path) -> Path:
    (folder / "rules").mkdir()
    (folder / "rules" / "bench.yaml").write_text(RULES)
    (folder / "packs" / "simbench" / "workflows").mkdir(parents=True)
    (folder / "packs" / "simbench" / "pack.yaml").write_text(PACK)
    (folder / "packs" / "simbench" / "workflows" / "cool_down.yaml").write_text(WORKFLOW)
    cfg = folder / "loopd.yaml"
    cfg.write_text(
        "sources: [{name: webhook, type: webhook}, {name: alertmanager, type: alertmanager}]\n"
        f"rules: [{ROOT / 'rules'}, rules]\npacks: [{ROOT / 'packs'}, packs]\n"
        "log: {format: json, level: error}\n")
    return cfg


def measure(cfg: Path, inputs: list[str], folder: Path) -> dict[str, Any]:
    out = folder / "report.json"
    cmd = [str(Path(sys.executable).parent / "loopd"), "simulate", "-c", str(cfg),
           "--csv-source", "webhook", "--no-progress", "--report", str(out), "--events",
           *inputs]
    began = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - began
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    report["total_s"] = round(total, 3)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=5, help="hosts per NAB series")
    parser.add_argument("--alerts", type=float, default=0.02,
                        help="probability of an Alertmanager notification after a sample")
    parser.add_argument("--format", nargs="+", choices=["jsonl", "csv"], default=["jsonl"])
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate is not None:  # a process of its own: the one measured stays small
        print(orjson.dumps(write_inputs(args.generate, args.copies, args.format[0],
                                        args.alerts)).decode())
        return
    for fmt in args.format:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            # jsonl: one file with everything; csv: telemetry per host, alerts in JSON Lines
            made = subprocess.run(
                [sys.executable, __file__, "--generate", tmp, "--copies", str(args.copies),
                 "--alerts", str(args.alerts), "--format", fmt],
                check=True, capture_output=True, text=True).stdout
            inputs: list[str] = orjson.loads(made)
            report = measure(config(folder), inputs, folder)
        runs = report["runs"]
        emit({"name": "simulate", "format": fmt, "files": len(inputs),
              "events": report["events"]["read"], "decisions": report["decisions"],
              "runs": runs["created"], "outcomes": runs["by_outcome"],
              "seconds": report["wall"]["seconds"],
              "events_per_s": report["wall"]["events_per_s"], "total_s": report["total_s"],
              "rss_mb": report["wall"]["peak_rss_mb"], "machine": machine()})


if __name__ == "__main__":
    main()
