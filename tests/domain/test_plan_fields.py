"""The plan's fields, declared once (`PLAN_FIELDS` in server/domain/model.py), against the
contract (quota.v1.Plan) and the two plan values (`Plan`, `PlanInput`), and carried
through every conversion they drive: the stored JSON, the Plan message both ways, and
PutPlan's resolution. No fakes: the generated stubs and the domain's own values."""

from __future__ import annotations

from dataclasses import fields

from google.protobuf.descriptor import FieldDescriptor

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.server.domain.clock import MICROS
from quota_sidecar.server.domain.model import (
    PLAN_FIELDS,
    ActivityKind,
    BillingInterval,
    ContactSource,
    Enforcement,
    FieldKind,
    MessageKind,
    Metering,
    Plan,
    PlanInput,
    SourcePolicy,
)
from quota_sidecar.server.domain.plans import validate_plan
from quota_sidecar.server.grpc.convert import plan_input, plan_pb

WIRE = {f.name: f for f in pb.Plan.DESCRIPTOR.fields if f.name != "given_fields"}
SIGNED = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT64}
# Every field away from its default, so a field a conversion dropped would show (no
# valid plan is: marketing_contacts_only and counted_activities belong to different
# meterings, so this one is not validated).
FULL = Plan(
    metering=Metering.HELD_CONTACTS,
    enforcement=Enforcement.GRACE,
    contact_limit=1_000,
    cycle_anchor_us=1_767_225_600 * MICROS + 250,
    plan_name="GROW",
    addon_contacts=250,
    grace_percent=10,
    sends_limit=50_000,
    sends_per_contact=0,
    overage_unit_price="0.125",
    currency="EUR",
    billing_interval=BillingInterval.ANNUAL,
    counted_kinds=(MessageKind.CAMPAIGN, MessageKind.AUTOMATION),
    counted_activities=(ActivityKind.STATUS_CHANGED, ActivityKind.NOTE_ADDED),
    source_rules=(
        (ContactSource.IMPORT, SourcePolicy.REFUSE_IF_EXCEEDS),
        (ContactSource.API, SourcePolicy.BLOCKED_AT_LIMIT),
    ),
    max_queue_us=3_600 * MICROS + 7,
    notify_thresholds=(0.5, 0.9, 1.0),
    renotify_interval_us=86_400 * MICROS,
    preset="contact-limit",
    marketing_contacts_only=True,
    anchored_at_us=1_767_225_600 * MICROS,
)


def test_every_field_of_the_contract_plan_is_declared_once() -> None:
    wires = [f.wire for f in PLAN_FIELDS]
    assert len(wires) == len(set(wires)) == 20
    assert set(wires) == set(WIRE)


def test_plan_input_and_plan_hold_exactly_the_declared_fields() -> None:
    names = [f.name for f in PLAN_FIELDS]
    assert names == [f.name for f in fields(PlanInput) if f.name != "given"]
    assert set(names) == {f.name for f in fields(Plan)} - {"anchored_at_us"}


def test_each_declared_kind_matches_the_contract_type() -> None:
    for field in PLAN_FIELDS:
        wire = WIRE[field.wire]
        repeated = wire.is_repeated
        message = wire.message_type.full_name if wire.message_type else None
        if field.kind is FieldKind.CHOICE:
            assert wire.enum_type is not None and not repeated and field.enum is not None, field
            assert {v.number for v in wire.enum_type.values} - {0} == {m.value for m in field.enum}, field
        elif field.kind is FieldKind.CHOICES:
            assert wire.enum_type is not None and repeated and field.enum is not None, field
        elif field.kind is FieldKind.RULES:
            assert message == "quota.v1.SourceRule" and repeated, field
        elif field.kind is FieldKind.RATIOS:
            assert wire.type == FieldDescriptor.TYPE_DOUBLE and repeated, field
        elif field.kind is FieldKind.INSTANT:
            assert message == "google.protobuf.Timestamp", field
        elif field.kind is FieldKind.DURATION:
            assert message == "google.protobuf.Duration", field
        elif field.kind is FieldKind.TEXT:
            assert wire.type == FieldDescriptor.TYPE_STRING, field
        elif field.kind is FieldKind.FLAG:
            assert wire.type == FieldDescriptor.TYPE_BOOL, field
        else:
            assert field.kind is FieldKind.COUNT and wire.cpp_type in (
                FieldDescriptor.CPPTYPE_INT64,
                FieldDescriptor.CPPTYPE_UINT32,
            ), field
        assert field.signed == (field.kind is FieldKind.COUNT and wire.type in SIGNED), field


def test_a_plan_keeps_every_field_through_its_stored_form() -> None:
    assert Plan.from_json(FULL.to_json()) == FULL


def test_a_plan_keeps_every_field_through_the_message_and_put_plan_resolution() -> None:
    message = plan_pb(FULL)
    assert {f.name for f, _ in message.ListFields()} == set(WIRE)
    given = plan_input(message)
    assert given.given == {
        "grace_percent",
        "sends_limit",
        "sends_per_contact",
        "overage_unit_price",
        "currency",
        "marketing_contacts_only",
    }
    assert Plan.resolve(given, FULL.cycle_anchor_us, FULL.anchored_at_us) == FULL


def test_resolution_sorts_sets_and_fills_defaults_where_the_plan_has_them() -> None:
    given = PlanInput(
        metering=Metering.CYCLE_ACTIVE,
        enforcement=Enforcement.HARD,
        contact_limit=10,
        counted_kinds=[MessageKind.AUTOMATION, MessageKind.CAMPAIGN, MessageKind.AUTOMATION],
        notify_thresholds=[1.0, 0.8, 1.0],
        max_queue_us=0,
    )
    plan = Plan.resolve(validate_plan("t", given), 5, None)
    assert plan.counted_kinds == (MessageKind.CAMPAIGN, MessageKind.AUTOMATION)
    assert plan.notify_thresholds == (0.8, 1.0)
    assert plan.billing_interval is BillingInterval.MONTHLY
    assert plan.max_queue_us == 24 * 3_600 * MICROS
    assert plan.renotify_interval_us == 0
    assert (plan.cycle_anchor_us, plan.anchored_at_us) == (5, None)
