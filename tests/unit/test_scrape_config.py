"""``type: scrape`` in loopd.yaml: its fields checked at the edge, by ``loopd check`` too."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from loopd.cli import EXIT_INVALID, EXIT_OK, main
from loopd.sources.exposition import ExpositionError, Labeler, name_filter, parse

CONFIG = """\
listen: 127.0.0.1:0
sources:
  - name: node
    type: scrape
{fields}
rules: []
packs: []
inventory: inventory.yaml
"""


def check(tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: str,
          inventory: str = "entities: {}\n") -> tuple[int, str]:
    (tmp_path / "loopd.yaml").write_text(CONFIG.format(fields=fields))
    (tmp_path / "inventory.yaml").write_text(inventory)
    code = main(["check", "-c", str(tmp_path / "loopd.yaml")])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize(("fields", "says"), [
    ("    targets: ['127.0.0.1:9100']\n    metrics: ['node_[load']",
     "'node_[load' is not a glob of metric names"),
    ("    targets: ['127.0.0.1:9100']\n    drop: ['node load']",
     "'node load' is not a glob of metric names"),
    ("    targets: ['127.0.0.1:9100']\n    interval: 0s", "interval"),
    ("    targets: ['127.0.0.1:9100']\n    interval: 10s\n    timeout: 10s",
     "timeout (10s) must be below the interval (10s)"),
    ("    targets: ['web-1']", "target 'web-1' is neither host:port nor an http(s) URL"),
    ("    targets: ['127.0.0.1:9100', 'http://127.0.0.1:9100/metrics']",
     "have the same instance 127.0.0.1:9100"),
    ("    targets: []", "source node: no targets"),
    ("    targets: []\n    inventory: true",
     "source node: no targets, and no inventory entity has a metrics_url"),
    ("    targets: ['http://scraper:s3cret@10.0.0.5:9100/metrics']",
     "a target URL must not carry credentials"),
    ("    targets: ['http://admin:s3cretB@web-2:x/metrics']",
     "a target URL must not carry credentials"),
])
def test_check_names_what_is_wrong_with_a_scrape_source(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: str, says: str) -> None:
    """A bad glob, an interval <= 0, a timeout not below the interval, a malformed or
    duplicate target, a source with nothing to scrape, and a URL with a password (never
    shown, even when its port is bad too) each fail ``loopd check``."""
    code, out = check(tmp_path, capsys, fields)
    assert code == EXIT_INVALID
    assert says in out, out
    assert "s3cret" not in out


def test_check_accepts_targets_from_the_inventory_only_when_asked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No ``targets`` is fine with ``inventory: true`` when an inventory entity has a
    ``metrics_url`` (without it, the default, entities are not scraped); a ``metrics_url``
    that is not a URL is named with its entity, and one with a password and a bad port
    never shows the password."""
    good = "entities:\n  web-1: {metrics_url: 'http://10.0.0.5:9100/metrics'}\n"
    code, out = check(tmp_path, capsys, "    interval: 15s\n    inventory: true", good)
    assert code == EXIT_OK, out
    code, out = check(tmp_path, capsys, "    interval: 15s", good)
    assert code == EXIT_INVALID
    assert "source node: no targets" in out
    code, out = check(tmp_path, capsys, "    interval: 15s\n    inventory: true",
                      "entities:\n  web-1: {metrics_url: '10.0.0.5'}\n")
    assert code == EXIT_INVALID
    assert "entity web-1: metrics_url must be an http(s) URL" in out
    code, out = check(tmp_path, capsys, "    interval: 15s\n    inventory: true",
                      "entities:\n  web-1: {metrics_url: 'http://admin:s3cretB@web-2:x/m'}\n")
    assert code == EXIT_INVALID
    assert "entity web-1: metrics_url: a target URL must not carry credentials" in out
    assert "s3cret" not in out


def test_filters_drop_names_before_parsing_and_remember_series() -> None:
    """Allow and deny globs decide by name (a dropped line is never parsed, so its bad
    text is no error); a series seen once is read from memory on the next scrape."""
    labeler = Labeler(name_filter(["node_*"], ["node_boot*"]), name_filter([], []),
                      {"instance": "h:1", "job": "node"}, False)
    body = 'node_load1 0.5\nnode_boot_time NOT-A-NUMBER\nother{a="b"} 1\nnode_up{x="1"} 1 1000\n'
    first = parse(body, openmetrics=False, known={}, labeler=labeler, limit=10)
    assert [(s[0], v, t) for s, v, t in first.rows] == [
        ("node_load1", 0.5, None), ('node_up{x="1"}', 1.0, 1.0)]
    again = parse(body.replace("0.5", "0.7"), openmetrics=False, known=first.seen,
                  labeler=labeler, limit=1)
    assert [v for _, v, _ in again.rows] == [0.7] and again.beyond == 1
    assert again.rows[0][0] is first.rows[0][0]  # the same Series, not parsed again


def test_a_filter_remembers_a_bounded_number_of_names() -> None:
    """A target inventing a new metric name every scrape costs the filter no memory past
    its bound of remembered answers, and its answers stay right after forgetting."""
    keep = name_filter(["node_*"], [])
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(200_000):
            assert not keep(f"junk_{i}")
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 4 * 1024 * 1024, grown  # 200,000 remembered names: about 20 MB
    assert keep("node_load1") and not keep("junk_0")


def test_openmetrics_is_filtered_by_name_and_limit_before_it_is_parsed() -> None:
    """An OpenMetrics body is filtered by name and ``limit`` before it is parsed, and what
    is left parses: a counter with an exemplar, its seconds timestamp, a histogram's
    ``_count`` without its buckets; a body without ``# EOF`` is refused."""
    labeler = Labeler(name_filter(["req_*"], []), name_filter([], []),
                      {"instance": "h:1", "job": "node"}, False)
    body = ('# TYPE junk gauge\njunk 1\n# TYPE req counter\n# HELP req Requests.\n'
            'req_total{code="200"} 5 1700000000.5 # {trace="t"} 1\nreq_total{code="500"} 1\n'
            '# EOF\n')
    parsed = parse(body, openmetrics=True, known={}, labeler=labeler, limit=1)
    assert [(s[0], v, t) for s, v, t in parsed.rows] == [
        ('req_total{code="200"}', 5.0, 1700000000.5)]
    assert parsed.beyond == 1
    with pytest.raises(ExpositionError, match="EOF"):
        parse(body.replace("# EOF\n", ""), openmetrics=True, known={}, labeler=labeler,
              limit=10)
    histogram = ('# TYPE lat histogram\nlat_bucket{a="1",le="+Inf"} 2 # {t="x"} 1\n'
                 'lat_count{a="1"} 2\nlat_bucket{a="2",le="+Inf"} 3\nlat_count{a="2"} 3\n'
                 '# EOF\n')
    counts = Labeler(name_filter(["lat_count"], []), name_filter([], []),
                     {"instance": "h:1", "job": "node"}, False)
    parsed = parse(histogram, openmetrics=True, known={}, labeler=counts, limit=10)
    assert [(s[0], v) for s, v, _ in parsed.rows] == [
        ('lat_count{a="1"}', 2.0), ('lat_count{a="2"}', 3.0)]
