"""``loopd check`` catches what would otherwise fail (or never match) only at run time.

Each probe is a configuration mistake that used to pass ``loopd check`` with exit 0;
now it is an ``error: file:line rule field: message`` line and exit 1.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from loopd.cli import EXIT_INVALID, EXIT_OK, main
from loopd.packs.registry import PackRegistry
from loopd.rules.loader import load_rules
from tests.unit.conftest import REPO

PACK = """\
name: p
config:
  region: {type: string, default: eu}
actions:
  restart:
    runner: ssh
    input:
      host: {type: string, required: true}
      service: {type: string, required: true}
    command: "systemctl restart {{ input.service }} --region {{ config.region }}"
  ping:
    runner: http
    url: "http://{{ input.host }}/health"
"""
FIX = """\
input: [host]
tasks:
  restart: {action: p.restart, input: {host: "{{ ctx.host }}", service: nginx}}
"""
CONFIG = """\
listen: 127.0.0.1:0
sources: [{name: webhook, type: webhook}, {name: alertmanager, type: alertmanager}]
rules: [rules]
packs: [packs]
inventory: inventory.yaml
"""
INVENTORY = "entities:\n  web-1: {address: 127.0.0.1, port: 2222}\n"

Check = Callable[..., tuple[int, list[str]]]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A valid configuration: the core pack, pack ``p`` with workflow ``p.fix``, no rules."""
    shutil.copytree(REPO / "packs" / "core", tmp_path / "packs" / "core")
    (tmp_path / "packs" / "p" / "workflows").mkdir(parents=True)
    (tmp_path / "packs" / "p" / "pack.yaml").write_text(PACK)
    (tmp_path / "packs" / "p" / "workflows" / "fix.yaml").write_text(FIX)
    (tmp_path / "rules").mkdir()
    (tmp_path / "loopd.yaml").write_text(CONFIG)
    (tmp_path / "inventory.yaml").write_text(INVENTORY)
    return tmp_path


@pytest.fixture
def check(site: Path, capsys: pytest.CaptureFixture[str]) -> Check:
    """Write the given files (relative to the site) and run ``loopd check`` in-process:
    (exit code, the ``error:`` lines with the site's path replaced by ``SITE``)."""

    def run(**files: str) -> tuple[int, list[str]]:
        for name, text in files.items():
            path = site / name.replace("__", "/").replace("_yaml", ".yaml")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        code = main(["check", "-c", str(site / "loopd.yaml")])
        out = capsys.readouterr().out.replace(str(site), "SITE").splitlines()
        return code, [line for line in out if line.startswith("error: ")]

    return run


def rules(body: str) -> str:
    return "rules:\n" + textwrap.indent(textwrap.dedent(body), "  ")


def test_the_site_without_mistakes_passes(check: Check) -> None:
    """The probes' base configuration, with a rule using every checked part well, exits 0."""
    code, errors = check(rules__r_yaml=rules("""\
        - name: fine
          on: {source: webhook, topic: "telemetry/{host}/cpu"}
          if: "event.value > 90 and vars.host.startswith('web')"
          key: "{{ vars.host }}"
          guards: {escalate: {action: core.log, input: {message: "{{ rule }}: {{ reason }}"}}}
          run: {workflow: p.fix, input: {host: "{{ vars['host'] }}"}}
        - name: outcomes
          on: {source: loopd}
          run: {action: core.log, input: {message: "{{ event.status | upper }}", level: info}}
    """))
    assert (code, errors) == (EXIT_OK, [])


PROBES = {
    "action input the action does not take": ("""\
        - name: r
          on: {source: webhook}
          run: {action: core.log, input: {levl: info, message: x}}
        """, ["3 r run.input: core.log takes no input levl (it takes level, message)"]),
    "missing required action input": ("""\
        - name: r
          run: {action: core.log, input: {level: info}}
        """, ["2 r run.input: core.log needs message"]),
    "constant action input of the wrong type": ("""\
        - name: r
          run: {action: p.restart, input: {host: web-1, service: 3}}
        """, ["2 r run.input: p.restart input service: expected string, got int"]),
    "workflow input the workflow does not declare": ("""\
        - name: r
          run: {workflow: p.fix, input: {hots: web-1}}
        """, ["2 r run.input: p.fix takes no input hots (it takes host)",
              "2 r run.input: p.fix needs host"]),
    "unknown on.source": ("""\
        - name: r
          on: {source: kafak}
          run: {action: core.noop}
        """, ["2 r on.source: unknown source 'kafak' (configured: alertmanager, loopd, "
              "webhook)"]),
    "undefined name in if (fast path)": ("""\
        - name: r
          if: "evnt.value > 90"
          run: {action: core.noop}
        """, ["2 r if: undefined name 'evnt' (known names: entity, event, inventory, key, now, "
              "telemetry, vars)"]),
    "undefined name in if (Jinja path)": ("""\
        - name: r
          if: "{{ evnt.value | int > 90 }}"
          run: {action: core.noop}
        """, ["2 r if: undefined name 'evnt' (known names: entity, event, inventory, key, now, "
              "telemetry, vars)"]),
    "undefined name in an input template": ("""\
        - name: r
          run: {action: core.log, input: {message: "{% for x in evnts %}{{ x }}{% endfor %}"}}
        """, ["2 r run.input.message: undefined name 'evnts' (known names: entity, event, "
              "inventory, key, now, telemetry, vars)"]),
    "vars member the topic does not capture": ("""\
        - name: r
          on: {source: webhook, topic: "telemetry/{host}/cpu"}
          key: "{{ vars.hots }}"
          run: {action: core.noop}
        """, ["3 r key: vars.hots: no such topic capture (known: host)"]),
    "vars without a topic pattern": ("""\
        - name: r
          if: "vars.get('host') == 'web-1'"
          run: {action: core.noop}
        """, ["2 r if: vars.host: the rule has no on.topic, so vars holds no topic captures"]),
    "unknown escalation target": ("""\
        - name: r
          guards: {escalate: {action: nope.nothing}}
          run: {action: core.noop}
        """, ["2 r guards.escalate.action: unknown pack 'nope' in action 'nope.nothing' "
              "(packs: core, p)"]),
    "broken escalation input": ("""\
        - name: r
          guards: {escalate: {action: core.log, input: {message: "{{ event.x }} {{ reason"}}}
          run: {action: core.noop}
        """, ["2 r guards.escalate.input: invalid template '{{ event.x }} {{ reason': "
              "unexpected end of template, expected 'end of print statement'."]),
    "escalation input reading what its scope lacks": ("""\
        - name: r
          guards: {escalate: {action: core.log, input: {message: "{{ event.x }}"}}}
          run: {action: core.noop}
        """, ["2 r guards.escalate.input.message: undefined name 'event' (known names: entity, "
              "key, now, reason, rule)"]),
    "every problem of one rule": ("""\
        - name: r
          on: {source: kafak}
          if: "event.value >"
          run: {action: core.reboot}
        """, ["2 r on.source: unknown source 'kafak' (configured: alertmanager, loopd, "
              "webhook)",
              "3 r if: invalid expression 'event.value >': unexpected 'end of template'",
              "4 r run.action: pack 'core' has no action 'reboot'"]),
}


@pytest.mark.parametrize("case", list(PROBES), ids=list(PROBES))
def test_rule_probes_fail_check_with_file_line_rule_and_field(check: Check, case: str) -> None:
    """Each rule mistake is reported as ``file:line rule field: message``; check exits 1."""
    body, expected = PROBES[case]
    code, errors = check(rules__r_yaml=rules(body))
    assert code == EXIT_INVALID
    # the expected lines count from the probe's first line; "rules:" comes before it
    assert errors == [f"error: SITE/rules/r.yaml:{int(line.split()[0]) + 1} "
                      f"{line.partition(' ')[2]}" for line in expected]


def test_global_escalation_target_is_checked(check: Check, site: Path) -> None:
    """An unknown ``guards.escalate`` target in loopd.yaml is an error naming its line."""
    code, errors = check(loopd_yaml=CONFIG + "guards:\n  escalate: {workflow: p.nofix}\n")
    assert code == EXIT_INVALID
    assert errors == [
        "error: SITE/loopd.yaml:6 guards.escalate.workflow: pack 'p' has no workflow 'nofix'"]


@pytest.mark.parametrize(("field", "template", "message"), [
    ("command", "restart {{ input.service }} {{ config.regoin }}",
     "actions.restart.command: config.regoin: no such config field (known: region)"),
    ("command", "restart {{ input.service ", "actions.restart.command: invalid template "),
    ("url", "http://{{ input.host }}/{{ ctx.path }}",
     "actions.ping.url: undefined name 'ctx' (known names: config, input)"),
])
def test_runner_templates_are_checked(check: Check, field: str, template: str, message: str
                                      ) -> None:
    """A broken runner template, or one reading what its runner never gives it (``ctx`` in
    an http url, an undeclared ``config`` field), is an error naming pack.yaml:line."""
    old = {"command": "systemctl restart {{ input.service }} --region {{ config.region }}",
           "url": "http://{{ input.host }}/health"}[field]
    code, errors = check(packs__p__pack_yaml=PACK.replace(old, template))
    action_line = 5 if field == "command" else 11
    assert code == EXIT_INVALID
    assert len(errors) == 1
    assert errors[0].startswith(f"error: SITE/packs/p/pack.yaml:{action_line}: {message}")


def test_sub_workflow_with_items_is_refused(check: Check) -> None:
    """``with_items`` on a sub-workflow task, once silently ignored, is a load error."""
    code, errors = check(packs__p__workflows__fan_yaml="""\
        tasks:
          each: {workflow: p.fix, with_items: "{{ ctx.hosts }}", input: {host: "{{ item }}"}}
        """)
    assert code == EXIT_INVALID
    assert errors == [
        "error: SITE/packs/p/workflows/fan.yaml:2: tasks.each: with_items needs an action: a "
        "sub-workflow task cannot fan out (start one run per item from a rule, or fan out "
        "its action)"]


@pytest.mark.parametrize(("task", "message"), [
    ('{workflow: p.fix, input: {hots: "{{ ctx.host }}"}}',
     "task go input: p.fix takes no input hots (it takes host)"),
    ('{action: core.log, input: {levl: info, message: x}}',
     "task go input: core.log takes no input levl (it takes level, message)"),
    ('{action: core.log, input: {message: "{{ ctxx.host }}"}}',
     "task go input.message: undefined name 'ctxx'"),
])
def test_workflow_task_inputs_are_checked(check: Check, task: str, message: str) -> None:
    """A workflow task's input is checked against the action's input model or the
    sub-workflow's declared input, and its templates against the workflow scope."""
    code, errors = check(packs__p__workflows__go_yaml=f"tasks:\n  go: {task}\n")
    assert code == EXIT_INVALID
    assert len(errors) == 1
    assert errors[0].startswith(f"error: SITE/packs/p/workflows/go.yaml:2: {message}")


@pytest.mark.parametrize(("entity", "message"), [
    ("{host_key: ignore}", "host_key: not an OpenSSH public key line (Invalid public key) "
                           "(to turn host key checking off, set known_hosts: ignore)"),
    ("{known_hosts: /nonexistent/known_hosts}",
     "known_hosts: file /nonexistent/known_hosts does not exist (a known_hosts file path, "
     "or 'ignore')"),
    ("{port: 99999}", "port: expected a port number 1-65535, got 99999"),
    ("{credentials: nobody}", "credentials: unknown credentials 'nobody' (known: none)"),
])
def test_inventory_entity_settings_are_checked(check: Check, entity: str, message: str) -> None:
    """An entity setting the ssh runner would refuse at run time is an error at its line."""
    code, errors = check(inventory_yaml=INVENTORY + f"  web-2: {entity}\n")
    assert code == EXIT_INVALID
    assert errors == [f"error: SITE/inventory.yaml:3: entities.web-2.{message}"]


def test_inventory_known_hosts_ignore_passes(check: Check) -> None:
    """``known_hosts: ignore``, the documented way to turn checking off, passes."""
    assert check(inventory_yaml=INVENTORY + "  web-2: {known_hosts: ignore}\n") == (EXIT_OK, [])


def test_check_through_the_real_cli(site: Path) -> None:
    """``loopd check`` as a process prints the error line for a wrong action input and
    exits 1."""
    (site / "rules" / "r.yaml").write_text(rules("""\
        - name: chatty
          on: {source: webhook}
          run: {action: core.log, input: {levl: info, message: x}}
    """))
    done = subprocess.run([sys.executable, "-m", "loopd.cli", "check", "-c",
                           str(site / "loopd.yaml")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == EXIT_INVALID, done.stderr
    assert done.stdout.splitlines()[0] == (
        f"error: {site}/rules/r.yaml:4 chatty run.input: core.log takes no input levl "
        "(it takes level, message)")
    assert done.stdout.splitlines()[-1].endswith("0 rules in 1 files: 1 error(s)")


def test_a_file_that_does_not_parse_keeps_its_previous_rules(tmp_path: Path,
                                                            registry: PackRegistry) -> None:
    """With ``previous``, a rule file that no longer parses keeps the rules loaded from it
    (listed in ``kept``), while a parseable file's bad rule is reported and skipped."""
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "a.yaml").write_text(rules("- {name: a1, run: {action: core.noop}}\n"
                                         "- {name: a2, run: {action: core.noop}}\n"))
    (folder / "b.yaml").write_text(rules("- {name: b1, run: {action: core.noop}}\n"))
    first = load_rules([folder], registry.check_target)
    assert [r.name for r in first.rules] == ["a1", "a2", "b1"] and first.errors == []

    (folder / "a.yaml").write_text("rules:\n  - {name: a1, run: {action: core.noop}\n")
    (folder / "b.yaml").write_text(rules("- {name: b1, run: {action: core.reboot}}\n"))
    second = load_rules([folder], registry.check_target, previous=first)
    assert [r.name for r in second.rules] == ["a1", "a2"]
    assert second.rules[0] is first.rules[0]
    assert second.kept == [folder / "a.yaml"]
    yaml_error, rule_error = (str(e) for e in second.errors)
    assert yaml_error.startswith(f"{folder / 'a.yaml'}:3: invalid YAML: ")
    assert rule_error == f"{folder / 'b.yaml'}:2 b1 run.action: pack 'core' has no action 'reboot'"

    # still broken at the next reload: the same rules stay; without previous, none do
    third = load_rules([folder], registry.check_target, previous=second)
    assert [r.name for r in third.rules] == ["a1", "a2"] and third.kept == [folder / "a.yaml"]
    assert [r.name for r in load_rules([folder], registry.check_target).rules] == []


def test_a_scalar_its_tag_cannot_read_is_reported_by_every_loader_at_its_line(
        check: Check, site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``!!int x`` ended ``loopd check`` in a ValueError traceback: now every loader
    names the file, the line and the value, and the other files are still checked."""
    broken = "a: 1\nb: !!int x\n"
    code, errors = check(rules__r_yaml=broken, packs__p__workflows__w_yaml=broken,
                         packs__q__pack_yaml=broken, inventory_yaml=broken)
    assert code == EXIT_INVALID
    assert sorted(errors) == sorted(
        f"error: SITE/{name}:2: invalid YAML: 'x' is not a valid !!int" for name in
        ("inventory.yaml", "packs/q/pack.yaml", "packs/p/workflows/w.yaml", "rules/r.yaml"))
    (site / "loopd.yaml").write_text(broken)
    assert main(["check", "-c", str(site / "loopd.yaml")]) == EXIT_INVALID
    assert capsys.readouterr().err == \
        f"loopd: {site}/loopd.yaml:2: invalid YAML: 'x' is not a valid !!int\n"


def test_every_loader_reports_invalid_yaml_alike(check: Check, site: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Rule files, pack manifests, workflows and the inventory report a YAML syntax error
    the same way: ``file:line: invalid YAML: problem``, from one formatter."""
    broken = "a: [1,\n"
    code, errors = check(rules__r_yaml=broken, packs__p__workflows__w_yaml=broken,
                         packs__q__pack_yaml=broken, inventory_yaml=broken)
    assert code == EXIT_INVALID
    problem = errors[0].partition(": invalid YAML: ")[2]
    assert problem
    assert sorted(errors) == sorted(f"error: SITE/{name}:2: invalid YAML: {problem}" for name in
                                    ("inventory.yaml", "packs/q/pack.yaml",
                                     "packs/p/workflows/w.yaml", "rules/r.yaml"))
    (site / "loopd.yaml").write_text(broken)
    assert main(["check", "-c", str(site / "loopd.yaml")]) == EXIT_INVALID
    assert capsys.readouterr().err == f"loopd: {site}/loopd.yaml:2: invalid YAML: {problem}\n"
