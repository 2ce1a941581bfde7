"""Alertmanager silences, cached: the engine asks synchronously, a task refreshes.

The cache holds the active silences from ``GET /api/v2/silences``; matching
follows Alertmanager (every matcher must hold; ``isEqual: false`` negates;
``isRegex`` is a full match). When Alertmanager cannot be reached the last
good list is kept and the failure is logged, so a flaky API never turns
silences off or on by itself.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

log = structlog.get_logger("loopd.silences")


@dataclass(slots=True, frozen=True)
class Silence:
    id: str
    matchers: tuple[tuple[str, str, bool, bool, re.Pattern[str] | None], ...]
    ends: float
    comment: str = ""

    def matches(self, labels: dict[str, Any]) -> bool:
        for name, value, regex, equal, pattern in self.matchers:
            actual = str(labels.get(name, ""))
            hit = bool(pattern.fullmatch(actual)) if regex and pattern else actual == value
            if hit != equal:
                return False
        return True


def parse_silences(body: Any, now: float) -> list[Silence]:
    from loopd.events import parse_time

    out = []
    for item in body if isinstance(body, list) else []:
        if not isinstance(item, dict) or (item.get("status") or {}).get("state") != "active":
            continue
        matchers = []
        broken = False
        for m in item.get("matchers") or []:
            regex = bool(m.get("isRegex"))
            try:
                pattern = re.compile(str(m.get("value", ""))) if regex else None
            except re.error:  # dropping only this matcher would silence more than meant
                log.warning("ignoring a silence with an invalid regex", silence=item.get("id"))
                broken = True
                break
            matchers.append((str(m.get("name")), str(m.get("value", "")), regex,
                             bool(m.get("isEqual", True)), pattern))
        if broken:
            continue
        try:
            ends = parse_time(item.get("endsAt"), origin="alertmanager silence")
        except Exception:  # a silence without a readable end: treat as open-ended
            ends = now + 86400
        out.append(Silence(str(item.get("id")), tuple(matchers), ends,
                           str(item.get("comment") or "")))
    return out


class Silences:
    def __init__(self, url: str, *, refresh: float = 15.0, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.refresh = refresh
        self.timeout = timeout
        self.active: list[Silence] = []
        self.fetched: float | None = None
        self.error: str | None = None

    def match(self, labels: dict[str, Any], now: float) -> Silence | None:
        for silence in self.active:
            if silence.ends > now and silence.matches(labels):
                return silence
        return None

    async def fetch(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(f"{self.url}/api/v2/silences") as resp:
                resp.raise_for_status()
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("cannot read Alertmanager silences; keeping the last list",
                        url=self.url, error=self.error)
            return
        self.active = parse_silences(body, time.time())
        self.fetched, self.error = time.time(), None

    async def run(self) -> None:
        """Refresh forever (a daemon task)."""
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await self.fetch(session)
                await asyncio.sleep(self.refresh)
