"""RecordActivity: activity that happened, booked in the cycle it happened in under the
plan that cycle ended with (CR-1, CR-2), never refused; contact activities (created,
deleted, marketing status set) change the contacts held (AC-10, MK-5, MK-6). A call
over many contacts commits in units (`EngineContext.in_units`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import cache

from ..domain.clock import MICROS
from ..domain.errors import InvalidArgument
from ..domain.figures import cycle_of, tally_of, usage_at, usage_of
from ..domain.model import Activation, ActivityKind, ActivityOutcome, AuditEntry, Metering
from ..domain.plans import check_id, require
from ..ledger import LedgerTx
from . import replies
from .contacts import activate, change_contacts
from .context import EngineContext
from .requests import MAX_ACTIVITY_CONTACTS, ActivityRequest, check_ids

FUTURE_SKEW_US = 5 * 60 * MICROS
CONTACT_KINDS = frozenset(
    {ActivityKind.CONTACT_CREATED, ActivityKind.CONTACT_DELETED, ActivityKind.MARKETING_STATUS_SET}
)


def record_activity(ctx: EngineContext, req: ActivityRequest) -> ActivityOutcome:
    check_id("tenant_id", req.tenant_id)
    require("kind", req.kind)
    check_ids("contact_ids", req.contact_ids, MAX_ACTIVITY_CONTACTS)
    check_id("source_type", req.source_type, required=False)
    check_id("source_id", req.source_id, required=False)
    check_id("request_id", req.request_id, required=False)
    if req.occurred_at_us is not None:
        if req.occurred_at_us > ctx.clock.now_us() + FUTURE_SKEW_US:
            raise InvalidArgument("occurred_at", "is in the future; activity is recorded after it happened")
        if req.occurred_at_us < 0:
            raise InvalidArgument("occurred_at", "is before 1970")
    kind: ActivityKind = req.kind  # type: ignore[assignment]
    fingerprint = cache(
        lambda: replies.fingerprint(
            req.kind,
            list(req.contact_ids),
            req.occurred_at_us,
            req.marketing,
            req.source_type,
            req.source_id,
            *ctx.cut_of(req.contact_ids),
        )
    )

    def decide(tx: LedgerTx, contact_ids: Sequence[str]) -> ActivityOutcome:
        now = ctx.clock.now_us()
        at = req.occurred_at_us if req.occurred_at_us is not None else now
        plan = ctx.plan(tx, req.tenant_id)
        booked, cycle = ctx.plan_of_cycle(tx, req.tenant_id, plan, at)
        ids = list(dict.fromkeys(contact_ids))
        audit: list[AuditEntry] = []
        now_cycle = cycle_of(tx, req.tenant_id, plan, now)
        held = plan.metering is Metering.HELD_CONTACTS
        counted_before = tally_of(tx, plan, req.tenant_id, now_cycle).count if held else 0
        if kind in CONTACT_KINDS:
            change_contacts(
                tx,
                plan,
                req.tenant_id,
                kind,
                ids,
                req.marketing,
                req.source_type,
                req.source_id,
                now,
                now_cycle,
                "RecordActivity",
                req.request_id,
                audit,
            )
        fresh: list[Activation] = []
        if booked.metering is Metering.CYCLE_ACTIVE and booked.counts_activity(kind):
            entry = AuditEntry(now, req.tenant_id, cycle.start_us, "RecordActivity", "", "RECORDED", "")
            fresh = activate(tx, cycle, ids, at, kind, replace(entry, request_id=req.request_id), audit)
        tx.audit(audit)
        usage = usage_of(req.tenant_id, booked, cycle, tally_of(tx, booked, req.tenant_id, cycle))
        now_usage = usage if cycle.contains(now) else usage_at(tx, plan, req.tenant_id, now)
        ctx.observe(tx, plan, now_usage, now)
        # Under HELD_CONTACTS the contacts this call made count: one call has one kind, so the
        # count only rises (creation, marketing set) or only falls (deletion), by that many.
        newly = max(0, now_usage.active_contacts - counted_before) if held else len(fresh)
        return ActivityOutcome(len(ids), newly, usage)

    def unit(tx: LedgerTx, ids: Sequence[str], index: int) -> ActivityOutcome:
        request_id = replies.unit_request_id(req.request_id, index)
        return replies.once(
            tx, req.tenant_id, replies.ACTIVITY, request_id, fingerprint, lambda: decide(tx, ids), ctx.clock.now_us
        )

    answers = ctx.in_units(req.contact_ids, unit)
    if len(answers) == 1:
        return answers[0]
    recorded = sum(a.recorded for a in answers)
    return ActivityOutcome(recorded, sum(a.newly_active for a in answers), answers[-1].usage)
