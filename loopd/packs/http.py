"""The http runner: ``runner: http`` actions over one shared aiohttp session.

An action's ``url``, ``headers``, ``query``, ``json`` and ``form`` (and its
``auth.credentials``) are templates, compiled once per action and rendered
with ``{"input": <validated input>, "config": <the pack's config>}``; the
pack config holds deployment data such as a ServiceNow instance URL.

Sending (``send``, also used by python actions that build a request in code):

* The URL must be absolute http(s) and must not contain ``.``/``..`` path
  segments: an input such as ``../sys_user`` would otherwise leave the API path.

* ``None`` values are left out: query parameters, headers, form fields and
  object keys of a JSON body (an optional input that was not given is not
  sent, so a PATCH never blanks a field by accident).
* A status in ``expect`` is success. A 5xx or a connection error is retried
  ``retries`` times (default 2, so 3 attempts) after a short exponential
  backoff: ``backoff * 2**(attempt-1)`` seconds, 0.25 s then 0.5 s by default,
  capped at ``max_backoff``. A 4xx (or any other unexpected status) fails at
  once, as does a TLS error: repeating a request the server refused only
  repeats the refusal.
  Everything happens within the action's ``timeout`` (the Executor's).
* The result is ``{"status", "url", "headers", "json", "text", "attempts"}``:
  ``url`` without userinfo or query string, ``headers`` a few useful response
  headers (content type, location, etag, x-total-count), ``json`` the parsed
  body when the response is JSON (``text`` is then None), else ``text``, the
  body truncated to 64 KiB.
* Errors name the request and the cause:
  ``http POST https://x/api/now/table/incident: 500 Internal Server Error after
  3 attempts: <first 200 characters of the body>``.
* Secrets (credential passwords and tokens, the encoded Authorization value,
  inputs and pack config fields marked ``secret``) are replaced by ``***`` in
  the url, the result and the error; a secret that is itself a URL (a Slack
  webhook) is shown as its origin followed by ``/***``.
* A pack config field marked ``secret`` may be given as a reference
  (``webhook_url: "env:SLACK_WEBHOOK_URL"``, ``file:``, ``dir:`` or ``exec:``, see
  loopd/catalog/credentials.py): it is resolved at each use by the executor's
  resolver, so the value is in no file loopd reads as configuration. Any other
  value (``https://...``) is used as written. Inputs are never resolved: they may
  come from event data.

The session keeps no cookies: actions with different credentials against the
same host must never share a server-side login.
"""

from __future__ import annotations

import asyncio
import base64
import os
import urllib.parse
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from yarl import URL

from loopd.catalog.credentials import SCHEMES
from loopd.catalog.secrets import Secrets, split_url
from loopd.errors import ActionError, ConditionError, ConfigError
from loopd.expr.compiler import WORKFLOW_SCOPE, Compiled, compile_template
from loopd.packs.executor import ActionContext
from loopd.packs.manifest import HttpAction
from loopd.packs.registry import Action

HTTP_SCOPE = WORKFLOW_SCOPE | {"config"}
DEFAULT_EXPECT = (200, 201, 202, 204)
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")
MAX_TEXT = 64 * 1024          # characters of a non-JSON body kept in the result
MAX_BODY = 8 * 1024 * 1024    # bytes read from any response
EXCERPT = 200                 # characters of the body quoted in an error
RESULT_HEADERS = ("content-type", "location", "etag", "x-total-count")
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key",
                            "x-auth-token", "cookie"})


@dataclass(slots=True, frozen=True)
class HttpRequest:
    """One request, rendered and ready to send."""

    method: str
    url: str
    headers: dict[str, Any] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    json_body: Any = None
    form: dict[str, Any] | None = None
    secrets: tuple[str, ...] = ()


def new_session(connect_timeout: float = 10.0) -> aiohttp.ClientSession:
    """A session without a cookie jar; overall deadlines are the action's timeout."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": "loopd"},
    )


async def send(session: aiohttp.ClientSession, req: HttpRequest, *,
               expect: Collection[int] = DEFAULT_EXPECT, retries: int = 2,
               backoff: float = 0.25, max_backoff: float = 4.0) -> dict[str, Any]:
    """Send ``req`` with the retry policy of the module docstring; raise ActionError."""
    secrets = Secrets(req.secrets)
    try:
        url = URL(req.url)
    except (ValueError, TypeError) as exc:
        raise ActionError(f"http {req.method}: invalid url: {exc}") from None
    shown = secrets.text(_display(url))
    what = f"http {req.method} {shown}"
    if not url.is_absolute() or url.scheme not in ("http", "https"):
        raise ActionError(f"{what}: url must be absolute http(s) "
                          "(check the action's input and the pack's config)")
    if _dot_segments(req.url):  # yarl would resolve them: a/b/../../x leaves the API
        raise ActionError(f"{what}: url path must not contain '.' or '..' segments")
    headers = {k: _text(v) for k, v in req.headers.items() if v is not None}
    data: bytes | dict[str, str] | None = None
    if req.json_body is not None:
        try:
            data = orjson.dumps(_strip_none(req.json_body))
        except TypeError as exc:
            raise ActionError(f"{what}: json body is not JSON-serializable: {exc}") from None
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
    elif req.form is not None:
        data = {k: _text(v) for k, v in req.form.items() if v is not None}
    params = _params(req.query)
    attempts = retries + 1
    problem, excerpt = "", ""
    for attempt in range(1, attempts + 1):
        try:
            async with session.request(req.method, url, params=params, headers=headers,
                                       data=data) as resp:
                body = await _read(resp)
                if resp.status in expect:
                    return _result(resp, body, attempt, shown, secrets)
                problem = f"{resp.status} {resp.reason or ''}".rstrip()
                text = " ".join(_decode(resp, body[:4 * EXCERPT]).split())[:EXCERPT]
                excerpt = f": {secrets.text(text)}" if text else ""
                if resp.status < 500:  # the server refused: asking again changes nothing
                    raise ActionError(f"{what}: unexpected status {problem}{excerpt}")
        except aiohttp.ClientSSLError as exc:
            raise ActionError(f"{what}: TLS: {secrets.text(str(exc))}") from None
        except aiohttp.ClientConnectorError as exc:
            err = exc.os_error  # asyncio's strerror repeats the address; errno says why
            reason = (os.strerror(err.errno) if err.errno and err.errno > 0
                      else err.strerror or str(err)) or type(exc).__name__
            problem, excerpt = f"cannot connect: {reason}", ""
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            problem, excerpt = f"connection failed: {str(exc) or type(exc).__name__}", ""
        except (aiohttp.ClientError, ValueError) as exc:  # invalid header, url...
            raise ActionError(f"{what}: {secrets.text(str(exc))}") from None
        if attempt < attempts:
            await asyncio.sleep(min(backoff * 2 ** (attempt - 1), max_backoff))
    plural = "attempt" if attempts == 1 else "attempts"
    raise ActionError(f"{what}: {problem} after {attempts} {plural}{excerpt}")


@dataclass(slots=True, frozen=True)
class CompiledHttp:
    """An http action's templates, compiled once."""

    spec: HttpAction
    method: Compiled
    url: Compiled
    headers: Compiled
    query: Compiled
    json_body: Compiled | None
    form: Compiled | None
    credentials: Compiled | None


def compile_http(spec: HttpAction) -> CompiledHttp:
    """Compile an http action's templates; ValueError names the field (for ``loopd check``)."""

    def tmpl(value: Any, what: str) -> Compiled:
        try:
            return compile_template(value, HTTP_SCOPE)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None

    return CompiledHttp(
        spec=spec, method=tmpl(spec.method, "method"), url=tmpl(spec.url, "url"),
        headers=tmpl(spec.headers, "headers"), query=tmpl(spec.query, "query"),
        json_body=tmpl(spec.json_body, "json") if spec.json_body is not None else None,
        form=tmpl(spec.form, "form") if spec.form is not None else None,
        credentials=tmpl(spec.auth.credentials, "auth.credentials") if spec.auth else None,
    )


class HttpRunner:
    """Runs ``runner: http`` actions (see the module docstring) over one session."""

    def __init__(self, *, backoff: float = 0.25, max_backoff: float = 4.0,
                 connect_timeout: float = 10.0) -> None:
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._compiled: dict[str, CompiledHttp] = {}

    async def run(self, action: Action, input: dict[str, Any], ctx: ActionContext
                  ) -> dict[str, Any]:
        spec = action.spec
        if not isinstance(spec, HttpAction):
            raise ActionError(f"runner http cannot run a {spec.runner} action")
        compiled = self._compile(action.name, spec)
        config = await secret_config(action, ctx)
        scope = {"input": input, "config": config}
        try:
            method = _text(compiled.method(scope)).upper()
            url = _text(compiled.url(scope))
            headers = _mapping(compiled.headers(scope), "headers")
            query = _mapping(compiled.query(scope), "query")
            body = compiled.json_body(scope) if compiled.json_body else None
            form = _mapping(compiled.form(scope), "form") if compiled.form else None
            credentials = compiled.credentials(scope) if compiled.credentials else None
        except ConditionError as exc:
            raise ActionError(f"http {spec.method}: template: {exc}") from None
        if method not in METHODS:
            raise ActionError(f"http: method {method!r} is not one of {', '.join(METHODS)}")
        secrets = [input.get(k) for k in action.secret_inputs]
        secrets += [config.get(k) for k, f in action.pack.manifest.config.items() if f.secret]
        secrets += [v for k, v in headers.items() if k.lower() in SECRET_HEADERS]
        if spec.auth is not None:
            value, hidden = await authorization(spec.auth.type, credentials, ctx)
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers["Authorization"] = value
            secrets += hidden
        req = HttpRequest(method, url, headers, query, body, form,
                          tuple(s for s in secrets if isinstance(s, str)))
        return await send(self._get_session(), req, expect=spec.expect, retries=spec.retries,
                          backoff=self.backoff, max_backoff=self.max_backoff)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session(self.connect_timeout)
        return self._session

    def _compile(self, name: str, spec: HttpAction) -> CompiledHttp:
        cached = self._compiled.get(name)
        if cached is not None and cached.spec is spec:  # a reload brings a new spec
            return cached
        try:
            compiled = self._compiled[name] = compile_http(spec)
        except ValueError as exc:
            raise ActionError(f"http action {exc}") from None
        return compiled


async def secret_config(action: Action, ctx: ActionContext) -> dict[str, Any]:
    """The pack's config with each ``secret`` field given as a reference resolved now."""
    config = ctx.pack_config
    refs = [k for k, f in action.pack.manifest.config.items() if f.secret
            and isinstance(config.get(k), str) and str(config[k]).partition(":")[0] in SCHEMES]
    if not refs:
        return config
    resolved = dict(config)
    for name in refs:
        try:
            resolved[name] = await ctx.secrets.resolve(str(config[name]))
        except ConfigError as exc:
            raise ActionError(f"pack config {action.pack.name}.{name}: {exc}") from None
    return resolved


async def authorization(kind: str, name: Any, ctx: ActionContext) -> tuple[str, list[str]]:
    """The Authorization header value for credentials ``name``, and the secrets it holds."""
    if not isinstance(name, str) or not name:
        raise ActionError(f"auth.credentials rendered to {name!r}, not a credentials name")
    if kind == "basic":
        username = await ctx.secret(name, "username")
        password = await ctx.secret(name, "password")
        if username is None or password is None or ":" in username:
            raise ActionError(f"credentials {name!r} need a username (without ':') and a "
                              "password for basic auth")
        encoded = base64.b64encode(f"{username}:{password}".encode()).decode()
        return f"Basic {encoded}", [password, encoded]
    token = await ctx.secret(name, "token")
    if token is None:
        raise ActionError(f"credentials {name!r} have no token for bearer auth")
    return f"Bearer {token}", [token]


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ActionError(f"{what} must render to a mapping, got {type(value).__name__}")
    return value


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def _params(query: dict[str, Any]) -> list[tuple[str, str]]:
    """Query parameters; a list value repeats its parameter (``?filter=a&filter=b``)."""
    out: list[tuple[str, str]] = []
    for name, value in query.items():
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                out.append((name, _text(item)))
    return out


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


async def _read(resp: aiohttp.ClientResponse) -> bytes:
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_BODY:  # the rest is dropped; the connection is not reused
            break
    return b"".join(chunks)[:MAX_BODY]


def _decode(resp: aiohttp.ClientResponse, body: bytes) -> str:
    try:
        return body.decode(resp.charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


def _result(resp: aiohttp.ClientResponse, body: bytes, attempt: int, shown: str,
            secrets: Secrets) -> dict[str, Any]:
    parsed: Any = None
    text: str | None = None
    ctype = resp.content_type
    is_json = bool(body) and (ctype == "application/json" or ctype.endswith("+json"))
    if is_json:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            is_json = False
    if not is_json:
        text = _decode(resp, body)[:MAX_TEXT]
    result = {
        "status": resp.status, "url": shown,
        "headers": {h: resp.headers[h] for h in RESULT_HEADERS if h in resp.headers},
        "json": parsed, "text": text, "attempts": attempt,
    }
    masked: dict[str, Any] = secrets.tree(result)
    return masked


def _dot_segments(raw: str) -> bool:
    path = split_url(raw).path
    return any(urllib.parse.unquote(seg) in (".", "..") for seg in path.split("/"))


def _display(url: URL) -> str:
    if url.is_absolute():
        url = url.with_user(None)
    return str(url.with_query(None).with_fragment(None))
