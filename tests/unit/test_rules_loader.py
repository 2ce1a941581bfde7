"""Rule files: every error names file:line, rule and field; one bad rule never stops the rest."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import structlog.testing

from loopd import yamlfile
from loopd.errors import RuleError
from loopd.rules.loader import RuleSet, load_rules
from tests.unit.conftest import RulesFrom

GOOD = """\
  - name: good-before
    on: {source: alertmanager, match: {status: firing}}
    run: {action: core.log, input: {message: "{{ event.labels.alertname }}"}}
"""
GOOD_AFTER = """\
  - name: good-after
    on: {source: webhook}
    run: {action: core.noop}
"""


def _line(text: str, needle: str, after: str = "") -> int:
    """1-based number of the first line containing ``needle`` at or after ``after``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    for number, line in enumerate(lines[start:], start + 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")


def _only_error(rules: RuleSet) -> RuleError:
    assert len(rules.errors) == 1, [str(e) for e in rules.errors]
    return rules.errors[0]


def _file(rules: RuleSet) -> Path:
    assert len(rules.files) == 1
    return rules.files[0]


def _with_good_neighbours(bad: str) -> str:
    return "rules:\n" + GOOD + textwrap.indent(textwrap.dedent(bad), "  ") + GOOD_AFTER


BAD_RULES = [
    pytest.param(
        """\
        - name: typo
          on: {source: webhook}
          colour: red
          run: {action: core.noop}
        """, "typo", "colour", "colour: red", "unknown field", id="unknown-key"),
    pytest.param(
        """\
        - name: nested-typo
          on: {source: webhook, mtach: {a: 1}}
          run: {action: core.noop}
        """, "nested-typo", "on.mtach", "mtach", "unknown field", id="unknown-nested-key"),
    pytest.param(
        """\
        - name: broken-if
          on: {source: webhook}
          if: "event.value >"
          run: {action: core.noop}
        """, "broken-if", "if", "if:", "invalid expression 'event.value >'",
        id="condition-syntax"),
    pytest.param(
        """\
        - name: private-key
          key: "{{ event.__class__ }}"
          run: {action: core.noop}
        """, "private-key", "key", "key:", "'__class__' is not allowed", id="unsafe-key"),
    pytest.param(
        """\
        - name: broken-input
          run:
            action: core.log
            input: {message: "{{ event.value > }}"}
        """, "broken-input", "run.input", "run:", "invalid", id="input-template"),
    pytest.param(
        """\
        - name: no-such-pack
          run: {action: nope.restart}
        """, "no-such-pack", "run.action", "run:", "unknown pack 'nope' in action 'nope.restart'",
        id="unknown-pack"),
    pytest.param(
        """\
        - name: no-such-action
          run: {action: core.reboot}
        """, "no-such-action", "run.action", "run:", "pack 'core' has no action 'reboot'",
        id="unknown-action"),
    pytest.param(
        """\
        - name: no-such-workflow
          run: {workflow: core.restart_and_verify}
        """, "no-such-workflow", "run.workflow", "run:",
        "pack 'core' has no workflow 'restart_and_verify'", id="unknown-workflow"),
    pytest.param(
        """\
        - name: two-targets
          run: {action: core.noop, workflow: core.other}
        """, "two-targets", "run", "run:", "exactly one of workflow or action",
        id="two-targets"),
    pytest.param(
        """\
        - name: half-throttle
          throttle: {max: 3}
          run: {action: core.noop}
        """, "half-throttle", "throttle", "throttle:", "max and per go together",
        id="throttle"),
    pytest.param(
        """\
        - name: vague-for
          for: soon
          run: {action: core.noop}
        """, "vague-for", "for", "for:", "bad duration 'soon'", id="duration"),
    pytest.param(
        """\
        - name: bad-topic
          on: {topic: "a/#/b"}
          run: {action: core.noop}
        """, "bad-topic", "on.topic", "on:", "'#' must be the last level", id="topic"),
    pytest.param(
        """\
        - name: empty-list
          on: {match: {status: []}}
          run: {action: core.noop}
        """, "empty-list", "on.match.status", "on:", "match list is empty", id="empty-match"),
    pytest.param(
        """\
        - name: object-match
          on: {match: {labels: {severity: critical}}}
          run: {action: core.noop}
        """, "object-match", "on.match", "on:", "labels: expected a scalar or a list",
        id="object-match"),
    pytest.param(
        """\
        - name: no-run
          on: {source: webhook}
        """, "no-run", "run", "name: no-run", "Field required", id="missing-run"),
]


@pytest.mark.parametrize("bad, rule, field, line_of, message", BAD_RULES)
def test_each_error_names_file_line_rule_and_field(
    rules_from: RulesFrom, bad: str, rule: str, field: str, line_of: str, message: str,
) -> None:
    """A bad rule is reported as ``file:line rule field: message``; its neighbours still load."""
    text = _with_good_neighbours(bad)
    rules = rules_from(text)
    error = _only_error(rules)
    where = f"{_file(rules)}:{_line(text, line_of, after=f'name: {rule}')}"
    assert (error.origin, error.rule, error.field) == (where, rule, field)
    assert message in error.message
    assert str(error).startswith(f"{where} {rule} {field}: ")
    assert [r.name for r in rules.rules] == ["good-before", "good-after"]


def test_duplicate_rule_name_points_at_both_definitions(rules_from: RulesFrom) -> None:
    """The second rule with a taken name is refused, naming where the first one is."""
    second = GOOD.replace("run: {action: core.log", "run: {action: core.noop")
    rules = rules_from("rules:\n" + GOOD + second)
    error = _only_error(rules)
    path = _file(rules)
    assert error.origin == f"{path}:5"
    assert (error.rule, error.field) == ("good-before", "name")
    assert f"first defined at {path}:2" in error.message
    assert [r.target for r in rules.rules] == ["core.log"]


def test_duplicate_names_across_files_are_caught(tmp_path: Path) -> None:
    """Rule names are unique across all rule files, not just within one."""
    (tmp_path / "a.yaml").write_text("rules:\n" + GOOD)
    (tmp_path / "b.yaml").write_text("rules:\n" + GOOD)
    rules = load_rules([tmp_path])
    error = _only_error(rules)
    assert error.origin == f"{tmp_path / 'b.yaml'}:2"
    assert "first defined at" in error.message and "a.yaml:2" in error.message


def test_invalid_yaml_is_reported_with_its_line_and_other_files_load(tmp_path: Path) -> None:
    """A file that is not YAML is one error with file:line; the other files still load."""
    (tmp_path / "a.yaml").write_text("rules:\n" + GOOD)
    (tmp_path / "b.yaml").write_text(
        "rules:\n  - name: broken\n    on: {source: webhook\n    run: {}\n")
    rules = load_rules([tmp_path])
    error = _only_error(rules)
    assert error.origin == f"{tmp_path / 'b.yaml'}:4"
    assert error.message.startswith("invalid YAML:")
    assert [r.name for r in rules.rules] == ["good-before"]


@pytest.mark.parametrize("text", ["- just: a list\n", "rules: {a: 1}\n", "42\n"])
def test_a_file_without_a_rules_list_is_reported(rules_from: RulesFrom, text: str) -> None:
    """A rule file must be a mapping holding a ``rules:`` list; anything else names the file."""
    rules = rules_from(text)
    error = _only_error(rules)
    assert error.origin == f"{_file(rules)}:1"
    assert "'rules:' list" in error.message
    assert rules.rules == []


def test_an_empty_file_is_no_error(rules_from: RulesFrom) -> None:
    """An empty rule file holds no rules and no errors (a placeholder is not a mistake)."""
    rules = rules_from("# nothing yet\n")
    assert (rules.rules, rules.errors) == ([], [])


def test_a_rule_that_is_not_a_mapping_is_reported(rules_from: RulesFrom) -> None:
    """A list item that is not a mapping is an error at its line; the other rules load."""
    text = "rules:\n" + GOOD + "  - restart everything\n" + GOOD_AFTER
    rules = rules_from(text)
    error = _only_error(rules)
    assert error.origin == f"{_file(rules)}:{_line(text, 'restart everything')}"
    assert error.message == "a rule must be a mapping"
    assert [r.name for r in rules.rules] == ["good-before", "good-after"]


def test_unknown_top_level_field_is_reported_but_rules_load(rules_from: RulesFrom) -> None:
    """An unknown field beside ``rules:`` is an error; the rules in the file still load."""
    rules = rules_from("version: 2\nrules:\n" + GOOD)
    error = _only_error(rules)
    assert "unknown top-level field(s): version" in error.message
    assert [r.name for r in rules.rules] == ["good-before"]


def test_on_is_a_string_key_not_a_yaml11_boolean(rules_from: RulesFrom) -> None:
    """``on:`` (and ``yes``/``off`` keys) stay strings: loopd reads YAML 1.2 booleans."""
    assert yamlfile.load("on: 1\nyes: 2\noff: 3\ntrue: 4\n") == {
        "on": 1, "yes": 2, "off": 3, True: 4}
    rules = rules_from(
        "rules:\n  - name: on-key\n    on: {source: webhook, match: {state: on}}\n"
        "    run: {action: core.noop}\n")
    assert rules.errors == []
    (rule,) = rules.rules
    assert rule.source == "webhook"
    assert rule.rule.on.match == {"state": "on"}


def test_several_errors_in_one_rule_are_all_reported(rules_from: RulesFrom) -> None:
    """Every invalid field of a rule is its own error, each with its own line."""
    text = ("rules:\n  - name: many\n    colour: red\n    for: soon\n"
            "    run: {action: core.noop}\n")
    rules = rules_from(text)
    fields = sorted((e.field, e.origin) for e in rules.errors)
    path = _file(rules)
    assert fields == [("colour", f"{path}:3"), ("for", f"{path}:4")]


def test_an_unreadable_path_is_reported(tmp_path: Path) -> None:
    """A configured rule file that does not exist is an error naming the path."""
    missing = tmp_path / "missing.yaml"
    rules = load_rules([missing])
    error = _only_error(rules)
    assert error.origin == str(missing)
    assert error.message.startswith("cannot read")


def test_rule_folders_are_searched_recursively_in_order(tmp_path: Path) -> None:
    """Every .yaml/.yml file under a rules folder loads, sorted; other files are ignored."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.yml").write_text("rules:\n" + GOOD_AFTER)
    (tmp_path / "a.yaml").write_text("rules:\n" + GOOD)
    (tmp_path / "README.md").write_text("not rules")
    rules = load_rules([tmp_path])
    assert rules.errors == []
    assert [r.name for r in rules.rules] == ["good-before", "good-after"]
    assert [p.name for p in rules.files] == ["a.yaml", "two.yml"]


def test_durations_and_throttles_are_parsed(rules_from: RulesFrom) -> None:
    """``for``, ``once_within`` and ``per`` accept human durations and become seconds."""
    rules = rules_from(
        "rules:\n  - name: timed\n    for: 1m30s\n"
        "    throttle: {once_within: 10m, max: 3, per: 1h}\n    run: {action: core.noop}\n")
    (rule,) = rules.rules
    assert rule.for_s == 90.0
    assert rule.throttle is not None
    assert (rule.throttle.once_within, rule.throttle.max, rule.throttle.per) == (600.0, 3, 3600)


def test_shipped_example_rules_load_cleanly(registry: object) -> None:
    """The example rules in ``rules/`` load without a single error."""
    from tests.unit.conftest import REPO

    rules = load_rules([REPO / "rules"])
    assert rules.errors == []
    assert len(rules.rules) >= 2


# -- event data never reaches a shell verbatim (loopd/packs/taint.py) --------------------

SHELL_PACK = """\
name: sh
actions:
  run:
    runner: ssh
    input:
      host: {required: true}
      argv: {type: array}
      command: {type: string}
      unit: {type: string, pattern: "[a-z][a-z0-9-]*"}
      token: {type: string, secret: true}
    one_of: [argv, command]
    command: "{{ input.argv if input.argv else raw.command }} {{ input.unit }}"
"""


def _shell_rules(tmp_path: Path, packs_dir: Path, text: str) -> RuleSet:
    from loopd.packs.registry import PackRegistry

    (packs_dir / "sh").mkdir()
    (packs_dir / "sh" / "pack.yaml").write_text(SHELL_PACK)
    registry = PackRegistry.load([packs_dir])
    assert registry.errors == []
    folder = tmp_path / "shell-rules"
    folder.mkdir()
    (folder / "rules.yaml").write_text(textwrap.dedent(text))
    return load_rules([folder], registry.check_target, check_input=registry.check_input)


@pytest.mark.parametrize("template", [
    "journalctl -u {{ event.labels.service }}", "{{ vars.cmd }}", "restart {{ key }}",
    "{% for w in event.words %}{{ w }} {% endfor %}", "{{ telemetry.x }} {{ now }}",
])
def test_a_raw_command_from_event_data_is_refused_naming_line_rule_and_input(
        tmp_path: Path, packs_dir: Path, template: str) -> None:
    """A rule giving a raw (verbatim) command input a template that reads event-derived
    data is refused with file:line, the rule, the input and what to do instead."""
    rules = _shell_rules(tmp_path, packs_dir, f"""\
        rules:
          - name: tail
            on: {{source: webhook, topic: "cmd/{{cmd}}"}}
            run:
              action: sh.run
              input: {{host: web-1, command: {template!r}}}
        """)
    error = _only_error(rules)
    assert (error.origin, error.rule, error.field) == (
        f"{tmp_path / 'shell-rules' / 'rules.yaml'}:4", "tail", "run.input")
    assert error.message.startswith("sh.run passes input 'command' to the shell verbatim "
                                    "(raw.command) and this template reads ")
    assert "argv: [prog" in error.message and "unsafe_shell: [command]" in error.message
    assert rules.rules == []


@pytest.mark.parametrize("command", [
    "journalctl -u nginx -n 20", "systemctl restart {{ entity.unit }}",
    "{{ inventory.web.cmd }} {{ 'x' if entity.sudo else '' }}",
])
def test_a_raw_command_of_literals_and_operator_data_loads(
        tmp_path: Path, packs_dir: Path, command: str) -> None:
    """Literals, inventory and entity are operator data: a raw command built from them loads."""
    rules = _shell_rules(tmp_path, packs_dir, f"""\
        rules:
          - name: tail
            run: {{action: sh.run, input: {{host: web-1, command: {command!r}}}}}
        """)
    assert rules.errors == []


def test_argv_from_event_data_loads_and_quoted_inputs_are_not_checked(
        tmp_path: Path, packs_dir: Path) -> None:
    """argv elements and quoted inputs may read event data: each is one quoted word."""
    rules = _shell_rules(tmp_path, packs_dir, """\
        rules:
          - name: tail
            run:
              action: sh.run
              input: {host: "{{ event.host }}", argv: [journalctl, -u, "{{ event.s }}"],
                      unit: "{{ event.unit }}"}
        """)
    assert rules.errors == []


def test_unsafe_shell_accepts_the_risk_visibly_with_a_warning_at_every_load(
        tmp_path: Path, packs_dir: Path) -> None:
    """A rule listing the input in unsafe_shell loads, and each load logs a warning naming it."""
    text = """\
        rules:
          - name: trusted-sender
            unsafe_shell: [command]
            run: {action: sh.run, input: {host: web-1, command: "{{ event.cmd }}"}}
        """
    with structlog.testing.capture_logs() as logs:
        rules = _shell_rules(tmp_path, packs_dir, text)
    assert rules.errors == [] and [r.name for r in rules.rules] == ["trusted-sender"]
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert warning["rule"] == "trusted-sender" and warning["inputs"] == ["command"]
    assert warning["origin"] == f"{tmp_path / 'shell-rules' / 'rules.yaml'}:3"
    assert "unsafe_shell" in warning["event"]


def test_unsafe_shell_naming_a_quoted_input_or_none_is_an_error(
        tmp_path: Path, packs_dir: Path) -> None:
    """unsafe_shell listing an input the action quotes, or one not given, is refused."""
    rules = _shell_rules(tmp_path, packs_dir, """\
        rules:
          - name: confused
            unsafe_shell: [unit, argv]
            run: {action: sh.run, input: {host: web-1, command: ls, unit: "{{ event.u }}"}}
        """)
    assert sorted(e.message for e in rules.errors) == [
        "unsafe_shell lists 'argv', which is not given to sh.run",
        "unsafe_shell lists 'unit', but sh.run quotes that input (it is never passed to the "
        "shell verbatim): remove it"]


def test_a_constant_input_that_fails_its_pattern_or_one_of_is_reported(
        tmp_path: Path, packs_dir: Path) -> None:
    """A constant input not matching its declared pattern, and both of a one_of, are errors."""
    rules = _shell_rules(tmp_path, packs_dir, """\
        rules:
          - name: bad-unit
            run: {action: sh.run, input: {host: web-1, argv: [ls], command: ls, unit: --help}}
        """)
    assert sorted(e.message for e in rules.errors) == [
        "sh.run input unit: '--help' does not match its pattern [a-z][a-z0-9-]*",
        "sh.run takes exactly one of argv, command (got argv, command)"]


@pytest.mark.parametrize(("token", "problem"), [
    ("PLAIN-SECRET-VALUE-1", "is secret: not a reference (use env:VAR, file:/path, dir:KEY "
                             "or exec:COMMAND); the value is not shown"),
    ("vault:PLAIN-SECRET-VALUE-1", "is secret: not a reference"),
    ("{{ event.labels.token }}", "is secret and takes a reference, but this template reads "
                                 "event: a reference must come from a literal, inventory, "
                                 "entity or config, never from event data"),
])
def test_a_secret_input_takes_a_reference_from_operator_data_only(
        tmp_path: Path, packs_dir: Path, token: str, problem: str) -> None:
    """A ``secret: true`` input given a value (which the store would keep) or a reference
    built from event data (which could read any file or run any helper) is refused at
    load, and the error never shows the value."""
    rules = _shell_rules(tmp_path, packs_dir, f"""\
        rules:
          - name: tok
            run: {{action: sh.run, input: {{host: web-1, argv: [id], token: {token!r}}}}}
        """)
    error = _only_error(rules)
    assert f"sh.run input 'token' {problem}" in error.message
    assert "PLAIN-SECRET-VALUE-1" not in str(error)


def test_a_secret_input_given_a_reference_loads(tmp_path: Path, packs_dir: Path) -> None:
    """A literal reference, or one from config or inventory, is what a secret input takes."""
    rules = _shell_rules(tmp_path, packs_dir, """\
        rules:
          - name: a
            run: {action: sh.run, input: {host: web-1, argv: [id], token: "env:TOKEN"}}
          - name: b
            run: {action: sh.run, input: {host: web-1, argv: [id],
                                          token: "{{ inventory.web.token_ref }}"}}
        """)
    assert rules.errors == []


def test_argv_may_not_let_event_data_choose_the_program(tmp_path: Path, packs_dir: Path
                                                        ) -> None:
    """argv[0] names the program that runs: a template reading event data there is refused
    (each later element may: it is one quoted argument)."""
    rules = _shell_rules(tmp_path, packs_dir, """\
        rules:
          - name: prog
            run: {action: sh.run, input: {host: web-1, argv: ["{{ event.prog }}", "-x"]}}
        """)
    error = _only_error(rules)
    assert error.message == (
        "sh.run runs the program argv[0] names, and this template reads event: event data "
        "could choose which program runs; name the program literally (or from inventory or "
        "config)")


@pytest.mark.parametrize("given", [
    'command: "{% set event = event %}journalctl -u {{ event.labels.service }}"',
    'command: "{% for event in [event] %}tail {{ event.labels.service }}{% endfor %}"',
    'command: "{% macro m(event) %}{% endmacro %}tail {{ event.labels.service }}"',
    'argv: "{{ event.labels.cmd.split() }}"',
    'argv: "{{ event.args }}"',
    'argv: ["{% set event = event %}{{ event.labels.prog }}", "x"]',
    'argv: [sh, -c, "{{ event.labels.cmd }}"]',
    'argv: [/usr/bin/sudo, "{{ event.labels.prog }}"]',
    'token: "{% set event = event %}{{ event.labels.ref }}"',
], ids=["set", "for", "macro", "argv-split", "argv-native", "argv0-set", "sh-c", "sudo",
        "secret-set"])
def test_rebinding_a_scope_name_or_a_whole_argv_does_not_hide_event_data(
        tmp_path: Path, packs_dir: Path, given: str) -> None:
    """A template that rebinds ``event`` before reading it, an argv built whole by one
    template, and event data handed to a program that runs its arguments (``sh -c``,
    ``sudo``) are all refused: each would let the event choose what runs."""
    argv = "" if given.startswith("argv") else "argv: [id], " if given.startswith("token") \
        else ""
    rules = _shell_rules(tmp_path, packs_dir, f"""\
        rules:
          - name: sneaky
            run: {{action: sh.run, input: {{host: web-1, {argv}{given}}}}}
        """)
    assert rules.rules == [], "loaded"
    assert "event" in _only_error(rules).message


def test_a_wrapper_program_with_event_arguments_loads_with_unsafe_shell(
        tmp_path: Path, packs_dir: Path) -> None:
    """``unsafe_shell: [argv]`` accepts event data as an argument of ``sh -c`` explicitly."""
    rules = _shell_rules(tmp_path, packs_dir, """\
        rules:
          - name: risky
            unsafe_shell: [argv]
            run: {action: sh.run, input: {host: web-1, argv: [sh, -c, "{{ event.cmd }}"]}}
        """)
    assert rules.errors == [] and len(rules.rules) == 1
