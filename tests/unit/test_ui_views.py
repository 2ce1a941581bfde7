"""The web UI's rendering helpers: times, durations, guards, escaping, server-sent events."""

from __future__ import annotations

from typing import Any

from loopd.decisions import decision_guard
from loopd.ui.live import sse
from loopd.ui.views import ago, condense, environment, human_duration, tone, when

NOW = 1_796_000_000.0


def test_durations_read_as_people_say_them() -> None:
    """Milliseconds under a second, one decimal under ten seconds, then min/h/d."""
    assert human_duration(0.35) == "350 ms"
    assert human_duration(4.25) == "4.2 s"
    assert human_duration(14.2) == "14 s"
    assert human_duration(185) == "3 min 5 s"
    assert human_duration(7800) == "2 h 10 min"
    assert human_duration(3 * 86400) == "3 d"
    assert human_duration(None) == "-"
    assert ago(0.5) == "just now" and ago(180) == "3 min ago" and ago(-60) == "in 1 min"


def test_a_time_shows_rfc3339_and_how_long_ago_from_a_float_or_the_apis_text() -> None:
    """The store's epoch float and the API's RFC 3339 string show the same; junk shows -."""
    from_float = when(NOW - 180, now=NOW)
    assert "3 min ago" in from_float and 'datetime="2026-11-30T00:50:20.000Z"' in from_float
    assert when("2026-12-01T16:39:41.123Z", now=NOW).count("2026-12-01T16:39:41.123Z") == 3
    assert "-" in when(None) and "-" in when("not a time")


def test_event_data_is_escaped_never_a_template() -> None:
    """Untrusted text with HTML or template syntax renders as text in every template."""
    env = environment()
    page = env.from_string("{{ d.reason }} {{ d | pretty }}").render(
        d={"reason": "<script>alert(1)</script> {{ 7*7 }}"})
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "{{ 7*7 }}" in page and "49" not in page


def test_statuses_have_a_colour() -> None:
    """Good, bad, waiting and in-between statuses get distinct badge tones."""
    assert {tone("fixed"), tone("failed"), tone("awaiting_approval"), tone("running"),
            tone("suppressed"), tone("whatever")} == {"ok", "bad", "wait", "active", "warn",
                                                      "quiet"}


def test_a_multiline_fragment_is_one_server_sent_event() -> None:
    """Every line of the HTML is a data: line of one event, ended by a blank line."""
    assert sse("incidents", "<p>a</p>\n<p>b</p>") == \
        b"event: incidents\ndata: <p>a</p>\ndata: <p>b</p>\n\n"
    assert sse("trace", "") == b"event: trace\ndata: \n\n"


def test_a_stretch_of_joined_events_is_one_row_and_suppressions_stay_apart() -> None:
    """Consecutive joined decisions become one row counting them; the others stay as they
    are, in order."""
    decisions: list[dict[str, Any]] = [
        {"outcome": "suppressed", "time": 1, "reason": "for: held 0s of 1s"},
        {"outcome": "run_created", "time": 2, "reason": None},
        *({"outcome": "joined", "time": t, "reason": "incident already open"}
          for t in (3, 4, 5)),
        {"outcome": "suppressed", "time": 6, "reason": "throttled: once within 600s"}]
    rows = condense(decisions)
    assert [(r["outcome"], r["count"]) for r in rows] == [
        ("suppressed", 1), ("run_created", 1), ("joined", 3), ("suppressed", 1)]
    assert rows[2]["time"] == 3 and rows[2]["until"] == 5
    assert rows[2]["reason"] == "3 events joined the open incident"
    assert decision_guard(rows[3]["reason"]) == "throttle"
