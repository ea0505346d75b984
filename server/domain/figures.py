"""A tenant's figures as decisions and callers see them, read through the ledger
interface: the cycle containing an instant (re-anchors included), the metered tally
of a cycle under either metering, the usage and its state, and the invoice lines.

Pure over a `LedgerReader`: nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from ..ledger import LedgerReader
from .cycles import Cycle, cycle_within
from .model import (
    BillingInterval,
    Enforcement,
    Holdings,
    InvoiceLine,
    Metering,
    Plan,
    Usage,
    UsageState,
    money,
)

NO_MONEY = money(Decimal(0))


@dataclass(frozen=True, slots=True)
class Tally:
    """The metered figures of one cycle as decisions see them: `count` is held
    (or marketing) contacts under HELD_CONTACTS and active contacts under
    CYCLE_ACTIVE; `peak` its highest in the cycle."""

    count: int
    peak: int
    sends: int

    def plus(self, contacts: int, sends: int) -> Tally:
        count = self.count + contacts
        return Tally(count, max(self.peak, count), self.sends + sends)


def usage_ratio(count: int, limit: int) -> float:
    """The metered count as a share of the limit (0 without one)."""
    return count / limit if limit else 0.0


def overage_contacts(peak: int, limit: int) -> int:
    """What overage is billed on: the cycle's peak beyond the limit."""
    return max(0, peak - limit)


def state_of(plan: Plan, count: int, sends: int) -> UsageState:
    """The state a caller sees for the count and sends under the plan."""
    limit, ceiling, sends_limit = plan.limit, plan.ceiling, plan.effective_sends_limit
    if sends_limit and sends >= sends_limit:
        return UsageState.BLOCKED
    if ceiling is not None:
        if plan.metering is Metering.CYCLE_ACTIVE and plan.enforcement is Enforcement.GRACE and count >= ceiling:
            return UsageState.BLOCKED
        if plan.metering is Metering.HELD_CONTACTS and count > ceiling:
            return UsageState.BLOCKED
    if plan.enforcement is Enforcement.OVERAGE and count > limit:
        return UsageState.IN_OVERAGE
    if plan.enforcement is Enforcement.GRACE and count > limit:
        return UsageState.IN_GRACE
    if count >= limit:
        return UsageState.AT_LIMIT
    if plan.notify_thresholds and count / limit >= min(plan.notify_thresholds):
        return UsageState.WARNING
    return UsageState.OK


def tally_of(view: LedgerReader, plan: Plan, tenant_id: str, cycle: Cycle) -> Tally:
    """The cycle's metered figures under the plan's metering.

    Held contacts are a state, not a per-cycle tally: the tenant's holdings are
    the figures of the cycle they were last written in; a later cycle sees them
    after the pending MK-6 switches (all due at that cycle's end); an earlier
    cycle sees the end and peak counts stored when it was left."""
    counters = view.counters(tenant_id, cycle.start_us)
    if plan.metering is Metering.CYCLE_ACTIVE:
        return Tally(counters.active_contacts, counters.active_contacts, counters.sends)
    marketing_only = plan.marketing_contacts_only
    h = view.holdings(tenant_id) or Holdings(cycle_start_us=cycle.start_us)
    if cycle.start_us > h.cycle_start_us:
        count = h.marketing - h.pending if marketing_only else h.held
        return Tally(count, count, counters.sends)
    if cycle.end_us > h.cycle_start_us:
        count = h.marketing if marketing_only else h.held
        peak = counters.marketing_peak if marketing_only else counters.held_peak
        return Tally(count, max(peak, count), counters.sends)
    if marketing_only:
        return Tally(counters.marketing_end, max(counters.marketing_peak, counters.marketing_end), counters.sends)
    return Tally(counters.held_end, max(counters.held_peak, counters.held_end), counters.sends)


def usage_of(tenant_id: str, plan: Plan, cycle: Cycle, tally: Tally) -> Usage:
    """The figures a caller sees; overage is billed on the cycle's peak (the count
    itself under CYCLE_ACTIVE, the highest held count under HELD_CONTACTS)."""
    count = tally.count
    limit = plan.limit
    over = overage_contacts(tally.peak, limit)
    amount = money(Decimal(plan.overage_unit_price or "0") * over) if over else NO_MONEY
    return Usage(
        tenant_id=tenant_id,
        cycle_start_us=cycle.start_us,
        cycle_end_us=cycle.end_us,
        active_contacts=count,
        contact_limit=limit,
        usage_ratio=usage_ratio(count, limit),
        sends=tally.sends,
        sends_limit=plan.effective_sends_limit,
        state=state_of(plan, count, tally.sends),
        overage_contacts=over,
        overage_amount=amount,
        currency=plan.currency,
        plan_name=plan.plan_name,
        peak_contacts=tally.peak,
    )


def usage_at(view: LedgerReader, plan: Plan, tenant_id: str, at_us: int) -> Usage:
    """The figures of the tenant's cycle containing `at_us`, under `plan`."""
    cycle = cycle_of(view, tenant_id, plan, at_us)
    return usage_of(tenant_id, plan, cycle, tally_of(view, plan, tenant_id, cycle))


def current_cycle(plan: Plan, instant_us: int) -> Cycle | None:
    """The cycle containing `instant_us` when the plan's current anchor covers it (None:
    it lies before the last re-anchor, and only the ledger's re-anchors place it)."""
    if plan.anchored_at_us is None or instant_us >= plan.anchored_at_us:
        return cycle_within(plan.cycle_anchor_us, instant_us, plan.anchored_at_us, None)
    return None


def cycle_of(view: LedgerReader, tenant_id: str, plan: Plan, instant_us: int) -> Cycle:
    """The tenant's cycle containing `instant_us`, `plan` being its current plan (SG-7).

    Every re-anchor closed the cycle running then and started the next one at that
    instant, so an instant before the current anchor began (`Plan.anchored_at_us`) lies
    in a cycle of the anchor then in force, cut short by the re-anchor that followed it
    (the ledger's re-anchors). The current cycle costs no read."""
    current = current_cycle(plan, instant_us)
    if current is not None:
        return current
    since, after = view.reanchors_around(tenant_id, instant_us)
    if after is None:
        return cycle_within(plan.cycle_anchor_us, instant_us, since, plan.anchored_at_us)
    return cycle_within(after.anchor_before_us, instant_us, since, after.at_us)


def invoice_lines(plan: Plan, usage: Usage) -> tuple[InvoiceLine, ...]:
    """Included and add-on contacts (priced by the plan itself), the metered figure,
    and the overage line; every amount an exact decimal."""
    zero = money(Decimal(0))
    currency = plan.currency
    name = f" ({plan.plan_name})" if plan.plan_name else ""
    if plan.metering is Metering.CYCLE_ACTIVE:
        metered = "Contacts active this cycle"
    elif plan.marketing_contacts_only:
        metered = "Highest marketing contacts this cycle"
    else:
        metered = "Highest contacts held this cycle"
    lines = [InvoiceLine(f"Contacts included in the plan{name}", plan.contact_limit, zero, zero, currency)]
    if plan.addon_contacts:
        lines.append(InvoiceLine("Add-on contacts", plan.addon_contacts, zero, zero, currency))
    lines.append(InvoiceLine(metered, usage.peak_contacts, zero, zero, currency))
    price = Decimal(plan.overage_unit_price or "0")
    overage = "Overage contacts"
    if plan.billing_interval is BillingInterval.ANNUAL:
        overage += " (annual plan, overage invoiced monthly)"
    lines.append(
        InvoiceLine(overage, usage.overage_contacts, money(price), money(price * usage.overage_contacts), currency)
    )
    return tuple(lines)
