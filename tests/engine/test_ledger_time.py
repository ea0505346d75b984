"""Ledger time: a wall clock stepping back never makes a decision earlier than one already committed.

The engine runs over a real SQLite ledger file with a fake clock that the tests step back, across a
cycle boundary (the cycle anchored on the 15th at 08:00 turns at BOUNDARY). Rule ids refer to
docs/domain.md.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlite_utils

from quota_sidecar.server.domain.clock import FakeClock, to_us
from quota_sidecar.server.domain.model import ActivityKind, Channel, ContactSource, MessageKind
from quota_sidecar.server.engine import (
    ActivityRequest,
    ContactAddRequest,
    Engine,
    PlanInput,
    SendRequest,
)
from quota_sidecar.server.ledger.sqlite import SQLiteLedger, _keep_ledger_time

from support.oracle import assert_figures_equal_rows

T = "tenant-t"
ANCHOR = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
BOUNDARY = datetime(2026, 3, 15, 8, 0, tzinfo=UTC)
PREVIOUS = datetime(2026, 2, 15, 8, 0, tzinfo=UTC)
NEXT = datetime(2026, 4, 15, 8, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(BOUNDARY - timedelta(days=2))


def preset(name: str, **fields: object) -> PlanInput:
    return PlanInput(**{"preset": name, "cycle_anchor_us": to_us(ANCHOR), **fields})  # type: ignore[arg-type]


def set_non_marketing(engine: Engine, contact_id: str) -> None:
    engine.record_activity(
        ActivityRequest(T, ActivityKind.MARKETING_STATUS_SET, [contact_id], marketing=False, source_type="USER")
    )


def test_model4_clock_stepping_back_across_a_cycle_boundary_keeps_figures_equal_to_rows(
    engine: Engine, clock: FakeClock
) -> None:
    """MK-6 under a wall clock stepped back 30 s across the cycle start: the contact set non-marketing after
    the step is decided at ledger time (in the new cycle), both contacts switch at the next cycle start,
    and the holdings equal the contacts rows throughout."""
    engine.put_plan(T, preset("marketing-contacts", contact_limit=10))
    engine.check_contact_add(ContactAddRequest(T, ContactSource.API, ["m1", "m2", "m3"]))
    clock.set(BOUNDARY + timedelta(seconds=10))
    set_non_marketing(engine, "m1")
    clock.set(BOUNDARY - timedelta(seconds=20))
    set_non_marketing(engine, "m2")
    assert_figures_equal_rows(engine.ledger)
    clock.set(BOUNDARY + timedelta(seconds=40))
    set_non_marketing(engine, "m3")
    assert_figures_equal_rows(engine.ledger)
    assert engine.get_usage(T).active_contacts == 3

    clock.set(NEXT + timedelta(seconds=1))
    engine.check_contact_add(ContactAddRequest(T, ContactSource.API, ["m4"]))
    assert_figures_equal_rows(engine.ledger)
    assert [engine.get_contact(T, c).marketing for c in ("m1", "m2", "m3")] == [False, False, False]
    assert engine.get_usage(T).active_contacts == 1
    assert engine.get_usage(T, to_us(BOUNDARY)).peak_contacts == 3


def test_model2_a_send_after_a_clock_step_back_counts_in_the_current_cycle(engine: Engine, clock: FakeClock) -> None:
    """SG-1, CR-1: a contact first sent to after the clock stepped back across the cycle start is active in
    the cycle already begun, activated no earlier than the last committed decision, not in the cycle before."""
    engine.put_plan(T, preset("active-cycle-hard", contact_limit=10))
    clock.set(BOUNDARY + timedelta(seconds=10))
    engine.check_send(SendRequest(T, "c1", Channel.EMAIL, MessageKind.CAMPAIGN))
    clock.set(BOUNDARY - timedelta(seconds=20))
    after = engine.check_send(SendRequest(T, "c2", Channel.EMAIL, MessageKind.CAMPAIGN))
    assert (after.usage.cycle_start_us, after.usage.active_contacts) == (to_us(BOUNDARY), 2)
    found = assert_figures_equal_rows(engine.ledger)[T]
    rows = sorted((a.contact_id, start, a.activated_at_us) for start, c in found.cycles.items() for a in c.activations)
    assert [r[:2] for r in rows] == [("c1", to_us(BOUNDARY)), ("c2", to_us(BOUNDARY))]
    assert rows[1][2] >= rows[0][2]
    assert engine.get_usage(T, to_us(PREVIOUS)).active_contacts == 0


def test_model3_activity_after_a_clock_step_back_counts_in_the_current_cycle(engine: Engine, clock: FakeClock) -> None:
    """CR-1, CR-2: activity recorded without an instant after the clock stepped back is booked in the cycle
    the ledger has already reached."""
    engine.put_plan(T, preset("active-cycle-overage", contact_limit=10))
    clock.set(BOUNDARY + timedelta(seconds=10))
    engine.record_activity(ActivityRequest(T, ActivityKind.NOTE_ADDED, ["a1"]))
    clock.set(BOUNDARY - timedelta(seconds=20))
    later = engine.record_activity(ActivityRequest(T, ActivityKind.NOTE_ADDED, ["a2"]))
    assert (later.usage.cycle_start_us, later.usage.active_contacts) == (to_us(BOUNDARY), 2)


def test_ledger_time_survives_a_restart(db_path: Path, clock: FakeClock) -> None:
    """A sidecar restarted while its wall clock is behind the ledger decides at the ledger's time."""
    ledger = SQLiteLedger(db_path)
    ledger.open()
    engine = Engine(ledger, clock)
    engine.put_plan(T, preset("active-cycle-hard", contact_limit=10))
    clock.set(BOUNDARY + timedelta(seconds=10))
    engine.check_send(SendRequest(T, "c1", Channel.EMAIL, MessageKind.CAMPAIGN))
    ledger.close()

    clock.set(BOUNDARY - timedelta(seconds=20))
    ledger = SQLiteLedger(db_path)
    ledger.open()
    try:
        engine = Engine(ledger, clock)
        assert engine.get_usage(T).cycle_start_us == to_us(BOUNDARY)
        after = engine.check_send(SendRequest(T, "c2", Channel.EMAIL, MessageKind.CAMPAIGN))
        assert (after.usage.cycle_start_us, after.usage.active_contacts) == (to_us(BOUNDARY), 2)
        assert engine.get_contact(T, "c2").activated_at_us >= to_us(BOUNDARY + timedelta(seconds=10))
    finally:
        ledger.close()


def test_a_clock_step_back_is_logged_once_per_step(
    engine: Engine, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """One WARNING names the step, however many calls are decided at ledger time while the clock is behind;
    the next step once the clock has caught up is logged again."""
    engine.put_plan(T, preset("active-cycle-hard", contact_limit=10))
    clock.set(BOUNDARY + timedelta(seconds=10))
    engine.check_send(SendRequest(T, "c0", Channel.EMAIL, MessageKind.CAMPAIGN))
    caplog.set_level(logging.WARNING, logger="quota_sidecar.clock")
    clock.set(BOUNDARY - timedelta(seconds=20))
    for n in range(5):
        engine.check_send(SendRequest(T, f"c{n + 1}", Channel.EMAIL, MessageKind.CAMPAIGN))
        engine.get_usage(T)
    steps = [r.getMessage() for r in caplog.records if r.name == "quota_sidecar.clock"]
    assert steps == ["clock stepped back by 30.000 s; deciding at ledger time"]

    clock.set(BOUNDARY + timedelta(minutes=5))
    engine.check_send(SendRequest(T, "c9", Channel.EMAIL, MessageKind.CAMPAIGN))
    clock.set(BOUNDARY + timedelta(minutes=4))
    engine.check_send(SendRequest(T, "c10", Channel.EMAIL, MessageKind.CAMPAIGN))
    steps = [r.getMessage() for r in caplog.records if r.name == "quota_sidecar.clock"]
    assert steps[1:] == ["clock stepped back by 60.000 s; deciding at ledger time"]


def test_an_upgraded_ledger_starts_its_time_at_the_latest_instant_it_stores(db_path: Path, clock: FakeClock) -> None:
    """The migration that adds ledger time starts it at the latest instant the sidecar wrote (a contact's
    update here), so the first start after the upgrade already refuses to decide before it."""
    ledger = SQLiteLedger(db_path)
    ledger.open()
    engine = Engine(ledger, clock)
    engine.put_plan(T, preset("contact-limit", contact_limit=10))
    clock.set(BOUNDARY + timedelta(seconds=10))
    engine.check_contact_add(ContactAddRequest(T, ContactSource.API, ["h1"]))
    ledger.close()
    db = sqlite_utils.Database(str(db_path))
    with db.conn:
        db.execute("DROP TABLE ledger_time")
        _keep_ledger_time(db)
    assert db.execute("SELECT at_us FROM ledger_time").fetchall() == [(to_us(BOUNDARY + timedelta(seconds=10)),)]
    db.close()

    clock.set(BOUNDARY - timedelta(seconds=20))
    ledger = SQLiteLedger(db_path)
    ledger.open()
    try:
        assert Engine(ledger, clock).get_usage(T).cycle_start_us == to_us(BOUNDARY)
    finally:
        ledger.close()
