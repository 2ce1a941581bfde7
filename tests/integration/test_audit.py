"""The audit trail of a real daemon's API on loopback: what is recorded, in which order,
how it is read, and who the run's story names.

Most tests talk to the daemon's own API (auth off: the caller is ``anonymous``). Those
that need named callers of different roles serve the same daemon's ``Control`` through
``build_app`` with ``token_auth`` inserted where the auth middleware goes (between
``audit.refusals`` and ``audit.trail``): it stands in for loopd.api.auth, which puts the
principal on the request and refuses a weaker role with 403.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from loopd.api import audit
from loopd.api.app import ApiContext, build_app, error
from loopd.api.principal import ROUTE_ROLES, Principal, Role, set_principal
from loopd.store.sqlite import SqliteStore
from loopd.units import parse_time
from tests.integration.test_api import REPO, Api, sample, serving
from tests.servers import wait_until
from tests.workflow_harness import open_harness

APPROVAL_RULES = """\
rules:
  - name: approve-me
    on: {source: webhook, topic: host}
    mode: approval
    approval: {within: 1h}
    run: {action: core.noop, input: {host: "{{ key }}"}}
"""

APPROVAL_TASK = """
    input: [host]
    tasks:
      ask:
        approval: {within: 5s, message: "restart nginx on {{ ctx.host }}?"}
        next: go
      go: {action: t.notify, input: {message: "go {{ ctx.host }}"}}
"""

CONFIG = """\
listen: 127.0.0.1:0
sources:
  - {name: webhook, type: webhook}
rules: [rules]
packs: [packs]
store: {path: var/loopd.db}
"""

SECRET = "hunter2-AUDIT-5ecret"

TOKENS = {
    "alice-token": Principal("oncall-alice", Role.OPERATOR),
    "bob-token": Principal("oncall-bob", Role.OPERATOR),
    "vic-token": Principal("viewer-vic", Role.VIEWER),
}


@web.middleware
async def token_auth(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
    """A bearer token names the principal; a role weaker than the route's is a 403."""
    who = TOKENS.get(request.headers.get("Authorization", "").removeprefix("Bearer "))
    if who is None:
        return error(401, "no valid token")
    set_principal(request, who)
    route = request.match_info.route.name or ""
    needed = ROUTE_ROLES[route]
    if not who.may(needed):
        return error(403, f"{who.name} ({who.role.label}) may not {route}: "
                          f"needs {needed.label}")
    return await handler(request)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "approval.yaml").write_text(APPROVAL_RULES)
    shutil.copytree(REPO / "packs" / "core", tmp_path / "packs" / "core")
    (tmp_path / "loopd.yaml").write_text(CONFIG)
    return tmp_path


@pytest.fixture
async def api(site: Path) -> AsyncIterator[Api]:
    async with serving(site / "loopd.yaml", site / "rules") as api:
        yield api


@contextlib.asynccontextmanager
async def with_tokens(api: Api) -> AsyncIterator[Callable[[str], aiohttp.ClientSession]]:
    """The daemon's Control served with ``token_auth``; yields a client per token."""
    daemon = api.daemon
    app = build_app(ApiContext(control=daemon.control, emit=daemon.engine.emit,
                               push_sources={"webhook": ("webhook", 1024 * 1024)}))
    app.middlewares.insert(app.middlewares.index(audit.trail), token_auth)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sessions: list[aiohttp.ClientSession] = []

    def client(token: str) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}",
                                        headers={"Authorization": f"Bearer {token}"})
        sessions.append(session)
        return session

    try:
        yield client
    finally:
        for session in sessions:
            await session.close()
        await runner.cleanup()


async def call(http: aiohttp.ClientSession, method: str, path: str) -> tuple[int, Any]:
    async with http.request(method, path) as resp:
        return resp.status, await resp.json()


async def awaiting(api: Api, key: str) -> str:
    """Post a host event; the id of its run once it awaits approval."""
    status, _ = await api.post("/v1/events", {"id": f"ev-{key}", "topic": "host", "key": key,
                                              "data": {}})
    assert status == 200

    async def waiting() -> bool:
        runs = [r for r in await api.runs("approve-me") if r["key"] == key]
        return bool(runs) and runs[0]["status"] == "awaiting_approval"

    await wait_until(waiting, what=f"the run of {key} to await approval")
    return str(next(r["id"] for r in await api.runs("approve-me") if r["key"] == key))


async def trail(api: Api, query: str = "") -> list[dict[str, Any]]:
    status, body = await api.get(f"/v1/audit{query}")
    assert status == 200, body
    return list(body["audit"])


async def test_each_mutating_call_is_recorded_before_it_acts_and_with_its_result(
        api: Api) -> None:
    """Approve, cancel, close a breaker and reload each leave a ``requested`` record and a
    result record (status and outcome) with who, role, target, redacted parameters and the
    client address; reads and ingest leave none."""
    run_id = await awaiting(api, "web-1")
    assert await trail(api) == []  # the ingest call is not audited
    status, _ = await api.post(f"/v1/runs/{run_id}/approve?reason=go&password={SECRET}")
    assert status == 202
    assert (await api.post("/v1/runs/nope/cancel"))[0] == 404
    assert (await api.post("/v1/guards/breakers/nope/close"))[0] == 404
    assert (await api.post("/v1/reload"))[0] == 200
    await api.get("/v1/runs")
    records = await trail(api)
    assert [(r["action"], r["status"]) for r in records] == [
        ("reload", 200), ("reload", None), ("close_breaker", 404), ("close_breaker", None),
        ("cancel_run", 404), ("cancel_run", None), ("approve_run", 202), ("approve_run", None)]
    result, requested = records[-2], records[-1]
    assert result["request"] == requested["request"]
    assert result["seq"] > requested["seq"]
    assert requested["outcome"] == "requested"
    for r in (result, requested):
        assert (r["who"], r["role"], r["target"], r["client"]) == (
            "anonymous", "admin", run_id, "127.0.0.1")
        assert r["params"] == {"reason": "go", "password": "***"}
    assert result["outcome"] == "Accepted"
    assert records[2]["target"] == "nope" and "no open circuit breaker" in records[2]["outcome"]
    assert records[1]["target"] is None
    with sqlite3.connect(api.daemon.config.store.path) as db:
        dump = "\n".join(db.iterdump())
    assert SECRET not in dump


async def test_the_audit_endpoint_filters_and_limits(api: Api) -> None:
    """GET /v1/audit filters by action, who, target and since (epoch or ISO 8601), is
    newest first, honours limit, and names a bad parameter in a 400."""
    first = await awaiting(api, "web-1")
    second = await awaiting(api, "web-2")
    before = time.time()
    await api.post(f"/v1/runs/{first}/reject?reason=no")
    await api.post(f"/v1/runs/{second}/approve")
    assert {r["action"] for r in await trail(api, "?action=reject_run")} == {"reject_run"}
    assert {r["target"] for r in await trail(api, f"?target={second}")} == {second}
    assert len(await trail(api, "?who=anonymous")) == 4
    assert await trail(api, "?who=mallory") == []
    assert len(await trail(api, f"?since={before - 1}")) == 4
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before + 3600))
    assert await trail(api, f"?since={iso}") == []
    (newest,) = await trail(api, "?limit=1")
    assert (newest["action"], newest["target"], newest["status"]) == (
        "approve_run", second, 202)
    status, body = await api.get("/v1/audit?since=yesterday")
    assert status == 400 and "since: bad time 'yesterday'" in body["error"]
    status, body = await api.get("/v1/audit?actor=x")
    assert status == 400 and "unknown parameter 'actor'" in body["error"]


async def test_the_audit_trail_survives_a_restart(site: Path) -> None:
    """Records written before a daemon restart are read back after it (SQLite store), and
    the new daemon's records follow them."""
    async with serving(site / "loopd.yaml", site / "rules") as api:
        run_id = await awaiting(api, "web-1")
        assert (await api.post(f"/v1/runs/{run_id}/approve?reason=before"))[0] == 202
    async with serving(site / "loopd.yaml", site / "rules") as api:
        assert (await api.post("/v1/reload"))[0] == 200
        records = await trail(api)
    assert [(r["action"], r["status"]) for r in records] == [
        ("reload", 200), ("reload", None), ("approve_run", 202), ("approve_run", None)]
    assert records[2]["params"] == {"reason": "before"}


async def test_a_call_that_cannot_be_audited_is_refused_and_not_done(api: Api) -> None:
    """While the store cannot write, approve answers 503 with Retry-After, the run still
    awaits approval and the failure is counted; once the store writes again the same call
    is audited and done."""
    run_id = await awaiting(api, "web-1")
    store = api.daemon.store
    assert isinstance(store, SqliteStore)
    await store.db.execute("PRAGMA query_only=ON")  # every write fails, as on a full disk
    try:
        async with api.http.post(f"/v1/runs/{run_id}/approve") as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "5"
            body = await resp.json()
        assert "audit trail cannot be written" in body["error"]
        assert "approve_run was not done" in body["error"]
        assert (await api.get(f"/v1/runs/{run_id}"))[1]["status"] == "awaiting_approval"
        assert sample("loopd_audit_write_failures_total", action="approve_run",
                      phase="before") == 1
    finally:
        await store.db.execute("PRAGMA query_only=OFF")
    assert (await api.post(f"/v1/runs/{run_id}/approve"))[0] == 202
    assert [r["status"] for r in await trail(api)] == [202, None]


async def test_a_403_for_a_too_weak_role_is_recorded(api: Api) -> None:
    """A viewer's approve is refused 403 before anything acts, and the refusal is in the
    trail with the viewer's name and role; the run still awaits approval."""
    run_id = await awaiting(api, "web-1")
    async with with_tokens(api) as client:
        status, body = await call(client("vic-token"), "POST", f"/v1/runs/{run_id}/approve")
        assert status == 403, body
        assert (await call(client("vic-token"), "GET", "/v1/runs"))[0] == 200
    (refused,) = await trail(api)
    assert (refused["who"], refused["role"], refused["action"], refused["target"],
            refused["status"]) == ("viewer-vic", "viewer", "approve_run", run_id, 403)
    assert "needs operator" in refused["outcome"]
    assert (await api.get(f"/v1/runs/{run_id}"))[1]["status"] == "awaiting_approval"


async def test_the_run_story_names_who_approved_rejected_and_cancelled(api: Api) -> None:
    """The run's own history names the principal (approved by, rejected by, cancelled
    by), and GET /v1/runs/{id} lists each intervention with who, role, reason and time."""
    approved, rejected, cancelled = (await awaiting(api, "web-1"), await awaiting(api, "web-2"),
                                     await awaiting(api, "web-3"))
    async with with_tokens(api) as client:
        alice, bob = client("alice-token"), client("bob-token")
        before = time.time()
        assert (await call(alice, "POST", f"/v1/runs/{approved}/approve?reason=go"))[0] == 202
        assert (await call(alice, "POST",
                           f"/v1/runs/{rejected}/reject?reason=not%20now"))[0] == 202
        assert (await call(bob, "POST", f"/v1/runs/{cancelled}/cancel"))[0] in (200, 202)
        await api.settled()
        story = (await api.get(f"/v1/runs/{approved}"))[1]
        assert story["status"] == "succeeded"
        assert story["context"]["approved"]["by"] == "oncall-alice"
        (seen,) = story["interventions"]
        assert (seen["action"], seen["by"], seen["role"], seen["reason"], seen["status"]) == (
            "approve", "oncall-alice", "operator", "go", 202)
        assert before - 0.001 <= parse_time(seen["at"]) <= time.time()  # to the millisecond
        story = (await api.get(f"/v1/runs/{rejected}"))[1]
        assert (story["status"], story["reason"]) == ("rejected",
                                                      "rejected by oncall-alice: not now")
        assert [(i["action"], i["by"]) for i in story["interventions"]] == [
            ("reject", "oncall-alice")]
        story = (await api.get(f"/v1/runs/{cancelled}"))[1]
        assert (story["status"], story["reason"]) == (
            "cancelled", "cancelled through the API by oncall-bob")
        assert [(i["action"], i["by"]) for i in story["interventions"]] == [
            ("cancel", "oncall-bob")]


async def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy(site: Path) -> None:
    """By default the client address is the peer's, whatever X-Forwarded-For says; with
    the peer in ``api.trusted_proxies`` it is the forwarded client, via the proxy."""
    forwarded = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
    async with serving(site / "loopd.yaml", site / "rules") as api:
        await api.post("/v1/reload", headers=forwarded)
        assert {r["client"] for r in await trail(api)} == {"127.0.0.1"}
    config = site / "loopd.yaml"
    config.write_text(CONFIG + "api: {trusted_proxies: [127.0.0.0/8]}\n")
    async with serving(config, site / "rules") as api:
        await api.post("/v1/reload", headers=forwarded)
        assert (await trail(api, "?limit=1"))[0]["client"] == "203.0.113.9 (via 127.0.0.1)"


async def test_an_approval_task_of_a_workflow_records_who_decided(tmp_path: Path) -> None:
    """A workflow's ``approval:`` task decided by a named principal keeps the name in the
    step's output (approved) and in the run's reason (rejected)."""
    async with open_harness(tmp_path) as harness:
        harness.load(ask=APPROVAL_TASK)
        yes = await harness.start("ask", host="web-1")
        no = await harness.start("ask", host="web-2")
        for run, approved in ((yes, True), (no, False)):
            def decided(run_id: str = run.id, yes_or_no: bool = approved) -> bool:
                return harness.approvals.decide(run_id, yes_or_no, "checked",
                                                "oncall-alice") is None

            await wait_until(decided, timeout=5, what="the approval to be decided")
        done = await harness.wait(yes)
        assert done.of("ask")[0].output == {"approved": True, "reason": "checked",
                                            "by": "oncall-alice"}
        done = await harness.wait(no)
        assert done.reason == "rejected by oncall-alice: checked"
