"""Verification of a ledger, whichever the backend: every stored figure against the rows
it sums.

A figure is kept next to its rows so a decision reads one row, not millions; a figure
that drifted from its rows (a byte changed on disk, a restore mixing two copies, a bug)
would be served as the truth. Each backend finds its figures and their rows' sums with
set-based queries over its tables (a GROUP BY, never a query per tenant) and hands the
rows of three queries to `compare`, which decides what disagrees the same way for every
backend:

- `usage.active_contacts` is the number of the cycle's activation rows;
- `usage.sends` is the sum of their sends (CYCLE_ACTIVE keeps a contact's sends on its
  activation row) plus the sends audited by HELD_CONTACTS sends, which touch no contact
  (audit entries ALLOW / OK with a sends_delta). The audit is pruned after
  `--audit-retention` (`audit_pruned` keeps the instant pruning reached), so of a cycle
  that started before that instant only what the activation rows hold is checked: its
  sends are at least theirs;
- a tenant's `holdings` (held, marketing, pending) are the sums over its `contacts`
  rows, and the cycle the holdings were written in ends (`held_end`, `marketing_end`)
  with those counts;
- no peak is below its cycle's end count.

A repair writes the figures the rows say (`repairs`: the statements, in the backend's
own SQL dialect).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# What HELD_CONTACTS sends leave in the audit: the sends of a cycle no activation row holds.
HELD_SENDS = "sends_delta <> 0 AND decision = 'ALLOW' AND reason = 'OK'"

# The cycles (a query of tenant_id, cycle_start_us, given as `cycles`) with a peak below its end count.
PEAKS = """
WITH cycles AS ({cycles})
SELECT u.tenant_id, u.cycle_start_us, u.held_peak, u.held_end, u.marketing_peak, u.marketing_end
FROM cycles c JOIN usage u ON u.tenant_id = c.tenant_id AND u.cycle_start_us = c.cycle_start_us
WHERE u.held_peak < u.held_end OR u.marketing_peak < u.marketing_end
"""

# Each tenant's holdings against its contacts, given `counted` (per tenant: held,
# marketing and pending contacts), which each dialect counts in its own way.
HOLDINGS = """
WITH counted AS ({counted})
SELECT t.tenant_id, h.cycle_start_us, h.held, h.marketing, h.pending,
       COALESCE(n.held, 0), COALESCE(n.marketing, 0), COALESCE(n.pending, 0),
       u.tenant_id IS NOT NULL, u.held_end, u.marketing_end,
       (SELECT MAX(cycle_start_us) FROM usage WHERE tenant_id = t.tenant_id)
FROM (SELECT tenant_id FROM holdings UNION SELECT tenant_id FROM counted WHERE held > 0) t
LEFT JOIN holdings h ON h.tenant_id = t.tenant_id
LEFT JOIN counted n ON n.tenant_id = t.tenant_id
LEFT JOIN usage u ON u.tenant_id = t.tenant_id AND u.cycle_start_us = h.cycle_start_us
"""

USAGE_COLUMNS = {
    "usage.active_contacts": "active_contacts",
    "usage.sends": "sends",
    "usage.held_end": "held_end",
    "usage.marketing_end": "marketing_end",
    "usage.held_peak": "held_peak",
    "usage.marketing_peak": "marketing_peak",
}
HOLDINGS_COLUMNS = {"holdings.held": "held", "holdings.marketing": "marketing", "holdings.pending": "pending"}


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


def mismatches(
    rows: Callable[[str], Sequence[Sequence[Any]]], counters: str, holdings: str, cycles: str
) -> list[Mismatch]:
    """Every stored figure that disagrees with its rows, `rows(sql)` running a dialect's
    queries: `counters` (a template of `cycles` and HELD_SENDS), `holdings` and PEAKS."""
    return compare(
        rows(counters.format(cycles=cycles, held_sends=HELD_SENDS)),
        rows(holdings),
        rows(PEAKS.format(cycles=cycles)),
    )


def compare(
    counters: Iterable[Iterable[Any]], holdings: Iterable[Iterable[Any]], peaks: Iterable[Iterable[Any]]
) -> list[Mismatch]:
    """Every figure that disagrees with its rows, from the rows of a backend's three checks:
    `counters` (tenant, cycle, stored active, stored sends, activation rows, their sends,
    audited sends, whether the cycle's audit was pruned), `holdings` (tenant, holdings
    cycle, stored held, marketing, pending, the same from the contacts rows, whether the
    cycle has a usage row, its held_end and marketing_end, the tenant's latest cycle), and
    `peaks` (tenant, cycle, held peak and end, marketing peak and end, where a peak is
    below its end)."""
    found: list[Mismatch] = []
    for tenant, cycle, active, sends, rows, activation_sends, audited_sends, pruned in counters:
        if (active or 0) != rows:
            found.append(Mismatch(tenant, cycle, "usage.active_contacts", active, rows))
        row_sends = activation_sends + audited_sends
        if pruned:
            if (sends or 0) < activation_sends:
                found.append(Mismatch(tenant, cycle, "usage.sends", sends, activation_sends))
        elif (sends or 0) != row_sends:
            found.append(Mismatch(tenant, cycle, "usage.sends", sends, row_sends))
    for row in holdings:
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
    for tenant, cycle, held_peak, held_end, marketing_peak, marketing_end in peaks:
        if held_peak < held_end:
            found.append(Mismatch(tenant, cycle, "usage.held_peak", held_peak, held_end))
        if marketing_peak < marketing_end:
            found.append(Mismatch(tenant, cycle, "usage.marketing_peak", marketing_peak, marketing_end))
    return sorted(set(found), key=lambda m: (m.tenant_id, m.cycle_start_us, m.figure))


def repairs(found: Iterable[Mismatch], mark: str = "?", greatest: str = "MAX") -> list[tuple[str, tuple[Any, ...]]]:
    """The statements (with their arguments) that write each figure found as its rows say,
    then raise every peak to its end count; `mark` is the dialect's placeholder and
    `greatest` its two-argument maximum."""
    done: list[tuple[str, tuple[Any, ...]]] = []
    for m in found:
        column = USAGE_COLUMNS.get(m.figure)
        if column is not None:
            done.append(
                (
                    "INSERT INTO usage (tenant_id, cycle_start_us, active_contacts, sends)"
                    f" VALUES ({mark}, {mark}, 0, 0) ON CONFLICT (tenant_id, cycle_start_us) DO NOTHING",
                    (m.tenant_id, m.cycle_start_us),
                )
            )
            done.append(
                (
                    f"UPDATE usage SET {column} = {mark} WHERE tenant_id = {mark} AND cycle_start_us = {mark}",
                    (m.from_rows, m.tenant_id, m.cycle_start_us),
                )
            )
        else:
            done.append(
                (
                    "INSERT INTO holdings (tenant_id, cycle_start_us, held, marketing, pending)"
                    f" VALUES ({mark}, {mark}, 0, 0, 0) ON CONFLICT (tenant_id) DO NOTHING",
                    (m.tenant_id, m.cycle_start_us),
                )
            )
            done.append(
                (
                    f"UPDATE holdings SET {HOLDINGS_COLUMNS[m.figure]} = {mark} WHERE tenant_id = {mark}",
                    (m.from_rows, m.tenant_id),
                )
            )
    done.append(
        (
            f"UPDATE usage SET held_peak = {greatest}(held_peak, held_end),"
            f" marketing_peak = {greatest}(marketing_peak, marketing_end)"
            " WHERE held_peak < held_end OR marketing_peak < marketing_end",
            (),
        )
    )
    return done


class VerifyError(Exception):
    """The ledger cannot be verified (or repaired) at all: no such file or database, an
    older schema, a sidecar holding it."""


@dataclass(frozen=True, slots=True)
class Report:
    mismatches: list[Mismatch]
    repaired: bool
    # the store's own integrity check (SQLite's quick_check), ["ok"] when sound or unchecked
    integrity: list[str]

    @property
    def clean(self) -> bool:
        return (self.repaired or not self.mismatches) and self.integrity == ["ok"]
