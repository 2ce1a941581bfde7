"""Topic patterns: MQTT wildcards and named captures, compiled once."""

from __future__ import annotations

import pytest

from loopd.errors import ConfigError
from loopd.expr.topics import compile_topic_pattern


def test_named_capture_returns_the_level() -> None:
    """A ``{name}`` level captures exactly one topic level under that name."""
    match = compile_topic_pattern("telemetry/{host}/cpu")
    assert match("telemetry/web-1/cpu") == {"host": "web-1"}
    assert match("telemetry/web-1/mem") is None
    assert match("telemetry/a/b/cpu") is None
    assert match("telemetry/web-1/cpu/extra") is None


def test_several_captures_and_plus() -> None:
    """``+`` matches one level without capturing it, next to named captures."""
    match = compile_topic_pattern("site/{site}/+/{metric}")
    assert match("site/par/web-1/cpu") == {"site": "par", "metric": "cpu"}
    assert match("site/par/cpu") is None


def test_literal_pattern_matches_only_itself() -> None:
    """A pattern without wildcards matches only the identical topic, capturing nothing."""
    match = compile_topic_pattern("alerts/firing")
    assert match("alerts/firing") == {}
    assert match("alerts/firing/x") is None
    assert match("alerts") is None


def test_literal_levels_are_not_regular_expressions() -> None:
    """Regex metacharacters in literal levels are matched literally."""
    match = compile_topic_pattern("a.b/{x}/c*")
    assert match("a.b/1/c*") == {"x": "1"}
    assert match("axb/1/cc") is None


def test_hash_matches_zero_or_more_levels() -> None:
    """A trailing ``#`` matches the parent level itself and any depth below it."""
    match = compile_topic_pattern("sensors/{room}/#")
    assert match("sensors/kitchen") == {"room": "kitchen"}
    assert match("sensors/kitchen/temp") == {"room": "kitchen"}
    assert match("sensors/kitchen/a/b/c") == {"room": "kitchen"}
    assert match("sensorsX/kitchen") is None


def test_lone_hash_matches_everything_but_dollar_topics() -> None:
    """``#`` alone matches every topic except ``$``-topics, as in MQTT."""
    match = compile_topic_pattern("#")
    assert match("a") == {}
    assert match("a/b/c") == {}
    assert match("$SYS/broker/uptime") is None


def test_leading_wildcard_does_not_match_dollar_topics() -> None:
    """A leading ``+`` or capture does not match ``$SYS``; a literal ``$SYS`` level does."""
    assert compile_topic_pattern("+/broker/uptime")("$SYS/broker/uptime") is None
    assert compile_topic_pattern("{top}/broker/uptime")("$SYS/broker/uptime") is None
    assert compile_topic_pattern("$SYS/+/uptime")("$SYS/broker/uptime") == {}


def test_empty_levels_are_levels() -> None:
    """As in MQTT, an empty level is a level: ``+`` and captures may match it."""
    match = compile_topic_pattern("a/{x}/b")
    assert match("a//b") == {"x": ""}
    assert compile_topic_pattern("a/+")("a/") == {}


def test_matches_return_fresh_dicts() -> None:
    """Each match returns its own dict, so a caller may mutate it safely."""
    match = compile_topic_pattern("a/b")
    first = match("a/b")
    assert first is not None
    first["x"] = "1"
    assert match("a/b") == {}


@pytest.mark.parametrize(
    ("pattern", "culprit"),
    [
        ("", "empty"),
        ("a/#/b", "'#' must be the last level"),
        ("a/b+", "mixes a wildcard"),
        ("a/#x", "mixes a wildcard"),
        ("a/cpu-{host}", "mixes a wildcard"),
        ("a/{1host}", "mixes a wildcard"),
        ("{x}/{x}", "appears twice"),
    ],
)
def test_invalid_patterns_name_the_problem(pattern: str, culprit: str) -> None:
    """An invalid pattern raises ConfigError saying what is wrong."""
    with pytest.raises(ConfigError, match=culprit):
        compile_topic_pattern(pattern)
