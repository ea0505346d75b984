"""The contract's messages as the domain's values and back: the field checks every
request shares, instants and durations, and the Plan conversion both ways (driven by
the plan's field declarations, `PLAN_FIELDS`) that the gRPC layer and the tenants file
use. A field that does not convert is an InvalidArgument naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from quota_sidecar.api.v1 import quota_pb2 as pb

from ..domain.clock import MICROS
from ..domain.errors import InvalidArgument
from ..domain.model import (
    PLAN_FIELDS,
    ContactSource,
    FieldKind,
    Plan,
    PlanField,
    PlanInput,
    SourcePolicy,
    Usage,
    UsageEvent,
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


# The Plan fields with proto3 presence (scalars declared `optional`): given at 0 or ""
# they still beat the preset's value.
PRESENT_PLAN_FIELDS = tuple(f.name for f in pb.Plan.DESCRIPTOR.fields if f.has_presence and f.message_type is None)
# Plan field names as PlanInput spells them (instants and durations in microseconds).
_PLAN_INPUT_NAMES = {f.wire: f.name for f in PLAN_FIELDS}


def timestamp_pb(us: int) -> timestamp_pb2.Timestamp:
    seconds, micros = divmod(us, MICROS)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=micros * 1000)


def duration_pb(us: int) -> duration_pb2.Duration:
    seconds, micros = divmod(us, MICROS)
    return duration_pb2.Duration(seconds=seconds, nanos=micros * 1000)


def _given_fields(message: pb.Plan) -> frozenset[str]:
    """The fields the caller gave at their default value: by presence, or named in given_fields."""
    known = {f.name for f in pb.Plan.DESCRIPTOR.fields} - {"given_fields"}
    # Read as a plain Message: the names come from the descriptor, not from the stub's literals.
    plan: Message = message
    given = {name for name in PRESENT_PLAN_FIELDS if plan.HasField(name)}
    for i, path in enumerate(message.given_fields.paths):
        if path not in known:
            raise InvalidArgument(f"plan.given_fields.paths[{i}]", f"{path!r} is not a field of Plan")
        given.add(_PLAN_INPUT_NAMES.get(path, path))
    return frozenset(given)


def _given_value(message: pb.Plan, field: PlanField) -> Any:
    """One field of a Plan message as PlanInput holds it; an unset enum or message is None."""
    wire, name = field.wire, f"plan.{field.wire}"
    value = getattr(message, wire)
    if field.kind is FieldKind.CHOICE:
        return enum_of(name, value, field.enum, required=False)  # type: ignore[arg-type]
    if field.kind is FieldKind.CHOICES:
        return enums_of(name, value, field.enum)  # type: ignore[arg-type]
    if field.kind is FieldKind.RULES:
        return [
            (
                enum_of(f"{name}[{i}].source", r.source, ContactSource),
                enum_of(f"{name}[{i}].policy", r.policy, SourcePolicy),
            )
            for i, r in enumerate(value)
        ]
    if field.kind is FieldKind.RATIOS:
        return list(value)
    if field.kind is FieldKind.INSTANT:
        return instant_of(name, message, wire)
    if field.kind is FieldKind.DURATION:
        return duration_of(name, message, wire)
    return value


def plan_input(message: pb.Plan) -> PlanInput:
    """A Plan message as the engine's PlanInput; unknown enum numbers are refused."""
    given = _given_fields(message)
    return PlanInput(given=given, **{f.name: _given_value(message, f) for f in PLAN_FIELDS})


def _wire_value(field: PlanField, value: Any) -> Any:
    if field.kind is FieldKind.CHOICE:
        return value.value
    if field.kind is FieldKind.CHOICES:
        return [k.value for k in value]
    if field.kind is FieldKind.RULES:
        return [pb.SourceRule(source=s.value, policy=q.value) for s, q in value]
    if field.kind is FieldKind.RATIOS:
        return list(value)
    if field.kind is FieldKind.INSTANT:
        return timestamp_pb(value)
    if field.kind is FieldKind.DURATION:
        # A plan's max_queue is never 0 (it defaults); a renotify interval of 0 (none) is left unset.
        return duration_pb(value) if value else None
    return value


def plan_pb(plan: Plan) -> pb.Plan:
    """A stored plan as the contract's Plan message."""
    return pb.Plan(**{f.wire: _wire_value(f, getattr(plan, f.name)) for f in PLAN_FIELDS})


def usage_pb(u: Usage) -> pb.Usage:
    return pb.Usage(
        tenant_id=u.tenant_id,
        cycle_start=timestamp_pb(u.cycle_start_us),
        cycle_end=timestamp_pb(u.cycle_end_us),
        active_contacts=u.active_contacts,
        contact_limit=u.contact_limit,
        usage_ratio=u.usage_ratio,
        sends=u.sends,
        sends_limit=u.sends_limit,
        state=pb.UsageState.ValueType(u.state),
        overage_contacts=u.overage_contacts,
        overage_amount=u.overage_amount,
        currency=u.currency,
        plan_name=u.plan_name,
        peak_contacts=u.peak_contacts,
    )


def usage_event_pb(e: UsageEvent) -> pb.UsageEvent:
    return pb.UsageEvent(
        sequence=e.sequence,
        event_id=e.event_id,
        type=pb.UsageEventType.ValueType(e.type),
        figure=pb.UsageFigure.ValueType(e.figure),
        tenant_id=e.tenant_id,
        threshold=e.threshold,
        occurred_at=timestamp_pb(e.at_us),
        usage=usage_pb(e.usage),
    )
