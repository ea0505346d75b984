"""Verification of the ledger: every stored figure against the rows it sums.

A figure is kept next to its rows so a decision reads one row, not millions; a
figure that drifted from its rows (a byte changed on disk, a restore mixing two
files, a bug) would be served as the truth. These checks find every such
figure, each in one set-based query over the tables (a GROUP BY, never a query
per tenant), and `repair` writes the figures the rows say, in one transaction.

What is checked, per tenant and cycle:

- `usage.active_contacts` is the number of the cycle's activation rows;
- `usage.sends` is the sum of their sends (CYCLE_ACTIVE keeps a contact's sends on
  its activation row) plus the sends audited by HELD_CONTACTS sends, which touch
  no contact (audit entries ALLOW / OK with a sends_delta). The audit is pruned
  after `--audit-retention` (`audit_pruned` keeps the instant pruning reached), so
  of a cycle that started before that instant only what the activation rows hold
  is checked: its sends are at least theirs;
- a tenant's `holdings` (held, marketing, pending) are the sums over its
  `contacts` rows, and the cycle the holdings were written in ends (`held_end`,
  `marketing_end`) with those counts;
- no peak is below its cycle's end count.

The current scope (each tenant's latest cycle, and the holdings) is what
`quota-sidecar serve` checks before it serves; `quota-sidecar verify` checks
every cycle.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_HELD_SENDS = "sends_delta <> 0 AND decision = 'ALLOW' AND reason = 'OK'"

_CURRENT = (
    "SELECT tenant_id, MAX(cycle_start_us) AS cycle_start_us FROM"
    " (SELECT tenant_id, cycle_start_us FROM usage UNION ALL SELECT tenant_id, cycle_start_us FROM cycle_keys)"
    " GROUP BY tenant_id"
)
_EVERY = (
    "SELECT tenant_id, cycle_start_us FROM usage UNION SELECT tenant_id, cycle_start_us FROM cycle_keys"
    f" UNION SELECT tenant_id, cycle_start_us FROM audit WHERE {_HELD_SENDS}"
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

_HOLDINGS = """
WITH counted AS (
    SELECT tenant_id, SUM(held) AS held, SUM(held * marketing) AS marketing,
           SUM(held * marketing * marketing_until_next_update) AS pending
    FROM contacts GROUP BY tenant_id
)
SELECT t.tenant_id, h.cycle_start_us, h.held, h.marketing, h.pending,
       COALESCE(n.held, 0), COALESCE(n.marketing, 0), COALESCE(n.pending, 0),
       u.tenant_id IS NOT NULL, u.held_end, u.marketing_end,
       (SELECT MAX(cycle_start_us) FROM usage WHERE tenant_id = t.tenant_id)
FROM (SELECT tenant_id FROM holdings UNION SELECT tenant_id FROM counted WHERE held > 0) t
LEFT JOIN holdings h ON h.tenant_id = t.tenant_id
LEFT JOIN counted n ON n.tenant_id = t.tenant_id
LEFT JOIN usage u ON u.tenant_id = t.tenant_id AND u.cycle_start_us = h.cycle_start_us
"""

_PEAKS = """
WITH cycles AS ({cycles})
SELECT u.tenant_id, u.cycle_start_us, u.held_peak, u.held_end, u.marketing_peak, u.marketing_end
FROM cycles c JOIN usage u ON u.tenant_id = c.tenant_id AND u.cycle_start_us = c.cycle_start_us
WHERE u.held_peak < u.held_end OR u.marketing_peak < u.marketing_end
"""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A stored figure that is not what its rows say; `stored` is None where no row
    stores the figure at all (a figure no row stores reads as 0, and only disagrees
    when its rows say otherwise). A peak's `from_rows` is the least it can be."""

    tenant_id: str
    cycle_start_us: int
    figure: str
    stored: int | None
    from_rows: int

    def describe(self) -> str:
        stored = "missing" if self.stored is None else self.stored
        at_least = "at least " if self.figure.endswith("_peak") else ""
        return (
            f"tenant {self.tenant_id!r} cycle {self.cycle_start_us}: {self.figure} is {stored},"
            f" the rows say {at_least}{self.from_rows}"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "tenant_id": self.tenant_id,
            "cycle_start_us": self.cycle_start_us,
            "figure": self.figure,
            "stored": self.stored,
            "from_rows": self.from_rows,
        }


def find_mismatches(conn: sqlite3.Connection, *, every_cycle: bool) -> list[Mismatch]:
    """Every stored figure that disagrees with its rows: of each tenant's latest cycle
    and its holdings, or (`every_cycle`) of every cycle the ledger holds."""
    cycles = _EVERY if every_cycle else _CURRENT
    found: list[Mismatch] = []
    for tenant, cycle, active, sends, rows, activation_sends, audited_sends, pruned in conn.execute(
        _COUNTERS.format(cycles=cycles, held_sends=_HELD_SENDS)
    ):
        if (active or 0) != rows:
            found.append(Mismatch(tenant, cycle, "usage.active_contacts", active, rows))
        row_sends = activation_sends + audited_sends
        if pruned:
            if (sends or 0) < activation_sends:
                found.append(Mismatch(tenant, cycle, "usage.sends", sends, activation_sends))
        elif (sends or 0) != row_sends:
            found.append(Mismatch(tenant, cycle, "usage.sends", sends, row_sends))
    for row in conn.execute(_HOLDINGS):
        tenant, cycle, held, marketing, pending, n_held, n_marketing, n_pending, has_usage, end, m_end, latest = row
        if cycle is None:
            cycle = latest or 0
        for figure, stored, counted in (
            ("holdings.held", held, n_held),
            ("holdings.marketing", marketing, n_marketing),
            ("holdings.pending", pending, n_pending),
        ):
            if (stored or 0) != counted:
                found.append(Mismatch(tenant, cycle, figure, stored, counted))
        if held is None:
            continue
        for figure, stored, counted in (("usage.held_end", end, n_held), ("usage.marketing_end", m_end, n_marketing)):
            value = stored if has_usage else None
            if (value or 0) != counted:
                found.append(Mismatch(tenant, cycle, figure, value, counted))
    for tenant, cycle, held_peak, held_end, marketing_peak, marketing_end in conn.execute(_PEAKS.format(cycles=cycles)):
        if held_peak < held_end:
            found.append(Mismatch(tenant, cycle, "usage.held_peak", held_peak, held_end))
        if marketing_peak < marketing_end:
            found.append(Mismatch(tenant, cycle, "usage.marketing_peak", marketing_peak, marketing_end))
    return sorted(set(found), key=lambda m: (m.tenant_id, m.cycle_start_us, m.figure))


_USAGE_COLUMNS = {
    "usage.active_contacts": "active_contacts",
    "usage.sends": "sends",
    "usage.held_end": "held_end",
    "usage.marketing_end": "marketing_end",
    "usage.held_peak": "held_peak",
    "usage.marketing_peak": "marketing_peak",
}
_HOLDINGS_COLUMNS = {"holdings.held": "held", "holdings.marketing": "marketing", "holdings.pending": "pending"}


def repair(conn: sqlite3.Connection) -> list[Mismatch]:
    """Writes, in one transaction, every figure of every cycle as its rows say, and
    raises peaks to the end counts; returns what it changed (what it found)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = find_mismatches(conn, every_cycle=True)
        for m in found:
            column = _USAGE_COLUMNS.get(m.figure)
            if column is not None:
                conn.execute(
                    "INSERT INTO usage (tenant_id, cycle_start_us, active_contacts, sends) VALUES (?, ?, 0, 0)"
                    " ON CONFLICT (tenant_id, cycle_start_us) DO NOTHING",
                    (m.tenant_id, m.cycle_start_us),
                )
                conn.execute(
                    f"UPDATE usage SET {column} = ? WHERE tenant_id = ? AND cycle_start_us = ?",
                    (m.from_rows, m.tenant_id, m.cycle_start_us),
                )
            else:
                conn.execute(
                    "INSERT INTO holdings (tenant_id, cycle_start_us, held, marketing, pending) VALUES (?, ?, 0, 0, 0)"
                    " ON CONFLICT (tenant_id) DO NOTHING",
                    (m.tenant_id, m.cycle_start_us),
                )
                conn.execute(
                    f"UPDATE holdings SET {_HOLDINGS_COLUMNS[m.figure]} = ? WHERE tenant_id = ?",
                    (m.from_rows, m.tenant_id),
                )
        conn.execute(
            "UPDATE usage SET held_peak = MAX(held_peak, held_end), marketing_peak = MAX(marketing_peak, marketing_end)"
            " WHERE held_peak < held_end OR marketing_peak < marketing_end"
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


class VerifyError(Exception):
    """The ledger cannot be verified (or repaired) at all: no such file, an older
    schema, a sidecar holding it."""


@dataclass(frozen=True, slots=True)
class Report:
    mismatches: list[Mismatch]
    repaired: bool
    integrity: list[str]

    @property
    def clean(self) -> bool:
        return (self.repaired or not self.mismatches) and self.integrity == ["ok"]


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
