"""Scrape source: loopd reads Prometheus ``/metrics`` endpoints itself, every ``interval``.

Targets are the source's ``targets`` (``host:port`` or a URL; the ``instance`` label is
the URL's ``host:port``) and, with ``inventory: true``, every inventory entity with a
``metrics_url`` (its ``instance`` is the entity's name, so events are keyed by it). Each
target has its own loop, started at an offset within the interval derived from its URL
(as Prometheus spreads its targets), so a hundred targets do not all parse at once.

Every kept sample becomes an event: topic ``metrics/<instance>/<metric name>`` (always the
target's instance, whatever the body says; a name that cannot be a topic level is dropped,
see exposition.py), key the instance, data ``{"value": V, "labels": {...}}`` (target
labels ``instance`` and ``job`` included), time the scrape's start (or the sample's own
timestamp), id ``<instance>@<scrape ms>/<series>``: the same scrape of the same series
always has the same id, so a duplicate is recognised by the store. A metric named in
``rate`` is sent as its per-second rate since the previous scrape (a counter reset counts
from zero; the first scrape of a series sends nothing). NaN and infinite samples are
skipped (an event's data is JSON) and count as absent: a series that turns NaN goes stale,
and a rate never starts from a NaN. After the samples, a synthesized ``up`` (1 when the
scrape worked, else 0); a target's own ``up`` arrives as ``exported_up``.

Telemetry: a scraped event feeds ``telemetry[key][field]`` with its value (the event's
``series`` header names the field: the metric name, or ``name{labels}`` for a series
with labels of its own). A series absent from two consecutive scrapes (a failed scrape
included) is stale: the ``up`` event's ``stale`` header lists it and telemetry forgets it.

A failed scrape (timeout, DNS, connection refused, HTTP status, a body over
``max_payload``, text the parser refuses) is counted in
``loopd_scrape_failures_total{source,target,reason}`` and logged with the target and the
reason; it never touches the other targets. Series past ``max_series`` are counted in
``loopd_scrape_series_dropped_total`` and logged once per scrape; series with a name unfit
for a topic are logged with their count.

A scrape's cost is bounded: the body is read into one buffer up to ``max_payload``
(decompressed), split a segment at a time, and not read past ``max_series``; a body over
``_INLINE_BODY`` is parsed in a thread, one at a time per source.

Delivery: ``ack`` is a no-op. There is nothing to redeliver: a sample lost in a crash is
superseded by the next scrape, which reads the target's current state anyway.
"""

from __future__ import annotations

import asyncio
import math
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import structlog

from loopd import metrics
from loopd.catalog.inventory import Inventory
from loopd.config import ScrapeSourceConfig, scrape_url
from loopd.errors import ConfigError
from loopd.events import Delivery, Event
from loopd.sources.base import Emit, OnAssigned
from loopd.sources.exposition import ExpositionError, Labeler, Series, name_filter, parse, rate

log = structlog.get_logger("loopd.scrape")

# text first: its series are parsed once and remembered (see exposition.py)
ACCEPT = "text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;q=0.5"
STALE_SCRAPES = 2  # a series missing from this many scrapes in a row is stale
STALE_SEP = "\n"  # between the fields of the ``stale`` header (a field has no newline)
# bodies up to this size (a node exporter's is 100-300 kB) are parsed on the event loop,
# larger ones in a thread: a thread per scrape would cost more than the parse
_INLINE_BODY = 1024 * 1024
_READ = 256 * 1024  # bytes asked of the response at a time


class ScrapeFailed(Exception):
    """A scrape that gave no samples; ``reason`` is the bounded metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(slots=True)
class Target:
    """One endpoint of a scrape source and what loopd remembers of its last scrapes."""

    url: str
    instance: str
    labeler: Labeler
    origin: str = ""
    known: dict[str, Series] = field(default_factory=dict)  # series text -> Series
    present: dict[str, int] = field(default_factory=dict)   # field -> last scrape number
    last: dict[str, tuple[float, float]] = field(default_factory=dict)  # rated: value, time
    scrapes: int = 0


def target_urls(config: ScrapeSourceConfig, inventory: Inventory) -> dict[str, str]:
    """instance -> URL of every target of ``config``: its ``targets`` (instance
    ``host:port``), then the inventory's entities with a ``metrics_url`` (instance: the
    entity's name). Raises ConfigError naming a bad ``metrics_url`` or no target at all."""
    urls: dict[str, str] = {}
    for target in config.targets:
        url = scrape_url(target, config.metrics_path)
        instance = urlsplit(url).netloc
        if instance in urls:  # their events would be one entity's, their series mixed
            raise ConfigError(f"targets {urls[instance]} and {url} have the same instance "
                              f"{instance}", origin=f"source {config.name}")
        urls[instance] = url
    if config.inventory:
        for name, entity in inventory.entities.items():
            raw = entity.get("metrics_url")
            if raw is None:
                continue
            if not isinstance(raw, str) or "://" not in raw:
                raise ConfigError(f"entity {name}: metrics_url must be an http(s) URL",
                                  origin=f"source {config.name}")
            try:
                urls[name] = scrape_url(raw, config.metrics_path)
            except ValueError as exc:
                raise ConfigError(f"entity {name}: metrics_url: {exc}",
                                  origin=f"source {config.name}") from None
    if not urls:
        raise ConfigError("no targets, and no inventory entity has a metrics_url"
                          if config.inventory else "no targets",
                          origin=f"source {config.name}")
    return urls


def target_problems(sources: Iterable[object], inventory: Inventory) -> list[str]:
    """What ``loopd check`` says about the targets of the scrape sources among ``sources``
    (a source that has none, a bad ``metrics_url``); empty when all is well."""
    problems = []
    for config in sources:
        if isinstance(config, ScrapeSourceConfig):
            try:
                target_urls(config, inventory)
            except ConfigError as exc:
                problems.append(str(exc))
    return problems


class ScrapeSource:
    """Scrapes every target of ``config`` every interval and emits its samples."""

    def __init__(self, config: ScrapeSourceConfig, inventory: Inventory | None = None) -> None:
        self.config = config
        self.name = config.name
        self.on_assigned: OnAssigned | None = None  # never called: nothing is partitioned
        self.timeout = config.scrape_timeout
        keep = name_filter(config.metrics, config.drop)
        rated = name_filter(config.rate, []) if config.rate else _never
        job = config.job or config.name
        self.targets = [
            Target(url, instance, Labeler(keep, rated, {"instance": instance, "job": job},
                                          config.honor_labels), origin=f"scrape {url}")
            for instance, url in target_urls(config, inventory or Inventory()).items()]
        self._connected = False
        self._closed = asyncio.Event()
        # large bodies are parsed one at a time: a hundred 16 MiB bodies at once would be
        # a hundred parses' memory at once
        self._parsing = asyncio.Semaphore(1)

    @property
    def connected(self) -> bool:
        return self._connected

    async def close(self) -> None:
        self._closed.set()

    async def run(self, emit: Emit) -> None:
        """Scrape until close(); a target's failures are its own, never the source's."""
        if self._closed.is_set():
            return
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=2)
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as http:
            loops = [asyncio.create_task(self._loop(t, http, emit),
                                         name=f"loopd scrape {self.name} {t.instance}")
                     for t in self.targets]
            self._connected = True
            metrics.source_up(self.name, True)
            try:
                await self._closed.wait()
            finally:
                self._connected = False
                for task in loops:
                    task.cancel()
                await asyncio.gather(*loops, return_exceptions=True)

    async def _loop(self, target: Target, http: aiohttp.ClientSession, emit: Emit) -> None:
        interval = self.config.interval
        offset = zlib.crc32(target.url.encode()) % 1000 / 1000 * interval
        start = time.monotonic() + offset
        while True:
            now = time.monotonic()
            # a round that ran long (emit waited on a full engine queue) skips the ticks
            # it missed rather than scraping twice in a row
            start += max(0, math.ceil((now - start) / interval)) * interval
            await asyncio.sleep(start - now)
            start += interval
            try:
                await self.scrape_once(target, http, emit)
            except Exception as exc:  # supervised boundary: one target never stops the rest
                log.exception("scrape round failed", source=self.name, target=target.instance,
                              error=f"{type(exc).__name__}: {exc}")

    async def scrape_once(self, target: Target, http: aiohttp.ClientSession, emit: Emit
                          ) -> int:
        """Scrape ``target`` once and emit its events; returns how many it emitted."""
        now = time.time()
        target.scrapes += 1
        events: list[Event] = []
        try:
            body, openmetrics = await self._fetch(target, http)
            if len(body) > _INLINE_BODY:  # a large body would hold the event loop up
                async with self._parsing:
                    events = await asyncio.to_thread(self._events, target, body, openmetrics,
                                                     now)
            else:
                events = self._events(target, body, openmetrics, now)
            up = True
        except ScrapeFailed as exc:
            metrics.scrape_failed(self.name, target.instance, exc.reason, str(exc))
            up = False
        events.append(self._up(target, now, up=up))
        for event in events:
            # blocks while the engine's queue is full: that is the backpressure
            await emit(Delivery(event))
        metrics.scraped(self.name, len(events))
        return len(events)

    async def _fetch(self, target: Target, http: aiohttp.ClientSession) -> tuple[str, bool]:
        limit = self.config.max_payload
        try:
            async with asyncio.timeout(self.timeout), http.get(
                    target.url, headers={"Accept": ACCEPT}, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ScrapeFailed("http", f"HTTP {resp.status} {resp.reason or ''}".strip())
                # aiohttp un-gzips as it reads, so the limit is on the decompressed body;
                # one buffer that grows, not bytes concatenated (quadratic)
                body = bytearray()
                while len(body) <= limit and not resp.content.at_eof():
                    body += await resp.content.read(min(_READ, limit + 1 - len(body)))
                kind = resp.headers.get("Content-Type", "")
        except TimeoutError:
            raise ScrapeFailed("timeout", f"no complete answer within {self.timeout:g}s"
                               ) from None
        except aiohttp.ClientResponseError as exc:
            raise ScrapeFailed("http", f"{type(exc).__name__}: {exc.message}") from None
        except aiohttp.ClientConnectorDNSError as exc:
            raise ScrapeFailed("dns", f"{type(exc).__name__}: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ScrapeFailed("connection", f"{type(exc).__name__}: {exc}") from None
        if len(body) > limit:
            raise ScrapeFailed("too_large", f"body exceeds max_payload ({limit} bytes)")
        try:
            text = body.decode()
            del body  # the text is all that is kept of it
        except UnicodeDecodeError as exc:
            raise ScrapeFailed("parse", f"body is not UTF-8: {exc.reason}") from None
        return text, kind.startswith("application/openmetrics-text")

    def _events(self, target: Target, body: str, openmetrics: bool, now: float
                ) -> list[Event]:
        """The events of one scrape's body (in a thread when it is large)."""
        try:
            parsed = parse(body, openmetrics=openmetrics, known=target.known,
                           labeler=target.labeler, limit=self.config.max_series)
        except ExpositionError as exc:
            raise ScrapeFailed("parse", str(exc)) from None
        target.known = parsed.seen
        if parsed.beyond:
            metrics.scrape_dropped(self.name, target.instance, parsed.beyond,
                                   self.config.max_series)
        if parsed.unsafe:
            metrics.scrape_unsafe(self.name, target.instance, parsed.unsafe)
        source, origin, key, scrape = self.name, target.origin, target.instance, target.scrapes
        present = target.present
        prefix = f"{key}@{round(now * 1000)}/"
        isfinite = math.isfinite
        events = []
        for (fld, topic, labels, headers, rated), value, stamp in parsed.rows:
            if not isfinite(value):  # absent: it goes stale, and is never a rate's base
                continue
            when = now if stamp is None else stamp
            present[fld] = scrape
            if rated:
                per_second = rate(target.last, fld, value, when)
                if per_second is None:
                    continue
                value = per_second
            events.append(Event(prefix + fld, source, topic, {"value": value, "labels": labels},
                                key, when, headers, {}, origin))
        return events

    def _up(self, target: Target, now: float, *, up: bool) -> Event:
        """The synthesized ``up`` of a scrape, with the fields that went stale in it."""
        labels = {"instance": target.instance, "job": self.config.job or self.name}
        headers = {"series": "up"}
        stale = [f for f, n in target.present.items() if target.scrapes - n >= STALE_SCRAPES]
        if stale:
            for f in stale:
                del target.present[f]
                target.last.pop(f, None)
            headers["stale"] = STALE_SEP.join(stale)
        return Event(f"{target.instance}@{round(now * 1000)}/up", self.name,
                     f"metrics/{target.instance}/up", {"value": 1 if up else 0, "labels": labels},
                     target.instance, now, headers, {}, target.origin)


def _never(name: str) -> bool:
    return False

