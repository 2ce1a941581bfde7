"""The terminal commands (``loopd runs``, ``show``, ``decisions``, ``approve``, ``reject``)
run as a user runs them: the real CLI as a subprocess against a real daemon's API with
auth on, tokens from the environment or a file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.e2e.conftest import Factory
from tests.e2e.daemon import LOOPD, Config, LoopdProcess
from tests.servers import free_port

pytestmark = pytest.mark.e2e

OPERATOR = "operator-token-0123456789abcdef"
VIEWER = "viewer-token-0123456789abcdef"

CLEAN = """\
input: [host]
tasks:
  clean:
    action: core.noop
    input: {host: "{{ ctx.host }}"}
    next: inner
  inner:
    workflow: term.inner
    input: {host: "{{ ctx.host }}"}
    next: verify
  verify:
    confirm:
      event: {source: webhook, topic: "disk/{{ ctx.host }}", if: "event.used < 0.5"}
      within: 60s
    next: [{when: succeeded, do: done}, {when: always, do: give_up}]
  done: {succeed: fixed}
  give_up: {fail: "disk on {{ ctx.host }} still full"}
"""

INNER = """\
input: [host]
tasks:
  note:
    action: core.log
    input: {message: "inner clean-up on {{ ctx.host }}"}
"""

BROKEN = """\
input: [host]
tasks:
  remount:
    action: core.fail
    input: {reason: "/var on {{ ctx.host }} is read-only"}
"""

RULES = [
    {"name": "disk-full", "on": {"source": "webhook", "topic": "disk/{host}"},
     "if": "event.used > 0.9", "key": "{{ vars.host }}", "throttle": {"once_within": "10m"},
     "run": {"workflow": "term.clean", "input": {"host": "{{ vars.host }}"}}},
    {"name": "read-only", "on": {"source": "webhook", "topic": "ro/{host}"},
     "key": "{{ vars.host }}",
     "run": {"workflow": "term.broken", "input": {"host": "{{ vars.host }}"}}},
    {"name": "gated", "on": {"source": "webhook", "topic": "gate/{host}"},
     "key": "{{ vars.host }}", "mode": "approval", "approval": {"within": "1h"},
     "run": {"action": "core.noop", "input": {"host": "{{ vars.host }}"}}},
]


def terminal_config(config: Config) -> None:
    """The webhook source, the three rules, the ``term`` pack and two tokens (files)."""
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.rules = {"rules.yaml": RULES}
    config.add_pack("term", {
        "pack.yaml": "name: term\nversion: 0.0.1\ndescription: workflows of this test\n",
        "workflows/clean.yaml": CLEAN, "workflows/inner.yaml": INNER,
        "workflows/broken.yaml": BROKEN})
    for name, token in (("operator", OPERATOR), ("viewer", VIEWER)):
        (config.root / name).write_text(token)
    config.extra = {"api": {"auth": {"tokens": [
        {"name": "oncall-alice", "role": "operator", "token": f"file:{config.root / 'operator'}"},
        {"name": "dash", "role": "viewer", "token": f"file:{config.root / 'viewer'}"}]}}}


async def loopd(*args: str, url: str, token: str | None = None, cwd: Path | None = None
                ) -> tuple[int, str, str]:
    """The real ``loopd`` console script; (exit code, stdout, stderr). ``token`` goes in
    LOOPD_TOKEN, never on the command line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPD_")}
    env |= {"LOOPD_URL": url, "NO_COLOR": "1"} | ({"LOOPD_TOKEN": token} if token else {})
    proc = await asyncio.create_subprocess_exec(
        str(LOOPD), *args, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def post(daemon: LoopdProcess, topic: str, **data: Any) -> None:
    await daemon.post("/v1/events", {"topic": topic, "data": data})


async def started(config: Config, loopd_factory: Factory) -> LoopdProcess:
    terminal_config(config)
    daemon = loopd_factory(config, token=OPERATOR)
    await daemon.start()
    return daemon


async def test_runs_and_show_tell_each_runs_story_with_times(
        config: Config, loopd_factory: Factory) -> None:
    """`loopd runs` lists runs with full ids (filtered by rule and status) and `loopd show`
    tells a run's story: trigger, its decisions (a throttled event), each step with its
    transition, the confirmation's evidence, the sub-workflow's run, the outcome; a failed
    step's error; `--json` prints the API's own answer."""
    daemon = await started(config, loopd_factory)
    await post(daemon, "disk/web-1", used=0.95)
    (run,) = await daemon.wait_runs(1, status="waiting")
    await post(daemon, "disk/web-1", used=0.2)
    await daemon.wait_run(run["id"], lambda r: r["status"] == "succeeded", what="fixed")
    await post(daemon, "disk/web-1", used=0.97)  # after the run: throttled
    await post(daemon, "ro/db-1")
    (broken,) = await daemon.wait_runs(1, status="failed")

    code, out, err = await loopd("runs", url=daemon.url, token=OPERATOR)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["RUN", "STATUS", "OUTCOME", "RULE", "KEY", "RUNS", "CREATED",
                                "TOOK"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {run["id"], broken["id"]}  # full ids, no sub-workflow run
    assert rows[run["id"]][1:6] == ["succeeded", "fixed", "disk-full", "web-1", "term.clean"]
    assert rows[broken["id"]][1:6] == ["failed", "failed", "read-only", "db-1", "term.broken"]
    code, out, _ = await loopd("runs", "--rule", "read-only", url=daemon.url, token=OPERATOR)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == [broken["id"]]
    # by status, sub-workflow runs are listed too (one waiting for approval must be found)
    code, out, _ = await loopd("runs", "--status", "succeeded", url=daemon.url, token=OPERATOR)
    assert code == 0 and sorted(line.split()[0] for line in out.splitlines()[1:]) == [
        run["id"], f"{run['id']}/inner"]

    code, out, err = await loopd("show", run["id"], url=daemon.url, token=OPERATOR)
    assert (code, err) == (0, "")
    story = out.splitlines()
    assert story[0] == f"run {run['id']}  workflow term.clean"
    assert story[1] == "  succeeded, outcome fixed"
    assert story[2].startswith("  rule disk-full, key web-1, incident ")
    assert story[3].startswith("  created 20") and "(took " in story[3]
    assert any(line.startswith("trigger  ") and "webhook  disk/web-1" in line for line in story)
    decided = story[story.index(next(s for s in story if s.startswith("decisions ("))):]
    assert any("run_created" in line for line in decided)
    assert any("suppressed  throttled: once within 600s" in line for line in decided)
    steps = [line.split() for line in story if " attempt " in line and "| " not in line]
    assert [(s[1], s[2], s[5]) for s in steps] == [
        ("clean", "core.noop", "succeeded"), ("inner", "term.inner", "succeeded"),
        ("verify", "confirm", "succeeded"), ("done", "-", "succeeded")]
    assert "-> inner (when succeeded)" in out and "-> done (when succeeded)" in out
    assert any("evidence for: " in line and "webhook  disk/web-1" in line and '"used":0.2' in line
               for line in story)
    sub = [line for line in story if line.lstrip().startswith("| ")]
    assert sub[0].strip() == f"| run {run['id']}/inner  workflow term.inner"
    assert any("note" in line and "core.log" in line for line in sub)
    assert story[-1].startswith("outcome fixed (run succeeded) after ")

    code, out, _ = await loopd("show", broken["id"], url=daemon.url, token=OPERATOR)
    assert code == 0
    assert "             error: core.fail: /var on db-1 is read-only" in out.splitlines()
    code, out, _ = await loopd("show", run["id"], "--json", url=daemon.url, token=OPERATOR)
    assert code == 0 and orjson.loads(out) == await daemon.run(run["id"])


async def test_approve_and_reject_act_on_waiting_runs_and_refusals_print_the_apis_message(
        config: Config, loopd_factory: Factory) -> None:
    """`loopd approve` (token from LOOPD_TOKEN) lets a gated run act and `loopd reject
    --reason` (token from --token-file) stops one, each recorded with the token's name;
    approving again is the API's 409, a viewer's token its 403, none its 401 with a hint:
    exit 1, and no token is ever printed."""
    daemon = await started(config, loopd_factory)
    await post(daemon, "gate/web-1")
    await post(daemon, "gate/web-2")
    waiting = {r["key"]: r["id"] for r in await daemon.wait_runs(2, status="awaiting_approval")}
    first, second = waiting["web-1"], waiting["web-2"]
    outputs = []

    code, out, err = await loopd("approve", first, url=daemon.url, token=OPERATOR)
    outputs += [out, err]
    assert (code, err) == (0, "") and out.startswith(f"run {first} approved")
    await daemon.wait_run(first, lambda r: r["status"] == "succeeded", what="approved run")
    code, out, err = await loopd("reject", second, "--reason", "not during the sale",
                                 "--token-file", str(config.root / "operator"), url=daemon.url)
    outputs += [out, err]
    assert (code, err) == (0, "") and out.startswith(f"run {second} rejected")
    story = await daemon.wait_run(second, lambda r: r["status"] == "rejected", what="rejected")
    assert [(i["action"], i["by"], i["reason"]) for i in story["interventions"]] == [
        ("reject", "oncall-alice", "not during the sale")]
    code, out, _ = await loopd("show", second, url=daemon.url, token=OPERATOR)
    assert "interventions" in out.splitlines()
    assert any("reject by oncall-alice (operator): not during the sale" in line
               for line in out.splitlines())

    code, out, err = await loopd("approve", first, url=daemon.url, token=OPERATOR)
    outputs += [out, err]
    assert code == 1 and out == ""
    assert err.startswith(f"loopd: {daemon.url}: 409: run {first} ")
    await post(daemon, "gate/web-3")
    third = next(r["id"] for r in await daemon.wait_runs(1, status="awaiting_approval"))
    code, out, err = await loopd("approve", third, url=daemon.url, token=VIEWER)
    outputs += [out, err]
    assert code == 1 and "403: token 'dash' has role viewer" in err
    code, out, err = await loopd("approve", third, url=daemon.url)
    outputs += [out, err]
    assert code == 1 and "401: authentication required" in err
    assert "hint: give a token: the environment's LOOPD_TOKEN or --token-file FILE" in err
    assert (await daemon.run(third))["status"] == "awaiting_approval"
    for text in outputs:
        assert OPERATOR not in text and VIEWER not in text


async def test_a_daemon_that_is_not_there_is_one_line_naming_the_url_and_exit_2(
        tmp_path: Path) -> None:
    """Nothing listening at --url: one line naming that URL with a hint, exit 2; so is a
    URL holding a password, a token a header cannot carry (neither shown) and a token
    file that cannot be read."""
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await loopd("runs", url=url)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"loopd: cannot reach the loopd API at {url}: [Errno 111] Connection refused",
        "  hint: is the daemon running (loopd run, loopd demo)? Another address: --url URL "
        "or LOOPD_URL"]
    code, _, err = await loopd("runs", "--url", url.replace("//", "//me:hunter2@"), url=url)
    assert code == 2 and "no user or password in the URL" in err and "hunter2" not in err
    code, _, err = await loopd("runs", url=url, token="not a token\x7f")
    assert code == 2 and "LOOPD_TOKEN holds a character a token cannot have" in err
    assert "not a token" not in err
    code, _, err = await loopd("show", "r1", "--token-file", str(tmp_path / "nope"), url=url)
    assert code == 2 and err.startswith(f"loopd: cannot read the token file {tmp_path / 'nope'}")


async def test_a_run_that_does_not_exist_is_the_apis_404(
        config: Config, loopd_factory: Factory) -> None:
    """`loopd show` of an unknown run prints the API's message and exits 1."""
    daemon = await started(config, loopd_factory)
    code, out, err = await loopd("show", "no-such-run", url=daemon.url, token=OPERATOR)
    assert (code, out) == (1, "")
    assert err.strip() == f"loopd: {daemon.url}: 404: no run 'no-such-run'"


async def test_decisions_lists_why_runs_started_or_not_newest_first(
        config: Config, loopd_factory: Factory) -> None:
    """`loopd decisions --rule R` lists the rule's decisions newest first, a suppression with
    its guard and reason; `--outcome suppressed --limit 1` pages, naming the next page."""
    daemon = await started(config, loopd_factory)
    status, _ = await daemon.request("GET", "/v1/decisions")
    if status == 404:
        pytest.skip("this daemon has no GET /v1/decisions yet")
    await post(daemon, "ro/db-1")
    await daemon.wait_runs(1, status="failed")
    await post(daemon, "disk/web-1", used=0.95)
    (run,) = await daemon.wait_runs(1, status="waiting")
    await post(daemon, "disk/web-1", used=0.2)
    await daemon.wait_run(run["id"], lambda r: r["status"] == "succeeded", what="fixed")
    await post(daemon, "disk/web-1", used=0.97)
    await post(daemon, "disk/web-1", used=0.98)

    async def rows(*args: str) -> list[list[str]]:
        code, out, err = await loopd("decisions", *args, url=daemon.url, token=OPERATOR)
        assert (code, err) == (0, ""), err
        return [line.split(maxsplit=6) for line in out.splitlines()]

    table = await rows("--rule", "disk-full")
    assert table[0] == ["TIME", "RULE", "KEY", "OUTCOME", "GUARD", "RUN", "REASON"]
    outcomes = [(r[3], r[4]) for r in table[1:]]
    assert [o for o, _ in outcomes[:2]] == ["suppressed", "suppressed"]
    assert all(guard.startswith("throttle") for _, guard in outcomes[:2])
    assert ("run_created", "-") in outcomes
    assert all(r[1] == "disk-full" for r in table[1:])
    assert table[1][6].startswith("throttled: once within 600s")
    page = await rows("--rule", "disk-full", "--outcome", "suppressed", "--limit", "1")
    assert len(page) == 3 and page[-1][0] == "(older:"


async def test_a_redirect_is_refused_and_the_token_never_follows_it() -> None:
    """An address that redirects elsewhere (a misconfigured proxy, a hostile one): the CLI
    does not follow, says why, and the other server never sees the token."""
    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"runs": []})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://localhost:{other_port}/v1/runs")

    other_port = free_port()
    runners = []
    for handler, port in ((elsewhere, other_port), (redirect, free_port())):
        app = web.Application()
        app.router.add_get("/v1/runs", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append((runner, port))
    try:
        url = f"http://127.0.0.1:{runners[1][1]}"
        code, out, err = await loopd("runs", url=url, token=OPERATOR)
        assert (code, out) == (2, "")
        assert "answered 302, a redirect: not followed" in err and OPERATOR not in err
        assert seen == []
    finally:
        for runner, _ in runners:
            await runner.cleanup()
