"""Bounded expressions and templates (issue 9, finding 4): load-time refusal of what is
static, and evaluation-time bounds that fail one evaluation with a ConditionError naming
the bound instead of pinning a core or allocating gigabytes.

The issue's own reproductions run in a child process with an address-space limit and a
timeout (``_isolated``), so on code without bounds they fail instead of hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from loopd.cli import EXIT_INVALID
from loopd.errors import ConditionError
from loopd.events import Event
from loopd.expr import bounds
from loopd.expr.compiler import compile_expression, compile_template

NAMES = frozenset({"event"})
LIMIT_AS = 1 << 30  # a child process may map at most 1 GiB


def scope(**data: Any) -> dict[str, Any]:
    return {"event": Event(id="ev-1", source="webhook", topic="t", key="k", data=data)}


def _isolated(code: str, timeout: float = 20.0) -> str:
    """Run ``code`` in a child Python limited to LIMIT_AS bytes; its stdout, or a failure."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({LIMIT_AS}, {LIMIT_AS}))\n"
    try:
        done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still computing after {timeout}s: {code.strip()}")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


COMPILE = """
from loopd.expr.compiler import compile_expression, compile_template
try:
    {call}({text!r}, frozenset({{"event"}}))
    print("compiled")
except ValueError as exc:
    print("ValueError:", exc)
"""


@pytest.mark.parametrize("call, text, message", [
    ("compile_expression", "9**(9**9)", "integer bound of 4096 bits"),
    ("compile_expression", "'a'*10**9", "string bound of 4194304 characters"),
    ("compile_template", "{{ lipsum(100000, false, 1000, 2000) }}",
     "function 'lipsum' is not available"),
    ("compile_template",
     "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
     "loop budget of 100000 iterations"),
    ("compile_template", "{{ 'a' ~ 'b' * 10**9 }}", "string bound"),
    ("compile_template", "{{ (9 ** (9 ** 9)) | string }}", "integer bound"),
    ("compile_template", "{% if true %}{{ 2 ** (10 ** 5) }}{% endif %}", "integer bound"),
    ("compile_template", "{{ range(10**9) | list }}", "loop budget"),
    ("compile_template", "{{ 'x' | center(10**9) }}", "width=1000000000 exceeds its bound"),
    ("compile_expression", "'%0999999999d' % 1", "string bound"),
])
def test_static_abuse_is_refused_at_compile_time(call: str, text: str, message: str) -> None:
    """A constant subexpression past a bound is a ValueError naming it, raised at once."""
    started = time.monotonic()
    out = _isolated(COMPILE.format(call=call, text=text))
    assert out.startswith("ValueError:") and message in out, out
    assert time.monotonic() - started < 10


EVALUATE = """
from loopd.errors import ConditionError
from loopd.events import Event
from loopd.expr.compiler import compile_template
render = compile_template({text!r}, frozenset({{"event"}}))
event = Event(id="1", source="webhook", topic="t", key="k", data={data!r})
try:
    render({{"event": event}})
    print("rendered")
except ConditionError as exc:
    print("ConditionError:", exc)
print(render({{"event": Event(id="2", source="webhook", topic="t", key="k", data={ok!r})}}))
"""


@pytest.mark.parametrize("text, data, ok, message", [
    ("{{ event.n ** event.n }}", {"n": 10**8}, {"n": 3}, "integer bound of 4096 bits"),
    ("{{ event.s * event.n }}", {"s": "ab", "n": 10**9}, {"s": "ab", "n": 2},
     "string bound of 4194304 characters"),
    ("{% for i in range(event.n) %}{% for j in range(event.n) %}x{% endfor %}{% endfor %}",
     {"n": 100000}, {"n": 2}, "loop budget of 100000 iterations"),
    ("{{ event.s | center(event.n) }}", {"s": "a", "n": 10**9}, {"s": "a", "n": 3},
     "width=1000000000 exceeds its bound"),
])
def test_event_data_cannot_make_a_template_blow_up(
        text: str, data: dict[str, Any], ok: dict[str, Any], message: str) -> None:
    """An event that drives a template past a bound fails that render; the next renders."""
    out = _isolated(EVALUATE.format(text=text, data=data, ok=ok)).splitlines()
    assert out[0].startswith("ConditionError:") and message in out[0], out
    assert out[1] in ("27", "abab", "xxxx", " a "), out


@pytest.mark.parametrize("text, data", [
    ("event.n ** event.n", {"n": 10**6}),
    ("event.n * event.n", {"n": 1 << 4000}),
    ("'a' * event.n", {"n": 10**9}),
    ("event.n * 'a'", {"n": 10**9}),
    ("[event.n] * event.n", {"n": 10**9}),
    ("event.s + event.s", {"s": "a" * bounds.MAX_STRING}),
    ("event.s % 1", {"s": "%0999999999d"}),
    ("event.s % (1, 2)", {"s": "%*d"}),
    ("event.s.replace('a', event.s)", {"s": "a" * 10_000}),
    ("round(5, event.n)", {"n": -10**7}),
    ("str([event.s] * 100000)", {"s": "a" * 1000}),
    ("sum(event.l, [])", {"l": [[1] * 1000] * 1000}),
    ("event.s.split()", {"s": "ab " * 330_000}),
    ("event.s.split(' ')", {"s": "ab " * 330_000}),
])
def test_fast_path_operations_check_their_result_before_computing_it(
        text: str, data: dict[str, Any]) -> None:
    """Each growing operation of the fast path raises ConditionError naming a bound."""
    check = compile_expression(text, NAMES)
    with pytest.raises(ConditionError, match=r"exceeds the \w+ bound|'\*' width") as info:
        check(scope(**data))
    assert text in str(info.value)


@pytest.mark.parametrize("text, data", [
    ("{{ event.s ~ event.s ~ event.s }}", {"s": "a" * (bounds.MAX_STRING // 2)}),
    ("{{ event.s.ljust(event.n) | string }}", {"s": "a", "n": 10**9}),
    ("{{ event.s.zfill(event.n) | string }}", {"s": "1", "n": 10**9}),
    ("{{ event.s.expandtabs(event.n) | string }}", {"s": "\t\t", "n": 10**9}),
    ("{{ ('{:>' ~ event.n ~ '}').format('a') | string }}", {"n": 10**9}),
    ("{{ ', '.join(event.l) | string }}", {"l": ["a" * 100_000] * 100}),
    ("{{ event.s.translate({97: 'x' * 100000}) | string }}", {"s": "a" * 100_000}),
    ("{{ (event.s.encode() * event.n) | string }}", {"s": "ab", "n": 10**9}),
    ("{{ event.s | indent(event.n) }}", {"s": "a\nb", "n": 10**9}),
    ("{{ event.s | format(1) }}", {"s": "%0999999999d"}),
    ("{{ [1] | batch(event.n, 'x') | list }}", {"n": 10**9}),
    ("{{ [1] | slice(event.n) | list }}", {"n": 10**9}),
    ("{{ 5 | round(event.n) }}", {"n": -10**7}),
    ("{{ ([event.s] * 100000) | join }}", {"s": "a" * 1000}),
    ("{{ ([event.s] * 100000) | tojson }}", {"s": "a" * 1000}),
    ("{{ event.l | sum(start=[]) | length }}", {"l": [[1] * 1000] * 1000}),
    ("{{ event.s.replace('a', event.s) | string }}", {"s": "a" * 10_000}),
    ("{{ event.s.split() | length }}", {"s": "ab " * 330_000}),
])
def test_jinja_operators_methods_and_filters_are_bounded(text: str, data: dict[str, Any]) -> None:
    """The Jinja fallback checks ``~``, str methods and sized filter arguments before they
    allocate, and a template error names the bound first."""
    render = compile_template(text, NAMES)
    with pytest.raises(ConditionError, match=r"^expression exceeds the \w+ bound|^filter argument"):
        render(scope(**data))


@pytest.mark.parametrize("text, data", [
    ("{% for i in event.l %}{% for j in event.l %}.{% endfor %}{% endfor %}",
     {"l": list(range(1000))}),
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
     "{{ f(event.n) }}", {"n": 40}),
    ("{% for i in range(event.n) %}{{ range(event.n) | sum }}{% endfor %}", {"n": 100_000}),
    ("{% for i in range(1000) %}{{ event.l | sum }}{% endfor %}", {"l": [1] * 100_000}),
    ("{% set ns = namespace(s='') %}{% for i in range(event.n) %}"
     "{% set ns.s = ns.s ~ '0123456789' %}{% endfor %}{{ ns.s | length }}", {"n": 100_000}),
    # a method, a slice or `in` reads its whole operand: each costs a unit per KiB
    ("{% for i in range(5000) %}{% set x = (event.s or '').upper() %}{% endfor %}",
     {"s": "ab " * 330_000}),
    ("{% for i in range(5000) %}{% set x = (event.s or '')[1:] %}{% endfor %}",
     {"s": "ab " * 330_000}),
    ("{% for i in range(5000) %}{% set x = 'b' in (event.s or '') %}{% endfor %}",
     {"s": "ab " * 330_000}),
])
def test_loops_calls_and_filters_share_one_budget_per_render(
        text: str, data: dict[str, Any]) -> None:
    """Nested loops, recursive macros, filters inside loops, string building in a loop and
    methods, slices or ``in`` on a long string all spend the render's loop budget, and stop
    at it within a second."""
    render = compile_template(text, NAMES)
    started = time.monotonic()
    with pytest.raises(ConditionError, match="exceeds the loop budget of 100000 iterations"):
        render(scope(**data))
    assert time.monotonic() - started < 1.5
    assert compile_template(text, NAMES)(scope(n=2, l=[1, 2])) is not None  # a fresh budget


def test_output_is_capped_while_rendering() -> None:
    """A template whose output passes MAX_OUTPUT fails once it gets there."""
    render = compile_template("{% for s in event.l %}{{ s }}{% endfor %}", NAMES)
    with pytest.raises(ConditionError, match="output bound of 4194304 characters"):
        render(scope(l=["x" * 250_000] * 20))
    fast = compile_template("{{ event.s }}{{ event.s }}", NAMES)
    with pytest.raises(ConditionError, match="output bound"):
        fast(scope(s="x" * 2_500_000))


def test_a_single_expression_template_cannot_return_a_structure_too_big_to_store() -> None:
    """``[s] * 100000`` is 100,000 items but a gigabyte as JSON: refused as a value."""
    with pytest.raises(ConditionError, match="output bound"):
        compile_template("{{ [event.s] * 100000 }}", NAMES)(scope(s="a" * 10_000))


def test_lists_and_dicts_cannot_be_mutated_in_jinja() -> None:
    """``l.extend(l)`` in a loop would double a list per iteration: the sandbox refuses it."""
    render = compile_template("{% for i in range(30) %}{{ event.l.extend(event.l) }}{% endfor %}",
                              NAMES)
    with pytest.raises(ConditionError, match="access to attribute 'extend'"):
        render(scope(l=[1]))


@pytest.mark.parametrize("text, expected", [
    ("2 ** 3 ** 2", 64),   # Jinja's ** groups to the left, on both paths
    ("-2 ** 2", 4),        # and binds a sign first
    ("2 ** (3 ** 2)", 512),
    ("event.n ** 2", 144),
    ("2 ** 10", 1024),
    ("event.n ** -1", 1 / 12),
    ("'ab' * 3", "ababab"),
    ("event.s * 2", "xx"),
    ("[0] * 3", [0, 0, 0]),
    ("event.n + 1", 13),
    ("event.s + '!'", "x!"),
    ("'%05d' % event.n", "00012"),
    ("event.n % 5", 2),
    ("sum([1, 2, 3])", 6),
    ("sum([[1], [2]], [])", [1, 2]),
    ("round(1234, -2)", 1200),
    ("str(event.n)", "12"),
    ("'a-b'.replace('-', '--')", "a--b"),
])
def test_legitimate_arithmetic_and_strings_are_unchanged(text: str, expected: Any) -> None:
    """Values well inside the bounds compute exactly what Python computes."""
    assert compile_expression(text, NAMES)(scope(n=12, s="x")) == expected


SERVICENOW_DESCRIPTION = """\
{{ event.labels.alertname }} on {{ event.labels.instance }} ({{ event.labels.severity | upper }})

Summary: {{ event.annotations.summary }}
{% if event.annotations.description %}Details: {{ event.annotations.description }}
{% endif %}
Labels:
{% for name, value in event.labels | dictsort %}  - {{ name }}: {{ value }}
{% endfor %}
Recent samples ({{ event.samples | length }}):
{% for s in event.samples %}{% set hot = ' !' if s.value > 90 else '' %}
{{- loop.index }}. {{ s.at }} {{ '%.1f' | format(s.value) }}%{{ hot }}
{% endfor %}
Hosts: {{ event.hosts | map('upper') | join(', ') }}
{{ '-' * 40 }}
Opened by loopd for {{ event.labels.alertname ~ '/' ~ event.labels.instance }}"""


def test_a_realistic_servicenow_description_still_renders() -> None:
    """A ticket template with loops over hundreds of items, filters and string building
    renders in full, well inside every bound."""
    samples = [{"at": f"10:{i // 60:02d}:{i % 60:02d}", "value": 80 + i % 20} for i in range(300)]
    data = {
        "labels": {"alertname": "DiskFull", "instance": "db-1:9100", "severity": "critical",
                   "job": "node", "mountpoint": "/var"},
        "annotations": {"summary": "disk /var is 97% full", "description": "grows 1%/h"},
        "samples": samples, "hosts": [f"db-{i}" for i in range(200)],
    }
    started = time.monotonic()
    text = compile_template(SERVICENOW_DESCRIPTION, NAMES)(scope(**data))
    assert time.monotonic() - started < 0.5
    assert text.startswith("DiskFull on db-1:9100 (CRITICAL)\n\nSummary: disk /var is 97% full")
    assert "  - mountpoint: /var\n" in text
    assert "300. 10:04:59 99.0% !\n" in text
    assert "Hosts: DB-0, DB-1," in text and "DB-199\n" in text
    assert text.endswith("-" * 40 + "\nOpened by loopd for DiskFull/db-1:9100")


BAD_RULES = """\
rules:
  - name: huge-power
    if: "9**(9**9) > 1"
    run: {action: core.noop}
  - name: huge-string
    run: {action: core.log, input: {message: "{{ 'a' * 10**9 }}"}}
  - name: lorem
    run: {action: core.log, input: {message: "{{ lipsum(100000, false, 1000, 2000) }}"}}
  - name: nested-range
    run:
      action: core.log
      input:
        message: "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
"""


def test_loopd_check_refuses_static_abuse_at_once(tmp_path: Path, packs_dir: Path) -> None:
    """``loopd check`` (the real command, in a child process limited to 1 GiB) names each
    rule whose template is out of bounds and exits 1 within seconds."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "bad.yaml").write_text(BAD_RULES)
    config = tmp_path / "loopd.yaml"
    config.write_text(f"listen: 127.0.0.1:0\nsources: [{{name: webhook, type: webhook}}]\n"
                      f"rules: [rules]\npacks: [{packs_dir}]\nstore: {{path: var/loopd.db}}\n")
    code = f"""
import sys
from loopd.cli import main
sys.exit(main(["check", "-c", {str(config)!r}]))
"""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({LIMIT_AS}, {LIMIT_AS}))\n"
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                              text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("loopd check still running after 30s")
    assert time.monotonic() - started < 15
    assert done.returncode == EXIT_INVALID, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("error: ")]
    bad = tmp_path / "rules" / "bad.yaml"
    assert errors == [
        f"error: {bad}:3 huge-power if: expression exceeds the integer bound of 4096 bits",
        f"error: {bad}:6 huge-string run.input: expression exceeds the string bound of "
        "4194304 characters",
        f"error: {bad}:8 lorem run.input: function 'lipsum' is not available in loopd "
        "templates",
        f"error: {bad}:10 nested-range run.input: template exceeds the loop budget of 100000 "
        "iterations (10000000000 in nested loops)",
    ]
