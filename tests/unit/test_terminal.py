"""How the terminal commands show the API's answers (loopd/terminal.py, loopd/story.py):
a run's story from an answer shaped like ``GET /v1/runs/{id}``, times in either form the
API has sent, colours only when wanted."""

from __future__ import annotations

import io
from typing import Any

import pytest

from loopd.client import epoch
from loopd.story import Paint, Story
from loopd.terminal import decisions_table, runs_table

T0 = 1_796_143_696.0  # 2026-12-01T16:48:16Z

RUN: dict[str, Any] = {
    "id": "r1", "incident": "i1", "rule": "restart-nginx", "key": "web-1",
    "workflow": "linux.restart_and_verify", "status": "failed", "outcome": "failed",
    "reason": "restart: ssh web-1: `systemctl restart nginx` exited 5",
    "created": "2026-12-01T16:48:16.000Z", "started": "2026-12-01T16:48:16.002Z",
    "finished": "2026-12-01T16:48:19.500Z", "duration_s": 3.5,
    "trigger": {"id": "e1", "source": "alertmanager", "topic": "alert/NginxDown",
                "time": "2026-12-01T16:48:15.900Z", "data": {"status": "firing"}},
    "input": {"host": "web-1", "service": "nginx"},
    "steps": [{
        "seq": 1, "task": "restart", "action": "linux.restart_service", "attempt": 2,
        "status": "failed", "started": "2026-12-01T16:48:18.000Z",
        "finished": "2026-12-01T16:48:19.400Z", "duration_s": 1.4,
        "input": {"host": "web-1", "service": "nginx"},
        "output": {"exit_status": 5, "stdout": "".join(f"line {i}\n" for i in range(12)),
                   "stderr": "Unit nginx.service not found."},
        "error": "ssh web-1: `systemctl restart nginx` exited 5: Unit nginx.service not found.",
        "transition": "no transition"}],
    "decisions": [
        {"time": "2026-12-01T16:48:15.900Z", "outcome": "run_created", "reason": None},
        {"time": "2026-12-01T16:48:17.000Z", "outcome": "joined",
         "reason": "incident already open"},
        {"time": "2026-12-01T16:48:18.000Z", "outcome": "joined",
         "reason": "incident already open"}],
    "interventions": [],
}


def test_a_failed_steps_story_shows_its_error_exit_status_and_the_end_of_its_output() -> None:
    """A failed command step shows the error, the exit status, the last 10 lines of stdout
    (saying how many came before) and stderr; alike decisions in a row are one line."""
    lines = Story(Paint(False), lambda _: None).lines(RUN)
    assert lines[0] == "run r1  workflow linux.restart_and_verify"
    assert lines[1] == "  failed, outcome failed: restart: ssh web-1: `systemctl restart " \
                       "nginx` exited 5"
    assert lines[3] == ("  created 2026-12-01T16:48:16.000Z, finished 16:48:19.500 (took 3.5s)"
                        "  (times UTC)")
    step = next(i for i, line in enumerate(lines) if " restart " in line and "attempt" in line)
    assert lines[step].split() == ["+2.0s", "restart", "linux.restart_service", "attempt",
                                   "2", "failed", "1.4s", "->", "no", "transition"]
    details = [line.strip() for line in lines[step + 1:lines.index("outcome failed (run "
                                                                    "failed) after 3.5s")]]
    assert details == [
        "error: ssh web-1: `systemctl restart nginx` exited 5: Unit nginx.service not found.",
        "exit status 5", "stdout:", "... (2 line(s) before)",
        *(f"line {i}" for i in range(2, 12)), "stderr:", "Unit nginx.service not found."]
    assert "  16:48:17.000  joined  incident already open  (x2, until 16:48:18.000)" in lines


def test_times_are_read_as_rfc_3339_or_as_the_epoch_seconds_of_older_daemons() -> None:
    """The same run told from epoch floats reads as from RFC 3339 strings."""
    older = {**RUN, "created": T0, "finished": T0 + 3.5, "started": T0 + 0.002,
             "steps": [{**RUN["steps"][0], "started": T0 + 2.0, "finished": T0 + 3.4}]}
    story = Story(Paint(False), lambda _: None)
    assert story.lines(older) == story.lines(RUN)
    assert epoch("2026-12-01T16:48:16Z") == epoch(T0) == T0
    assert epoch(None) is None and epoch("soon") is None


def test_tables_of_runs_and_decisions() -> None:
    """`loopd runs` and `loopd decisions` print a header and one aligned row each, the
    guard of a suppression named even by a daemon that sends no `guard`."""
    runs = runs_table([RUN], Paint(False))
    assert runs[0].split() == ["RUN", "STATUS", "OUTCOME", "RULE", "KEY", "RUNS", "CREATED",
                               "TOOK"]
    assert runs[1].split() == ["r1", "failed", "failed", "restart-nginx", "web-1",
                               "linux.restart_and_verify", "2026-12-01T16:48:16.000Z", "3.5s"]
    rows = decisions_table([{"time": T0, "rule": "r", "key": "k", "outcome": "suppressed",
                             "reason": "guard breaker: open until 17:00", "run": None}],
                           Paint(False))
    assert rows[1].split(maxsplit=6) == ["2026-12-01T16:48:16.000Z", "r", "k", "suppressed",
                                         "breaker", "-", "guard breaker: open until 17:00"]
    assert runs_table([], Paint(False)) == ["no runs"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colours_only_on_a_terminal_and_never_with_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Paint colours on a terminal, not into a pipe, and not when NO_COLOR is set."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert Paint.for_stream(_Tty()).state("failed") == "\x1b[31mfailed\x1b[0m"
    assert Paint.for_stream(io.StringIO()).state("failed") == "failed"
    monkeypatch.setenv("NO_COLOR", "1")
    assert Paint.for_stream(_Tty()).state("failed") == "failed"
