"""Packs: discovery errors name their file; the executor validates input, dry-runs, times out."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from loopd.catalog.inventory import Inventory
from loopd.packs.executor import ActionContext, Executor
from loopd.packs.python import PythonRunner
from loopd.packs.registry import PackRegistry

DEMO_MANIFEST = """\
name: demo
version: 1.2.3
config:
  greeting: {type: string, default: hello}
actions:
  greet:
    runner: python
    input:
      name: {type: string, required: true}
      times: {type: integer, default: 1}
      mood: {type: string, enum: [happy, grumpy]}
    timeout: 2s
  typed:
    runner: python
  hang:
    runner: python
    timeout: 50ms
  explode:
    runner: python
    dry_run: {exit_status: 0, stdout: "would explode"}
  crash:
    runner: python
"""

DEMO_ACTIONS = '''\
import asyncio

from pydantic import BaseModel, ConfigDict


class TypedInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    port: int


async def greet(input, ctx):
    return {"text": " ".join([ctx.pack_config["greeting"] + " " + input["name"]] * input["times"])}


async def typed(input: TypedInput, ctx):
    return {"port": input.port}


async def hang(input, ctx):
    await asyncio.Event().wait()


async def explode(input, ctx):
    raise RuntimeError("must never run in a dry run")


async def crash(input, ctx):
    return 1 / 0
'''


def _pack(root: Path, folder: str, manifest: str, actions: str | None = None) -> Path:
    path = root / folder
    path.mkdir(parents=True)
    (path / "pack.yaml").write_text(textwrap.dedent(manifest))
    if actions is not None:
        (path / "actions.py").write_text(textwrap.dedent(actions))
    return path


def _ctx(dry_run: bool = False) -> ActionContext:
    return ActionContext("run-1", "task", Inventory(), dry_run=dry_run)


@pytest.fixture
def demo(packs_dir: Path) -> PackRegistry:
    """The shipped core pack plus the demo pack above."""
    _pack(packs_dir, "demo", DEMO_MANIFEST, DEMO_ACTIONS)
    registry = PackRegistry.load([packs_dir])
    assert [str(e) for e in registry.errors] == []
    return registry


@pytest.fixture
def executor(demo: PackRegistry) -> Executor:
    return Executor(demo, {"python": PythonRunner()})


def test_packs_are_discovered_from_folders(demo: PackRegistry) -> None:
    """Every folder with a pack.yaml becomes a pack; its actions are named pack.action."""
    assert set(demo.packs) == {"core", "demo"}
    assert {"core.log", "core.fail", "demo.greet", "demo.hang"} <= set(demo.actions)
    assert demo.packs["demo"].manifest.version == "1.2.3"
    assert demo.packs["demo"].config == {"greeting": "hello"}


BROKEN_PACKS = [
    pytest.param("name: bad\nactions:\n  a: {runner: python\n", None,
                 "pack.yaml:4", "invalid YAML", id="invalid-yaml"),
    pytest.param("- not\n- a mapping\n", None, "pack.yaml", "valid dictionary",
                 id="not-a-mapping"),
    pytest.param("name: bad\ncolour: red\n", None, "pack.yaml", "colour: unknown field",
                 id="unknown-top-field"),
    pytest.param("name: bad\nactions:\n  a: {runner: python, retries: 3}\n", "",
                 "pack.yaml", "retries: unknown field", id="unknown-action-field"),
    pytest.param("name: bad\nactions:\n  a: {runner: telepathy}\n", None,
                 "pack.yaml", "actions.a", id="unknown-runner"),
    pytest.param("name: Bad-Name\n", None, "pack.yaml", "name: String should match",
                 id="bad-name"),
    pytest.param("name: bad\nactions:\n  a: {runner: python}\n", None,
                 "", "need an actions.py", id="no-actions-py"),
    pytest.param("name: bad\nactions:\n  a: {runner: python}\n",
                 "async def b(input, ctx):\n    return {}\n",
                 "pack.yaml", "actions.a: actions.py has no async function 'a'",
                 id="missing-function"),
    pytest.param("name: bad\nactions:\n  a: {runner: python}\n",
                 "def a(input, ctx):\n    return {}\n",
                 "pack.yaml", "has no async function 'a'", id="not-async"),
    pytest.param("name: bad\nactions:\n  a: {runner: python}\n",
                 "import no_such_module_anywhere\n",
                 "actions.py", "failed to import: ModuleNotFoundError", id="broken-import"),
    pytest.param("name: bad\nactions:\n  a: {runner: python}\n",
                 "def broken(:\n",
                 "actions.py", "failed to import: SyntaxError", id="syntax-error"),
    pytest.param("name: bad\nactions:\n  a: {runner: python}\n",
                 "from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                 "if TYPE_CHECKING:\n    from elsewhere import Model\n"
                 "async def a(input: Model, ctx):\n    return {}\n",
                 "actions.py", "cannot read the signature of 'a': NameError",
                 id="unresolvable-annotation"),
    pytest.param("name: bad\nactions:\n  a:\n    runner: ssh\n    command: ls\n"
                 "    input: {p: {pattern: '[a-z'}}\n", None,
                 "pack.yaml", "is not a regular expression", id="pattern-not-a-regex"),
    pytest.param("name: bad\nactions:\n  a:\n    runner: ssh\n    command: ls\n"
                 "    input: {p: {}}\n    one_of: [p, q]\n", None,
                 "pack.yaml", "one_of names undeclared input(s) q", id="one-of-undeclared"),
    pytest.param("name: bad\nactions:\n  a:\n    runner: python\n"
                 "    rollback: {action: bad.b, input: {x: '{{ input._secret }}'}}\n",
                 "async def a(input, ctx):\n    return {}\n",
                 "pack.yaml", "actions.a.rollback.input", id="unsafe-rollback-template"),
]


@pytest.mark.parametrize("manifest, actions, where, message", BROKEN_PACKS)
def test_a_broken_pack_is_reported_with_its_file_and_others_still_load(
    packs_dir: Path, manifest: str, actions: str | None, where: str, message: str,
) -> None:
    """A bad manifest or actions.py is one PackError naming its file; other packs load."""
    folder = _pack(packs_dir, "bad", manifest, actions)
    registry = PackRegistry.load([packs_dir])
    assert len(registry.errors) == 1, [str(e) for e in registry.errors]
    error = registry.errors[0]
    assert error.origin == str(folder / where)
    assert message in error.message, error.message
    assert "core" in registry.packs and "bad" not in registry.packs
    assert "core.log" in registry.actions


def test_duplicate_pack_names_are_reported(packs_dir: Path) -> None:
    """Two folders declaring the same pack name: the second is refused, naming the first."""
    _pack(packs_dir, "zz-core-again", "name: core\n")
    registry = PackRegistry.load([packs_dir])
    (error,) = registry.errors
    assert "duplicate pack name 'core'" in error.message
    assert error.origin == str(packs_dir / "zz-core-again" / "pack.yaml")
    assert "core.log" in registry.actions


def test_pack_config_is_validated(packs_dir: Path) -> None:
    """loopd.yaml pack_config is checked against the pack's config schema; unknown packs too."""
    _pack(packs_dir, "demo", DEMO_MANIFEST, DEMO_ACTIONS)
    registry = PackRegistry.load([packs_dir], {"demo": {"greeting": 5}, "ghost": {}})
    messages = sorted(str(e) for e in registry.errors)
    assert any("demo" in m and "config: greeting: expected string, got int" in m
               for m in messages), messages
    assert any("configuration for unknown pack 'ghost'" in m for m in messages), messages
    configured = PackRegistry.load([packs_dir], {"demo": {"greeting": "hi"}})
    assert configured.errors == []
    assert configured.packs["demo"].config == {"greeting": "hi"}


def test_a_missing_packs_folder_is_reported(tmp_path: Path) -> None:
    """A configured packs folder that does not exist is an error naming it."""
    registry = PackRegistry.load([tmp_path / "nowhere"])
    (error,) = registry.errors
    assert error.origin == str(tmp_path / "nowhere")


def test_check_target_explains_what_is_missing(demo: PackRegistry) -> None:
    """check_target accepts known actions and says whether the pack or the action is unknown."""
    assert demo.check_target("action", "demo.greet") is None
    assert demo.check_target("action", "demo.wave") == "pack 'demo' has no action 'wave'"
    assert demo.check_target("action", "ghost.wave") == (
        "unknown pack 'ghost' in action 'ghost.wave' (packs: core, demo)")
    assert demo.check_target("workflow", "demo.greet") == "pack 'demo' has no workflow 'greet'"


async def test_an_action_runs_with_defaults_and_pack_config(executor: Executor) -> None:
    """Valid input runs the action with declared defaults applied and the pack's config."""
    result = await executor.execute("demo.greet", {"name": "web-1", "times": 2}, _ctx())
    assert result.ok and result.error is None
    assert result.output == {"text": "hello web-1 hello web-1"}
    assert result.seconds >= 0


@pytest.mark.parametrize("payload, message", [
    ({}, "input: name is required"),
    ({"name": None}, "input: name is required"),
    ({"name": "web-1", "times": "twice"}, "input: times: expected integer, got str"),
    ({"name": "web-1", "times": True}, "input: times: expected integer, got boolean"),
    ({"name": 42}, "input: name: expected string, got int"),
    ({"name": "web-1", "mood": "sleepy"}, "input: mood: 'sleepy' is not one of"),
    ({"name": "web-1", "colour": "red"}, "input: unknown field(s) colour"),
])
async def test_declared_input_is_validated_naming_the_field(
    executor: Executor, payload: dict[str, object], message: str,
) -> None:
    """Missing required fields, wrong types and unknown fields fail the action, naming the field."""
    result = await executor.execute("demo.greet", payload, _ctx())
    assert not result.ok
    assert result.error is not None and result.error.startswith("demo.greet: ")
    assert message in result.error


async def test_a_pydantic_input_model_is_validated_naming_the_field(executor: Executor) -> None:
    """An action whose input is a pydantic model gets a validated model; errors name the field."""
    good = await executor.execute("demo.typed", {"port": "8080"}, _ctx())
    assert good.ok and good.output == {"port": 8080}
    bad = await executor.execute("demo.typed", {"port": "http"}, _ctx())
    assert not bad.ok and bad.error is not None and "input: port:" in bad.error


async def test_dry_run_returns_the_declared_result_without_running(executor: Executor) -> None:
    """In a dry run the action is not executed; its declared ``dry_run`` result is returned."""
    result = await executor.execute("demo.explode", {}, _ctx(dry_run=True))
    assert result.ok
    assert result.output == {"exit_status": 0, "stdout": "would explode", "dry_run": True}
    undeclared = await executor.execute("demo.crash", {}, _ctx(dry_run=True))
    assert undeclared.ok and undeclared.output == {"dry_run": True}
    invalid = await executor.execute("demo.greet", {}, _ctx(dry_run=True))
    assert not invalid.ok and "name is required" in (invalid.error or "")  # still validated


async def test_an_action_over_its_timeout_fails_as_timed_out(executor: Executor) -> None:
    """An action running past its ``timeout`` is stopped and reported as timed out."""
    result = await executor.execute("demo.hang", {}, _ctx())
    assert not result.ok
    assert result.output == {"timed_out": True}
    assert result.error == "demo.hang: timed out after 0.05s"


async def test_a_crashing_action_fails_its_result_not_the_caller(executor: Executor) -> None:
    """An unexpected exception inside an action becomes a failed result naming the exception."""
    result = await executor.execute("demo.crash", {}, _ctx())
    assert not result.ok
    assert result.error == "demo.crash: ZeroDivisionError: division by zero"


async def test_core_fail_fails_with_its_reason(executor: Executor) -> None:
    """``core.fail`` fails with the reason it was given (and a default one without)."""
    result = await executor.execute("core.fail", {"reason": "disk still full"}, _ctx())
    assert (result.ok, result.error) == (False, "core.fail: disk still full")
    default = await executor.execute("core.fail", {}, _ctx())
    assert default.error == "core.fail: failed on purpose"


async def test_core_actions_do_what_they_say(executor: Executor) -> None:
    """core.log returns its message, core.noop and core.set return their input."""
    logged = await executor.execute("core.log", {"message": "hi", "level": "warning"}, _ctx())
    assert logged.ok and logged.output == {"message": "hi"}
    assert (await executor.execute("core.noop", {"a": 1}, _ctx())).output == {"a": 1}
    assert (await executor.execute("core.set", {"b": [2]}, _ctx())).output == {"b": [2]}
    bad = await executor.execute("core.log", {"level": "loud"}, _ctx())
    assert not bad.ok and bad.error is not None and "message" in bad.error


async def test_unknown_actions_and_runners_fail_with_a_reason(demo: PackRegistry) -> None:
    """An unknown action, or an action whose runner is not available, fails naming why."""
    executor = Executor(demo, {})
    unknown = await executor.execute("core.reboot", {}, _ctx())
    assert unknown.error == "core.reboot: pack 'core' has no action 'reboot'"
    no_runner = await executor.execute("core.noop", {}, _ctx())
    assert no_runner.error == "core.noop: runner 'python' is not available"


@pytest.mark.parametrize("command, raw", [
    ("{{ raw.command }}", {"command"}),
    ("{{ input.argv if input.argv else raw.command }}", {"command"}),
    ("exit {{ 4 if raw.fail else 0 }} {{ input.token }}", set()),
    ("{% if raw.verbose %}-v{% endif %} {{ raw['cmd'] }}", {"cmd"}),
    ("{{ raw.command or entity.show_command }}", {"command"}),
    ("{{ raw[input.which] }}", {"*"}),
    ("systemctl restart -- {{ input.service }}", set()),
])
def test_raw_inputs_are_read_from_the_command_template(
    packs_dir: Path, command: str, raw: set[str],
) -> None:
    """An ssh action's raw inputs are those its command inserts verbatim, not in a test."""
    _pack(packs_dir, "sh", f"name: sh\nactions:\n  a:\n    runner: ssh\n"
          f"    command: {command!r}\n")
    registry = PackRegistry.load([packs_dir])
    assert registry.errors == []
    assert registry.actions["sh.a"].raw_inputs == raw


async def test_a_pattern_and_one_of_are_checked_before_the_action_runs(
    packs_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An input not matching its pattern (a secret one not shown) and a one_of given twice
    or not at all fail naming the input, before the runner is called."""
    _pack(packs_dir, "p", """\
name: p
actions:
  a:
    runner: python
    input:
      path: {pattern: "/.*"}
      token: {pattern: "[a-f0-9]+", secret: true}
      x: {}
      y: {}
    one_of: [x, y]
""", "async def a(input, ctx):\n    return {'ran': True}\n")
    monkeypatch.setenv("PACKS_TEST_BAD_TOKEN", "SECRET-1")  # a secret input is a reference:
    monkeypatch.setenv("PACKS_TEST_TOKEN", "beef")  # its pattern applies to its value
    executor = Executor(PackRegistry.load([packs_dir]), {"python": PythonRunner()})
    ctx = ActionContext("r", "t", Inventory())
    cases: dict[str, dict[str, Any]] = {
        "input: path: '-delete' does not match its pattern /.*": {"path": "-delete", "x": 1},
        "input: token: the value does not match its pattern [a-f0-9]+": {
            "token": "env:PACKS_TEST_BAD_TOKEN", "x": "1"},
        "input: give exactly one of x, y (got x, y)": {"x": 1, "y": 2},
        "input: give exactly one of x, y": {},
    }
    for message, values in cases.items():
        result = await executor.execute("p.a", values, ctx)
        assert result.error == f"p.a: {message}"
        assert "SECRET-1" not in (result.error or "")
    ok = await executor.execute("p.a", {"path": "/var/log", "token": "env:PACKS_TEST_TOKEN",
                                        "y": "1"}, ctx)
    assert ok.ok and ok.output == {"ran": True}
