"""Verification of a SQLite ledger file (../verification.py says what is checked).

The current scope (each tenant's latest cycle, and the holdings) is what
`quota-sidecar serve` checks before it serves; `quota-sidecar verify` checks every
cycle, and runs `PRAGMA quick_check` on the file's pages.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..verification import HELD_SENDS, HOLDINGS, Mismatch, Report, VerifyError, mismatches, repairs

_CURRENT = (
    "SELECT tenant_id, MAX(cycle_start_us) AS cycle_start_us FROM"
    " (SELECT tenant_id, cycle_start_us FROM usage UNION ALL SELECT tenant_id, cycle_start_us FROM cycle_keys)"
    " GROUP BY tenant_id"
)
_EVERY = (
    "SELECT tenant_id, cycle_start_us FROM usage UNION SELECT tenant_id, cycle_start_us FROM cycle_keys"
    f" UNION SELECT tenant_id, cycle_start_us FROM audit WHERE {HELD_SENDS}"
)

_COUNTERS = """
WITH cycles AS ({cycles}),
counted AS (
    SELECT a.cycle_key, COUNT(*) AS active, SUM(a.sends) AS sends FROM cycle_activations a
    WHERE a.cycle_key IN (SELECT k.cycle_key FROM cycles c JOIN cycle_keys k USING (tenant_id, cycle_start_us))
    GROUP BY a.cycle_key
),
audited AS (
    SELECT d.tenant_id, d.cycle_start_us, SUM(d.sends_delta) AS sends FROM cycles c
    JOIN audit d ON d.tenant_id = c.tenant_id AND d.cycle_start_us = c.cycle_start_us
    WHERE d.{held_sends} GROUP BY d.tenant_id, d.cycle_start_us
)
SELECT c.tenant_id, c.cycle_start_us, u.active_contacts, u.sends,
       COALESCE(n.active, 0), COALESCE(n.sends, 0), COALESCE(d.sends, 0),
       c.cycle_start_us < (SELECT COALESCE(MAX(before_us), 0) FROM audit_pruned)
FROM cycles c
LEFT JOIN usage u ON u.tenant_id = c.tenant_id AND u.cycle_start_us = c.cycle_start_us
LEFT JOIN cycle_keys k ON k.tenant_id = c.tenant_id AND k.cycle_start_us = c.cycle_start_us
LEFT JOIN counted n ON n.cycle_key = k.cycle_key
LEFT JOIN audited d ON d.tenant_id = c.tenant_id AND d.cycle_start_us = c.cycle_start_us
"""

_HOLDINGS = HOLDINGS.format(
    counted="""
    SELECT tenant_id, SUM(held) AS held, SUM(held * marketing) AS marketing,
           SUM(held * marketing * marketing_until_next_update) AS pending
    FROM contacts GROUP BY tenant_id
"""
)


def find_mismatches(conn: sqlite3.Connection, *, every_cycle: bool) -> list[Mismatch]:
    """Every stored figure that disagrees with its rows: of each tenant's latest cycle
    and its holdings, or (`every_cycle`) of every cycle the ledger holds."""
    return mismatches(
        lambda sql: conn.execute(sql).fetchall(), _COUNTERS, _HOLDINGS, _EVERY if every_cycle else _CURRENT
    )


def repair(conn: sqlite3.Connection) -> list[Mismatch]:
    """Writes, in one transaction, every figure of every cycle as its rows say, and
    raises peaks to the end counts; returns what it changed (what it found)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = find_mismatches(conn, every_cycle=True)
        for statement, args in repairs(found):
            conn.execute(statement, args)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Holds the ledger the way a serving sidecar does (an flock on the database file,
    and on its lock file where one is kept), so no sidecar serves while figures are
    rewritten underneath it."""
    fds: list[int] = []
    try:
        for target in (path, Path(f"{path}.lock")):
            if target != path and not target.exists():
                continue
            fd = os.open(target, os.O_RDWR)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise VerifyError(f"ledger {path} is in use by a running sidecar; stop it to repair") from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


def verify_ledger(path: Path, *, schema_version: int, repair_figures: bool = False) -> Report:
    """Checks the file's pages (PRAGMA quick_check) and every figure of every cycle;
    with `repair_figures`, writes the figures the rows say."""
    if not path.is_file():
        raise VerifyError(f"no ledger file at {path}")
    mode = "rw" if repair_figures else "ro"
    try:
        conn = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, isolation_level=None, timeout=30)
    except sqlite3.Error as exc:
        raise VerifyError(f"ledger {path} cannot be opened: {exc}") from None
    try:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found != schema_version:
            raise VerifyError(
                f"ledger {path} has schema version {found}, this verify reads {schema_version}:"
                " start this version of the sidecar on it once to migrate it"
            )
        integrity = [r[0] for r in conn.execute("PRAGMA quick_check")]
        if not repair_figures:
            conn.execute("BEGIN")
            try:
                return Report(find_mismatches(conn, every_cycle=True), False, integrity)
            finally:
                conn.execute("COMMIT")
        with _exclusive(path):
            return Report(repair(conn), True, integrity)
    except sqlite3.Error as exc:
        raise VerifyError(f"ledger {path} cannot be read: {exc}") from None
    finally:
        conn.close()
