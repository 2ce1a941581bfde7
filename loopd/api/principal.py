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
from dataclasses import dataclass

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

# a RequestKey, not a str: aiohttp warns about str keys (an error under filterwarnings)
_KEY = web.RequestKey("loopd.principal", Principal)

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
    "events": Role.INGEST,
    "events_source": Role.INGEST,
    "alertmanager": Role.INGEST,
    "alertmanager_source": Role.INGEST,
    "cancel_run": Role.OPERATOR,
    "approve_run": Role.OPERATOR,
    "reject_run": Role.OPERATOR,
    "close_breaker": Role.OPERATOR,
    "reload": Role.ADMIN,
}


def set_principal(request: web.Request, who: Principal) -> None:
    request[_KEY] = who


def principal(request: web.Request) -> Principal:
    """The caller of ``request`` (``UNAUTHENTICATED`` when no auth middleware ran)."""
    who = request.get(_KEY)
    return who if isinstance(who, Principal) else UNAUTHENTICATED
