"""The ``loopd`` command: run | check | simulate | version.

Exit codes: 0 success, 1 the input is invalid (check found errors, a bad
event file), 2 usage or configuration error that stops ``run`` from starting.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from loopd import __version__
from loopd.config import LoopdConfig, load_config
from loopd.errors import ConfigError, EventError, LoopdError, StoreError

EXIT_OK, EXIT_INVALID, EXIT_CONFIG = 0, 1, 2
T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", type=Path, default=Path("config/loopd.yaml"))
    run.add_argument("--listen", help="HOST:PORT for the API (overrides the config)")
    check = sub.add_parser("check", help="validate config, rules, packs and workflows")
    check.add_argument("-c", "--config", type=Path, default=Path("config/loopd.yaml"))
    demo = sub.add_parser("demo", help="a closed loop on a simulated fleet, narrated")
    demo.add_argument("-c", "--config", type=Path, default=Path("config/demo.yaml"))
    demo.add_argument("--listen", help="HOST:PORT for the API (overrides the config)")
    demo.add_argument("--exit", action="store_true",
                      help="stop when the scenario is over instead of keeping the API up")
    sim = sub.add_parser(
        "simulate", help="replay recorded events through the rules and workflows, "
        "actions in dry run, event time as the clock; print (and write) a report")
    sim.add_argument("-c", "--config", type=Path, default=Path("config/loopd.yaml"))
    sim.add_argument("--events", nargs="+", required=True, metavar="FILE",
                     help="JSON Lines (events or Alertmanager payloads) or CSV telemetry "
                     "(timestamp,value; FILE:host=NAME,metric=NAME), merged in time order")
    sim.add_argument("--report", type=Path, metavar="OUT.json", help="also write it as JSON")
    sim.add_argument("--csv-source", default="telemetry", metavar="NAME",
                     help="source name of CSV events (default: telemetry)")
    sim.add_argument("--runs", type=int, default=10, metavar="N",
                     help="list the first N runs (default: 10)")
    sim.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"loopd {__version__}")
        return EXIT_OK
    if args.command == "check":
        return check(args.config)
    if args.command == "simulate":
        return simulate(args)
    if args.command == "demo":
        return demo(args.config, args.listen, args.exit)
    return run(args.config, args.listen)


def _config(path: Path, listen: str | None = None) -> LoopdConfig | None:
    try:
        return load_config(path, listen=listen)
    except ConfigError as exc:
        print(f"loopd: {exc}", file=sys.stderr)
        return None


def demo(path: Path, listen: str | None, exit_when_done: bool) -> int:
    from loopd import logs
    from loopd.demo import demo as run_demo

    config = _config(path, listen)
    if config is None:
        return EXIT_CONFIG
    logs.configure(config.log.format, config.log.level)
    try:
        return _run_loop(run_demo(config, exit_when_done=exit_when_done))
    except KeyboardInterrupt:
        return EXIT_OK
    except (LoopdError, OSError) as exc:
        print(f"loopd: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def run(path: Path, listen: str | None) -> int:
    from loopd import logs
    from loopd.daemon import Daemon

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
        _run_loop(daemon.run())
    except (StoreError, ConfigError) as exc:  # ConfigError: e.g. an API token's reference
        print(f"loopd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # e.g. the API port is taken
        print(f"loopd: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop when it is installed (the `fast` extra)."""
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
    from loopd.wiring import load_packs_and_rules

    config = _config(path)
    if config is None:
        return EXIT_INVALID
    problems: list[str] = []
    try:
        problems += [str(e) for e in Inventory.read(config.inventory)[1]]
    except ConfigError as exc:
        problems.append(str(exc))
    problems += _api_problems(config)
    registry, ruleset = load_packs_and_rules(config)
    problems += [str(e) for e in registry.errors]
    problems += [str(e) for e in ruleset.errors]
    for line in problems:
        print(f"error: {line}")
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
            report = _run_to_end(run_simulation(config, files, csv_source=args.csv_source,
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
            args.report.write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
        except OSError as exc:
            print(f"loopd: cannot write report: {exc.strerror}", file=sys.stderr)
            return EXIT_CONFIG
    return _print_to_pipe(report.render())


def _print_to_pipe(text: str) -> int:
    """Print ``text``; a reader that closed the pipe early (``| head -1``) is no error: the
    rest goes nowhere, quietly (not even the interpreter's flush at exit complains)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_OK


def _run_to_end(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


if __name__ == "__main__":
    sys.exit(main())
