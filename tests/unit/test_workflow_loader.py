"""Load-time checks of workflow files (loopd.workflow.loader.load_workflows): every problem
that can be found before a run is reported as ``file:line: task <name> <field>: ...``."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog.testing

from loopd.packs.registry import PackRegistry
from tests.workflow_harness import load_packs, write_packs

Load = Callable[..., PackRegistry]


@pytest.fixture
def load(tmp_path: Path) -> Load:
    root = tmp_path / "packs"
    write_packs(root)

    def load(**workflows: str) -> PackRegistry:
        return load_packs(root, **workflows)

    return load


def where(tmp_path: Path, name: str, text: str, task: str) -> str:
    """``path:line`` of ``task``'s key in workflow ``name``."""
    lines = textwrap.dedent(text).lstrip("\n").splitlines()
    line = next(i for i, ln in enumerate(lines, 1) if ln.strip().startswith(f"{task}:"))
    return f"{tmp_path / 'packs' / 't' / 'workflows' / name}.yaml:{line}"


BROKEN = {
    "unknown succeed outcome": ("""
        tasks:
          go: {noop: true, next: done}
          done: {succeed: restarted}
    """, "done", "tasks.done.succeed: Input should be 'fixed', 'not_fixed', 'inconclusive'"),
    "unknown action": ("""
        tasks:
          start: {noop: true, next: go}
          go: {action: t.nosuch}
    """, "go", "task go action: pack 't' has no action 'nosuch'"),
    "unknown pack": ("""
        tasks:
          go: {action: nopack.restart}
    """, "go", "task go action: unknown pack 'nopack' in action 'nopack.restart' (packs: core, t)"),
    "unknown task in next": ("""
        tasks:
          go:
            action: t.echo
            next: [{when: succeeded, do: done}, {when: failed, do: nowhere}]
          done: {noop: true}
    """, "go", "task go next[1].do: unknown task 'nowhere'"),
    "unknown task in join": ("""
        tasks:
          start: {noop: true, next: {do: [a, go]}}
          a: {noop: true}
          go: {noop: true, join: [a, ghost]}
    """, "go", "task go join: unknown task 'ghost'"),
    "unknown sub-workflow": ("""
        tasks:
          go: {workflow: t.nosuch}
    """, "go", "task go workflow: pack 't' has no workflow 'nosuch'"),
    "unclosed template": ("""
        tasks:
          go: {action: t.echo, input: {value: "{{ ctx.host "}}
    """, "go", "task go input: invalid template '{{ ctx.host ': unexpected end of template"),
    "bad expression in a template": ("""
        tasks:
          go: {action: t.echo, input: {value: "host {{ ctx.host + }}"}}
    """, "go", "task go input: invalid template 'host {{ ctx.host + }}'"),
    "bad condition": ("""
        tasks:
          go: {action: t.echo, next: [{when: "result.value >", do: go2}]}
          go2: {noop: true}
    """, "go", "task go next[0].when: invalid expression 'result.value >'"),
    "bad publish template": ("""
        tasks:
          go: {action: t.echo, publish: {x: "{{ result.value | nosuchfilter }}"}}
    """, "go", "task go publish: invalid expression 'result.value | nosuchfilter': "
               "No filter named 'nosuchfilter'."),
    "input the action does not take": ("""
        tasks:
          go: {action: t.deploy, input: {name: app, colour: red}}
    """, "go", "task go input: t.deploy takes no input colour"),
    "missing required action input": ("""
        tasks:
          go: {action: t.flaky, input: {fails: 2}}
    """, "go", "task go input: t.flaky needs key"),
    "transition cycle with no way out": ("""
        tasks:
          start: {action: t.echo, next: ping}
          ping: {action: t.echo, next: [{when: always, do: pong}]}
          pong:
            action: t.echo
            next: [{when: succeeded, do: ping}, {when: failed, do: ping}]
    """, "ping", "tasks ping, pong form a transition cycle with no way out"),
    "task that always returns to itself": ("""
        tasks:
          spin: {action: t.echo, next: {when: always, do: spin}}
    """, "spin", "tasks spin form a transition cycle with no way out"),
    "two kinds in one task": ("""
        tasks:
          go: {action: t.echo, confirm: {query: up, within: 1m}}
    """, "go", "tasks.go: a task is exactly one of action, workflow, confirm"),
    "query and or_query together": ("""
        tasks:
          go: {confirm: {query: up == 1, or_query: up == 1, within: 1m}}
    """, "go", "tasks.go.confirm: query and or_query are the same setting; give one"),
    "unknown task field": ("""
        tasks:
          go: {action: t.echo, retries: 3}
    """, "go", "tasks.go.retries: unknown field"),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_load_time_errors_name_file_line_and_task(load: Load, tmp_path: Path, case: str
                                                  ) -> None:
    """Each kind of mistake is one PackError naming the file:line of its task and the task."""
    text, task, message = BROKEN[case]
    registry = load(bad=text)
    assert len(registry.errors) == 1, [str(e) for e in registry.errors]
    assert str(registry.errors[0]).startswith(f"{where(tmp_path, 'bad', text, task)}: {message}")
    assert "t.bad" not in registry.workflows


@pytest.mark.parametrize("text", [
    """
    tasks:
      check:
        action: t.flaky
        input: {key: k}
        next: [{when: succeeded, do: done}, {when: failed, do: pause}]
      pause: {noop: true, delay: 1s, next: check}
      done: {succeed: fixed}
    """,
    """
    tasks:
      poll:
        action: t.echo
        next: [{when: "result.value > 3", do: done}, {when: always, do: pause}]
      pause: {noop: true, next: {when: always, do: poll}}
      done: {noop: true}
    """,
    """
    tasks:
      poll: {action: t.echo, next: pause}
      pause: {noop: true, next: {when: always, do: poll}}
    """,
], ids=["failure-then-success-exit", "condition-exit", "failure-ends-the-branch"])
def test_a_cycle_with_a_way_out_is_accepted(load: Load, text: str) -> None:
    """A loop is fine when some task in it can leave it or end its branch."""
    registry = load(loop=text)
    assert registry.errors == []
    assert "t.loop" in registry.workflows


def test_one_bad_workflow_does_not_stop_the_others(load: Load) -> None:
    """A broken workflow is reported while the pack's other workflows load."""
    registry = load(good="""
        tasks:
          go: {workflow: t.child}
    """, child="""
        tasks:
          go: {action: t.echo}
    """, bad="""
        tasks:
          go: {action: t.nosuch}
    """)
    assert [e.message for e in registry.errors] == [
        "task go action: pack 't' has no action 'nosuch'"]
    assert {"t.good", "t.child"} <= set(registry.workflows)


def test_invalid_yaml_names_its_line(load: Load, tmp_path: Path) -> None:
    """A workflow file that is not YAML is reported with the line of the syntax error."""
    registry = load(bad="tasks:\n  go: {action: t.echo\n  other: 1\n")
    (error,) = registry.errors
    assert str(error).startswith(f"{tmp_path / 'packs/t/workflows/bad.yaml'}:")
    assert "invalid YAML" in str(error)


def test_shorthands_compile_to_the_same_model(load: Load) -> None:
    """`next: name`, a single transition mapping and `input: [a, b]` expand as documented."""
    registry = load(short="""
        input: [host, service]
        tasks:
          a: {action: t.echo, next: b}
          b: {action: t.echo, next: {when: failed, do: c}}
          c: {noop: true}
    """)
    assert registry.errors == []
    wf = registry.workflows["t.short"]
    assert wf.tasks["a"].transitions == [("succeeded", ["b"])]
    assert wf.tasks["b"].transitions == [("failed", ["c"])]
    assert {n: (f.type, f.required) for n, f in wf.model.input.items()} == {
        "host": ("any", True), "service": ("any", True)}


# -- run data never reaches a shell verbatim (loopd/packs/taint.py) -----------------------

SHELL_PACK = """\
name: sh
actions:
  run:
    runner: ssh
    input: {host: {required: true}, argv: {type: array}, command: {type: string}}
    one_of: [argv, command]
    command: "{{ input.argv if input.argv else raw.command }}"
"""


@pytest.fixture
def shell_load(tmp_path: Path) -> Load:
    root = tmp_path / "packs"
    write_packs(root)
    (root / "sh").mkdir()
    (root / "sh" / "pack.yaml").write_text(SHELL_PACK)

    def load(**workflows: str) -> PackRegistry:
        return load_packs(root, **workflows)

    return load


@pytest.mark.parametrize("template", [
    "{{ ctx.cmd }}", "tail {{ input.path }}", "{{ result.stdout }}", "rm {{ item }}",
    "echo '{{ history }}'", "{{ event.cmd }}",
])
def test_a_raw_command_from_run_data_is_refused_naming_the_task(
        shell_load: Load, tmp_path: Path, template: str) -> None:
    """A task giving a raw command input a template reading run data is refused at load,
    naming file:line, the task, the input and argv as the way to do it."""
    text = f"""
        tasks:
          go:
            action: sh.run
            input: {{host: web-1, command: {template!r}}}
        """
    registry = shell_load(bad=text)
    (error,) = registry.errors
    assert str(error).startswith(f"{where(tmp_path, 'bad', text, 'go')}: task go input: "
                                 "sh.run passes input 'command' to the shell verbatim")
    assert "argv: [prog" in str(error) and "unsafe_shell: [command]" in str(error)
    assert "t.bad" not in registry.workflows


def test_a_task_with_unsafe_shell_loads_and_warns_at_every_load(
        shell_load: Load, tmp_path: Path) -> None:
    """unsafe_shell on the task accepts the risk; every load logs a warning naming it."""
    text = """
        tasks:
          go:
            action: sh.run
            unsafe_shell: [command]
            input: {host: web-1, command: "{{ ctx.cmd }}"}
          safe:
            action: sh.run
            input: {host: web-1, argv: [tail, "{{ ctx.path }}"]}
        """
    for _ in range(2):
        with structlog.testing.capture_logs() as logs:
            registry = shell_load(risky=text)
        assert registry.errors == [] and "t.risky" in registry.workflows
        (warning,) = [e for e in logs if e["log_level"] == "warning"]
        assert (warning["workflow"], warning["task"], warning["inputs"]) == (
            "t.risky", "go", ["command"])
        assert warning["origin"] == where(tmp_path, "risky", text, "go")
