"""The ``loopd`` command: run | check | simulate | version.

Exit codes: 0 success, 1 the input is invalid (check found errors, a bad
event file), 2 usage or configuration error that stops ``run`` from starting.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from loopd import __version__
from loopd.config import LoopdConfig, load_config
from loopd.errors import ConfigError, LoopdError, StoreError

EXIT_OK, EXIT_INVALID, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", type=Path, default=Path("config/loopd.yaml"))
    run.add_argument("--listen", help="HOST:PORT for the API (overrides the config)")
    check = sub.add_parser("check", help="validate config, rules, packs and workflows")
    check.add_argument("-c", "--config", type=Path, default=Path("config/loopd.yaml"))
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"loopd {__version__}")
        return EXIT_OK
    if args.command == "check":
        return check(args.config)
    return run(args.config, args.listen)


def _config(path: Path, listen: str | None = None) -> LoopdConfig | None:
    try:
        return load_config(path, listen=listen)
    except ConfigError as exc:
        print(f"loopd: {exc}", file=sys.stderr)
        return None


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
        _event_loop_runner()(daemon.run())
    except StoreError as exc:
        print(f"loopd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # e.g. the API port is taken
        print(f"loopd: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def check(path: Path) -> int:
    from loopd.catalog.inventory import Inventory
    from loopd.daemon import load_packs_and_rules

    config = _config(path)
    if config is None:
        return EXIT_INVALID
    problems: list[str] = []
    try:
        Inventory.load(config.inventory)
    except ConfigError as exc:
        problems.append(str(exc))
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


if __name__ == "__main__":
    sys.exit(main())
