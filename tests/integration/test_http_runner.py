"""HttpRunner through the Executor against a real aiohttp server on loopback."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import yaml

from loopd.catalog.credentials import Credentials
from loopd.catalog.inventory import Inventory
from loopd.packs.executor import ActionContext, ActionResult, Executor
from loopd.packs.http import MAX_TEXT, HttpRunner
from loopd.packs.registry import PackRegistry
from tests.servers import free_port
from tests.servers.http_targets import HttpEcho

WRONG_PASSWORD = "not-the-echo-password"


def echo_action(path: str, **spec: Any) -> dict[str, Any]:
    return {"runner": "http", "url": f"{{{{ config.url }}}}{path}", **spec}


class Harness:
    """A pack ``t`` of http actions, its Executor, and the inventory they use."""

    def __init__(self, tmp_path: Path, echo: HttpEcho, runner: HttpRunner) -> None:
        self.tmp_path, self.echo, self.runner = tmp_path, echo, runner
        self.inventory = Inventory(credentials={
            "echo-basic": Credentials(username=echo.username, password="env:ECHO_PASSWORD"),
            "echo-bearer": Credentials(token="env:ECHO_TOKEN"),
            "echo-wrong": Credentials(username=echo.username, password="env:WRONG_PASSWORD"),
        })

    async def run(self, actions: dict[str, dict[str, Any]], name: str,
                  input: dict[str, Any] | None = None, *,
                  config: dict[str, Any] | None = None,
                  load_error: str | None = None) -> ActionResult:
        folder = self.tmp_path / "packs" / "t"
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"name": "t", "config": {"url": {"type": "string"},
                                            "hook": {"type": "string", "secret": True}},
                    "actions": actions}
        (folder / "pack.yaml").write_text(yaml.safe_dump(manifest))
        registry = PackRegistry.load([self.tmp_path / "packs"],
                                     {"t": config if config is not None else
                                      {"url": self.echo.url}})
        if load_error is None:
            assert not registry.errors, registry.errors
        else:  # loopd check reports it; the action is kept and fails when it runs
            assert [e.message for e in registry.errors] == [load_error]
        executor = Executor(registry, {"http": self.runner})
        ctx = ActionContext("run-1", "task", self.inventory)
        return await executor.execute(f"t.{name}", input or {}, ctx)


@pytest_asyncio.fixture
async def runner() -> AsyncIterator[HttpRunner]:
    runner = HttpRunner(backoff=0.001)
    yield runner
    await runner.close()


@pytest.fixture
def harness(tmp_path: Path, http_echo: HttpEcho, runner: HttpRunner,
            monkeypatch: pytest.MonkeyPatch) -> Harness:
    monkeypatch.setenv("ECHO_PASSWORD", http_echo.password)
    monkeypatch.setenv("ECHO_TOKEN", http_echo.token)
    monkeypatch.setenv("WRONG_PASSWORD", WRONG_PASSWORD)
    return Harness(tmp_path, http_echo, runner)


def leaked(result: ActionResult, *secrets: str) -> list[str]:
    text = orjson.dumps(result.output).decode() + (result.error or "")
    return [s for s in secrets if s in text]


async def test_expected_status_returns_the_result(harness: Harness) -> None:
    """A status listed in `expect` succeeds with status, url without query, headers and json."""
    actions = {"get": echo_action("/echo", query={"q": "{{ input.q }}", "gone": None},
                                  input={"q": {"type": "string"}})}
    result = await harness.run(actions, "get", {"q": "up == 0"})
    assert result.ok, result.error
    out = result.output
    assert out["status"] == 200 and out["attempts"] == 1
    assert out["url"] == f"{harness.echo.url}/echo"
    assert out["headers"]["content-type"].startswith("application/json")
    assert out["json"]["query"] == {"q": ["up == 0"]} and out["text"] is None


async def test_a_listed_error_status_is_success(harness: Harness) -> None:
    """`expect: [404]` makes a 404 a success, and a non-JSON body comes back as text."""
    actions = {"probe": echo_action("/status/404", expect=[404])}
    result = await harness.run(actions, "probe")
    assert result.ok, result.error
    assert result.output["status"] == 404
    assert result.output["json"] is None and result.output["text"] == "status 404 from echo"


async def test_5xx_is_retried_until_success(harness: Harness) -> None:
    """Two 500s then a 200 succeed on the third attempt with the default retries."""
    harness.echo.fail_next(2)
    result = await harness.run({"get": echo_action("/echo")}, "get")
    assert result.ok, result.error
    assert result.output["attempts"] == 3 and len(harness.echo.requests) == 3


async def test_5xx_exhausted_names_url_status_attempts_and_body(harness: Harness) -> None:
    """A 500 on every attempt fails with the method, URL, status, attempt count and body."""
    harness.echo.fail_next(3, 500, "database is down")
    result = await harness.run({"post": echo_action("/echo", method="POST")}, "post")
    assert not result.ok
    assert result.error == (f"t.post: http POST {harness.echo.url}/echo: "
                            "500 Internal Server Error after 3 attempts: database is down")
    assert len(harness.echo.requests) == 3


async def test_4xx_is_not_retried(harness: Harness) -> None:
    """A 404 fails at once, after one request, naming the unexpected status."""
    result = await harness.run({"get": echo_action("/status/404")}, "get")
    assert not result.ok
    assert result.error == (f"t.get: http GET {harness.echo.url}/status/404: "
                            "unexpected status 404 Not Found: status 404 from echo")
    assert len(harness.echo.requests) == 1


async def test_connection_refused_is_retried_then_named(harness: Harness) -> None:
    """A closed port fails with `cannot connect: Connection refused` after every attempt."""
    url = f"http://127.0.0.1:{free_port()}"
    result = await harness.run({"get": echo_action("/x", retries=1)}, "get",
                               config={"url": url})
    assert not result.ok
    assert result.error == f"t.get: http GET {url}/x: cannot connect: Connection refused " \
                           "after 2 attempts"


async def test_basic_auth_reaches_the_server_and_stays_out_of_results(harness: Harness
                                                                      ) -> None:
    """Basic credentials from the inventory authenticate, and the password is never shown."""
    actions = {"who": echo_action("/basic", auth={"type": "basic",
                                                  "credentials": "echo-basic"})}
    result = await harness.run(actions, "who")
    assert result.ok, result.error
    assert result.output["json"] == {"user": harness.echo.username}
    sent = harness.echo.requests[0].headers["Authorization"]
    assert sent.startswith("Basic ")
    assert leaked(result, harness.echo.password, sent.split()[1]) == []


async def test_wrong_basic_credentials_error_hides_the_secret(harness: Harness) -> None:
    """A 401 whose body echoes the Authorization value fails without revealing it."""
    actions = {"who": echo_action("/basic", auth={"type": "basic",
                                                  "credentials": "echo-wrong"})}
    result = await harness.run(actions, "who")
    assert not result.ok
    encoded = base64.b64encode(f"{harness.echo.username}:{WRONG_PASSWORD}".encode()).decode()
    assert harness.echo.requests[0].headers["Authorization"] == f"Basic {encoded}"
    assert result.error is not None
    assert result.error.endswith("unexpected status 401 Unauthorized: bad credentials: Basic ***")
    assert leaked(result, WRONG_PASSWORD, encoded) == []


async def test_bearer_auth_reaches_the_server_and_an_echo_is_redacted(harness: Harness
                                                                     ) -> None:
    """A bearer token authenticates; echoed back by the server, it reads `***` in the result."""
    actions = {"me": echo_action("/bearer", auth={"type": "bearer",
                                                  "credentials": "{{ input.creds }}"},
                                 input={"creds": {"type": "string", "default": "echo-bearer"}})}
    result = await harness.run(actions, "me")
    assert result.ok, result.error
    assert harness.echo.requests[0].headers["Authorization"] == f"Bearer {harness.echo.token}"
    assert result.output["json"] == {"authenticated": True, "saw": "Bearer ***"}
    assert leaked(result, harness.echo.token) == []


async def test_unknown_credentials_fail_before_sending(harness: Harness) -> None:
    """Credentials missing from the inventory fail the action and send nothing."""
    actions = {"me": echo_action("/bearer", auth={"type": "bearer", "credentials": "nope"})}
    result = await harness.run(actions, "me")
    assert not result.ok and result.error == "t.me: unknown credentials 'nope'"
    assert harness.echo.requests == []


async def test_json_body_is_sent_without_null_members(harness: Harness) -> None:
    """A JSON body keeps native types, leaves out members that rendered null, sets its type."""
    actions = {"post": echo_action(
        "/echo", method="POST",
        json={"a": "{{ input.a }}", "b": "{{ input.b }}", "n": "{{ input.n }}",
              "tags": ["x", "{{ input.a }}"]},
        input={"a": {"type": "string"}, "b": {"type": "string"}, "n": {"type": "integer"}})}
    result = await harness.run(actions, "post", {"a": "yes", "n": 3})
    assert result.ok, result.error
    assert result.output["json"]["body"] == {"a": "yes", "n": 3, "tags": ["x", "yes"]}
    assert result.output["json"]["headers"]["Content-Type"] == "application/json"


async def test_query_lists_repeat_and_form_bodies_are_urlencoded(harness: Harness) -> None:
    """A list query value repeats its parameter; `form` is sent urlencoded."""
    actions = {"post": echo_action("/echo", method="POST",
                                   query={"filter": ["a=\"1\"", "b=\"2\""], "flag": True},
                                   form={"x": "1", "y": "{{ input.y }}"},
                                   input={"y": {"type": "string"}})}
    result = await harness.run(actions, "post", {"y": "two words"})
    assert result.ok, result.error
    echoed = result.output["json"]
    assert echoed["query"] == {"filter": ['a="1"', 'b="2"'], "flag": ["true"]}
    assert echoed["body"] == "x=1&y=two+words"


async def test_long_text_bodies_are_truncated(harness: Harness) -> None:
    """A non-JSON body longer than 64 KiB is cut to 64 KiB in the result."""
    result = await harness.run({"big": echo_action(f"/bytes/{MAX_TEXT + 1000}")}, "big")
    assert result.ok, result.error
    assert result.output["text"] == "x" * MAX_TEXT


async def test_a_secret_url_is_shown_as_its_origin(harness: Harness) -> None:
    """A URL from a secret config field shows as `origin/***`; its path and token never show."""
    hook = f"{harness.echo.url}/echo?token=abc-0123456789"
    actions = {"hook": {"runner": "http", "method": "POST", "url": "{{ config.hook }}",
                        "json": {"text": "hi"}}}
    result = await harness.run(actions, "hook", config={"hook": hook})
    assert result.ok, result.error
    assert result.output["url"] == f"{harness.echo.url}/***"
    assert leaked(result, "/echo", "abc-0123456789") == []


async def test_timeout_is_the_executors(harness: Harness) -> None:
    """A server that never answers ends in ActionTimeout after the action's timeout."""
    harness.echo.hang_next()
    result = await harness.run({"slow": echo_action("/echo", timeout="200ms")}, "slow")
    assert not result.ok
    assert result.output == {"timed_out": True}
    assert result.error == "t.slow: timed out after 0.2s"


async def test_missing_config_url_names_the_problem(harness: Harness) -> None:
    """An unset base URL fails with a message pointing at the pack's config."""
    result = await harness.run({"get": echo_action("/echo")}, "get", config={})
    assert not result.ok
    assert result.error == ("t.get: http GET /echo: url must be absolute http(s) "
                            "(check the action's input and the pack's config)")


async def test_dot_segments_in_the_path_are_refused(harness: Harness) -> None:
    """An input that would climb out of the API path (`../`) is refused before sending."""
    actions = {"get": echo_action("/status/{{ input.id }}", input={"id": {"type": "string"}})}
    result = await harness.run(actions, "get", {"id": "../echo"})
    assert not result.ok and result.error is not None
    assert result.error.endswith("url path must not contain '.' or '..' segments")
    assert harness.echo.requests == []


async def test_actions_share_one_pooled_connection(harness: Harness) -> None:
    """Two actions in a row reuse the runner's keep-alive connection (one session)."""
    actions = {"a": echo_action("/echo"), "b": echo_action("/echo", method="PUT")}
    first = await harness.run(actions, "a")
    second = await harness.run(actions, "b")
    assert first.ok and second.ok
    assert first.output["json"]["peer"] == second.output["json"]["peer"]


async def test_a_broken_template_names_its_field(harness: Harness) -> None:
    """A template that does not compile is a load error, and fails the action naming the
    field, sending nothing."""
    result = await harness.run(
        {"get": echo_action("/echo", headers={"X-A": "{{ input.a | }}"})}, "get",
        load_error="actions.get.headers: invalid expression 'input.a |': unexpected end of "
                   "template, expected 'name'.")
    assert not result.ok and result.error is not None
    assert result.error.startswith("t.get: http action headers: invalid expression")
    assert harness.echo.requests == []
