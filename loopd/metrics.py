"""Every ``loopd_*`` metric and its log line, defined once.

One function per observable thing: it updates the metric and logs together,
so a log line and a counter never disagree. Labels are bounded (source, rule,
workflow, action, status, reason); never an event id or a host.
"""

from __future__ import annotations

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
REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_RECEIVED = Counter(
    "loopd_events_received_total", "Events received from sources", ["source"], registry=REGISTRY
)
EVENTS_REJECTED = Counter(
    "loopd_events_rejected_total", "Messages that could not become events",
    ["source", "reason"], registry=REGISTRY,
)
EVENTS_DUPLICATE = Counter(
    "loopd_events_duplicate_total", "Redelivered events recognised by id", ["source"],
    registry=REGISTRY,
)
RULE_MATCHES = Counter(
    "loopd_rule_matches_total", "Events that matched a rule", ["rule"], registry=REGISTRY
)
RULE_ERRORS = Counter(
    "loopd_rule_errors_total", "Condition or template errors while evaluating a rule",
    ["rule"], registry=REGISTRY,
)
DECISIONS = Counter(
    "loopd_decisions_total", "Decisions recorded", ["rule", "outcome"], registry=REGISTRY
)
DECISION_SECONDS = Histogram(
    "loopd_event_decision_seconds", "From event received to decision durable",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("loopd_queue_depth", "Deliveries waiting for the engine", registry=REGISTRY)
SOURCE_UP = Gauge("loopd_source_up", "1 while the source is connected", ["source"],
                  registry=REGISTRY)
RULES_LOADED = Gauge("loopd_rules_loaded", "Rules currently loaded", registry=REGISTRY)
RULE_LOAD_ERRORS = Gauge("loopd_rule_load_errors", "Rule errors at the last (re)load",
                         registry=REGISTRY)
RUNS = Counter("loopd_runs_total", "Runs finished", ["workflow", "status"], registry=REGISTRY)
RUN_SECONDS = Histogram(
    "loopd_run_duration_seconds", "Run duration", ["workflow"], registry=REGISTRY,
    buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
)
ACTION_SECONDS = Histogram(
    "loopd_action_duration_seconds", "Action duration", ["action", "status"], registry=REGISTRY,
    buckets=(0.005, 0.05, 0.25, 1, 5, 15, 60, 300),
)
RUNS_ACTIVE = Gauge("loopd_runs_active", "Runs executing now", registry=REGISTRY)
CONFIRMATIONS = Counter("loopd_confirmations_total", "Confirm task results",
                        ["workflow", "result"], registry=REGISTRY)
TIME_TO_FIX = Histogram(
    "loopd_time_to_fix_seconds", "From the first event of an incident to its confirmed fix",
    ["rule"], registry=REGISTRY, buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
GUARD_SUPPRESSIONS = Counter(
    "loopd_guard_suppressions_total", "Runs a guard kept from starting", ["rule", "guard"],
    registry=REGISTRY,
)
CIRCUIT_OPEN = Gauge("loopd_circuit_open", "1 while the rule's circuit breaker is open",
                     ["rule"], registry=REGISTRY)
BUDGET_REMAINING = Gauge("loopd_budget_remaining", "Runs left in the rule's budget window",
                         ["rule"], registry=REGISTRY)
OUTCOMES = Counter("loopd_run_outcomes_total", "Run outcomes", ["workflow", "outcome"],
                   registry=REGISTRY)


def exposition() -> bytes:
    return generate_latest(REGISTRY)


def event_received(source: str) -> None:
    EVENTS_RECEIVED.labels(source).inc()


def event_rejected(source: str, reason: str, error: object, **where: object) -> None:
    EVENTS_REJECTED.labels(source, reason).inc()
    log.warning("event rejected", source=source, reason=reason, error=str(error), **where)


def event_duplicate(source: str, event_id: str) -> None:
    EVENTS_DUPLICATE.labels(source).inc()
    log.debug("duplicate event ignored", source=source, event_id=event_id)


def rule_matched(rule: str) -> None:
    RULE_MATCHES.labels(rule).inc()


def rule_error(rule: str, error: object, origin: str) -> None:
    RULE_ERRORS.labels(rule).inc()
    # not event=: that is the name of structlog's message argument (a TypeError)
    log.warning("rule evaluation failed", rule=rule, error=str(error), origin=origin)


def decided(rule: str, outcome: str, seconds: float) -> None:
    DECISIONS.labels(rule, outcome).inc()
    DECISION_SECONDS.observe(seconds)


def queue_depth(depth: int) -> None:
    QUEUE_DEPTH.set(depth)


def source_up(source: str, up: bool) -> None:
    SOURCE_UP.labels(source).set(1 if up else 0)
    if up:
        log.info("source connected", source=source)


def source_failed(source: str, error: BaseException, retry_in: float) -> None:
    log.warning("source disconnected", source=source, error=f"{type(error).__name__}: {error}",
                retry_in_s=round(retry_in, 2))


def rules_loaded(count: int, errors: int) -> None:
    RULES_LOADED.set(count)
    RULE_LOAD_ERRORS.set(errors)
    log.info("rules loaded", rules=count, errors=errors)


def run_started(workflow: str, run_id: str) -> None:
    RUNS_ACTIVE.inc()
    log.info("run started", workflow=workflow, run=run_id)


def run_finished(workflow: str, run_id: str, status: str, seconds: float,
                 reason: str | None = None) -> None:
    RUNS_ACTIVE.dec()
    RUNS.labels(workflow, status).inc()
    RUN_SECONDS.labels(workflow).observe(seconds)
    log.info("run finished", workflow=workflow, run=run_id, status=status,
             seconds=round(seconds, 3), reason=reason)


def confirmation(workflow: str, result: str) -> None:
    CONFIRMATIONS.labels(workflow, result).inc()


def outcome(workflow: str, rule: str | None, outcome: str, time_to_fix: float | None) -> None:
    OUTCOMES.labels(workflow, outcome).inc()
    if time_to_fix is not None and rule is not None:
        TIME_TO_FIX.labels(rule).observe(time_to_fix)


def guard_suppressed(rule: str, guard: str) -> None:
    GUARD_SUPPRESSIONS.labels(rule, guard).inc()


def circuit(rule: str, is_open: bool) -> None:
    CIRCUIT_OPEN.labels(rule).set(1 if is_open else 0)
    if is_open:
        log.error("circuit breaker opened: loopd stops acting for this rule", rule=rule)


def budget_remaining(rule: str, left: int) -> None:
    BUDGET_REMAINING.labels(rule).set(left)


def action_finished(action: str, status: str, seconds: float) -> None:
    ACTION_SECONDS.labels(action, status).observe(seconds)
