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
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import disable_created_metrics

from . import __version__
from .app import Sidecar
from .errors import QuotaError
from .settings import SettingsError, add_arguments, resolve
from .tenants import TenantsFileError, check_tenants

log = logging.getLogger("quota_sidecar")


class StopSignals:
    """SIGTERM and SIGINT, caught from now on and waited for by the main thread.

    The kernel may hand a signal sent to the process to any of its threads: it passes
    over one that is not running and still has signals pending, as the main thread has
    from a SIGSTOP until it runs again after the SIGCONT. Python's C-level handler then
    runs in the thread that got the signal and only flags it, so a main thread blocked
    in a wait (Event.wait) would never run the Python handler. That C handler also
    writes the signal's number to the wakeup fd whichever thread it runs in, so a
    blocking read of the pipe behind it always wakes the main thread."""

    CAUGHT = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for signum in self.CAUGHT:
            signal.signal(signum, _caught)

    def wait(self) -> signal.Signals:
        """Blocks until one of the caught signals has arrived (also before this call) and returns it."""
        while True:
            for number in os.read(self._read_end, 64):
                if number in self.CAUGHT:
                    return signal.Signals(number)


def _caught(_signum: int, _frame: object) -> None:
    """Replaces the default action (death, or KeyboardInterrupt); StopSignals.wait reports the signal."""


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
    disable_created_metrics()
    stop_signals = StopSignals()
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
    received = stop_signals.wait()
    log.info("%s received: draining in-flight calls", received.name)
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
