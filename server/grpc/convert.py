"""The contract's request messages as the domain's values: the field checks every
request shares, and the Plan conversion that both the gRPC layer and the tenants file
use. A field that does not convert is an InvalidArgument naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from quota_sidecar.api.v1 import quota_pb2 as pb

from ..domain.clock import MICROS
from ..domain.errors import InvalidArgument
from ..domain.model import (
    ActivityKind,
    BillingInterval,
    ContactSource,
    Enforcement,
    MessageKind,
    Metering,
    PlanInput,
    SourcePolicy,
)

E = TypeVar("E", bound=IntEnum)
MIN_TIMESTAMP_S = -62_135_596_800
MAX_TIMESTAMP_S = 253_402_300_799


def enum_of(field: str, value: int, kind: type[E], *, required: bool = True) -> E | None:
    """The enum member numbered `value`; None (or, when `required`, refused) for 0."""
    if value == 0:
        if required:
            raise InvalidArgument(field, "is required")
        return None
    try:
        return kind(value)
    except ValueError:
        raise InvalidArgument(field, f"{value} is not a known {kind.__name__} value") from None


def enums_of(field: str, values: Sequence[int], kind: type[E]) -> list[E]:
    """The members numbered `values`, each required; a refusal names its index."""
    return [enum_of(f"{field}[{i}]", v, kind) for i, v in enumerate(values)]  # type: ignore[misc]


def instant_of(field: str, message: Any, name: str) -> int | None:
    """The Timestamp field `name` of `message` in microseconds; None when unset."""
    if not message.HasField(name):
        return None
    ts: timestamp_pb2.Timestamp = getattr(message, name)
    if not (MIN_TIMESTAMP_S <= ts.seconds <= MAX_TIMESTAMP_S) or not (0 <= ts.nanos < 1_000_000_000):
        raise InvalidArgument(field, "is not a valid timestamp")
    return ts.seconds * MICROS + ts.nanos // 1000


def duration_of(field: str, message: Any, name: str) -> int | None:
    """The Duration field `name` of `message` in microseconds; None when unset."""
    if not message.HasField(name):
        return None
    d: duration_pb2.Duration = getattr(message, name)
    if abs(d.seconds) > 315_576_000_000 or abs(d.nanos) >= 1_000_000_000 or d.seconds * d.nanos < 0:
        raise InvalidArgument(field, "is not a valid duration")
    return d.seconds * MICROS + d.nanos // 1000


# The Plan fields with proto3 presence whose value a preset may set; given at 0 or ""
# they still beat the preset.
PRESENT_PLAN_FIELDS = (
    "grace_percent",
    "sends_limit",
    "sends_per_contact",
    "overage_unit_price",
    "currency",
    "marketing_contacts_only",
)
# Plan field names as PlanInput spells them (instants and durations in microseconds).
_PLAN_INPUT_NAMES = {
    "cycle_anchor": "cycle_anchor_us",
    "max_queue": "max_queue_us",
    "renotify_interval": "renotify_interval_us",
}


def _given_fields(message: pb.Plan) -> frozenset[str]:
    """The fields the caller gave at their default value: by presence, or named in given_fields."""
    known = {f.name for f in pb.Plan.DESCRIPTOR.fields} - {"given_fields"}
    given = {name for name in PRESENT_PLAN_FIELDS if message.HasField(name)}
    for i, path in enumerate(message.given_fields.paths):
        if path not in known:
            raise InvalidArgument(f"plan.given_fields.paths[{i}]", f"{path!r} is not a field of Plan")
        given.add(_PLAN_INPUT_NAMES.get(path, path))
    return frozenset(given)


def plan_input(message: pb.Plan) -> PlanInput:
    """A Plan message as the engine's PlanInput; unknown enum numbers are refused."""
    return PlanInput(
        given=_given_fields(message),
        metering=enum_of("plan.metering", message.metering, Metering, required=False),
        enforcement=enum_of("plan.enforcement", message.enforcement, Enforcement, required=False),
        contact_limit=message.contact_limit,
        plan_name=message.plan_name,
        addon_contacts=message.addon_contacts,
        grace_percent=message.grace_percent,
        sends_limit=message.sends_limit,
        sends_per_contact=message.sends_per_contact,
        overage_unit_price=message.overage_unit_price,
        currency=message.currency,
        cycle_anchor_us=instant_of("plan.cycle_anchor", message, "cycle_anchor"),
        billing_interval=enum_of("plan.billing_interval", message.billing_interval, BillingInterval, required=False),
        counted_kinds=enums_of("plan.counted_kinds", message.counted_kinds, MessageKind),
        counted_activities=enums_of("plan.counted_activities", message.counted_activities, ActivityKind),
        source_rules=[
            (
                enum_of(f"plan.source_rules[{i}].source", r.source, ContactSource),
                enum_of(f"plan.source_rules[{i}].policy", r.policy, SourcePolicy),
            )
            for i, r in enumerate(message.source_rules)
        ],  # type: ignore[misc]
        max_queue_us=duration_of("plan.max_queue", message, "max_queue"),
        notify_thresholds=list(message.notify_thresholds),
        renotify_interval_us=duration_of("plan.renotify_interval", message, "renotify_interval"),
        preset=message.preset,
        marketing_contacts_only=message.marketing_contacts_only,
    )
