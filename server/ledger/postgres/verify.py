"""Verification of a PostgreSQL ledger (../verification.py says what is checked).

The check reads one REPEATABLE READ snapshot, so it sees every figure and its rows as of
one instant while the fleet keeps writing. A repair first locks every tenant's row, in
tenant order, as each unit of work locks the tenants it touches: units of the fleet wait
for it (a sidecar's call may answer DEADLINE_EXCEEDED meanwhile), and it rewrites figures
no unit is changing. It then finds and writes, in the same transaction, what every cycle's
rows say.
"""

from __future__ import annotations

import psycopg
import psycopg.errors

from ..verification import HELD_SENDS, HOLDINGS, Mismatch, Report, VerifyError, mismatches, repairs
from .schema import SCHEMA_VERSION

_CURRENT = (
    "SELECT tenant_id, MAX(cycle_start_us) AS cycle_start_us FROM"
    " (SELECT tenant_id, cycle_start_us FROM usage UNION ALL SELECT tenant_id, cycle_start_us FROM activations) s"
    " GROUP BY tenant_id"
)
_EVERY = (
    "SELECT tenant_id, cycle_start_us FROM usage UNION SELECT tenant_id, cycle_start_us FROM activations"
    f" UNION SELECT tenant_id, cycle_start_us FROM audit WHERE {HELD_SENDS}"
)

_COUNTERS = """
WITH cycles AS ({cycles}),
counted AS (
    SELECT a.tenant_id, a.cycle_start_us, COUNT(*) AS active, SUM(a.sends)::bigint AS sends FROM activations a
    JOIN cycles c ON a.tenant_id = c.tenant_id AND a.cycle_start_us = c.cycle_start_us
    GROUP BY a.tenant_id, a.cycle_start_us
),
audited AS (
    SELECT d.tenant_id, d.cycle_start_us, SUM(d.sends_delta)::bigint AS sends FROM cycles c
    JOIN audit d ON d.tenant_id = c.tenant_id AND d.cycle_start_us = c.cycle_start_us
    WHERE d.{held_sends} GROUP BY d.tenant_id, d.cycle_start_us
)
SELECT c.tenant_id, c.cycle_start_us, u.active_contacts, u.sends,
       COALESCE(n.active, 0), COALESCE(n.sends, 0), COALESCE(d.sends, 0),
       c.cycle_start_us < (SELECT COALESCE(MAX(before_us), 0) FROM audit_pruned)
FROM cycles c
LEFT JOIN usage u ON u.tenant_id = c.tenant_id AND u.cycle_start_us = c.cycle_start_us
LEFT JOIN counted n ON n.tenant_id = c.tenant_id AND n.cycle_start_us = c.cycle_start_us
LEFT JOIN audited d ON d.tenant_id = c.tenant_id AND d.cycle_start_us = c.cycle_start_us
"""

_HOLDINGS = HOLDINGS.format(
    counted="""
    SELECT tenant_id, COUNT(*) FILTER (WHERE held) AS held, COUNT(*) FILTER (WHERE held AND marketing) AS marketing,
           COUNT(*) FILTER (WHERE held AND marketing AND marketing_until_next_update) AS pending
    FROM contacts GROUP BY tenant_id
"""
)


def find_mismatches(conn: psycopg.Connection, *, every_cycle: bool) -> list[Mismatch]:
    """Every stored figure that disagrees with its rows: of each tenant's latest cycle
    and its holdings, or (`every_cycle`) of every cycle the ledger holds."""
    return mismatches(
        lambda sql: conn.execute(sql).fetchall(), _COUNTERS, _HOLDINGS, _EVERY if every_cycle else _CURRENT
    )


def verify_ledger(url: str, *, repair_figures: bool = False) -> Report:
    """Checks every figure of every cycle of the ledger at the libpq URL `url`; with
    `repair_figures`, writes the figures the rows say. Creates nothing."""
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise VerifyError(f"the database cannot be reached: {_first_line(exc)}") from None
    try:
        with conn:
            found = conn.execute(
                "SELECT to_regclass('ledger_schema') IS NOT NULL AND to_regclass('usage') IS NOT NULL"
            ).fetchone()
            if not (found and found[0]):
                raise VerifyError(
                    "no quota-sidecar ledger in this database and schema: start a sidecar on it once to create it"
                )
            row = conn.execute("SELECT version FROM ledger_schema").fetchone()
            version = row[0] if row else 0
            if version != SCHEMA_VERSION:
                raise VerifyError(
                    f"the ledger has schema version {version}, this verify reads {SCHEMA_VERSION}:"
                    " start this version of the sidecar on it once to migrate it"
                )
            if not repair_figures:
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    return Report(find_mismatches(conn, every_cycle=True), False, ["ok"])
            conn.execute("SET synchronous_commit = on")
            with conn.transaction():
                conn.execute("SELECT tenant_id FROM tenants ORDER BY tenant_id FOR UPDATE").fetchall()
                mismatches = find_mismatches(conn, every_cycle=True)
                for statement, args in repairs(mismatches, "%s", "GREATEST"):
                    conn.execute(statement, args)
            return Report(mismatches, True, ["ok"])
    except psycopg.Error as exc:
        raise VerifyError(f"the ledger cannot be read: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
