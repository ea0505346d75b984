"""The domain's values: the enums of the contract, plans, usage figures and
decisions, as plain Python (no grpc, no storage).

Enum members are named as in api.md without the wire prefix; their values are
the wire numbers, so the service layer converts with `Enum(number)`. The plan's
fields are declared once here (`PLAN_FIELDS`), beside the values they describe.

Longer than 500 lines because it is one vocabulary: every layer (ledger, engine,
service) imports its values from this one module, each a short frozen dataclass.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from decimal import Decimal
from enum import Enum, IntEnum
from typing import Any

from .clock import MICROS

DAY_US = 86_400 * MICROS
HOUR_US = 3_600 * MICROS


class Channel(IntEnum):
    EMAIL = 1
    WHATSAPP = 2
    SMS = 3


class MessageKind(IntEnum):
    CAMPAIGN = 1
    AUTOMATION = 2
    TRANSACTIONAL = 3
    ONE_TO_ONE = 4


class BillingInterval(IntEnum):
    MONTHLY = 1
    ANNUAL = 2


class Decision(IntEnum):
    ALLOW = 1
    DENY = 2
    DEFER = 3
    EXPIRED = 4


class Reason(IntEnum):
    OK = 1
    ALREADY_ACTIVE = 2
    NEW_CONTACT_COUNTED = 3
    NOT_COUNTED = 4
    CONTACT_LIMIT_REACHED = 5
    SENDS_LIMIT_REACHED = 6
    OVER_GRACE = 7
    SOURCE_BLOCKED = 8
    IMPORT_EXCEEDS_LIMIT = 9
    NOT_MARKETING_CONTACT = 10
    UNKNOWN_CONTACT = 11
    QUEUED_TOO_LONG = 12
    OVERAGE = 13


class ContactSource(IntEnum):
    API = 1
    FORM = 2
    IMPORT = 3
    MANUAL = 4


class SourcePolicy(IntEnum):
    OVER_LIMIT_ALLOWED = 1
    REFUSE_IF_EXCEEDS = 2
    BLOCKED_AT_LIMIT = 3


class ActivityKind(IntEnum):
    CONTACT_CREATED = 1
    STATUS_CHANGED = 2
    MESSAGE_SENT = 3
    NOTE_ADDED = 4
    PROPERTY_CHANGED = 5
    STATUS_RENAMED = 6
    CONTACT_DELETED = 7
    MARKETING_STATUS_SET = 8


class Metering(IntEnum):
    HELD_CONTACTS = 1
    CYCLE_ACTIVE = 2


class Enforcement(IntEnum):
    HARD = 1
    GRACE = 2
    OVERAGE = 3


class UsageState(IntEnum):
    OK = 1
    WARNING = 2
    AT_LIMIT = 3
    IN_GRACE = 4
    BLOCKED = 5
    IN_OVERAGE = 6


class UsageEventType(IntEnum):
    THRESHOLD_CROSSED = 1
    REMINDER = 2


class UsageFigure(IntEnum):
    CONTACTS = 1
    SENDS = 2


LIMIT_REASONS = frozenset({Reason.CONTACT_LIMIT_REACHED, Reason.OVER_GRACE, Reason.SENDS_LIMIT_REACHED})
DEFAULT_MAX_QUEUE_US = 24 * HOUR_US


class FieldKind(Enum):
    """How a plan field's value is shaped, which decides how it converts."""

    COUNT = "count"  # an integer figure
    TEXT = "text"
    FLAG = "flag"
    CHOICE = "choice"  # one member of `PlanField.enum`
    CHOICES = "choices"  # members of `PlanField.enum`, kept as a sorted set
    RULES = "rules"  # (ContactSource, SourcePolicy) pairs
    RATIOS = "ratios"  # ratios of the limit, kept as a sorted set
    INSTANT = "instant"  # microseconds since the epoch
    DURATION = "duration"  # microseconds


@dataclass(frozen=True, slots=True)
class PlanField:
    """One field of a plan as callers give it (`PlanInput`) and as it is stored (`Plan`).
    `signed`: the contract carries it as a signed integer, so a negative value must be
    refused (an unsigned one cannot be negative on the wire)."""

    name: str
    kind: FieldKind
    enum: type[IntEnum] | None = None
    signed: bool = False

    @property
    def wire(self) -> str:
        """The field's name in quota.v1.Plan and in errors: without the `_us` unit."""
        return self.name.removesuffix("_us")

    def stored(self, value: Any) -> Any:
        """The value in a plan's stored JSON: enum members by name."""
        if self.kind is FieldKind.CHOICE:
            return value.name
        if self.kind is FieldKind.CHOICES:
            return [k.name for k in value]
        if self.kind is FieldKind.RULES:
            return [[s.name, p.name] for s, p in value]
        if self.kind is FieldKind.RATIOS:
            return list(value)
        return value

    def from_stored(self, raw: Any) -> Any:
        """The value `stored` wrote, read back."""
        if self.kind is FieldKind.CHOICE:
            return self.enum[raw]  # type: ignore[index]
        if self.kind is FieldKind.CHOICES:
            return tuple(self.enum[k] for k in raw)  # type: ignore[index]
        if self.kind is FieldKind.RULES:
            return tuple((ContactSource[s], SourcePolicy[p]) for s, p in raw)
        if self.kind is FieldKind.RATIOS:
            return tuple(raw)
        return raw

    def resolved(self, value: Any, defaults: dict[str, Any]) -> Any:
        """The value a plan stores for the given one: sets sorted without repeats, pairs
        as given, an unset or zero value at its default where the plan has one."""
        if self.kind in (FieldKind.CHOICES, FieldKind.RATIOS):
            return tuple(sorted(set(value)))
        if self.kind is FieldKind.RULES:
            return tuple(value)
        if not value and self.name in defaults:
            return defaults[self.name]
        return value


# The plan's fields, declared once, in the contract's order of conversion: validation,
# the proto conversion both ways, the stored form and PutPlan's resolution read them.
PLAN_FIELDS: tuple[PlanField, ...] = (
    PlanField("metering", FieldKind.CHOICE, Metering),
    PlanField("enforcement", FieldKind.CHOICE, Enforcement),
    PlanField("contact_limit", FieldKind.COUNT, signed=True),
    PlanField("plan_name", FieldKind.TEXT),
    PlanField("addon_contacts", FieldKind.COUNT, signed=True),
    PlanField("grace_percent", FieldKind.COUNT),
    PlanField("sends_limit", FieldKind.COUNT, signed=True),
    PlanField("sends_per_contact", FieldKind.COUNT),
    PlanField("overage_unit_price", FieldKind.TEXT),
    PlanField("currency", FieldKind.TEXT),
    PlanField("cycle_anchor_us", FieldKind.INSTANT),
    PlanField("billing_interval", FieldKind.CHOICE, BillingInterval),
    PlanField("counted_kinds", FieldKind.CHOICES, MessageKind),
    PlanField("counted_activities", FieldKind.CHOICES, ActivityKind),
    PlanField("source_rules", FieldKind.RULES),
    PlanField("max_queue_us", FieldKind.DURATION),
    PlanField("notify_thresholds", FieldKind.RATIOS),
    PlanField("renotify_interval_us", FieldKind.DURATION),
    PlanField("preset", FieldKind.TEXT),
    PlanField("marketing_contacts_only", FieldKind.FLAG),
)


@dataclass(frozen=True, slots=True)
class Plan:
    """What a tenant bought, fully resolved (anchor set, defaults applied)."""

    metering: Metering
    enforcement: Enforcement
    contact_limit: int
    cycle_anchor_us: int
    plan_name: str = ""
    addon_contacts: int = 0
    grace_percent: int = 0
    sends_limit: int = 0
    sends_per_contact: int = 0
    overage_unit_price: str = ""
    currency: str = ""
    billing_interval: BillingInterval = BillingInterval.MONTHLY
    counted_kinds: tuple[MessageKind, ...] = ()
    counted_activities: tuple[ActivityKind, ...] = ()
    source_rules: tuple[tuple[ContactSource, SourcePolicy], ...] = ()
    max_queue_us: int = DEFAULT_MAX_QUEUE_US
    notify_thresholds: tuple[float, ...] = ()
    renotify_interval_us: int = 0
    preset: str = ""
    marketing_contacts_only: bool = False
    # The instant this anchor's cycles began: a re-anchor then closed the cycle running
    # under the previous anchor. None while the tenant's cycles have always followed it.
    anchored_at_us: int | None = None

    @property
    def limit(self) -> int:
        """Plan contacts plus add-ons."""
        return self.contact_limit + self.addon_contacts

    @property
    def ceiling(self) -> int | None:
        """The count no new contact may pass; None under OVERAGE (no ceiling)."""
        if self.enforcement is Enforcement.OVERAGE:
            return None
        if self.enforcement is Enforcement.GRACE:
            return self.limit + self.limit * self.grace_percent // 100
        return self.limit

    @property
    def effective_sends_limit(self) -> int:
        """0 is unlimited; sends_per_contact scales with the limit and add-ons (SG-3, SG-4)."""
        if self.sends_per_contact:
            return self.sends_per_contact * self.limit
        return self.sends_limit

    def counts_kind(self, kind: MessageKind) -> bool:
        return kind in self.counted_kinds

    def counts_activity(self, kind: ActivityKind) -> bool:
        return kind in self.counted_activities

    def source_policy(self, source: ContactSource) -> SourcePolicy:
        """The plan's policy for contacts added through `source`; a source without a
        rule adds contacts whatever the count."""
        for rule_source, policy in self.source_rules:
            if rule_source is source:
                return policy
        return SourcePolicy.OVER_LIMIT_ALLOWED

    @classmethod
    def resolve(cls, given: PlanInput, cycle_anchor_us: int, anchored_at_us: int | None) -> Plan:
        """The plan a validated PlanInput stores: sets sorted and deduplicated, a field
        left unset (or zero) at the plan's default."""
        values = {f.name: f.resolved(getattr(given, f.name), _PLAN_DEFAULTS) for f in PLAN_FIELDS}
        return cls(**{**values, "cycle_anchor_us": cycle_anchor_us, "anchored_at_us": anchored_at_us})

    def to_json(self) -> str:
        stored = {f.name: f.stored(getattr(self, f.name)) for f in PLAN_FIELDS}
        return json.dumps({**stored, "anchored_at_us": self.anchored_at_us}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw = json.loads(text)
        values = {
            f.name: f.from_stored(raw.get(f.name, _ADDED_LATER[f.name]) if f.name in _ADDED_LATER else raw[f.name])
            for f in PLAN_FIELDS
        }
        return cls(**values, anchored_at_us=raw.get("anchored_at_us"))


# A plan stored before these fields existed lacks them: it reads as their default.
_ADDED_LATER = {"marketing_contacts_only": False}
_PLAN_DEFAULTS = {f.name: f.default for f in fields(Plan) if f.default is not MISSING}


@dataclass(frozen=True, slots=True)
class PlanInput:
    """A plan as a caller gave it: None where a field was left unset."""

    metering: Metering | None = None
    enforcement: Enforcement | None = None
    contact_limit: int = 0
    plan_name: str = ""
    addon_contacts: int = 0
    grace_percent: int = 0
    sends_limit: int = 0
    sends_per_contact: int = 0
    overage_unit_price: str = ""
    currency: str = ""
    cycle_anchor_us: int | None = None
    billing_interval: BillingInterval | None = None
    counted_kinds: Sequence[MessageKind] = ()
    counted_activities: Sequence[ActivityKind] = ()
    source_rules: Sequence[tuple[ContactSource, SourcePolicy]] = ()
    max_queue_us: int | None = None
    notify_thresholds: Sequence[float] = ()
    renotify_interval_us: int | None = None
    preset: str = ""
    marketing_contacts_only: bool = False
    # Fields given explicitly at their default (0, "", an empty list): given beside a
    # preset, they still beat its value.
    given: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Counters:
    """A tenant's stored figures for one cycle: contacts active in it and sends
    counted in it, and the held and marketing counts at its end and at their
    highest (HELD_CONTACTS bills the highest)."""

    active_contacts: int = 0
    sends: int = 0
    held_end: int = 0
    held_peak: int = 0
    marketing_end: int = 0
    marketing_peak: int = 0


@dataclass(frozen=True, slots=True)
class Holdings:
    """A tenant's contacts now: held, held and marketing, and of those the ones
    set non-marketing that switch at the end of cycle `cycle_start_us` (MK-6).
    `cycle_start_us` is the cycle these figures were last written in."""

    cycle_start_us: int = 0
    held: int = 0
    marketing: int = 0
    pending: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    tenant_id: str
    cycle_start_us: int
    cycle_end_us: int
    active_contacts: int
    contact_limit: int
    usage_ratio: float
    sends: int
    sends_limit: int
    state: UsageState
    overage_contacts: int
    overage_amount: str
    currency: str
    plan_name: str
    peak_contacts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Usage:
        return cls(**{**raw, "state": UsageState(raw["state"])})


@dataclass(frozen=True, slots=True)
class SendDecision:
    decision: Decision
    reason: Reason
    newly_active: bool = False
    retry_after_us: int = 0


@dataclass(frozen=True, slots=True)
class SendOutcome:
    decision: SendDecision
    usage: Usage


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    results: tuple[tuple[str, SendDecision], ...]
    allowed: int
    denied: int
    newly_active: int
    usage: Usage


@dataclass(frozen=True, slots=True)
class ActivityOutcome:
    recorded: int
    newly_active: int
    usage: Usage


@dataclass(frozen=True, slots=True)
class ContactAddOutcome:
    decision: Decision
    reason: Reason
    added: int
    usage: Usage


@dataclass(frozen=True, slots=True)
class EnrollOutcome:
    decision: Decision
    reason: Reason
    usage: Usage


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    description: str
    quantity: int
    unit_price: str
    amount: str
    currency: str


@dataclass(frozen=True, slots=True)
class Invoice:
    usage: Usage
    lines: tuple[InvoiceLine, ...]


@dataclass(frozen=True, slots=True)
class Activation:
    contact_id: str
    activated_at_us: int
    activity: str
    sends: int = 0
    # Listed under HELD_CONTACTS: when the contact stopped counting (0 while it counts).
    counted_until_us: int = 0


@dataclass(frozen=True, slots=True)
class HeldSpan:
    """A time a contact counted under HELD_CONTACTS: held (model 4: held and marketing)
    from `from_us` until `until_us` (None while it still counts and no MK-6 switch is due)."""

    contact_id: str
    from_us: int
    until_us: int | None


@dataclass(frozen=True, slots=True)
class ContactRecord:
    """A contact the tenant holds or held (created, deleted, marketing status)."""

    contact_id: str
    held: bool = True
    marketing: bool = False
    marketing_until_next_update: bool = False
    marketing_source_type: str = ""
    marketing_source_id: str = ""
    marketing_until_us: int = 0
    held_since_us: int = 0

    def marketing_at(self, at_us: int) -> bool:
        """Marketing at that instant: a pending switch to non-marketing (MK-6)
        takes effect at `marketing_until_us`, the next cycle start."""
        return self.marketing and not (self.marketing_until_us and self.marketing_until_us <= at_us)

    def counts(self, marketing_only: bool, at_us: int) -> bool:
        return self.held and (not marketing_only or self.marketing_at(at_us))


@dataclass(frozen=True, slots=True)
class ContactState:
    tenant_id: str
    contact_id: str
    held: bool
    active_this_cycle: bool
    activated_at_us: int
    marketing: bool
    marketing_until_next_update: bool
    marketing_source_type: str
    marketing_source_id: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One decision that changed a figure, appended to the ledger's audit."""

    at_us: int
    tenant_id: str
    cycle_start_us: int
    rpc: str
    contact_id: str
    decision: str
    reason: str
    active_delta: int = 0
    sends_delta: int = 0
    held_delta: int = 0
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class NoticeState:
    """How far a tenant's figure has been announced: the highest notify threshold
    crossed (`level`, 0 for none) as of cycle `cycle_start_us`, and when the last
    event about it was written."""

    level: float = 0.0
    cycle_start_us: int = 0
    last_at_us: int = 0


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """A notification in the ledger's outbox. `sequence` orders events and is the
    resume point of readers; `event_id` is unique and stable, for receivers' dedupe."""

    event_id: str
    type: UsageEventType
    figure: UsageFigure
    tenant_id: str
    threshold: float
    at_us: int
    usage: Usage
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class StoredPlan:
    plan_json: str
    updated_at_us: int


@dataclass(frozen=True, slots=True)
class UsageContext:
    """What a usage takes from the plan and the cycle: stored once and shared by the
    answers kept for retries that carry it."""

    tenant_id: str
    cycle_start_us: int
    cycle_end_us: int
    contact_limit: int
    sends_limit: int
    currency: str
    plan_name: str


@dataclass(frozen=True, slots=True)
class Reanchor:
    """A plan stored with an anchor that moved the cycle boundaries: at `at_us` the
    cycle running under `anchor_before_us` closed and the next one started."""

    at_us: int
    anchor_before_us: int


@dataclass(frozen=True, slots=True)
class StoredResult:
    """An answer kept for retries of its request_id: the start of a hash of the request
    (`fingerprint`), the answer packed (replies.py) and the usage context it needs.
    An answer kept before the packed form has `legacy_json` instead, until it is pruned."""

    fingerprint: bytes
    packed: bytes = b""
    context: UsageContext | None = None
    legacy_json: str = ""


def money(value: Decimal) -> str:
    """A decimal amount as a plain string with at least two places ("12.50", "0.125")."""
    normal = value.normalize()
    exponent = normal.as_tuple().exponent
    # The exponent is a letter only for NaN and infinities, which plan validation keeps out.
    if isinstance(exponent, int) and -exponent < 2:
        normal = normal.quantize(Decimal("0.01"))
    return f"{normal:f}"
