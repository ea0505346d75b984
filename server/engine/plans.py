"""PutPlan: a plan validated, resolved (anchor kept or set, defaults applied) and
stored, its thresholds re-armed. A plan whose anchor moves the cycle boundaries
re-anchors (SG-7): the cycle running under the old anchor closes at that instant,
keeping its held counts, and the next one starts then."""

from __future__ import annotations

from ..domain.cycles import Cycle, same_boundaries
from ..domain.figures import cycle_of, tally_of, usage_of
from ..domain.model import AuditEntry, Plan, PlanInput, Reanchor, Usage
from ..domain.plans import validate_plan
from ..ledger import LedgerTx
from .contacts import roll
from .context import EngineContext


def put_plan(ctx: EngineContext, tenant_id: str, given: PlanInput) -> tuple[Plan, Usage]:
    given = validate_plan(tenant_id, given)

    def unit(tx: LedgerTx) -> tuple[Plan, Usage]:
        now = ctx.clock.now_us()
        stored = tx.plan(tenant_id)
        previous = Plan.from_json(stored.plan_json) if stored is not None else None
        anchor = given.cycle_anchor_us
        if anchor is None:
            anchor = previous.cycle_anchor_us if previous is not None else now
        anchored_at = previous.anchored_at_us if previous is not None else None
        interrupted: Cycle | None = None
        if previous is not None and not same_boundaries(anchor, previous.cycle_anchor_us):
            interrupted = _close_for_reanchor(tx, previous, tenant_id, now)
            tx.put_reanchor(tenant_id, Reanchor(now, previous.cycle_anchor_us))
            anchored_at = now
        plan = Plan.resolve(given, anchor, anchored_at)
        tx.put_plan(tenant_id, plan.to_json(), now)
        cycle = cycle_of(tx, tenant_id, plan, now)
        if interrupted is not None:
            _open_after_reanchor(tx, plan, tenant_id, interrupted, cycle)
        tx.audit([AuditEntry(now, tenant_id, cycle.start_us, "PutPlan", "", "PLAN_SET", plan.plan_name)])
        usage = usage_of(tenant_id, plan, cycle, tally_of(tx, plan, tenant_id, cycle))
        ctx.observe(tx, plan, usage, now, rearm=True)
        return plan, usage

    return ctx.transact(unit)


def _close_for_reanchor(tx: LedgerTx, old: Plan, tenant_id: str, now: int) -> Cycle:
    """Before a plan with a new anchor is stored at `now`: brings the holdings into the
    cycle running under the old anchor, so that it keeps its end and peak counts, and,
    when the change cuts that cycle short, moves the pending MK-6 switches to the close,
    the next cycle start. Returns the interrupted cycle."""
    interrupted = cycle_of(tx, tenant_id, old, now)
    if tx.holdings(tenant_id) is not None:
        h = roll(tx, old, tenant_id, interrupted)
        if h.pending and interrupted.start_us < now:
            tx.reschedule_marketing(tenant_id, now)
    return interrupted


def _open_after_reanchor(tx: LedgerTx, plan: Plan, tenant_id: str, interrupted: Cycle, cycle: Cycle) -> None:
    """Once the new plan is stored: the held contacts carry into the new cycle (the
    switches due at the close applied), or, when nothing was cut short, the pending
    switches wait for the new cycle's end."""
    h = tx.holdings(tenant_id)
    if h is None:
        return
    if interrupted.start_us < cycle.start_us:
        roll(tx, plan, tenant_id, cycle)
    elif h.pending:
        tx.reschedule_marketing(tenant_id, cycle.end_us)
