"""``type: promql`` in loopd.yaml: what ``loopd check`` refuses, with its place, and the
pure parts of the source (fingerprints, round times)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loopd.cli import EXIT_INVALID, EXIT_OK, main
from loopd.config import PromQLSourceConfig, load_config
from loopd.errors import ConfigError
from loopd.sources.promql import fingerprint, round_number

RULES = """\
rules:
  - name: disk
    on: {source: prom, topic: promql/disk_low}
    key: "{{ event.labels.instance }}"
    run: {action: core.noop}
"""


def write(tmp_path: Path, packs_dir: Path, source: str) -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "rules.yaml").write_text(RULES)
    config = tmp_path / "loopd.yaml"
    config.write_text(f"""\
listen: 127.0.0.1:0
sources:
{source}
rules: [rules]
packs: [{packs_dir}]
store: {{path: var/loopd.db}}
""")
    return config


GOOD = """\
  - name: prom
    type: promql
    url: http://prometheus:9090/prom
    interval: 15s
    queries:
      - {name: disk_low, expr: 'node_filesystem_avail_bytes / node_filesystem_size_bytes < 0.1',
         key_label: instance}
"""


def test_check_passes_a_promql_source_and_a_rule_on_its_topic(
    tmp_path: Path, packs_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The issue's example source with a rule on ``promql/disk_low`` checks clean; the
    timeout defaults to 10 s, or the interval when that is shorter."""
    config = write(tmp_path, packs_dir, GOOD)
    assert main(["check", "-c", str(config)]) == EXIT_OK, capsys.readouterr()
    (source,) = load_config(config).sources
    assert isinstance(source, PromQLSourceConfig)
    assert (source.query_timeout, source.telemetry, source.queries[0].key_label) == (
        10.0, False, "instance")
    fast = source.model_copy(update={"interval": 2.0})
    assert fast.query_timeout == 2.0


BAD = """\
  - name: prom
    type: promql
    url: prometheus:9090
    queries:
      - {name: disk_low, expr: 'up == 0'}
      - {name: disk_low, expr: 'up == 1'}
  - name: blank
    type: promql
    url: http://prometheus:9090
    queries: [{name: empty, expr: '  '}, {name: "a/b", expr: up, key_label: "1x"}]
  - name: none
    type: promql
    url: http://prometheus:9090
    queries: []
  - name: slow
    type: promql
    url: http://prometheus:9090
    interval: 5s
    timeout: 30s
    queries: [{name: q, expr: up}]
"""


def test_check_names_each_bad_promql_setting_with_its_line(
    tmp_path: Path, packs_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A URL without a scheme, duplicate query names, an empty expression, a name that is
    not one topic level, a bad label name, no queries, a timeout past the interval: each
    is an error at its line, and ``loopd check`` exits 1."""
    config = write(tmp_path, packs_dir, BAD)
    assert main(["check", "-c", str(config)]) == EXIT_INVALID
    err = capsys.readouterr().err
    at = f"{config}:"
    for line, message in [
        (5, "sources[0].url: must be an http:// or https:// URL with a host"),
        (6, "sources[0].queries: duplicate query name(s): disk_low"),
        (12, "sources[1].queries[0].expr: must not be empty"),
        (12, "sources[1].queries[1].name: must be one topic level (letters, digits, _ . : -)"
             ", got 'a/b'"),
        (12, "sources[1].queries[1].key_label: must be a Prometheus label name, got '1x'"),
        (16, "sources[2].queries: must not be empty"),
        (17, "sources[3]: timeout 30s is longer than the interval 5s"),
    ]:
        assert any(row.startswith(f"{at}{line}: {message}") or f" {at}{line}: {message}"
                   in row for row in err.splitlines()), (line, message, err)


@pytest.mark.parametrize(("extra", "message"), [
    ("url: http://admin:hunter2@prometheus:9090", "must not carry credentials"),
    ("url: http://prometheus:9090?x=1", "must not have a query string or fragment"),
    ("url: http://prometheus:90x0", "is not a URL"),
    ("bearer_token_ref: hunter2", "must be a reference: env:VAR or file:/path"),
    ("username: ops", "basic auth needs both username and password_ref"),
])
def test_urls_and_credentials_are_refused_without_echoing_a_secret(
    tmp_path: Path, packs_dir: Path, extra: str, message: str,
) -> None:
    """A URL with a password, a query string or a bad port, a literal token and half of
    basic auth are refused; the message never shows the secret."""
    field = extra.partition(":")[0]
    source = GOOD if field != "url" else GOOD.replace("    url: http://prometheus:9090/prom\n",
                                                      "")
    config = write(tmp_path, packs_dir, source + f"    {extra}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_fingerprints_are_stable_and_distinct_per_source_query_and_labels() -> None:
    """Same source, query and labels (in any order): one fingerprint, in any process;
    another query or source with the same series: another one, so a series resolving in
    one query never cancels the runs of another."""
    labels = {"instance": "web-1", "job": "node"}
    assert fingerprint("prom", "q", labels) == fingerprint("prom", "q", dict(
        reversed(labels.items())))
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint("prom", "q", labels))
    assert len({fingerprint("prom", "q", labels), fingerprint("prom", "other", labels),
                fingerprint("prom2", "q", labels),
                fingerprint("prom", "q", {"instance": "web-2", "job": "node"})}) == 4


def test_rounds_start_at_multiples_of_the_interval() -> None:
    """Every replica evaluates round ``t`` at the same instant: the multiple of the
    interval the wall clock is in."""
    assert round_number(1000.7, 0.5) * 0.5 == 1000.5
    assert round_number(1029.9, 30.0) * 30.0 == 1020.0
    assert round_number(1020.0, 30.0) == round_number(1049.99, 30.0) == 34
