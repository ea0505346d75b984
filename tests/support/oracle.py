"""The oracle "figures equal rows", read through the ledger interface alone.

A ledger keeps figures beside the rows they count: a cycle's `Counters` beside its
activations (CYCLE_ACTIVE: one per contact active in the cycle, with its sends), a
tenant's `Holdings` beside its contacts (held, marketing, a switch pending, MK-6) and
the cycle's held and marketing counts at its end. `read_rows` takes a neutral dump of those through
`LedgerReader` only (`counters`, `holdings`, `active_contacts` and `counted_contacts`,
paged the way the engine pages them), so the same check holds on every backend;
`mismatches` lists each figure that differs from its rows and `assert_rows_agree`
raises `FiguresDiffer` with the list.

The dump walks every cycle of each tenant from `since_us` (by default KEPT_US before
`until_us`) to the cycle containing `until_us`, with the cycles as the tenant's
re-anchors cut them (SG-7), read back from the ledger as well. Each tenant is checked
under its plan now: sends counted under HELD_CONTACTS earlier in a cycle that then
changed to CYCLE_ACTIVE have no activation behind them, so a test that changes the
metering mid-cycle checks those sends against the audit itself (test_properties).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from quota_sidecar.server.domain.cycles import Cycle, cycle_within
from quota_sidecar.server.domain.model import Activation, ContactRecord, Counters, Holdings, Metering, Plan
from quota_sidecar.server.ledger import Ledger, LedgerReader

PAGE = 500
# How far back the walk starts by default: every cycle of a year and more, the longest any
# test here records activity late.
KEPT_US = 400 * 86_400 * 1_000_000


class FiguresDiffer(AssertionError):
    """A stored figure differs from the rows it counts."""


@dataclass(frozen=True)
class CycleRows:
    cycle: Cycle
    counters: Counters
    activations: tuple[Activation, ...]

    @property
    def counted(self) -> tuple[int, int]:
        """What the activations say: how many contacts, how many sends."""
        return len(self.activations), sum(a.sends for a in self.activations)

    @property
    def stored(self) -> tuple[int, int]:
        return self.counters.active_contacts, self.counters.sends

    @property
    def empty(self) -> bool:
        return self.counters == Counters() and not self.activations


@dataclass(frozen=True)
class TenantRows:
    plan: Plan
    holdings: Holdings | None
    # every contact held now, read with its marketing status as stored
    held: tuple[ContactRecord, ...]
    cycles: dict[int, CycleRows] = field(default_factory=dict)

    def activations(self) -> Iterator[Activation]:
        """The activations of every cycle read, cycle by cycle."""
        for _, rows in sorted(self.cycles.items()):
            yield from rows.activations

    def active_ids(self) -> set[str]:
        """Every contact active in any cycle read."""
        return {a.contact_id for a in self.activations()}

    def figures(self) -> list[tuple[int, int, int, int]]:
        """(active, sends) stored and (contacts, sends) the rows say, for each cycle holding anything."""
        return [(*rows.stored, *rows.counted) for _, rows in sorted(self.cycles.items()) if not rows.empty]

    def counted_holdings(self) -> tuple[int, int, int]:
        """What the contacts say the holdings are: held, held and marketing, of those with a switch pending."""
        marketing = [c for c in self.held if c.marketing]
        return len(self.held), len(marketing), sum(c.marketing_until_next_update for c in marketing)


def pages_of_activations(reader: LedgerReader, tenant_id: str, cycle_start_us: int) -> Iterator[Activation]:
    after = ""
    while page := reader.active_contacts(tenant_id, cycle_start_us, after, PAGE):
        yield from page
        after = page[-1].contact_id


def pages_of_held(reader: LedgerReader, tenant_id: str, at_us: int) -> Iterator[ContactRecord]:
    after = ""
    while page := reader.counted_contacts(tenant_id, False, at_us, after, PAGE):
        yield from page
        after = page[-1].contact_id


def cycle_around(reader: LedgerReader, tenant_id: str, plan: Plan, instant_us: int) -> Cycle:
    """The tenant's cycle containing `instant_us` (SG-7): before the current anchor took
    effect, one of the anchor then in force, cut at the re-anchors on either side of it."""
    if plan.anchored_at_us is not None and instant_us < plan.anchored_at_us:
        since, after = reader.reanchors_around(tenant_id, instant_us)
        if after is None:
            return cycle_within(plan.cycle_anchor_us, instant_us, since, plan.anchored_at_us)
        return cycle_within(after.anchor_before_us, instant_us, since, after.at_us)
    return cycle_within(plan.cycle_anchor_us, instant_us, plan.anchored_at_us, None)


def read_rows(
    reader: LedgerReader, until_us: int, *, since_us: int | None = None, tenants: Iterable[str] | None = None
) -> dict[str, TenantRows]:
    """The figures and rows of every tenant with a plan (or of `tenants`), cycle by cycle
    from the one containing `since_us` to the one containing `until_us`."""
    found = {}
    for tenant_id in reader.tenants() if tenants is None else tenants:
        stored = reader.plan(tenant_id)
        assert stored is not None, f"tenant {tenant_id!r} has no plan"
        plan = Plan.from_json(stored.plan_json)
        rows = TenantRows(plan, reader.holdings(tenant_id), tuple(pages_of_held(reader, tenant_id, until_us)))
        instant = until_us - KEPT_US if since_us is None else since_us
        while instant <= until_us:
            cycle = cycle_around(reader, tenant_id, plan, instant)
            rows.cycles[cycle.start_us] = CycleRows(
                cycle,
                reader.counters(tenant_id, cycle.start_us),
                tuple(pages_of_activations(reader, tenant_id, cycle.start_us)),
            )
            instant = cycle.end_us
        found[tenant_id] = rows
    return found


def mismatches(found: dict[str, TenantRows]) -> list[str]:
    """Each figure that differs from its rows, in words."""
    problems = []
    for tenant_id, rows in sorted(found.items()):
        if rows.plan.metering is Metering.CYCLE_ACTIVE:
            for start, cycle in sorted(rows.cycles.items()):
                if cycle.stored != cycle.counted:
                    problems.append(
                        f"{tenant_id} cycle {start}: figures say {cycle.stored[0]} active / {cycle.stored[1]} sends,"
                        f" activations {cycle.counted[0]} / {cycle.counted[1]}"
                    )
        if rows.holdings is None:
            continue
        stored = (rows.holdings.held, rows.holdings.marketing, rows.holdings.pending)
        if stored != rows.counted_holdings():
            problems.append(
                f"{tenant_id}: holdings say held/marketing/pending {stored}, contacts {rows.counted_holdings()}"
            )
        cycle = rows.cycles.get(rows.holdings.cycle_start_us)
        at_end = None if cycle is None else (cycle.counters.held_end, cycle.counters.marketing_end)
        if at_end is not None and at_end != (rows.holdings.held, rows.holdings.marketing):
            problems.append(
                f"{tenant_id} cycle {rows.holdings.cycle_start_us}: held/marketing at its end {at_end},"
                f" holdings {(rows.holdings.held, rows.holdings.marketing)}"
            )
    return problems


def assert_rows_agree(found: dict[str, TenantRows]) -> dict[str, TenantRows]:
    """`found`, once every figure in it equals its rows; FiguresDiffer otherwise."""
    problems = mismatches(found)
    if problems:
        raise FiguresDiffer("\n".join(problems))
    return found


def assert_figures_equal_rows(ledger: Ledger, *, since_us: int | None = None) -> dict[str, TenantRows]:
    """Every figure of an open ledger equals its rows, up to the ledger's time; the rows read."""
    return ledger.read(lambda reader: assert_rows_agree(read_rows(reader, ledger.time_us, since_us=since_us)))
