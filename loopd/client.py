"""A small client of a running daemon's HTTP API, for the terminal commands (``loopd runs``,
``show``, ``decisions``, ``approve``, ``reject``).

Blocking (urllib): a command makes a few requests and prints, nothing runs beside it. The
token is sent as ``Authorization: Bearer``; it comes from ``LOOPD_TOKEN`` or a file
(``token_from``), never from the command line, where ``ps`` would show it, and no message
of this module contains it. Errors are ``ClientError``: ``Unreachable`` when nothing
answers at the URL, ``ApiError`` with the API's own message otherwise.

API times are RFC 3339 strings (``2026-12-01T16:39:41.123Z``); daemons before that change
sent epoch seconds: ``epoch`` reads both.
"""

from __future__ import annotations

import http.client
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from loopd import units

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT = 30.0


class ClientError(Exception):
    """A request to the daemon failed; the message says why and never holds the token."""


class Unreachable(ClientError):
    """Nothing answers at the URL (refused, unknown host, timed out, TLS failed)."""


class ApiError(ClientError):
    """The API answered with an error status; ``str`` is its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def token_from(file: Path | None) -> str | None:
    """The API token: the first line of ``file`` when given, else ``LOOPD_TOKEN``, else
    none (a daemon without ``api.auth``)."""
    if file is not None:
        try:
            text = file.read_text()
        except OSError as exc:
            raise ClientError(f"cannot read the token file {file}: {exc.strerror}") from None
        lines = text.strip().splitlines()
        return _checked(lines[0].strip() if lines else "", f"the token file {file}")
    token = os.environ.get("LOOPD_TOKEN")
    return _checked(token.strip(), "LOOPD_TOKEN") if token else None


def _checked(token: str, where: str) -> str:
    """``token`` when a header can carry it: http.client's own error would quote it."""
    if not token:
        raise ClientError(f"{where} is empty")
    if not all(33 <= ord(ch) <= 126 for ch in token):
        raise ClientError(f"{where} holds a character a token cannot have (a space, a "
                          "control or non-ASCII character)")
    return token


def epoch(value: Any) -> float | None:
    """An API time (RFC 3339 string, or epoch seconds from an older daemon) as epoch
    seconds; None when absent or unreadable."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return units.parse_time(str(value))
    except ValueError:
        return None


def shown_url(url: str) -> str:
    """``url`` without user and password, for messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The API never redirects: a redirect is refused, not followed, since urllib would
    send the Authorization header on to wherever it points."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        return None


class Client:
    """GET and POST against one daemon's API (``url`` like ``http://127.0.0.1:8080``)."""

    def __init__(self, url: str, token: str | None = None, *,
                 cafile: Path | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"--url {shown_url(url)!r} is not an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ClientError(f"--url {shown_url(url)}: no user or password in the URL; the "
                              "token comes from LOOPD_TOKEN or --token-file")
        self.url = url.rstrip("/")
        self.token = token
        context = ssl.create_default_context(cafile=cafile) if cafile else None
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    def get(self, path: str, **query: str | int | None) -> Any:
        return self._call("GET", path, query)

    def post(self, path: str, **query: str | int | None) -> Any:
        return self._call("POST", path, query)

    def _call(self, method: str, path: str, query: dict[str, str | int | None]) -> Any:
        params = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        target = self.url + path + (f"?{params}" if params else "")
        request = urllib.request.Request(target, method=method,
                                         headers={"Accept": "application/json"})
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        where = shown_url(self.url)
        try:
            with self._opener.open(request, timeout=TIMEOUT) as answer:
                body = answer.read()
        except urllib.error.HTTPError as exc:
            with exc:
                if 300 <= exc.code < 400:
                    raise ClientError(
                        f"{where}{path} answered {exc.code}, a redirect: not followed (the "
                        "token is sent to --url only); give the address it names as "
                        "--url") from None
                raise ApiError(exc.code, _message(exc.code, exc.read())) from None
        except urllib.error.URLError as exc:
            raise Unreachable(f"cannot reach the loopd API at {where}: {exc.reason}") from None
        except OSError as exc:  # timed out, or the connection broke while reading
            raise Unreachable(f"cannot reach the loopd API at {where}: {exc}") from None
        except http.client.HTTPException as exc:
            raise Unreachable(f"{where} does not answer as an HTTP server does "
                              f"({type(exc).__name__}): is it loopd's API?") from None
        try:
            return orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            raise ClientError(f"{where}{path} answered something that is not JSON: is it "
                              "loopd's API?") from None


def _message(status: int, body: bytes) -> str:
    """The API's error message (``{"error": ...}``), else the start of the body."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return f"{status}: {data['error']}"
    text = body.decode("utf-8", "replace").strip()[:200]
    return f"{status}: {text or 'no message'}"
