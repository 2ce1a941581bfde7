"""The Prometheus HTTP API's instant queries (``/api/v1/query``), for whoever asks:
confirm tasks (``holds``: true or false, like an alerting rule) and ``type: promql``
sources (``query``: the result itself, or a ``QueryError`` saying why there is none).

It lives here, below both ``runs/`` and ``sources/``, so that each can use the one
client without importing the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
import structlog

from loopd.errors import LoopdError

log = structlog.get_logger("loopd.confirm")

# errorType of a Prometheus error answer -> our reason (bounded, a metric label)
_REASONS = {"bad_data": "bad_query", "timeout": "timeout"}
_MAX_ERROR = 300  # characters of Prometheus's own error text kept in a message


class QueryError(LoopdError):
    """Prometheus gave no result for a query. ``reason`` is one of ``unreachable``,
    ``timeout``, ``bad_query`` (Prometheus refused the expression), ``query_failed``
    (it accepted it but could not evaluate it), ``bad_response`` (an answer that is
    not the API's JSON: a proxy's error page, a wrong URL) or ``too_large``."""

    def __init__(self, message: str, *, reason: str, origin: str | None = None) -> None:
        super().__init__(message, origin=origin)
        self.reason = reason


class PromQL:
    """Instant queries against a Prometheus HTTP API (``/api/v1/query``).

    ``holds`` reads a result like an alerting rule: a non-empty vector is true
    (``up == 1`` keeps the series that are up), a scalar is true when non-zero.
    """

    def __init__(self, url: str, timeout: float = 10.0, *, max_bytes: int | None = None
                 ) -> None:
        """``max_bytes``: a larger answer is a ``too_large`` QueryError (None: no limit)."""
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None

    async def query(self, expr: str, *, at: float | None = None,
                    headers: Mapping[str, str] | None = None) -> tuple[str, Any]:
        """``(resultType, result)`` of ``expr`` evaluated at ``at`` (epoch seconds; None:
        Prometheus's now); a QueryError with its reason when there is no result."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            async with self._session.get(f"{self.url}/api/v1/query", params=params,
                                         headers=headers) as resp:
                status = resp.status
                raw = await self._read(resp)
        except TimeoutError:
            raise QueryError(f"no answer within {self.timeout:g}s", reason="timeout") from None
        except aiohttp.ClientError as exc:
            raise QueryError(f"{type(exc).__name__}: {exc}", reason="unreachable") from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict) or body.get("status") not in ("success", "error"):
            raise QueryError(f"HTTP {status} without a Prometheus API answer",
                             reason="bad_response")
        if body["status"] == "error":
            kind = str(body.get("errorType", ""))
            text = str(body.get("error", ""))[:_MAX_ERROR]
            raise QueryError(f"{kind}: {text}" if kind else text,
                             reason=_REASONS.get(kind, "query_failed"))
        data = body.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("resultType"), str):
            raise QueryError("answer without data.resultType", reason="bad_response")
        return data["resultType"], data.get("result")

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        limit = self.max_bytes
        if limit is None:
            return await resp.read()
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):  # never much past the limit
            size += len(chunk)
            if size > limit:
                raise QueryError(f"answer larger than {limit} bytes", reason="too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def holds(self, query: str) -> bool | None:
        """True/False from a vector result; None when Prometheus could not answer."""
        try:
            kind, result = await self.query(query)
        except QueryError as exc:
            log.warning("prometheus query failed", query=query, reason=exc.reason,
                        error=exc.message)
            return None
        if kind == "scalar" and isinstance(result, list):
            return _truthy(result[1])
        if isinstance(result, list):  # alerting semantics: any series left means true
            return len(result) > 0
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _truthy(value: Any) -> bool:
    try:
        return float(value) != 0.0
    except (TypeError, ValueError):
        return False
