"""`quota-sidecar`: the command line of the service.

`quota-sidecar serve` runs the sidecar until SIGTERM or SIGINT, then drains
in-flight calls, flushes the ledger and exits 0. `quota-sidecar health` probes
a running sidecar's health service (exit 0 when SERVING). `quota-sidecar verify`
checks every stored figure of a ledger against its rows (exit 0 when all agree,
1 when some do not, 2 when the ledger cannot be checked); with --repair it
recomputes them from the rows. `quota-sidecar backup` copies a ledger, served or
not, to a new file with SQLite's online backup API.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import select
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import disable_created_metrics

from . import __version__
from .app import Sidecar
from .domain.errors import QuotaError
from .ledger import LedgerOptionError
from .ledger.factory import POSTGRES_SCHEMES, ledger_as_shown
from .ledger.sqlite import SCHEMA_VERSION, sqlite_path
from .ledger.sqlite.verify import verify_ledger
from .ledger.verification import Report, VerifyError
from .settings import SettingsError, add_arguments, resolve, secrets_on_the_command_line
from .tenants import TenantsFileError, check_tenants

log = logging.getLogger("quota_sidecar")
# What start-up loads (a dedupe filter per tenant cycle, the metrics board) lives as long
# as the process, and every full garbage collection walked all of it while calls waited:
# pauses of 80 to 190 ms, growing as 100,000 tenants loaded. It is moved out of the
# collector's sight as it loads (refcounting still frees what is replaced).
FREEZE_INTERVAL = 0.5
# A thread coming back from SQLite or gRPC waits for the interpreter lock while another
# runs Python; the holder is asked to let go after this long (5 ms by default). A small
# call does that several times, so while a large call's Python work ran each wait was
# the whole 5 ms. Set for the process before any thread starts.
SWITCH_INTERVAL_S = 0.0005


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

    def wait(self, timeout: float | None = None) -> signal.Signals | None:
        """Blocks until one of the caught signals has arrived (also before this call) and
        returns it; None once `timeout` seconds passed without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._read_end], [], [], left)
            if not ready:
                return None
            for number in os.read(self._read_end, 64):
                if number in self.CAUGHT:
                    return signal.Signals(number)


def _caught(_signum: int, _frame: object) -> None:
    """Replaces the default action (death, or KeyboardInterrupt); StopSignals.wait reports the signal."""


def serve(args: argparse.Namespace) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
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
    stop_signals = StopSignals()
    try:
        sidecar = Sidecar(settings, tenant_plans=plans)
    except LedgerOptionError as exc:
        print(f"quota-sidecar: --{exc.option.replace('_', '-')}: {exc.problem}", file=sys.stderr)
        return 2
    try:
        sidecar.bind()
    except (OSError, RuntimeError) as exc:
        print(f"quota-sidecar: cannot listen on {settings.address}: {exc}", file=sys.stderr)
        return 1
    try:
        sidecar.open()
    except (QuotaError, TenantsFileError, OSError) as exc:
        sidecar.stop(0)
        print(f"quota-sidecar: cannot open the ledger {ledger_as_shown(settings.ledger)}: {exc}", file=sys.stderr)
        return 1
    received = None
    while sidecar.loading and received is None:
        received = stop_signals.wait(FREEZE_INTERVAL)
        gc.freeze()
    if received is None:
        gc.freeze()
        received = stop_signals.wait()
    assert received is not None
    log.info("%s received: draining in-flight calls", received.name)
    sidecar.stop()
    return 0


def _verify_postgres(url: str, repair: bool) -> Report:
    try:
        from .ledger.postgres.verify import verify_ledger as verify_postgres
    except ImportError as exc:
        raise VerifyError(f"the PostgreSQL ledger is not available in this installation ({exc})") from None
    return verify_postgres(url, repair_figures=repair)


def verify(args: argparse.Namespace) -> int:
    try:
        if args.ledger.split("://", 1)[0].lower() in POSTGRES_SCHEMES:
            report = _verify_postgres(args.ledger, args.repair)
        else:
            report = verify_ledger(sqlite_path(args.ledger), schema_version=SCHEMA_VERSION, repair_figures=args.repair)
    except (ValueError, VerifyError) as exc:
        print(f"quota-sidecar verify: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "ledger": ledger_as_shown(args.ledger),
                    "mismatches": [m.to_dict() for m in report.mismatches],
                    "repaired": report.repaired,
                    "integrity": report.integrity,
                }
            )
        )
    else:
        for m in report.mismatches:
            print(("repaired: " if report.repaired else "") + m.describe())
        if report.integrity != ["ok"]:
            for problem in report.integrity:
                print(f"integrity: {problem}")
        tenants = len({m.tenant_id for m in report.mismatches})
        if not report.mismatches:
            print("every figure equals its rows")
        elif report.repaired:
            print(f"repaired {len(report.mismatches)} figure(s) of {tenants} tenant(s) from their rows")
        else:
            print(
                f"{len(report.mismatches)} figure(s) of {tenants} tenant(s) disagree with their rows;"
                " --repair recomputes them from the rows"
            )
    return 0 if report.clean else 1


def backup(args: argparse.Namespace) -> int:
    """Copies the ledger in one read transaction of the backup API: a snapshot as of one
    commit, taken beside a serving sidecar (WAL readers never block its writer, and its
    flock keeps out sidecars, not readers). The copy gets its name only once complete, and
    is readable by its owner alone (0600), as the ledger is."""
    try:
        source = sqlite_path(args.ledger)
    except ValueError as exc:
        print(f"quota-sidecar backup: {exc}", file=sys.stderr)
        return 2
    target = Path(args.to)
    partial = target.with_name(f"{target.name}.partial")
    if not source.is_file():
        print(f"quota-sidecar backup: no ledger file at {source}", file=sys.stderr)
        return 2
    if target.exists():
        print(f"quota-sidecar backup: {target} exists; give a new path", file=sys.stderr)
        return 2
    try:
        partial.unlink(missing_ok=True)
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
        try:
            copy = sqlite3.connect(partial)
            try:
                reader.backup(copy)
            finally:
                copy.close()
        finally:
            reader.close()
        os.replace(partial, target)
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except (sqlite3.Error, OSError) as exc:
        partial.unlink(missing_ok=True)
        print(f"quota-sidecar backup: {source} could not be copied to {target}: {exc}", file=sys.stderr)
        return 2
    print(f"backed up {source} to {target}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quota-sidecar", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"quota-sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_arguments(commands.add_parser("serve", help="run the sidecar"))
    commands.add_parser("health", help="probe a running sidecar's health service", add_help=False)
    checking = commands.add_parser("verify", help="check every stored figure of a ledger against its rows")
    checking.add_argument("--ledger", required=True, help="the ledger: sqlite:///PATH or a bare file path")
    checking.add_argument("--repair", action="store_true", help="recompute disagreeing figures from the rows")
    checking.add_argument("--json", action="store_true", help="print the report as one JSON object")
    copying = commands.add_parser("backup", help="copy a ledger, served or not, to a new file")
    copying.add_argument("--ledger", required=True, help="the ledger: sqlite:///PATH or a bare file path")
    copying.add_argument("--to", required=True, help="the new file to write the copy to")
    args, rest = parser.parse_known_args(argv)
    if args.command == "health":
        from .probe import main as probe

        return probe(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "verify":
        return verify(args)
    if args.command == "backup":
        return backup(args)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
