"""Builds every component, starts them in order and stops them in reverse.

Start: store -> packs and rules -> engine state -> dispatcher resume -> engine
and dispatcher tasks -> sources (supervised) -> HTTP API. Stop (SIGTERM/SIGINT):
API -> sources stop feeding the engine -> engine drains in-flight decisions ->
sources close (Kafka commits everything decided) -> runs get a short grace
period, the rest resume at next start -> runners -> store. SIGHUP and
``POST /v1/reload`` reload rules and packs.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from loopd import metrics
from loopd.api.app import ApiContext, ReloadResult, build_app
from loopd.catalog.inventory import Inventory
from loopd.catalog.silences import Silences
from loopd.config import (
    AlertmanagerSourceConfig,
    KafkaSourceConfig,
    LoopdConfig,
    SimSourceConfig,
    SourceConfig,
    WebhookSourceConfig,
)
from loopd.decide.engine import Engine
from loopd.decide.guards import Guards
from loopd.errors import ActionError
from loopd.events import Delivery, Event
from loopd.packs.executor import ActionContext, Executor, Runner
from loopd.packs.publish import Bus, PublishRunner, build_buses, encode
from loopd.packs.python import PythonRunner
from loopd.packs.registry import Action, PackRegistry
from loopd.rules.loader import RuleSet, global_escalation_problems, load_rules
from loopd.runs import states
from loopd.runs.dispatcher import Dispatcher
from loopd.runs.evidence import PromQL
from loopd.runs.runner import WorkflowRunner
from loopd.runs.tasks import TaskKinds
from loopd.sources.base import Source, Supervisor
from loopd.sources.sim import Fleet, SimSource
from loopd.sources.webhook import PushSource
from loopd.store.base import RunRecord
from loopd.store.sqlite import SqliteStore
from loopd.workflow.loader import load_workflows

log = structlog.get_logger("loopd")

SHUTDOWN_GRACE = 1.5


def build_source(config: SourceConfig, fleets: dict[str, Fleet]) -> Source:
    """type -> Source class; a plain mapping, nothing registers itself on import."""
    if isinstance(config, WebhookSourceConfig | AlertmanagerSourceConfig):
        return PushSource(config)
    if isinstance(config, SimSourceConfig):
        return SimSource(config, fleets[config.name])
    if isinstance(config, KafkaSourceConfig):
        from loopd.sources.kafka import KafkaSource

        return KafkaSource(config)
    from loopd.sources.mqtt import MqttSource

    return MqttSource(config)


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


def _ssh() -> Runner:
    from loopd.packs.ssh import SshRunner

    return SshRunner()


def _http() -> Runner:
    from loopd.packs.http import HttpRunner

    return HttpRunner()


def build_runners(buses: dict[str, Bus]) -> dict[str, Runner]:
    """runner name -> Runner; a plain mapping, nothing registers itself."""
    return {"python": PythonRunner(), "ssh": LazyRunner(_ssh), "http": LazyRunner(_http),
            "publish": PublishRunner(buses)}


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


def outcome_event(run: RunRecord, topic: str) -> Event:
    data = {
        "run": run.id, "rule": run.rule, "key": run.key, run.kind: run.target,
        "status": run.status, "outcome": run.outcome, "reason": run.reason,
        "created": run.created, "finished": run.finished,
        "duration_s": (run.finished - run.created) if run.finished else None,
    }
    return Event(id=f"outcome:{run.id}", source="loopd", topic=topic, data=data, key=run.key,
                 origin=f"loopd run {run.id}")


class Daemon:
    def __init__(self, config: LoopdConfig) -> None:
        self.config = config
        self.store = SqliteStore(config.store.path)
        self.inventory = Inventory.load(config.inventory)
        self.registry, ruleset = load_packs_and_rules(config)
        self.buses = build_buses([*config.sources, *config.sinks])
        self.executor = Executor(self.registry, build_runners(self.buses),
                                 max_concurrent=config.engine.max_concurrent_runs)
        self.silences = Silences(config.alertmanager.url, refresh=config.alertmanager.refresh,
                                 timeout=config.alertmanager.timeout) \
            if config.alertmanager else None
        self.guards = Guards(config.guards, self.inventory, self.silences)
        self.engine = Engine(
            self.store, ruleset, inventory=self.inventory, guards=self.guards,
            queue_size=config.engine.queue_size,
            batch_max=config.store.batch_max, dedup_window=config.engine.dedup_window,
            telemetry_sources=frozenset(c.name for c in config.sources if c.telemetry),
        )
        prometheus = PromQL(config.prometheus.url, config.prometheus.timeout) \
            if config.prometheus else None
        self.fleets = {c.name: Fleet(c) for c in config.sources
                       if isinstance(c, SimSourceConfig)}
        services: dict[str, Any] = {"store": self.store}
        if self.fleets:  # the sim pack's actions act on the simulated fleet
            services["sim"] = next(iter(self.fleets.values()))
        self.tasks = TaskKinds(self.store, self.executor, prometheus=prometheus,
                               services=services)
        self.workflows = WorkflowRunner(
            self.store, lambda: self.registry, self.tasks, inventory=self.inventory,
            telemetry=self.engine.telemetry)
        self.engine.on_event = self.tasks.hub.offer
        self.dispatcher = Dispatcher(
            self.store, self.executor, inventory=self.inventory,
            finish_incident=self.engine.run_finished, workflows=self.workflows,
            on_finished=self._run_finished,
        )
        self.tasks.on_waiting = self.dispatcher.settled
        self.tasks.on_active = self.dispatcher.active_again
        self.engine.on_runs = self.dispatcher.submit
        self.engine.incidents.cancel_run = self.dispatcher.cancel_unstarted
        self.engine.incidents.restart_run = self.dispatcher.cancel_run
        self.sources = {c.name: build_source(c, self.fleets) for c in config.sources}
        self.supervisors = [Supervisor(s, self._emit) for s in self.sources.values()]
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._holding = False  # set at shutdown: sources no longer feed the engine
        self._report_load(ruleset)

    async def _emit(self, delivery: Any) -> None:
        if self._holding:
            # Shutting down: the delivery stays unacknowledged (Kafka redelivers it) while
            # the engine finishes what it has; the source's close() cancels this wait.
            await asyncio.Event().wait()
        await self.engine.emit(delivery)

    async def _run_finished(self, run: RunRecord) -> None:
        """Close the loop for others: an outcome event into loopd's own rules and a bus."""
        outcome = outcome_event(run, self.config.outcomes.topic)
        metrics.event_received("loopd")
        await self.engine.emit(Delivery(outcome))
        bus = self.buses.get(self.config.outcomes.bus or "")
        if bus is not None:
            try:
                await bus.publish(outcome.topic, encode(outcome.data), run.key)
            except ActionError as exc:  # the run is over either way; say so and go on
                log.warning("outcome event not published", run=run.id, error=str(exc))

    def _report_load(self, ruleset: RuleSet) -> None:
        for err in [*self.registry.errors, *ruleset.errors]:
            log.error("configuration error", error=str(err))
        for path in ruleset.kept:
            log.warning("rule file not loaded; the rules loaded from it before stay active",
                        file=str(path), rules=len(ruleset.by_file.get(path, ())))
        metrics.rules_loaded(len(ruleset.rules), len(ruleset.errors) + len(self.registry.errors))

    async def reload(self) -> ReloadResult:
        # a rule file that no longer parses keeps the rules it had (transactional per file)
        registry, ruleset = load_packs_and_rules(self.config, previous=self.engine.ruleset)
        self.registry = registry
        self.executor.registry = registry
        self.engine.swap_rules(ruleset)
        self._report_load(ruleset)
        errors = [str(e) for e in [*registry.errors, *ruleset.errors]]
        return ReloadResult(len(ruleset.rules), errors, [str(p) for p in ruleset.kept])

    async def _reloader(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            try:
                await self.reload()
            except Exception:  # supervised boundary: a failed reload keeps the old rules
                log.exception("reload failed; the rules loaded before stay active")

    def stop(self) -> None:
        self._stop.set()

    async def run(self, on_ready: Callable[[Daemon], None] | None = None) -> None:
        started = time.monotonic()
        await self.store.open()
        try:
            # one read of the runs in flight serves both the engine and the dispatcher
            in_flight = await self.store.runs_in_status((*states.ACTIVE, states.QUEUED))
            await self.engine.load(in_flight)
            await self.dispatcher.resume(in_flight)
            del in_flight  # the runs live on in their tasks; the list need not
            # before the task group: a taken port is a plain OSError the CLI can explain
            await self._start_api()
            async with asyncio.TaskGroup() as tg:
                workers = [tg.create_task(self.engine.run(), name="engine"),
                           tg.create_task(self.dispatcher.run(), name="dispatcher"),
                           tg.create_task(self._reloader(), name="reloader")]
                if self.silences is not None:
                    workers.append(tg.create_task(self.silences.run(), name="silences"))
                feeds = [tg.create_task(s.run(), name=f"source-{s.source.name}")
                         for s in self.supervisors]
                self._install_signals()
                log.info("loopd ready", listen=f"{self.config.listen_host_port[0]}:{self.port}",
                         rules=len(self.engine.ruleset.rules), sources=list(self.sources),
                         startup_s=round(time.monotonic() - started, 3))
                if on_ready is not None:
                    on_ready(self)
                await self._stop.wait()
                log.info("loopd stopping")
                await self._shutdown(feeds, workers)
        finally:
            if self.runner is not None:  # the task group failed: the API still has to go
                await self.runner.cleanup()
            await self.executor.close()
            if self.tasks.prometheus is not None:
                await self.tasks.prometheus.close()
            await self.store.close()
            log.info("loopd stopped")

    async def _shutdown(self, feeds: list[asyncio.Task[None]],
                        workers: list[asyncio.Task[None]]) -> None:
        # Each step is bounded so SIGTERM exits within 10 s whatever the brokers do:
        # API 2 s, decisions in flight 3 s, sources 3 s, runs 1.5 s.
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        self._holding = True
        try:  # decisions in flight are finished and acknowledged ...
            await self.engine.drain(timeout=3.0)
        except TimeoutError:
            log.warning("engine did not drain in 3s; undecided events will be redelivered")
        try:
            async with asyncio.timeout(3.0):
                for sup in self.supervisors:  # ... before the sources commit and close
                    await sup.stop()
        except TimeoutError:
            log.warning("sources did not close in 3s; uncommitted offsets are redelivered "
                        "and recognised as duplicates")
        for task in feeds:
            task.cancel()
        try:
            await self.dispatcher.drain(timeout=SHUTDOWN_GRACE)
        except TimeoutError:
            log.info("runs still active at shutdown resume at next start",
                     active=self.dispatcher.active())
        self.dispatcher.shutting_down = True
        for task in workers:
            task.cancel()

    async def _start_api(self) -> None:
        push: dict[str, tuple[str, int]] = {
            c.name: (c.type, c.max_payload) for c in self.config.sources
            if c.type in ("webhook", "alertmanager")}
        ctx = ApiContext(
            engine=self.engine, store=self.store, dispatcher=self.dispatcher,
            registry=lambda: self.registry, reload=self.reload, sources=self.sources,
            push_sources=push, approve=self._approve,
        )
        self.runner = web.AppRunner(build_app(ctx), access_log=None, shutdown_timeout=2.0)
        await self.runner.setup()
        host, port = self.config.listen_host_port
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def _approve(self, run_id: str, approved: bool, reason: str | None) -> str | None:
        # a run gated by its rule's approval mode, else an approval task in a workflow
        if self.dispatcher.decide(run_id, approved, reason) is None:
            return None
        return self.tasks.decide(run_id, approved, reason)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
