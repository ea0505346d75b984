"""What the client's calls return, and the plan it sends.

Every result names enum values by their short names ("ALLOW", "NEW_CONTACT_COUNTED",
"AT_LIMIT") and keeps the protobuf message it was read from as `raw`. A check result
with `fallback=True` was decided by the client's fail-open or fail-closed policy because
the sidecar gave no answer; it has no usage, no raw message, reason "UNSPECIFIED" and
the `Unavailable` error that caused it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from quota_sidecar.api.v1 import quota_pb2

from ._errors import Unavailable
from ._wire import (
    DurationArg,
    EnumArg,
    TimestampArg,
    enum_name,
    enum_value,
    enum_values,
    from_decimal_string,
    from_duration,
    from_timestamp,
    message,
    to_decimal_string,
    to_duration,
    to_timestamp,
)

FALLBACK_REASON = "UNSPECIFIED"

# A plan's source rules: source -> policy, each a short name, wire name or number, or
# (source, policy) pairs. A mapping's key type is invariant, hence one member per key type,
# so that a caller's `dict[str, str]` is accepted.
SourceRules = (
    Mapping[str, EnumArg] | Mapping[int, EnumArg] | Mapping[EnumArg, EnumArg] | Iterable[tuple[EnumArg, EnumArg]]
)


@dataclass(frozen=True)
class Usage:
    """A tenant's figures for one cycle. `active_contacts` is the metered count now
    (contacts held, or active this cycle); `peak_contacts` the highest it reached in the
    cycle, on which HELD_CONTACTS bills its overage (under CYCLE_ACTIVE the two are equal)."""

    tenant_id: str
    plan_name: str
    cycle_start: datetime | None
    cycle_end: datetime | None
    active_contacts: int
    # Keyword-only: a later addition, so the positional order of the fields before it stays.
    peak_contacts: int = field(default=0, kw_only=True)
    contact_limit: int
    usage_ratio: float
    sends: int
    sends_limit: int
    state: str
    overage_contacts: int
    overage_amount: Decimal | None
    currency: str
    raw: quota_pb2.Usage = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, usage: quota_pb2.Usage) -> Usage:
        return cls(
            tenant_id=usage.tenant_id,
            plan_name=usage.plan_name,
            cycle_start=from_timestamp(usage.cycle_start) if usage.HasField("cycle_start") else None,
            cycle_end=from_timestamp(usage.cycle_end) if usage.HasField("cycle_end") else None,
            active_contacts=usage.active_contacts,
            contact_limit=usage.contact_limit,
            usage_ratio=usage.usage_ratio,
            sends=usage.sends,
            sends_limit=usage.sends_limit,
            state=enum_name(quota_pb2.UsageState, usage.state),
            overage_contacts=usage.overage_contacts,
            overage_amount=from_decimal_string(usage.overage_amount),
            currency=usage.currency,
            raw=usage,
            peak_contacts=usage.peak_contacts,
        )


@dataclass(frozen=True)
class UsageEvent:
    """A usage notification: a notify threshold crossed, or a reminder that a figure is
    still at or above one. `figure` is "CONTACTS" or "SENDS"; `sequence` is the resume
    point for watch_usage_events; `event_id` is stable across redeliveries."""

    sequence: int
    event_id: str
    type: str
    figure: str
    tenant_id: str
    threshold: float
    occurred_at: datetime | None
    usage: Usage
    raw: quota_pb2.UsageEvent = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, event: quota_pb2.UsageEvent) -> UsageEvent:
        return cls(
            sequence=event.sequence,
            event_id=event.event_id,
            type=enum_name(quota_pb2.UsageEventType, event.type),
            figure=enum_name(quota_pb2.UsageFigure, event.figure),
            tenant_id=event.tenant_id,
            threshold=event.threshold,
            occurred_at=from_timestamp(event.occurred_at) if event.HasField("occurred_at") else None,
            usage=Usage.from_pb(event.usage),
            raw=event,
        )


def _usage(message: quota_pb2.Usage, present: bool) -> Usage | None:
    return Usage.from_pb(message) if present else None


@dataclass(frozen=True)
class SendDecision:
    """The answer to check_send."""

    decision: str
    reason: str
    newly_active: bool
    usage: Usage | None
    retry_after: timedelta | None
    fallback: bool = False
    error: Unavailable | None = field(default=None, repr=False)
    raw: quota_pb2.CheckSendResponse | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_pb(cls, response: quota_pb2.CheckSendResponse) -> SendDecision:
        return cls(
            decision=enum_name(quota_pb2.Decision, response.decision),
            reason=enum_name(quota_pb2.Reason, response.reason),
            newly_active=response.newly_active,
            usage=_usage(response.usage, response.HasField("usage")),
            retry_after=from_duration(response.retry_after) if response.HasField("retry_after") else None,
            raw=response,
        )

    @classmethod
    def from_fallback(cls, decision: str, error: Unavailable) -> SendDecision:
        return cls(decision, FALLBACK_REASON, False, None, None, fallback=True, error=error)


@dataclass(frozen=True)
class SendResult:
    """One contact's entry in a batch decision."""

    contact_id: str
    decision: str
    reason: str
    newly_active: bool

    @classmethod
    def from_pb(cls, result: quota_pb2.CheckSendResult) -> SendResult:
        return cls(
            contact_id=result.contact_id,
            decision=enum_name(quota_pb2.Decision, result.decision),
            reason=enum_name(quota_pb2.Reason, result.reason),
            newly_active=result.newly_active,
        )


@dataclass(frozen=True)
class BatchDecision:
    """The answer to check_send_batch: one result per listed id, in request order."""

    results: tuple[SendResult, ...]
    allowed: int
    denied: int
    newly_active: int
    usage: Usage | None
    fallback: bool = False
    error: Unavailable | None = field(default=None, repr=False)
    raw: quota_pb2.CheckSendBatchResponse | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_pb(cls, response: quota_pb2.CheckSendBatchResponse) -> BatchDecision:
        return cls(
            results=tuple(SendResult.from_pb(result) for result in response.results),
            allowed=response.allowed,
            denied=response.denied,
            newly_active=response.newly_active,
            usage=_usage(response.usage, response.HasField("usage")),
            raw=response,
        )

    @classmethod
    def from_fallback(cls, decision: str, contact_ids: Sequence[str], error: Unavailable) -> BatchDecision:
        results = tuple(SendResult(contact_id, decision, FALLBACK_REASON, False) for contact_id in contact_ids)
        allowed = len(results) if decision == "ALLOW" else 0
        return cls(results, allowed, len(results) - allowed, 0, None, fallback=True, error=error)


@dataclass(frozen=True)
class ContactAddDecision:
    """The answer to check_contact_add, for the whole request."""

    decision: str
    reason: str
    added: int
    usage: Usage | None
    fallback: bool = False
    error: Unavailable | None = field(default=None, repr=False)
    raw: quota_pb2.CheckContactAddResponse | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_pb(cls, response: quota_pb2.CheckContactAddResponse) -> ContactAddDecision:
        return cls(
            decision=enum_name(quota_pb2.Decision, response.decision),
            reason=enum_name(quota_pb2.Reason, response.reason),
            added=response.added,
            usage=_usage(response.usage, response.HasField("usage")),
            raw=response,
        )

    @classmethod
    def from_fallback(cls, decision: str, error: Unavailable) -> ContactAddDecision:
        return cls(decision, FALLBACK_REASON, 0, None, fallback=True, error=error)


@dataclass(frozen=True)
class EnrollDecision:
    """The answer to check_enroll."""

    decision: str
    reason: str
    usage: Usage | None
    fallback: bool = False
    error: Unavailable | None = field(default=None, repr=False)
    raw: quota_pb2.CheckEnrollResponse | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_pb(cls, response: quota_pb2.CheckEnrollResponse) -> EnrollDecision:
        return cls(
            decision=enum_name(quota_pb2.Decision, response.decision),
            reason=enum_name(quota_pb2.Reason, response.reason),
            usage=_usage(response.usage, response.HasField("usage")),
            raw=response,
        )

    @classmethod
    def from_fallback(cls, decision: str, error: Unavailable) -> EnrollDecision:
        return cls(decision, FALLBACK_REASON, None, fallback=True, error=error)


@dataclass(frozen=True)
class ActivityRecord:
    """The answer to record_activity."""

    recorded: int
    newly_active: int
    usage: Usage | None
    raw: quota_pb2.RecordActivityResponse = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, response: quota_pb2.RecordActivityResponse) -> ActivityRecord:
        return cls(
            recorded=response.recorded,
            newly_active=response.newly_active,
            usage=_usage(response.usage, response.HasField("usage")),
            raw=response,
        )


@dataclass(frozen=True)
class Plan:
    """What a tenant bought. Every field is optional on the way in; `preset` fills the
    fields left out (None, or 0 / "" for the fields no preset sets), and a field given
    beside it wins, 0 or empty included (`grace_percent=0`, `notify_thresholds=()`).
    Enum fields take short names or protobuf numbers and come back as short names;
    `source_rules` maps a contact source to its policy (a mapping, or (source, policy)
    pairs). `marketing_contacts_only` makes a HELD_CONTACTS plan count marketing
    contacts only (model 4, MK-1)."""

    plan_name: str = ""
    metering: EnumArg = 0
    enforcement: EnumArg = 0
    contact_limit: int = 0
    addon_contacts: int = 0
    grace_percent: int | None = None
    sends_limit: int | None = None
    sends_per_contact: int | None = None
    overage_unit_price: Decimal | str | None = None
    currency: str | None = None
    cycle_anchor: TimestampArg | None = None
    billing_interval: EnumArg = 0
    counted_kinds: Sequence[EnumArg] | None = None
    counted_activities: Sequence[EnumArg] | None = None
    source_rules: SourceRules | None = None
    max_queue: DurationArg | None = None
    notify_thresholds: Sequence[float] | None = None
    renotify_interval: DurationArg | None = None
    preset: str = ""
    # Keyword-only: a later addition, so the positional order of the fields before it stays.
    marketing_contacts_only: bool | None = field(default=None, kw_only=True)
    raw: quota_pb2.Plan | None = field(default=None, repr=False, compare=False)

    def to_pb(self) -> quota_pb2.Plan:
        plan = message(
            quota_pb2.Plan,
            "plan.",
            plan_name=self.plan_name,
            metering=enum_value(quota_pb2.Metering, self.metering, "plan.metering"),
            enforcement=enum_value(quota_pb2.Enforcement, self.enforcement, "plan.enforcement"),
            contact_limit=self.contact_limit,
            addon_contacts=self.addon_contacts,
            billing_interval=enum_value(quota_pb2.BillingInterval, self.billing_interval, "plan.billing_interval"),
            counted_kinds=enum_values(quota_pb2.MessageKind, self.counted_kinds or (), "plan.counted_kinds"),
            counted_activities=enum_values(
                quota_pb2.ActivityKind, self.counted_activities or (), "plan.counted_activities"
            ),
            notify_thresholds=list(self.notify_thresholds or ()),
            preset=self.preset,
        )
        for name in ("grace_percent", "sends_limit", "sends_per_contact", "currency", "marketing_contacts_only"):
            value = getattr(self, name)
            if value is not None:
                setattr(plan, name, value)
        # A repeated field cannot carry presence: naming it says "given", so an empty list beats a preset's.
        for name in ("counted_kinds", "counted_activities", "source_rules", "notify_thresholds"):
            if getattr(self, name) is not None:
                plan.given_fields.paths.append(name)
        if self.overage_unit_price is not None:
            plan.overage_unit_price = to_decimal_string(self.overage_unit_price, "plan.overage_unit_price")
        if self.cycle_anchor is not None:
            plan.cycle_anchor.CopyFrom(to_timestamp(self.cycle_anchor, "plan.cycle_anchor"))
        if self.max_queue is not None:
            plan.max_queue.CopyFrom(to_duration(self.max_queue, "plan.max_queue"))
        if self.renotify_interval is not None:
            plan.renotify_interval.CopyFrom(to_duration(self.renotify_interval, "plan.renotify_interval"))
        for source, policy in rule_pairs(self.source_rules):
            plan.source_rules.add(
                source=enum_value(quota_pb2.ContactSource, source, "plan.source_rules.source"),
                policy=enum_value(quota_pb2.SourcePolicy, policy, "plan.source_rules.policy"),
            )
        return plan

    @classmethod
    def from_pb(cls, plan: quota_pb2.Plan) -> Plan:
        return cls(
            plan_name=plan.plan_name,
            metering=enum_name(quota_pb2.Metering, plan.metering),
            enforcement=enum_name(quota_pb2.Enforcement, plan.enforcement),
            contact_limit=plan.contact_limit,
            addon_contacts=plan.addon_contacts,
            grace_percent=plan.grace_percent,
            sends_limit=plan.sends_limit,
            sends_per_contact=plan.sends_per_contact,
            overage_unit_price=from_decimal_string(plan.overage_unit_price),
            currency=plan.currency,
            cycle_anchor=from_timestamp(plan.cycle_anchor) if plan.HasField("cycle_anchor") else None,
            billing_interval=enum_name(quota_pb2.BillingInterval, plan.billing_interval),
            counted_kinds=tuple(enum_name(quota_pb2.MessageKind, kind) for kind in plan.counted_kinds),
            counted_activities=tuple(enum_name(quota_pb2.ActivityKind, kind) for kind in plan.counted_activities),
            source_rules={
                enum_name(quota_pb2.ContactSource, rule.source): enum_name(quota_pb2.SourcePolicy, rule.policy)
                for rule in plan.source_rules
            },
            max_queue=from_duration(plan.max_queue) if plan.HasField("max_queue") else None,
            notify_thresholds=tuple(plan.notify_thresholds),
            renotify_interval=(from_duration(plan.renotify_interval) if plan.HasField("renotify_interval") else None),
            preset=plan.preset,
            raw=plan,
            marketing_contacts_only=plan.marketing_contacts_only,
        )


@dataclass(frozen=True)
class PlanChange:
    """The answer to put_plan: the plan as stored and the figures under it."""

    plan: Plan
    usage: Usage | None
    raw: quota_pb2.PutPlanResponse = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, response: quota_pb2.PutPlanResponse) -> PlanChange:
        return cls(
            plan=Plan.from_pb(response.plan),
            usage=_usage(response.usage, response.HasField("usage")),
            raw=response,
        )


@dataclass(frozen=True)
class ContactState:
    """One contact as the ledger knows it (MK-5)."""

    tenant_id: str
    contact_id: str
    held: bool
    active_this_cycle: bool
    activated_at: datetime | None
    marketing: bool
    marketing_until_next_update: bool
    marketing_source_type: str
    marketing_source_id: str
    raw: quota_pb2.ContactState = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, contact: quota_pb2.ContactState) -> ContactState:
        return cls(
            tenant_id=contact.tenant_id,
            contact_id=contact.contact_id,
            held=contact.held,
            active_this_cycle=contact.active_this_cycle,
            activated_at=from_timestamp(contact.activated_at) if contact.HasField("activated_at") else None,
            marketing=contact.marketing,
            marketing_until_next_update=contact.marketing_until_next_update,
            marketing_source_type=contact.marketing_source_type,
            marketing_source_id=contact.marketing_source_id,
            raw=contact,
        )


@dataclass(frozen=True)
class ActiveContact:
    """A contact active in a cycle, and what activated it; under HELD_CONTACTS one span in
    which it counted: from `activated_at` until `counted_until` (None while it counts)."""

    contact_id: str
    activated_at: datetime | None
    activity: str
    raw: quota_pb2.ActiveContact = field(repr=False, compare=False)
    counted_until: datetime | None = None

    @classmethod
    def from_pb(cls, contact: quota_pb2.ActiveContact) -> ActiveContact:
        return cls(
            contact_id=contact.contact_id,
            activated_at=from_timestamp(contact.activated_at) if contact.HasField("activated_at") else None,
            activity=contact.activity,
            raw=contact,
            counted_until=from_timestamp(contact.counted_until) if contact.HasField("counted_until") else None,
        )


@dataclass(frozen=True)
class ActiveContactsPage:
    """One page of list_active_contacts; an empty `next_page_token` marks the last page."""

    contacts: tuple[ActiveContact, ...]
    next_page_token: str
    raw: quota_pb2.ListActiveContactsResponse = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, response: quota_pb2.ListActiveContactsResponse) -> ActiveContactsPage:
        return cls(
            contacts=tuple(ActiveContact.from_pb(contact) for contact in response.contacts),
            next_page_token=response.next_page_token,
            raw=response,
        )


@dataclass(frozen=True)
class InvoiceLine:
    """One billable line (CR-6): quantity × unit price = amount."""

    description: str
    quantity: int
    unit_price: Decimal | None
    amount: Decimal | None
    currency: str
    raw: quota_pb2.InvoiceLine = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, line: quota_pb2.InvoiceLine) -> InvoiceLine:
        return cls(
            description=line.description,
            quantity=line.quantity,
            unit_price=from_decimal_string(line.unit_price),
            amount=from_decimal_string(line.amount),
            currency=line.currency,
            raw=line,
        )


@dataclass(frozen=True)
class Invoice:
    """A cycle's billable figures (CR-6, CR-7)."""

    usage: Usage | None
    lines: tuple[InvoiceLine, ...]
    raw: quota_pb2.GetInvoiceResponse = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, response: quota_pb2.GetInvoiceResponse) -> Invoice:
        return cls(
            usage=_usage(response.usage, response.HasField("usage")),
            lines=tuple(InvoiceLine.from_pb(line) for line in response.lines),
            raw=response,
        )


def rule_pairs(rules: SourceRules | None) -> list[tuple[EnumArg, EnumArg]]:
    """A plan's `source_rules` as (source, policy) pairs, in whichever form they were given."""
    if rules is None:
        return []
    if isinstance(rules, Mapping):
        return [(source, policy) for source, policy in rules.items()]
    return list(rules)
