"""An alert storm for the correlation tests, and what loopd must decide about it.

``storm()`` builds 1,000 Alertmanager alerts for 50 hosts in three inventory groups from
the real alert vocabulary of ``../shared/data/alert-rules`` (awesome-prometheus-alerts):
each host fires 20 distinct alerts; some hosts also fire ``HostDown``. The alerts are
shuffled with a fixed seed, so group openings interleave with the host alerts.

``expect()`` computes, from the alerts alone and without loopd, what a group rule
(``HostDown`` members grouped by ``inventory[key].group``, ``count`` within ``within``,
inhibiting a host rule on every firing critical alert) and that host rule (throttled
to one run per host) must decide: which groups open and with which members (in order
of arrival), which host-rule matches are inhibited, which hosts are remediated.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
ALERT_RULES = REPO / "../shared/data/alert-rules/awesome-prometheus-alerts.json"

GROUP_ALERT = "HostDown"
# group -> (hosts, hosts that go down); count 5: frontend and database cross it, cache not
LAYOUT = {"frontend": ("web", 20, 8), "database": ("db", 20, 6), "cache": ("cache", 10, 4)}
ALERTS_PER_HOST = 20


def iso(at: float) -> str:
    """RFC 3339 with milliseconds, as Alertmanager writes startsAt."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True, slots=True)
class Alert:
    index: int  # position in the storm (arrival order)
    host: str
    name: str
    severity: str
    at: float  # startsAt, epoch seconds

    @property
    def fingerprint(self) -> str:
        return hashlib.sha1(f"{self.name}/{self.host}".encode()).hexdigest()[:16]

    @property
    def event_id(self) -> str:
        """The id loopd gives the alert's event (fingerprint:startsAt:status)."""
        return f"{self.fingerprint}:{iso(self.at)}:firing"

    def payload(self) -> dict[str, Any]:
        return {
            "status": "firing",
            "labels": {"alertname": self.name, "instance": self.host, "job": "node",
                       "severity": self.severity},
            "annotations": {"summary": f"{self.name} on {self.host}"},
            "startsAt": iso(self.at), "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph", "fingerprint": self.fingerprint,
        }


@dataclass
class Storm:
    groups: dict[str, str]  # host -> group
    alerts: list[Alert]

    def entities(self) -> dict[str, dict[str, Any]]:
        return {host: {"group": group, "role": group} for host, group in self.groups.items()}

    def notifications(self, size: int = 50) -> list[dict[str, Any]]:
        """The alerts in order, as Alertmanager v4 webhook payloads of ``size`` alerts."""
        out = []
        for start in range(0, len(self.alerts), size):
            chunk = self.alerts[start:start + size]
            out.append({
                "version": "4", "groupKey": "{}:{}", "truncatedAlerts": 0, "status": "firing",
                "receiver": "loopd", "groupLabels": {}, "commonLabels": {"job": "node"},
                "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
                "alerts": [a.payload() for a in chunk]})
        return out

    def write_jsonl(self, path: Path) -> Path:
        """The notifications one per line, as ``loopd simulate --events`` reads them."""
        path.write_bytes(b"".join(orjson.dumps(n) + b"\n" for n in self.notifications()))
        return path


def storm(start: float, *, seed: int = 14, spread: float = 10.0) -> Storm:
    """1,000 alerts for 50 hosts, startsAt from ``start`` over ``spread`` seconds, in
    non-decreasing time order (so a replay in event time keeps the arrival order)."""
    rng = random.Random(seed)
    corpus = orjson.loads(ALERT_RULES.read_bytes())
    vocabulary = sorted({(r["alert"], r["severity"]) for r in corpus
                         if r["alert"] != GROUP_ALERT})
    groups: dict[str, str] = {}
    down: set[str] = set()
    for group, (prefix, hosts, failing) in LAYOUT.items():
        names = [f"{prefix}-{n:02d}" for n in range(1, hosts + 1)]
        groups.update(dict.fromkeys(names, group))
        down.update(rng.sample(names, failing))
    drafts: list[tuple[str, str, str]] = []
    for host in groups:
        picks = rng.sample(vocabulary, ALERTS_PER_HOST)
        if host in down:
            picks[0] = (GROUP_ALERT, "critical")
        drafts.extend((host, name, severity) for name, severity in picks)
    rng.shuffle(drafts)
    # the hosts go down early in the storm (a switch dies), their other alerts keep coming
    hostdown = [d for d in drafts if d[1] == GROUP_ALERT]
    drafts = [d for d in drafts if d[1] != GROUP_ALERT]
    for at, draft in sorted(zip(rng.sample(range(100, 400), len(hostdown)), hostdown,
                                strict=True)):
        drafts.insert(at, draft)
    step = spread / len(drafts)
    alerts = [Alert(i, host, name, severity, round(start + i * step, 3))
              for i, (host, name, severity) in enumerate(drafts)]
    return Storm(groups, alerts)


@dataclass
class Expected:
    members: dict[str, list[str]] = field(default_factory=dict)  # open group -> members
    opening: dict[str, list[str]] = field(default_factory=dict)  # the `count` that opened it
    opened_by: dict[str, Alert] = field(default_factory=dict)
    below: dict[str, list[str]] = field(default_factory=dict)  # groups that never opened
    inhibited: list[Alert] = field(default_factory=list)  # host-rule matches suppressed
    remediated: set[str] = field(default_factory=set)  # hosts the host rule runs for once
    host_matches: int = 0
    # group-rule matches before their group opened: event id -> (group, member, members so far)
    below_count: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    joined: dict[str, str] = field(default_factory=dict)  # event id -> the join's reason

    def inhibited_by_host(self) -> Counter[str]:
        return Counter(a.host for a in self.inhibited)

    def after_close(self) -> dict[str, str]:
        """When the group incidents close (none of the storm's alerts resolves): the host
        rule's event decided again per inhibited member (its last inhibited alert), host ->
        event id of the ``~after-`` decision without the incident id."""
        last = {a.host: a for a in self.inhibited}
        return {host: f"{a.event_id}~after-" for host, a in last.items()}

    def after_runs(self) -> set[str]:
        """The hosts the re-decision remediates: those the host rule never ran for (the
        others are throttled, their one run being within ``once_within``)."""
        return set(self.after_close()) - self.remediated


def host_rule_matches(alert: Alert) -> bool:
    return alert.severity == "critical"


def expect(alerts: list[Alert], groups: dict[str, str], *, count: int, within: float
           ) -> Expected:
    """What loopd must decide, alert by alert in arrival (= event time) order."""
    out = Expected()
    pending: dict[str, dict[str, tuple[float, float]]] = {}  # group -> member -> first, last
    for alert in alerts:
        group = groups[alert.host]
        if alert.name == GROUP_ALERT:
            if group in out.members:
                if alert.host in out.members[group]:
                    out.joined[alert.event_id] = "incident already open"
                else:
                    out.members[group].append(alert.host)
                    out.joined[alert.event_id] = (f"member {alert.host} joined group {group} "
                                                  f"({len(out.members[group])} members)")
            else:
                seen = pending.setdefault(group, {})
                first = seen[alert.host][0] if alert.host in seen else alert.at
                seen[alert.host] = (first, alert.at)
                for member, (_, last) in list(seen.items()):
                    if last < alert.at - within:  # too old to count any more
                        del seen[member]
                if len(seen) >= count:
                    ordered = sorted(seen, key=lambda m: seen[m][0])
                    out.members[group] = list(ordered)
                    out.opening[group] = list(ordered)
                    out.opened_by[group] = alert
                    del pending[group]
                else:
                    out.below_count[alert.event_id] = (group, alert.host, len(seen))
        if host_rule_matches(alert):  # decided after the group rule of the same event
            out.host_matches += 1
            if alert.host in out.members.get(group, ()):
                out.inhibited.append(alert)
            else:
                out.remediated.add(alert.host)
    out.below = {g: sorted(m) for g, m in pending.items()}
    return out
