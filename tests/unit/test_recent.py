"""loopd.decide.recent: the events decided lately, oldest forgotten first."""

from __future__ import annotations

import tracemalloc

from loopd.decide.recent import RecentEvents


def test_the_last_size_events_are_remembered_by_when_they_were_first_decided() -> None:
    recent = RecentEvents(3)
    for n in ("1", "2", "3"):
        recent.add("kafka", n)
    recent.add("kafka", "1")  # decided again: it stays where it was
    recent.add("kafka", "4")  # the oldest, "1", goes
    assert [recent.seen("kafka", n) for n in ("1", "2", "3", "4")] == [
        False, True, True, True]
    assert len(recent) == 3


def test_a_source_and_an_id_never_pass_for_another_pair() -> None:
    recent = RecentEvents(10)
    recent.add("a:b", "c")
    recent.add("ab", "c")
    assert not recent.seen("a", "b:c") and not recent.seen("a", "bc")
    assert not recent.seen("a:bc", "") and not recent.seen("1:a", "b:c")
    assert recent.seen("a:b", "c") and recent.seen("ab", "c")
    assert not recent.seen("kafka", "c")


def test_what_the_store_remembers_is_loaded_in_order() -> None:
    recent = RecentEvents(2)
    recent.extend([("mqtt", "x"), ("mqtt", "y"), ("kafka", "x")])
    assert [recent.seen(*i) for i in (("mqtt", "x"), ("mqtt", "y"), ("kafka", "x"))] == [
        False, True, True]


def test_a_full_window_takes_a_string_set_and_deque_entry_per_event() -> None:
    """The default window (200,000) full of Kafka ids: about 115 bytes an event, where
    an OrderedDict of (source, id) tuples took about 220."""
    ids = [f"alerts:{n % 4}:{n}" for n in range(50_000)]
    tracemalloc.start()
    try:
        recent = RecentEvents(200_000)
        for event_id in ids:
            recent.add("alertmanager", event_id)
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(recent) == 50_000
    assert size / 50_000 < 140
