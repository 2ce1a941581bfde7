"""``type: promql`` source: PromQL queries a Prometheus evaluates, as alerts without
Alertmanager.

Every ``interval`` each query is evaluated (instant queries, ``/api/v1/query``, all of a
round concurrently). Each series of a result is an event on topic ``promql/<query>``,
key its ``key_label`` label, data ``{"value", "labels", "status": "firing",
"fingerprint"}``; a series that was in the previous result and is not in this one gives
one event with ``status: resolved`` (``value`` null). ``fingerprint`` (source, query and
series labels hashed) is what Alertmanager's alerts carry too, so a resolved series
cancels the runs its firing events started that have not acted yet, as a resolved alert
does. A series without the key label is rejected (counted, logged once per round), not
tracked.

Rounds are aligned to the wall clock: round ``t`` is evaluated with ``time=t`` (a
multiple of the interval), and an event's id is its fingerprint, ``t`` and status. So
every replica polling the same Prometheus makes the same events with the same ids and the
store decides each once; a restart within a round repeats that round's ids.

Failures: an unreachable or slow Prometheus, a refused expression, a result that is not
an instant vector (a scalar, a string, a range vector) is counted in
``loopd_promql_errors_total{source,query,reason}`` and logged with the query and reason;
nothing changes for that query's series (no event, none resolved: unknown is not
resolved) and the source keeps polling. ``loopd_source_up`` (and ``connected``, which
``/readyz`` reads) says whether every query of the last round was answered.

Restarts: the series each query has firing are kept in the store's key-value space
(``promql``, source name), written whenever they change. A series that was firing and
still is goes on with fresh round ids (an incident still open is joined, not opened
again); one that left the result while loopd was down gives its resolved event on the
first round that answers. A series stays listed, marked resolving, until the engine has
decided its resolved event (the event's ``ack``), so a crash before that repeats the
resolved event with the same id instead of losing it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from loopd import metrics
from loopd.catalog.credentials import resolve_secret
from loopd.catalog.prometheus import PromQL, QueryError
from loopd.config import PromQLQuery, PromQLSourceConfig
from loopd.errors import ConfigError
from loopd.events import Delivery, Event
from loopd.sources.base import Emit, OnAssigned, until_closed
from loopd.store.base import Store

log = structlog.get_logger("loopd.sources")

KV_NAMESPACE = "promql"  # (KV_NAMESPACE, source name) -> query -> fingerprint -> series


@dataclass(slots=True)
class Series:
    """One series a query has firing; ``resolved_at`` is set from the round it left the
    result until the engine has decided its resolved event."""

    key: str
    labels: dict[str, str]
    resolved_at: float | None = None


def fingerprint(source: str, query: str, labels: dict[str, str]) -> str:
    """Stable across processes and replicas: a hash of source, query and labels."""
    canon = orjson.dumps([source, query, labels], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canon, digest_size=8).hexdigest()


def round_number(now: float, interval: float) -> int:
    """The round ``now`` falls in; round n is evaluated at ``n * interval`` (computed alike
    on every replica: same times, same event ids)."""
    return math.floor(now / interval)


UNREACHED = ("unreachable", "timeout", "credentials", "bad_response")  # no answer from Prometheus


class PromQLSource:
    """The queries of ``config``, evaluated every ``config.interval`` against its URL."""

    def __init__(self, config: PromQLSourceConfig, store: Store | None = None) -> None:
        """``store``: where the firing series are kept across restarts (None: in memory
        only, so series that resolve while loopd is down give no resolved event)."""
        for ref in (config.bearer_token_ref, config.password_ref):
            if ref is not None:
                resolve_secret(ref)  # fail at startup, not on every round
        self.config = config
        self.name = config.name
        self.on_assigned: OnAssigned | None = None  # never called: nothing is partitioned
        self._store = store
        self._client = PromQL(config.url, config.query_timeout, max_bytes=config.max_payload)
        self._series: dict[str, dict[str, Series]] = {q.name: {} for q in config.queries}
        self._loaded = False
        self._dirty = False  # the series changed since they were last written
        self._connected = False
        self._reported: bool | None = None  # what loopd_source_up says now
        self._closed = asyncio.Event()

    @property
    def connected(self) -> bool:
        """True while Prometheus answered the last round (``loopd_source_up``: every
        query of it answered)."""
        return self._connected

    async def run(self, emit: Emit) -> None:
        """Evaluate round after round until close(); raises only if the store fails."""
        if self._closed.is_set():
            return
        try:
            await until_closed(self._rounds(emit), self._closed, self.name)
        finally:
            self._connected = False
            self._reported = None  # the supervisor reports the source down
            await self._client.close()

    async def close(self) -> None:
        self._closed.set()

    async def _rounds(self, emit: Emit) -> None:
        interval = self.config.interval
        if not self._loaded:
            await self._load()
            self._loaded = True
        n = round_number(time.time(), interval)  # the current round, at once
        while True:
            await self._round(n * interval, emit)
            # a round that took longer than the interval skips the rounds it overran
            n = max(n + 1, round_number(time.time(), interval))
            await asyncio.sleep(max(0.0, n * interval - time.time()))

    async def _round(self, at: float, emit: Emit) -> None:
        queries = self.config.queries
        try:
            headers = await self._headers()
        except ConfigError as exc:  # a secret that vanished or a file gone unreadable
            for query in queries:
                metrics.promql_failed(self.name, query.name, "credentials", exc)
            self._report(False)
            return
        answers = await asyncio.gather(
            *(self._client.query(q.expr, at=at, headers=headers) for q in queries),
            return_exceptions=True)
        deliveries: list[Delivery] = []
        answered, reached = True, False
        for query, answer in zip(queries, answers, strict=True):
            try:
                if isinstance(answer, BaseException):
                    raise answer  # a QueryError is handled below; anything else is a bug
                deliveries += self._evaluate(query, *answer, at)
                reached = True
            except QueryError as exc:
                metrics.promql_failed(self.name, query.name, exc.reason, exc.message)
                answered = False
                reached = reached or exc.reason not in UNREACHED
        if self._dirty:
            await self._save()  # resolving series are listed before their events go out
        for delivery in deliveries:
            metrics.event_received(self.name)
            await emit(delivery)  # blocks while the engine queue is full: backpressure
        self._report(answered, reached)

    def _evaluate(self, query: PromQLQuery, kind: str, result: Any, at: float
                  ) -> list[Delivery]:
        """The deliveries of one query's answer; updates its series. QueryError (and no
        change) when the answer is not an instant vector."""
        if kind != "vector":
            what = {"scalar": "a scalar", "string": "a string", "matrix": "a range vector"}
            raise QueryError(
                f"the result is {what.get(kind, repr(kind))}, not an instant vector: a "
                f"promql source needs series (one event each)", reason="result_type")
        if not isinstance(result, list):
            raise QueryError("a vector result that is not a list", reason="bad_response")
        seen: dict[str, tuple[str, dict[str, str], float | None]] = {}
        unkeyed: list[dict[str, str]] = []
        for item in result:
            labels, value = _sample(item)
            key = labels.get(query.key_label)
            if key is None:
                unkeyed.append(labels)
                continue
            seen[fingerprint(self.name, query.name, labels)] = (key, labels, value)
        limit = self.config.max_series
        if len(seen) > limit:
            # the same series are kept each round (by fingerprint), so none flaps between
            # firing and resolved because another one took its place
            kept = sorted(seen)[:limit]
            metrics.promql_too_many(self.name, query.name, len(seen) - limit, limit)
            seen = {fp: seen[fp] for fp in kept}
        if unkeyed:
            metrics.promql_unkeyed(self.name, query.name, query.key_label, len(unkeyed),
                                   unkeyed[0])
        series = self._series[query.name]
        out = []
        for fp, (key, labels, value) in seen.items():
            known = series.get(fp)
            if known is None or known.resolved_at is not None:
                if known is not None:  # resolved while down, and back: both happened
                    out.append(self._resolved(query, fp, known))
                series[fp] = Series(key, labels)
                self._dirty = True
            out.append(Delivery(self._event(query, fp, key, labels, value, "firing", at)))
        for fp, known in series.items():
            if fp not in seen:
                if known.resolved_at is None:
                    known.resolved_at = at
                    self._dirty = True
                out.append(self._resolved(query, fp, known))  # again, until decided
        return out

    def _resolved(self, query: PromQLQuery, fp: str, known: Series) -> Delivery:
        at = known.resolved_at
        assert at is not None
        event = self._event(query, fp, known.key, known.labels, None, "resolved", at)
        return Delivery(event, self._forget(query.name, fp, known))

    def _forget(self, query: str, fp: str, known: Series) -> Callable[[], None]:
        """The ack of a resolved event: its series is no longer listed (unless it fired
        again meanwhile: then it is another Series)."""
        def ack() -> None:
            series = self._series[query]
            if series.get(fp) is known:
                del series[fp]
                self._dirty = True
        return ack

    def _event(self, query: PromQLQuery, fp: str, key: str, labels: dict[str, str],
               value: float | None, status: str, at: float) -> Event:
        return Event(
            id=f"{fp}:{round(at * 1000)}:{status}", source=self.name,
            topic=f"promql/{query.name}", key=key, time=at,
            data={"value": value, "labels": labels, "status": status, "fingerprint": fp},
            origin=f"promql {self.name} query {query.name}")

    def _report(self, up: bool, reached: bool | None = None) -> None:
        """``loopd_source_up``: every query of the round answered; ``connected`` (what
        /readyz reads): Prometheus answered at all. A typo in one query is a metric and a
        log line, not a daemon taken out of its Service."""
        self._connected = up if reached is None else reached
        if up != self._reported:
            self._reported = up
            metrics.source_up(self.name, up)

    async def _headers(self) -> dict[str, str] | None:
        # resolved every round (in a thread: a file read) so a rotated secret is picked up
        cfg = self.config
        if cfg.bearer_token_ref is not None:
            token = await asyncio.to_thread(resolve_secret, cfg.bearer_token_ref)
            return {"Authorization": f"Bearer {token}"}
        if cfg.username is not None and cfg.password_ref is not None:
            password = await asyncio.to_thread(resolve_secret, cfg.password_ref)
            pair = base64.b64encode(f"{cfg.username}:{password}".encode()).decode()
            return {"Authorization": f"Basic {pair}"}
        return None

    async def _load(self) -> None:
        if self._store is None:
            return
        saved = await self._store.kv_get(KV_NAMESPACE, self.name)
        for query, listed in (saved.items() if isinstance(saved, dict) else ()):
            series = self._series.get(query)
            if series is None:
                log.info("promql query no longer configured; its firing series are "
                         "forgotten", source=self.name, query=query)
                continue
            for fp, item in (listed.items() if isinstance(listed, dict) else ()):
                with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
                    resolved = item.get("resolved_at")
                    series[fp] = Series(str(item["key"]), {
                        str(k): str(v) for k, v in item["labels"].items()},
                        None if resolved is None else float(resolved))

    async def _save(self) -> None:
        if self._store is None:
            self._dirty = False
            return
        snapshot = {
            query: {fp: {"key": s.key, "labels": s.labels, "resolved_at": s.resolved_at}
                    for fp, s in series.items()}
            for query, series in self._series.items()}
        # cleared first: an ack while the write is in flight marks the series dirty again
        self._dirty = False
        try:
            await self._store.kv_put(KV_NAMESPACE, self.name, snapshot)
        except BaseException:
            self._dirty = True
            raise


def _sample(item: Any) -> tuple[dict[str, str], float | None]:
    """One series of a vector: its labels and value (None for NaN and infinities, which
    JSON cannot carry)."""
    if not isinstance(item, dict) or not isinstance(item.get("metric"), dict):
        raise QueryError("a series without metric labels", reason="bad_response")
    sample: Any = item.get("value")
    try:
        value = float(sample[1])  # [time, "value"]
    except (TypeError, ValueError, IndexError, KeyError):
        raise QueryError("a series without a value (a native histogram?)",
                         reason="bad_response") from None
    labels = {str(k): str(v) for k, v in item["metric"].items()}
    return labels, value if math.isfinite(value) else None
