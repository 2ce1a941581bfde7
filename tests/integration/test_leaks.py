"""The leak test: distinctive secret values, planted through every backend and every pack
that takes secrets, appear nowhere loopd writes or answers.

A real ``loopd run`` (tests/e2e/daemon.py, JSON logs at debug level captured) acts on the
test SSH server and the HTTP targets of tests/servers/ with credentials given as
``env:``, ``file:``, ``dir:`` (a mounted-secret directory) and ``exec:`` (a helper
script), in successful runs and in failing ones: a literal password, an unknown scheme,
a helper that fails printing its secret on stderr, servers that echo a wrong credential
back. Then every log line, every API answer, the store files (db, -wal, -shm), the
``loopd check`` output and the ``loopd simulate`` report are searched for each value and
the forms a transport gives it (base64, URL-encoded): zero hits.

To cover one more secret (an API token, a Postgres DSN): configure it in ``fleet()`` and
append a ``Planted`` to the list it returns; new API routes go into ``API_PATHS``.
"""

from __future__ import annotations

import asyncio
import base64
import shlex
import sys
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.daemon import LOOPD, Config, LoopdProcess
from tests.servers.http_targets import HttpEcho, ServiceNow, SlackWebhook
from tests.servers.ssh import USER, SshServer

API_PATHS = ("/v1/runs?limit=1000", "/v1/incidents", "/v1/incidents?status=closed",
             "/v1/rules", "/v1/guards", "/v1/audit", "/metrics", "/readyz", "/healthz")
TERMINAL = ("succeeded", "failed", "timed_out", "cancelled", "crashed")
# run alone after the others, when the webhook refuses with its own URL in the body
LAST = "slack-refused"


@dataclass(frozen=True)
class Planted:
    """One secret value and the other shapes in which a transport may carry it."""

    what: str
    value: str
    extra: tuple[str, ...] = ()  # e.g. the base64 of ``user:password`` of basic auth

    def forms(self) -> list[str]:
        raw = self.value.encode()
        return [self.value, *self.extra, base64.b64encode(raw).decode().rstrip("="),
                base64.urlsafe_b64encode(raw).decode().rstrip("="),
                urllib.parse.quote(self.value, safe=""), urllib.parse.quote_plus(self.value)]


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def hits(planted: list[Planted], where: str, data: bytes | str) -> list[str]:
    blob = data.encode() if isinstance(data, str) else data
    return [f"{p.what} ({form[:12]}...) in {where}" for p in planted for form in p.forms()
            if form.encode() in blob]


SSH_PACK = """\
name: leak
version: 0.0.1
actions:
  hello:
    runner: ssh
    input: {host: {type: string, required: true}}
    command: echo hello
"""


@dataclass
class Fleet:
    """The servers a run acts on and the secrets planted for them."""

    ssh: SshServer
    echo: HttpEcho
    servicenow: ServiceNow
    slack: SlackWebhook
    env: dict[str, str] = field(default_factory=dict)
    planted: list[Planted] = field(default_factory=list)
    expect: dict[str, str] = field(default_factory=dict)  # rule -> final status
    api_admin: str = ""  # the token the harness calls the API with
    api_wrong: str = ""  # a token presented but never configured


def rule(name: str, action: str, input: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "on": {"source": "webhook", "topic": name},
            "run": {"action": action, "input": input}}


def fleet(config: Config, servers: Fleet, tmp: Path) -> None:
    """Plant every secret: which backend carries it, which pack uses it, what run shows."""
    ssh, echo, sn, slack = servers.ssh, servers.echo, servers.servicenow, servers.slack
    mount = tmp / "mount"  # a Kubernetes secret volume: one file per key
    mount.mkdir()
    files = tmp / "files"
    files.mkdir()
    helper = tmp / "vault-helper.py"
    bearer, exec_fail = "LeakBearer-exec-8b2d7e41", "ExecStderr-LEAK-9a8b7c6d"
    api_ingest = "LeakApiIngest-exec-2c4e6a8b0d"
    helper.write_text(
        "import sys\n"
        f"if sys.argv[1] == 'bearer':\n    print({bearer!r})\n"
        f"elif sys.argv[1] == 'ingest':\n    print({api_ingest!r})\n"
        f"else:\n    print({exec_fail!r})\n"
        f"    sys.stderr.write('Error: permission denied for {exec_fail}\\n')\n"
        "    sys.exit(3)\n")

    def exec_ref(arg: str) -> str:
        return "exec:" + shlex.join([sys.executable, str(helper), arg])

    ssh_pw = ssh.passwords[USER] = "LeakSshPw-env-4f1c9a27"
    servers.env["LEAK_SLACK_HOOK"] = slack.webhook_url  # a secret pack config field by env:
    servers.env["LEAK_SSH_PW"] = ssh_pw
    (files / "id_ed25519").write_text(ssh.client_key_text)
    key_lines = [ln for ln in ssh.client_key_text.splitlines() if not ln.startswith("-----")]
    (mount / "echo-password").write_text(echo.password + "\n")
    (files / "servicenow").write_text(sn.password)
    wrong_bearer = servers.env["LEAK_WRONG_BEARER"] = "LeakWrongBearer-env-1a2b3c4d"
    wrong_basic = servers.env["LEAK_WRONG_BASIC"] = "LeakWrongBasic-env-5e6f7a8b"
    literal, unknown = "LITERALPW-1234abcd-leak", "vault2:UNKNOWNSCHEME-5678efgh"

    config.entities = {
        "web-pw": ssh.entity(credentials="ssh-pw"), "web-key": ssh.entity(credentials="ssh-key"),
        "web-literal": ssh.entity(credentials="ssh-literal"),
        "web-unknown": ssh.entity(credentials="ssh-unknown"),
    }
    config.credentials = {
        "ssh-pw": {"username": USER, "password": "env:LEAK_SSH_PW"},
        "ssh-key": {"username": USER, "key": f"file:{files / 'id_ed25519'}"},
        "ssh-literal": {"username": USER, "password": literal},
        "ssh-unknown": {"username": USER, "password": unknown},
        "echo-bearer": {"token": exec_ref("bearer")},
        "echo-basic": {"username": echo.username, "password": "dir:echo-password"},
        "echo-exec-fail": {"token": exec_ref("fail")},
        "echo-wrong-bearer": {"token": "env:LEAK_WRONG_BEARER"},
        "echo-wrong-basic": {"username": echo.username, "password": "env:LEAK_WRONG_BASIC"},
        "servicenow": {"username": sn.username, "password": f"file:{files / 'servicenow'}"},
    }
    config.pack_config = {"servicenow": {"instance": sn.url, "credentials": "servicenow"},
                          "notify": {"webhook_url": "env:LEAK_SLACK_HOOK"}}
    # the API's own tokens, one per backend; the harness calls with the admin one
    servers.api_admin = "LeakApiAdmin-dir-7d9f1b3c5e"
    api_viewer = servers.env["LEAK_API_VIEWER"] = "LeakApiViewer-env-8e0a2c4d6f"
    servers.api_wrong = "LeakApiWrong-never-configured-1357"
    (mount / "api-admin").write_text(servers.api_admin + "\n")
    tokens = [{"name": "harness", "role": "admin", "token": "dir:api-admin"},
              {"name": "alertmanager", "role": "ingest", "token": exec_ref("ingest")},
              {"name": "dashboard", "role": "viewer", "token": "env:LEAK_API_VIEWER"}]
    # a secret input takes a reference: the URL behind it reaches the action only
    servers.env["LEAK_SLACK_OTHER"] = slack.webhook_url
    config.extra = {"secrets": {"dir": str(mount)}, "log": {"format": "json", "level": "debug"},
                    "api": {"auth": {"tokens": tokens, "open": ["healthz", "readyz"]}}}
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.add_pack("leak", {"pack.yaml": SSH_PACK})

    def request(path: str, auth: str, credentials: str) -> dict[str, Any]:
        return {"url": f"{echo.url}{path}", "auth": auth, "credentials": credentials}

    runs = [  # (rule, action, input, final status)
        ("ssh-password", "leak.hello", {"host": "web-pw"}, "succeeded"),
        ("ssh-key", "leak.hello", {"host": "web-key"}, "succeeded"),
        ("ssh-literal", "leak.hello", {"host": "web-literal"}, "failed"),
        ("ssh-unknown-scheme", "leak.hello", {"host": "web-unknown"}, "failed"),
        ("bearer", "http.request", request("/bearer", "bearer", "echo-bearer"), "succeeded"),
        ("bearer-echoed", "http.request", request("/echo", "bearer", "echo-bearer"),
         "succeeded"),
        ("basic", "http.request", request("/basic", "basic", "echo-basic"), "succeeded"),
        ("basic-echoed", "http.request", request("/echo", "basic", "echo-basic"), "succeeded"),
        ("exec-fails", "http.request", request("/bearer", "bearer", "echo-exec-fail"),
         "failed"),
        ("wrong-bearer", "http.request", request("/bearer", "bearer", "echo-wrong-bearer"),
         "failed"),
        ("wrong-basic", "http.request", request("/basic", "basic", "echo-wrong-basic"),
         "failed"),
        ("servicenow", "servicenow.create_incident", {"short_description": "leak test"},
         "succeeded"),
        ("slack", "notify.slack", {"text": "leak test"}, "succeeded"),
        ("slack-input", "notify.slack", {"text": "leak test", "url": "env:LEAK_SLACK_OTHER"},
         "succeeded"),
        ("slack-refused", "notify.slack", {"text": "leak test"}, "failed"),  # last: see LAST
    ]
    config.rules = {"leak.yaml": [rule(name, action, input) for name, action, input, _ in runs]}
    servers.expect = {name: status for name, _, _, status in runs}
    servers.planted = [
        Planted("ssh password (env)", ssh_pw),
        *(Planted(f"ssh key line {i} (file)", line) for i, line in enumerate(key_lines)),
        Planted("bearer token (exec)", bearer),
        Planted("basic password (dir)", echo.password, (basic(echo.username, echo.password),)),
        Planted("servicenow password (file)", sn.password, (basic(sn.username, sn.password),)),
        Planted("slack webhook url (env)", slack.webhook_url),
        Planted("slack webhook path", slack.path.rsplit("/", 1)[1]),
        Planted("literal password", literal),
        Planted("unknown-scheme value", unknown, ("UNKNOWNSCHEME-5678efgh",)),
        Planted("exec helper's stderr", exec_fail),
        Planted("wrong bearer echoed back", wrong_bearer),
        Planted("wrong basic echoed back", wrong_basic, (basic(echo.username, wrong_basic),)),
        Planted("API admin token (dir)", servers.api_admin),
        Planted("API ingest token (exec)", api_ingest, (basic("alertmanager", api_ingest),)),
        Planted("API viewer token (env)", api_viewer),
        Planted("API token never configured, presented", servers.api_wrong),
    ]


@pytest.fixture
async def servers() -> AsyncIterator[Fleet]:
    slack = SlackWebhook()
    slack.path = "/services/T0LEAK/B0LEAK/LeakHook-5d6e7f8a9b"
    fleet = Fleet(SshServer(), HttpEcho(password="LeakBasic-dir-3e9f0a12",
                                        token="LeakBearer-exec-8b2d7e41"),
                  ServiceNow(password="LeakSnow-file-6a7b8c9d"), slack)
    async with AsyncExitStack() as stack:
        for server in (fleet.ssh, fleet.echo, fleet.servicenow, fleet.slack):
            await server.start()
            stack.push_async_callback(server.stop)
        yield fleet


async def answers(url: str, paths: list[str], token: str | None = None) -> dict[str, bytes]:
    """path -> raw body of GET url+path (with bearer ``token``), each answered with 200."""
    out: dict[str, bytes] = {}
    sent = {"Authorization": f"Bearer {token}"} if token else None
    async with aiohttp.ClientSession(headers=sent) as http:
        for path in paths:
            async with http.get(url + path) as resp:
                out[path] = await resp.read()
                assert resp.status == 200, (path, resp.status, out[path][:200])
    return out


async def api_refusals(url: str, servers: Fleet) -> dict[str, bytes]:
    """The answers to a wrong token (bearer and basic), to the ingest token where a viewer's
    is needed and the reverse, and to an ingest by basic auth as Alertmanager sends it."""
    ingest = next(p for p in servers.planted if p.what.startswith("API ingest")).value
    viewer = servers.env["LEAK_API_VIEWER"]
    calls = [("GET", "/v1/runs", f"Bearer {servers.api_wrong}", 401),
             ("GET", "/v1/runs", f"Basic {basic('harness', servers.api_wrong)}", 401),
             ("POST", "/v1/reload", f"Bearer {ingest}", 403),
             ("POST", "/v1/events", f"Bearer {viewer}", 403),
             ("POST", "/v1/events", f"Basic {basic('alertmanager', ingest)}", 200)]
    out: dict[str, bytes] = {}
    async with aiohttp.ClientSession() as http:
        for method, path, auth, status in calls:
            body = orjson.dumps({"topic": "no-rule", "data": {}}) if path == "/v1/events" \
                else None
            async with http.request(method, url + path, data=body, headers={
                    "Authorization": auth, "Content-Type": "application/json"}) as resp:
                out[f"{method} {path} ({status})"] = await resp.read()
                assert resp.status == status, (method, path, resp.status)
    return out


def store_files(config: Config) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in config.store.parent.glob("loopd.db*")}


async def cli(*args: str, cwd: Path) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        str(LOOPD), *args, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out


async def test_no_planted_secret_reaches_a_log_an_answer_the_store_or_a_report(
        tmp_path: Path, servers: Fleet) -> None:
    """Every secret, through every backend and pack, in successful and failing runs, is
    absent from every log line, API answer, store file, check output and simulate report."""
    config = Config(root=tmp_path / "loopd")
    config.root.mkdir()
    fleet(config, servers, tmp_path)
    daemon = LoopdProcess(config, env=servers.env, token=servers.api_admin)
    found: list[str] = []
    try:
        await daemon.start()
        events = [{"topic": name, "key": name, "data": {"n": i}}
                  for i, name in enumerate(servers.expect)]
        runs: dict[str, dict[str, Any]] = {}
        for batch in ([e for e in events if e["topic"] != LAST],
                      [e for e in events if e["topic"] == LAST]):
            if batch[0]["topic"] == LAST:  # a careless server quoting the secret URL
                servers.slack.fail_next(1, status=404, body=f"no_service {servers.slack.path}")
            for event in batch:
                await daemon.post("/v1/events", event)
            for run in await daemon.wait_runs(len(runs) + len(batch)):
                runs[run["rule"]] = await daemon.wait_run(
                    run["id"], lambda s: s["status"] in TERMINAL)
        found += hits(servers.planted, "the store while running", b"".join(
            store_files(config).values()))
        refusals = await api_refusals(daemon.url, servers)
        got = await answers(daemon.url, [*API_PATHS, *(f"/v1/runs/{r['id']}" for r in
                                                         runs.values())], servers.api_admin)
        for what, body in refusals.items():
            found += hits(servers.planted, what, body)
        stories = {name: orjson.loads(got[f"/v1/runs/{r['id']}"]) for name, r in runs.items()}
        for path, body in got.items():
            found += hits(servers.planted, f"GET {path}", body)
        await daemon.stop()
    finally:
        await daemon.close()
    for log in daemon.logs:
        found += hits(servers.planted, log.name, log.read_bytes())
    for name, data in store_files(config).items():
        found += hits(servers.planted, name, data)
    (tmp_path / "events.jsonl").write_bytes(b"".join(
        orjson.dumps({**e, "time": 1_790_000_000 + i}) + b"\n" for i, e in enumerate(events)))
    report = tmp_path / "report.json"
    out = await cli("simulate", "-c", str(config.path), "--events", str(tmp_path / "events.jsonl"),
                    "--report", str(report), "--no-progress", cwd=config.root)
    found += hits(servers.planted, "loopd simulate", out + report.read_bytes())
    found += hits(servers.planted, "loopd check", await cli("check", "-c", str(config.path),
                                                           cwd=config.root))
    assert found == [], "\n".join(found)
    statuses = {name: story["status"] for name, story in stories.items()}
    assert statuses == servers.expect  # the secrets were really used, and failures failed
    assert servers.slack.messages and servers.servicenow.incidents
    errors = {name: story["steps"][-1]["error"] for name, story in stories.items()
              if story["status"] == "failed"}
    assert errors["ssh-literal"].endswith(
        "credentials 'ssh-literal' password: not a reference (use env:VAR, file:/path, "
        "dir:KEY or exec:COMMAND); the value is not shown")
    assert "the helper exited 3: Error: permission denied for ***" in errors["exec-fails"]
    assert "bad token: Bearer ***" in errors["wrong-bearer"]
    assert "404 Not Found: no_service /***" in errors[LAST]
    echoed = stories["bearer-echoed"]["steps"][-1]["output"]["json"]["headers"]
    assert echoed["Authorization"] == "***"  # the server saw it; the run does not show it


async def test_a_malformed_credential_is_echoed_nowhere(tmp_path: Path, ssh_server: SshServer
                                                       ) -> None:
    """A literal password and an unknown-scheme value fail their runs naming the entry and
    field, and appear in no log line, run listing, run story or store file (issue 9)."""
    config = Config(root=tmp_path)
    literal, unknown = "LITERALPW-1234abcd", "vault2:UNKNOWNSCHEME-5678efgh"
    config.entities = {"web-literal": ssh_server.entity(credentials="ssh-literal"),
                       "web-unknown": ssh_server.entity(credentials="ssh-unknown")}
    config.credentials = {"ssh-literal": {"username": USER, "password": literal},
                          "ssh-unknown": {"username": USER, "password": unknown}}
    config.sources = [{"name": "webhook", "type": "webhook"}]
    config.add_pack("leak", {"pack.yaml": SSH_PACK})
    config.rules = {"leak.yaml": [rule(name, "leak.hello", {"host": f"web-{name}"})
                                  for name in ("literal", "unknown")]}
    planted = [Planted("literal password", literal),
               Planted("unknown-scheme value", unknown, ("UNKNOWNSCHEME-5678efgh",))]
    daemon = LoopdProcess(config)
    found: list[str] = []
    try:
        await daemon.start()
        for name in ("literal", "unknown"):
            await daemon.post("/v1/events", {"topic": name, "key": name, "data": {}})
        stories = [await daemon.wait_run(r["id"], lambda s: s["status"] in TERMINAL)
                   for r in await daemon.wait_runs(2)]
        listing = await answers(daemon.url, ["/v1/runs?limit=1000",
                                             *(f"/v1/runs/{s['id']}" for s in stories)])
        for path, body in listing.items():
            found += hits(planted, f"GET {path}", body)
        await daemon.stop()
    finally:
        await daemon.close()
    for log in daemon.logs:
        found += hits(planted, log.name, log.read_bytes())
    for name, data in store_files(config).items():
        found += hits(planted, name, data)
    assert found == [], "\n".join(found)
    assert sorted(s["steps"][-1]["error"].partition("credentials ")[2] for s in stories) == [
        f"'ssh-{name}' password: not a reference (use env:VAR, file:/path, dir:KEY or "
        "exec:COMMAND); the value is not shown" for name in ("literal", "unknown")]
