"""The rule index and ``on:`` checks: from an event to exactly the rules that concern it."""

from __future__ import annotations

from typing import Any

from loopd.events import Event
from loopd.rules.compile import CompiledRule, compile_rule
from loopd.rules.matcher import RuleIndex
from loopd.rules.model import Rule


def _rule(name: str, on: dict[str, Any] | None = None, **extra: Any) -> CompiledRule:
    raw = {"name": name, "on": on or {}, "run": {"action": "core.noop"}, **extra}
    return compile_rule(Rule.model_validate(raw), f"test.yaml:{name}")


def _alert(alertname: str, *, status: str = "firing", source: str = "alertmanager",
           **labels: Any) -> Event:
    return Event(id=f"{alertname}-{status}", source=source, topic=alertname,
                 data={"status": status, "labels": {"alertname": alertname, **labels}})


def _matching(index: RuleIndex, event: Event) -> list[str]:
    """Names of the rules whose whole ``on:`` accepts the event."""
    return [r.name for r in index.candidates(event) if r.accepts(event) is not None]


def test_index_returns_only_the_relevant_rule_among_a_thousand() -> None:
    """With 1,000 alert rules, an alert's candidates are the one rule for its alertname."""
    rules = [_rule(f"alert-{i}", {"source": "alertmanager",
                                  "match": {"status": "firing", "labels.alertname": f"A{i}"}})
             for i in range(1000)]
    index = RuleIndex(rules)
    candidates = index.candidates(_alert("A517"))
    assert [r.name for r in candidates] == ["alert-517"]
    assert candidates[0].accepts(_alert("A517")) == {}
    assert index.candidates(_alert("Unknown")) == []
    # the indexed equality is not enough: every other match must hold too
    assert _matching(index, _alert("A517", status="resolved")) == []


def test_rules_of_other_sources_are_never_candidates() -> None:
    """A rule bound to one source is not even looked at for events of another source."""
    index = RuleIndex([
        _rule("am", {"source": "alertmanager", "match": {"labels.alertname": "X"}}),
        _rule("kafka", {"source": "kafka-alerts", "match": {"labels.alertname": "X"}}),
    ])
    assert [r.name for r in index.candidates(_alert("X"))] == ["am"]
    assert [r.name for r in index.candidates(_alert("X", source="kafka-alerts"))] == ["kafka"]
    assert index.candidates(_alert("X", source="mqtt")) == []


def test_a_list_of_values_matches_any_of_them() -> None:
    """``match: {path: [a, b]}`` accepts an event whose value is any one of the list."""
    index = RuleIndex([
        _rule("paging", {"source": "alertmanager",
                         "match": {"labels.severity": ["critical", "page"]}}),
        _rule("firing-paging", {"source": "alertmanager", "match": {
            "status": "firing", "labels.severity": ["critical", "page"]}}),
    ])
    assert _matching(index, _alert("X", severity="critical")) == ["paging", "firing-paging"]
    assert _matching(index, _alert("X", severity="page")) == ["paging", "firing-paging"]
    assert _matching(index, _alert("X", severity="page", status="resolved")) == ["paging"]
    assert _matching(index, _alert("X", severity="warning")) == []
    assert _matching(index, _alert("X")) == []  # a missing path never matches


def test_match_values_keep_their_types() -> None:
    """Numbers, booleans and null match the same JSON values; a missing path is not null."""
    index = RuleIndex([
        _rule("code", {"match": {"code": 503}}),
        _rule("flag", {"match": {"up": False}}),
        _rule("null", {"match": {"owner": None}}),
    ])

    def event(**data: Any) -> Event:
        return Event(id="1", source="webhook", topic="t", data=data)

    assert _matching(index, event(code=503)) == ["code"]
    assert _matching(index, event(code="503")) == []
    assert _matching(index, event(up=False)) == ["flag"]
    assert _matching(index, event(owner=None)) == ["null"]
    assert _matching(index, event()) == []


def test_rules_without_source_see_every_source() -> None:
    """A rule with no ``on.source`` is a candidate for events of any source."""
    index = RuleIndex([
        _rule("anywhere", {"match": {"labels.alertname": "X"}}),
        _rule("everything"),
        _rule("only-am", {"source": "alertmanager"}),
    ])
    assert sorted(_matching(index, _alert("X"))) == ["anywhere", "everything", "only-am"]
    assert sorted(_matching(index, _alert("X", source="mqtt"))) == ["anywhere", "everything"]
    assert _matching(index, _alert("Y", source="mqtt")) == ["everything"]


def test_disabled_rules_are_not_indexed() -> None:
    """A rule with ``enabled: false`` never matches."""
    index = RuleIndex([_rule("off", {"source": "alertmanager"}, enabled=False)])
    assert index.candidates(_alert("X")) == []


def test_topic_patterns_capture_levels_into_vars() -> None:
    """``on.topic`` with ``{host}`` accepts matching topics and returns the captured levels."""
    rule = _rule("cpu", {"source": "mqtt", "topic": "telemetry/{host}/cpu"})
    index = RuleIndex([rule])

    def sample(topic: str, **vars: str) -> Event:
        return Event(id=topic, source="mqtt", topic=topic, data={"value": 97}, vars=vars)

    assert [r.name for r in index.candidates(sample("telemetry/web-1/cpu"))] == ["cpu"]
    assert rule.accepts(sample("telemetry/web-1/cpu")) == {"host": "web-1"}
    assert rule.accepts(sample("telemetry/web-1/mem")) is None
    assert rule.accepts(sample("telemetry/a/b/cpu")) is None
    # variables the source already captured are kept; the rule's captures win on conflict
    assert rule.accepts(sample("telemetry/web-2/cpu", site="par", host="x")) == {
        "site": "par", "host": "web-2"}


def test_unhashable_values_never_match_and_never_raise() -> None:
    """An event carrying a list or object where a rule expects a scalar is simply not matched."""
    index = RuleIndex([
        _rule("two", {"source": "alertmanager",
                      "match": {"status": "firing", "labels.alertname": "X"}}),
        _rule("popular", {"source": "alertmanager", "match": {"status": "firing"}}),
    ])
    weird = Event(id="w", source="alertmanager", topic="X",
                  data={"status": ["firing"], "labels": {"alertname": "X"}})
    assert _matching(index, weird) == []
    weirder = Event(id="w2", source="alertmanager", topic="X",
                    data={"status": "firing", "labels": {"alertname": {"nested": 1}}})
    assert _matching(index, weirder) == ["popular"]


def test_the_most_selective_equality_is_indexed() -> None:
    """Rules sharing ``status: firing`` are told apart by their alertname, not scanned."""
    rules = [_rule(f"r{i}", {"source": "alertmanager",
                             "match": {"status": "firing", "labels.alertname": f"A{i}"}})
             for i in range(50)]
    index = RuleIndex(rules)
    assert [r.name for r in index.candidates(_alert("A7"))] == ["r7"]
