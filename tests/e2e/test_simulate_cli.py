"""``loopd simulate`` run as a user runs it: the real CLI as a subprocess, its exit codes,
its printed report, the JSON report it writes and its progress line on a terminal."""

from __future__ import annotations

import os
import pty
import re
import shutil
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
NAB = ROOT / "../shared/data/nab/ec2_cpu_utilization_825cc2.csv"
LOOPD = Path(sys.executable).parent / "loopd"
T0 = 1_400_000_000
pytestmark = pytest.mark.e2e

RULES = """\
rules:
  - name: cpu-busy
    on: {source: telemetry, topic: "telemetry/{host}/cpu"}
    if: "event.value > 97"
    key: "{{ vars.host }}"
    for: 10m
    throttle: {once_within: 1h}
    run: {action: core.log, input: {message: "{{ key }} busy"}}
  - name: disk-full
    on: {source: alertmanager, match: {status: firing, labels.alertname: DiskFull}}
    key: "{{ event.labels.instance }}"
    run: {workflow: simtest.clean, input: {host: "{{ event.labels.instance }}"}}
"""

CLEAN = """\
input: [host]
tasks:
  clean:
    action: core.log
    input: {message: "clean /var/log on {{ ctx.host }}"}
    next: verify
  verify:
    confirm:
      event: {source: alertmanager, match: {status: resolved, labels.instance: "{{ ctx.host }}"}}
      within: 15m
"""


def setup(tmp_path: Path) -> Path:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "rules.yaml").write_text(RULES)
    packs = tmp_path / "packs"
    shutil.copytree(ROOT / "packs" / "core", packs / "core")
    (packs / "simtest" / "workflows").mkdir(parents=True)
    (packs / "simtest" / "pack.yaml").write_text("name: simtest\nactions: {}\n")
    (packs / "simtest" / "workflows" / "clean.yaml").write_text(CLEAN)
    config = tmp_path / "loopd.yaml"
    config.write_text(textwrap.dedent("""\
        sources: [{name: webhook, type: webhook}, {name: alertmanager, type: alertmanager},
                  {name: telemetry, type: webhook}]  # the CSV events' source
        rules: [rules]
        packs: [packs]
        store: {path: var/loopd.db}
        """))
    return config


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def alert(host: str, status: str, ends: float | None = None) -> bytes:
    return orjson.dumps({"version": "4", "status": status, "alerts": [{
        "status": status, "labels": {"alertname": "DiskFull", "instance": host},
        "startsAt": iso(T0), "endsAt": iso(ends) if ends else "0001-01-01T00:00:00Z"}]})


def simulate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LOOPD), "simulate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


def test_simulate_prints_and_writes_the_report(tmp_path: Path) -> None:
    """A NAB CSV (host and metric named on the command line) and Alertmanager payloads
    replay to exit 0, a readable report on stdout and the same report as JSON."""
    config = setup(tmp_path)
    alerts = tmp_path / "alerts.jsonl"
    alerts.write_bytes(b"\n".join([alert("db-1", "firing"), alert("db-2", "firing"),
                                   alert("db-1", "resolved", T0 + 240)]) + b"\n")
    out = tmp_path / "report.json"
    done = simulate("-c", str(config), "--events", f"{NAB}:host=web-1,metric=cpu",
                    str(alerts), "--report", str(out), "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress line, no log noise
    assert "loopd simulate: 4,035 events from 2 file(s)" in done.stdout
    assert "cpu-busy" in done.stdout and "simtest.clean" in done.stdout
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    assert report["files"] == [str(NAB), str(alerts)]
    events = report["events"]
    assert (events["read"], events["rejected"]) == (4035, 0)
    assert events["by_source"] == {"alertmanager": 3, "telemetry": 4032}
    rows = NAB.read_text().splitlines()[1:]
    first = datetime.fromisoformat(rows[0].split(",")[0]).replace(tzinfo=UTC).timestamp()
    assert report["time"]["first"] == min(first, T0)
    cpu = report["rules"]["by_rule"]["cpu-busy"]
    assert cpu["matches"] > 0 and cpu["decisions"]["run_created"] > 0
    assert set(cpu["suppressions"]) <= {"for", "throttle"}
    runs = report["runs"]
    assert runs["by_workflow"]["simtest.clean"] == {
        "fixed": 1, "not_fixed": 0, "inconclusive": 1, "failed": 0, "cancelled": 0, "done": 0}
    assert runs["by_workflow"]["core.log"]["done"] == cpu["decisions"]["run_created"]
    clean = {r["key"]: r for r in runs["first"] if r["workflow"] == "simtest.clean"}
    assert {k: (r["start"], r["end"], r["outcome"]) for k, r in clean.items()} == {
        "db-1": (T0, T0 + 240, "fixed"), "db-2": (T0, T0 + 900, "inconclusive")}
    assert report["decisions"]["run_created"] == runs["created"] == runs["finished"]
    assert report["incidents"]["open_at_end"] == 0
    assert not (tmp_path / "var").exists()  # the daemon's store is never touched


def test_an_invalid_line_exits_1_naming_file_and_line(tmp_path: Path) -> None:
    """The first invalid line stops the replay: exit 1, `FILE:LINE: what is wrong`, no
    report written; a config that cannot be read is a configuration error (exit 2)."""
    config = setup(tmp_path)
    bad = tmp_path / "cpu.csv"
    bad.write_text("timestamp,value\n2014-02-14 14:30:00,1.5\n2014-02-14 14:35:00,n/a\n")
    out = tmp_path / "report.json"
    done = simulate("-c", str(config), "--events", str(bad), "--report", str(out), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == f"loopd: {bad}:3: value 'n/a' is not a number"
    assert not out.exists()
    missing = simulate("-c", str(config), "--events", str(tmp_path / "nope.jsonl"),
                       cwd=tmp_path)
    assert missing.returncode == 1
    assert f"{tmp_path / 'nope.jsonl'}: cannot read" in missing.stderr
    assert simulate("-c", str(tmp_path / "absent.yaml"), "--events", str(bad),
                    cwd=tmp_path).returncode == 2


def test_progress_is_drawn_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, stderr shows a progress line redrawn with \\r: bytes, events/s, ETA."""
    config = setup(tmp_path)
    primary, secondary = pty.openpty()
    try:
        try:
            done = subprocess.run(
                [str(LOOPD), "simulate", "-c", str(config), "--events", f"{NAB}:host=web-1"],
                cwd=tmp_path, stdout=subprocess.PIPE, stderr=secondary, timeout=120,
                check=False)
        finally:
            os.close(secondary)
        drawn = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(primary)
    assert done.returncode == 0
    text = drawn.decode()
    assert text.startswith("\r[") and "100.0%" in text
    assert "events/s" in text and "ETA" in text and text.rstrip().endswith("ETA 0s")


def test_a_reader_that_stops_early_ends_the_replay_quietly_with_the_report_written(
    tmp_path: Path,
) -> None:
    """`loopd simulate ... | head -1`: the closed pipe is no error (exit 0, no traceback on
    stderr) and --report is written all the same."""
    config = setup(tmp_path)
    out = tmp_path / "report.json"
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the report is printed
    try:
        done = subprocess.run(
            [str(LOOPD), "simulate", "-c", str(config), "--events", f"{NAB}:host=web-1,metric=cpu",
             "--report", str(out), "--no-progress"],
            cwd=tmp_path, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
            check=False)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")
    assert orjson.loads(out.read_bytes())["events"]["read"] == 4032


def readme_simulation() -> tuple[str, list[str]]:
    """The README's simulate command (a ```bash block) and its sample output (the next
    ``` block), as written there."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Simulation"):readme.index("## Benchmarks")]
    command = section.split("```bash\n", 1)[1].split("```", 1)[0]
    after = section.split("\n```\nloopd simulate:", 1)[1].split("```", 1)[0]
    return command, ("loopd simulate:" + after).splitlines()


def test_the_readmes_simulate_example_runs_as_written_and_prints_its_sample_output(
        tmp_path: Path) -> None:
    """From a copy of the shipped config, rules, packs and examples, the README's command
    runs as written (`.venv/bin/loopd` is this venv's) and prints the README's sample
    output, line for line but for the wall time of the first line."""
    command, sample = readme_simulation()
    assert command.startswith(".venv/bin/loopd simulate ")
    for folder in ("config", "rules", "packs", "examples"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "loopd").symlink_to(LOOPD)
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    printed = done.stdout.rstrip("\n").splitlines()
    wall = r" in [0-9.]+s \([0-9,]+ events/s\)$"
    assert re.sub(wall, "", printed[0]) == re.sub(wall, "", sample[0])
    assert printed[1:] == sample[1:]
    assert orjson.loads((tmp_path / "var" / "report.json").read_bytes())["events"]["read"] == 293
