"""What one CheckSend costs the engine and its ledger, without gRPC: PostgreSQL beside SQLite.

Runs the engine in this process over a PostgresLedger (a fresh schema in the --postgres
database, dropped at the end) and over a SQLiteLedger (a file in a temporary directory),
one CheckSend of a new contact at a time, each with a request_id as the Python client
sends; per --rounds round of --calls calls, the wall time per call and this process's CPU
time per call (the rest of the wall time is the database server's work and the wait for
it). Prints the medians over the rounds.

    .venv/bin/python bench/decision_cost.py --calls 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from quota_sidecar.server.domain.clock import FakeClock, to_us
from quota_sidecar.server.domain.model import Channel, Enforcement, MessageKind, Metering, PlanInput
from quota_sidecar.server.engine import Engine, SendRequest
from quota_sidecar.server.ledger import Ledger
from quota_sidecar.server.ledger.postgres import PostgresLedger
from quota_sidecar.server.ledger.sqlite import SQLiteLedger

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
ANCHOR = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)


def measure(ledger: Ledger, calls: int, rounds: int) -> tuple[float, float]:
    """Median wall and process CPU milliseconds per CheckSend of a new contact."""
    ledger.open()
    try:
        engine = Engine(ledger, FakeClock(NOW))
        engine.put_plan(
            "t",
            PlanInput(
                metering=Metering.CYCLE_ACTIVE,
                enforcement=Enforcement.HARD,
                contact_limit=10**9,
                cycle_anchor_us=to_us(ANCHOR),
                counted_kinds=(MessageKind.CAMPAIGN,),
                notify_thresholds=(0.8,),
            ),
        )
        walls, cpus = [], []
        for n in range(rounds):
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(calls):
                engine.check_send(
                    SendRequest("t", f"c{n}-{i:07d}", Channel.EMAIL, MessageKind.CAMPAIGN, request_id=f"r{n}-{i}")
                )
            walls.append((time.perf_counter() - wall) / calls * 1000)
            cpus.append((time.process_time() - cpu) / calls * 1000)
        return statistics.median(walls), statistics.median(cpus)
    finally:
        ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--calls", type=int, default=2000, help="CheckSend calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(args.postgres, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            sep = "&" if "?" in args.postgres else "?"
            pg = measure(
                PostgresLedger(f"{args.postgres}{sep}options=-csearch_path%3D{schema}"), args.calls, args.rounds
            )
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
    with tempfile.TemporaryDirectory() as tmp:
        lite = measure(SQLiteLedger(Path(tmp) / "ledger.db"), args.calls, args.rounds)
    print("CheckSend in process, new contact   wall ms/call   this process's CPU ms/call")
    print(f"PostgreSQL                          {pg[0]:12.3f}   {pg[1]:26.3f}")
    print(f"SQLite                              {lite[0]:12.3f}   {lite[1]:26.3f}")
    print(f"PostgreSQL / SQLite                 {pg[0] / lite[0]:11.2f}x   {pg[1] / lite[1]:25.2f}x")


if __name__ == "__main__":
    main()
