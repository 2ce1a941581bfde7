"""The one composition root: every component of loopd is built and connected here.

``build(config)`` is what ``loopd run`` (loopd.daemon), ``loopd simulate``
(loopd.simulate.replay) and ``loopd demo`` start from; ``build_runs`` is the run half
alone, which tests/workflow_harness.py and the pack tests use. Components are connected
by constructor arguments and the two typed messages of loopd.messages, never by
attributes assigned afterwards::

    sources --Delivery--> engine.queue
    engine  --StartRun/CancelRun (after commit)--> dispatcher.commands
    engine  --every event--> confirm hub (evidence=)
    dispatcher --RunEnded (after the final state is stored)--> engine.inbox
    task kinds <--same Slots, same Approvals--> dispatcher

Who writes what: the engine (decide/) writes incidents, timers and guard memory in its
Batches; the dispatcher, runner and task kinds (runs/) write run state and steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from loopd.catalog.backends import SecretResolver
from loopd.catalog.credentials import SCHEMES
from loopd.catalog.inventory import Inventory
from loopd.catalog.silences import Silences
from loopd.catalog.telemetry import Telemetry
from loopd.clock import Clock, WallClock
from loopd.config import (
    AlertmanagerSourceConfig,
    KafkaSourceConfig,
    LoopdConfig,
    PromQLSourceConfig,
    ScrapeSourceConfig,
    SimSourceConfig,
    SourceConfig,
    WebhookSourceConfig,
)
from loopd.decide.engine import Engine
from loopd.decide.guards import Guards
from loopd.errors import ActionError
from loopd.messages import Outbox, RunCommand, RunEnded
from loopd.packs.executor import ActionContext, Executor, Runner
from loopd.packs.publish import Bus, PublishRunner, build_buses, encode
from loopd.packs.python import PythonRunner
from loopd.packs.registry import Action, PackRegistry
from loopd.rules.loader import RuleSet, global_escalation_problems, load_rules
from loopd.runs.approvals import Approvals
from loopd.runs.dispatcher import Announcer, Dispatcher
from loopd.runs.evidence import ConfirmHub, PromQL
from loopd.runs.runner import WorkflowRunner
from loopd.runs.slots import Slots
from loopd.runs.tasks import TaskKinds
from loopd.sources.base import Source
from loopd.sources.sim import Fleet, SimSource
from loopd.sources.webhook import PushSource
from loopd.store.base import RunRecord, Store
from loopd.store.sqlite import SqliteStore
from loopd.workflow.loader import load_workflows

log = structlog.get_logger("loopd")


def build_source(config: SourceConfig, fleets: dict[str, Fleet], replica: str | None = None,
                 store: Store | None = None, inventory: Inventory | None = None) -> Source:
    """type -> Source class; a plain mapping, nothing registers itself on import.
    ``replica`` (the store's) goes into MQTT client ids and Kafka group instance ids;
    ``store`` keeps what promql sources have firing across restarts; ``inventory`` gives
    scrape sources the entities with a ``metrics_url``."""
    if isinstance(config, WebhookSourceConfig | AlertmanagerSourceConfig):
        return PushSource(config)
    if isinstance(config, SimSourceConfig):
        return SimSource(config, fleets[config.name])
    if isinstance(config, KafkaSourceConfig):
        from loopd.sources.kafka import KafkaSource

        return KafkaSource(config, replica=replica)
    if isinstance(config, PromQLSourceConfig):
        from loopd.sources.promql import PromQLSource

        return PromQLSource(config, store)
    if isinstance(config, ScrapeSourceConfig):  # targets: its own and the inventory's
        from loopd.sources.scrape import ScrapeSource

        return ScrapeSource(config, inventory)
    from loopd.sources.mqtt import MqttSource

    return MqttSource(config, replica=replica)


class LazyRunner:
    """A runner built on first use: asyncssh and friends cost start-up time only
    when a pack action needs them."""

    def __init__(self, build: Callable[[], Runner]) -> None:
        self._build = build
        self._runner: Runner | None = None

    async def run(self, action: Action, input: dict[str, Any], ctx: ActionContext
                  ) -> dict[str, Any]:
        if self._runner is None:
            self._runner = self._build()
        return await self._runner.run(action, input, ctx)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.close()


def _ssh(unlisted_hosts: bool) -> Callable[[], Runner]:
    def build() -> Runner:
        from loopd.packs.ssh import SshRunner

        return SshRunner(unlisted_hosts=unlisted_hosts)
    return build


def _http() -> Runner:
    from loopd.packs.http import HttpRunner

    return HttpRunner()


def build_runners(buses: dict[str, Bus], *, ssh_unlisted_hosts: bool = False
                  ) -> dict[str, Runner]:
    """runner name -> Runner; a plain mapping, nothing registers itself."""
    return {"python": PythonRunner(), "ssh": LazyRunner(_ssh(ssh_unlisted_hosts)),
            "http": LazyRunner(_http), "publish": PublishRunner(buses)}


def load_packs_and_rules(config: LoopdConfig, previous: RuleSet | None = None
                         ) -> tuple[PackRegistry, RuleSet]:
    """Packs, workflows and rules, checked against each other and the configured sources;
    ``previous`` (a reload): a rule file that does not parse keeps its rules from it."""
    registry = PackRegistry.load(config.packs, config.pack_config)
    load_workflows(registry)
    ruleset = load_rules(config.rules, registry.check_target, check_input=registry.check_input,
                         sources=[c.name for c in config.sources], previous=previous)
    ruleset.errors += global_escalation_problems(
        config.guards.escalate, config.source_file, registry.check_target, registry.check_input)
    return registry, ruleset


class BusOutcomes:
    """Publishes every finished run's outcome event on a bus (``outcomes.bus``)."""

    def __init__(self, bus: Bus, topic: str) -> None:
        self.bus = bus
        self.topic = topic

    async def announce(self, run: RunRecord) -> None:
        outcome = RunEnded(run).outcome_event(self.topic)
        try:
            await self.bus.publish(outcome.topic, encode(outcome.data), run.key)
        except ActionError as exc:  # the run is over either way; say so and go on
            log.warning("outcome event not published", run=run.id, error=str(exc))


@dataclass
class Runs:
    """The run half: task kinds, workflow runner and dispatcher, sharing one clock, one
    set of start slots and one set of pending approvals."""

    kinds: TaskKinds
    workflows: WorkflowRunner
    dispatcher: Dispatcher
    approvals: Approvals
    slots: Slots


def build_runs(store: Store, executor: Executor, registry: Callable[[], PackRegistry], *,
               inventory: Inventory, ended: Outbox[RunEnded] | None = None,
               commands: asyncio.Queue[RunCommand] | None = None, hub: ConfirmHub | None = None,
               telemetry: Telemetry | None = None, prometheus: PromQL | None = None,
               services: dict[str, Any] | None = None, dry_run: bool = False,
               clock: Clock | None = None, max_starting: int = 256,
               announcer: Announcer | None = None) -> Runs:
    clock = clock if clock is not None else WallClock()
    slots, approvals = Slots(max_starting), Approvals()
    kinds = TaskKinds(store, executor, hub=hub, prometheus=prometheus, services=services,
                      dry_run=dry_run, clock=clock, slots=slots, approvals=approvals)
    workflows = WorkflowRunner(store, registry, kinds, inventory=inventory,
                               telemetry=telemetry, clock=clock)
    dispatcher = Dispatcher(store, executor, inventory=inventory, commands=commands,
                            ended=ended, workflows=workflows, dry_run=dry_run, clock=clock,
                            slots=slots, approvals=approvals, announcer=announcer)
    return Runs(kinds, workflows, dispatcher, approvals, slots)


@dataclass
class Loopd:
    """Everything one loopd process is made of, connected; lifecycle is the caller's."""

    config: LoopdConfig
    store: Store
    inventory: Inventory
    registry: PackRegistry
    ruleset: RuleSet
    buses: dict[str, Bus]
    executor: Executor
    silences: Silences | None
    guards: Guards
    engine: Engine
    runs: Runs
    fleets: dict[str, Fleet] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)

    @property
    def dispatcher(self) -> Dispatcher:
        return self.runs.dispatcher

    @property
    def kinds(self) -> TaskKinds:
        return self.runs.kinds


def secret_resolver(config: LoopdConfig) -> SecretResolver:
    """How references are resolved (``secrets:``): values at use, in memory only."""
    secrets = config.secrets
    return SecretResolver(dir=secrets.dir, ttl=secrets.ttl, exec_ttl=secrets.exec_ttl,
                          exec_timeout=secrets.exec_timeout, max_cached=secrets.max_cached)


def build_store(config: LoopdConfig) -> Store:
    """The store ``store:`` names: SQLite (one file), or PostgreSQL (several replicas),
    whose DSN references are resolved when it opens, not here (nor kept in the config)."""
    cfg = config.store
    if cfg.type == "sqlite":
        return SqliteStore(cfg.path, lease=cfg.lease)
    from loopd.store.postgres import PostgresStore  # psycopg only where it is used

    resolver = secret_resolver(config)

    def dsn(text: str | None) -> str | Callable[[], Awaitable[str]] | None:
        if text is None or text.partition(":")[0] not in SCHEMES:
            return text  # a connection string without a password (config checked it)
        return lambda: resolver.resolve(text)

    main = dsn(cfg.dsn)
    assert main is not None  # StoreConfig: a postgres store has a dsn
    return PostgresStore(main, listen_dsn=dsn(cfg.listen_dsn), lease=cfg.lease,
                         pool_min=cfg.pool.min, pool_max=cfg.pool.max, timeout=cfg.timeout)


def build(config: LoopdConfig, *, store: Store | None = None, clock: Clock | None = None,
          event_time: bool = False, dry_run: bool = False, simulated: bool = False,
          telemetry_sources: tuple[str, ...] = ()) -> Loopd:
    """Build loopd from its configuration. ``simulated`` (loopd simulate): no runner
    ever acts, no source, Alertmanager or Prometheus is contacted, runs start without a
    cap (the replay waits for quiescence itself)."""
    store = store if store is not None else build_store(config)
    clock = clock if clock is not None else WallClock()
    inventory = Inventory.load(config.inventory)
    registry, ruleset = load_packs_and_rules(config)
    buses = {} if simulated else build_buses([*config.sources, *config.sinks],
                                             replica=store.replica)
    # simulated: dry run, no runner is ever asked to act
    executor = Executor(registry, {}) if simulated else Executor(
        registry, build_runners(buses, ssh_unlisted_hosts=config.ssh.unlisted_hosts),
        max_concurrent=config.engine.max_concurrent_runs,
        secrets=secret_resolver(config))
    silences = Silences(config.alertmanager.url, refresh=config.alertmanager.refresh,
                        timeout=config.alertmanager.timeout) \
        if config.alertmanager and not simulated else None
    guards = Guards(config.guards, inventory, silences,
                    max_keys=config.engine.guard_memory_max_keys)
    prometheus = PromQL(config.prometheus.url, config.prometheus.timeout) \
        if config.prometheus and not simulated else None
    fleets = {} if simulated else {c.name: Fleet(c) for c in config.sources
                                   if isinstance(c, SimSourceConfig)}
    services: dict[str, Any] = {"store": store}
    if fleets:  # the sim pack's actions act on the simulated fleet
        services["sim"] = next(iter(fleets.values()))
    commands: asyncio.Queue[RunCommand] = asyncio.Queue()
    hub = ConfirmHub()  # confirm tasks wait here for the events the engine decides
    engine = Engine(
        store, ruleset, inventory=inventory, guards=guards, clock=clock,
        event_time=event_time, queue_size=config.engine.queue_size,
        batch_max=config.store.batch_max, dedup_window=config.engine.dedup_window,
        telemetry_sources=frozenset(
            [c.name for c in config.sources if c.telemetry] + list(telemetry_sources)),
        commands=commands, evidence=hub.offer, outcomes_topic=config.outcomes.topic,
        telemetry_ttl=config.engine.telemetry_ttl,
        telemetry_max_keys=config.engine.telemetry_max_keys,
        memory_max_keys=config.engine.guard_memory_max_keys,
    )
    bus = buses.get(config.outcomes.bus or "")
    runs = build_runs(store, executor, lambda: loopd.registry, inventory=inventory,
                      ended=engine.inbox, commands=commands, hub=hub,
                      telemetry=engine.telemetry, prometheus=prometheus, services=services,
                      dry_run=dry_run or simulated, clock=clock,
                      max_starting=1 << 30 if simulated else 256,
                      announcer=BusOutcomes(bus, config.outcomes.topic)
                      if bus is not None else None)
    sources = {} if simulated else {
        c.name: build_source(c, fleets, store.replica, store, inventory)
        for c in config.sources}
    loopd = Loopd(config, store, inventory, registry, ruleset, buses, executor, silences,
                  guards, engine, runs, fleets, sources)
    return loopd
