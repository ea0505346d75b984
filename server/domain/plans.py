"""Plan validation: the checks a plan passes before it is stored, and the checks every
id a caller gives passes. Each refusal is an InvalidArgument naming the field."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from .errors import InvalidArgument
from .model import PLAN_FIELDS, Enforcement, FieldKind, Metering, PlanInput
from .presets import apply_preset

MAX_ID_BYTES = 256
# Figures travel as int64 on the wire and in the ledger.
MAX_FIGURE = 2**63 - 1
# Amounts are exact decimals of at most 28 digits (the decimal context): a price this
# size leaves room for billions of overage contacts.
MAX_PRICE = Decimal(10) ** 12
PRICE_STEP = Decimal("0.000001")
# Each threshold a change crosses writes an event in the deciding call's transaction.
MAX_NOTIFY_THRESHOLDS = 10


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


def require(field: str, value: object) -> None:
    """Refuses a field left unset (None)."""
    if value is None:
        raise InvalidArgument(field, "is required")


def validate_plan(tenant_id: str, given: PlanInput) -> PlanInput:
    """The plan with its preset applied; rejects one that is negative or contradictory, naming the field."""
    check_id("tenant_id", tenant_id)
    given = apply_preset(given)
    require("plan.metering", given.metering)
    require("plan.enforcement", given.enforcement)
    if len(given.plan_name.encode()) > MAX_ID_BYTES:
        raise InvalidArgument("plan.plan_name", f"must be at most {MAX_ID_BYTES} bytes")
    for field in PLAN_FIELDS:
        if field.signed and getattr(given, field.name) < 0:
            raise InvalidArgument(f"plan.{field.wire}", "must not be negative")
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
    for field in PLAN_FIELDS:
        value = getattr(given, field.name)
        if field.kind is FieldKind.DURATION and value is not None and value < 0:
            raise InvalidArgument(f"plan.{field.wire}", "must not be negative")
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
