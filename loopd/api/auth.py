"""Who may call the API, and from where: tokens and roles, Host and Origin allow-lists,
JSON-only mutating requests, and a throttle on failed authentications.

``Gate`` is compiled once from ``api`` in loopd.yaml; its ``middleware`` runs on every
request, in this order, before any handler:

1. ``Host`` not in the allow-list: ``421`` (DNS rebinding: a browser tricked into
   sending an attacker's page to loopd carries the attacker's host name). Always
   accepted: the loopback names, the address the connection arrived on, and
   ``api.allowed_hosts`` (default: the listen host); ``*`` accepts any, only with auth.
2. ``Origin`` present and neither the API's own origin nor in ``api.allowed_origins``:
   ``403`` (a cross-site page).
3. A mutating request (POST) with a body that is not ``application/json``: ``415``
   (``text/plain``, forms and multipart are what a cross-site page can send without
   asking). An empty body passes whatever its ``Content-Type``.
4. Authentication, when ``api.auth`` has tokens. ``Authorization: Bearer <token>`` or
   ``Authorization: Basic`` with the token as password and the token's *name* as user
   name (Alertmanager's ``http_config`` can send either). Missing or wrong: ``401``
   with ``WWW-Authenticate: Bearer``. Routes listed in ``auth.open`` (only
   ``healthz``, ``readyz``, ``metrics``) need no token. Past ``auth.max_failures``
   refused authentications within ``auth.failure_window`` from one client address, that
   address gets ``429`` with ``Retry-After`` until the window has passed (behind a proxy
   in ``api.trusted_proxies``, the client it forwards counts, not the proxy).
   A browser signs in instead (``loopd.ui``): ``POST /signin`` with a token sets the
   session cookie ``Tokens.session`` makes, and the gate accepts that cookie in place
   of the header, with two more conditions: a mutating request carries an
   ``X-CSRF-Token`` header equal to ``Tokens.csrf`` of the cookie (403 otherwise), and a
   web UI page without a session is redirected to ``/signin`` (303, not counted as a
   failure: it is a browser arriving, not a guess).
5. The role: ``ROUTE_ROLES`` (``loopd.api.principal``) gives the least role of each
   route; a weaker token gets ``403``; a route missing from the table is refused.

Presented tokens are hashed and compared with every configured token in constant time
(``hmac.compare_digest``, no early exit); only the digests are kept. Every refusal is
one log line and one ``loopd_api_refused_total`` sample naming the token (or
``anonymous``), the route and the client address, never what was presented. Token
values are read through the daemon's ``SecretResolver`` (any reference: ``env:``,
``file:``, ``dir:``, ``exec:``) at start and again on reload (SIGHUP,
``POST /v1/reload``); errors name the token, never its value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
import structlog
from aiohttp import web

from loopd import metrics
from loopd.api.principal import (
    FORM_ROUTES,
    PUBLIC_ROUTES,
    ROUTE_ROLES,
    UNAUTHENTICATED,
    Principal,
    Role,
    forwarded_client,
    is_page,
    is_proxy,
    set_principal,
)
from loopd.catalog.backends import SecretResolver
from loopd.config import AuthConfig, LoopdConfig
from loopd.errors import ConfigError

log = structlog.get_logger("loopd.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MIN_TOKEN_LENGTH = 16
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_OPEN_PRINCIPAL = Principal("anonymous", Role.VIEWER, authenticated=False)
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="loopd"'}
SESSION_COOKIE = "loopd_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL = 12 * 3600.0  # s: a browser signs in again after a working day


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


# -- tokens ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Token:
    name: str
    role: Role
    digest: bytes  # sha256 of the value: the value itself is not kept

    def __repr__(self) -> str:
        return f"_Token({self.name!r}, {self.role.label})"


class Tokens:
    """The configured tokens, compiled: ``match`` finds the one a request presents."""

    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens

    @classmethod
    async def resolve(cls, auth: AuthConfig, secrets: SecretResolver) -> Tokens:
        """Read every token's value (any reference scheme: env, file, dir, exec);
        ConfigError names the token, never the value."""
        tokens: list[_Token] = []
        seen: dict[bytes, str] = {}
        for entry in auth.tokens:
            where = f"api.auth token {entry.name!r}"
            try:
                value = await secrets.resolve(entry.token)
            except ConfigError as exc:
                raise ConfigError(exc.message, origin=where) from None
            if len(value) < MIN_TOKEN_LENGTH:
                raise ConfigError(f"token is shorter than {MIN_TOKEN_LENGTH} characters",
                                  origin=where)
            digest = hashlib.sha256(value.encode()).digest()
            if digest in seen:
                raise ConfigError(f"token has the same value as token {seen[digest]!r}",
                                  origin=where)
            seen[digest] = entry.name
            tokens.append(_Token(entry.name, Role.parse(entry.role), digest))
        return cls(tokens)

    def match(self, presented: str) -> _Token | None:
        """The token equal to ``presented``: every token is compared, in constant time."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: _Token | None = None
        for token in self._tokens:  # no early exit: timing tells nothing about which
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found

    # -- browser sessions ------------------------------------------------------------------
    #
    # Stateless, so that any replica behind a load balancer accepts a session another one
    # issued, with no shared session table: the cookie is "issued.name.mac", the mac an
    # HMAC keyed by the token's digest. Only a holder of the token can make one; rotating
    # the token (and reloading) ends its sessions everywhere. The token itself is never in
    # the cookie, and the CSRF value is one more HMAC of the cookie under the same key.

    def session(self, token: _Token, now: float | None = None) -> str:
        """The session cookie's value for a browser that presented ``token``."""
        issued = str(int(time.time() if now is None else now))
        name = base64.urlsafe_b64encode(token.name.encode()).decode().rstrip("=")
        return f"{issued}.{name}.{self._mac(token, f'{issued}.{name}')}"

    def from_session(self, cookie: str, now: float | None = None) -> _Token | None:
        """The token a session cookie was issued for, while it is genuine and fresh."""
        issued, _, rest = cookie.partition(".")
        name, _, mac = rest.partition(".")
        if not (issued.isascii() and issued.isdigit()) or not mac:
            return None
        age = (time.time() if now is None else now) - int(issued)
        if not -60 <= age <= SESSION_TTL:  # a minute of clock skew between replicas
            return None
        try:
            token_name = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except ValueError:  # binascii.Error, UnicodeDecodeError, a non-ASCII name
            return None
        token = next((t for t in self._tokens if t.name == token_name), None)
        if token is None or not _same(mac, self._mac(token, f"{issued}.{name}")):
            return None
        return token

    def csrf(self, cookie: str) -> str | None:
        """The X-CSRF-Token a page of this session sends with each change; None for a
        cookie that is not a live session."""
        token = self.from_session(cookie)
        return None if token is None else self._mac(token, f"csrf|{cookie}")[:32]

    @staticmethod
    def _mac(token: _Token, message: str) -> str:
        key = hmac.new(token.digest, b"loopd browser session", hashlib.sha256).digest()
        return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def _same(presented: str, expected: str | None) -> bool:
    """A presented value equal to the expected one, in constant time; any text (not only
    ASCII) is simply unequal, never an error."""
    if expected is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"),
                               expected.encode())


def _credentials(header: str) -> tuple[str | None, str] | None:
    """(basic user name or None for bearer, token) from an Authorization header."""
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    rest = rest.strip()
    if scheme == "bearer" and rest:
        return None, rest
    if scheme == "basic" and rest:
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        return (user, password) if sep else None
    return None


# -- the throttle ------------------------------------------------------------------------

class FailureThrottle:
    """Failed authentications per client address in a sliding window (bounded memory)."""

    def __init__(self, max_failures: int, window: float, *, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self._max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> float | None:
        """Seconds until ``client`` may try again, or None when it is not blocked."""
        seen = self._failures.get(client)
        if seen is None:
            return None
        now = self._clock()
        while seen and seen[0] <= now - self.window:
            seen.popleft()
        if not seen:
            del self._failures[client]
            return None
        if len(seen) < self.max_failures:
            return None
        return seen[0] + self.window - now

    def failed(self, client: str) -> bool:
        """Count a failure; True when it is the one that blocks ``client``."""
        seen = self._failures.setdefault(client, deque(maxlen=self.max_failures))
        self._failures.move_to_end(client)
        seen.append(self._clock())
        while len(self._failures) > self._max_clients:
            self._failures.popitem(last=False)
        return len(seen) >= self.max_failures


# -- the gate ----------------------------------------------------------------------------

def _refuse(status: int, message: str, headers: dict[str, str] | None = None
            ) -> web.Response:
    body = orjson.dumps({"error": message, "status": status})
    return web.Response(body=body, status=status, content_type="application/json",
                        headers=headers)


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host


class Gate:
    """The API's admission: compiled from ``api`` config; see the module docstring."""

    def __init__(self, config: LoopdConfig) -> None:
        api = config.api
        self._auth = api.auth if isinstance(api.auth, AuthConfig) else None
        # auth on: no token matches until load() has read them (every call is 401 meanwhile)
        self.tokens: Tokens | None = Tokens([]) if self._auth else None
        # how many times the tokens were read: a long request checks its credentials again
        # as soon as it changes (a token rotated away ends its live streams at once)
        self.generation = 0
        self.open_routes = frozenset(self._auth.open if self._auth else ())
        self.throttle = FailureThrottle(
            self._auth.max_failures if self._auth else 10,
            self._auth.failure_window if self._auth else 60.0)
        listen_host = config.listen_host_port[0].strip("[]").lower()
        named = api.allowed_hosts or ([listen_host] if listen_host not in ("0.0.0.0", "::")
                                      else [])
        self.any_host = "*" in named
        self.hosts = LOOPBACK_NAMES | {_host_name(h) for h in named if h != "*"}
        self.origins = frozenset(o.strip().rstrip("/").lower() for o in api.allowed_origins)
        self.proxies = list(api.trusted_proxies)

    async def load(self, secrets: SecretResolver) -> None:
        """Read the token values (at start, before the API serves); ConfigError names the
        token whose reference fails, never a value."""
        if self._auth is not None:
            self.tokens = await Tokens.resolve(self._auth, secrets)
            self.generation += 1

    async def reload(self, secrets: SecretResolver) -> list[str]:
        """Read the token values again (rotated files); errors keep the tokens before."""
        try:
            await self.load(secrets)
        except ConfigError as exc:
            log.error("API tokens not reloaded; the tokens read before stay active",
                      error=str(exc))
            return [str(exc)]
        return []

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler
                         ) -> web.StreamResponse:
        route = request.match_info.route.name
        # behind a trusted proxy, the client it names: one noisy client must not get
        # everyone behind the same proxy throttled
        client = forwarded_client(request.remote, request.headers.get("X-Forwarded-For"),
                                  self.proxies) or "?"
        refused = self._browser_check(request)
        if refused is not None:
            reason, response = refused
            return self._refused(response, reason, "anonymous", route, client)
        who: Principal = UNAUTHENTICATED
        if self.tokens is not None and route not in self.open_routes \
                and route not in PUBLIC_ROUTES:
            wait = self.throttle.retry_after(client)
            if wait is not None:
                # logged once, when the address became blocked; counted each time
                metrics.api_refused(route or "-", "throttled")
                return _refuse(429, "too many failed authentications from this address; "
                                    f"retry in {math.ceil(wait)}s",
                               {"Retry-After": str(math.ceil(wait))})
            found, refusal = self._identify(request, route, client)
            if refusal is not None:
                return refusal
            assert found is not None
            who = Principal(found.name, found.role)
        elif self.tokens is not None:
            who = _OPEN_PRINCIPAL
        # known before any 403: the audit trail records who was refused (loopd.api.audit)
        set_principal(request, who)
        if route is not None or request.match_info.http_exception is None:
            needed = ROUTE_ROLES.get(route or "")
            if needed is None:
                log.error("API route has no role in ROUTE_ROLES; refused", route=route)
                return self._refused(_refuse(403, f"route {route!r} has no role; refused"),
                                     "unknown_route", who.name, route, client)
            if not who.may(needed):
                return self._refused(
                    _refuse(403, f"token {who.name!r} has role {who.role.label}; "
                                 f"{request.method} {request.path} needs {needed.label}"),
                    "forbidden", who.name, route, client)
        return await handler(request)

    def over_tls(self, request: web.Request) -> bool:
        """Whether the browser's connection is HTTPS: this one is, or a proxy in
        ``api.trusted_proxies`` says it terminated TLS (``X-Forwarded-Proto: https``), so
        a session cookie behind an ingress is still ``Secure``."""
        if request.secure:
            return True
        proto = request.headers.get("X-Forwarded-Proto", "")
        return proto.split(",")[0].strip().lower() == "https" and \
            is_proxy(request.remote, self.proxies)

    def still_valid(self, request: web.Request) -> bool:
        """Whether the credentials a long request (a live stream) was let in with are still
        good: a token rotated away, or a session expired, ends it."""
        if self.tokens is None or request.match_info.route.name in self.open_routes:
            return True
        header = request.headers.get("Authorization")
        if header is not None:
            return self._authenticate(header) is not None
        cookie = request.cookies.get(SESSION_COOKIE)
        return cookie is not None and self.tokens.from_session(cookie) is not None

    def _identify(self, request: web.Request, route: str | None, client: str
                  ) -> tuple[_Token | None, web.Response | None]:
        """The token of the request's Authorization header or session cookie, or the
        refusal. Read here, not in the middleware: a traceback of the handler's error shows
        the middleware's frame, and the credentials must not be in it."""
        assert self.tokens is not None
        header = request.headers.get("Authorization")
        cookie = request.cookies.get(SESSION_COOKIE)
        if header is None and cookie is not None:
            found = self.tokens.from_session(cookie)
            if found is not None and request.method in _MUTATING and not \
                    _same(request.headers.get(CSRF_HEADER, ""), self.tokens.csrf(cookie)):
                return None, self._refused(
                    _refuse(403, f"{request.method} {request.path} from a signed-in "
                                 f"browser needs the page's {CSRF_HEADER} header"),
                    "csrf", found.name, route, client)
        else:
            found = self._authenticate(header)
        if found is None and header is None and is_page(route) \
                and request.method in ("GET", "HEAD"):
            raise web.HTTPSeeOther("/signin")
        if found is None:
            blocked = self.throttle.failed(client)
            return None, self._refused(
                _refuse(401, "authentication required: send Authorization: Bearer "
                             "<token> (or basic auth with the token's name and the token)",
                        _CHALLENGE),
                "unauthenticated", "anonymous", route, client, blocked=blocked)
        return found, None

    def sign_in(self, request: web.Request, presented: str) -> tuple[_Token | None, str]:
        """A browser's sign-in with a pasted token: the token, or None and why not. A
        wrong token counts against the address like a refused header (the same throttle),
        and is logged without what was presented."""
        route = request.match_info.route.name
        client = forwarded_client(request.remote, request.headers.get("X-Forwarded-For"),
                                  self.proxies) or "?"
        if self.tokens is None:
            return None, "this loopd has no API tokens: nothing to sign in to"
        wait = self.throttle.retry_after(client)
        if wait is not None:
            metrics.api_refused(route or "-", "throttled")
            return None, ("too many failed sign-ins from this address; retry in "
                          f"{math.ceil(wait)}s")
        found = self.tokens.match(presented.strip()) if presented.strip() else None
        if found is None:
            blocked = self.throttle.failed(client)
            metrics.api_refused(route or "-", "unauthenticated")
            log.warning("API request refused", reason="unauthenticated", status=401,
                        token="anonymous", route=route or "-", client=client,
                        **({"blocked": True} if blocked else {}))
            return None, "that token is not one of this loopd's API tokens"
        log.info("browser signed in", token=found.name, client=client)
        return found, ""

    def _authenticate(self, header: str | None) -> _Token | None:
        assert self.tokens is not None
        creds = _credentials(header) if header else None
        if creds is None:
            return None
        user, presented = creds
        token = self.tokens.match(presented)
        if token is None or (user is not None and user != token.name):
            return None
        return token

    def _browser_check(self, request: web.Request) -> tuple[str, web.Response] | None:
        host = request.headers.get("Host")
        if host is not None and not self.any_host:
            name = _host_name(host)
            if name not in self.hosts and name != self._local_address(request):
                return "host", _refuse(421, f"Host {host!r} is not an allowed host of this "
                                            "API (add it to api.allowed_hosts)")
        origin = request.headers.get("Origin")
        if origin is not None:
            normal = origin.strip().rstrip("/").lower()
            own = f"{request.scheme}://{(host or '').strip().lower()}"
            if normal != own and normal not in self.origins:
                return "origin", _refuse(403, f"Origin {origin!r} is not allowed (add it to "
                                              "api.allowed_origins)")
        # an empty body is fine whatever its Content-Type (clients label none
        # application/octet-stream); a browser's empty cross-site POST carries an Origin
        form = request.match_info.route.name in FORM_ROUTES and \
            request.content_type == "application/x-www-form-urlencoded"
        if request.method in _MUTATING and request.body_exists and not form and \
                request.content_type != "application/json":
            given = request.headers.get("Content-Type")
            return "media_type", _refuse(
                415, f"{request.method} {request.path} takes an application/json body "
                     f"(or none), not {given or 'a body without Content-Type'}")
        return None

    @staticmethod
    def _local_address(request: web.Request) -> str | None:
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        if isinstance(sockname, tuple) and sockname:
            return str(sockname[0]).lower()
        return None

    @staticmethod
    def _refused(response: web.Response, reason: str, who: str, route: str | None,
                 client: str, *, blocked: bool = False) -> web.Response:
        metrics.api_refused(route or "-", reason)
        log.warning("API request refused", reason=reason, status=response.status,
                    token=who, route=route or "-", client=client,
                    **({"blocked": True} if blocked else {}))
        return response


def check_exposure(config: LoopdConfig) -> None:
    """Refuse a non-loopback listen without auth; warn when auth is explicitly off."""
    host, port = config.listen_host_port
    auth = config.api.auth
    if auth is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host}:{port} without authentication: configure "
            "api.auth tokens, listen on a loopback address, or set api.auth: none to "
            "accept that anyone who reaches the port may approve, cancel and reload",
            origin=str(config.source_file or "loopd.yaml"))


def warn_if_open(config: LoopdConfig) -> None:
    if config.api.auth == "none":
        host, port = config.listen_host_port
        log.warning("API authentication is off (api.auth: none): anyone who reaches "
                    f"{host}:{port} may approve, cancel, reload and post events",
                    listen=f"{host}:{port}")
