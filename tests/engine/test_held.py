"""Held-contact metering, presets, plan versions and the schema-v2 migration, at the engine.

The engine runs over a real SQLite ledger with a fake clock. Rule ids refer to
docs/domain.md; "Presets" and "Decision rules" to docs/api.md.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import sqlite_utils

from quota_sidecar.server.domain.clock import FakeClock, to_us
from quota_sidecar.server.domain.cycles import cycle_at
from quota_sidecar.server.domain.errors import InvalidArgument, NotFound
from quota_sidecar.server.domain.model import (
    DAY_US,
    HOUR_US,
    ActivityKind,
    BillingInterval,
    Channel,
    ContactSource,
    Decision,
    Enforcement,
    MessageKind,
    Metering,
    Plan,
    Reason,
    SourcePolicy,
    UsageState,
)
from quota_sidecar.server.engine import (
    ActivityRequest,
    ContactAddRequest,
    Engine,
    PlanInput,
    SendRequest,
)
from quota_sidecar.server.ledger.sqlite import SCHEMA_VERSION, SQLiteLedger, migrate

from support.held import T, add, ids, preset
from support.sidecar import rows_of

ANCHOR = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
JAN = datetime(2026, 2, 1, tzinfo=UTC)
FEB = datetime(2026, 2, 20, tzinfo=UTC)
MAR = datetime(2026, 3, 20, tzinfo=UTC)
APR = datetime(2026, 4, 20, tzinfo=UTC)
MAY = datetime(2026, 5, 20, tzinfo=UTC)
JUN = datetime(2026, 6, 20, tzinfo=UTC)


def record(engine: Engine, kind: ActivityKind, ids: list[str], **kw: object):
    return engine.record_activity(ActivityRequest(T, kind, ids, **kw))  # type: ignore[arg-type]


def send(engine: Engine, contact: str, kind: MessageKind = MessageKind.CAMPAIGN, **kw: object):
    return engine.check_send(SendRequest(T, contact, Channel.EMAIL, kind, **kw))  # type: ignore[arg-type]


# -- presets ---------------------------------------------------------------------------------


def test_each_preset_resolves_to_the_api_table(engine: Engine) -> None:
    """api.md Presets: the four models' settings (AC-7, AC-9, AC-1, SG-3, CR-1, CR-3, CR-6, MK-1, MK-4)."""
    p, _ = engine.put_plan("m1", preset("contact-limit", contact_limit=100))
    assert (p.metering, p.enforcement, p.grace_percent, p.ceiling) == (
        Metering.HELD_CONTACTS,
        Enforcement.GRACE,
        10,
        110,
    )
    assert dict(p.source_rules) == {
        ContactSource.API: SourcePolicy.OVER_LIMIT_ALLOWED,
        ContactSource.FORM: SourcePolicy.OVER_LIMIT_ALLOWED,
        ContactSource.IMPORT: SourcePolicy.REFUSE_IF_EXCEEDS,
        ContactSource.MANUAL: SourcePolicy.BLOCKED_AT_LIMIT,
    }
    assert p.counted_kinds == (MessageKind.CAMPAIGN, MessageKind.AUTOMATION)
    assert (p.max_queue_us, p.notify_thresholds, p.renotify_interval_us) == (24 * HOUR_US, (0.9, 1.0), 15 * DAY_US)

    p, _ = engine.put_plan("m2", preset("active-cycle-hard", contact_limit=500))
    assert (p.metering, p.enforcement, p.sends_per_contact, p.effective_sends_limit) == (
        Metering.CYCLE_ACTIVE,
        Enforcement.HARD,
        10,
        5_000,
    )
    assert p.counted_activities == (ActivityKind.MESSAGE_SENT,)
    assert p.notify_thresholds == (0.8, 1.0)

    for name, included in (("START", 50), ("GROW", 250), ("EXPAND", 500), ("SCALE", 2_000), ("grow", 250)):
        p, _ = engine.put_plan("m3", preset("active-cycle-overage", plan_name=name))
        assert p.contact_limit == included
    assert (p.enforcement, p.overage_unit_price, p.currency, p.ceiling) == (Enforcement.OVERAGE, "0.25", "EUR", None)
    assert set(p.counted_kinds) == set(MessageKind)
    assert set(p.counted_activities) == set(ActivityKind) - {
        ActivityKind.CONTACT_DELETED,
        ActivityKind.MARKETING_STATUS_SET,
    }

    p, _ = engine.put_plan("m4", preset("marketing-contacts", contact_limit=1_000))
    assert (p.metering, p.enforcement, p.marketing_contacts_only, p.overage_unit_price) == (
        Metering.HELD_CONTACTS,
        Enforcement.OVERAGE,
        True,
        "",
    )
    assert p.counted_kinds == (MessageKind.CAMPAIGN, MessageKind.AUTOMATION)
    assert p.notify_thresholds == (0.8, 0.9, 1.0)


def test_explicit_fields_override_a_presets(engine: Engine) -> None:
    """api.md Presets: a field given beside the preset wins (CR-3 figure, SG-3 allowance, AC-7 grace)."""
    p, _ = engine.put_plan("a", preset("active-cycle-overage", plan_name="GROW", contact_limit=300))
    assert p.contact_limit == 300
    p, _ = engine.put_plan("b", preset("active-cycle-hard", contact_limit=10, sends_limit=25))
    assert (p.sends_per_contact, p.effective_sends_limit) == (0, 25)
    p, _ = engine.put_plan("c", preset("contact-limit", contact_limit=10, grace_percent=20))
    assert p.ceiling == 12
    p, _ = engine.put_plan("d", preset("contact-limit", contact_limit=10, enforcement=Enforcement.HARD))
    assert (p.grace_percent, p.ceiling) == (0, 10)
    p, _ = engine.put_plan(
        "e", preset("marketing-contacts", contact_limit=10, overage_unit_price="0.40", currency="USD")
    )
    assert (p.overage_unit_price, p.currency) == ("0.40", "USD")


@pytest.mark.parametrize(
    ("given", "field"),
    [
        (preset("no-such-preset", contact_limit=5), "plan.preset"),
        (preset("active-cycle-overage"), "plan.contact_limit"),
        (preset("active-cycle-overage", plan_name="PLATINUM"), "plan.contact_limit"),
        (preset("contact-limit", contact_limit=5, grace_percent=101), "plan.grace_percent"),
        (preset("active-cycle-hard", contact_limit=5, grace_percent=10), "plan.grace_percent"),
        (preset("active-cycle-hard", contact_limit=5, marketing_contacts_only=True), "plan.marketing_contacts_only"),
        (
            preset("contact-limit", contact_limit=5, counted_activities=(ActivityKind.NOTE_ADDED,)),
            "plan.counted_activities",
        ),
        (preset("active-cycle-overage", plan_name="START", overage_unit_price="-0.25"), "plan.overage_unit_price"),
        (preset("marketing-contacts", contact_limit=-1), "plan.contact_limit"),
    ],
)
def test_bad_or_contradictory_plans_are_refused_naming_the_field(engine: Engine, given: PlanInput, field: str) -> None:
    """api.md Errors: unknown preset, grace over 100%, negative prices, contradictory fields change nothing."""
    before = rows_of(engine.ledger)
    with pytest.raises(InvalidArgument) as err:
        engine.put_plan(T, given)
    assert err.value.field == field
    assert rows_of(engine.ledger) == before
    with pytest.raises(NotFound):
        engine.get_plan(T)


# -- held contacts across cycles ---------------------------------------------------------------


def test_held_count_is_carried_through_quiet_cycles_and_peaks_stay_with_their_cycle(
    engine: Engine, clock: FakeClock
) -> None:
    """AC-10: deleting lowers the count at once, but the cycle's invoice uses its highest count;
    cycles without a change keep the count they started with."""
    engine.put_plan(T, preset("contact-limit", contact_limit=4, overage_unit_price="2.00", currency="EUR"))
    assert add(engine, ids("c", 6)).decision is Decision.ALLOW
    record(engine, ActivityKind.CONTACT_DELETED, ["c000", "c001", "c002"])
    now = engine.get_usage(T)
    assert (now.active_contacts, now.peak_contacts, now.overage_contacts, now.overage_amount) == (3, 6, 2, "4.00")

    clock.set(MAY)
    for month in (MAR, APR, MAY):
        u = engine.get_usage(T, to_us(month))
        assert (u.active_contacts, u.peak_contacts, u.overage_contacts) == (3, 3, 0), month
    add(engine, ["n1", "n2"])
    clock.set(JUN)
    record(engine, ActivityKind.CONTACT_DELETED, ["n1"])
    for month, figures in ((FEB, (3, 6)), (MAR, (3, 3)), (APR, (3, 3)), (MAY, (5, 5)), (JUN, (4, 5))):
        u = engine.get_usage(T, to_us(month))
        assert (u.active_contacts, u.peak_contacts) == figures, month
    lines = engine.get_invoice(T, to_us(FEB)).lines
    assert [(line.description, line.quantity, line.amount) for line in lines] == [
        ("Contacts included in the plan", 4, "0.00"),
        ("Highest contacts held this cycle", 6, "0.00"),
        ("Overage contacts", 2, "4.00"),
    ]


def test_a_non_marketing_switch_takes_effect_at_the_next_cycle_even_without_a_write(
    engine: Engine, clock: FakeClock, db_path: Path
) -> None:
    """MK-6: set non-marketing, the contact counts and receives until the cycle ends, then neither;
    MK-5: the flag and the source are kept; MK-3: marketing mail is then refused."""
    engine.put_plan(T, preset("marketing-contacts", contact_limit=3))
    add(engine, ["a", "b", "c"])
    record(engine, ActivityKind.MARKETING_STATUS_SET, ["a"], marketing=False, source_type="WORKFLOW", source_id="w1")
    contact = engine.get_contact(T, "a")
    assert (contact.marketing, contact.marketing_until_next_update, contact.marketing_source_type) == (
        True,
        True,
        "WORKFLOW",
    )
    assert send(engine, "a").decision.reason is Reason.OK
    assert engine.get_usage(T).active_contacts == 3

    clock.set(MAR)
    contact = engine.get_contact(T, "a")
    assert (contact.marketing, contact.marketing_until_next_update, contact.marketing_source_id) == (False, False, "w1")
    assert engine.get_usage(T).active_contacts == 2
    assert send(engine, "a").decision.reason is Reason.NOT_MARKETING_CONTACT
    assert engine.get_usage(T, to_us(FEB)).peak_contacts == 3

    clock.set(APR)
    record(engine, ActivityKind.MARKETING_STATUS_SET, ["d"], marketing=True)
    conn = sqlite3.connect(db_path)
    try:
        stored = conn.execute("SELECT marketing, marketing_until_next_update FROM contacts WHERE contact_id = 'a'")
        assert stored.fetchone() == (0, 0)
        holdings = conn.execute("SELECT held, marketing, pending FROM holdings WHERE tenant_id = ?", (T,)).fetchone()
        assert holdings == (4, 3, 0)
    finally:
        conn.close()
    assert [engine.get_usage(T, to_us(m)).active_contacts for m in (FEB, MAR, APR)] == [3, 2, 3]


def test_setting_marketing_again_cancels_a_pending_switch(engine: Engine, clock: FakeClock) -> None:
    """MK-6: setting marketing takes effect at once, and clears the until-next-update flag."""
    engine.put_plan(T, preset("marketing-contacts", contact_limit=3))
    add(engine, ["a"])
    record(engine, ActivityKind.MARKETING_STATUS_SET, ["a"], marketing=False)
    record(engine, ActivityKind.MARKETING_STATUS_SET, ["a"], marketing=True, source_type="USER", source_id="u7")
    clock.set(MAR)
    contact = engine.get_contact(T, "a")
    assert (contact.marketing, contact.marketing_until_next_update, contact.marketing_source_id) == (True, False, "u7")
    assert engine.get_usage(T).active_contacts == 1


def test_non_marketing_adds_are_free_and_never_refused_by_a_refusing_source(engine: Engine) -> None:
    """MK-1: non-marketing contacts do not count; AC-4 applies to what would count."""
    engine.put_plan(
        T,
        preset(
            "marketing-contacts",
            contact_limit=2,
            enforcement=Enforcement.HARD,
            source_rules=((ContactSource.IMPORT, SourcePolicy.REFUSE_IF_EXCEEDS),),
        ),
    )
    free = add(engine, ids("n", 5), ContactSource.IMPORT, marketing=False)
    assert (free.decision, free.added, free.usage.active_contacts) == (Decision.ALLOW, 5, 0)
    refused = add(engine, ids("m", 3), ContactSource.IMPORT)
    assert (refused.decision, refused.reason, refused.usage.active_contacts) == (
        Decision.DENY,
        Reason.IMPORT_EXCEEDS_LIMIT,
        0,
    )


def test_a_contact_add_dry_run_and_a_retry_change_nothing(engine: Engine) -> None:
    """AC-4 pre-flight: a dry run decides without adding; a request_id retry adds nothing twice."""
    engine.put_plan(T, preset("contact-limit", contact_limit=3))
    before = rows_of(engine.ledger)
    dry = add(engine, ids("c", 3), ContactSource.IMPORT, dry_run=True)
    assert (dry.decision, dry.added, dry.usage.active_contacts) == (Decision.ALLOW, 3, 3)
    assert rows_of(engine.ledger) == before
    first = add(engine, ids("c", 2), ContactSource.IMPORT, request_id="imp-1")
    again = add(engine, ids("c", 2), ContactSource.IMPORT, request_id="imp-1")
    assert first == again and first.added == 2
    assert engine.get_usage(T).active_contacts == 2
    with pytest.raises(InvalidArgument) as err:
        add(engine, ids("x", 1), ContactSource.IMPORT, request_id="imp-1")
    assert err.value.field == "request_id"


def test_contact_adds_under_cycle_active_activate_only_when_creation_counts(engine: Engine) -> None:
    """CR-1a: under active-cycle-overage a created contact is active at once; under
    active-cycle-hard (SG-1: only e-mail activates) it is held but not active."""
    engine.put_plan(T, preset("active-cycle-overage", plan_name="START"))
    out = add(engine, ids("c", 3))
    assert (out.added, out.usage.active_contacts) == (3, 3)
    engine.put_plan("hard", preset("active-cycle-hard", contact_limit=3))
    out = engine.check_contact_add(ContactAddRequest("hard", ContactSource.API, ids("c", 3)))
    assert (out.added, out.usage.active_contacts) == (3, 0)


def test_enrolment_follows_the_ceiling_for_both_meterings(engine: Engine) -> None:
    """AC-8 with AC-7's grace: enrolments stop past the ceiling (held) or for new contacts at it
    (cycle-active); SG-2: contacts already active may still be enrolled."""
    engine.put_plan(T, preset("contact-limit", contact_limit=10))
    add(engine, ids("c", 11))
    assert engine.check_enroll(T, "c000", "welcome").decision is Decision.ALLOW
    assert engine.check_enroll(T, "stranger", "welcome").reason is Reason.UNKNOWN_CONTACT
    add(engine, ["c011"])
    denied = engine.check_enroll(T, "c000", "welcome")
    assert (denied.decision, denied.reason, denied.usage.state) == (
        Decision.DENY,
        Reason.OVER_GRACE,
        UsageState.BLOCKED,
    )

    engine.put_plan("sg", preset("active-cycle-hard", contact_limit=1))
    engine.check_send(SendRequest("sg", "x", Channel.EMAIL, MessageKind.CAMPAIGN))
    assert engine.check_enroll("sg", "x").reason is Reason.ALREADY_ACTIVE
    assert engine.check_enroll("sg", "y").reason is Reason.CONTACT_LIMIT_REACHED


# -- plan versions and invoices ----------------------------------------------------------------


def test_a_past_cycle_is_invoiced_under_the_plan_it_ended_with(engine: Engine, clock: FakeClock) -> None:
    """CR-6, CR-7: overage of a cycle is billed at that cycle's price and limit, monthly even on an
    annual plan, after the plan was changed later (CR-4 add-ons count at once)."""
    engine.put_plan(T, preset("active-cycle-overage", contact_limit=2, billing_interval=BillingInterval.ANNUAL))
    record(engine, ActivityKind.NOTE_ADDED, ids("c", 5))
    clock.set(MAR)
    engine.put_plan(T, preset("active-cycle-overage", contact_limit=2, addon_contacts=1, overage_unit_price="0.30"))
    record(engine, ActivityKind.NOTE_ADDED, ids("c", 5))
    feb = engine.get_invoice(T, to_us(FEB))
    assert feb.usage.overage_amount == "0.75"
    assert feb.lines[-1].description == "Overage contacts (annual plan, overage invoiced monthly)"
    assert (feb.lines[-1].quantity, feb.lines[-1].unit_price, feb.lines[-1].amount) == (3, "0.25", "0.75")
    mar = engine.get_invoice(T)
    assert [(line.description, line.quantity) for line in mar.lines] == [
        ("Contacts included in the plan", 2),
        ("Add-on contacts", 1),
        ("Contacts active this cycle", 5),
        ("Overage contacts", 2),
    ]
    assert Decimal(mar.lines[-1].amount) == Decimal("0.60")


# -- the schema-v2 migration -------------------------------------------------------------------


def test_a_v1_ledger_is_migrated_with_its_held_contacts_and_pending_switches(db_path: Path) -> None:
    """MK-6 across an upgrade: a v1 ledger's contacts become holdings; a switch already due is applied,
    one not yet due stays pending until the next cycle."""
    migrate(db_path, target=1)
    db = sqlite_utils.Database(str(db_path))
    anchor = to_us(ANCHOR)
    plan = Plan(Metering.HELD_CONTACTS, Enforcement.OVERAGE, 10, anchor, marketing_contacts_only=True)
    db.execute("INSERT INTO plans VALUES (?, ?, ?)", (T, plan.to_json(), anchor))
    rows = [
        ("kept", 1, 1, 0, to_us(JAN)),
        ("due", 1, 1, 1, to_us(JAN)),
        ("pending", 1, 1, 1, to_us(NOW)),
        ("gone", 0, 0, 0, to_us(NOW)),
        ("plain", 1, 0, 0, to_us(NOW)),
    ]
    db.conn.executemany(
        "INSERT INTO contacts (tenant_id, contact_id, held, marketing, marketing_until_next_update,"
        " marketing_source_type, marketing_source_id, updated_at_us) VALUES (?, ?, ?, ?, ?, '', '', ?)",
        [(T, *row) for row in rows],
    )
    db.conn.commit()
    db.close()

    clock = FakeClock(NOW)
    ledger = SQLiteLedger(db_path)
    ledger.open()
    try:
        engine = Engine(ledger, clock)
        assert engine.get_usage(T).active_contacts == 2
        assert not engine.get_contact(T, "due").marketing
        assert engine.get_contact(T, "pending").marketing_until_next_update
        clock.set(MAR)
        assert engine.get_usage(T).active_contacts == 1
        assert engine.get_usage(T, to_us(NOW)).peak_contacts == 2
        assert engine.get_plan(T) == plan
    finally:
        ledger.close()


def test_a_new_cycle_anchor_keeps_held_contacts_and_switches_pending_ones_at_the_close(
    engine: Engine, clock: FakeClock
) -> None:
    """MK-6 and AC-6 across a change of subscription anchor: the change closes the current cycle, so the held
    count is kept, a pending switch to non-marketing happens at the change (the next cycle boundary) and the
    closed cycle still counts the contact; the new cycle runs to the new anchor's next boundary."""
    engine.put_plan(T, preset("marketing-contacts", contact_limit=5))
    add(engine, ["a", "b"])
    record(engine, ActivityKind.MARKETING_STATUS_SET, ["a"], marketing=False)
    new_anchor = datetime(2026, 1, 12, tzinfo=UTC)
    _, usage = engine.put_plan(T, preset("marketing-contacts", contact_limit=5, cycle_anchor_us=to_us(new_anchor)))
    assert (usage.cycle_start_us, usage.cycle_end_us) == (to_us(NOW), to_us(datetime(2026, 3, 12, tzinfo=UTC)))
    assert usage.active_contacts == 1
    state = engine.get_contact(T, "a")
    assert state.held and not state.marketing and not state.marketing_until_next_update
    closed = engine.get_usage(T, to_us(NOW) - 1)
    assert (closed.cycle_end_us, closed.active_contacts) == (to_us(NOW), 2)
    clock.set(datetime(2026, 3, 12, tzinfo=UTC))
    assert engine.get_usage(T).active_contacts == 1


# -- the schema-v4 migration -------------------------------------------------------------------


def test_a_v3_ledger_keeps_every_activation_and_its_sends_through_the_compact_schema(db_path: Path) -> None:
    """SG-1, SG-2, SG-8 across an upgrade: a v3 ledger's activations (two tenants, two cycles) move into the
    compact v4 rows unchanged, readable through the `activations` view; a migrated contact is ALREADY_ACTIVE
    and counts no second time, a new one is counted."""
    migrate(db_path, target=3)
    db = sqlite_utils.Database(str(db_path))
    anchor = to_us(ANCHOR)
    plan = Plan(Metering.CYCLE_ACTIVE, Enforcement.HARD, 10, anchor, counted_kinds=(MessageKind.CAMPAIGN,))
    for tenant in (T, "other"):
        db.execute("INSERT INTO plans VALUES (?, ?, ?)", (tenant, plan.to_json(), anchor))
    feb, mar = cycle_at(anchor, to_us(NOW)), cycle_at(anchor, to_us(MAR))
    rows = [
        (T, feb.start_us, "a", feb.start_us + 5, "CAMPAIGN", 3),
        (T, feb.start_us, "b", feb.start_us + 9, "MESSAGE_SENT", 0),
        (T, mar.start_us, "a", mar.start_us + 1, "CAMPAIGN", 1),
        ("other", feb.start_us, "a", feb.start_us + 2, "CAMPAIGN", 2),
    ]
    db.conn.executemany("INSERT INTO activations VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.conn.executemany(
        "INSERT INTO usage (tenant_id, cycle_start_us, active_contacts, sends) VALUES (?, ?, ?, ?)",
        [(T, feb.start_us, 2, 3), (T, mar.start_us, 1, 1), ("other", feb.start_us, 1, 2)],
    )
    db.conn.commit()
    db.close()

    ledger = SQLiteLedger(db_path)
    ledger.open()
    try:
        engine = Engine(ledger, FakeClock(MAR))
        again = engine.check_send(SendRequest(T, "a", Channel.EMAIL, MessageKind.CAMPAIGN))
        fresh = engine.check_send(SendRequest(T, "c", Channel.EMAIL, MessageKind.CAMPAIGN))
        assert again.decision.reason is Reason.ALREADY_ACTIVE
        assert fresh.decision.reason is Reason.NEW_CONTACT_COUNTED
        assert (fresh.usage.active_contacts, fresh.usage.sends) == (2, 3)
        assert engine.get_usage(T, feb.start_us).active_contacts == 2
        assert engine.get_usage("other", feb.start_us).sends == 2
    finally:
        ledger.close()
    conn = sqlite3.connect(db_path)
    try:
        kept = conn.execute("SELECT * FROM activations WHERE contact_id IN ('a', 'b') ORDER BY 1, 2, 3").fetchall()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()
    assert version == SCHEMA_VERSION
    assert sorted(kept) == sorted([*rows[:2], (T, mar.start_us, "a", mar.start_us + 1, "CAMPAIGN", 2), rows[3]])
