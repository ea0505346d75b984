"""The sidecar's benchmark against the floors of its stack and a Redis baseline (issue 5),
and on PostgreSQL beside SQLite, one sidecar and a fleet (issue 16).

    .venv/bin/python bench/run.py [--quick|--full] [--out results.json]
                                  [--only SCENARIO,...] [--repeat N] [--postgres URL] [size flags]

Starts what it needs (the no-op gRPC server, `quota-sidecar serve` processes, raw
SQLite files, keys on the local Redis, schemas in the PostgreSQL database of
--postgres) in a temporary folder, runs every scenario
`--repeat` times, prints one table of medians with each figure's ratio to its floor
or baseline and the issue's goal, and writes every raw figure, the sizes and the
machine to a JSON file. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fleet
import floors
import grpc
import psycopg
import report
import scenarios
from fills import Ledgers
from processes import Processes, SidecarProcess, tail
from session import Session
from sizes import FULL, HELP, QUICK, Sizes

REPO = Path(__file__).resolve().parent.parent
CALL_SCENARIOS = ("checksend", "batch", "coalesce", "rename", "floods")
LEDGER_SCENARIOS = ("memory", "serving", "tenants", "sweep", "restart")
POSTGRES_SCENARIOS = ("postgres", "fleet")
SCENARIOS = ("floor", "redis", "sqlite", *CALL_SCENARIOS, *POSTGRES_SCENARIOS, "retention", *LEDGER_SCENARIOS)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small sizes (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="the issue's sizes; long")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"), help="the JSON file to write")
    parser.add_argument("--only", default="", help=f"comma-separated scenarios among: {', '.join(SCENARIOS)}")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the table shows their median")
    parser.add_argument("--tmp", type=Path, default=None, help="folder to make the run's temporary folder in")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (ledgers, process logs)")
    parser.add_argument(
        "--postgres",
        default=fleet.DEFAULT_SERVER,
        metavar="URL",
        help="the PostgreSQL database the postgres and fleet scenarios make their schemas in (a libpq URL)",
    )
    parser.add_argument(
        "--sqlite-synchronous",
        default="FULL",
        choices=("FULL", "NORMAL"),
        help="the sidecars' SQLite synchronous mode (FULL: durable at the answer; NORMAL: survives a crash of the"
        " process, not of the machine)",
    )
    sizes = parser.add_argument_group("sizes (override --quick/--full)")
    for field in dataclasses.fields(Sizes):
        kind = _counts if field.name == "serving_contacts" else int
        sizes.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None, help=HELP[field.name])
    args = parser.parse_args(argv)
    args.mode = args.mode or "quick"
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in SCENARIOS]
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    args.scenarios = [name for name in SCENARIOS if not only or name in only]
    base = FULL if args.mode == "full" else QUICK
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes) if getattr(args, f.name) is not None}
    args.sizes = dataclasses.replace(base, **given)
    for field in dataclasses.fields(Sizes):
        value = getattr(args.sizes, field.name)
        values = value if isinstance(value, tuple) else (value,)
        if not values or min(values) < 1:
            parser.error(f"--{field.name.replace('_', '-')}: at least 1")
    if max(args.sizes.fill_batch, args.sizes.batch, args.sizes.flood_batch) > 10_000:
        parser.error("--batch, --fill-batch and --flood-batch: at most 10,000 (CheckSendBatch's limit)")
    if args.sizes.tenant_contacts < args.sizes.tenants:
        parser.error("--tenant-contacts: at least one per tenant (--tenants)")
    return args


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts, got {text!r}") from None


def machine(postgres: str) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        memory = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain"))
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "sqlite": sqlite3.sqlite_version,
        "git_commit": commit,
        "git_dirty": dirty,
    }
    try:
        import redis

        info["redis_py"] = redis.__version__
        client = redis.Redis(host="127.0.0.1", port=6379, db=0, socket_timeout=2)
        try:
            info["redis_server"] = client.info("server").get("redis_version", "")
        finally:
            client.close()
    except Exception as exc:
        info["redis_server"] = f"unavailable ({type(exc).__name__})"
    try:
        with psycopg.connect(postgres, connect_timeout=2) as conn:
            info["postgres_server"] = conn.info.parameter_status("server_version") or ""
    except psycopg.Error as exc:
        info["postgres_server"] = f"unavailable ({type(exc).__name__})"
    return info


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def run_scenarios(session: Session, names: list[str], failures: dict[str, str], postgres: str) -> None:
    def attempt(name: str, work: Callable[[], None]) -> None:
        session.progress(f"{name}: start")
        try:
            work()
        except Exception as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"
            session.progress(f"{name}: FAILED\n{traceback.format_exc()}")
            logs = session.processes.logs
            if logs:
                session.progress(f"the last process log, {logs[-1].name}:\n{tail(logs[-1], 40)}")
            return
        session.progress(f"{name}: done")

    calls = [name for name in CALL_SCENARIOS if name in names]
    paired = "floor" in names and "checksend" in calls
    for name, work in (("floor", floors.grpc_floor), ("redis", floors.redis_baseline), ("sqlite", floors.sqlite_rate)):
        if name in names and not (name == "floor" and paired):
            attempt(name, lambda work=work: work(session))
    if calls:
        sidecar: SidecarProcess | None = None
        try:
            sidecar = scenarios.call_sidecar(session)
        except Exception as exc:
            for name in calls:
                failures[name] = f"the sidecar did not start: {type(exc).__name__}: {exc}"
            session.progress(f"the sidecar did not start\n{traceback.format_exc()}")
        if sidecar is not None:
            running = sidecar
            try:
                for name in calls:
                    if name == "checksend" and paired:
                        attempt("floor + checksend, run by run", lambda: _paired(session, running))
                    else:
                        attempt(name, lambda name=name: getattr(scenarios, name)(session, running))
            finally:
                try:
                    running.stop()
                except Exception as exc:
                    failures["sidecar stop"] = f"{type(exc).__name__}: {exc}"
    schemas = fleet.Schemas(postgres)
    try:
        for name in POSTGRES_SCENARIOS:
            if name in names:
                attempt(name, lambda name=name: getattr(fleet, name)(session, schemas))
    finally:
        try:
            schemas.close()
        except psycopg.Error as exc:
            failures["postgres schemas"] = f"not dropped: {exc}"
    if "retention" in names:
        attempt("retention", lambda: scenarios.retention(session))
    ledgers = Ledgers(session)
    for name in LEDGER_SCENARIOS:
        if name in names:
            attempt(name, lambda name=name: getattr(scenarios, name)(session, ledgers))


def _paired(session: Session, sidecar: SidecarProcess) -> None:
    """The gRPC floor and CheckSend measured run by run, back to back."""
    with floors.GrpcFloor(session) as floor:
        scenarios.checksend(session, sidecar, floor)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    started_at = datetime.now(UTC)
    started = time.monotonic()
    failures: dict[str, str] = {}
    folder = Path(tempfile.mkdtemp(prefix="quota-bench-", dir=args.tmp))
    processes = Processes(folder, args.sqlite_synchronous)
    session = Session(folder, processes, args.sizes, args.repeat)
    session.progress(f"{args.mode} run of {', '.join(args.scenarios)} in {folder}; {args.repeat} run(s) each")
    try:
        run_scenarios(session, args.scenarios, failures, args.postgres)
    except KeyboardInterrupt:
        session.progress("interrupted: stopping every process started")
        return 130
    finally:
        processes.close()
        if args.keep:
            session.progress(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    wall = time.monotonic() - started
    info = machine(args.postgres)
    lines = report.evaluate(session.results, args.sizes, args.sqlite_synchronous)
    footer = [
        f"{args.mode} run, medians of {args.repeat} run(s); wall time {wall:.0f} s; contact ids are 16 characters",
        f"machine: {info['cpu_model']}, {info['cores']} cores; Python {info['python']}, grpcio {info['grpc']},"
        f" SQLite {info['sqlite']}, Redis {info.get('redis_server', '')},"
        f" PostgreSQL {info.get('postgres_server', '')}; commit {info['git_commit'][:12]}"
        + (" (uncommitted changes)" if info["git_dirty"] else ""),
        f"raw figures: {args.out}",
    ]
    print(report.table(lines, session.results, failures, footer), flush=True)
    report.write_json(
        args.out,
        lines,
        session.results,
        failures,
        args.sizes,
        {
            "mode": args.mode,
            "repeat": args.repeat,
            "sqlite_synchronous": args.sqlite_synchronous,
            "scenarios": args.scenarios,
            "started_at": started_at.isoformat(),
            "wall_seconds": round(wall, 1),
            "machine": info,
        },
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
