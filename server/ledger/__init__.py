"""The ledger: the durable record behind every figure, behind one small interface.

The engine reads through a `LedgerReader` and writes through a `LedgerTx`
handed to it by `Ledger.transact`. A backend is built by the factory
(`factory.open_ledger`) from a URL; its own options it reads and checks itself
(`LedgerOptions.backend`, `LedgerOptionError`), and its own figures it exposes
through `Ledger.collector()`. The SQLite backend (`sqlite/`) is the embedded
default; every backend must pass the same contract tests
(tests/ledger/test_ledger_contract.py).

Concurrency contract, what a unit of work (the function given to `transact`) may
assume:
- It runs in one transaction, isolated from every other unit: it sees its own
  writes and the committed state, and no other unit's uncommitted writes. The
  figures it reads stay as it read them until it ends (a backend serialises the
  units that write about the same tenant, e.g. SQLite by one writer).
- `transact` returns only once the unit's transaction is durably committed, so a
  decision is acknowledged only after its effects are stored. Several callers'
  units may share one transaction (group commit): a unit that raises leaves no
  trace and fails alone; a failed commit fails every unit in it with
  `LedgerUnavailable`.
- A unit may be run more than once (a backend may retry it after a serialisation
  failure or a conflict, as a backend shared by several sidecars must), and a run
  that is rolled back leaves nothing. So a unit has no effect outside its
  transaction: whatever must happen once it is committed (waking the outbox,
  updating in-memory figures) goes through `LedgerTx.after_commit`, which runs
  once, in commit order, before the caller is answered, and never for a run that
  did not commit.
- A unit is not started once its `deadline` has passed: the caller has been told
  DEADLINE_EXCEEDED, so nothing is decided for it (`DeadlineExceeded`).
- A unit may say, before its first read of a tenant, what it will read of it
  (`LedgerTx.read_ahead`). That changes no answer: a backend may fetch those rows
  at once, as it takes the tenant, and answer the unit's reads of exactly them from
  what it fetched, until the unit writes what they show; it answers every other read
  from the store, and keeps nothing so fetched past the transaction. A backend whose
  reads cost no round trip ignores it.
- A write may take effect in the store later than the call that asks for it, but
  before the unit's next read and before its commit: the unit sees its own writes,
  and a write the store refuses fails the unit then, at the latest at its commit.

What a backend may cache, and why: the SQLite backend is the only writer of its
file (an exclusive flock keeps any other sidecar off it), so its writer keeps
rows only it writes (plans, cycle figures, cycle keys, activity codes, usage
contexts) and a bloom filter per tenant cycle of the contacts already active,
and these stay true between transactions only because no one else writes. A
backend that several sidecars write to at once must not keep such answers
between transactions; at most it keeps answers another writer cannot make false.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from prometheus_client.registry import Collector

from ..domain.errors import DeadlineExceeded, QuotaError
from ..domain.model import (
    Activation,
    AuditEntry,
    ContactRecord,
    Counters,
    HeldSpan,
    Holdings,
    NoticeState,
    Reanchor,
    StoredPlan,
    StoredResult,
    UsageEvent,
    UsageFigure,
)


@dataclass(frozen=True, slots=True)
class Lease:
    """A named lease as the store keeps it: its holder and when it expires (microseconds
    on the store's clock, which `now_us` read in the same transaction)."""

    holder: str
    expires_us: int
    now_us: int

    @property
    def live(self) -> bool:
        return self.expires_us > self.now_us


T = TypeVar("T")
log = logging.getLogger("quota_sidecar.ledger")
A = TypeVar("A")
# Told of each commit: its seconds (0 when it failed), how many units it held, whether it succeeded.
CommitObserver = Callable[[float, int, bool], None]

# What every backend keeps of a contact's held spans (`held_spans`): those that ended longer
# ago than this are dropped when the contact next changes (thirteen monthly invoices and
# more), and at most this many of its latest spans of each kind, however often a caller
# deletes and adds it again.
HELD_SPANS_KEPT_US = 400 * 86_400 * 1_000_000
HELD_SPANS_PER_CONTACT = 64


class LedgerReader(Protocol):
    def plan(self, tenant_id: str) -> StoredPlan | None: ...

    def plan_at(self, tenant_id: str, before_us: int) -> StoredPlan | None:
        """The plan stored last before `before_us` (the one in force at that instant)."""

    def reanchors_around(self, tenant_id: str, instant_us: int) -> tuple[int | None, Reanchor | None]:
        """The instant of the tenant's last re-anchor at or before `instant_us` (None if
        none) and its first re-anchor after it (None if none)."""

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

    def held_spans(
        self,
        tenant_id: str,
        marketing_only: bool,
        start_us: int,
        end_us: int,
        after: tuple[str, int],
        limit: int,
        contact_id: str | None = None,
    ) -> list[HeldSpan]:
        """The spans in which contacts counted under HELD_CONTACTS (held; marketing and held
        when `marketing_only`) that overlap [start_us, end_us), ordered by contact id and
        start, strictly after `after` (contact id, start); one contact's when `contact_id`."""

    def stored_result(self, tenant_id: str, rpc: str, request_id: str) -> StoredResult | None: ...

    def tenants(self) -> list[str]:
        """Every tenant with a plan."""

    def file_entry(self, tenant_id: str) -> str | None:
        """The digest of the tenant's `--tenants` file entry as last applied (None: never)."""

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

    def lease(self, name: str) -> Lease | None:
        """Who holds (or last held) the named lease and until when (None: never taken)."""


@dataclass(frozen=True, slots=True)
class ReadAhead:
    """What a unit will read of one tenant (`LedgerTx.read_ahead`): its plan and notice
    states, and, in the cycle starting at `cycle_start_us` (None: not known yet), its
    figures and which of `contact_ids` are active; and the stored result of `result`
    (an rpc and a request_id), if any."""

    cycle_start_us: int | None = None
    contact_ids: Sequence[str] = ()
    result: tuple[str, str] | None = None


class LedgerTx(LedgerReader, Protocol):
    def read_ahead(self, tenant_id: str, ahead: ReadAhead) -> None:
        """What the unit will read of the tenant, told before its first read of it: a hint
        that changes no answer (see the concurrency contract)."""

    def put_plan(self, tenant_id: str, plan_json: str, at_us: int) -> None:
        """Stores the tenant's plan and keeps it as the version in force from `at_us`
        (a plan equal to the one already in force adds no version)."""

    def put_reanchor(self, tenant_id: str, reanchor: Reanchor) -> None:
        """Keeps a re-anchor; a second one at the same instant keeps the first's
        `anchor_before_us`, the anchor of the cycle that closed then."""

    def put_file_entry(self, tenant_id: str, digest: str, at_us: int) -> None:
        """Remembers the digest of the tenant's `--tenants` file entry just applied."""

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

    def store_result(self, tenant_id: str, rpc: str, request_id: str, result: StoredResult, at_us: int) -> None:
        """Keeps a packed answer (with its usage context) for retries of the request_id."""

    def prune_results(self, before_us: int, limit: int) -> int:
        """Deletes up to `limit` answers kept since before `before_us`, oldest first, and
        then the usage contexts no answer kept takes; returns how many answers."""

    def prune_events(self, before_us: int, through_seq: int, limit: int) -> int:
        """Deletes up to `limit` outbox events written before `before_us` with a
        sequence at most `through_seq`, oldest first; returns how many."""

    def prune_audit(self, before_us: int, limit: int) -> int:
        """Deletes up to `limit` audit rows written before `before_us`, oldest first; returns how many."""

    def audit(self, entries: Iterable[AuditEntry]) -> None: ...

    def put_notice(self, tenant_id: str, figure: UsageFigure, state: NoticeState) -> None: ...

    def add_event(self, event: UsageEvent) -> int:
        """Appends an event to the outbox; returns its sequence."""

    def put_event_cursor(self, consumer: str, seq: int) -> None:
        """Moves a consumer's delivered position forward (never back)."""

    def take_lease(self, name: str, holder: str, ttl_us: int) -> bool:
        """Takes the named lease for `holder` for `ttl_us` from now, or renews it, when it is
        free, has expired, or is `holder`'s already; returns whether `holder` holds it now.
        Several sidecars writing one store hold it one at a time (the webhook's delivery,
        the reminder sweep), on the store's own clock so that theirs need not agree; the
        only writer of its store holds it whenever it asks (a previous holder is a process
        that is gone)."""

    def release_lease(self, name: str, holder: str) -> None:
        """Lets the named lease go if `holder` holds it, so another may take it at once: it
        expires now, and the store keeps who held it last and when it ended."""

    def note_time(self, at_us: int) -> None:
        """The unit decided at `at_us`: once a unit that wrote commits, the ledger's time
        is at least that, across restarts too."""

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Runs `callback` once this unit's transaction is committed, in commit order,
        before the caller is answered; never if the unit or the commit fails."""


class Ledger(ABC):
    """A durable store of plans, contacts, activations, figures, results and audit."""

    #: Contacts per unit of a large call (`EngineContext.in_units`): until a unit
    #: commits, it holds what other calls may wait for (on PostgreSQL, its tenant's lock).
    unit_contacts = 500

    @abstractmethod
    def open(self) -> None:
        """Creates or migrates the schema and makes the ledger ready for work."""

    @abstractmethod
    def close(self) -> None:
        """Finishes pending work, commits it and releases the store."""

    @abstractmethod
    def transact(self, work: Callable[[LedgerTx], T], *, weight: int = 1, deadline: float | None = None) -> T:
        """Runs `work` in a write transaction; returns once it is durably committed.
        `weight` is about how many contacts (or tenants) it writes about: a backend
        that groups units keeps heavy ones from holding light ones back. `deadline`
        (a `time.monotonic()` instant): `work` is not started at or after it, and the
        call raises DeadlineExceeded (`by_deadline`)."""

    def transact_units(
        self, units: Sequence[Callable[[LedgerTx], T]], *, weights: Sequence[int], deadline: float | None = None
    ) -> list[T]:
        """Runs `units` in order, each atomically, and returns their answers once every one
        is durably committed (`transact`, with each its `weights` entry). When one fails,
        those after it are not run and the call raises; those before it may be committed.
        Here each unit is a transaction of its own."""
        pairs = zip(units, weights, strict=True)
        return [self.transact(unit, weight=weight, deadline=deadline) for unit, weight in pairs]

    @abstractmethod
    def read(self, work: Callable[[LedgerReader], T]) -> T:
        """Runs `work` against a consistent snapshot of committed state."""

    @property
    @abstractmethod
    def time_us(self) -> int:
        """Ledger time: the latest instant noted by a committed unit that wrote (0 before any)."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True once open (and any in-memory accelerator loaded) and not failing."""

    @property
    def loading(self) -> bool:
        """Whether something the backend loads in the background after `open` (an
        in-memory accelerator) is still loading; answers are exact meanwhile."""
        return False

    @property
    def sole_writer(self) -> bool:
        """Whether this ledger is the only writer of its store. Only then may a caller keep
        what it read past its transaction (the engine's notice states): with other
        writers, another sidecar may have changed it since."""
        return False

    def collector(self) -> Collector | None:
        """The backend's own figures, read at scrape time (None when it has none)."""
        return None


def by_deadline(work: Callable[[A], T], deadline: float | None) -> Callable[[A], T]:
    """`work`, refusing to start at or after `deadline` (a `time.monotonic()` instant)."""
    if deadline is None:
        return work

    def guarded(arg: A) -> T:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed while the call waited for the ledger; nothing was done")
        return work(arg)

    return guarded


class HeldLease:
    """One named lease of the ledger as this sidecar holds it (`LedgerTx.take_lease`), for
    `ttl_s` seconds at a time. `hold()` takes or renews it and says whether it is held; it
    asks the ledger only once a third of that time has passed since the last renewal (a
    lease renewed since has two thirds of its time left), so callers may ask before every
    piece of work. A ledger that cannot be reached holds nothing. `release()` lets it go."""

    def __init__(self, ledger: Ledger, name: str, holder: str, ttl_s: float) -> None:
        self.ledger = ledger
        self.name = name
        self.holder = holder
        self.ttl_s = ttl_s
        self.held = False
        self._renewed = 0.0

    def hold(self) -> bool:
        now = time.monotonic()
        if self.held and now - self._renewed < self.ttl_s / 3:
            return True
        ttl_us = round(self.ttl_s * 1_000_000)
        try:
            held = self.ledger.transact(lambda tx: tx.take_lease(self.name, self.holder, ttl_us))
        except QuotaError as exc:
            log.warning("the %s lease cannot be renewed: %s", self.name, exc)
            held = False
        if held != self.held:
            log.info("the %s lease is %s", self.name, "held by this sidecar" if held else "held by another sidecar")
        self.held, self._renewed = held, now
        return held

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            self.ledger.transact(lambda tx: tx.release_lease(self.name, self.holder))
        except QuotaError as exc:
            log.warning("the %s lease was not let go (%s); it lapses by itself", self.name, exc)


@dataclass(frozen=True)
class LedgerOptions:
    """What a backend is built with besides its URL: hooks every backend calls, and the
    backend's own settings by setting name (`backend`), which it reads and checks."""

    on_commit: CommitObserver | None = None
    on_ready: Callable[[bool], None] | None = None
    # Seconds between attempts to write while commits fail.
    check_interval: float = 0.5
    backend: Mapping[str, object] = field(default_factory=dict)


class LedgerOptionError(ValueError):
    """A ledger URL or backend option refused, with the setting it came from (`option`)."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option = option
        self.problem = problem
