"""The decision engine: plain values in, decisions and figures out.

It imports nothing from grpc and reads time only from the injected clock, as
ledger time (`LedgerTime`: never earlier than a decision already committed).
Every decision that counts runs inside one ledger transaction (`Ledger.transact`),
so the decision and its counting are atomic and durable before the caller
hears the answer; dry runs read committed state through an in-memory overlay
that keeps what they would have written and throws it away.

Two meterings: CYCLE_ACTIVE counts contacts activated in the cycle (per-cycle
activations); HELD_CONTACTS counts the contacts a tenant holds (model 4: held
and marketing), a state carried from cycle to cycle (`Holdings`, rolled into a
new cycle by the first change in it, `_roll`) with each cycle's end and peak
kept for invoices. `tally_of` gives either as one `Tally`; enforcement (`ceiling`,
`_Limits`, `_held_block`) and the figures (`usage_of`, `invoice_lines`) read it.
Presets are expanded before validation (presets.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from functools import cache, partial
from typing import Any, TypeVar

from ..domain.clock import MICROS, Clock, LedgerTime
from ..domain.cycles import Cycle, cycle_within, same_boundaries
from ..domain.errors import InvalidArgument, NotFound
from ..domain.model import (
    DEFAULT_MAX_QUEUE_US,
    Activation,
    ActivityKind,
    ActivityOutcome,
    AuditEntry,
    BatchOutcome,
    BillingInterval,
    Channel,
    ContactAddOutcome,
    ContactRecord,
    ContactSource,
    ContactState,
    Counters,
    Decision,
    Enforcement,
    EnrollOutcome,
    Holdings,
    Invoice,
    InvoiceLine,
    MessageKind,
    Metering,
    NoticeState,
    OverlayState,
    Plan,
    PlanInput,
    Reanchor,
    Reason,
    SendDecision,
    SendOutcome,
    SourcePolicy,
    StoredPlan,
    StoredResult,
    Usage,
    UsageContext,
    UsageEvent,
    UsageFigure,
    UsageState,
    money,
)
from ..domain.notices import evaluate, level_of, ratio_of, settled
from ..domain.presets import apply_preset
from ..ledger import Ledger, LedgerReader, LedgerTx
from ..metrics.board import UsageBoard
from . import replies
from .deadline import call_deadline

MAX_ID_BYTES = 256
MAX_BATCH = 10_000
MAX_ACTIVITY_CONTACTS = 100_000
MAX_PAGE_SIZE = 1_000
# Rows one pruning transaction deletes at most: a short unit between decisions.
PRUNE_ROWS = 1_000
DAY_US = 86_400 * MICROS
# Bytes of the request's hash kept with its answer: a retry with the same id must match them.
FINGERPRINT_BYTES = 8
# Each threshold a change crosses writes an event in the deciding call's transaction.
MAX_NOTIFY_THRESHOLDS = 10
# Figures travel as int64 on the wire and in the ledger.
MAX_FIGURE = 2**63 - 1
# Amounts are exact decimals of at most 28 digits (the decimal context): a price this
# size leaves room for billions of overage contacts.
MAX_PRICE = Decimal(10) ** 12
PRICE_STEP = Decimal("0.000001")
DEFAULT_PAGE_SIZE = 100
FUTURE_SKEW_US = 5 * 60 * MICROS
DEFER_POLL_US = 5 * 60 * MICROS
MAX_GAP_CYCLES = 1_200
# A CheckSendBatch or RecordActivity over more distinct contacts than this is decided
# and committed this many at a time, so one large call never holds the single writer
# for long; the reminder sweep writes this many tenants per transaction.
UNIT_CONTACTS = 500
REMINDER_TENANTS = 16
# What one tenant's reminder costs the writer, in contacts (the unit's weight).
TENANT_WEIGHT = 32
T = TypeVar("T")
CONTACT_KINDS = frozenset(
    {ActivityKind.CONTACT_CREATED, ActivityKind.CONTACT_DELETED, ActivityKind.MARKETING_STATUS_SET}
)


@dataclass(frozen=True, slots=True)
class SendRequest:
    tenant_id: str
    contact_id: str
    channel: Channel | None
    kind: MessageKind | None
    queued_since_us: int | None = None
    dry_run: bool = False
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class BatchRequest:
    tenant_id: str
    channel: Channel | None
    kind: MessageKind | None
    contact_ids: Sequence[str]
    dry_run: bool = False
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class ActivityRequest:
    tenant_id: str
    kind: ActivityKind | None
    contact_ids: Sequence[str]
    occurred_at_us: int | None = None
    marketing: bool = False
    source_type: str = ""
    source_id: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class ContactAddRequest:
    tenant_id: str
    source: ContactSource | None
    contact_ids: Sequence[str]
    dry_run: bool = False
    marketing: bool | None = None
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Retention:
    """How long the ledger keeps what no figure is computed from: answers kept for
    retries of a request_id, outbox events (once delivered) and audit rows."""

    requests_us: int = DAY_US
    events_us: int = 7 * DAY_US
    audit_us: int = 90 * DAY_US


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


def check_id(field: str, value: str, *, required: bool = True) -> None:
    """Ids are opaque non-empty strings of at most 256 UTF-8 bytes, without NUL."""
    if not value:
        if required:
            raise InvalidArgument(field, "must not be empty")
        return
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise InvalidArgument(field, f"must be at most {MAX_ID_BYTES} bytes")
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL")


def _check_ids(field: str, ids: Sequence[str], maximum: int) -> None:
    if not ids:
        raise InvalidArgument(field, "must list at least one contact")
    if len(ids) > maximum:
        raise InvalidArgument(field, f"lists {len(ids)} contacts; at most {maximum:,} per call")
    if "" not in ids and max(map(len, ids)) <= MAX_ID_BYTES // 4 and "\x00" not in "".join(ids):
        return
    for i, contact_id in enumerate(ids):
        check_id(f"{field}[{i}]", contact_id)


def _required(field: str, value: object) -> None:
    if value is None:
        raise InvalidArgument(field, "is required")


def _fingerprint(*parts: object) -> bytes:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()


def validate_plan(tenant_id: str, given: PlanInput) -> PlanInput:
    """The plan with its preset applied; rejects one that is negative or contradictory, naming the field."""
    check_id("tenant_id", tenant_id)
    given = apply_preset(given)
    _required("plan.metering", given.metering)
    _required("plan.enforcement", given.enforcement)
    if len(given.plan_name.encode()) > MAX_ID_BYTES:
        raise InvalidArgument("plan.plan_name", f"must be at most {MAX_ID_BYTES} bytes")
    for field in ("contact_limit", "addon_contacts", "sends_limit"):
        if getattr(given, field) < 0:
            raise InvalidArgument(f"plan.{field}", "must not be negative")
    if given.contact_limit + given.addon_contacts <= 0:
        raise InvalidArgument("plan.contact_limit", "the limit (contact_limit + addon_contacts) must be positive")
    if given.contact_limit + given.addon_contacts > MAX_FIGURE:
        raise InvalidArgument("plan.contact_limit", f"the limit (contact_limit + addon_contacts) exceeds {MAX_FIGURE}")
    if given.sends_per_contact * (given.contact_limit + given.addon_contacts) > MAX_FIGURE:
        raise InvalidArgument("plan.sends_per_contact", f"times the limit, the sends allowance exceeds {MAX_FIGURE}")
    if given.grace_percent > 100:
        raise InvalidArgument("plan.grace_percent", "must be at most 100")
    if given.grace_percent and given.enforcement is not Enforcement.GRACE:
        raise InvalidArgument("plan.grace_percent", "applies only under GRACE enforcement")
    if given.marketing_contacts_only and given.metering is not Metering.HELD_CONTACTS:
        raise InvalidArgument("plan.marketing_contacts_only", "applies only to HELD_CONTACTS metering")
    if given.counted_activities and given.metering is not Metering.CYCLE_ACTIVE:
        raise InvalidArgument(
            "plan.counted_activities", "applies only to CYCLE_ACTIVE metering; held contacts count by being held"
        )
    if given.sends_limit and given.sends_per_contact:
        raise InvalidArgument("plan.sends_per_contact", "give either sends_limit or sends_per_contact, not both")
    if given.overage_unit_price:
        try:
            price = Decimal(given.overage_unit_price)
        except InvalidOperation:
            raise InvalidArgument("plan.overage_unit_price", "must be a decimal number such as 0.25") from None
        if not price.is_finite() or price < 0:
            raise InvalidArgument("plan.overage_unit_price", "must be a non-negative decimal")
        if price >= MAX_PRICE or price != price.quantize(PRICE_STEP):
            raise InvalidArgument("plan.overage_unit_price", "must be below 10^12 with at most 6 decimal places")
        if not given.currency:
            raise InvalidArgument("plan.currency", "is required with overage_unit_price")
    if given.currency and not (
        len(given.currency) == 3 and given.currency.isascii() and given.currency.isalpha() and given.currency.isupper()
    ):
        raise InvalidArgument("plan.currency", "must be an ISO 4217 code such as EUR")
    if given.metering is Metering.CYCLE_ACTIVE and not given.counted_kinds and not given.counted_activities:
        raise InvalidArgument(
            "plan.counted_kinds", "a CYCLE_ACTIVE plan must count at least one message kind or activity"
        )
    for name in ("max_queue_us", "renotify_interval_us"):
        value = getattr(given, name)
        if value is not None and value < 0:
            raise InvalidArgument(f"plan.{name.removesuffix('_us')}", "must not be negative")
    if len(given.notify_thresholds) > MAX_NOTIFY_THRESHOLDS:
        raise InvalidArgument(
            "plan.notify_thresholds",
            f"lists {len(given.notify_thresholds)} thresholds; at most {MAX_NOTIFY_THRESHOLDS}",
        )
    for t in given.notify_thresholds:
        if not (0 < t <= 1):
            raise InvalidArgument(
                "plan.notify_thresholds", "each threshold is a ratio of the limit in (0, 1], e.g. 0.8"
            )
    sources = [s for s, _ in given.source_rules]
    if len(sources) != len(set(sources)):
        raise InvalidArgument("plan.source_rules", "names a source more than once")
    return given


def state_of(plan: Plan, count: int, sends: int) -> UsageState:
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
    over = replies.overage_contacts(tally.peak, limit)
    amount = money(Decimal(plan.overage_unit_price or "0") * over) if over else NO_MONEY
    return Usage(
        tenant_id=tenant_id,
        cycle_start_us=cycle.start_us,
        cycle_end_us=cycle.end_us,
        active_contacts=count,
        contact_limit=limit,
        usage_ratio=replies.usage_ratio(count, limit),
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


def cycle_of(view: LedgerReader, tenant_id: str, plan: Plan, instant_us: int) -> Cycle:
    """The tenant's cycle containing `instant_us`, `plan` being its current plan (SG-7).

    Every re-anchor closed the cycle running then and started the next one at that
    instant, so an instant before the current anchor began (`Plan.anchored_at_us`) lies
    in a cycle of the anchor then in force, cut short by the re-anchor that followed it
    (the ledger's re-anchors). The current cycle costs no read."""
    if plan.anchored_at_us is None or instant_us >= plan.anchored_at_us:
        return cycle_within(plan.cycle_anchor_us, instant_us, plan.anchored_at_us, None)
    since, after = view.reanchors_around(tenant_id, instant_us)
    if after is None:
        return cycle_within(plan.cycle_anchor_us, instant_us, since, plan.anchored_at_us)
    return cycle_within(after.anchor_before_us, instant_us, since, after.at_us)


class _Overlay:
    """A dry run's view: committed state plus what the run would have written."""

    def __init__(self, base: LedgerReader) -> None:
        self.base = base
        self.state = OverlayState()

    def plan(self, tenant_id: str) -> StoredPlan | None:
        return self.base.plan(tenant_id)

    def plan_at(self, tenant_id: str, before_us: int) -> StoredPlan | None:
        return self.base.plan_at(tenant_id, before_us)

    def reanchors_around(self, tenant_id: str, instant_us: int) -> tuple[int | None, Reanchor | None]:
        return self.base.reanchors_around(tenant_id, instant_us)

    def holdings(self, tenant_id: str) -> Holdings | None:
        return self.base.holdings(tenant_id)

    def counted_contacts(
        self, tenant_id: str, marketing_only: bool, at_us: int, after_contact_id: str, limit: int
    ) -> list[ContactRecord]:
        return self.base.counted_contacts(tenant_id, marketing_only, at_us, after_contact_id, limit)

    def stored_result(self, tenant_id: str, rpc: str, request_id: str) -> StoredResult | None:
        return None

    def counters(self, tenant_id: str, cycle_start_us: int) -> Counters:
        found = self.state.counters.get((tenant_id, cycle_start_us))
        return found if found is not None else self.base.counters(tenant_id, cycle_start_us)

    def activation(self, tenant_id: str, cycle_start_us: int, contact_id: str) -> Activation | None:
        found = self.state.activations.get((tenant_id, cycle_start_us, contact_id))
        return found if found is not None else self.base.activation(tenant_id, cycle_start_us, contact_id)

    def contact(self, tenant_id: str, contact_id: str) -> ContactRecord | None:
        return self.base.contact(tenant_id, contact_id)

    def activate(self, tenant_id: str, cycle_start_us: int, activations: Sequence[Activation]) -> None:
        for a in activations:
            self.state.activations[(tenant_id, cycle_start_us, a.contact_id)] = a
        c = self.counters(tenant_id, cycle_start_us)
        self.state.counters[(tenant_id, cycle_start_us)] = replace(
            c, active_contacts=c.active_contacts + len(activations), sends=c.sends + sum(a.sends for a in activations)
        )

    def active_among(self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> set[str]:
        own = self.state.activations
        found = {c for c in contact_ids if (tenant_id, cycle_start_us, c) in own}
        rest = [c for c in contact_ids if c not in found]
        return found | self.base.active_among(tenant_id, cycle_start_us, rest)

    def add_sends(self, tenant_id: str, cycle_start_us: int, contact_id: str, sends: int) -> None:
        self.count_sends(tenant_id, cycle_start_us, sends)

    def send_to_new(
        self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str], at_us: int, activity: str
    ) -> None:
        self.activate(tenant_id, cycle_start_us, [Activation(c, at_us, activity, 1) for c in contact_ids])

    def send_to_active(self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> None:
        self.count_sends(tenant_id, cycle_start_us, len(contact_ids))

    def count_sends(self, tenant_id: str, cycle_start_us: int, sends: int) -> None:
        c = self.counters(tenant_id, cycle_start_us)
        self.state.counters[(tenant_id, cycle_start_us)] = replace(c, sends=c.sends + sends)

    def audit(self, entries: object) -> None:
        return None


def _legacy_decision(raw: list) -> SendDecision:
    return SendDecision(Decision(raw[0]), Reason(raw[1]), raw[2], raw[3])


NO_MONEY = replies.NO_MONEY
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


R = TypeVar("R")


class Engine:
    """Decides and counts. One per process; thread-safe."""

    def __init__(
        self,
        ledger: Ledger,
        clock: Clock,
        on_events: Callable[[Sequence[UsageEvent]], None] | None = None,
        *,
        unit_contacts: int = UNIT_CONTACTS,
    ) -> None:
        self.ledger = ledger
        self.clock = LedgerTime(clock, lambda: ledger.time_us)
        self.unit_contacts = unit_contacts
        self.board = UsageBoard()
        self.on_events = on_events
        self._plans: dict[str, tuple[str, Plan]] = {}
        self._notices: dict[tuple[str, UsageFigure], NoticeState] = {}

    def _transact(self, unit: Callable[[LedgerTx], R], *, weight: int = 1) -> R:
        """Runs `unit` in a ledger transaction that keeps the ledger time it decided at;
        `weight` as `Ledger.transact` takes it."""

        def timed(tx: LedgerTx) -> R:
            result = unit(tx)
            tx.note_time(self.clock.latest_us)
            return result

        return self.ledger.transact(timed, weight=weight, deadline=call_deadline())

    def _observe(
        self, tx: LedgerTx, plan: Plan, usage: Usage, now: int, *, rearm: bool = False, remind: bool = False
    ) -> list[UsageEvent]:
        """After a change to a tenant's figures, in its transaction: writes the events
        of thresholds crossed (or reminders due) to the outbox, and once committed puts
        the usage on the board. A figure whose notice state is settled costs no read."""
        tenant_id = usage.tenant_id
        events: list[UsageEvent] = []
        states: list[tuple[tuple[str, UsageFigure], NoticeState]] = []
        for figure in UsageFigure:
            ratio = ratio_of(usage, figure)
            key = (tenant_id, figure)
            known = self._notices.get(key)
            level = level_of(plan.notify_thresholds, ratio)
            if not rearm and not remind and settled(known, level, usage.cycle_start_us):
                continue
            stored = tx.notice(tenant_id, figure)
            state, notices = evaluate(
                plan.notify_thresholds,
                figure,
                ratio,
                usage.cycle_start_us,
                stored,
                now,
                rearm=rearm,
                renotify_us=plan.renotify_interval_us,
                remind=remind,
            )
            if state != stored and (stored is not None or state.level > 0):
                tx.put_notice(tenant_id, figure, state)
            states.append((key, state))
            for n in notices:
                event = UsageEvent(uuid.uuid4().hex, n.type, n.figure, tenant_id, n.threshold, now, usage)
                events.append(replace(event, sequence=tx.add_event(event)))

        def committed() -> None:
            self.board.put(usage)
            self._notices.update(states)
            if events and self.on_events is not None:
                self.on_events(events)

        tx.after_commit(committed)
        return events

    def send_reminders(self, pause: Callable[[], bool] = lambda: False) -> list[UsageEvent]:
        """Writes the reminders due (AC-1: every `renotify_interval` while a figure stays at
        or above a threshold) and re-arms thresholds of tenants whose cycle has turned.
        Run periodically by the sidecar, REMINDER_TENANTS tenants per transaction so the
        data plane's units commit in between. `pause` runs before each transaction: it may
        wait, leaving the writer to other calls, and says whether to stop (the tenants
        left get theirs at the next run). Returns the events written."""
        raised = self.ledger.read(lambda r: list(dict.fromkeys(t for t, _, _ in r.raised_notices())))

        def unit(tx: LedgerTx, tenants: list[str]) -> list[UsageEvent]:
            now = self.clock.now_us()
            written: list[UsageEvent] = []
            for tenant_id in tenants:
                plan = self._plan(tx, tenant_id)
                written += self._observe(tx, plan, usage_at(tx, plan, tenant_id, now), now, remind=True)
            return written

        written: list[UsageEvent] = []
        for start in range(0, len(raised), REMINDER_TENANTS):
            if pause():
                break
            tenants = raised[start : start + REMINDER_TENANTS]
            written += self._transact(partial(unit, tenants=tenants), weight=len(tenants) * TENANT_WEIGHT)
        return written

    def _in_units(self, contact_ids: Sequence[str], unit: Callable[..., T]) -> list[T]:
        """Commits `unit(tx, ids=, index=)` over the call's contacts: all in one unit, or
        its distinct contacts in request order, `unit_contacts` at a time, each unit
        committed before the next is decided; returns their answers."""
        unique = list(dict.fromkeys(contact_ids))
        size = self.unit_contacts
        parts = [contact_ids] if len(unique) <= size else [unique[i : i + size] for i in range(0, len(unique), size)]
        return [self._transact(partial(unit, ids=ids, index=i), weight=len(ids)) for i, ids in enumerate(parts)]

    def _plan(self, reader: LedgerReader, tenant_id: str) -> Plan:
        stored = reader.plan(tenant_id)
        if stored is None:
            raise NotFound(f"tenant {tenant_id!r} has no plan")
        cached = self._plans.get(tenant_id)
        if cached is not None and cached[0] == stored.plan_json:
            return cached[1]
        plan = Plan.from_json(stored.plan_json)
        self._plans[tenant_id] = (stored.plan_json, plan)
        return plan

    def _once(
        self,
        tx: LedgerTx,
        tenant_id: str,
        rpc: str,
        request_id: str,
        fingerprint: Callable[[], bytes],
        decide: Callable[[], Any],
        pack: Callable[[Any], tuple[bytes, UsageContext]],
        unpack: Callable[[bytes, UsageContext], object],
        legacy: Callable[[Any], object],
    ) -> object:
        """Runs `decide` once per request_id: a retry returns the first answer, counting nothing.
        The request's fingerprint is only computed when there is a request_id. An answer
        kept before the packed form (`legacy`, from its JSON) is answered until pruned. A
        call committed in units runs this once per unit, under `_unit_request_id`."""
        if request_id:
            stored = tx.stored_result(tenant_id, rpc, request_id)
            if stored is not None:
                if stored.fingerprint != fingerprint()[: len(stored.fingerprint)]:
                    raise InvalidArgument("request_id", f"was already used for a different {rpc} request")
                if stored.context is None:
                    return legacy(json.loads(stored.legacy_json))
                return unpack(stored.packed, stored.context)
        outcome = decide()
        if request_id:
            packed, context = pack(outcome)
            result = StoredResult(fingerprint()[:FINGERPRINT_BYTES], packed, context)
            tx.store_result(tenant_id, rpc, request_id, result, self.clock.now_us())
        return outcome

    # -- the data plane -------------------------------------------------------------------

    def check_send(self, req: SendRequest) -> SendOutcome:
        check_id("tenant_id", req.tenant_id)
        check_id("contact_id", req.contact_id)
        _required("channel", req.channel)
        _required("kind", req.kind)
        check_id("request_id", req.request_id, required=False)

        def decide(view: LedgerTx) -> SendOutcome:
            results, usage = self._decide_sends(
                view,
                req.tenant_id,
                req.kind,
                [req.contact_id],
                req.queued_since_us,
                "CheckSend",
                req.request_id,
                req.dry_run,
            )
            return SendOutcome(results[0][1], usage)

        if req.dry_run:
            return self.ledger.read(lambda r: decide(_Overlay(r)))  # type: ignore[arg-type]
        fingerprint = partial(_fingerprint, req.contact_id, req.channel, req.kind, req.queued_since_us)

        def unit(tx: LedgerTx) -> SendOutcome:
            return self._once(  # type: ignore[return-value]
                tx,
                req.tenant_id,
                "CheckSend",
                req.request_id,
                fingerprint,
                lambda: decide(tx),
                replies.pack_send,
                replies.unpack_send,
                lambda raw: SendOutcome(_legacy_decision(raw["d"]), Usage.from_dict(raw["u"])),
            )

        return self._transact(unit)

    def check_send_batch(self, req: BatchRequest) -> BatchOutcome:
        check_id("tenant_id", req.tenant_id)
        _required("channel", req.channel)
        _required("kind", req.kind)
        _check_ids("contact_ids", req.contact_ids, MAX_BATCH)
        check_id("request_id", req.request_id, required=False)

        def decide(view: LedgerTx, ids: Sequence[str]) -> BatchOutcome:
            results, usage = self._decide_sends(
                view, req.tenant_id, req.kind, ids, None, "CheckSendBatch", req.request_id, req.dry_run
            )
            return replies.batch_outcome(results, usage)

        if req.dry_run:
            return self.ledger.read(lambda r: decide(_Overlay(r), req.contact_ids))  # type: ignore[arg-type]
        # Computed once, though every unit of a large call compares or stores it.
        fingerprint = cache(partial(_fingerprint, list(req.contact_ids), req.channel, req.kind))

        def unit(tx: LedgerTx, ids: Sequence[str], index: int) -> BatchOutcome:
            return self._once(  # type: ignore[return-value]
                tx,
                req.tenant_id,
                "CheckSendBatch",
                _unit_request_id(req.request_id, index),
                fingerprint,
                lambda: decide(tx, ids),
                replies.pack_batch,
                partial(replies.unpack_batch, ids),
                lambda raw: BatchOutcome(
                    tuple((r[0], _legacy_decision(r[1:])) for r in raw["r"]),
                    raw["a"],
                    raw["d"],
                    raw["n"],
                    Usage.from_dict(raw["u"]),
                ),
            )

        answers = self._in_units(req.contact_ids, unit)
        if len(answers) == 1:
            return answers[0]
        first = {c: d for answer in answers for c, d in answer.results}
        return replies.batch_outcome(_in_request_order(req.contact_ids, first), answers[-1].usage)

    def _decide_sends(
        self,
        view: LedgerTx,
        tenant_id: str,
        kind: MessageKind,
        contact_ids: Sequence[str],
        queued_since_us: int | None,
        rpc: str,
        request_id: str,
        dry_run: bool,
    ) -> tuple[list[tuple[str, SendDecision]], Usage]:
        """Decides sends in order, each seeing the ones before it; a repeated id repeats
        its first decision and counts nothing more. Returns the decisions, the usage
        after them and the cycle they were counted in."""
        now = self.clock.now_us()
        plan = self._plan(view, tenant_id)
        cycle = cycle_of(view, tenant_id, plan, now)
        tally = tally_of(view, plan, tenant_id, cycle)
        unique = list(dict.fromkeys(contact_ids))
        limited = _Limits(plan, kind, queued_since_us, now, cycle)
        if not plan.counts_kind(kind):
            first = dict.fromkeys(unique, NOT_COUNTED)
        elif plan.metering is Metering.HELD_CONTACTS:
            first, tally = self._decide_held_sends(
                view, plan, tenant_id, cycle, unique, limited, tally, rpc, request_id
            )
        else:
            first, tally = self._decide_active_sends(view, plan, tenant_id, cycle, unique, kind, limited, now, tally)
        results = _in_request_order(contact_ids, first)
        usage = usage_of(tenant_id, plan, cycle, tally)
        if not dry_run:
            self._observe(view, plan, usage, now)
        return results, usage

    def _decide_active_sends(
        self,
        view: LedgerTx,
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
                first[c] = limited(self._limit_reason(plan))
            elif sends_limit is not None and sends >= sends_limit:
                first[c] = limited(Reason.SENDS_LIMIT_REACHED)
            else:
                fresh.append(c)
                count += 1
                sends += 1
                first[c] = ALLOW_OVERAGE if overage_from is not None and count > overage_from else ALLOW_NEW
        view.send_to_new(tenant_id, cycle.start_us, fresh, now, kind.name)
        view.send_to_active(tenant_id, cycle.start_us, again)
        return first, tally.plus(len(fresh), len(fresh) + len(again))

    def _decide_held_sends(
        self,
        view: LedgerTx,
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
            blocked = self._held_block(plan, tally.plus(0, counted))
            if blocked is not None:
                first[c] = limited(blocked)
                continue
            counted += 1
            first[c] = ALLOW_HELD
        if counted:
            view.count_sends(tenant_id, cycle.start_us, counted)
            contact_id = unique[0] if len(unique) == 1 else ""
            entry = AuditEntry(now, tenant_id, cycle.start_us, rpc, contact_id, "ALLOW", Reason.OK.name)
            view.audit([replace(entry, sends_delta=counted, request_id=request_id)])
        return first, tally.plus(0, counted)

    @staticmethod
    def _limit_reason(plan: Plan) -> Reason:
        return Reason.OVER_GRACE if plan.enforcement is Enforcement.GRACE else Reason.CONTACT_LIMIT_REACHED

    def _held_block(self, plan: Plan, tally: Tally) -> Reason | None:
        """Why HELD_CONTACTS sends and enrolments are blocked now, if they are: the count
        past the ceiling (AC-6, AC-7, AC-8) or the sends allowance used up."""
        ceiling = plan.ceiling
        if ceiling is not None and tally.count > ceiling:
            return self._limit_reason(plan)
        sends_limit = plan.effective_sends_limit
        if sends_limit and tally.sends >= sends_limit:
            return Reason.SENDS_LIMIT_REACHED
        return None

    def check_contact_add(self, req: ContactAddRequest) -> ContactAddOutcome:
        """May these contacts be added through this source (AC-2..AC-5)? All or nothing;
        when allowed they are held from now on (and, under CYCLE_ACTIVE with
        CONTACT_CREATED counted, active this cycle)."""
        check_id("tenant_id", req.tenant_id)
        _required("source", req.source)
        _check_ids("contact_ids", req.contact_ids, MAX_BATCH)
        check_id("request_id", req.request_id, required=False)
        marketing = req.marketing is not False
        fingerprint = partial(_fingerprint, req.source, list(req.contact_ids), marketing)

        def decide(view: LedgerReader, tx: LedgerTx | None) -> ContactAddOutcome:
            now = self.clock.now_us()
            plan = self._plan(view, req.tenant_id)
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
                reason = (
                    Reason.IMPORT_EXCEEDS_LIMIT if policy is SourcePolicy.REFUSE_IF_EXCEEDS else Reason.SOURCE_BLOCKED
                )
                return ContactAddOutcome(Decision.DENY, reason, 0, usage_of(req.tenant_id, plan, cycle, tally))
            if tx is None:
                after = tally.plus(counted, 0)
            else:
                audit: list[AuditEntry] = []
                source = req.source.name  # type: ignore[union-attr]
                self._change_contacts(
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
                    _activate(
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
                self._observe(tx, plan, usage, now)
            return ContactAddOutcome(Decision.ALLOW, reason, len(new), usage)

        if req.dry_run:
            return self.ledger.read(lambda r: decide(r, None))

        def unit(tx: LedgerTx) -> ContactAddOutcome:
            return self._once(  # type: ignore[return-value]
                tx,
                req.tenant_id,
                "CheckContactAdd",
                req.request_id,
                fingerprint,
                lambda: decide(tx, tx),
                replies.pack_contact_add,
                replies.unpack_contact_add,
                lambda raw: ContactAddOutcome(
                    Decision(raw["d"]), Reason(raw["r"]), raw["a"], Usage.from_dict(raw["u"])
                ),
            )

        return self._transact(unit, weight=len(req.contact_ids))

    def check_enroll(self, tenant_id: str, contact_id: str, automation_id: str = "") -> EnrollOutcome:
        """May this contact enter an automation now (AC-8 with AC-7's grace)? Counts nothing."""
        check_id("tenant_id", tenant_id)
        check_id("contact_id", contact_id)
        check_id("automation_id", automation_id, required=False)

        def read(r: LedgerReader) -> EnrollOutcome:
            now = self.clock.now_us()
            plan = self._plan(r, tenant_id)
            cycle = cycle_of(r, tenant_id, plan, now)
            tally = tally_of(r, plan, tenant_id, cycle)
            usage = usage_of(tenant_id, plan, cycle, tally)
            if plan.metering is Metering.HELD_CONTACTS:
                record = r.contact(tenant_id, contact_id)
                if record is None or not record.held:
                    return EnrollOutcome(Decision.DENY, Reason.UNKNOWN_CONTACT, usage)
                blocked = self._held_block(plan, tally)
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
                return EnrollOutcome(Decision.DENY, self._limit_reason(plan), usage)
            return EnrollOutcome(Decision.ALLOW, Reason.OK, usage)

        return self.ledger.read(read)

    def record_activity(self, req: ActivityRequest) -> ActivityOutcome:
        check_id("tenant_id", req.tenant_id)
        _required("kind", req.kind)
        _check_ids("contact_ids", req.contact_ids, MAX_ACTIVITY_CONTACTS)
        check_id("source_type", req.source_type, required=False)
        check_id("source_id", req.source_id, required=False)
        check_id("request_id", req.request_id, required=False)
        if req.occurred_at_us is not None:
            if req.occurred_at_us > self.clock.now_us() + FUTURE_SKEW_US:
                raise InvalidArgument("occurred_at", "is in the future; activity is recorded after it happened")
            if req.occurred_at_us < 0:
                raise InvalidArgument("occurred_at", "is before 1970")
        fingerprint = cache(
            partial(
                _fingerprint,
                req.kind,
                list(req.contact_ids),
                req.occurred_at_us,
                req.marketing,
                req.source_type,
                req.source_id,
            )
        )

        def decide(tx: LedgerTx, contact_ids: Sequence[str]) -> ActivityOutcome:
            now = self.clock.now_us()
            at = req.occurred_at_us if req.occurred_at_us is not None else now
            plan = self._plan(tx, req.tenant_id)
            booked, cycle = self._plan_of_cycle(tx, req.tenant_id, plan, at)
            ids = list(dict.fromkeys(contact_ids))
            audit: list[AuditEntry] = []
            now_cycle = cycle_of(tx, req.tenant_id, plan, now)
            held = plan.metering is Metering.HELD_CONTACTS
            counted_before = tally_of(tx, plan, req.tenant_id, now_cycle).count if held else 0
            if req.kind in CONTACT_KINDS:
                self._change_contacts(
                    tx,
                    plan,
                    req.tenant_id,
                    req.kind,
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
            if booked.metering is Metering.CYCLE_ACTIVE and booked.counts_activity(req.kind):
                entry = AuditEntry(now, req.tenant_id, cycle.start_us, "RecordActivity", "", "RECORDED", "")
                fresh = _activate(tx, cycle, ids, at, req.kind, replace(entry, request_id=req.request_id), audit)
            tx.audit(audit)
            usage = usage_of(req.tenant_id, booked, cycle, tally_of(tx, booked, req.tenant_id, cycle))
            now_usage = usage if cycle.contains(now) else usage_at(tx, plan, req.tenant_id, now)
            self._observe(tx, plan, now_usage, now)
            # Under HELD_CONTACTS the contacts this call made count: one call has one kind, so the
            # count only rises (creation, marketing set) or only falls (deletion), by that many.
            newly = max(0, now_usage.active_contacts - counted_before) if held else len(fresh)
            return ActivityOutcome(len(ids), newly, usage)

        def unit(tx: LedgerTx, ids: Sequence[str], index: int) -> ActivityOutcome:
            return self._once(  # type: ignore[return-value]
                tx,
                req.tenant_id,
                "RecordActivity",
                _unit_request_id(req.request_id, index),
                fingerprint,
                lambda: decide(tx, ids),
                replies.pack_activity,
                replies.unpack_activity,
                lambda raw: ActivityOutcome(raw["r"], raw["n"], Usage.from_dict(raw["u"])),
            )

        answers = self._in_units(req.contact_ids, unit)
        if len(answers) == 1:
            return answers[0]
        recorded = sum(a.recorded for a in answers)
        return ActivityOutcome(recorded, sum(a.newly_active for a in answers), answers[-1].usage)

    @staticmethod
    def _roll(tx: LedgerTx, plan: Plan, tenant_id: str, cycle: Cycle) -> Holdings:
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

    def _close_for_reanchor(self, tx: LedgerTx, old: Plan, tenant_id: str, now: int) -> Cycle:
        """Before a plan with a new anchor is stored at `now`: brings the holdings into the
        cycle running under the old anchor, so that it keeps its end and peak counts, and,
        when the change cuts that cycle short, moves the pending MK-6 switches to the close,
        the next cycle start. Returns the interrupted cycle."""
        interrupted = cycle_of(tx, tenant_id, old, now)
        if tx.holdings(tenant_id) is not None:
            h = self._roll(tx, old, tenant_id, interrupted)
            if h.pending and interrupted.start_us < now:
                tx.reschedule_marketing(tenant_id, now)
        return interrupted

    def _open_after_reanchor(self, tx: LedgerTx, plan: Plan, tenant_id: str, interrupted: Cycle, cycle: Cycle) -> None:
        """Once the new plan is stored: the held contacts carry into the new cycle (the
        switches due at the close applied), or, when nothing was cut short, the pending
        switches wait for the new cycle's end."""
        h = tx.holdings(tenant_id)
        if h is None:
            return
        if interrupted.start_us < cycle.start_us:
            self._roll(tx, plan, tenant_id, cycle)
        elif h.pending:
            tx.reschedule_marketing(tenant_id, cycle.end_us)

    def _change_contacts(
        self,
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
        h = self._roll(tx, plan, tenant_id, cycle)
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

    def get_usage(self, tenant_id: str, at_us: int | None = None) -> Usage:
        check_id("tenant_id", tenant_id)

        def read(r: LedgerReader) -> Usage:
            plan, cycle = self._plan_of_cycle(r, tenant_id, self._plan(r, tenant_id), at_us)
            return usage_of(tenant_id, plan, cycle, tally_of(r, plan, tenant_id, cycle))

        return self.ledger.read(read)

    def _plan_of_cycle(self, r: LedgerReader, tenant_id: str, plan: Plan, at_us: int | None) -> tuple[Plan, Cycle]:
        """The cycle of the current `plan` containing `at_us` (default now) and the plan in
        force at its end: a past cycle is reported and invoiced under the plan it ended with."""
        now = self.clock.now_us()
        cycle = cycle_of(r, tenant_id, plan, at_us if at_us is not None else now)
        if cycle.end_us <= now:
            stored = r.plan_at(tenant_id, cycle.end_us)
            if stored is not None:
                plan = Plan.from_json(stored.plan_json)
        return plan, cycle

    def get_invoice(self, tenant_id: str, at_us: int | None = None) -> Invoice:
        """The cycle's billable figures (CR-6, CR-7): included and add-on contacts, the
        metered count, and overage contacts x unit price = amount, exact decimals."""
        check_id("tenant_id", tenant_id)

        def read(r: LedgerReader) -> Invoice:
            plan, cycle = self._plan_of_cycle(r, tenant_id, self._plan(r, tenant_id), at_us)
            usage = usage_of(tenant_id, plan, cycle, tally_of(r, plan, tenant_id, cycle))
            return Invoice(usage, invoice_lines(plan, usage))

        return self.ledger.read(read)

    # -- the control plane ----------------------------------------------------------------

    def put_plan(self, tenant_id: str, given: PlanInput) -> tuple[Plan, Usage]:
        given = validate_plan(tenant_id, given)

        def unit(tx: LedgerTx) -> tuple[Plan, Usage]:
            now = self.clock.now_us()
            stored = tx.plan(tenant_id)
            previous = Plan.from_json(stored.plan_json) if stored is not None else None
            anchor = given.cycle_anchor_us
            if anchor is None:
                anchor = previous.cycle_anchor_us if previous is not None else now
            anchored_at = previous.anchored_at_us if previous is not None else None
            interrupted: Cycle | None = None
            if previous is not None and not same_boundaries(anchor, previous.cycle_anchor_us):
                interrupted = self._close_for_reanchor(tx, previous, tenant_id, now)
                tx.put_reanchor(tenant_id, Reanchor(now, previous.cycle_anchor_us))
                anchored_at = now
            plan = Plan(
                metering=given.metering,  # type: ignore[arg-type]
                enforcement=given.enforcement,  # type: ignore[arg-type]
                contact_limit=given.contact_limit,
                cycle_anchor_us=anchor,
                plan_name=given.plan_name,
                addon_contacts=given.addon_contacts,
                grace_percent=given.grace_percent,
                sends_limit=given.sends_limit,
                sends_per_contact=given.sends_per_contact,
                overage_unit_price=given.overage_unit_price,
                currency=given.currency,
                billing_interval=given.billing_interval or BillingInterval.MONTHLY,
                counted_kinds=tuple(sorted(set(given.counted_kinds))),
                counted_activities=tuple(sorted(set(given.counted_activities))),
                source_rules=tuple(given.source_rules),
                max_queue_us=given.max_queue_us or DEFAULT_MAX_QUEUE_US,
                notify_thresholds=tuple(sorted(set(given.notify_thresholds))),
                renotify_interval_us=given.renotify_interval_us or 0,
                preset=given.preset,
                marketing_contacts_only=given.marketing_contacts_only,
                anchored_at_us=anchored_at,
            )
            tx.put_plan(tenant_id, plan.to_json(), now)
            cycle = cycle_of(tx, tenant_id, plan, now)
            if interrupted is not None:
                self._open_after_reanchor(tx, plan, tenant_id, interrupted, cycle)
            tx.audit([AuditEntry(now, tenant_id, cycle.start_us, "PutPlan", "", "PLAN_SET", plan.plan_name)])
            usage = usage_of(tenant_id, plan, cycle, tally_of(tx, plan, tenant_id, cycle))
            self._observe(tx, plan, usage, now, rearm=True)
            return plan, usage

        return self._transact(unit)

    def prune(self, retention: Retention, consumers: Sequence[str] = ()) -> dict[str, int]:
        """Deletes what is older than its retention, oldest first, in transactions of at
        most PRUNE_ROWS rows that queue with decisions like any unit: answers kept for
        retries ("results"), outbox events ("events") every consumer in `consumers` has
        delivered (every event, with none), and audit rows ("audit"). Returns the rows
        deleted of each."""
        now = self.clock.now_us()
        through = self.ledger.read(lambda r: min((r.event_cursor(c) for c in consumers), default=MAX_FIGURE))
        jobs: dict[str, Callable[[LedgerTx], int]] = {
            "results": lambda tx: tx.prune_results(now - retention.requests_us, PRUNE_ROWS),
            "events": lambda tx: tx.prune_events(now - retention.events_us, through, PRUNE_ROWS),
            "audit": lambda tx: tx.prune_audit(now - retention.audit_us, PRUNE_ROWS),
        }
        pruned: dict[str, int] = {}
        for kind, job in jobs.items():
            pruned[kind] = deleted = self.ledger.transact(job)
            while deleted >= PRUNE_ROWS:
                deleted = self.ledger.transact(job)
                pruned[kind] += deleted
        return pruned

    def usage_events(self, tenant_id: str, after_seq: int, limit: int) -> list[UsageEvent]:
        """Outbox events after `after_seq` in order, one tenant's or (tenant_id "") all."""
        check_id("tenant_id", tenant_id, required=False)

        def read(r: LedgerReader) -> list[UsageEvent]:
            if tenant_id:
                self._plan(r, tenant_id)
            return r.events_after(after_seq, tenant_id, limit)

        return self.ledger.read(read)

    def tenant_usages(self, chunk_tenants: int = 500) -> Iterator[Usage]:
        """The current usage of every tenant with a plan, read `chunk_tenants` at a time."""
        tenants = self.ledger.read(lambda r: r.tenants())
        for i in range(0, len(tenants), chunk_tenants):
            chunk = tenants[i : i + chunk_tenants]

            def read(r: LedgerReader, chunk: list[str] = chunk) -> list[Usage]:
                now = self.clock.now_us()
                return [usage_at(r, self._plan(r, tenant_id), tenant_id, now) for tenant_id in chunk]

            yield from self.ledger.read(read)

    def get_plan(self, tenant_id: str) -> Plan:
        check_id("tenant_id", tenant_id)
        return self.ledger.read(lambda r: self._plan(r, tenant_id))

    def get_contact(self, tenant_id: str, contact_id: str) -> ContactState:
        check_id("tenant_id", tenant_id)
        check_id("contact_id", contact_id)

        def read(r: LedgerReader) -> ContactState:
            now = self.clock.now_us()
            plan = self._plan(r, tenant_id)
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

        return self.ledger.read(read)

    def list_active_contacts(
        self, tenant_id: str, at_us: int | None, page_size: int, page_token: str
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
        after = ("", 0)
        token_cycle: int | None = None
        if page_token:
            try:
                raw = json.loads(base64.urlsafe_b64decode(page_token.encode()))
                token_cycle, after = int(raw["c"]), (str(raw["a"]), int(raw.get("f", MAX_FIGURE)))
                after[0].encode()
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
                raise InvalidArgument("page_token", "is not a token this service returned") from None
            if not all(-MAX_FIGURE - 1 <= n <= MAX_FIGURE for n in (token_cycle, after[1])):
                raise InvalidArgument("page_token", "is not a token this service returned")

        def read(r: LedgerReader) -> tuple[list[Activation], str]:
            now = self.clock.now_us()
            plan = self._plan(r, tenant_id)
            if token_cycle is not None and at_us is None:
                start = token_cycle
            else:
                start = cycle_of(r, tenant_id, plan, at_us if at_us is not None else now).start_us
                if token_cycle is not None and token_cycle != start:
                    raise InvalidArgument("page_token", "belongs to another cycle")
            if plan.metering is Metering.HELD_CONTACTS:
                try:
                    booked, cycle = self._plan_of_cycle(r, tenant_id, plan, start)
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
            last = {"c": start, "a": rows[-1].contact_id, "f": rows[-1].activated_at_us}
            return rows, base64.urlsafe_b64encode(json.dumps(last).encode()).decode()

        return self.ledger.read(read)


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


def _unit_request_id(request_id: str, index: int) -> str:
    """The key a call's unit stores its answer under: the request_id itself for the first
    (so reusing it for another request is refused at once), then with the unit's index
    after a NUL, which no caller's id contains."""
    return f"{request_id}\x00{index}" if request_id and index else request_id


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


def _activate(
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
