"""Every ``loopd_*`` metric and its log line, defined once.

One function per observable thing: it updates the metric and logs together,
so a log line and a counter never disagree. Labels are bounded (source, rule,
workflow, action, status, reason); never an event id or a host.

The metrics live in a ``Metrics`` object that owns its own ``CollectorRegistry``:
one per daemon, so two daemons in one process (the tests, the simulator next to a
daemon) never add to each other's counts. The functions below update the *current*
``Metrics``: the one a daemon installs with ``use`` at the start of its ``run()``
(the tasks it creates inherit it with their context), else a process default for
code running outside any daemon (the engine's unit tests, ``loopd simulate``).
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

log = structlog.get_logger("loopd")

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double the exposition for no operator value


class Metrics:
    """One daemon's ``loopd_*`` metrics, registered on a registry of its own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.events_received = Counter(
            "loopd_events_received_total", "Events received from sources", ["source"],
            registry=r)
        self.events_rejected = Counter(
            "loopd_events_rejected_total", "Messages that could not become events",
            ["source", "reason"], registry=r)
        self.events_duplicate = Counter(
            "loopd_events_duplicate_total", "Redelivered events recognised by id", ["source"],
            registry=r)
        self.rule_matches = Counter(
            "loopd_rule_matches_total", "Events that matched a rule", ["rule"], registry=r)
        self.rule_errors = Counter(
            "loopd_rule_errors_total", "Condition or template errors while evaluating a rule",
            ["rule"], registry=r)
        self.memory_evictions = Counter(
            "loopd_memory_evictions_total",
            "Entries of bounded in-memory state forgotten: their window or TTL passed "
            "(expired), or the maximum forced them out (full)", ["what", "reason"], registry=r)
        self.decisions = Counter(
            "loopd_decisions_total", "Decisions recorded", ["rule", "outcome"], registry=r)
        self.decision_seconds = Histogram(
            "loopd_event_decision_seconds", "From event received to decision durable",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=r)
        self.queue_depth = Gauge(
            "loopd_queue_depth", "Deliveries waiting for the engine", registry=r)
        self.source_up = Gauge(
            "loopd_source_up", "1 while the source is connected", ["source"], registry=r)
        self.rules_loaded = Gauge("loopd_rules_loaded", "Rules currently loaded", registry=r)
        self.rule_load_errors = Gauge(
            "loopd_rules_load_errors", "Rule errors at the last (re)load", registry=r)
        self.runs = Counter(
            "loopd_runs_total", "Runs finished", ["workflow", "status"], registry=r)
        self.run_seconds = Histogram(
            "loopd_run_duration_seconds", "Run duration", ["workflow"], registry=r,
            buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600))
        self.action_seconds = Histogram(
            "loopd_action_duration_seconds", "Action duration", ["action", "status"],
            registry=r, buckets=(0.005, 0.05, 0.25, 1, 5, 15, 60, 300))
        self.runs_active = Gauge("loopd_runs_active", "Runs executing now", registry=r)
        self.confirmations = Counter(
            "loopd_confirmations_total", "Confirm task results", ["workflow", "result"],
            registry=r)
        self.time_to_fix = Histogram(
            "loopd_time_to_fix_seconds",
            "From the first event of an incident to its confirmed fix", ["rule"], registry=r,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600))
        self.guard_suppressions = Counter(
            "loopd_guard_suppressions_total", "Runs a guard kept from starting",
            ["rule", "guard"], registry=r)
        self.circuit_open = Gauge(
            "loopd_circuit_open", "1 while the rule's circuit breaker is open", ["rule"],
            registry=r)
        self.budget_remaining = Gauge(
            "loopd_budget_remaining", "Runs left in the rule's budget window", ["rule"],
            registry=r)
        self.outcomes = Counter(
            "loopd_run_outcomes_total", "Run outcomes", ["workflow", "outcome"], registry=r)
        self.api_refused = Counter(
            "loopd_api_refused_total", "API requests refused: by the gate (unauthenticated, "
            "forbidden, throttled, host, origin, media_type) or a limit (body, batch, "
            "concurrency, queue, decision)", ["route", "reason"], registry=r)
        self.ingest_requests = Counter(
            "loopd_ingest_requests_total", "Ingest requests, by source and the principal "
            "(token name) that posted them", ["source", "principal"], registry=r)
        self.audit_failures = Counter(
            "loopd_audit_write_failures_total", "Audit records the store could not write "
            "(before acting: the call was refused 503; after: its result is missing)",
            ["action", "phase"], registry=r)
        self.runs_taken_over = Counter(
            "loopd_runs_taken_over_total", "Runs this replica took over from a replica silent "
            "for longer than the lease", registry=r)
        self.lease_lost = Counter(
            "loopd_lease_lost_total", "Runs this replica stopped because another took them "
            "over (it was silent for longer than the lease: paused, partitioned)", registry=r)
        # source -> (when, "Type: message") of its last failure, for the web UI's sources page
        self.source_errors: dict[str, tuple[float, str]] = {}
        self.commands_forwarded = Counter(
            "loopd_run_commands_total", "Run commands (approve, reject, cancel) handed to "
            "another replica through the store, or carried out here for another",
            ["kind", "direction"], registry=r)
        self.promql_errors = Counter(
            "loopd_promql_errors_total", "PromQL source queries that gave no result, by "
            "reason (unreachable, timeout, bad_query, query_failed, result_type, "
            "bad_response, too_large, credentials)", ["source", "query", "reason"], registry=r)


        # scrape sources: the target label is bounded by the config (its targets and the
        # inventory's entities with a metrics_url), never by what a target exposes
        self.scrape_failures = Counter(
            "loopd_scrape_failures_total", "Scrapes that gave no samples (reason: timeout, "
            "dns, connection, http, too_large, parse)", ["source", "target", "reason"], registry=r)
        self.correlation_state = Gauge(
            "loopd_correlation_state", "Correlation state held (kind: group, absent, all): "
            "partial groups, armed absence timers, partial all matches", ["kind"], registry=r)
        self.scrape_dropped = Counter(
            "loopd_scrape_series_dropped_total", "Series of a scrape dropped past the "
            "source's max_series", ["source", "target"], registry=r)

        # labelled children kept once: ``labels()`` costs 1.7-2.1 us a call (a lock, a
        # tuple, a dict lookup), an increment of a kept child 0.5 us (issue 15)
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def child(self, metric: Counter, *labels: str) -> Any:
        """``metric.labels(*labels)``, made once per label values and kept. Only for
        metrics whose series are never removed (none of loopd's are)."""
        slot = (metric, labels)
        kid = self._children.get(slot)
        if kid is None:
            kid = self._children[slot] = metric.labels(*labels)
        return kid

    def exposition(self, names: list[str] | None = None) -> bytes:
        """The text exposition; ``names``: only these samples (``name[]`` of a scrape)."""
        if names:
            return generate_latest(self.registry.restricted_registry(names))
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """The sample's current value; 0 for a series not seen yet."""
        return self.registry.get_sample_value(name, labels) or 0.0


_PROCESS = Metrics()  # for code running outside any daemon
_CURRENT: contextvars.ContextVar[Metrics] = contextvars.ContextVar("loopd_metrics")


def current() -> Metrics:
    """The metrics of the daemon this code runs for (the process default outside one)."""
    return _CURRENT.get(_PROCESS)


def use(m: Metrics) -> contextvars.Token[Metrics]:
    """Make ``m`` current in this context and in every task created from it from now on."""
    return _CURRENT.set(m)


@contextlib.contextmanager
def using(m: Metrics) -> Iterator[Metrics]:
    """``m`` is current inside the block, and the previous one again after it."""
    token = _CURRENT.set(m)
    try:
        yield m
    finally:
        _CURRENT.reset(token)


def exposition(names: list[str] | None = None) -> bytes:
    return _CURRENT.get(_PROCESS).exposition(names)


def event_received(source: str, n: int = 1) -> None:
    """``n`` events received from ``source`` (a source counts a batch at once)."""
    m = _CURRENT.get(_PROCESS)
    m.child(m.events_received, source).inc(n)


def event_rejected(source: str, reason: str, error: object, **where: object) -> None:
    _CURRENT.get(_PROCESS).events_rejected.labels(source, reason).inc()
    log.warning("event rejected", source=source, reason=reason, error=str(error), **where)


def event_duplicate(source: str, event_id: str) -> None:
    _CURRENT.get(_PROCESS).events_duplicate.labels(source).inc()
    log.debug("duplicate event ignored", source=source, event_id=event_id)


def rule_matched(rule: str, n: int = 1) -> None:
    m = _CURRENT.get(_PROCESS)
    m.child(m.rule_matches, rule).inc(n)


def rules_matched(counts: Mapping[str, int]) -> None:
    """What a batch matched, per rule (the engine counts per batch, not per event)."""
    m = _CURRENT.get(_PROCESS)
    for rule, n in counts.items():
        m.child(m.rule_matches, rule).inc(n)


def rule_failed(rule: str, field: str, error: object, *, source: str, event_id: str,
                origin: str) -> None:
    """A rule's ``field`` (``if``, ``key``, ``run.input``) failed on one event, which is
    recorded as an ``error`` decision."""
    _CURRENT.get(_PROCESS).rule_errors.labels(rule).inc()
    log.warning("rule evaluation failed; recorded as an error decision", rule=rule,
                field=field, error=str(error), source=source, event_id=event_id,
                event_origin=origin)


def evicted(what: str, n: int, *, full: bool = False) -> None:
    """``n`` entries of ``what`` (telemetry, throttle, for_timers, ...) forgotten: their
    time passed, or (``full``) the maximum forced them out while still in use."""
    if n:
        _CURRENT.get(_PROCESS).memory_evictions.labels(
            what, "full" if full else "expired").inc(n)


def memory_full(what: str, max_keys: int, loses: str) -> None:
    """``what`` reached its maximum with every entry still in use; logged once per holder
    (``loopd_memory_evictions_total{reason="full"}`` counts every entry after)."""
    log.warning("bounded memory is full; evicting the least recently used entries",
                what=what, max_keys=max_keys, loses=loses)


def event_decided(seconds: float) -> None:
    """An event's decisions are durable and it is acknowledged, ``seconds`` after receipt."""
    _CURRENT.get(_PROCESS).decision_seconds.observe(seconds)


def events_decided(done: float, received: Iterable[float]) -> None:
    """A batch's events are durable and acknowledged at ``done`` (monotonic), each
    ``done - received`` after its receipt: observed into the histogram as one update
    per bucket instead of one locked ``observe`` per event (the same counts and sum)."""
    hist = _CURRENT.get(_PROCESS).decision_seconds
    bounds = _bounds(hist)
    counts = [0] * len(bounds)
    total, n = 0.0, 0
    for at in received:
        seconds = done - at
        counts[bisect.bisect_left(bounds, seconds)] += 1
        total += seconds
        n += 1
    if not n:
        return
    # prometheus-client keeps one value per bucket (_buckets) and the sum (_sum); both are
    # what observe() itself increments
    buckets = hist._buckets
    for i, c in enumerate(counts):
        if c:
            buckets[i].inc(c)
    hist._sum.inc(total)


def _bounds(hist: Histogram) -> list[float]:
    bounds: list[float] | None = getattr(hist, "_loopd_bounds", None)
    if bounds is None:
        bounds = [float(b) for b in hist._upper_bounds]
        hist._loopd_bounds = bounds  # type: ignore[attr-defined]
    return bounds


def decision_recorded(rule: str, outcome: str, n: int = 1) -> None:
    m = _CURRENT.get(_PROCESS)
    m.child(m.decisions, rule, outcome).inc(n)


def decisions_recorded(counts: Mapping[tuple[str, str], int]) -> None:
    """What a batch recorded, per (rule, outcome)."""
    m = _CURRENT.get(_PROCESS)
    for (rule, outcome), n in counts.items():
        m.child(m.decisions, rule, outcome).inc(n)


def engine_error(source: str, origin: str) -> None:
    """Deciding an event raised; call from the ``except`` block (logs the traceback)."""
    _CURRENT.get(_PROCESS).events_rejected.labels(source, "engine_error").inc()
    log.exception("deciding an event failed; it is acknowledged undecided",
                  source=source, event_origin=origin)


def queue_depth(depth: int) -> None:
    _CURRENT.get(_PROCESS).queue_depth.set(depth)


def source_up(source: str, up: bool) -> None:
    _CURRENT.get(_PROCESS).source_up.labels(source).set(1 if up else 0)
    if up:
        log.info("source connected", source=source)


def source_failed(source: str, error: BaseException, retry_in: float) -> None:
    _CURRENT.get(_PROCESS).source_errors[source] = (time.time(),
                                                    f"{type(error).__name__}: {error}")
    log.warning("source disconnected", source=source, error=f"{type(error).__name__}: {error}",
                retry_in_s=round(retry_in, 2))


def rules_loaded(count: int, errors: int) -> None:
    m = _CURRENT.get(_PROCESS)
    m.rules_loaded.set(count)
    m.rule_load_errors.set(errors)
    log.info("rules loaded", rules=count, errors=errors)


def runs_taken_over(count: int, runs: list[str]) -> None:
    _CURRENT.get(_PROCESS).runs_taken_over.inc(count)
    log.warning("took over runs of a replica silent for longer than the lease",
                count=count, runs=runs[:20])


def lease_lost(run_id: str, error: object) -> None:
    _CURRENT.get(_PROCESS).lease_lost.inc()
    log.warning("lease lost: another replica took this run over; it stops here without "
                "writing or acting", run=run_id, error=str(error))


def run_command(kind: str, direction: str, run_id: str) -> None:
    _CURRENT.get(_PROCESS).commands_forwarded.labels(kind, direction).inc()
    log.info("run command " + ("handed to its owner" if direction == "sent"
                               else "from another replica"), kind=kind, run=run_id)


def run_started(workflow: str, run_id: str) -> None:
    _CURRENT.get(_PROCESS).runs_active.inc()
    log.info("run started", workflow=workflow, run=run_id)


def run_finished(workflow: str, run_id: str, status: str, seconds: float,
                 reason: str | None = None) -> None:
    m = _CURRENT.get(_PROCESS)
    m.runs_active.dec()
    m.runs.labels(workflow, status).inc()
    m.run_seconds.labels(workflow).observe(seconds)
    log.info("run finished", workflow=workflow, run=run_id, status=status,
             seconds=round(seconds, 3), reason=reason)


def confirmation(workflow: str, result: str) -> None:
    _CURRENT.get(_PROCESS).confirmations.labels(workflow, result).inc()


def outcome(workflow: str, rule: str | None, outcome: str, time_to_fix: float | None) -> None:
    m = _CURRENT.get(_PROCESS)
    m.outcomes.labels(workflow, outcome).inc()
    if time_to_fix is not None and rule is not None:
        m.time_to_fix.labels(rule).observe(time_to_fix)


def correlation_state(groups: int, absences: int, partials: int) -> None:
    gauge = _CURRENT.get(_PROCESS).correlation_state
    gauge.labels("group").set(groups)
    gauge.labels("absent").set(absences)
    gauge.labels("all").set(partials)


def guard_suppressed(rule: str, guard: str) -> None:
    m = _CURRENT.get(_PROCESS)  # per event (a throttled stream): the kept child
    m.child(m.guard_suppressions, rule, guard).inc()


def circuit(rule: str, is_open: bool) -> None:
    _CURRENT.get(_PROCESS).circuit_open.labels(rule).set(1 if is_open else 0)
    if is_open:
        log.error("circuit breaker opened: loopd stops acting for this rule", rule=rule)


def budget_remaining(rule: str, left: int) -> None:
    _CURRENT.get(_PROCESS).budget_remaining.labels(rule).set(left)


def action_finished(action: str, status: str, seconds: float) -> None:
    _CURRENT.get(_PROCESS).action_seconds.labels(action, status).observe(seconds)


def request_refused(route: str, limit: str, detail: str, **where: object) -> None:
    """An API request refused by ``limit`` (body, batch, concurrency, queue, decision);
    ``detail`` says which bound, never what the request carried."""
    _CURRENT.get(_PROCESS).api_refused.labels(route, limit).inc()
    log.warning("api request refused", route=route, limit=limit, detail=detail, **where)


def ingest_request(source: str, principal: str) -> None:
    """An ingest request from ``principal`` (its token name) to ``source`` was accepted for
    reading; its events are recorded as decisions, not in the audit trail."""
    _CURRENT.get(_PROCESS).ingest_requests.labels(source, principal).inc()


def audit_write_failed(action: str, phase: str, error: object, **where: object) -> None:
    """The audit record of ``action`` could not be written ``before`` acting (the call is
    refused) or ``after`` (the action is done; its result record is missing)."""
    _CURRENT.get(_PROCESS).audit_failures.labels(action, phase).inc()
    log.error("audit record not written", action=action, phase=phase, error=str(error),
              **where)


def api_refused(route: str, reason: str) -> None:
    """An API request refused by the gate (the gate logs who and from where)."""
    _CURRENT.get(_PROCESS).api_refused.labels(route, reason).inc()


def promql_failed(source: str, query: str, reason: str, error: object) -> None:
    """A query of a promql source gave no result this round: nothing changes for its
    series (no event, none resolved) until a later round answers."""
    m = _CURRENT.get(_PROCESS)
    m.promql_errors.labels(source, query, reason).inc()
    m.source_errors[source] = (time.time(), f"query {query}: {reason}: {error}")
    log.warning("promql query failed", source=source, query=query, reason=reason,
                error=str(error))


def promql_too_many(source: str, query: str, dropped: int, limit: int) -> None:
    """A query's result has more series than the source's ``max_series``: the rest are
    rejected (``loopd_events_rejected_total{reason="max_series"}``), logged once a round."""
    _CURRENT.get(_PROCESS).events_rejected.labels(source, "max_series").inc(dropped)
    log.warning("promql result exceeds max_series; the rest of its series are dropped",
                source=source, query=query, max_series=limit, dropped=dropped)


def promql_unkeyed(source: str, query: str, key_label: str, count: int,
                   example: dict[str, str]) -> None:
    """``count`` series of a query's result lack its ``key_label``: rejected (no event,
    ``loopd_events_rejected_total{reason="no_key_label"}``), logged once per round."""
    _CURRENT.get(_PROCESS).events_rejected.labels(source, "no_key_label").inc(count)
    log.warning("promql series without the key label rejected", source=source, query=query,
                key_label=key_label, series=count, example=example)


def scraped(source: str, samples: int) -> None:
    """A scrape round of one target handed ``samples`` events over (its ``up`` included):
    counted at once, not per event, so a round of 100,000 samples costs one update."""
    _CURRENT.get(_PROCESS).events_received.labels(source).inc(samples)


def scrape_failed(source: str, target: str, reason: str, error: str) -> None:
    _CURRENT.get(_PROCESS).scrape_failures.labels(source, target, reason).inc()
    log.warning("scrape failed", source=source, target=target, reason=reason, error=error)


def scrape_unsafe(source: str, target: str, dropped: int) -> None:
    """Series whose name cannot be one topic level (``/``, ``+``, ``#``, a control
    character): dropped, counted (``loopd_events_rejected_total{reason="unsafe_name"}``)."""
    _CURRENT.get(_PROCESS).events_rejected.labels(source, "unsafe_name").inc(dropped)
    log.warning("scrape drops series whose name cannot be a topic level (/ + # or a "
                "control character)", source=source, target=target, dropped=dropped)


def scrape_dropped(source: str, target: str, dropped: int, max_series: int) -> None:
    _CURRENT.get(_PROCESS).scrape_dropped.labels(source, target).inc(dropped)
    log.warning("scrape exceeds max_series; the rest of its series are dropped",
                source=source, target=target, max_series=max_series, dropped=dropped)
