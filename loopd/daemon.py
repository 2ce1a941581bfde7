"""Builds every component, starts them in order and stops them in reverse.

Start: store -> packs and rules -> engine state -> dispatcher resume -> engine
and dispatcher tasks -> sources (supervised) -> HTTP API. Stop (SIGTERM/SIGINT):
API -> sources stop feeding the engine -> engine drains in-flight decisions ->
sources close (Kafka commits everything decided) -> runs get a short grace
period, the rest resume at next start -> runners -> store. Every step is bounded and
all of them together by ``SHUTDOWN_BUDGET``; ``loopd run`` also exits hard at
``HARD_EXIT_AFTER`` seconds (what is decided is durable; runs resume). SIGHUP and
``POST /v1/reload`` reload rules and packs, the API tokens' values and the TLS
certificate (new connections get the new one).

A non-loopback listen without ``api.auth`` is refused here, before anything starts;
``api.auth: none`` allows it with a warning at every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import structlog
from aiohttp import web

from loopd import metrics, ui
from loopd.api.app import ApiContext, build_app
from loopd.api.auth import Gate, check_exposure, warn_if_open
from loopd.api.limits import CappedSite
from loopd.api.tls import ServerTls
from loopd.cluster import Cluster
from loopd.config import LoopdConfig
from loopd.control import Control, ReloadResult
from loopd.errors import StoreError
from loopd.events import Delivery
from loopd.packs.registry import PackRegistry
from loopd.rules.loader import RuleSet
from loopd.runs import states
from loopd.sources.base import Supervisor
from loopd.wiring import build, load_packs_and_rules

log = structlog.get_logger("loopd")

SHUTDOWN_GRACE = 1.5
SHUTDOWN_BUDGET = 8.0  # all of the shutdown, closing included: SIGTERM exits within 10 s
HARD_EXIT_AFTER = 9.0  # `loopd run` only: this long after SIGTERM the process exits, done or not


# generation-0 threshold once the daemon is up: the few objects each event makes live
# for a batch, long enough to reach generation 1 and 2 at the default 700 and be
# scanned again and again (full collections of 100-180 ms, once or twice a second)
GC_THRESHOLD = (50_000, 50, 100)


def tune_gc() -> None:
    """For a process that is one daemon, once it is ready: collect, move everything
    start-up made (modules, compiled rules and workflows, the inventory) out of the
    collector's sight (``gc.freeze``), collect the young generation less often, and turn
    the collector on (the ``loopd`` command starts with it off: loopd.__main__). A
    scrape round of 100,000 samples into the engine went from 1.04 to 0.63 s of CPU
    (benchmarks/scrape.py), at the same peak RSS."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    gc.enable()


class _Emit:
    """What the sources hand their deliveries to (loopd.sources.base: ``emit`` and its
    ``offer``): the engine, until the daemon shuts down."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    async def __call__(self, delivery: Delivery) -> None:
        daemon = self._daemon
        if daemon._holding:
            # Shutting down: the delivery stays unacknowledged (Kafka redelivers it) while
            # the engine finishes what it has; the source's close() cancels this wait.
            await asyncio.Event().wait()
        await daemon.engine.emit(delivery)

    def offer(self, deliveries: list[Delivery], start: int) -> int:
        daemon = self._daemon
        return 0 if daemon._holding else daemon.engine.offer(deliveries, start)


class Daemon:
    """loopd as a process: what loopd.wiring built, started in order, stopped in reverse."""

    def __init__(self, config: LoopdConfig) -> None:
        self.config = config
        check_exposure(config)  # before anything is built: ConfigError, exit 2
        self.gate = Gate(config)  # its token values are read in run(), before the API serves
        self.tls = ServerTls(config.api.tls) if config.api.tls is not None else None
        self.metrics = metrics.Metrics()  # this daemon's own registry, current in run()
        with metrics.using(self.metrics):  # __init__ runs in the caller's context
            self.loopd = parts = build(config)
        self.store = parts.store
        self.inventory = parts.inventory
        self.buses = parts.buses
        self.executor = parts.executor
        self.silences = parts.silences
        self.guards = parts.guards
        self.engine = parts.engine
        self.fleets = parts.fleets
        self.tasks = parts.runs.kinds
        self.workflows = parts.runs.workflows
        self.dispatcher = parts.runs.dispatcher
        self.sources = parts.sources
        self.control = Control(engine=self.engine, dispatcher=self.dispatcher,
                               approvals=parts.runs.approvals, store=self.store,
                               registry=lambda: self.registry, reload=self.reload,
                               sources=self.sources, stall_after=config.engine.stall_after)
        emit = _Emit(self)
        self.supervisors = [Supervisor(s, emit) for s in self.sources.values()]
        self.dispatcher.on_lost = self.engine.forget_run
        for source in self.sources.values():  # keys moved here: their for: timers too
            source.on_assigned = self.engine.refresh_timers
        self.cluster = Cluster(self.store, self.engine, self.dispatcher, parts.runs.approvals,
                               self.workflows.hub, lambda: self.registry,
                               poll=config.store.poll,
                               reload=lambda: self._reload_requested.set())
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._holding = False  # set at shutdown: sources no longer feed the engine
        self._stopping_at: float | None = None  # monotonic time the shutdown began
        self.site: CappedSite | None = None  # the API's listening site
        self._hard_exit = False
        self._hard_exit_timer: threading.Timer | None = None
        with metrics.using(self.metrics):
            self._report_load(parts.ruleset)

    @property
    def registry(self) -> PackRegistry:
        return self.loopd.registry

    @registry.setter
    def registry(self, registry: PackRegistry) -> None:  # reload: workflows see it at once
        self.loopd.registry = registry

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
        errors += await self.gate.reload(self.executor.secrets)
        if self.tls is not None:
            if (problem := self.tls.reload()) is not None:
                log.error("TLS certificate not reloaded; the one loaded before stays active",
                          error=problem)
                errors.append(problem)
            elif self.site is not None and self.runner is not None:
                await self._listen()  # new connections get the new context
                log.info("TLS certificate reloaded", cert=str(self.config.api.tls.cert)
                         if self.config.api.tls else None)
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
        self._arm_hard_exit()  # counted from the signal, not from when the loop gets to it
        self._stop.set()

    def exit_hard_after_shutdown_budget(self) -> None:
        """``loopd run`` (never an in-process daemon): once the shutdown has begun, the
        process exits at ``HARD_EXIT_AFTER`` seconds whatever is still being cancelled (tens
        of thousands of queued runs, a close that hangs). Nothing is lost: every decision is
        durable before it is acknowledged, and runs in flight resume at the next start."""
        self._hard_exit = True

    def _arm_hard_exit(self) -> None:
        if not self._hard_exit or self._hard_exit_timer is not None:
            return

        def exit_now() -> None:
            log.warning("shutdown budget exceeded; exiting now (runs in flight resume at "
                        "next start)", budget_s=HARD_EXIT_AFTER)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(0)

        self._hard_exit_timer = threading.Timer(HARD_EXIT_AFTER, exit_now)
        self._hard_exit_timer.daemon = True
        self._hard_exit_timer.start()

    async def _heartbeat(self) -> None:
        """Tell the store this replica is alive, so its runs stay its own (a replica silent
        for longer than the store's lease loses them to another)."""
        every = max(self.store.lease / 3, 0.5)
        while True:
            await asyncio.sleep(every)
            try:
                await self.store.heartbeat()
            except StoreError as exc:  # the engine holds and reports a store that is down
                log.warning("replica heartbeat failed", error=str(exc))

    async def run(self, on_ready: Callable[[Daemon], None] | None = None) -> None:
        started = time.monotonic()
        # before any task is created: they all inherit this context, the API's handlers too
        metrics.use(self.metrics)
        await self.store.open()
        try:
            # one read of the runs in flight serves both the engine and the dispatcher
            in_flight = await self.store.runs_in_status((*states.ACTIVE, states.QUEUED))
            # claimed first: incidents of the runs another replica executes (or claims
            # meanwhile) stay that replica's, out of this engine's memory
            claimed = await self.dispatcher.claim(in_flight)
            await self.engine.load(in_flight, set(claimed))
            await self.dispatcher.resume(in_flight, claimed)
            del in_flight  # the runs live on in their tasks; the list need not
            # before the task group: a taken port is a plain OSError the CLI can explain, and
            # so is a token that cannot be read (ConfigError)
            await self.gate.load(self.executor.secrets)
            await self._start_api()
            async with asyncio.TaskGroup() as tg:
                workers = [tg.create_task(self.engine.run(), name="engine"),
                           tg.create_task(self.dispatcher.run(), name="dispatcher"),
                           tg.create_task(self._reloader(), name="reloader"),
                           tg.create_task(self._heartbeat(), name="heartbeat"),
                           tg.create_task(self.cluster.run(), name="cluster"),
                           tg.create_task(self.engine.suppressions.run(),
                                          name="suppression-summaries")]
                if self.silences is not None:
                    workers.append(tg.create_task(self.silences.run(), name="silences"))
                feeds = [tg.create_task(s.run(), name=f"source-{s.source.name}")
                         for s in self.supervisors]
                self._install_signals()
                warn_if_open(self.config)
                log.info("loopd ready", listen=f"{self.config.listen_host_port[0]}:{self.port}",
                         tls=self.tls is not None, auth=self.gate.tokens is not None,
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
            # what is left of the shutdown budget bounds the closing too: everything decided
            # is durable already, so a slow close (a WAL checkpoint, a peer that never
            # answers) costs nothing but time
            try:
                async with asyncio.timeout(self._left(SHUTDOWN_BUDGET, floor=1.0)):
                    await self.executor.close()
                    if self.tasks.prometheus is not None:
                        await self.tasks.prometheus.close()
                    await self.store.close()
            except TimeoutError:
                log.warning("closing connections and the store took past the shutdown "
                            "budget; exiting anyway (the store recovers at next open)")
            if self._hard_exit_timer is not None:
                self._hard_exit_timer.cancel()
            log.info("loopd stopped")

    def _left(self, cap: float, *, floor: float = 0.1) -> float:
        """Seconds a shutdown step may take: at most ``cap``, at most what is left of the
        whole budget (at least ``floor``); ``cap`` alone before the shutdown began."""
        if self._stopping_at is None:
            return cap
        left = self._stopping_at + SHUTDOWN_BUDGET - time.monotonic()
        return max(floor, min(cap, left))

    async def _shutdown(self, feeds: list[asyncio.Task[None]],
                        workers: list[asyncio.Task[None]]) -> None:
        # Each step is bounded, and all of them together by SHUTDOWN_BUDGET, so SIGTERM
        # exits within 10 s whatever the brokers do and however loaded the machine is:
        # API 2 s, decisions in flight 3 s, sources 3 s, runs 1.5 s, run ends 1 s, closing.
        self._stopping_at = time.monotonic()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = self.site = None
        self._holding = True
        try:  # decisions in flight are finished and acknowledged ...
            await self.engine.drain(timeout=self._left(3.0))
        except TimeoutError:
            log.warning("engine did not drain in time; undecided events will be redelivered")
        try:
            async with asyncio.timeout(self._left(3.0)):
                for sup in self.supervisors:  # ... before the sources commit and close
                    await sup.stop()
        except TimeoutError:
            log.warning("sources did not close in time; uncommitted offsets are redelivered "
                        "and recognised as duplicates")
        for task in feeds:
            task.cancel()
        try:
            await self.dispatcher.drain(timeout=self._left(SHUTDOWN_GRACE))
        except TimeoutError:
            log.info("runs still active at shutdown resume at next start",
                     active=self.dispatcher.active())
        self.dispatcher.shutting_down = True
        try:  # the ends of the runs that finished: incidents closed, guards saved
            await self.engine.drain(timeout=self._left(1.0))
        except TimeoutError:
            log.warning("run ends not recorded in time; incidents are closed at next start")
        for task in workers:
            task.cancel()

    async def _start_api(self) -> None:
        push: dict[str, tuple[str, int]] = {
            c.name: (c.type, c.max_payload) for c in self.config.sources
            if c.type in ("webhook", "alertmanager")}
        limits = self.config.api
        ctx = ApiContext(control=self.control, emit=self.engine.emit, push_sources=push,
                         body_timeout=limits.body_timeout, api=limits,
                         gate=self.gate)
        # keepalive_timeout closes a connection with no complete request head for that
        # long (idle, or headers sent slowly); lingering_time bounds how long the rest of
        # a refused body is read and discarded before the connection closes
        app = build_app(ctx)
        ui.add_routes(app, self.gate)  # the web UI at / (loopd.ui), behind the API's gate
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0,
                                    keepalive_timeout=limits.idle_timeout,
                                    lingering_time=2.0)
        await self.runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        """Listen on the API's address (again, with a new TLS context after a reload: the
        old site stops accepting first, the connections it accepted stay open)."""
        host, port = self.config.listen_host_port
        if self.site is not None:
            await self.site.stop()
            port = self.port or port  # a listen on port 0 keeps the port it was given
        assert self.runner is not None
        site = CappedSite(self.runner, host, port,
                          max_connections=self.config.api.max_connections,
                          ssl_context=self.tls.context if self.tls is not None else None)
        await site.start()
        self.site = site
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
