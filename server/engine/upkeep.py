"""The engine's periodic work, run by the sidecar between decisions: reminders due and
thresholds re-armed (`send_reminders`, AC-1), and what is past its retention deleted
(`prune`). Both write in short transactions that queue with decisions like any unit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from ..domain.figures import usage_at
from ..domain.model import UsageEvent
from ..domain.plans import MAX_FIGURE
from ..ledger import LedgerReader, LedgerTx
from .context import EngineContext
from .requests import Retention

# The outbox's consumer (and lease) that webhook delivery keeps its position under.
WEBHOOK_CONSUMER = "webhook"
# Rows one pruning transaction deletes at most: a short unit between decisions.
PRUNE_ROWS = 1_000
# The reminder sweep writes this many tenants per transaction: a call that arrives
# while one runs waits for it, so it is kept short.
REMINDER_TENANTS = 4
# What one tenant's reminder costs the writer, in contacts (the unit's weight).
TENANT_WEIGHT = 32


def send_reminders(ctx: EngineContext, pause: Callable[[], bool]) -> list[UsageEvent]:
    """Writes the reminders due (AC-1: every `renotify_interval` while a figure stays at
    or above a threshold) and re-arms thresholds of tenants whose cycle has turned.
    REMINDER_TENANTS tenants per transaction so the data plane's units commit in
    between. `pause` runs before each transaction: it may wait, leaving the writer to
    other calls, and says whether to stop (the tenants left get theirs at the next
    run). Returns the events written."""
    raised = ctx.ledger.read(lambda r: list(dict.fromkeys(t for t, _, _ in r.raised_notices())))

    def unit(tx: LedgerTx, tenants: list[str]) -> list[UsageEvent]:
        now = ctx.clock.now_us()
        written: list[UsageEvent] = []
        for tenant_id in tenants:
            plan = ctx.plan(tx, tenant_id)
            written += ctx.observe(tx, plan, usage_at(tx, plan, tenant_id, now), now, remind=True)
        return written

    written: list[UsageEvent] = []
    for start in range(0, len(raised), REMINDER_TENANTS):
        if pause():
            break
        tenants = raised[start : start + REMINDER_TENANTS]
        written += ctx.transact(partial(unit, tenants=tenants), weight=len(tenants) * TENANT_WEIGHT)
    return written


def prune(ctx: EngineContext, retention: Retention, consumers: Sequence[str]) -> dict[str, int]:
    """Deletes what is older than its retention, oldest first, in transactions of at
    most PRUNE_ROWS rows: answers kept for retries ("results"), outbox events
    ("events") every consumer has delivered (every event, with none), and audit rows
    ("audit"). Returns the rows deleted of each.

    The consumers are this sidecar's (`consumers`) and, on a ledger several sidecars
    share, those another sidecar delivers to: a consumer whose lease of the same name
    was held within the events' retention (the webhook: the sidecar delivering it may
    not be this one). A consumer no sidecar has delivered to for that long holds
    nothing back: its events would otherwise be kept for ever."""
    now = ctx.clock.now_us()

    def delivered(r: LedgerReader) -> int:
        following = set(consumers)
        lease = r.lease(WEBHOOK_CONSUMER)
        if lease is not None and lease.now_us - lease.expires_us < retention.events_us:
            following.add(WEBHOOK_CONSUMER)
        return min((r.event_cursor(c) for c in following), default=MAX_FIGURE)

    through = ctx.ledger.read(delivered)
    jobs: dict[str, Callable[[LedgerTx], int]] = {
        "results": lambda tx: tx.prune_results(now - retention.requests_us, PRUNE_ROWS),
        "events": lambda tx: tx.prune_events(now - retention.events_us, through, PRUNE_ROWS),
        "audit": lambda tx: tx.prune_audit(now - retention.audit_us, PRUNE_ROWS),
    }
    pruned: dict[str, int] = {}
    for kind, job in jobs.items():
        pruned[kind] = deleted = ctx.ledger.transact(job)
        while deleted >= PRUNE_ROWS:
            deleted = ctx.ledger.transact(job)
            pruned[kind] += deleted
    return pruned
