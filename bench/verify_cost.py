"""What verifying a big ledger costs: the start-up check, `quota-sidecar verify` and PRAGMA quick_check.

Builds a ledger of the current schema straight through SQL (filling it through the
sidecar would take most of an hour at 10M contacts): one CYCLE_ACTIVE tenant with
N activation rows (16-hex-character contact ids, as bench/fills.py makes them) and
one HELD_CONTACTS tenant holding N contacts, every figure equal to its rows. Then
times, each --repeat times, the check `quota-sidecar serve` runs before SERVING
(each tenant's latest cycle and its holdings), the every-cycle check of `verify`, and
PRAGMA quick_check, and prints the medians.

    .venv/bin/python bench/verify_cost.py --contacts 10000000
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from quota_sidecar.server.ledger.sqlite import migrate
from quota_sidecar.server.ledger.sqlite.verify import find_mismatches

CYCLE = 1_773_561_600_000_000


def build(path: Path, contacts: int) -> None:
    migrate(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    key = conn.execute("INSERT INTO cycle_keys (tenant_id, cycle_start_us) VALUES ('active', ?)", (CYCLE,)).lastrowid
    code = conn.execute("INSERT INTO activity_names (name) VALUES ('CAMPAIGN')").lastrowid
    _insert_activations(conn, key, code, contacts)
    conn.execute(
        "INSERT INTO usage (tenant_id, cycle_start_us, active_contacts, sends) VALUES ('active', ?, ?, ?)",
        (CYCLE, contacts, contacts),
    )
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
        " INSERT INTO contacts (tenant_id, contact_id, held, marketing, marketing_until_next_update, updated_at_us,"
        " marketing_until_us, held_since_us) SELECT 'held', printf('%016x', i), 1, 1, 0, ?, 0, ? FROM n",
        (contacts, CYCLE, CYCLE),
    )
    conn.execute(
        "INSERT INTO holdings (tenant_id, cycle_start_us, held, marketing, pending) VALUES ('held', ?, ?, ?, 0)",
        (CYCLE, contacts, contacts),
    )
    conn.execute(
        "INSERT INTO usage (tenant_id, cycle_start_us, active_contacts, sends, held_end, held_peak, marketing_end,"
        " marketing_peak) VALUES ('held', ?, 0, 0, ?, ?, ?, ?)",
        (CYCLE, contacts, contacts, contacts, contacts),
    )
    conn.execute("COMMIT")
    conn.close()


def _insert_activations(conn: sqlite3.Connection, key: int, code: int, contacts: int) -> None:
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
        " INSERT INTO cycle_activations SELECT ?, printf('%016x', (i * 2654435761) % 1099511627689), 0, ?, 1"
        " FROM n ORDER BY 2",
        (contacts, key, code),
    )


def timed(work: Callable[[], object], repeat: int) -> tuple[float, object]:
    runs, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = work()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), result


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/verify_cost.py", description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=1_000_000, help="activation rows, and held contacts")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is printed")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the ledger file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        path = Path(folder) / "ledger.db"
        started = time.perf_counter()
        build(path, args.contacts)
        size = path.stat().st_size
        built = time.perf_counter() - started
        print(f"built {args.contacts:,} activations + {args.contacts:,} held contacts: {size:,} bytes in {built:.1f} s")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        for name, work in (
            ("start-up check (latest cycles + holdings)", lambda: find_mismatches(conn, every_cycle=False)),
            ("verify (every cycle)", lambda: find_mismatches(conn, every_cycle=True)),
            ("PRAGMA quick_check", lambda: conn.execute("PRAGMA quick_check").fetchall()),
        ):
            seconds, result = timed(work, args.repeat)
            print(f"{name}: {seconds:.2f} s (median of {args.repeat}), result {result!r}")
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
