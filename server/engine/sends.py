"""Send decisions: CheckSend, CheckSendBatch and CheckEnroll. Under CYCLE_ACTIVE a send
counts its contact active in the cycle (SG-1..SG-10, CR-1c); under HELD_CONTACTS only
held (model 4: marketing) contacts are sent to, while the count is within the ceiling
(AC-6..AC-9, MK-3, MK-4). What a limit answers for automation e-mail (DEFER, then
EXPIRED, AC-9) is `_Limits`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import cache, partial

from ..domain.clock import MICROS
from ..domain.cycles import Cycle
from ..domain.figures import Tally, cycle_of, tally_of, usage_of
from ..domain.model import (
    AuditEntry,
    BatchOutcome,
    Decision,
    Enforcement,
    EnrollOutcome,
    MessageKind,
    Metering,
    Plan,
    Reason,
    SendDecision,
    SendOutcome,
    Usage,
)
from ..domain.plans import check_id, require
from ..ledger import LedgerReader, LedgerTx
from . import replies
from .context import EngineContext
from .requests import MAX_BATCH, BatchRequest, SendRequest, check_ids

DEFER_POLL_US = 5 * 60 * MICROS
NOT_COUNTED = SendDecision(Decision.ALLOW, Reason.NOT_COUNTED)
ALLOW_ACTIVE = SendDecision(Decision.ALLOW, Reason.ALREADY_ACTIVE)
ALLOW_NEW = SendDecision(Decision.ALLOW, Reason.NEW_CONTACT_COUNTED, newly_active=True)
ALLOW_OVERAGE = SendDecision(Decision.ALLOW, Reason.OVERAGE, newly_active=True)
ALLOW_HELD = SendDecision(Decision.ALLOW, Reason.OK)
REPEATED = {d: replace(d, newly_active=False) for d in (ALLOW_NEW, ALLOW_OVERAGE)}


class _Limits:
    """What a limit answers within one call: DENY, or for automation e-mails DEFER
    until max_queue, then EXPIRED (AC-9). Made once per reason and call."""

    __slots__ = ("plan", "kind", "queued_since_us", "now", "cycle", "_made")

    def __init__(self, plan: Plan, kind: MessageKind, queued_since_us: int | None, now: int, cycle: Cycle) -> None:
        self.plan = plan
        self.kind = kind
        self.queued_since_us = queued_since_us
        self.now = now
        self.cycle = cycle
        self._made: dict[Reason, SendDecision] = {}

    def __call__(self, reason: Reason) -> SendDecision:
        made = self._made.get(reason)
        if made is None:
            made = self._made[reason] = self._decide(reason)
        return made

    def _decide(self, reason: Reason) -> SendDecision:
        if self.kind is not MessageKind.AUTOMATION:
            return SendDecision(Decision.DENY, reason)
        now, plan = self.now, self.plan
        waited = now - (self.queued_since_us if self.queued_since_us is not None else now)
        if waited >= plan.max_queue_us:
            return SendDecision(Decision.EXPIRED, Reason.QUEUED_TOO_LONG)
        retry = min(self.cycle.end_us - now, plan.max_queue_us - waited, DEFER_POLL_US)
        return SendDecision(Decision.DEFER, reason, retry_after_us=max(retry, MICROS))


def check_send(ctx: EngineContext, req: SendRequest) -> SendOutcome:
    check_id("tenant_id", req.tenant_id)
    check_id("contact_id", req.contact_id)
    require("channel", req.channel)
    require("kind", req.kind)
    check_id("request_id", req.request_id, required=False)

    def decide(view: LedgerReader, tx: LedgerTx | None) -> SendOutcome:
        results, usage = _decide_sends(
            ctx,
            view,
            tx,
            req.tenant_id,
            req.kind,  # type: ignore[arg-type]
            [req.contact_id],
            req.queued_since_us,
            "CheckSend",
            req.request_id,
        )
        return SendOutcome(results[0][1], usage)

    if req.dry_run:
        return ctx.ledger.read(lambda r: decide(r, None))
    fingerprint = partial(replies.fingerprint, req.contact_id, req.channel, req.kind, req.queued_since_us)

    def unit(tx: LedgerTx) -> SendOutcome:
        ctx.read_ahead(tx, req.tenant_id, [req.contact_id], replies.SEND.rpc, req.request_id)
        return replies.once(
            tx, req.tenant_id, replies.SEND, req.request_id, fingerprint, lambda: decide(tx, tx), ctx.clock.now_us
        )

    return ctx.transact(unit)


def check_send_batch(ctx: EngineContext, req: BatchRequest) -> BatchOutcome:
    check_id("tenant_id", req.tenant_id)
    require("channel", req.channel)
    require("kind", req.kind)
    check_ids("contact_ids", req.contact_ids, MAX_BATCH)
    check_id("request_id", req.request_id, required=False)

    def decide(view: LedgerReader, tx: LedgerTx | None, ids: Sequence[str]) -> BatchOutcome:
        results, usage = _decide_sends(
            ctx,
            view,
            tx,
            req.tenant_id,
            req.kind,  # type: ignore[arg-type]
            ids,
            None,
            "CheckSendBatch",
            req.request_id,
        )
        return replies.batch_outcome(results, usage)

    if req.dry_run:
        return ctx.ledger.read(lambda r: decide(r, None, req.contact_ids))
    # Computed once, though every unit of a large call compares or stores it.
    fingerprint = cache(
        lambda: replies.fingerprint(list(req.contact_ids), req.channel, req.kind, *ctx.cut_of(req.contact_ids))
    )

    def unit(tx: LedgerTx, ids: Sequence[str], index: int) -> BatchOutcome:
        request_id = replies.unit_request_id(req.request_id, index)
        codec = replies.batch(ids)
        ctx.read_ahead(tx, req.tenant_id, ids, codec.rpc, request_id)
        return replies.once(
            tx, req.tenant_id, codec, request_id, fingerprint, lambda: decide(tx, tx, ids), ctx.clock.now_us
        )

    answers = ctx.in_units(req.contact_ids, unit)
    if len(answers) == 1:
        return answers[0]
    first = {c: d for answer in answers for c, d in answer.results}
    return replies.batch_outcome(_in_request_order(req.contact_ids, first), answers[-1].usage)


def check_enroll(ctx: EngineContext, tenant_id: str, contact_id: str, automation_id: str) -> EnrollOutcome:
    """May this contact enter an automation now (AC-8 with AC-7's grace)? Counts nothing."""
    check_id("tenant_id", tenant_id)
    check_id("contact_id", contact_id)
    check_id("automation_id", automation_id, required=False)

    def read(r: LedgerReader) -> EnrollOutcome:
        now = ctx.clock.now_us()
        plan = ctx.plan(r, tenant_id)
        cycle = cycle_of(r, tenant_id, plan, now)
        tally = tally_of(r, plan, tenant_id, cycle)
        usage = usage_of(tenant_id, plan, cycle, tally)
        if plan.metering is Metering.HELD_CONTACTS:
            record = r.contact(tenant_id, contact_id)
            if record is None or not record.held:
                return EnrollOutcome(Decision.DENY, Reason.UNKNOWN_CONTACT, usage)
            blocked = held_block(plan, tally)
            if blocked is not None:
                return EnrollOutcome(Decision.DENY, blocked, usage)
            return EnrollOutcome(Decision.ALLOW, Reason.OK, usage)
        sends_limit = plan.effective_sends_limit
        if sends_limit and tally.sends >= sends_limit:
            return EnrollOutcome(Decision.DENY, Reason.SENDS_LIMIT_REACHED, usage)
        if r.activation(tenant_id, cycle.start_us, contact_id) is not None:
            return EnrollOutcome(Decision.ALLOW, Reason.ALREADY_ACTIVE, usage)
        ceiling = plan.ceiling
        if ceiling is not None and tally.count >= ceiling:
            return EnrollOutcome(Decision.DENY, limit_reason(plan), usage)
        return EnrollOutcome(Decision.ALLOW, Reason.OK, usage)

    return ctx.ledger.read(read)


def _decide_sends(
    ctx: EngineContext,
    view: LedgerReader,
    tx: LedgerTx | None,
    tenant_id: str,
    kind: MessageKind,
    contact_ids: Sequence[str],
    queued_since_us: int | None,
    rpc: str,
    request_id: str,
) -> tuple[list[tuple[str, SendDecision]], Usage]:
    """Decides sends in order, each seeing the ones before it; a repeated id repeats
    its first decision and counts nothing more. Returns the decisions and the usage
    after them. Reads through `view`; writes the counting through `tx`, or, in a dry
    run (`tx` None), writes nothing."""
    now = ctx.clock.now_us()
    plan = ctx.plan(view, tenant_id)
    cycle = cycle_of(view, tenant_id, plan, now)
    tally = tally_of(view, plan, tenant_id, cycle)
    unique = list(dict.fromkeys(contact_ids))
    limited = _Limits(plan, kind, queued_since_us, now, cycle)
    if not plan.counts_kind(kind):
        first = dict.fromkeys(unique, NOT_COUNTED)
    elif plan.metering is Metering.HELD_CONTACTS:
        first, tally = _decide_held_sends(view, tx, plan, tenant_id, cycle, unique, limited, tally, rpc, request_id)
    else:
        first, tally = _decide_active_sends(view, tx, plan, tenant_id, cycle, unique, kind, limited, now, tally)
    results = _in_request_order(contact_ids, first)
    usage = usage_of(tenant_id, plan, cycle, tally)
    if tx is not None:
        ctx.observe(tx, plan, usage, now)
    return results, usage


def _decide_active_sends(
    view: LedgerReader,
    tx: LedgerTx | None,
    plan: Plan,
    tenant_id: str,
    cycle: Cycle,
    unique: list[str],
    kind: MessageKind,
    limited: _Limits,
    now: int,
    tally: Tally,
) -> tuple[dict[str, SendDecision], Tally]:
    """Counted sends under CYCLE_ACTIVE (SG-1..SG-10, CR-1c), in order: a contact
    already active this cycle is allowed while sends are left; a new one while the
    count is below the ceiling (under OVERAGE always, past the limit as OVERAGE).
    Reads the active ones at once and writes the new ones and the sends at once."""
    active = view.active_among(tenant_id, cycle.start_us, unique)
    count, sends = tally.count, tally.sends
    sends_limit = plan.effective_sends_limit or None
    ceiling = plan.ceiling
    overage_from = plan.limit if plan.enforcement is Enforcement.OVERAGE else None
    first: dict[str, SendDecision] = {}
    fresh: list[str] = []
    again: list[str] = []
    for c in unique:
        if c in active:
            if sends_limit is not None and sends >= sends_limit:
                first[c] = limited(Reason.SENDS_LIMIT_REACHED)
                continue
            again.append(c)
            sends += 1
            first[c] = ALLOW_ACTIVE
        elif ceiling is not None and count >= ceiling:
            first[c] = limited(limit_reason(plan))
        elif sends_limit is not None and sends >= sends_limit:
            first[c] = limited(Reason.SENDS_LIMIT_REACHED)
        else:
            fresh.append(c)
            count += 1
            sends += 1
            first[c] = ALLOW_OVERAGE if overage_from is not None and count > overage_from else ALLOW_NEW
    if tx is not None:
        tx.send_to_new(tenant_id, cycle.start_us, fresh, now, kind.name)
        tx.send_to_active(tenant_id, cycle.start_us, again)
    return first, tally.plus(len(fresh), len(fresh) + len(again))


def _decide_held_sends(
    view: LedgerReader,
    tx: LedgerTx | None,
    plan: Plan,
    tenant_id: str,
    cycle: Cycle,
    unique: list[str],
    limited: _Limits,
    tally: Tally,
    rpc: str,
    request_id: str,
) -> tuple[dict[str, SendDecision], Tally]:
    """Counted sends under HELD_CONTACTS (AC-6..AC-9, MK-3, MK-4): campaign and
    automation mail only to held (model 4: marketing) contacts, and none while the
    count is past the ceiling. The call's sends are audited in one entry."""
    now = limited.now
    first: dict[str, SendDecision] = {}
    counted = 0
    for c in unique:
        record = view.contact(tenant_id, c)
        if record is None or not record.held:
            first[c] = SendDecision(Decision.DENY, Reason.UNKNOWN_CONTACT)
            continue
        if plan.marketing_contacts_only and not record.marketing_at(now):
            first[c] = SendDecision(Decision.DENY, Reason.NOT_MARKETING_CONTACT)
            continue
        blocked = held_block(plan, tally.plus(0, counted))
        if blocked is not None:
            first[c] = limited(blocked)
            continue
        counted += 1
        first[c] = ALLOW_HELD
    if counted and tx is not None:
        tx.count_sends(tenant_id, cycle.start_us, counted)
        contact_id = unique[0] if len(unique) == 1 else ""
        entry = AuditEntry(now, tenant_id, cycle.start_us, rpc, contact_id, "ALLOW", Reason.OK.name)
        tx.audit([replace(entry, sends_delta=counted, request_id=request_id)])
    return first, tally.plus(0, counted)


def limit_reason(plan: Plan) -> Reason:
    """Why a new contact is refused at the ceiling: past the grace, or at the limit."""
    return Reason.OVER_GRACE if plan.enforcement is Enforcement.GRACE else Reason.CONTACT_LIMIT_REACHED


def held_block(plan: Plan, tally: Tally) -> Reason | None:
    """Why HELD_CONTACTS sends and enrolments are blocked now, if they are: the count
    past the ceiling (AC-6, AC-7, AC-8) or the sends allowance used up."""
    ceiling = plan.ceiling
    if ceiling is not None and tally.count > ceiling:
        return limit_reason(plan)
    sends_limit = plan.effective_sends_limit
    if sends_limit and tally.sends >= sends_limit:
        return Reason.SENDS_LIMIT_REACHED
    return None


def _in_request_order(contact_ids: Sequence[str], first: dict[str, SendDecision]) -> list[tuple[str, SendDecision]]:
    """One decision per listed id: an id listed again repeats its first decision, newly
    active no more (it counted nothing more)."""
    if len(first) == len(contact_ids):
        return [(c, first[c]) for c in contact_ids]
    seen: set[str] = set()
    results = []
    for c in contact_ids:
        d = first[c]
        if c in seen:
            d = REPEATED.get(d, d)
        seen.add(c)
        results.append((c, d))
    return results
