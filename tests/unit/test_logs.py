"""The process setup: log tracebacks show no local variables; the collector tuned once ready."""

from __future__ import annotations

import subprocess
import sys

from loopd.api.auth import _same

SCRIPT = """
import structlog
from loopd import logs
logs.configure("{fmt}", "info")
def handler(header):
    token = header.partition(" ")[2]
    raise RuntimeError("boom")
try:
    handler("Bearer operator-token-0123456789")
except RuntimeError:
    structlog.get_logger("t").exception("request failed")
"""


def test_a_traceback_in_either_format_shows_no_local_variable() -> None:
    """A handler that fails with a token in its locals: the console and the JSON log both
    show the traceback (file, line, the exception) and never the token."""
    for fmt in ("console", "json"):
        done = subprocess.run([sys.executable, "-c", SCRIPT.format(fmt=fmt)],
                              capture_output=True, text=True, timeout=60, check=True)
        assert "RuntimeError: boom" in done.stderr and "handler" in done.stderr, fmt
        assert "operator-token" not in done.stderr, done.stderr


def test_presented_values_compare_unequal_whatever_their_text() -> None:
    """A CSRF header or a cookie's mac in any text is unequal, never an error."""
    assert _same("abc", "abc") and not _same("abd", "abc")
    assert not _same("\u00e9", "abc") and not _same("\udcff", "abc")
    assert not _same("abc", None)


def test_tune_gc_freezes_what_start_up_made_and_raises_the_young_threshold() -> None:
    """What ``loopd run`` does once ready (in a process of its own: never in the tests'),
    the collector on again (the command started with it off)."""
    script = ("import gc; gc.disable(); from loopd.daemon import tune_gc, GC_THRESHOLD; "
              "keep = [[1]] * 10; tune_gc(); assert gc.get_freeze_count() > 0, "
              "gc.get_freeze_count(); assert gc.get_threshold() == GC_THRESHOLD; "
              "assert gc.isenabled(); print('ok')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "ok"


COMMAND = """
import gc, sys
import loopd.cli as cli
seen = {}
cli.check = lambda path: seen.setdefault("check", gc.isenabled()) and 0
cli.run = lambda path, listen: seen.setdefault("run", gc.isenabled()) and 0
from loopd.__main__ import main
for command in ("check", "run"):
    sys.argv = ["loopd", command, "-c", "loopd.yaml"]
    main()
print(seen)
"""


def test_the_command_starts_with_the_collector_off_and_only_run_keeps_it_off() -> None:
    """``loopd`` (loopd.__main__) imports and starts with the collector off; ``check``
    (every command but run) turns it on once its arguments are read, and ``run`` leaves
    it off until the daemon is ready (tune_gc, above)."""
    done = subprocess.run([sys.executable, "-c", COMMAND], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "{'check': True, 'run': False}", done.stderr
