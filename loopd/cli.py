"""The loopd command: the daemon (run, check, demo, simulate) and the terminal commands
that ask a running daemon's API (runs, show, decisions, approve, reject).

Exit codes: 0 success; 1 the input is invalid (check found errors, a bad event file) or
the API refused the request (401, 403, 404, 409: its message is printed); 2 a usage or
configuration error that stops run from starting, or no daemon answers at --url.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loopd import __version__
from loopd.config import LoopdConfig, load_config
from loopd.errors import ConfigError, EventError, LoopdError, StoreError

if TYPE_CHECKING:
    from loopd.packs.registry import PackRegistry
    from loopd.rules.loader import RuleSet

EXIT_OK, EXIT_INVALID, EXIT_CONFIG = 0, 1, 2
TERMINAL = ("runs", "show", "decisions", "approve", "reject")  # loopd.terminal: ask the API
T = TypeVar("T")
DESCRIPTION = ("loopd: an event-driven closed-loop remediation daemon. It decides with "
               "rules when something needs fixing, runs a workflow, and confirms from "
               "telemetry that the fix worked.")
EPILOG = "loopd COMMAND --help shows a command's options. Exit codes: " + \
    __doc__.split("Exit codes: ", 1)[1].replace("\n", " ").strip()


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default when it has one worth showing (not None, not a flag's
    False, not one the help text already names)."""

    @classmethod
    def commands(cls, prog: str) -> _Help:
        """For the list of commands: argparse measures the options' column without the
        commands (indented one step more), so a long name would push its help to the next
        line; this column fits them all."""
        formatter = cls(prog)
        formatter._action_max_length = 16
        return formatter

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    from loopd.client import DEFAULT_URL

    parser = argparse.ArgumentParser(prog="loopd", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_Help.commands)
    parser.add_argument("--version", action="version", version=f"loopd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands",
                                metavar="COMMAND")

    def command(name: str, summary: str, *parents: argparse.ArgumentParser
                ) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, parents=list(parents),
                              formatter_class=_Help)

    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("-c", "--config", type=Path, default=Path("config/loopd.yaml"),
                        help="the daemon's configuration file")
    listen = argparse.ArgumentParser(add_help=False)
    listen.add_argument("--listen", metavar="HOST:PORT",
                        help="address of the API (overrides the config's listen)")
    command("run", "run the daemon",
            config, listen)
    command("check", "validate config, inventory, packs, rules, workflows", config)
    demo = command("demo", "a closed loop on a simulated fleet, narrated", listen)
    demo.description = ("a closed loop on a simulated fleet, narrated; each demo starts from "
                        "fresh state, in a new temporary directory that also keeps the "
                        "daemon's log")
    demo.add_argument("-c", "--config", type=Path, default=Path("config/demo.yaml"),
                      help="the demo's configuration file")
    demo.add_argument("--exit", action="store_true",
                      help="stop when the scenario is over instead of keeping the API up")
    sim = command("simulate", "replay recorded events through rules and workflows", config)
    sim.add_argument("--events", nargs="+", required=True, metavar="FILE",
                     help="JSON Lines (events or Alertmanager payloads) or CSV telemetry "
                     "(timestamp,value; FILE:host=NAME,metric=NAME), merged in time order")
    sim.add_argument("--report", type=Path, metavar="OUT.json", help="also write it as JSON")
    sim.add_argument("--csv-source", default="telemetry", metavar="NAME",
                     help="source name of CSV events")
    sim.add_argument("--runs", type=int, default=10, metavar="N", help="list the first N runs")
    sim.add_argument("--no-progress", action="store_true", help="no progress line on stderr")

    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--url", default=os.environ.get("LOOPD_URL") or DEFAULT_URL,
                     help="the daemon's API (environment: LOOPD_URL)")
    api.add_argument("--token-file", type=Path, metavar="FILE",
                     help="read the API token from FILE (else the environment's LOOPD_TOKEN)")
    api.add_argument("--cacert", type=Path, metavar="FILE",
                     help="trust this CA certificate for an https:// URL")
    api.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    runs = command("runs", "list a running daemon's runs, newest first", api)
    runs.description = ("list a running daemon's runs, newest first (a sub-workflow's run is "
                        "in its parent's story: loopd show RUN_ID)")
    runs.add_argument("--status", metavar="S", help="only runs in this status (running, "
                      "waiting, awaiting_approval, succeeded, failed, ...)")
    runs.add_argument("--rule", metavar="R", help="only runs of this rule")
    runs.add_argument("--limit", type=int, default=50, metavar="N", help="at most N runs")
    show = command("show", "one run's story: trigger, decisions, steps, outcome", api)
    show.add_argument("run", metavar="RUN_ID")
    dec = command("decisions", "decisions about events (why a run started or not)", api)
    dec.add_argument("--rule", metavar="R", help="only this rule's decisions")
    dec.add_argument("--key", metavar="K", help="only this key's (a rule's key: host, ...)")
    dec.add_argument("--outcome", metavar="O",
                     help="only this outcome (run_created, joined, suppressed, ...)")
    dec.add_argument("--source", metavar="NAME", help="only events of this source")
    dec.add_argument("--since", metavar="TIME", help="only since TIME (RFC 3339 or epoch)")
    dec.add_argument("--before", type=int, metavar="SEQ",
                     help="only older than the decision SEQ (the next page)")
    dec.add_argument("--limit", type=int, default=50, metavar="N", help="at most N decisions")
    for verb, past in (("approve", "approved"), ("reject", "rejected")):
        decide = command(verb, f"{verb} a run that awaits approval", api)
        decide.add_argument("run", metavar="RUN_ID")
        decide.add_argument("--reason", help=f"why it is {past} (kept in the run's history)")
    command("version", "print the version (as loopd --version does)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "run":  # the command starts with it off (loopd.__main__)
        gc.enable()
    if args.command == "version":
        print(f"loopd {__version__}")
        return EXIT_OK
    if args.command == "check":
        return check(args.config)
    if args.command == "simulate":
        return simulate(args)
    if args.command == "demo":
        return demo(args.config, args.listen, args.exit)
    if args.command in TERMINAL:
        from loopd.terminal import ask

        return ask(args)
    return run(args.config, args.listen)


def _config(path: Path, listen: str | None = None) -> LoopdConfig | None:
    try:
        return load_config(path, listen=listen)
    except ConfigError as exc:
        print(f"loopd: {exc}", file=sys.stderr)
        return None


def demo(path: Path, listen: str | None, exit_when_done: bool) -> int:
    import structlog

    from loopd import logs
    from loopd.demo import demo as run_demo
    from loopd.demo import fresh_state

    config = _config(path, listen)
    if config is None:
        return EXIT_CONFIG
    config, state = fresh_state(config)
    with state.log.open("a") as log:
        logs.configure("json", config.log.level)
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(log))
        try:
            return run_loop(run_demo(config, state, exit_when_done=exit_when_done))
        except KeyboardInterrupt:  # before the daemon took over Ctrl-C: as loopd run does
            print("\nloopd demo: stopped.", file=sys.stderr)
            return EXIT_OK
        except OSError as exc:
            print(f"loopd demo: cannot start: {exc}", file=sys.stderr)
            if exc.errno == errno.EADDRINUSE:
                host, port = config.listen_host_port
                print(f"  hint: something listens on {host}:{port} already (./scripts/run, "
                      "another loopd?): stop it, or give the demo another port: "
                      f"loopd demo --listen {host}:{port + 1}", file=sys.stderr)
            return EXIT_CONFIG
        except LoopdError as exc:
            print(f"loopd demo: {exc} (log: {state.log})", file=sys.stderr)
            return EXIT_CONFIG


def run(path: Path, listen: str | None) -> int:
    from loopd import logs
    from loopd.daemon import Daemon, tune_gc

    config = _config(path, listen)
    if config is None:
        return EXIT_CONFIG
    logs.configure(config.log.format, config.log.level)
    try:
        daemon = Daemon(config)
    except LoopdError as exc:
        print(f"loopd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        daemon.exit_hard_after_shutdown_budget()
        # this process is the daemon alone: once it is up, what start-up built lives for
        # good and the collector stops rescanning it (not for a daemon in a test process)
        run_loop(daemon.run(on_ready=lambda _: tune_gc()))
    except (StoreError, ConfigError) as exc:  # ConfigError: e.g. an API token's reference
        print(f"loopd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # e.g. the API port is taken
        print(f"loopd: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop when it is installed (the `fast` extra): how loopd's
    commands run (the in-process benchmark too)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


def check(path: Path) -> int:
    """Validate everything ``run`` would load (config, inventory, packs, rules, and the
    API's exposure, tokens and certificate) and print each problem."""
    from loopd.catalog.inventory import Inventory
    from loopd.sources.scrape import target_problems
    from loopd.wiring import load_packs_and_rules

    config = _config(path)
    if config is None:
        return EXIT_INVALID
    problems: list[str] = []
    try:
        inventory, inventory_problems = Inventory.read(config.inventory)
        problems += [str(e) for e in inventory_problems]
        problems += target_problems(config.sources, inventory)  # scrape: who is scraped
    except ConfigError as exc:
        problems.append(str(exc))
    problems += _api_problems(config)
    registry, ruleset = load_packs_and_rules(config)
    problems += [str(e) for e in registry.errors]
    problems += [str(e) for e in ruleset.errors]
    for line in problems:
        print(f"error: {line}")
    for line in _never_polled(config, registry, ruleset):
        print(f"warning: {line}")
    actions = len(registry.actions)
    workflows = len(registry.workflows)
    summary = (f"{path}: {len(config.sources)} sources, {len(registry.packs)} packs "
               f"({actions} actions, {workflows} workflows), {len(ruleset.rules)} rules "
               f"in {len(ruleset.files)} files")
    if problems:
        print(f"{summary}: {len(problems)} error(s)")
        return EXIT_INVALID
    print(f"{summary}: OK")
    return EXIT_OK


def _never_polled(config: LoopdConfig, registry: PackRegistry, ruleset: RuleSet
                  ) -> list[str]:
    """Confirm queries that ``run`` would never poll, in the workflows a rule runs (and
    their sub-workflows): there is no ``prometheus:`` to ask (their event evidence, if any,
    still counts; ``simulate`` never polls either)."""
    if config.prometheus is not None:
        return []
    wanted = [r.target for r in ruleset.rules if r.kind == "workflow"]
    used: set[str] = set()
    while wanted:
        name = wanted.pop()
        workflow = registry.workflows.get(name)
        if name in used or workflow is None:
            continue
        used.add(name)
        wanted += [ct.task.workflow for ct in workflow.tasks.values() if ct.task.workflow]
    return [f"{ct.origin}: workflow {name} task {ct.name}: confirm query is never polled: "
            "loopd.yaml has no prometheus: section"
            for name in sorted(used) for ct in registry.workflows[name].tasks.values()
            if ct.task.confirm is not None and ct.task.confirm.promql is not None]


def _api_problems(config: LoopdConfig) -> list[str]:
    """What would stop ``run`` at the API: exposure without auth, tokens, TLS files."""
    from loopd.api.auth import Gate, check_exposure
    from loopd.api.tls import ServerTls
    from loopd.wiring import secret_resolver

    problems = []
    try:
        check_exposure(config)
    except ConfigError as exc:
        problems.append(str(exc))
    try:  # reads the tokens' values, as run would
        asyncio.run(Gate(config).load(secret_resolver(config)))
    except ConfigError as exc:
        problems.append(str(exc))
    if config.api.tls is not None:
        try:
            ServerTls(config.api.tls)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def simulate(args: argparse.Namespace) -> int:
    import orjson

    from loopd import logs
    from loopd.simulate.input import parse_event_file
    from loopd.simulate.replay import run_simulation
    from loopd.simulate.report import Meter, Progress

    config = _config(args.config)
    if config is None:
        return EXIT_CONFIG
    logs.configure(config.log.format, "error")  # the report says what happened, not the log
    try:
        files = [parse_event_file(arg) for arg in args.events]
        meter = Meter()
        progress = None
        if not args.no_progress and sys.stderr.isatty():
            progress = Progress(meter, sum(f.path.stat().st_size for f in files))
        try:
            report = run_loop(run_simulation(config, files, csv_source=args.csv_source,
                                             first_runs=args.runs, meter=meter,
                                             progress=progress))
        finally:
            if progress is not None:
                progress.close()
    except EventError as exc:  # the first invalid line: FILE:LINE: what is wrong
        print(f"loopd: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:
        print(f"loopd: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_INVALID
    except LoopdError as exc:
        print(f"loopd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for error in report.data["rules"]["errors"]:
        print(f"loopd: warning: not simulated: {error}", file=sys.stderr)
    late = report.data["events"]
    if late["out_of_order"]:
        first = late["out_of_order_first"][0]
        print(f"loopd: warning: {late['out_of_order']} event(s) out of time order, each decided "
              f"at the time of the latest event before it; first: {first['origin']}",
              file=sys.stderr)
    if args.report is not None:  # first: a reader that stops early (| head) loses nothing
        try:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
        except OSError as exc:
            print(f"loopd: cannot write report {args.report}: {exc.strerror}", file=sys.stderr)
            return EXIT_CONFIG
    from loopd.terminal import print_to_pipe

    return print_to_pipe(report.render())




if __name__ == "__main__":
    sys.exit(main())
