"""The ledger: the durable record behind every figure, behind one small interface.

The engine reads through a `LedgerReader` and writes through a `LedgerTx`
handed to it by `Ledger.transact`. A backend runs each unit of work inside a
transaction and returns only once that transaction is durably committed, so a
decision is acknowledged only after its effects are on disk. Backends may run
several callers' units in one transaction (group commit) as long as each unit
is isolated: a unit that raises leaves no trace, and a failed commit fails every
unit in it with `LedgerUnavailable`.

The SQLite backend (`sqlite.py`) is the embedded default; every backend must
pass the same contract tests (tests/test_ledger_contract.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

from ..model import (
    Activation,
    AuditEntry,
    ContactRecord,
    Counters,
    Holdings,
    NoticeState,
    StoredPlan,
    StoredResult,
    UsageEvent,
    UsageFigure,
)

T = TypeVar("T")


class LedgerReader(Protocol):
    def plan(self, tenant_id: str) -> StoredPlan | None: ...

    def plan_at(self, tenant_id: str, before_us: int) -> StoredPlan | None:
        """The plan stored last before `before_us` (the one in force at that instant)."""

    def counters(self, tenant_id: str, cycle_start_us: int) -> Counters: ...

    def holdings(self, tenant_id: str) -> Holdings | None: ...

    def activation(self, tenant_id: str, cycle_start_us: int, contact_id: str) -> Activation | None: ...

    def active_among(self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> set[str]:
        """Which of these contacts (no repeats) are active in the cycle."""

    def contact(self, tenant_id: str, contact_id: str) -> ContactRecord | None: ...

    def active_contacts(
        self, tenant_id: str, cycle_start_us: int, after_contact_id: str, limit: int
    ) -> list[Activation]:
        """Activations of the cycle ordered by contact id, strictly after `after_contact_id`."""

    def counted_contacts(
        self, tenant_id: str, marketing_only: bool, at_us: int, after_contact_id: str, limit: int
    ) -> list[ContactRecord]:
        """Held contacts (marketing ones at `at_us` when `marketing_only`) ordered by
        contact id, strictly after `after_contact_id`."""

    def stored_result(self, tenant_id: str, rpc: str, request_id: str) -> StoredResult | None: ...

    def tenants(self) -> list[str]:
        """Every tenant with a plan."""

    def notice(self, tenant_id: str, figure: UsageFigure) -> NoticeState | None: ...

    def raised_notices(self) -> list[tuple[str, UsageFigure, NoticeState]]:
        """Every notice state above level 0 (the figures reminders may be due for)."""

    def events_after(self, after_seq: int, tenant_id: str, limit: int) -> list[UsageEvent]:
        """Usage events with a sequence above `after_seq` in order (one tenant's when
        `tenant_id` is not empty)."""

    def event_cursor(self, consumer: str) -> int:
        """The sequence a consumer has delivered up to (0 for none)."""

    def pending_events(self, after_seq: int) -> tuple[int, int | None]:
        """How many events lie beyond `after_seq`, and the instant of the oldest."""

    def last_event_seq(self) -> int: ...


class LedgerTx(LedgerReader, Protocol):
    def put_plan(self, tenant_id: str, plan_json: str, at_us: int) -> None:
        """Stores the tenant's plan and keeps it as the version in force from `at_us`
        (a plan equal to the one already in force adds no version)."""

    def put_holdings(self, tenant_id: str, holdings: Holdings) -> None: ...

    def record_held(self, tenant_id: str, cycle_start_us: int, held: int, marketing: int) -> None:
        """Sets the cycle's end counts and raises its peaks to them if higher."""

    def switch_marketing(self, tenant_id: str, due_us: int) -> int:
        """Makes non-marketing every contact whose pending switch (MK-6) is due by
        `due_us`; returns how many."""

    def reschedule_marketing(self, tenant_id: str, until_us: int) -> None:
        """Moves every pending MK-6 switch of the tenant to `until_us` (a new cycle end)."""

    def count_sends(self, tenant_id: str, cycle_start_us: int, sends: int) -> None:
        """Adds sends to the cycle's figure without touching any contact (HELD_CONTACTS)."""

    def activate(self, tenant_id: str, cycle_start_us: int, activations: Sequence[Activation]) -> None:
        """Marks contacts active in the cycle (none may be active already) and
        raises the cycle's active count and sends by their figures."""

    def add_sends(self, tenant_id: str, cycle_start_us: int, contact_id: str, sends: int) -> None:
        """Adds sends to a contact already active in the cycle, and to the cycle's figure."""

    def send_to_new(
        self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str], at_us: int, activity: str
    ) -> None:
        """Marks contacts (no repeats, none active in the cycle) active at `at_us` by one
        send of `activity` each, and raises the cycle's active count and sends by as many."""

    def send_to_active(self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> None:
        """Adds one send to each of these contacts (no repeats, all active in the cycle)
        and as many to the cycle's figure."""

    def put_contacts(self, tenant_id: str, contacts: Iterable[ContactRecord], at_us: int) -> None: ...

    def store_result(
        self, tenant_id: str, rpc: str, request_id: str, cycle_start_us: int, result: StoredResult, at_us: int
    ) -> None: ...

    def audit(self, entries: Iterable[AuditEntry]) -> None: ...

    def put_notice(self, tenant_id: str, figure: UsageFigure, state: NoticeState) -> None: ...

    def add_event(self, event: UsageEvent) -> int:
        """Appends an event to the outbox; returns its sequence."""

    def put_event_cursor(self, consumer: str, seq: int) -> None:
        """Moves a consumer's delivered position forward (never back)."""

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Runs `callback` once this unit's transaction is committed, in commit order,
        before the caller is answered; never if the unit or the commit fails."""


class Ledger(ABC):
    """A durable store of plans, contacts, activations, figures, results and audit."""

    @abstractmethod
    def open(self) -> None:
        """Creates or migrates the schema and makes the ledger ready for work."""

    @abstractmethod
    def close(self) -> None:
        """Finishes pending work, commits it and releases the store."""

    @abstractmethod
    def transact(self, work: Callable[[LedgerTx], T], *, weight: int = 1) -> T:
        """Runs `work` in a write transaction; returns once it is durably committed.
        `weight` is about how many contacts (or tenants) it writes about: a backend
        that groups units keeps heavy ones from holding light ones back."""

    @abstractmethod
    def read(self, work: Callable[[LedgerReader], T]) -> T:
        """Runs `work` against a consistent snapshot of committed state."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True once open (and any in-memory accelerator loaded) and not failing."""


def open_ledger(url: str, **options: object) -> Ledger:
    """A ledger for a `--ledger` URL: `sqlite:///path`, or a bare file path."""
    from .sqlite import SQLiteLedger, sqlite_path

    path = sqlite_path(url)
    return SQLiteLedger(path, **options)  # type: ignore[arg-type]
