"""Reloading rules in the running daemon: ``POST /v1/reload`` and SIGHUP."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, LoopdProcess, eventually

pytestmark = pytest.mark.e2e


def log_rule(name: str, topic: str) -> dict[str, Any]:
    return {"name": name, "on": {"source": "webhook", "topic": topic},
            "run": {"action": "core.log", "input": {"message": f"{name}: {{{{ event.n }}}}"}}}


async def send(daemon: LoopdProcess, topic: str, n: int) -> None:
    answer = await daemon.post("/v1/events", {"topic": topic, "key": f"{topic}-{n}",
                                             "data": {"n": n}})
    assert answer["accepted"] == 1


async def rule_names(daemon: LoopdProcess) -> list[str]:
    return [r["name"] for r in (await daemon.get("/v1/rules"))["rules"]]


async def runs_of(daemon: LoopdProcess, rule: str) -> list[dict[str, Any]]:
    return [r for r in await daemon.runs() if r["rule"] == rule]


@pytest.fixture
def config(config: Config) -> Config:
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.rules = {"a.yaml": [log_rule("alpha", "alpha")], "b.yaml": [log_rule("beta", "beta")]}
    return config


async def test_post_reload_activates_a_changed_rule_and_reports_a_broken_file(
        config: Config, loopd_factory: Factory) -> None:
    """After a rule file changes, POST /v1/reload makes the new rule active; a broken rule
    file is reported (file:line, rule, field) by the reload and /v1/rules while the other
    rules keep starting runs."""
    daemon = loopd_factory(config)
    await daemon.start()
    await send(daemon, "alpha", 1)
    await send(daemon, "gamma", 1)  # no rule for it yet
    await eventually(lambda: _count(daemon, "alpha") == 1, "alpha's run")
    assert _count(daemon, "gamma") == 0

    config.write_rules("a.yaml", [log_rule("alpha", "alpha"), log_rule("gamma", "gamma")])
    config.write_rules("broken.yaml", "rules:\n  - name: broken\n    on: {source: webhook}\n"
                                      "    throtle: {once_within: 1m}\n"
                                      "    run: {action: core.log, input: {message: x}}\n")
    answer = await daemon.post("/v1/reload", expect=422)
    assert answer["rules"] == 3 and answer["kept"] == []
    (error,) = answer["errors"]
    assert "broken.yaml:4" in error and "broken" in error and "throtle" in error
    rules = await daemon.get("/v1/rules")
    assert sorted(r["name"] for r in rules["rules"]) == ["alpha", "beta", "gamma"]
    assert rules["errors"] == [error]
    assert await daemon.metric("loopd_rules_loaded") == 3

    await send(daemon, "gamma", 2)
    await send(daemon, "beta", 2)
    await send(daemon, "alpha", 2)
    await eventually(lambda: (_count(daemon, "gamma"), _count(daemon, "beta"),
                              _count(daemon, "alpha")) == (1, 1, 2), "runs of every rule")
    story = await daemon.run((await runs_of(daemon, "gamma"))[0]["id"])
    assert story["steps"][0]["output"] == {"message": "gamma: 2"}

    # a file that is not YAML at all: reported with its line, the rules before stay
    config.write_rules("broken.yaml", "rules: [\n")
    answer = await daemon.post("/v1/reload", expect=422)
    assert answer["rules"] == 3 and len(answer["errors"]) == 1
    assert "broken.yaml:2" in answer["errors"][0] and "invalid YAML" in answer["errors"][0]
    await daemon.stop()


async def test_a_rule_file_with_a_yaml_typo_keeps_its_rules_across_a_reload(
        config: Config, loopd_factory: Factory) -> None:
    """POST /v1/reload with a YAML typo in one rule file answers 422 naming the file as kept:
    that file's rules keep starting runs, the other files reload, and fixing the typo
    reloads it with a 200."""
    daemon = loopd_factory(config)
    await daemon.start()
    a = config.write_rules("a.yaml", [log_rule("alpha", "alpha")])
    a.write_text(a.read_text().replace("rules:", "rules: [", 1))  # not YAML any more
    config.write_rules("b.yaml", [log_rule("beta", "beta"), log_rule("delta", "delta")])
    answer = await daemon.post("/v1/reload", expect=422)
    assert answer["rules"] == 3 and answer["kept"] == [str(a)]
    (error,) = answer["errors"]
    assert error.startswith(f"{a}:") and "invalid YAML" in error
    assert sorted(await rule_names(daemon)) == ["alpha", "beta", "delta"]
    assert await daemon.metric("loopd_rule_load_errors") == 1

    await send(daemon, "alpha", 1)
    await send(daemon, "delta", 1)
    await eventually(lambda: (_count(daemon, "alpha"), _count(daemon, "delta")) == (1, 1),
                     "runs of the kept rule and of the reloaded file")

    config.write_rules("a.yaml", [log_rule("alpha2", "alpha")])
    answer = await daemon.post("/v1/reload")
    assert answer == {"rules": 3, "errors": [], "kept": []}
    assert sorted(await rule_names(daemon)) == ["alpha2", "beta", "delta"]
    assert await daemon.metric("loopd_rule_load_errors") == 0
    await daemon.stop()


async def test_sighup_reloads_rules(config: Config, loopd_factory: Factory) -> None:
    """SIGHUP reloads the rule files: a removed rule stops matching and an added one starts
    runs, without a restart."""
    daemon = loopd_factory(config)
    await daemon.start()
    config.write_rules("b.yaml", [log_rule("delta", "delta")])
    daemon.signal(signal.SIGHUP)

    async def reloaded() -> bool:
        return sorted(await rule_names(daemon)) == ["alpha", "delta"]

    await eventually(reloaded, "the rules after SIGHUP")
    await send(daemon, "delta", 1)
    await send(daemon, "beta", 1)
    await eventually(lambda: _count(daemon, "delta") == 1, "delta's run")
    assert _count(daemon, "beta") == 0
    assert daemon.running
    await daemon.stop()


def _count(daemon: LoopdProcess, rule: str) -> int:
    """Runs of ``rule`` that finished successfully."""
    return int(daemon.store_query(
        "SELECT COUNT(*) FROM runs WHERE rule=? AND status='succeeded'", (rule,))[0][0])
