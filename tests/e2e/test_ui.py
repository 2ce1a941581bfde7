"""The web UI in a real headless browser (Playwright with Debian's chromium) against a real
``loopd run`` subprocess: sign-in, every page with the daemon's data, an approval given
from the page that then acts, a suppression's reason found, no secret in any page, a
viewer who cannot approve, and the incident list updating live.

Under ``CI=true`` a missing browser fails these tests (``servers.require``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.e2e.conftest import Factory
from tests.e2e.daemon import Config, LoopdProcess
from tests.servers import require, wait_until
from tests.servers.ssh import PASSWORD, USER, SshServer

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("LOOPD_TEST_CHROMIUM", "/usr/bin/chromium")
HAVE_CHROMIUM = Path(CHROMIUM).exists()  # Debian's; never a browser downloaded by playwright
VIEWER = "viewer-token-0123456789abcdef"
OPERATOR = "operator-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
SECRET = "s3cr3t-api-key-do-not-show-0042"
UI_WAIT = 15_000  # ms: how long an expectation waits for the page (a slow machine)

PACK = """
name: vault
version: 1.0.0
actions:
  use:
    runner: python
    input:
      api_key: {type: string, secret: true}
      note: {type: string}
"""
ACTIONS = '''
async def use(input, ctx):
    return {"done": input["note"], "echo": input["api_key"]}
'''
RULES: list[dict[str, Any]] = [
    {"name": "restart-after-approval", "description": "A service down is restarted once a "
     "person approves", "on": {"source": "webhook", "topic": "svc/{host}"},
     "if": "event.status == 'down'", "key": "{{ vars.host }}", "mode": "approval",
     "run": {"action": "vault.use",
             "input": {"api_key": "env:UI_SECRET", "note": "restart {{ vars.host }}"}}},
    {"name": "cpu-held", "on": {"source": "webhook", "topic": "cpu/{host}"},
     "if": "event.value > 90", "key": "{{ vars.host }}", "for": "1h",
     "run": {"action": "core.log", "input": {"message": "cpu on {{ key }}"}}},
]


def _config(config: Config, *, auth: bool) -> dict[str, str]:
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.rules = {"ui.yaml": RULES}
    config.add_pack("vault", {"pack.yaml": PACK, "actions.py": ACTIONS})
    if auth:
        config.extra["api"] = {"auth": {"open": ["healthz", "readyz"], "tokens": [
            {"name": "alice", "role": "viewer", "token": "env:UI_VIEWER"},
            {"name": "ops", "role": "operator", "token": "env:UI_OPERATOR"},
            {"name": "harness", "role": "admin", "token": "env:UI_ADMIN"}]}}
    config.write()
    return {"UI_VIEWER": VIEWER, "UI_OPERATOR": OPERATOR, "UI_ADMIN": ADMIN,
            "UI_SECRET": SECRET}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless chromium (Debian's); closed at teardown."""
    require(HAVE_CHROMIUM, f"chromium at {CHROMIUM} (apt-get install chromium)")
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


async def _faults(daemon: LoopdProcess, host: str = "web-1") -> str:
    """A service down with a secret in its event (waiting for approval) and a cpu event held
    by its rule's ``for:``; the id of the run waiting."""
    await daemon.post("/v1/events", {"topic": f"svc/{host}",
                                     "data": {"status": "down", "api_key": SECRET}})
    await daemon.post("/v1/events", {"topic": f"cpu/{host}", "data": {"value": 97}})
    (run,) = await daemon.wait_runs(1, status="awaiting_approval")
    return str(run["id"])


async def _sign_in(page: Page, url: str, token: str) -> None:
    await page.goto(url + "/")
    assert page.url.endswith("/signin"), "a page without a session goes to the sign-in page"
    await page.fill("#token", token)
    await page.click("form.signin button")


async def _no_secret(page: Page) -> str:
    html = str(await page.content())
    for secret in (SECRET, VIEWER, OPERATOR, ADMIN):
        assert secret not in html, f"a secret is in {page.url}"
    return html


async def test_an_operator_signs_in_sees_every_page_and_approves_a_run_that_then_acts(
        config: Config, loopd_factory: Factory, browser: Browser) -> None:
    """An operator signs in with a token (a wrong one is refused with a message), every page
    shows the daemon's data with no secret in it, the suppressed cpu event's reason is
    found in the decisions explorer, and Approve on the approvals page makes the run act;
    the audit trail and the run name the approver."""
    env = _config(config, auth=True)
    daemon = loopd_factory(config, env, token=ADMIN)
    await daemon.start()
    run_id = await _faults(daemon)
    page = await browser.new_page()

    await _sign_in(page, daemon.url, "not-a-token-of-this-loopd")
    assert "not one of this loopd's API tokens" in await page.inner_text("main")
    # counted like a wrong Authorization header: the same failure throttle and metric
    assert await daemon.metric("loopd_api_refused_total", route="ui_signin_post",
                               reason="unauthenticated") == 1
    await page.fill("#token", OPERATOR)
    await page.click("form.signin button")
    await page.wait_for_url(daemon.url + "/")
    cookies = await page.context.cookies()
    (session,) = [c for c in cookies if c["name"] == "loopd_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert OPERATOR not in session["value"]

    incidents = await page.inner_text("#incidents")
    assert "restart-after-approval" in incidents and "web-1" in incidents
    assert "awaiting_approval" in incidents
    await _no_secret(page)

    # why did the cpu rule not run? the explorer says: its for: is holding
    await page.click("nav >> text=Decisions")
    await page.select_option("select[name=outcome]", "suppressed")
    await page.click("form.filters button")
    row = page.locator("tr.decision.suppressed", has_text="cpu-held")
    await row.wait_for(timeout=UI_WAIT)
    assert await row.locator("td.guard").inner_text() == "for"
    assert "for: held 0s of 3600s" in await row.locator("td.reason").inner_text()
    await _no_secret(page)

    for nav, text in (("Rules", "cpu-held"), ("Guards", "Circuit breakers"),
                      ("Sources", "webhook"), ("Approvals", run_id)):
        await page.click(f"nav >> text={nav}")
        assert text in await page.inner_text("main"), f"{nav} page"
        await _no_secret(page)

    await page.goto(daemon.url + "/rules")
    held = await page.inner_text("#rule-cpu-held")
    assert "for 1" in held, "suppressions per guard count the pending for:"
    await page.goto(daemon.url + "/approvals")
    await page.click(f"tr[data-run='{run_id}'] button.approve")
    story = await daemon.wait_run(run_id, lambda r: r["status"] == "succeeded",
                                  what="the approved run succeeded")
    assert story["interventions"][0]["by"] == "ops"
    await page.locator("p.empty", has_text="No run is waiting").wait_for(timeout=UI_WAIT)

    await page.goto(f"{daemon.url}/runs/{run_id}")
    trace = await page.inner_text("#trace")
    assert "restart web-1" in trace and "succeeded" in trace
    assert "approve by ops (operator)" in trace
    assert "approved by\nops" in await page.inner_text("#trace dl.facts")  # the run's own
    assert "down" in trace  # the trigger event's data
    html = await _no_secret(page)
    assert "***" in html or "MASK" in html or "redacted" in html.lower()


async def test_a_viewer_sees_approvals_but_cannot_approve(
        config: Config, loopd_factory: Factory, browser: Browser) -> None:
    """A viewer's approvals page has no buttons; a POST made from the page anyway is 403
    (with and without the CSRF header), the refusal is audited and the run still waits."""
    env = _config(config, auth=True)
    daemon = loopd_factory(config, env, token=ADMIN)
    await daemon.start()
    run_id = await _faults(daemon)
    page = await browser.new_page()
    await _sign_in(page, daemon.url, VIEWER)
    await page.wait_for_url(daemon.url + "/")
    await page.goto(daemon.url + "/approvals")
    main = await page.inner_text("main")
    assert run_id in main and "need an operator token" in main
    assert await page.locator("button.approve").count() == 0

    post = """async ([path, csrf]) => {
        const headers = csrf ? {"X-CSRF-Token": csrf} : {};
        const r = await fetch(path, {method: "POST", headers});
        return [r.status, await r.text()];
    }"""
    hx = await page.get_attribute("body", "hx-headers")
    assert hx is not None
    csrf = hx.split('"')[3]
    status, text = await page.evaluate(post, [f"/v1/runs/{run_id}/approve", csrf])
    assert status == 403 and "needs operator" in text
    status, text = await page.evaluate(post, [f"/v1/runs/{run_id}/approve", ""])
    assert status == 403 and "X-CSRF-Token" in text
    trail = await daemon.get("/v1/audit?who=alice")
    assert [r["status"] for r in trail["audit"]] == [403]
    assert (await daemon.run(run_id))["status"] == "awaiting_approval"


async def test_the_incident_list_updates_live_and_says_when_it_is_disconnected(
        config: Config, loopd_factory: Factory, browser: Browser) -> None:
    """With the incidents page open, a new incident appears without a reload while the page
    says "live"; when the daemon stops (cleanly, the stream open) it says "disconnected"."""
    env = _config(config, auth=False)
    daemon = loopd_factory(config, env)
    await daemon.start()
    page = await browser.new_page()
    await page.goto(daemon.url + "/")
    badge = page.locator(".live")
    await page.locator(".live.on").wait_for(timeout=UI_WAIT)
    assert await badge.inner_text() == "live"
    await page.evaluate("window.loopdMarker = 42")
    assert "web-7" not in await page.inner_text("#incidents")

    await daemon.post("/v1/events", {"topic": "svc/web-7", "data": {"status": "down"}})
    await page.locator("#incidents tr", has_text="web-7").wait_for(timeout=UI_WAIT)
    assert await page.evaluate("window.loopdMarker") == 42, "the page was not reloaded"

    # a running trace is live too: approved elsewhere (the API), it shows the run act
    (run,) = await daemon.wait_runs(1, status="awaiting_approval")
    await page.goto(f"{daemon.url}/runs/{run['id']}")
    await page.locator(".live.on").wait_for(timeout=UI_WAIT)
    await page.evaluate("window.loopdMarker = 43")
    assert "awaiting_approval" in await page.inner_text("#trace")
    await daemon.post(f"/v1/runs/{run['id']}/approve", expect=202)
    await page.locator("#trace dl.facts", has_text="succeeded").wait_for(timeout=UI_WAIT)
    assert await page.evaluate("window.loopdMarker") == 43, "the page was not reloaded"

    await page.goto(daemon.url + "/")
    await page.locator(".live.on").wait_for(timeout=UI_WAIT)
    await daemon.stop()  # asserts a clean exit 0 with the stream open
    await page.locator(".live.off").wait_for(timeout=UI_WAIT)
    assert await badge.inner_text() == "disconnected"


async def test_every_page_reads_without_javascript(
        config: Config, loopd_factory: Factory, browser: Browser) -> None:
    """With JavaScript off, each page still shows its data, and the decisions filter (a
    plain form) still finds the suppressed event."""
    env = _config(config, auth=False)
    daemon = loopd_factory(config, env)
    await daemon.start()
    run_id = await _faults(daemon)
    context = await browser.new_context(java_script_enabled=False)
    page = await context.new_page()
    for path, text in (("/", "web-1"), (f"/runs/{run_id}", "restart-after-approval"),
                       ("/approvals", run_id), ("/rules", "cpu-held"),
                       ("/guards", "Budgets"), ("/sources", "webhook")):
        answer = await page.goto(daemon.url + path)
        assert answer is not None and answer.status == 200, path
        assert text in await page.inner_text("main"), path
        await _no_secret(page)
    await page.goto(daemon.url + "/decisions")
    await page.fill("input[name=key]", "web-1")
    await page.select_option("select[name=rule]", "cpu-held")
    await page.click("form.filters button")
    assert "rule=cpu-held" in page.url and "key=web-1" in page.url
    assert "for: held 0s of 3600s" in await page.inner_text("#decisions")
    await context.close()


async def test_a_run_page_of_no_run_is_404_and_bad_filters_are_named(
        config: Config, loopd_factory: Factory, browser: Browser) -> None:
    """An unknown run id is a 404 page saying so; a since= that is no time or a before=
    that is no seq is a 400 page naming the parameter; the daemon keeps serving."""
    env = _config(config, auth=False)
    daemon = loopd_factory(config, env)
    await daemon.start()
    page = await browser.new_page()
    answer = await page.goto(daemon.url + "/runs/no-such-run")
    assert answer is not None and answer.status == 404
    assert "There is no run 'no-such-run'" in await page.inner_text("main")
    answer = await page.goto(daemon.url + "/decisions?since=yesterday-ish")
    assert answer is not None and answer.status == 400
    assert "since:" in await page.inner_text("[role=alert]")
    for before in ("99999999999999999999", "0", "last"):  # past 64 bits was a 500
        answer = await page.goto(daemon.url + f"/decisions?before={before}")
        assert answer is not None and answer.status == 400, before
        assert "must be a decision's seq" in await page.inner_text("[role=alert]")

    async def healthy() -> bool:
        status, _ = await daemon.request("GET", "/healthz")
        return status == 200

    await wait_until(healthy, what="daemon still serving")


async def test_a_session_from_one_replica_is_good_on_another(
        tmp_path: Path, loopd_factory: Factory, browser: Browser) -> None:
    """Two daemons with the same tokens and nothing else shared (behind one load balancer):
    a browser signed in on one is signed in on the other, and its CSRF value is accepted
    there; signing out ends it."""
    daemons = []
    for name in ("a", "b"):
        config = Config(root=tmp_path / name)
        daemons.append(loopd_factory(config, _config(config, auth=True), token=ADMIN))
    a, b = daemons
    await a.start()
    await b.start()
    page = await browser.new_page()
    await _sign_in(page, a.url, OPERATOR)
    await page.wait_for_url(a.url + "/")
    # cookies are per host, not per port: the browser sends a's cookie to b
    answer = await page.goto(b.url + "/guards")
    assert answer is not None and answer.status == 200 and page.url == b.url + "/guards"
    assert "ops" in await page.inner_text("header")
    hx = await page.get_attribute("body", "hx-headers")
    assert hx is not None
    status = await page.evaluate("""async (csrf) => (await fetch("/v1/guards/breakers/x/close",
        {method: "POST", headers: {"X-CSRF-Token": csrf}})).status""", hx.split('"')[3])
    assert status == 404  # past the gate and the role: there is no breaker x
    await page.click("form.who button")
    await page.wait_for_url(b.url + "/signin")
    await page.goto(a.url + "/")
    assert page.url == a.url + "/signin"


async def test_an_open_breaker_is_explained_and_closed_from_the_guards_page(
        config: Config, loopd_factory: Factory, browser: Browser) -> None:
    """Two failed runs open a rule's breaker: the guards page shows it with its reason, the
    next event's suppression names the breaker in the decisions explorer, and Close on the
    guards page closes it (audited as close_breaker)."""
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.rules = {"broken.yaml": [{
        "name": "broken-fix", "on": {"source": "webhook", "topic": "svc/{host}"},
        "key": "{{ vars.host }}",
        "guards": {"breaker": {"failures": 2, "within": "1h", "cool_off": "1h"},
                   "escalate": {"action": "core.log",
                                "input": {"message": "{{ rule }}: {{ reason }}"}}},
        "run": {"action": "core.fail", "input": {"reason": "still down"}}}]}
    config.write()
    daemon = loopd_factory(config)
    await daemon.start()
    for host in ("web-1", "web-2"):
        await daemon.post("/v1/events", {"topic": f"svc/{host}", "data": {}})
    await daemon.wait_runs(2, status="failed")

    async def breaker_open() -> bool:
        return bool((await daemon.get("/v1/guards"))["breakers"])

    await wait_until(breaker_open, what="the breaker opened")
    await daemon.post("/v1/events", {"topic": "svc/web-3", "data": {}})
    page = await browser.new_page()
    await page.goto(daemon.url + "/decisions?outcome=suppressed")
    row = page.locator("tr.decision.suppressed", has_text="web-3")
    await row.wait_for(timeout=UI_WAIT)
    assert await row.locator("td.guard").inner_text() == "breaker"

    await page.goto(daemon.url + "/guards")
    breakers = await page.inner_text("#breakers")
    assert "broken-fix" in breakers and "open" in breakers
    await page.click("#breakers button")
    await page.locator("p.empty", has_text="No breaker is open").wait_for(timeout=UI_WAIT)
    assert (await daemon.get("/v1/guards"))["breakers"] == []
    trail = await daemon.get("/v1/audit?action=close_breaker")
    assert [(r["target"], r["status"]) for r in trail["audit"]] == [
        ("broken-fix", 200), ("broken-fix", None)]  # newest first: its result, its request


TREE_CHILD = """
input: {host: {type: string, required: true}}
tasks:
  ask: {approval: {within: 5m, message: "look at {{ ctx.host }}?"}, next: look}
  look: {action: core.noop, input: {value: "looked at {{ ctx.host }}"}, next: done}
  done: {succeed: done}
"""
TREE_PARENT = """
input: {host: {type: string, required: true}}
tasks:
  check:
    workflow: tree.child
    input: {host: "{{ ctx.host }}"}
"""


async def test_a_sub_workflow_run_is_linked_both_ways(
        config: Config, loopd_factory: Factory, browser: Browser) -> None:
    """A sub-workflow's approval (run id ``parent/task``) is answered from the approvals
    page; the parent run's trace links the child run of its workflow task; the child's
    trace shows its own steps and links back to the parent."""
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.add_pack("tree", {"pack.yaml": "name: tree\nversion: 1.0.0\n",
                             "workflows/child.yaml": TREE_CHILD,
                             "workflows/parent.yaml": TREE_PARENT})
    config.rules = {"tree.yaml": [{"name": "tree", "on": {"source": "webhook",
                                                          "topic": "svc/{host}"},
                                   "key": "{{ vars.host }}",
                                   "run": {"workflow": "tree.parent",
                                           "input": {"host": "{{ vars.host }}"}}}]}
    config.write()
    daemon = loopd_factory(config)
    await daemon.start()
    await daemon.post("/v1/events", {"topic": "svc/web-1", "data": {"status": "down"}})
    (asking,) = await daemon.wait_runs(1, status="awaiting_approval")
    assert asking["id"].endswith("/check")
    page = await browser.new_page()
    await page.goto(daemon.url + "/approvals")
    await page.click(f"tr[data-run='{asking['id']}'] button.approve")
    runs = await daemon.wait_runs(2, status="succeeded")
    (run,) = [r for r in runs if "/" not in r["id"]]
    await page.goto(f"{daemon.url}/runs/{run['id']}")
    await page.click(f"a[href='/runs/{run['id']}/check']")
    await page.wait_for_url(f"{daemon.url}/runs/{run['id']}/check")
    child = await page.inner_text("#trace")
    assert "tree.child" in child and "looked at web-1" in child
    await page.click(f"dl.facts a[href='/runs/{run['id']}']")
    await page.wait_for_url(f"{daemon.url}/runs/{run['id']}")


SSH_PACK = """
name: box
version: 1.0.0
actions:
  flaky:
    runner: ssh
    input: {host: {type: string, required: true}}
    command: "exit 3"
"""


async def test_a_failed_ssh_step_shows_its_exit_status_and_output(
        config: Config, loopd_factory: Factory, browser: Browser,
        ssh_server: SshServer) -> None:
    """A remediation over SSH that exits 3: its trace shows the failed step with the host,
    the command, the exit status and the last line it printed; the SSH password is in no
    page."""
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.entities = {"web-1": ssh_server.entity()}
    config.credentials = {"ssh-ops": {"username": USER, "password": "env:UI_SSH_PASSWORD"}}
    config.add_pack("box", {"pack.yaml": SSH_PACK})
    config.rules = {"ssh.yaml": [{"name": "ssh-fix", "on": {"source": "webhook",
                                                           "topic": "svc/{host}"},
                                  "key": "{{ vars.host }}",
                                  "run": {"action": "box.flaky",
                                          "input": {"host": "{{ vars.host }}"}}}]}
    config.write()
    daemon = loopd_factory(config, {"UI_SSH_PASSWORD": PASSWORD})
    await daemon.start()
    await daemon.post("/v1/events", {"topic": "svc/web-1", "data": {"status": "down"}})
    (run,) = await daemon.wait_runs(1, status="failed")
    page = await browser.new_page()
    await page.goto(f"{daemon.url}/runs/{run['id']}")
    step = await page.inner_text("#trace li.step")
    assert "box.flaky" in step and "failed" in step
    error = await page.inner_text("#trace li.step pre.error")
    assert "ssh web-1: `exit 3` exited 3: exit 3 requested" in error
    output = await page.inner_text("#trace li.step .io")
    assert '"exit_status": 3' in output and "exit 3 requested" in output
    assert PASSWORD not in await page.content()
