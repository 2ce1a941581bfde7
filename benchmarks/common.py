"""Shared pieces of the benchmarks: the rule corpus, realistic alerts, measurements."""

from __future__ import annotations

import json
import os
import platform
import random
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT.parent / "shared" / "data" / "alert-rules" / "awesome-prometheus-alerts.json"


def alert_corpus() -> list[dict[str, Any]]:
    return list(json.loads(ALERTS.read_text()))


def write_rules(folder: Path, count: int,
                instead: Callable[[int, list[str]], list[str] | None] | None = None
                ) -> list[str]:
    """One rule per alert name (cycling with a suffix past 954), condition on severity
    and a numeric value; returns the alert names the rules cover. ``instead(i, names)``
    (the names so far, this rule's last) may return other YAML lines for rule ``i``: the
    alert names, and so the alerts, stay those of the plain corpus."""
    corpus = alert_corpus()
    lines = ["rules:"]
    names: list[str] = []
    for i in range(count):
        alert = corpus[i % len(corpus)]
        name = alert["alert"] if i < len(corpus) else f"{alert['alert']}{i // len(corpus)}"
        names.append(name)
        severity = alert["severity"]
        other = instead(i, names) if instead is not None else None
        if other is not None:
            lines += other
            continue
        lines += [
            f"  - name: 'r{i}-{name}'",
            "    on: {source: alertmanager, match: {status: firing, "
            f"labels.alertname: '{name}'}}}}",
            f"    if: \"event.labels.severity == '{severity}' and "
            f"float(event.annotations.value) > 90\"",
            "    key: \"{{ event.labels.instance }}\"",
            "    throttle: {once_within: 10m}",
            "    run: {action: core.noop, input: {alert: \"{{ event.labels.alertname }}\","
            " host: \"{{ event.labels.instance }}\"}}",
        ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.yaml").write_text("\n".join(lines) + "\n")
    return names


def match_ratio(text: str) -> float:
    """A share of alerts that satisfy a rule, in (0, 1] (ValueError with what is wrong)."""
    try:
        ratio = float(text)
    except ValueError:
        raise ValueError(f"the match ratio must be a number in (0, 1], not {text!r}") from None
    if not 0 < ratio <= 1:
        raise ValueError(f"the match ratio must be in (0, 1], not {ratio}")
    return ratio


# the share of alerts that satisfy a rule (ingest.py --match sets it for the processes it
# starts); issue 15 measured with half the records matching
try:
    MATCH_RATIO = match_ratio(os.environ.get("LOOPD_BENCH_MATCH", "0.1"))
except ValueError as exc:
    raise SystemExit(f"LOOPD_BENCH_MATCH: {exc}") from None


def alerts(count: int, rule_names: list[str], *, match_ratio: float | None = None,
           hosts: int = 200, seed: int = 7) -> list[dict[str, Any]]:
    """Alertmanager-shaped alerts; about ``match_ratio`` of them satisfy a rule (default
    ``MATCH_RATIO``)."""
    if match_ratio is None:
        match_ratio = MATCH_RATIO
    rng = random.Random(seed)
    corpus = alert_corpus()
    severity = {a["alert"]: a["severity"] for a in corpus}
    covered = set(rule_names)
    others = [a["alert"] for a in corpus if a["alert"] not in covered] or ["UnwatchedAlert"]
    out = []
    for i in range(count):
        roll = rng.random()
        if roll < match_ratio:  # covered, right severity, value over the threshold
            name = rng.choice(rule_names)
            sev, value = severity.get(name.rstrip("0123456789"), "critical"), 95.0
        elif roll < match_ratio * 3:  # covered but the condition is false
            name = rng.choice(rule_names)
            sev, value = severity.get(name.rstrip("0123456789"), "critical"), 50.0
        else:  # an alert no rule watches
            name = rng.choice(others)
            sev, value = "warning", 95.0
        host = f"host-{rng.randrange(hosts)}:9100"
        out.append({
            "status": "firing",
            "labels": {"alertname": name, "severity": sev, "instance": host, "job": "node"},
            "annotations": {"summary": f"{name} on {host}", "value": str(value)},
            "startsAt": f"2026-11-23T03:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph",
            "fingerprint": f"{i:016x}",
        })
    return out


def stat_cpu_s(stat: Path) -> float:
    """CPU seconds (user + system) in a ``/proc/PID/stat`` or ``/proc/PID/task/TID/stat``
    file."""
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_cpu_s(pid: int | None = None) -> dict[str, float]:
    """CPU seconds (user + system) so far of a process's main thread (``loop``: the event
    loop's) and of its other threads together (``others``: SQLite's above all); ``pid``
    None is this process. A thread that ends between two readings drops out of
    ``others``."""
    main = os.getpid() if pid is None else pid
    spent = {"loop": 0.0, "others": 0.0}
    for task in Path(f"/proc/{main}/task").iterdir():
        try:
            used = stat_cpu_s(task / "stat")
        except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
            continue
        spent["loop" if int(task.name) == main else "others"] += used
    return spent


def burst_threads(before: dict[str, float], after: dict[str, float],
                  wall_s: float) -> dict[str, float]:
    """The burst's CPU per thread beside its wall time: when ``loop`` and ``others`` add
    up to ``wall_s``, the threads took turns instead of running side by side."""
    return {"wall_s": round(wall_s, 2), **{
        name: round(max(0.0, after[name] - before[name]), 2) for name in before}}


def rss_mb() -> float:
    """Peak resident set size of this process, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)
