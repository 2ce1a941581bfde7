"""Safe expressions and templates: the fast AST path, the Jinja fallback, and their errors."""

from __future__ import annotations

import re
from typing import Any

import pytest

from loopd.errors import ConditionError
from loopd.events import Event
from loopd.expr.compiler import (
    _compile_fast,
    _compile_jinja_expression,
    compile_expression,
    compile_template,
)

NAMES = frozenset({"event", "vars", "key", "inventory"})


def _scope() -> dict[str, Any]:
    event = Event(
        id="ev-1", source="alertmanager", topic="NginxDown", key="web-1",
        data={
            "status": "firing", "value": 95, "ratio": 0.5, "nums": [3, 1, 2],
            "labels": {"alertname": "NginxDown", "instance": "web-1:9113",
                       "severity": "critical"},
        },
    )
    return {"event": event, "vars": {"host": "web-1"}, "key": "web-1",
            "inventory": {"web-1": {"role": "web", "group": "frontend"}}}


SAME_RESULT = [
    "event.value > 90",
    "event.value >= 95 and event.ratio < 1",
    "not event.value < 10",
    "1 < event.value < 100",
    "event.labels.severity in ['critical', 'page']",
    "event.labels.severity not in ['warning']",
    "event.labels.missing",
    "event.labels.missing.deeper",
    "event.labels['alertname']",
    "event.nums[0]",
    "event.nums[1:]",
    "event.nums[7]",
    "event.value * 2 + 1",
    "event.value % 7",
    "event.value // 2",
    "-event.ratio",
    "'big' if event.value > 90 else 'small'",
    "event.labels.instance.startswith('web-')",
    "event.labels.instance.split(':')[0]",
    "event.labels.severity.upper()",
    "event.labels.get('job', 'none')",
    "len(event.nums)",
    "max(event.nums)",
    "event.source",
    "event.id",
    "event.topic",
    "event.key",
    "event.data.value",
    "vars.host",
    "inventory[key].role",
    "inventory['db-9'].role",
    "key == 'web-1'",
    "event.labels.severity == 'critical' or event.value > 1000",
    "[event.value, event.ratio]",
    "{'host': vars.host}",
    "true and not false",
    "none is none",
]


@pytest.mark.parametrize("expr", SAME_RESULT)
def test_fast_path_and_jinja_fallback_agree(expr: str) -> None:
    """Every expression inside the fast subset evaluates to the same value through Jinja."""
    scope = _scope()
    fast = _compile_fast(expr, NAMES)
    jinja = _compile_jinja_expression(expr)
    assert fast(scope) == jinja(scope)


@pytest.mark.parametrize("text", ["event.value > 90", "{{ event.value > 90 }}",
                                  "  {{event.value > 90}}  "])
def test_braces_around_a_condition_are_optional(text: str) -> None:
    """A condition with or without ``{{ }}`` compiles to the same check."""
    check = compile_expression(text, NAMES)
    assert check(_scope()) is True
    scope = _scope()
    scope["event"].data["value"] = 10
    assert check(scope) is False


def test_filters_and_tests_fall_back_to_jinja() -> None:
    """Expressions outside the fast subset (filters, tests, ``~``) still evaluate, via Jinja."""
    scope = _scope()
    assert compile_expression("event.labels.alertname | lower", NAMES)(scope) == "nginxdown"
    assert compile_expression("event.labels.job is defined", NAMES)(scope) is False
    assert compile_expression("event.labels.alertname ~ '!'", NAMES)(scope) == "NginxDown!"
    # the fast path's functions exist in the fallback too
    assert compile_expression("len(event.nums | list) == 3", NAMES)(scope) is True


@pytest.mark.parametrize("text", [
    "event.__class__",
    "event._private",
    "event.labels.__class__.__mro__",
    "event.labels.instance.__len__()",
    "event.__class__ ~ 'x'",                # Jinja fallback
    "event.value is defined and event._x",  # Jinja fallback
])
def test_private_attributes_are_refused_at_compile_time(text: str) -> None:
    """An attribute starting with ``_`` is refused when compiling, on both paths."""
    with pytest.raises(ValueError, match="is not allowed"):
        compile_expression(text, NAMES)


@pytest.mark.parametrize("text", [
    "{{ event.__class__ }}",
    "host {{ event._x }}",
    "host {{ event._x ~ 1 }}",
    "{% if true %}{{ event.__class__ }}{% endif %}",
])
def test_private_attributes_are_refused_in_templates(text: str) -> None:
    """Templates refuse ``_`` attributes at compile time too, text and statements included."""
    with pytest.raises(ValueError, match="is not allowed"):
        compile_template(text, NAMES)


def test_subscript_reads_data_never_python_attributes() -> None:
    """``event['__class__']`` is a data lookup (None), never the Python attribute."""
    assert compile_expression("event['__class__']", NAMES)(_scope()) is None
    assert compile_template("{{ event['__class__'] }}", NAMES)(_scope()) is None


def test_methods_outside_the_whitelist_fail_with_condition_error() -> None:
    """Calling a method that is not whitelisted raises ConditionError naming the method."""
    check = compile_expression("event.labels.instance.format(1)", NAMES)
    with pytest.raises(ConditionError, match="'format' is not available on str"):
        check(_scope())


@pytest.mark.parametrize("expr", [
    "event.value > 'a'",                 # fast path
    "event.labels.missing > 3",          # fast path: None > 3
    "event.value / 0",                   # fast path
    "(event.nums | first) > 'a'",        # Jinja fallback
    "(event.value | int) / 0",           # Jinja fallback
])
def test_evaluation_errors_raise_condition_error_naming_the_expression(expr: str) -> None:
    """A condition that fails at evaluation raises ConditionError whose message quotes it."""
    check = compile_expression(expr, NAMES)
    with pytest.raises(ConditionError) as info:
        check(_scope())
    assert expr in str(info.value)


def test_text_template_errors_name_the_expression() -> None:
    """A failing expression inside a text template raises ConditionError quoting it."""
    render = compile_template("value: {{ event.value > 'a' }}", NAMES)
    with pytest.raises(ConditionError, match=re.escape("event.value > 'a'")):
        render(_scope())


@pytest.mark.parametrize("text, message", [
    ("event.value >", "invalid expression 'event.value >'"),
    ("{{ }}", "empty expression"),
    ("event.value | nosuchfilter", "nosuchfilter"),
])
def test_compile_errors_name_the_problem(text: str, message: str) -> None:
    """Syntax errors, empty expressions and unknown filters are ValueErrors at compile time."""
    with pytest.raises(ValueError, match=message):
        compile_expression(text, NAMES)


@pytest.mark.parametrize("text, expected", [
    ("{{ event.value }}", 95),
    ("{{ event.ratio }}", 0.5),
    ("{{ event.nums }}", [3, 1, 2]),
    ("{{ event.labels }}", {"alertname": "NginxDown", "instance": "web-1:9113",
                            "severity": "critical"}),
    ("{{ event.value > 90 }}", True),
    ("{{ event.labels.missing }}", None),
    ("{{ event.nums | length }}", 3),      # Jinja fallback keeps the type too
    ("  {{ event.value }}  ", 95),
])
def test_a_single_expression_template_keeps_its_native_type(text: str, expected: Any) -> None:
    """A template that is exactly one ``{{ expr }}`` returns the value itself, not text."""
    value = compile_template(text, NAMES)(_scope())
    assert value == expected
    assert type(value) is type(expected)


def test_text_templates_render_to_strings() -> None:
    """Text around expressions renders to a string; None renders as empty text."""
    render = compile_template("{{ event.labels.alertname }} on {{ vars.host }} "
                              "({{ event.value }}%){{ event.labels.missing }}", NAMES)
    assert render(_scope()) == "NginxDown on web-1 (95%)"
    jinja = compile_template("{% for n in event.nums %}{{ n }},{% endfor %}", NAMES)
    assert jinja(_scope()) == "3,1,2,"


def test_structures_are_compiled_item_by_item() -> None:
    """Dicts and lists are rendered recursively; non-template values stay constants."""
    render = compile_template(
        {"host": "{{ vars.host }}", "value": "{{ event.value }}", "tags": ["a", "{{ key }}"],
         "retries": 3, "dry": False, "plain": "no template here"}, NAMES)
    assert render(_scope()) == {"host": "web-1", "value": 95, "tags": ["a", "web-1"],
                                "retries": 3, "dry": False, "plain": "no template here"}


def test_unknown_names_read_as_nothing() -> None:
    """A name outside the scope is undefined (None), never a Python builtin or global."""
    assert compile_expression("open", NAMES)(_scope()) is None
    assert compile_expression("__import__", NAMES)(_scope()) is None
