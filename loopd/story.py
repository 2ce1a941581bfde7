"""``loopd show``: one run's story, from the API's ``GET /v1/runs/{id}``.

A story reads top to bottom in the order things happened: the run (status, outcome and
why, rule, key, times), the trigger event, a group incident's members (when each first
matched, its first event) and the matches it held back, the decisions about its rule and
key (a run of
alike decisions is one line with a count: 23 events joining the open incident), each step
(when, attempt, status, duration, the transition taken; a failed step's error and its
command's exit status, stdout and stderr; a confirmation's evidence), the people who
intervened, the outcome, and the story of each sub-workflow run, indented.

Times are UTC: the header's in full RFC 3339, the lines' as time of day. ``Paint`` and
the formats here serve the tables of loopd.terminal too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from loopd.client import epoch
from loopd.decisions import decision_guard

SUB_DEPTH = 3  # sub-workflow runs shown nested at most this deep
WIDE = 160  # a JSON value shown inline is cut here
GROUP_SHOWN = 50  # a group incident's members listed, the first ones to arrive
_GOOD = {"fixed", "succeeded", "run_created", "approve"}
_BAD = {"failed", "not_fixed", "timed_out", "crashed", "rejected", "expired", "interrupted",
        "reject", "cancel", "cancelled"}
_WAIT = {"waiting", "awaiting_approval", "pending", "queued", "running", "suppressed",
         "inconclusive"}


@dataclass(frozen=True, slots=True)
class Paint:
    """ANSI colours, or nothing."""

    on: bool

    @classmethod
    def for_stream(cls, stream: TextIO) -> Paint:
        wanted = not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        return cls(wanted and stream.isatty())

    def _sgr(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.on and text else text

    def bold(self, text: str) -> str:
        return self._sgr("1", text)

    def dim(self, text: str) -> str:
        return self._sgr("2", text)

    def state(self, text: str) -> str:
        """A status, outcome or decision, green / red / yellow by what it means."""
        word = text.split()[0] if text.split() else text
        if word in _GOOD:
            return self._sgr("32", text)
        if word in _BAD:
            return self._sgr("31", text)
        if word in _WAIT:
            return self._sgr("33", text)
        return text


def stamp(value: Any) -> str:
    """An API time as RFC 3339 to the millisecond (``-`` when there is none)."""
    when = epoch(value)
    if when is None:
        return "-"
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def clock(value: Any) -> str:
    """An API time as the time of day (UTC), to the millisecond."""
    when = epoch(value)
    if when is None:
        return "-"
    return datetime.fromtimestamp(when, UTC).strftime("%H:%M:%S.%f")[:-3]


def took(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def inline(value: Any, width: int = WIDE) -> str:
    """A JSON value on one line, cut at ``width``."""
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    text = " ".join(text.split()) if isinstance(value, str) else text
    return text if len(text) <= width else text[: width - 1] + "…"


def target(run: dict[str, Any]) -> str:
    for kind in ("workflow", "action"):
        if run.get(kind):
            return str(run[kind])
    return "-"


def guard(row: dict[str, Any]) -> str | None:
    """The row's ``guard``, or (a daemon that sends none) the one its reason names."""
    if row.get("guard"):
        return str(row["guard"])
    return decision_guard(row.get("reason")) if row.get("outcome") == "suppressed" else None


class Story:
    """The lines of ``loopd show`` for one run; ``fetch`` reads a sub-workflow's run (None
    when it cannot be read)."""

    def __init__(self, paint: Paint, fetch: Callable[[str], dict[str, Any] | None]) -> None:
        self.paint = paint
        self.fetch = fetch

    def lines(self, run: dict[str, Any], depth: int = 0) -> list[str]:
        p = self.paint
        out = [f"{p.bold('run ' + str(run.get('id')))}  {_kind(run)} {target(run)}"]
        verdict = p.state(str(run.get("status") or "-"))
        if run.get("outcome"):
            verdict += f", outcome {p.state(str(run['outcome']))}"
        if run.get("reason"):
            verdict += f": {run['reason']}"
        out.append(f"  {verdict}")
        where = [f"rule {run['rule']}" if run.get("rule") else "",
                 f"key {run['key']}" if run.get("key") else "",
                 f"incident {run['incident']}" if run.get("incident") else ""]
        if any(where):
            out.append("  " + ", ".join(w for w in where if w))
        times = f"  created {stamp(run.get('created'))}"
        if run.get("finished"):
            times += f", finished {clock(run.get('finished'))} (took {took(run.get('duration_s'))})"
        elif run.get("started"):
            times += f", started {clock(run.get('started'))}, still going"
        out.append(times + p.dim("  (times UTC)"))
        if depth == 0:  # a sub-workflow's run has its parent's trigger and decisions
            out += self._trigger(run)
            out += self._group(run.get("group"))
            out += self._decisions(run.get("decisions", run.get("events")) or [])
        out += self._steps(run, depth)
        out += self._interventions(run.get("interventions") or [])
        end = f"outcome {p.state(str(run.get('outcome') or 'none yet'))}"
        end += f" (run {p.state(str(run.get('status') or '-'))})"
        if run.get("finished"):
            end += f" after {took(run.get('duration_s'))}"
        out.append(p.bold("outcome") + end[len("outcome"):])
        return out

    def _trigger(self, run: dict[str, Any]) -> list[str]:
        event = run.get("trigger")
        out = []
        if isinstance(event, dict):
            head = [clock(event.get("time")), str(event.get("source") or "-"),
                    str(event.get("topic") or "")]
            if event.get("id"):
                head.append(f"id {event['id']}")
            out.append(f"{self.paint.bold('trigger')}  " + "  ".join(h for h in head if h))
            out.append(f"  data {inline(event.get('data'))}")
        if run.get("input"):
            out.append(f"{self.paint.bold('input')}    {inline(run['input'])}")
        return out

    def _group(self, group: Any, shown: int = GROUP_SHOWN) -> list[str]:
        """A group incident's members, in order of arrival (the first ``shown``), and
        the matches of other rules it inhibited for them."""
        if not isinstance(group, dict):
            return []
        members = [m for m in group.get("members") or [] if isinstance(m, dict)]
        count = group.get("member_count", len(members))
        p = self.paint
        out = [f"{p.bold('group')}    {group.get('key')}: {count} member"
               f"{'' if count == 1 else 's'}"]
        width = max([len(str(m.get("key"))) for m in members[:shown]] + [1])
        for m in members[:shown]:
            line = f"  {clock(m.get('time'))}  {m.get('key')!s:<{width}}"
            if m.get("event_id"):
                line += f"  first event {m.get('source') or '-'}/{m['event_id']}"
            if m.get("last") and m.get("last") != m.get("time"):
                line += p.dim(f"  (last {clock(m.get('last'))})")
            out.append(line.rstrip())
        if len(members) > shown:
            out.append(p.dim(f"  ... and {len(members) - shown} more (GET "
                             "/v1/incidents/ID lists them all)"))
        held = [i for i in group.get("inhibited") or [] if isinstance(i, dict)]
        if held:
            out.append(f"{p.bold('held back')} (inhibited while the group is open)")
            for i in held:
                out.append(f"  {i.get('rule')}  {i.get('key')}  x{i.get('count')}, last "
                           f"{clock(i.get('last'))}")
        return out

    def _decisions(self, rows: list[dict[str, Any]]) -> list[str]:
        if not rows:
            return []
        out = [f"{self.paint.bold('decisions')} ({len(rows)}, oldest first)"]
        groups: list[list[dict[str, Any]]] = []
        for row in sorted(rows, key=lambda d: epoch(d.get("time")) or 0.0):
            like = (row.get("outcome"), guard(row))
            if groups and (groups[-1][0].get("outcome"), guard(groups[-1][0])) == like:
                groups[-1].append(row)
            else:
                groups.append([row])
        for group in groups:
            first, last = group[0], group[-1]
            line = f"  {clock(first.get('time'))}  {self.paint.state(str(first.get('outcome')))}"
            if first.get("reason"):
                line += f"  {inline(first['reason'], 100)}"
            if len(group) > 1:
                line += self.paint.dim(f"  (x{len(group)}, until {clock(last.get('time'))})")
            out.append(line)
        return out

    def _steps(self, run: dict[str, Any], depth: int) -> list[str]:
        steps = run.get("steps") or []
        if not steps:
            return []
        created = epoch(run.get("created"))
        out = [self.paint.bold("steps")]
        width = max(len(str(s.get("task"))) for s in steps)
        kinds = [str(s.get("action") or _task_kind(s)) for s in steps]
        kind_width = max(len(k) for k in kinds)
        status_width = max(len(str(s.get("status"))) for s in steps)
        for s, what in zip(steps, kinds, strict=True):
            began = epoch(s.get("started"))
            at = f"+{took(began - created)}" if began is not None and created is not None else "-"
            status = str(s.get("status"))
            line = (f"  {at:>8}  {s.get('task')!s:<{width}}  {what:<{kind_width}}  attempt "
                    f"{s.get('attempt')}  {self.paint.state(status)}"
                    f"{' ' * (status_width - len(status))}  {took(s.get('duration_s')):>6}")
            if s.get("transition"):
                line += f"  -> {s['transition']}"
            out.append(line)
            out += [f"             {detail}" for detail in self._step_details(s)]
            sub = (s.get("output") or {}).get("run") if isinstance(s.get("output"), dict) else None
            guessed = False
            if sub is None and not s.get("action") and s.get("finished") is None:
                # a step still going may be a sub-workflow whose run has not ended (one
                # waiting for approval, say): its run id is parent/task, if it exists
                sub, guessed = f"{run.get('id')}/{s.get('task')}", True
            if isinstance(sub, str) and "/" in sub and depth < SUB_DEPTH:
                child = self.fetch(sub)
                if child is None and not guessed:
                    out.append(f"             sub-workflow run {sub} (not readable)")
                elif child is not None:
                    out += [f"             | {line}" for line in self.lines(child, depth + 1)]
        return out

    def _step_details(self, step: dict[str, Any]) -> list[str]:
        out = []
        found = step.get("output")
        output: dict[str, Any] = found if isinstance(found, dict) else {}
        if step.get("error"):
            out.append(f"error: {step['error']}")
        if "exit_status" in output:
            out.append(f"exit status {output['exit_status']}")
        for stream in ("stdout", "stderr"):
            text = output.get(stream)
            if isinstance(text, str) and text.strip() and step.get("status") != "succeeded":
                lines = text.rstrip().splitlines()
                out.append(f"{stream}:")
                if len(lines) > 10:
                    out.append(f"  ... ({len(lines) - 10} line(s) before)")
                out += [f"  {line}" for line in lines[-10:]]
        if output.get("evidence") == "event" and isinstance(output.get("event"), dict):
            out.append("evidence for: " + _event_line(output["event"]))
        elif output.get("evidence") == "query":
            out.append("evidence for: the query held")
        if isinstance(output.get("last_evidence"), dict):
            out.append("evidence against (last): " + _event_line(output["last_evidence"]))
        return out

    def _interventions(self, rows: list[dict[str, Any]]) -> list[str]:
        if not rows:
            return []
        out = [self.paint.bold("interventions")]
        for r in rows:
            who = r.get("by") or "anonymous"
            role = f" ({r['role']})" if r.get("role") else ""
            reason = f": {r['reason']}" if r.get("reason") else ""
            result = f" -> {r['status']}" if r.get("status") is not None else ""
            out.append(f"  {clock(r.get('at'))}  {self.paint.state(str(r.get('action')))} by "
                       f"{who}{role}{reason}{result}")
        return out


def _kind(run: dict[str, Any]) -> str:
    return "action" if run.get("action") else "workflow"


def _task_kind(step: dict[str, Any]) -> str:
    """What a step without an action did, as far as its output tells."""
    output = step.get("output")
    if isinstance(output, dict):
        if "evidence" in output or "last_evidence" in output:
            return "confirm"
        if isinstance(output.get("run"), str):
            return "workflow"
    return "-"


def _event_line(event: dict[str, Any]) -> str:
    parts = [clock(event.get("time")), str(event.get("source") or ""),
             str(event.get("topic") or "")]
    return "  ".join(p for p in parts if p) + f"  {inline(event.get('data'), 100)}"
