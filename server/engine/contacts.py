"""Contacts held and activated: CheckContactAdd (AC-2..AC-5), and the writes every job
that changes contacts shares: the tenant's holdings rolled into a cycle before they
change (`roll`, MK-6 switches applied), contacts created, deleted or set
(non-)marketing with the held and marketing counts and peaks kept (`change_contacts`,
AC-10, MK-5, MK-6), and contacts activated in a cycle (`activate`, CR-1, CR-2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial

from ..domain.cycles import Cycle
from ..domain.figures import cycle_of, tally_of, usage_of
from ..domain.model import (
    Activation,
    ActivityKind,
    AuditEntry,
    ContactAddOutcome,
    ContactRecord,
    Decision,
    Enforcement,
    Holdings,
    Metering,
    Plan,
    Reason,
    SourcePolicy,
)
from ..domain.plans import check_id, require
from ..ledger import LedgerReader, LedgerTx
from . import replies
from .context import EngineContext
from .requests import MAX_BATCH, ContactAddRequest, check_ids

MAX_GAP_CYCLES = 1_200


def check_contact_add(ctx: EngineContext, req: ContactAddRequest) -> ContactAddOutcome:
    """May these contacts be added through this source (AC-2..AC-5)? All or nothing;
    when allowed they are held from now on (and, under CYCLE_ACTIVE with
    CONTACT_CREATED counted, active this cycle)."""
    check_id("tenant_id", req.tenant_id)
    require("source", req.source)
    check_ids("contact_ids", req.contact_ids, MAX_BATCH)
    check_id("request_id", req.request_id, required=False)
    marketing = req.marketing is not False
    fingerprint = partial(replies.fingerprint, req.source, list(req.contact_ids), marketing)

    def decide(view: LedgerReader, tx: LedgerTx | None) -> ContactAddOutcome:
        now = ctx.clock.now_us()
        plan = ctx.plan(view, req.tenant_id)
        cycle = cycle_of(view, req.tenant_id, plan, now)
        tally = tally_of(view, plan, req.tenant_id, cycle)
        ids = list(dict.fromkeys(req.contact_ids))
        new = [c for c in ids if not ((record := view.contact(req.tenant_id, c)) and record.held)]
        if plan.metering is Metering.HELD_CONTACTS:
            counted = len(new) if marketing or not plan.marketing_contacts_only else 0
        elif plan.counts_activity(ActivityKind.CONTACT_CREATED):
            counted = sum(1 for c in new if view.activation(req.tenant_id, cycle.start_us, c) is None)
        else:
            counted = 0
        policy = plan.source_policy(req.source)  # type: ignore[arg-type]
        if policy is not SourcePolicy.OVER_LIMIT_ALLOWED and counted and tally.count + counted > plan.limit:
            reason = Reason.IMPORT_EXCEEDS_LIMIT if policy is SourcePolicy.REFUSE_IF_EXCEEDS else Reason.SOURCE_BLOCKED
            return ContactAddOutcome(Decision.DENY, reason, 0, usage_of(req.tenant_id, plan, cycle, tally))
        if tx is None:
            after = tally.plus(counted, 0)
        else:
            audit: list[AuditEntry] = []
            source = req.source.name  # type: ignore[union-attr]
            change_contacts(
                tx,
                plan,
                req.tenant_id,
                ActivityKind.CONTACT_CREATED,
                new,
                marketing,
                source,
                "",
                now,
                cycle,
                "CheckContactAdd",
                req.request_id,
                audit,
            )
            if plan.metering is Metering.CYCLE_ACTIVE and counted:
                entry = AuditEntry(now, req.tenant_id, cycle.start_us, "CheckContactAdd", "", "ALLOW", "")
                activate(
                    tx,
                    cycle,
                    new,
                    now,
                    ActivityKind.CONTACT_CREATED,
                    replace(entry, request_id=req.request_id),
                    audit,
                )
            tx.audit(audit)
            after = tally_of(tx, plan, req.tenant_id, cycle)
        overage = counted and plan.enforcement is Enforcement.OVERAGE and after.count > plan.limit
        reason = Reason.OVERAGE if overage else Reason.OK
        usage = usage_of(req.tenant_id, plan, cycle, after)
        if tx is not None:
            ctx.observe(tx, plan, usage, now)
        return ContactAddOutcome(Decision.ALLOW, reason, len(new), usage)

    if req.dry_run:
        return ctx.ledger.read(lambda r: decide(r, None))

    def unit(tx: LedgerTx) -> ContactAddOutcome:
        return replies.once(
            tx,
            req.tenant_id,
            replies.CONTACT_ADD,
            req.request_id,
            fingerprint,
            lambda: decide(tx, tx),
            ctx.clock.now_us,
        )

    return ctx.transact(unit, weight=len(req.contact_ids))


def roll(tx: LedgerTx, plan: Plan, tenant_id: str, cycle: Cycle) -> Holdings:
    """Brings the tenant's holdings into `cycle` before they change: applies the
    MK-6 switches due at its start and stores the end and peak counts of every
    cycle passed over (constant through cycles without a change)."""
    h = tx.holdings(tenant_id)
    if h is not None and h.cycle_start_us >= cycle.start_us:
        return h
    rolled = Holdings(cycle.start_us)
    if h is not None:
        if h.pending:
            tx.switch_marketing(tenant_id, cycle.start_us)
        rolled = Holdings(cycle.start_us, h.held, h.marketing - h.pending, 0)
        gap = cycle_of(tx, tenant_id, plan, h.cycle_start_us).end_us
        for _ in range(MAX_GAP_CYCLES):
            if gap >= cycle.start_us:
                break
            tx.record_held(tenant_id, gap, rolled.held, rolled.marketing)
            gap = cycle_of(tx, tenant_id, plan, gap).end_us
    tx.record_held(tenant_id, cycle.start_us, rolled.held, rolled.marketing)
    tx.put_holdings(tenant_id, rolled)
    return rolled


def change_contacts(
    tx: LedgerTx,
    plan: Plan,
    tenant_id: str,
    kind: ActivityKind,
    ids: Sequence[str],
    marketing: bool,
    source_type: str,
    source_id: str,
    now: int,
    cycle: Cycle,
    rpc: str,
    request_id: str,
    audit: list[AuditEntry],
) -> Holdings:
    """Creates, deletes or sets the marketing status (MK-5) of contacts, keeping the
    tenant's held and marketing counts and the cycle's peaks (AC-10, MK-6)."""
    h = roll(tx, plan, tenant_id, cycle)
    held, in_marketing, pending = h.held, h.marketing, h.pending
    changed: list[ContactRecord] = []
    for contact_id in ids:
        before = tx.contact(tenant_id, contact_id) or ContactRecord(contact_id, held=False)
        after = _changed(before, kind, marketing, source_type, source_id, now, cycle)
        if after is None:
            continue
        changed.append(after)
        held += after.held - before.held
        in_marketing += (after.held and after.marketing) - (before.held and before.marketing)
        pending += _pending(after) - _pending(before)
        if after.held != before.held:
            entry = AuditEntry(now, tenant_id, cycle.start_us, rpc, contact_id, "RECORDED", kind.name)
            audit.append(replace(entry, held_delta=1 if after.held else -1, request_id=request_id))
    if not changed:
        return h
    tx.put_contacts(tenant_id, changed, now)
    after_all = Holdings(cycle.start_us, held, in_marketing, pending)
    tx.put_holdings(tenant_id, after_all)
    tx.record_held(tenant_id, cycle.start_us, held, in_marketing)
    return after_all


def activate(
    tx: LedgerTx,
    cycle: Cycle,
    ids: Sequence[str],
    at: int,
    activity: ActivityKind,
    entry: AuditEntry,
    audit: list[AuditEntry],
) -> list[Activation]:
    """Activates in the cycle those of `ids` not active in it yet (CR-1, CR-2), whatever the
    limit: activity that happened is never refused. Audits each like `entry`."""
    fresh = [
        Activation(c, at, activity.name, 0) for c in ids if tx.activation(entry.tenant_id, cycle.start_us, c) is None
    ]
    tx.activate(entry.tenant_id, cycle.start_us, fresh)
    audit.extend(replace(entry, contact_id=a.contact_id, reason=activity.name, active_delta=1) for a in fresh)
    return fresh


def _pending(record: ContactRecord) -> bool:
    return record.held and record.marketing and record.marketing_until_next_update


def _changed(
    before: ContactRecord,
    kind: ActivityKind,
    marketing: bool,
    source_type: str,
    source_id: str,
    now: int,
    cycle: Cycle,
) -> ContactRecord | None:
    """A contact after a contact activity, or None when it changes nothing."""
    if kind is ActivityKind.CONTACT_CREATED:
        if before.held:
            return None
        return ContactRecord(before.contact_id, True, marketing, False, source_type, source_id, 0, now)
    if kind is ActivityKind.CONTACT_DELETED:
        if not before.held:
            return None
        return replace(before, held=False, marketing=False, marketing_until_next_update=False, marketing_until_us=0)
    base = before if before.held else ContactRecord(before.contact_id, held=True, held_since_us=now)
    base = replace(base, marketing_source_type=source_type, marketing_source_id=source_id)
    if marketing:
        return replace(base, marketing=True, marketing_until_next_update=False, marketing_until_us=0)
    if base.marketing and not base.marketing_until_next_update:
        return replace(base, marketing_until_next_update=True, marketing_until_us=cycle.end_us)
    return base
