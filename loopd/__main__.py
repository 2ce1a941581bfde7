"""The ``loopd`` command (and ``python -m loopd``): loopd.cli, imported and started with
the cyclic garbage collector off.

Start-up makes a few hundred thousand objects that live as long as the process (the
modules, the compiled rules, workflows and models), and a collector running while they
are made scans them again and again: 230-250 ms of 820-980 ms to ``/healthz`` at 1,000
rules, in 414 collections. ``loopd run`` turns it back on once it is ready, after one full
collection (``loopd.daemon.tune_gc``); every other command as soon as its arguments are
read (``loopd.cli.main``)."""

from __future__ import annotations

import gc


def main() -> int:
    gc.disable()
    from loopd.cli import main as cli

    return cli()


if __name__ == "__main__":
    raise SystemExit(main())
