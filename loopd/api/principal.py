"""Who is calling: the principal an API request acts as, and the role each route needs.

Roles are ordered, each one includes the ones below it: ``viewer`` (read) <
``ingest`` (post events and Alertmanager payloads) < ``operator`` (approve, reject,
cancel, close a breaker) < ``admin`` (reload, the audit trail, everything).

The auth middleware (``loopd.api.auth``) puts the caller's ``Principal`` on the request
before any handler runs; handlers and the audit trail read it with ``principal()``.
Every route is named, and ``ROUTE_ROLES`` maps each name to the least role it needs: a
route missing from the table is refused (tests check the table covers every route).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Any

from aiohttp import web


class Role(enum.IntEnum):
    VIEWER = 1
    INGEST = 2
    OPERATOR = 3
    ADMIN = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown role {name!r} (viewer, ingest, operator or admin)"
                             ) from None


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: a token's name and role, or ``anonymous`` when auth is off."""

    name: str
    role: Role
    authenticated: bool = True

    def may(self, needed: Role) -> bool:
        return self.role >= needed


# auth: none (explicitly configured): every caller may do everything, as "anonymous"
UNAUTHENTICATED = Principal("anonymous", Role.ADMIN, authenticated=False)

_KEY = web.RequestKey("loopd.principal", Principal)  # a str key warns (aiohttp 3.14)

# the least role each named route needs (aiohttp route names)
ROUTE_ROLES: dict[str, Role] = {
    "healthz": Role.VIEWER,
    "readyz": Role.VIEWER,
    "metrics": Role.VIEWER,
    "rules": Role.VIEWER,
    "guards": Role.VIEWER,
    "runs": Role.VIEWER,
    "run": Role.VIEWER,
    "incidents": Role.VIEWER,
    "incident": Role.VIEWER,
    "decisions": Role.VIEWER,
    "events": Role.INGEST,
    "events_source": Role.INGEST,
    "alertmanager": Role.INGEST,
    "alertmanager_source": Role.INGEST,
    "cancel_run": Role.OPERATOR,
    "approve_run": Role.OPERATOR,
    "reject_run": Role.OPERATOR,
    "close_breaker": Role.OPERATOR,
    "reload": Role.ADMIN,
    "audit": Role.ADMIN,
    # the web UI (loopd.ui): reading needs a viewer; its buttons post to the API routes
    "ui_incidents": Role.VIEWER,
    "ui_run": Role.VIEWER,
    "ui_decisions": Role.VIEWER,
    "ui_approvals": Role.VIEWER,
    "ui_rules": Role.VIEWER,
    "ui_guards": Role.VIEWER,
    "ui_sources": Role.VIEWER,
    "ui_live": Role.VIEWER,
    # signing in and out, and the UI's static files, need no token
    "ui_signin": Role.VIEWER,
    "ui_signin_post": Role.VIEWER,
    "ui_signout": Role.VIEWER,
    "ui_static": Role.VIEWER,
}

# routes anyone may reach even with auth on: the sign-in page needs no session, and the
# CSS and htmx it loads are public files
PUBLIC_ROUTES = frozenset({"ui_signin", "ui_signin_post", "ui_signout", "ui_static"})
# the one route that takes a form body (the sign-in form works without JavaScript); the
# Origin check still refuses a cross-site form
FORM_ROUTES = frozenset({"ui_signin_post"})


def is_page(route: str | None) -> bool:
    """A web UI page: a browser without a session is sent to the sign-in page instead of
    being answered 401."""
    return route is not None and route.startswith("ui_") and route not in PUBLIC_ROUTES


def set_principal(request: web.Request, who: Principal) -> None:
    request[_KEY] = who


def principal(request: web.Request) -> Principal:
    """The caller of ``request`` (``UNAUTHENTICATED`` when no auth middleware ran)."""
    who = request.get(_KEY)
    return who if isinstance(who, Principal) else UNAUTHENTICATED


def forwarded_client(peer: str | None, forwarded: str | None, proxies: list[Any]
                     ) -> str | None:
    """Who is calling: the peer, or, when the peer is one of ``proxies`` (networks), the
    right-most X-Forwarded-For address that is not a proxy (the left ones are the
    client's to write). The audit trail and the failed-login throttle both use it."""
    if not proxies or not forwarded or not _within(peer, proxies):
        return peer
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        if not _within(hop, proxies):
            return f"{hop[:64]} (via {peer})"
    return peer


def is_proxy(peer: str | None, proxies: list[Any]) -> bool:
    """Whether the connection comes from one of ``proxies`` (what it forwards is trusted)."""
    return bool(proxies) and _within(peer, proxies)


def _within(address: str | None, networks: list[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(ip in net for net in networks)
