"""The four billing models of domain.md as plan presets (the table in api.md).

A preset fills the plan fields a caller left unset; a field given beside the
preset wins, a zero or empty value included. A field counts as given when it
holds anything but its default, when it is named in `PlanInput.given` (the
service fills that from proto3 field presence and `Plan.given_fields`), or, for
the fields whose default is None (durations, the anchor), when it is not None.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from .errors import InvalidArgument
from .model import (
    DAY_US,
    HOUR_US,
    ActivityKind,
    ContactSource,
    Enforcement,
    MessageKind,
    Metering,
    PlanInput,
    SourcePolicy,
)

CONTACT_LIMIT = "contact-limit"
ACTIVE_CYCLE_HARD = "active-cycle-hard"
ACTIVE_CYCLE_OVERAGE = "active-cycle-overage"
MARKETING_CONTACTS = "marketing-contacts"

# CR-3: the plan names of model 3 and the active contacts each includes.
OVERAGE_TIERS: dict[str, int] = {"START": 50, "GROW": 250, "EXPAND": 500, "SCALE": 2_000}

PRESETS: dict[str, dict[str, Any]] = {
    # Model 1 (AC-1..AC-10).
    CONTACT_LIMIT: {
        "metering": Metering.HELD_CONTACTS,
        "enforcement": Enforcement.GRACE,
        "grace_percent": 10,
        "source_rules": (
            (ContactSource.API, SourcePolicy.OVER_LIMIT_ALLOWED),
            (ContactSource.FORM, SourcePolicy.OVER_LIMIT_ALLOWED),
            (ContactSource.IMPORT, SourcePolicy.REFUSE_IF_EXCEEDS),
            (ContactSource.MANUAL, SourcePolicy.BLOCKED_AT_LIMIT),
        ),
        "counted_kinds": (MessageKind.CAMPAIGN, MessageKind.AUTOMATION),
        "max_queue_us": 24 * HOUR_US,
        "notify_thresholds": (0.9, 1.0),
        "renotify_interval_us": 15 * DAY_US,
    },
    # Model 2 (SG-1..SG-11).
    ACTIVE_CYCLE_HARD: {
        "metering": Metering.CYCLE_ACTIVE,
        "enforcement": Enforcement.HARD,
        "sends_per_contact": 10,
        "counted_kinds": (MessageKind.CAMPAIGN, MessageKind.AUTOMATION),
        "counted_activities": (ActivityKind.MESSAGE_SENT,),
        "notify_thresholds": (0.8, 1.0),
    },
    # Model 3 (CR-1..CR-8).
    ACTIVE_CYCLE_OVERAGE: {
        "metering": Metering.CYCLE_ACTIVE,
        "enforcement": Enforcement.OVERAGE,
        "overage_unit_price": "0.25",
        "currency": "EUR",
        "counted_kinds": tuple(MessageKind),
        "counted_activities": (
            ActivityKind.CONTACT_CREATED,
            ActivityKind.STATUS_CHANGED,
            ActivityKind.MESSAGE_SENT,
            ActivityKind.NOTE_ADDED,
            ActivityKind.PROPERTY_CHANGED,
            ActivityKind.STATUS_RENAMED,
        ),
        "notify_thresholds": (0.8, 1.0),
    },
    # Model 4 (MK-1..MK-6).
    MARKETING_CONTACTS: {
        "metering": Metering.HELD_CONTACTS,
        "enforcement": Enforcement.OVERAGE,
        "marketing_contacts_only": True,
        "counted_kinds": (MessageKind.CAMPAIGN, MessageKind.AUTOMATION),
        "notify_thresholds": (0.8, 0.9, 1.0),
    },
}


def _unset(value: object) -> bool:
    return value is None or value == 0 or value == "" or value == () or value == [] or value is False


def given_fields(given: PlanInput) -> set[str]:
    """The names of the fields the caller gave, zero or empty ones included."""
    named = set(given.given)
    for f in fields(given):
        value = getattr(given, f.name)
        if f.name != "given" and (value is not None if f.default is None else not _unset(value)):
            named.add(f.name)
    return named


def apply_preset(given: PlanInput) -> PlanInput:
    """The plan with its preset's values filled in where the caller left a field unset."""
    if not given.preset:
        return given
    preset = PRESETS.get(given.preset)
    if preset is None:
        raise InvalidArgument("plan.preset", f"unknown preset {given.preset!r}; one of {', '.join(PRESETS)}")
    explicit = given_fields(given)
    values = {name: value for name, value in preset.items() if name not in explicit}
    enforcement = given.enforcement or preset["enforcement"]
    metering = given.metering or preset["metering"]
    if "sends_limit" in explicit:
        values.pop("sends_per_contact", None)
    if enforcement is not Enforcement.GRACE:
        values.pop("grace_percent", None)
    if enforcement is not Enforcement.OVERAGE:
        values.pop("overage_unit_price", None)
        if "overage_unit_price" not in explicit:
            values.pop("currency", None)
    if metering is not Metering.HELD_CONTACTS:
        values.pop("marketing_contacts_only", None)
    if metering is not Metering.CYCLE_ACTIVE:
        values.pop("counted_activities", None)
    resolved = replace(given, **values)
    if given.preset == ACTIVE_CYCLE_OVERAGE and not resolved.contact_limit:
        tier = OVERAGE_TIERS.get(resolved.plan_name.upper())
        if tier is None:
            raise InvalidArgument(
                "plan.contact_limit",
                f"give contact_limit, or a plan_name of {', '.join(OVERAGE_TIERS)} for the {ACTIVE_CYCLE_OVERAGE}"
                " preset's included contacts (CR-3)",
            )
        resolved = replace(resolved, contact_limit=tier)
    return resolved
