"""Who may call the API of a real daemon on loopback: tokens, roles, browser safety, TLS.

Each test starts a real ``Daemon`` (SQLite store in tmp_path, the core pack) and talks
to it over HTTP or HTTPS with aiohttp; certificates come from a trustme test CA.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import orjson
import pytest
import trustme
import yaml
from structlog.testing import capture_logs

from loopd.api.principal import ROUTE_ROLES
from loopd.config import load_config
from loopd.daemon import Daemon
from loopd.errors import ConfigError
from tests.integration.test_api import ALERTMANAGER, REPO, RULES, Api, sample, serving

TOKENS = {
    "dashboard": ("viewer", "viewer-token-0123456789abcdef"),
    "alertmanager": ("ingest", "ingest-token-0123456789abcdef"),
    "oncall": ("operator", "operator-token-0123456789abcdef"),
    "root": ("admin", "admin-token-0123456789abcdef"),
}
VIEWER, INGEST, OPERATOR, ADMIN = (t for _, t in TOKENS.values())

# every mutating route of the API, as (method, path) with a body it accepts
MUTATING = [
    pytest.param("/v1/runs/r-1/approve", None, id="approve"),
    pytest.param("/v1/runs/r-1/reject", None, id="reject"),
    pytest.param("/v1/runs/r-1/cancel", None, id="cancel"),
    pytest.param("/v1/reload", None, id="reload"),
    pytest.param("/v1/guards/breakers/page-on-critical/close", None, id="close-breaker"),
    pytest.param("/v1/events", {"topic": "disk", "key": "db-1", "data": {"used": 0.95}},
                 id="events"),
    pytest.param("/v1/alertmanager", ALERTMANAGER, id="alertmanager"),
]

Serve = Callable[..., AbstractAsyncContextManager[Api]]


class Site:
    """A daemon's folder: loopd.yaml (with ``api:`` given per test), rules, token files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "rules").mkdir()
        (root / "rules" / "alerts.yaml").write_text(RULES)
        shutil.copytree(REPO / "packs" / "core", root / "packs" / "core")
        (root / "secrets").mkdir()
        for name, (_, value) in TOKENS.items():
            self.secret(name, value)

    def secret(self, name: str, value: str) -> Path:
        path = self.root / "secrets" / name
        path.write_text(value + "\n")
        return path

    def tokens(self) -> list[dict[str, str]]:
        return [{"name": n, "role": r, "token": f"file:{self.root / 'secrets' / n}"}
                for n, (r, _) in TOKENS.items()]

    def write(self, api: dict[str, Any] | None = None, listen: str = "127.0.0.1:0") -> Path:
        config = {
            "listen": listen,
            "sources": [{"name": "webhook", "type": "webhook"},
                        {"name": "alertmanager", "type": "alertmanager"}],
            "rules": ["rules"], "packs": ["packs"], "store": {"path": "var/loopd.db"},
            **({"api": api} if api is not None else {}),
        }
        path = self.root / "loopd.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def serve(self, api: dict[str, Any] | None = None, *, token: str | None = None,
              ssl: ssl.SSLContext | None = None) -> AbstractAsyncContextManager[Api]:
        return serving(self.write(api), self.root / "rules", token=token, ssl=ssl)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


@pytest.fixture
async def authed(site: Site) -> AsyncIterator[Api]:
    """A daemon with the four tokens; its client sends no token unless a call does."""
    async with site.serve({"auth": {"tokens": site.tokens(), "open": ["healthz"]}}) as api:
        yield api


async def call(api: Api, method: str, path: str, *, token: str | None = None,
               body: Any = None, headers: dict[str, str] | None = None,
               data: Any = None) -> tuple[int, Any, aiohttp.ClientResponse]:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    if body is not None:
        data = orjson.dumps(body)
        sent.setdefault("Content-Type", "application/json")
    async with api.http.request(method, path, data=data, headers=sent) as resp:
        raw = await resp.read()
        answer = orjson.loads(raw) if resp.content_type == "application/json" else raw
        return resp.status, answer, resp


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# -- finding: the API is open ---------------------------------------------------------------

@pytest.mark.parametrize("path, body", MUTATING)
async def test_a_mutating_call_without_a_token_is_refused_401(
        authed: Api, path: str, body: Any) -> None:
    """Approve, reject, cancel, reload, closing a breaker and posting events answer 401
    with a JSON error and a Bearer challenge when no token is sent, and decide nothing."""
    received = sample("loopd_events_received_total", source="webhook") + sample(
        "loopd_events_received_total", source="alertmanager")
    status, answer, resp = await call(authed, "POST", path, body=body)
    assert status == 401
    assert answer["status"] == 401 and "Authorization: Bearer" in answer["error"]
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="loopd"'
    status, answer, _ = await call(authed, "POST", path, body=body, token="wrong-" * 5)
    assert status == 401
    assert sample("loopd_events_received_total", source="webhook") + sample(
        "loopd_events_received_total", source="alertmanager") == received


@pytest.mark.parametrize("path, body", MUTATING)
async def test_a_cross_site_text_plain_post_is_refused_without_auth_too(
        site: Site, path: str, body: Any) -> None:
    """On the default loopback daemon (no auth), a POST a foreign page can send without
    asking (text/plain, a form, multipart) gets 415, and a foreign Origin 403."""
    data = orjson.dumps(body or {})
    async with site.serve() as api:
        for kind in ("text/plain", "application/x-www-form-urlencoded",
                     "multipart/form-data; boundary=x"):
            status, answer, _ = await call(api, "POST", path, data=data,
                                           headers={"Content-Type": kind})
            assert (status, answer["status"]) == (415, 415), kind
            assert "application/json" in answer["error"]
        status, answer, _ = await call(api, "POST", path, body=body,
                                       headers={"Origin": "https://evil.example"})
        assert status == 403
        assert answer["error"] == ("Origin 'https://evil.example' is not allowed (add it to "
                                   "api.allowed_origins)")
        assert sample("loopd_events_received_total", source="webhook") == 0
        assert sample("loopd_events_received_total", source="alertmanager") == 0


async def test_a_foreign_host_header_is_refused_421(site: Site) -> None:
    """A request naming a foreign Host (a DNS rebinding page) is refused 421, reads too;
    loopback names and the listen address are accepted."""
    async with site.serve() as api:
        port = api.daemon.port
        for path in ("/v1/runs", "/v1/reload"):
            method = "GET" if path == "/v1/runs" else "POST"
            status, answer, _ = await call(api, method, path,
                                           headers={"Host": f"rebind.evil.example:{port}"})
            assert status == 421
            assert answer["error"] == (f"Host 'rebind.evil.example:{port}' is not an allowed "
                                       "host of this API (add it to api.allowed_hosts)")
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "LOCALHOST"):
            status, _, _ = await call(api, "GET", "/v1/runs", headers={"Host": host})
            assert status == 200, host


async def test_a_non_loopback_listen_without_auth_is_refused(site: Site) -> None:
    """``listen: 0.0.0.0`` without ``api.auth`` is a configuration error naming the fix;
    ``api.auth: none`` allows it."""
    with pytest.raises(ConfigError) as err:
        Daemon(load_config(site.write(listen="0.0.0.0:0")))
    assert "refusing to listen on 0.0.0.0:0 without authentication" in str(err.value)
    assert "api.auth: none" in str(err.value)
    with pytest.raises(ConfigError):
        Daemon(load_config(site.write(listen="loopd.example:8080")))
    Daemon(load_config(site.write({"auth": "none"}, listen="0.0.0.0:0")))
    Daemon(load_config(site.write(listen="[::1]:0")))


async def test_auth_none_logs_a_warning_at_every_start(site: Site) -> None:
    """With ``api.auth: none`` every start logs a warning that anyone may act."""
    for _ in range(2):
        with capture_logs() as logs:
            async with site.serve({"auth": "none"}):
                pass
        (warning,) = [e for e in logs if e["log_level"] == "warning"
                      and "authentication is off" in e["event"]]
        assert "may approve, cancel, reload" in warning["event"]


async def test_failed_authentications_from_one_address_are_throttled_429(site: Site) -> None:
    """Past ``max_failures`` refused authentications in the window, the address gets 429
    with Retry-After, even with a right token, while open routes still answer."""
    auth = {"tokens": site.tokens(), "open": ["healthz"], "max_failures": 3,
            "failure_window": "1m"}
    async with site.serve({"auth": auth}) as api:
        for _ in range(3):
            status, _, _ = await call(api, "GET", "/v1/runs", token="guess-" * 4)
            assert status == 401
        status, answer, resp = await call(api, "GET", "/v1/runs", token=VIEWER)
        assert status == 429 and answer["status"] == 429
        assert 55 <= int(resp.headers["Retry-After"]) <= 60
        assert "too many failed authentications" in answer["error"]
        assert (await call(api, "GET", "/healthz"))[0] == 200
        assert sample("loopd_api_refused_total", route="runs", reason="throttled") == 1
        assert sample("loopd_api_refused_total", route="runs", reason="unauthenticated") == 3


# -- roles ------------------------------------------------------------------------------

ROLE_TABLE = [
    # token, method, path, body, expected status (409/404: the handler answered)
    (VIEWER, "GET", "/v1/runs", None, 200),
    (VIEWER, "POST", "/v1/events", {"topic": "x", "data": {}}, 403),
    (INGEST, "POST", "/v1/events", {"topic": "x", "key": "k", "data": {}}, 200),
    (INGEST, "GET", "/v1/runs", None, 200),
    (INGEST, "POST", "/v1/runs/r-1/approve", None, 403),
    (OPERATOR, "POST", "/v1/runs/r-1/approve", None, 409),
    (OPERATOR, "POST", "/v1/runs/r-1/cancel", None, 404),
    (OPERATOR, "POST", "/v1/guards/breakers/x/close", None, 404),
    (OPERATOR, "POST", "/v1/reload", None, 403),
    (ADMIN, "POST", "/v1/reload", None, 200),
    (ADMIN, "POST", "/v1/alertmanager", ALERTMANAGER, 200),
]


async def test_each_role_may_do_what_it_includes_and_no_more(authed: Api) -> None:
    """viewer reads, ingest posts events, operator approves/cancels/closes breakers,
    admin reloads; a weaker token gets 403 naming the token and the role needed."""
    for token, method, path, body, expected in ROLE_TABLE:
        status, answer, _ = await call(authed, method, path, body=body, token=token)
        assert status == expected, (token, path, answer)
    status, answer, _ = await call(authed, "POST", "/v1/runs/r-1/approve", token=INGEST)
    assert answer == {"status": 403, "error": "token 'alertmanager' has role ingest; "
                      "POST /v1/runs/r-1/approve needs operator"}


async def test_basic_auth_takes_the_token_name_and_the_token(authed: Api) -> None:
    """Basic auth works with the token's name as user and the token as password; another
    user name, or the token as user name, is refused 401."""
    ok = await call(authed, "POST", "/v1/alertmanager", body=ALERTMANAGER,
                    headers=basic("alertmanager", INGEST))
    assert ok[0] == 200
    for user, password in (("someone", INGEST), (INGEST, ""), ("alertmanager", ADMIN)):
        status, _, _ = await call(authed, "GET", "/v1/runs", headers=basic(user, password))
        assert status == 401, user
    status, _, _ = await call(authed, "GET", "/v1/runs",
                              headers={"Authorization": "Basic !!not-base64"})
    assert status == 401


async def test_only_the_routes_listed_open_answer_without_a_token(site: Site) -> None:
    """``open: [healthz, metrics]`` leaves those two open; readyz and every /v1 route still
    need a token, and so does a path that does not exist (401, then 404 with a token)."""
    auth = {"tokens": site.tokens(), "open": ["healthz", "metrics"]}
    async with site.serve({"auth": auth}) as api:
        assert (await call(api, "GET", "/healthz"))[0] == 200
        assert (await call(api, "GET", "/metrics"))[0] == 200
        for path in ("/readyz", "/v1/rules", "/v1/runs", "/v1/nothing-here"):
            assert (await call(api, "GET", path))[0] == 401, path
        assert (await call(api, "GET", "/readyz", token=VIEWER))[0] == 200
        assert (await call(api, "GET", "/v1/nothing-here", token=VIEWER))[0] == 404
    with pytest.raises(ConfigError, match=r"api\.auth\.open\[0\]: must be 'healthz'"):
        load_config(site.write({"auth": {"tokens": site.tokens(), "open": ["runs"]}}))


async def test_every_route_of_the_api_has_a_role(authed: Api) -> None:
    """Every route the app registers is named and has an entry in ROUTE_ROLES."""
    assert authed.daemon.runner is not None
    names = {r.name for r in authed.daemon.runner.app.router.routes()}
    assert None not in names
    assert names - set(ROUTE_ROLES) == set()


async def test_a_refusal_is_logged_and_counted_without_the_presented_token(
        authed: Api) -> None:
    """A refused call logs the token name (or anonymous), the route and the client
    address; neither the log, the answer nor /metrics contain what was presented."""
    presented = "attacker-guess-5f1e0c9d8b7a"
    with capture_logs() as logs:
        status, answer, _ = await call(authed, "POST", "/v1/reload", token=presented)
        await call(authed, "POST", "/v1/reload", token=OPERATOR)
    assert status == 401
    refused = [e for e in logs if e["event"] == "API request refused"]
    assert [(e["reason"], e["token"], e["route"], e["client"]) for e in refused] == [
        ("unauthenticated", "anonymous", "reload", "127.0.0.1"),
        ("forbidden", "oncall", "reload", "127.0.0.1")]
    _, exposition, _ = await call(authed, "GET", "/metrics", token=VIEWER)
    for text in (repr(logs), orjson.dumps(answer).decode(), exposition.decode()):
        assert presented not in text and OPERATOR not in text
    assert 'loopd_api_refused_total{reason="forbidden",route="reload"} 1.0' in \
        exposition.decode()


async def test_a_rotated_token_file_is_read_again_on_reload(site: Site, authed: Api) -> None:
    """After the token file changes and the daemon reloads, the old token is refused and
    the new one accepted; a token file that became invalid keeps the tokens before."""
    site.secret("oncall", "operator-token-rotated-000000")
    assert (await call(authed, "POST", "/v1/reload", token=ADMIN))[0] == 200
    assert (await call(authed, "POST", "/v1/runs/r-1/approve", token=OPERATOR))[0] == 401
    new = "operator-token-rotated-000000"
    assert (await call(authed, "POST", "/v1/runs/r-1/approve", token=new))[0] == 409
    site.secret("oncall", "short")
    status, answer, _ = await call(authed, "POST", "/v1/reload", token=ADMIN)
    assert status == 422
    assert "api.auth token 'oncall': token is shorter than 16 characters" in answer["errors"]
    assert (await call(authed, "POST", "/v1/runs/r-1/approve", token=new))[0] == 409


# -- browser safety -------------------------------------------------------------------------

async def test_json_or_no_body_is_accepted_and_same_origin_or_listed_origins_pass(
        site: Site) -> None:
    """A POST with no body, or JSON with a charset, reaches its handler; the API's own
    origin and the listed ones pass the Origin check, and listed hosts the Host check."""
    api_cfg = {"allowed_origins": ["https://ops.example/"],
               "allowed_hosts": ["loopd.internal"]}
    async with site.serve(api_cfg) as api:
        port = api.daemon.port
        assert (await call(api, "POST", "/v1/runs/r-1/approve"))[0] == 409
        status, _, _ = await call(api, "POST", "/v1/events", data=b'{"topic": "t", "data": {}}',
                                  headers={"Content-Type": "application/json; charset=utf-8"})
        assert status == 200
        for origin in (f"http://127.0.0.1:{port}", "https://ops.example"):
            assert (await call(api, "POST", "/v1/runs/r-1/approve",
                               headers={"Origin": origin}))[0] == 409, origin
        assert (await call(api, "POST", "/v1/runs/r-1/approve",
                           headers={"Origin": "null"}))[0] == 403
        assert (await call(api, "GET", "/v1/runs",
                           headers={"Host": f"loopd.internal:{port}"}))[0] == 200
        assert (await call(api, "GET", "/v1/runs", headers={"Host": "other.internal"}))[0] \
            == 421


async def test_any_host_needs_auth(site: Site) -> None:
    """``allowed_hosts: ['*']`` is a configuration error without tokens, accepted with."""
    with pytest.raises(ConfigError, match=r"allowed_hosts '\*' \(any Host header\) needs"):
        load_config(site.write({"allowed_hosts": ["*"]}))
    auth = {"tokens": site.tokens()}
    async with site.serve({"auth": auth, "allowed_hosts": ["*"]}, token=VIEWER) as api:
        assert (await call(api, "GET", "/v1/runs", headers={"Host": "any.example"}))[0] == 200


# -- TLS --------------------------------------------------------------------------------

def _tls_files(root: Path, ca: trustme.CA, name: str) -> dict[str, str]:
    leaf = ca.issue_cert("127.0.0.1", "localhost", common_name=name)
    cert, key = root / f"{name}.crt", root / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    for pem in leaf.cert_chain_pems[1:]:
        pem.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    return {"cert": str(cert), "key": str(key)}


def _client(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


async def test_tls_serves_https_and_plain_http_gets_no_answer(site: Site) -> None:
    """With ``api.tls`` the API answers over HTTPS with the configured certificate; a
    plain HTTP request on that port gets no HTTP answer."""
    ca = trustme.CA()
    tls = _tls_files(site.root, ca, "loopd-1")
    async with site.serve({"tls": tls}, ssl=_client(ca)) as api:
        assert (await call(api, "GET", "/v1/runs"))[0] == 200
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):
                async with plain.get(f"http://127.0.0.1:{api.daemon.port}/v1/runs") as resp:
                    await resp.read()


async def test_mutual_tls_refuses_a_client_without_a_valid_certificate(site: Site) -> None:
    """With ``client_ca`` a client without a certificate, or with one from another CA, fails
    the handshake; a client certificate signed by the CA is served."""
    ca, clients, strangers = trustme.CA(), trustme.CA(), trustme.CA()
    tls = {**_tls_files(site.root, ca, "loopd-1"), "client_ca": str(site.root / "clients.pem")}
    clients.cert_pem.write_to_path(tls["client_ca"])
    good = clients.issue_cert("alertmanager@example")
    async with site.serve({"tls": tls}, ssl=_client(ca, good)) as api:
        assert (await call(api, "GET", "/v1/runs"))[0] == 200
        url = f"https://127.0.0.1:{api.daemon.port}/v1/runs"
        for ctx in (_client(ca), _client(ca, strangers.issue_cert("mallory@example"))):
            async with aiohttp.ClientSession() as other:
                with pytest.raises(aiohttp.ClientError):
                    async with other.get(url, ssl=ctx) as resp:
                        await resp.read()


async def test_a_client_ca_removed_on_reload_is_trusted_no_more(site: Site) -> None:
    """Replacing ``client_ca`` and reloading makes new connections trust only the new CA:
    a client certificate of the removed CA fails the handshake, one of the new CA is
    served (the context is rebuilt, not added to)."""
    ca, old_clients, new_clients = trustme.CA(), trustme.CA(), trustme.CA()
    tls = {**_tls_files(site.root, ca, "loopd-1"), "client_ca": str(site.root / "clients.pem")}
    old_clients.cert_pem.write_to_path(tls["client_ca"])
    old_cert, new_cert = (c.issue_cert("alertmanager@example") for c in (old_clients,
                                                                         new_clients))

    async def status(cert: trustme.LeafCert) -> int | str:
        url = f"https://127.0.0.1:{api.daemon.port}/v1/runs"
        async with aiohttp.ClientSession() as fresh:  # a new connection, a new handshake
            try:
                async with fresh.get(url, ssl=_client(ca, cert)) as resp:
                    return resp.status
            except aiohttp.ClientError:
                return "refused"

    async with site.serve({"tls": tls}, ssl=_client(ca, old_cert)) as api:
        assert (await status(old_cert), await status(new_cert)) == (200, "refused")
        new_clients.cert_pem.write_to_path(tls["client_ca"])
        assert (await api.daemon.reload()).errors == []
        assert (await status(old_cert), await status(new_cert)) == ("refused", 200)


async def test_bad_tls_files_are_a_config_error_naming_the_file(site: Site) -> None:
    """A missing certificate file stops the start with an error naming it."""
    missing = str(site.root / "nope.crt")
    with pytest.raises(ConfigError, match=r"api.tls: cannot load certificate .*nope.crt"):
        Daemon(load_config(site.write({"tls": {"cert": missing, "key": missing}})))


async def test_the_loop_is_not_left_with_pending_handshakes(site: Site) -> None:
    """Many concurrent HTTPS requests with a token are all answered (no handshake stalls)."""
    ca = trustme.CA()
    tls = _tls_files(site.root, ca, "loopd-1")
    auth = {"tokens": site.tokens()}
    async with site.serve({"tls": tls, "auth": auth}, ssl=_client(ca), token=VIEWER) as api:
        answers = await asyncio.gather(*(call(api, "GET", "/v1/runs") for _ in range(20)))
        assert {a[0] for a in answers} == {200}


async def test_a_named_route_missing_from_route_roles_is_refused(site: Site) -> None:
    """A route whose name has no entry in ROUTE_ROLES is refused 403, with auth or without."""
    from loopd.api.auth import Gate
    from loopd.catalog.backends import SecretResolver

    async def handler(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"reached": True})

    for api_cfg in (None, {"auth": {"tokens": site.tokens()}}):
        gate = Gate(load_config(site.write(api_cfg)))
        await gate.load(SecretResolver())
        app = aiohttp.web.Application(middlewares=[gate.middleware])
        app.router.add_get("/v1/unlisted", handler, name="unlisted")
        runner = aiohttp.web.AppRunner(app)
        await runner.setup()
        tcp = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await tcp.start()
        try:
            port = runner.addresses[0][1]
            async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{port}/v1/unlisted",
                    headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
                assert resp.status == 403
                assert await resp.json() == {"error": "route 'unlisted' has no role; refused",
                                             "status": 403}
        finally:
            await runner.cleanup()


async def test_the_audit_trail_names_the_token_behind_each_call(authed: Api) -> None:
    """With real tokens, the admin's reload and the operator's refused one are in the audit
    trail under their token names and roles, and only the admin may read it."""
    assert (await call(authed, "POST", "/v1/reload", token=ADMIN))[0] == 200
    assert (await call(authed, "POST", "/v1/reload", token=OPERATOR))[0] == 403
    assert (await call(authed, "GET", "/v1/audit", token=OPERATOR))[0] == 403
    status, body, _ = await call(authed, "GET", "/v1/audit?action=reload", token=ADMIN)
    assert status == 200
    seen = [(r["who"], r["role"], r["status"], r["outcome"] is not None)
            for r in reversed(body["audit"])]
    assert seen[0][:2] == ("root", "admin") and seen[0][2] in (None, 0)  # before acting
    assert seen[1][:3] == ("root", "admin", 200)
    assert seen[2][:3] == ("oncall", "operator", 403)
    assert len(seen) == 3
    text = orjson.dumps(body).decode()
    assert all(token not in text for _, token in TOKENS.values())


async def test_a_refused_origin_needs_no_token_and_so_leaves_no_audit_record(
        authed: Api) -> None:
    """A POST with a foreign Origin is refused 403 before any token is checked, and is not
    recorded: nobody can fill the audit trail without a token."""
    for _ in range(5):
        status, _, _ = await call(authed, "POST", "/v1/reload",
                                  headers={"Origin": "https://evil.example"})
        assert status == 403
    status, body, _ = await call(authed, "GET", "/v1/audit", token=ADMIN)
    assert (status, body["audit"]) == (200, [])


async def test_behind_a_trusted_proxy_the_throttle_blocks_the_client_not_the_proxy(
        site: Site) -> None:
    """With the peer in ``api.trusted_proxies``, failed logins are counted per forwarded
    client: one guessing client is throttled, another behind the same proxy is not."""
    auth = {"tokens": site.tokens(), "max_failures": 3}
    async with site.serve({"auth": auth, "trusted_proxies": ["127.0.0.1/32"]}) as api:
        guessing = {"X-Forwarded-For": "203.0.113.7"}
        for _ in range(3):
            assert (await call(api, "GET", "/v1/runs", token="wrong-" * 4,
                               headers=guessing))[0] == 401
        assert (await call(api, "GET", "/v1/runs", token=VIEWER, headers=guessing))[0] == 429
        other = {"X-Forwarded-For": "198.51.100.9"}
        assert (await call(api, "GET", "/v1/runs", token=VIEWER, headers=other))[0] == 200
