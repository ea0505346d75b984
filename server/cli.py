"""`quota-sidecar`: the command line of the service.

`quota-sidecar serve` runs the sidecar until SIGTERM or SIGINT, then drains
in-flight calls, flushes the ledger and exits 0. `quota-sidecar health` probes
a running sidecar's health service (exit 0 when SERVING).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import disable_created_metrics

from . import __version__
from .app import Sidecar
from .errors import QuotaError
from .settings import SettingsError, add_arguments, resolve, secrets_on_the_command_line
from .tenants import TenantsFileError, check_tenants

log = logging.getLogger("quota_sidecar")


def serve(args: argparse.Namespace) -> int:
    try:
        settings = resolve(args, os.environ)
        plans = check_tenants(Path(settings.tenants)) if settings.tenants else None
    except (SettingsError, TenantsFileError) as exc:
        print(f"quota-sidecar: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    for flag in secrets_on_the_command_line(args):
        log.warning(
            "%s was given on the command line, where every user of this machine can read it"
            " (ps, /proc/PID/cmdline); use QUOTA_%s or %s-file instead",
            flag,
            flag.removeprefix("--").replace("-", "_").upper(),
            flag,
        )
    disable_created_metrics()
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sidecar = Sidecar(settings, tenant_plans=plans)
    try:
        sidecar.bind()
    except (OSError, RuntimeError) as exc:
        print(f"quota-sidecar: cannot listen on {settings.address}: {exc}", file=sys.stderr)
        return 1
    try:
        sidecar.open()
    except (QuotaError, TenantsFileError, OSError) as exc:
        sidecar.stop(0)
        print(f"quota-sidecar: cannot open the ledger {settings.ledger}: {exc}", file=sys.stderr)
        return 1
    while not stop.wait(3600):
        pass
    log.info("%s received: draining in-flight calls", signal.Signals(received[0]).name)
    sidecar.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quota-sidecar", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"quota-sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_arguments(commands.add_parser("serve", help="run the sidecar"))
    commands.add_parser("health", help="probe a running sidecar's health service", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "health":
        from .probe import main as probe

        return probe(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
