"""The ``loopd`` command: ``check`` prints every problem with its place, ``version``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loopd import __version__
from loopd.cli import EXIT_INVALID, EXIT_OK, main
from tests.unit.conftest import REPO

GOOD_RULES = """\
rules:
  - name: log-firing
    on: {source: alertmanager, match: {status: firing}}
    run: {action: core.log, input: {message: "{{ event.labels.alertname }}"}}
"""

BAD_RULES = """\
rules:
  - name: typo
    on: {source: webhook}
    colour: red
    run: {action: core.noop}
  - name: ghost-action
    run: {action: core.reboot}
  - name: broken-if
    if: "event.value >"
    run: {action: core.noop}
"""


def _config(tmp_path: Path, packs_dir: Path, *, bad: bool) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "good.yaml").write_text(GOOD_RULES)
    if bad:
        (rules / "bad.yaml").write_text(BAD_RULES)
    config = tmp_path / "loopd.yaml"
    config.write_text(f"""\
listen: 127.0.0.1:0
sources: [{{name: alertmanager, type: alertmanager}}, {{name: webhook, type: webhook}}]
rules: [rules]
packs: [{packs_dir}]
store: {{path: var/loopd.db}}
""")
    return config


def test_check_prints_each_error_with_file_line_rule_and_field(
    tmp_path: Path, packs_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """``loopd check`` prints ``file:line rule field: message`` per error and exits 1."""
    config = _config(tmp_path, packs_dir, bad=True)
    assert main(["check", "-c", str(config)]) == EXIT_INVALID
    out = capsys.readouterr().out.splitlines()
    bad = tmp_path / "rules" / "bad.yaml"
    errors = [line for line in out if line.startswith("error: ")]
    assert errors == [
        f"error: {bad}:4 typo colour: unknown field",
        f"error: {bad}:7 ghost-action run.action: pack 'core' has no action 'reboot'",
        f"error: {bad}:9 broken-if if: invalid expression 'event.value >': "
        "unexpected 'end of template'",
    ]
    assert out[-1].endswith("1 rules in 2 files: 3 error(s)")


def test_check_passes_a_valid_configuration(
    tmp_path: Path, packs_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """``loopd check`` on a valid configuration prints a summary ending in OK and exits 0."""
    config = _config(tmp_path, packs_dir, bad=False)
    assert main(["check", "-c", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "error:" not in out
    assert out.strip().endswith(
        "2 sources, 1 packs (5 actions, 0 workflows), 1 rules in 1 files: OK")


def test_check_passes_the_shipped_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped config/loopd.yaml with its rules and packs passes ``loopd check``."""
    assert main(["check", "-c", str(REPO / "config" / "loopd.yaml")]) == EXIT_OK, \
        capsys.readouterr().out
    assert capsys.readouterr().out.strip().endswith(": OK")


def test_check_reports_an_invalid_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A config that does not validate makes ``check`` exit 1 with the file and the field."""
    config = tmp_path / "loopd.yaml"
    config.write_text("listen: 127.0.0.1:8080\nsources: [{name: k, type: kafka}]\n")
    assert main(["check", "-c", str(config)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert f"{config}:2: sources[0].topics: is required" in err


def test_check_reports_a_broken_pack_and_inventory(
    tmp_path: Path, packs_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Pack and inventory problems are listed by ``check`` like rule problems."""
    (packs_dir / "broken").mkdir()
    (packs_dir / "broken" / "pack.yaml").write_text("name: broken\ncolour: red\n")
    config = _config(tmp_path, packs_dir, bad=False)
    (tmp_path / "inventory.yaml").write_text(
        "entities:\n  web-1: {credentials: nobody}\n")
    config.write_text(config.read_text() + "inventory: inventory.yaml\n")
    assert main(["check", "-c", str(config)]) == EXIT_INVALID
    out = capsys.readouterr().out
    assert f"error: {packs_dir / 'broken' / 'pack.yaml'}: colour: unknown field" in out
    assert "entities.web-1.credentials: unknown credentials 'nobody'" in out


def test_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``loopd version`` prints ``loopd <version>`` and exits 0."""
    assert main(["version"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"loopd {__version__}"


def test_unknown_commands_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown subcommand exits with argparse's usage error code 2."""
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_check_reports_event_data_in_a_raw_command_and_a_constant_failing_its_pattern(
    tmp_path: Path, packs_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """``loopd check`` refuses a rule whose raw command reads event data and a constant
    input that fails its pattern (--help as a service), each with file:line and rule."""
    shutil.copytree(REPO / "packs" / "linux", packs_dir / "linux")
    config = _config(tmp_path, packs_dir, bad=False)
    shell = tmp_path / "rules" / "shell.yaml"
    shell.write_text("""\
rules:
  - name: tail-journal
    on: {source: alertmanager}
    run:
      action: linux.run_command
      input: {host: web-1, command: "journalctl -u {{ event.labels.service }} -n 20"}
  - name: help-me
    run: {action: linux.restart_service, input: {host: web-1, service: --help}}
  - name: tail-argv
    on: {source: alertmanager}
    run:
      action: linux.run_command
      input: {host: web-1, argv: [journalctl, -u, "{{ event.labels.service }}", -n, "20"]}
""")
    assert main(["check", "-c", str(config)]) == EXIT_INVALID
    errors = [line for line in capsys.readouterr().out.splitlines()
              if line.startswith("error: ")]
    assert len(errors) == 2, errors
    assert errors[0].startswith(
        f"error: {shell}:4 tail-journal run.input: linux.run_command passes input 'command' "
        "to the shell verbatim (raw.command) and this template reads event: event data "
        "could run commands; give the command as an argument list instead (argv: [")
    assert errors[1].startswith(
        f"error: {shell}:8 help-me run.input: linux.restart_service input service: "
        "'--help' does not match its pattern ")


COMMANDS = ("run", "check", "demo", "simulate", "runs", "show", "decisions", "approve",
            "reject", "version")


def help_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_the_help_lists_every_command_on_one_line_without_markup(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``loopd --help`` lists each command with a one-line description, no RST markup
    from a docstring, and the exit codes."""
    text = help_of(capsys)
    assert "``" not in text
    listed = {line.split()[0]: line for line in text.splitlines()
              if line.startswith("    ") and line.split()[0] in COMMANDS}
    assert set(listed) == set(COMMANDS)
    assert all(len(line.split()) > 1 for line in listed.values())  # its description, same line
    assert "Exit codes: 0 success" in " ".join(text.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_each_commands_help_shows_its_options_and_their_defaults(
    command: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """``loopd COMMAND --help`` works for every command, without markup, and shows the
    defaults of the options that have one."""
    text = " ".join(help_of(capsys, command).split())
    assert "``" not in text and f"usage: loopd {command}" in text
    defaults = {"run": "(default: config/loopd.yaml)", "check": "(default: config/loopd.yaml)",
                "demo": "(default: config/demo.yaml)", "simulate": "(default: telemetry)",
                "runs": "(default: http://127.0.0.1:8080)", "show": "(default: http://",
                "decisions": "(default: 50)", "approve": "LOOPD_TOKEN",
                "reject": "--reason", "version": "--version"}
    assert defaults[command] in text


def test_version_is_also_an_option(capsys: pytest.CaptureFixture[str]) -> None:
    """``loopd --version`` prints what ``loopd version`` prints."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"loopd {__version__}"


def test_check_warns_of_a_confirm_query_with_no_prometheus_to_ask(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A workflow a rule runs whose confirm has a PromQL query, in a config without a
    ``prometheus:`` section: ``loopd check`` warns (file:line, workflow, task) and still
    passes; with ``prometheus:`` there is no warning, nor for workflows no rule runs."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text("""\
rules:
  - name: nginx-down
    on: {source: alertmanager, match: {status: firing}}
    key: "{{ event.labels.instance }}"
    run: {workflow: linux.restart_and_verify,
          input: {host: "{{ key }}", service: nginx}}
""")
    base = f"""\
listen: 127.0.0.1:0
sources: [{{name: alertmanager, type: alertmanager}}]
rules: [rules]
packs: [{REPO / "packs"}]
store: {{path: var/loopd.db}}
"""
    config = tmp_path / "loopd.yaml"
    config.write_text(base)
    assert main(["check", "-c", str(config)]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    workflow = REPO / "packs" / "linux" / "workflows" / "restart_and_verify.yaml"
    assert [line for line in out if line.startswith("warning: ")] == [
        f"warning: {workflow}:{line}: workflow linux.restart_and_verify task {task}: "
        "confirm query is never polled: loopd.yaml has no prometheus: section"
        for line, task in ((18, "verify"), (36, "reverify"))]
    assert out[-1].endswith(": OK")
    config.write_text(base + "prometheus: {url: 'http://127.0.0.1:9090'}\n")
    assert main(["check", "-c", str(config)]) == EXIT_OK
    assert "warning:" not in capsys.readouterr().out
