"""Redaction: the two ways loopd hides secrets before anything is shown.

* **By key name** (``redact_keys``): the value under any key that looks like it
  holds a secret (``password``, ``token``, ``api_key``, ``authorization``...) is
  replaced by ``***``, at any depth. For data whose secrets loopd does not know
  by value: a run's input, output, context and trigger in the API.
* **By value** (``Secrets``): the secret values an action used (resolved
  credentials, the encoded Authorization header, inputs and pack config fields
  marked ``secret``) are replaced wherever they occur in a text or a tree: in
  results and error messages of runners. A secret that is itself a URL (a
  Slack webhook) is shown as its origin followed by ``/***``, and its path and
  query values are hidden on their own too.

Stdlib only: every layer may import this module.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Collection, Iterable
from typing import Any

MASK = "***"
SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey", "api-key",
                "authorization", "private_key")
MIN_SECRET = 4  # shorter values would mask half of every text; never a real secret anyway


def secret_key(name: object) -> bool:
    """Whether a key's name says its value is a secret."""
    lowered = str(name).lower()
    return any(word in lowered for word in SECRET_WORDS)


def redact_keys(value: Any, also: Collection[str] = ()) -> Any:
    """A copy of ``value`` with the value under every secret-looking key (and every key
    named in ``also``, e.g. an action's ``secret: true`` inputs) replaced by MASK."""
    if isinstance(value, dict):
        return {k: MASK if k in also or secret_key(k) else redact_keys(v, also)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_keys(v, also) for v in value]
    return value


def split_url(url: str) -> urllib.parse.SplitResult:
    """urlsplit that never raises (an unbalanced ``[`` in the host: it is all path)."""
    try:
        return urllib.parse.urlsplit(url)
    except ValueError:
        return urllib.parse.SplitResult("", "", url, "", "")


def _mask(secret: str) -> str:
    parts = split_url(secret)
    if parts.scheme in ("http", "https") and parts.netloc:
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/{MASK}"
    return f"/{MASK}" if secret.startswith("/") else MASK


class Secrets:
    """Known secret values; ``text`` and ``tree`` return copies with each one masked.

    Values that are not strings, or shorter than MIN_SECRET, are ignored.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Iterable[object] = ()) -> None:
        found: set[str] = set()
        for value in values:
            if not isinstance(value, str):
                continue
            found.add(value)
            if value.startswith(("http://", "https://")):
                parts = split_url(value)
                found.add(parts.path)
                found.update(v for _, v in urllib.parse.parse_qsl(parts.query))
        # longest first, so a secret containing another is masked whole
        self._values = sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._values)

    def __repr__(self) -> str:
        return f"Secrets({len(self._values)} values)"

    def text(self, text: str) -> str:
        for secret in self._values:
            if secret in text:
                text = text.replace(secret, _mask(secret))
        return text

    def tree(self, value: Any) -> Any:
        """Mask the secrets in every string (keys stay as they are) of a JSON-like tree."""
        if not self._values:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.tree(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.tree(v) for v in value]
        return value
