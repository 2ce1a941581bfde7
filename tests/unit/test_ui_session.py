"""Browser sessions: stateless cookies any replica with the same tokens accepts."""

from __future__ import annotations

import hashlib

from loopd.api.auth import SESSION_TTL, Tokens, _Token
from loopd.api.principal import Role

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
    new_value = hashlib.sha256(b"new-value-0123456789").digest()
    rotated = Tokens([_Token("alice", Role.VIEWER, new_value)])
    assert rotated.from_session(cookie, now=NOW) is None
    assert tokens.from_session(cookie, now=NOW + 10) == VIEW
