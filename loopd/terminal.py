"""The terminal commands: ``loopd runs``, ``show``, ``decisions``, ``approve`` and
``reject`` ask a running daemon's API (loopd.client) and print its answer: tables here,
a run's story in loopd.story, the raw answer with ``--json``.

Times are UTC. Colours only on a terminal, never with ``NO_COLOR`` set
(https://no-color.org) or ``TERM=dumb``. A reader that closes the pipe early (``| head``)
is no error.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any

import orjson

from loopd.client import ApiError, Client, ClientError, Unreachable, shown_url, token_from
from loopd.story import Paint, Story, guard, inline, stamp, target, took


def table(rows: list[list[str]], header: list[str], paint: Paint,
          colour: dict[int, Callable[[str], str]] | None = None) -> list[str]:
    """Columns padded to their widest cell; the last column is never padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    colour = colour or {}

    def line(row: list[str], head: bool = False) -> str:
        cells = []
        for i, cell in enumerate(row):
            padded = cell if i == len(row) - 1 else cell.ljust(widths[i])
            if head:
                padded = paint.bold(padded)
            elif i in colour:
                padded = colour[i](cell) + padded[len(cell):]
            cells.append(padded)
        return "  ".join(cells).rstrip()

    return [line(header, head=True), *(line(r) for r in rows)]


# -- loopd runs ------------------------------------------------------------------------------


def runs_table(runs: list[dict[str, Any]], paint: Paint) -> list[str]:
    if not runs:
        return ["no runs"]
    rows = [[str(r.get("id")), str(r.get("status") or "-"), str(r.get("outcome") or "-"),
             str(r.get("rule") or "-"), str(r.get("key") or "-"), target(r),
             stamp(r.get("created")), took(r.get("duration_s"))] for r in runs]
    return table(rows, ["RUN", "STATUS", "OUTCOME", "RULE", "KEY", "RUNS", "CREATED", "TOOK"],
                 paint, {1: paint.state, 2: paint.state})


# -- loopd decisions -------------------------------------------------------------------------


def decisions_table(rows: list[dict[str, Any]], paint: Paint) -> list[str]:
    if not rows:
        return ["no decisions"]
    cells = [[stamp(d.get("time")), str(d.get("rule") or "-"), str(d.get("key") or "-"),
              str(d.get("outcome") or "-"), guard(d) or "-", str(d.get("run") or "-"),
              inline(d.get("reason") or "", 80)] for d in rows]
    return table(cells, ["TIME", "RULE", "KEY", "OUTCOME", "GUARD", "RUN", "REASON"], paint,
                 {3: paint.state})


# -- the commands ---------------------------------------------------------------------------



def ask(args: argparse.Namespace) -> int:
    """Run one of the terminal commands against ``--url``; print its answer."""
    try:
        client = Client(args.url, token_from(args.token_file), cafile=args.cacert)
        return _ASK[args.command](client, args)
    except Unreachable as exc:
        print(f"loopd: {exc}\n  hint: is the daemon running (loopd run, loopd demo)? Another "
              "address: --url URL or LOOPD_URL", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"loopd: {shown_url(args.url)}: {exc}", file=sys.stderr)
        if exc.status == 401:
            print("  hint: give a token: the environment's LOOPD_TOKEN or --token-file FILE",
                  file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"loopd: {exc}", file=sys.stderr)
        return 2


def _show_json(answer: Any) -> int:
    return print_to_pipe(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())


def _runs(client: Client, args: argparse.Namespace) -> int:
    answer = client.get("/v1/runs", status=args.status, rule=args.rule, limit=args.limit)
    # a sub-workflow's run ("parent/task") is told in its parent's story (loopd show),
    # unless asked for by status: a sub-workflow waiting for approval must be found
    runs = [r for r in answer.get("runs", [])
            if args.status is not None or "/" not in str(r.get("id"))]
    runs = runs[: args.limit]
    if args.json:
        return _show_json({**answer, "runs": runs})
    return print_to_pipe("\n".join(runs_table(runs, Paint.for_stream(sys.stdout))))


def _run_path(run_id: str) -> str:
    return f"/v1/runs/{urllib.parse.quote(run_id, safe='')}"


def _show(client: Client, args: argparse.Namespace) -> int:
    run = client.get(_run_path(args.run))
    if args.json:
        return _show_json(run)

    def fetch(run_id: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = client.get(_run_path(run_id))
        except ApiError:
            return None
        return found

    story = Story(Paint.for_stream(sys.stdout), fetch)
    return print_to_pipe("\n".join(story.lines(run)))


def _decisions(client: Client, args: argparse.Namespace) -> int:
    try:
        answer = client.get("/v1/decisions", rule=args.rule, key=args.key,
                            outcome=args.outcome, source=args.source, since=args.since,
                            before=args.before, limit=args.limit)
    except ApiError as exc:
        if exc.status == 404:  # the route itself: a daemon older than /v1/decisions
            raise ApiError(404, f"{exc} (this daemon has no GET /v1/decisions: upgrade it, "
                           "or read a run's decisions with loopd show RUN_ID)") from None
        raise
    if args.json:
        return _show_json(answer)
    lines = decisions_table(answer.get("decisions", []), Paint.for_stream(sys.stdout))
    older = urllib.parse.parse_qs(urllib.parse.urlsplit(answer.get("next") or "").query)
    if older.get("before"):
        lines.append(f"(older: the same command with --before {older['before'][0]})")
    return print_to_pipe("\n".join(lines))


def _decide(client: Client, args: argparse.Namespace) -> int:
    answer = client.post(f"{_run_path(args.run)}/{args.command}", reason=args.reason)
    if args.json:
        return _show_json(answer)
    done = "approved: it goes on" if args.command == "approve" else "rejected: it stops"
    return print_to_pipe(f"run {args.run} {done} (loopd show {args.run} tells the rest)")


_ASK = {"runs": _runs, "show": _show, "decisions": _decisions, "approve": _decide,
        "reject": _decide}


def print_to_pipe(text: str) -> int:
    """Print ``text``; a reader that closed the pipe early (``| head -1``) is no error: the
    rest goes nowhere, quietly (not even the interpreter's flush at exit complains)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0
