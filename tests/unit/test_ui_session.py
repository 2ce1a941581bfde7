"""Browser sessions: stateless cookies any replica with the same tokens accepts."""

from __future__ import annotations

import hashlib

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from loopd import ui
from loopd.api.auth import SESSION_TTL, Gate, Tokens, _Token
from loopd.api.principal import PUBLIC_ROUTES, ROUTE_ROLES, Role, is_page
from loopd.config import LoopdConfig

OPS = _Token("ops", Role.OPERATOR, hashlib.sha256(b"operator-token-0123456789").digest())
VIEW = _Token("alice", Role.VIEWER, hashlib.sha256(b"viewer-token-0123456789ab").digest())
NOW = 1_796_000_000.0


def test_a_session_made_by_one_replica_is_accepted_by_another_with_the_same_tokens() -> None:
    """Two Tokens objects (two processes) built from the same token agree on the session
    and on its CSRF value; the cookie holds neither the token nor its digest."""
    here, there = Tokens([OPS, VIEW]), Tokens([VIEW, OPS])
    cookie = here.session(OPS, now=NOW)
    assert there.from_session(cookie, now=NOW + 60) == OPS
    assert b"operator-token" not in cookie.encode() and OPS.digest.hex() not in cookie
    assert here.csrf(cookie) is None  # the real clock: a session of NOW has expired
    fresh = here.session(OPS)
    assert here.csrf(fresh) == there.csrf(fresh) and len(here.csrf(fresh) or "") == 32
    assert here.csrf(fresh) != here.csrf(here.session(VIEW))


def test_a_tampered_expired_or_rotated_session_is_refused() -> None:
    """Another name, another time, a changed mac, an old cookie, or a token since rotated:
    no session."""
    tokens = Tokens([OPS, VIEW])
    cookie = tokens.session(VIEW, now=NOW)
    issued, name, mac = cookie.split(".")
    ops_name = tokens.session(OPS, now=NOW).split(".")[1]
    assert tokens.from_session(f"{issued}.{ops_name}.{mac}", now=NOW) is None
    assert tokens.from_session(f"{int(issued) + 1}.{name}.{mac}", now=NOW) is None
    assert tokens.from_session(f"{issued}.{name}.{'0' * len(mac)}", now=NOW) is None
    assert tokens.from_session(cookie, now=NOW + SESSION_TTL + 1) is None
    assert tokens.from_session("garbage", now=NOW) is None
    # text a browser (or anyone) can send: no session, never an error
    for odd in ("\u00b2\u00b2\u00b2\u00b2\u00b2\u00b2\u00b2\u00b2\u00b2\u00b2.b3Ax.aa",
                f"{issued}.\u00e9\u00e9.{mac}", f"{issued}.{name}.\u00e9", f"{issued}..", "..",
                f"{issued}.{name}.{mac}\udcff"):
        assert tokens.from_session(odd, now=NOW) is None, odd
    new_value = hashlib.sha256(b"new-value-0123456789").digest()
    rotated = Tokens([_Token("alice", Role.VIEWER, new_value)])
    assert rotated.from_session(cookie, now=NOW) is None
    assert tokens.from_session(cookie, now=NOW + 10) == VIEW


def test_every_ui_route_is_named_and_has_a_role() -> None:
    """The gate refuses a route missing from ROUTE_ROLES: each page, the stream, sign-in
    and the static files have an entry; only sign-in, sign-out and static are public."""
    app = web.Application()
    ui.add_routes(app, Gate(LoopdConfig()))
    names = {r.name for r in app.router.routes()}
    assert None not in names and names <= set(ROUTE_ROLES)
    assert {"ui_signin", "ui_signin_post", "ui_signout", "ui_static"} == PUBLIC_ROUTES
    assert is_page("ui_incidents") and is_page("ui_live") and not is_page("ui_signin")
    assert not is_page("approve_run")


def test_the_session_cookie_is_secure_over_tls_and_behind_a_trusted_tls_proxy() -> None:
    """``X-Forwarded-Proto: https`` counts only from a proxy in api.trusted_proxies."""
    gate = Gate(LoopdConfig.model_validate({"api": {"trusted_proxies": ["10.0.0.0/8"]}}))

    def over_tls(peer: str, proto: str | None) -> bool:
        headers = {"X-Forwarded-Proto": proto} if proto else {}
        request = make_mocked_request("POST", "/signin", headers=headers,
                                      transport=_Transport(peer))
        return gate.over_tls(request)

    assert over_tls("10.1.2.3", "https") and over_tls("10.1.2.3", "HTTPS, http")
    assert not over_tls("10.1.2.3", "http") and not over_tls("10.1.2.3", None)
    assert not over_tls("192.0.2.7", "https")  # anyone can send the header


class _Transport:
    """The peer address a request arrived from (what aiohttp reads as request.remote)."""

    def __init__(self, peer: str) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.peer, 40000) if name == "peername" else default
