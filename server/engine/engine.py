"""The decision engine's public face: `Engine`, one per process, whose methods are the
service's calls; each hands its work to the module of its job over one shared
`EngineContext` (the ledger, ledger time, caches and board).

It imports nothing from grpc and reads time only from the injected clock, as ledger
time (`LedgerTime`: never earlier than a decision already committed). Every decision
that counts runs inside one ledger transaction (`Ledger.transact`), so the decision
and its counting are atomic and durable before the caller hears the answer.

Where each job lives: sends.py (CheckSend, CheckSendBatch, CheckEnroll), contacts.py
(CheckContactAdd and the contact writes), activity.py (RecordActivity), plans.py
(PutPlan, re-anchors), reads.py (usage, invoice, plan, contact, listings), upkeep.py
(reminders, pruning), replies.py (answers kept per request_id); the figures
themselves are the domain's (domain/figures.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from ..domain.clock import Clock, LedgerTime
from ..domain.model import (
    Activation,
    ActivityOutcome,
    BatchOutcome,
    ContactAddOutcome,
    ContactState,
    EnrollOutcome,
    Invoice,
    Plan,
    PlanInput,
    SendOutcome,
    Usage,
    UsageEvent,
)
from ..ledger import Ledger
from ..metrics.board import UsageBoard
from . import activity, contacts, plans, reads, sends, upkeep
from .context import EngineContext
from .requests import ActivityRequest, BatchRequest, ContactAddRequest, Retention, SendRequest


class Engine:
    """Decides and counts. One per process; thread-safe."""

    def __init__(
        self,
        ledger: Ledger,
        clock: Clock,
        on_events: Callable[[Sequence[UsageEvent]], None] | None = None,
        *,
        unit_contacts: int | None = None,
    ) -> None:
        """`unit_contacts`: contacts per unit of a large call; the ledger's own by default."""
        self.context = EngineContext(ledger, clock, on_events, unit_contacts or ledger.unit_contacts)

    @property
    def ledger(self) -> Ledger:
        return self.context.ledger

    @property
    def clock(self) -> LedgerTime:
        return self.context.clock

    @property
    def board(self) -> UsageBoard:
        return self.context.board

    @property
    def unit_contacts(self) -> int:
        return self.context.unit_contacts

    # -- the data plane -------------------------------------------------------------------

    def check_send(self, req: SendRequest) -> SendOutcome:
        return sends.check_send(self.context, req)

    def check_send_batch(self, req: BatchRequest) -> BatchOutcome:
        return sends.check_send_batch(self.context, req)

    def check_contact_add(self, req: ContactAddRequest) -> ContactAddOutcome:
        """May these contacts be added through this source (AC-2..AC-5)? All or nothing."""
        return contacts.check_contact_add(self.context, req)

    def check_enroll(self, tenant_id: str, contact_id: str, automation_id: str = "") -> EnrollOutcome:
        """May this contact enter an automation now (AC-8 with AC-7's grace)? Counts nothing."""
        return sends.check_enroll(self.context, tenant_id, contact_id, automation_id)

    def record_activity(self, req: ActivityRequest) -> ActivityOutcome:
        return activity.record_activity(self.context, req)

    def get_usage(self, tenant_id: str, at_us: int | None = None) -> Usage:
        return reads.get_usage(self.context, tenant_id, at_us)

    def get_invoice(self, tenant_id: str, at_us: int | None = None) -> Invoice:
        """The cycle's billable figures (CR-6, CR-7)."""
        return reads.get_invoice(self.context, tenant_id, at_us)

    # -- the control plane ----------------------------------------------------------------

    def put_plan(self, tenant_id: str, given: PlanInput) -> tuple[Plan, Usage]:
        return plans.put_plan(self.context, tenant_id, given)

    def get_plan(self, tenant_id: str) -> Plan:
        return reads.get_plan(self.context, tenant_id)

    def get_contact(self, tenant_id: str, contact_id: str) -> ContactState:
        return reads.get_contact(self.context, tenant_id, contact_id)

    def list_active_contacts(
        self, tenant_id: str, at_us: int | None, page_size: int, page_token: str
    ) -> tuple[list[Activation], str]:
        """The contacts behind the cycle's metered figure, a page at a time."""
        return reads.list_active_contacts(self.context, tenant_id, at_us, page_size, page_token)

    def usage_events(self, tenant_id: str, after_seq: int, limit: int) -> list[UsageEvent]:
        """Outbox events after `after_seq` in order, one tenant's or (tenant_id "") all."""
        return reads.usage_events(self.context, tenant_id, after_seq, limit)

    def tenant_usages(self, chunk_tenants: int = 500) -> Iterator[Usage]:
        """The current usage of every tenant with a plan, read `chunk_tenants` at a time."""
        return reads.tenant_usages(self.context, chunk_tenants)

    # -- upkeep ---------------------------------------------------------------------------

    def send_reminders(self, pause: Callable[[], bool] = lambda: False) -> list[UsageEvent]:
        """Writes the reminders due (AC-1) and re-arms thresholds of tenants whose cycle
        has turned; `pause` may wait before each transaction and says whether to stop."""
        return upkeep.send_reminders(self.context, pause)

    def prune(self, retention: Retention, consumers: Sequence[str] = ()) -> dict[str, int]:
        """Deletes what is older than its retention; returns the rows deleted of each kind."""
        return upkeep.prune(self.context, retention, consumers)
