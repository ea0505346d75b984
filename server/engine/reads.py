"""What the engine answers without counting: usage and invoices of a cycle (a past one
under the plan it ended with), the plan, a contact's state, the contacts behind the
metered figure page by page (and the page tokens), outbox events, and every
tenant's usage for the board."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

from ..domain.cycles import Cycle
from ..domain.errors import InvalidArgument, NotFound
from ..domain.figures import cycle_of, invoice_lines, tally_of, usage_at, usage_of
from ..domain.model import Activation, ContactRecord, ContactState, Invoice, Metering, Plan, Usage, UsageEvent
from ..domain.plans import MAX_FIGURE, check_id
from ..ledger import LedgerReader
from .context import EngineContext

MAX_PAGE_SIZE = 1_000
DEFAULT_PAGE_SIZE = 100


def get_usage(ctx: EngineContext, tenant_id: str, at_us: int | None) -> Usage:
    check_id("tenant_id", tenant_id)

    def read(r: LedgerReader) -> Usage:
        plan, cycle = ctx.plan_of_cycle(r, tenant_id, ctx.plan(r, tenant_id), at_us)
        return usage_of(tenant_id, plan, cycle, tally_of(r, plan, tenant_id, cycle))

    return ctx.ledger.read(read)


def get_invoice(ctx: EngineContext, tenant_id: str, at_us: int | None) -> Invoice:
    """The cycle's billable figures (CR-6, CR-7): included and add-on contacts, the
    metered count, and overage contacts x unit price = amount, exact decimals."""
    check_id("tenant_id", tenant_id)

    def read(r: LedgerReader) -> Invoice:
        plan, cycle = ctx.plan_of_cycle(r, tenant_id, ctx.plan(r, tenant_id), at_us)
        usage = usage_of(tenant_id, plan, cycle, tally_of(r, plan, tenant_id, cycle))
        return Invoice(usage, invoice_lines(plan, usage))

    return ctx.ledger.read(read)


def get_plan(ctx: EngineContext, tenant_id: str) -> Plan:
    check_id("tenant_id", tenant_id)
    return ctx.ledger.read(lambda r: ctx.plan(r, tenant_id))


def usage_events(ctx: EngineContext, tenant_id: str, after_seq: int, limit: int) -> list[UsageEvent]:
    """Outbox events after `after_seq` in order, one tenant's or (tenant_id "") all."""
    check_id("tenant_id", tenant_id, required=False)

    def read(r: LedgerReader) -> list[UsageEvent]:
        if tenant_id:
            ctx.plan(r, tenant_id)
        return r.events_after(after_seq, tenant_id, limit)

    return ctx.ledger.read(read)


def tenant_usages(ctx: EngineContext, chunk_tenants: int) -> Iterator[Usage]:
    """The current usage of every tenant with a plan, read `chunk_tenants` at a time."""
    tenants = ctx.ledger.read(lambda r: r.tenants())
    for i in range(0, len(tenants), chunk_tenants):
        chunk = tenants[i : i + chunk_tenants]

        def read(r: LedgerReader, chunk: list[str] = chunk) -> list[Usage]:
            now = ctx.clock.now_us()
            return [usage_at(r, ctx.plan(r, tenant_id), tenant_id, now) for tenant_id in chunk]

        yield from ctx.ledger.read(read)


def get_contact(ctx: EngineContext, tenant_id: str, contact_id: str) -> ContactState:
    check_id("tenant_id", tenant_id)
    check_id("contact_id", contact_id)

    def read(r: LedgerReader) -> ContactState:
        now = ctx.clock.now_us()
        plan = ctx.plan(r, tenant_id)
        cycle = cycle_of(r, tenant_id, plan, now)
        record = r.contact(tenant_id, contact_id)
        if plan.metering is Metering.HELD_CONTACTS:
            active = _counted(r, plan, tenant_id, cycle, now, ("", 0), 1, contact_id)
        else:
            active = [a for a in [r.activation(tenant_id, cycle.start_us, contact_id)] if a is not None]
        if record is None and not active:
            raise NotFound(f"tenant {tenant_id!r} has no contact {contact_id!r}")
        record = record or ContactRecord(contact_id, held=False)
        marketing = record.marketing_at(now)
        return ContactState(
            tenant_id=tenant_id,
            contact_id=contact_id,
            held=record.held,
            active_this_cycle=bool(active),
            activated_at_us=active[0].activated_at_us if active else 0,
            marketing=marketing,
            marketing_until_next_update=marketing and record.marketing_until_next_update,
            marketing_source_type=record.marketing_source_type,
            marketing_source_id=record.marketing_source_id,
        )

    return ctx.ledger.read(read)


def list_active_contacts(
    ctx: EngineContext, tenant_id: str, at_us: int | None, page_size: int, page_token: str
) -> tuple[list[Activation], str]:
    """The contacts behind the cycle's metered figure, by contact id: those active in
    the cycle under CYCLE_ACTIVE; under HELD_CONTACTS every span in which a contact
    counted (held; model 4: held and marketing) at some time in the cycle, current or
    past, by contact id and start: `activated_at` when it started counting and
    `counted_until` when it stopped (0 while it counts)."""
    check_id("tenant_id", tenant_id)
    if page_size < 0:
        raise InvalidArgument("page_size", "must not be negative")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    token_cycle, after = _read_token(page_token) if page_token else (None, ("", 0))

    def read(r: LedgerReader) -> tuple[list[Activation], str]:
        now = ctx.clock.now_us()
        plan = ctx.plan(r, tenant_id)
        if token_cycle is not None and at_us is None:
            start = token_cycle
        else:
            start = cycle_of(r, tenant_id, plan, at_us if at_us is not None else now).start_us
            if token_cycle is not None and token_cycle != start:
                raise InvalidArgument("page_token", "belongs to another cycle")
        if plan.metering is Metering.HELD_CONTACTS:
            try:
                booked, cycle = ctx.plan_of_cycle(r, tenant_id, plan, start)
            except (ValueError, OverflowError):
                raise InvalidArgument("page_token", "is not a token this service returned") from None
            if cycle.start_us != start:
                raise InvalidArgument("page_token", "belongs to another cycle")
            rows = _counted(r, booked, tenant_id, cycle, now, after, size + 1)
        else:
            rows = r.active_contacts(tenant_id, start, after[0], size + 1)
        if len(rows) <= size:
            return rows, ""
        rows = rows[:size]
        return rows, _token(start, rows[-1])

    return ctx.ledger.read(read)


def _token(cycle_start_us: int, last: Activation) -> str:
    """The page token after `last`: the cycle listed and where the next page starts."""
    raw = {"c": cycle_start_us, "a": last.contact_id, "f": last.activated_at_us}
    return base64.urlsafe_b64encode(json.dumps(raw).encode()).decode()


def _read_token(page_token: str) -> tuple[int, tuple[str, int]]:
    """The cycle and the position a page token names; refused when this service did not write it."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(page_token.encode()))
        token_cycle, after = int(raw["c"]), (str(raw["a"]), int(raw.get("f", MAX_FIGURE)))
        after[0].encode()
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
        raise InvalidArgument("page_token", "is not a token this service returned") from None
    if not all(-MAX_FIGURE - 1 <= n <= MAX_FIGURE for n in (token_cycle, after[1])):
        raise InvalidArgument("page_token", "is not a token this service returned")
    return token_cycle, after


def _counted(
    r: LedgerReader,
    plan: Plan,
    tenant_id: str,
    cycle: Cycle,
    now: int,
    after: tuple[str, int],
    limit: int,
    contact_id: str | None = None,
) -> list[Activation]:
    """The spans in which contacts counted under a HELD_CONTACTS plan in the cycle, as listed;
    an end still to come (a pending MK-6 switch) is not reported."""
    label = "MARKETING_CONTACT" if plan.marketing_contacts_only else "HELD_CONTACT"
    spans = r.held_spans(
        tenant_id, plan.marketing_contacts_only, cycle.start_us, cycle.end_us, after, limit, contact_id
    )
    return [
        Activation(s.contact_id, s.from_us, label, 0, s.until_us if s.until_us is not None and s.until_us <= now else 0)
        for s in spans
    ]
