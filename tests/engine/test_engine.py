"""The decision engine (server/engine/engine.py) over a real SQLite ledger and a fake clock.

Rule ids refer to docs/domain.md; "Decision rules" to docs/api.md. Every plan here
is CYCLE_ACTIVE metering (models 2 and 3); the SG rules are exercised under HARD
enforcement, GRACE and OVERAGE beside them.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from quota_sidecar.server.domain.clock import MICROS, FakeClock, to_us
from quota_sidecar.server.domain.errors import InvalidArgument, NotFound
from quota_sidecar.server.domain.model import (
    LIMIT_REASONS,
    ActivityKind,
    Channel,
    Decision,
    Enforcement,
    MessageKind,
    Reason,
    UsageState,
)
from quota_sidecar.server.engine import (
    ActivityRequest,
    BatchRequest,
    Engine,
    SendRequest,
)
from quota_sidecar.server.ledger.sqlite import SQLiteLedger

from support.engine import ANCHOR, AUTOMATION, CAMPAIGN, MESSAGE_SENT, NOW, TRANSACTIONAL, T, batch, plan, record, send
from support.oracle import assert_figures_equal_rows
from support.sidecar import rows_of

UTC = UTC
# the cycle containing NOW
CYCLE_START = datetime(2026, 2, 15, 8, 0, tzinfo=UTC)
CYCLE_END = datetime(2026, 3, 15, 8, 0, tzinfo=UTC)
HOUR_US = 3600 * MICROS


# -- fixtures and helpers ----------------------------------------------------------------------


def usage(engine: Engine, tenant: str = T, at: datetime | None = None):
    return engine.get_usage(tenant, to_us(at) if at is not None else None)


def fill(engine: Engine, n: int, prefix: str = "c", tenant: str = T) -> list[str]:
    ids = [f"{prefix}{i:05d}" for i in range(n)]
    out = batch(engine, ids, tenant=tenant)
    assert out.allowed == n and out.newly_active == n
    return ids


def allow(outcome, reason: Reason, newly: bool) -> None:
    assert (outcome.decision.decision, outcome.decision.reason, outcome.decision.newly_active) == (
        Decision.ALLOW,
        reason,
        newly,
    )


# -- SG-1 / SG-6: the first send in the cycle activates ----------------------------------------


def test_sg1_sg6_first_send_in_cycle_activates_and_counts_one_contact_and_one_send(engine: Engine, clock: FakeClock):
    engine.put_plan(T, plan(3))
    out = send(engine, "alice")
    allow(out, Reason.NEW_CONTACT_COUNTED, True)
    u = out.usage
    assert (u.active_contacts, u.sends, u.contact_limit) == (1, 1, 3)
    assert (u.cycle_start_us, u.cycle_end_us) == (to_us(CYCLE_START), to_us(CYCLE_END))
    assert u.usage_ratio == pytest.approx(1 / 3)
    assert usage(engine) == u
    state = engine.get_contact(T, "alice")
    assert state.active_this_cycle and state.activated_at_us == clock.now_us()


# -- SG-8: a second send in the cycle counts no second contact ---------------------------------


def test_sg8_second_send_in_cycle_does_not_count_again(engine: Engine, clock: FakeClock):
    engine.put_plan(T, plan(3))
    send(engine, "alice")
    clock.advance(3600)
    out = send(engine, "alice")
    allow(out, Reason.ALREADY_ACTIVE, False)
    assert (out.usage.active_contacts, out.usage.sends) == (1, 2)
    # activated_at stays the first send's instant
    assert engine.get_contact(T, "alice").activated_at_us == to_us(NOW)


def test_sg8_other_message_kinds_that_count_also_see_the_contact_as_already_active(engine: Engine):
    engine.put_plan(T, plan(3))
    send(engine, "alice", CAMPAIGN)
    allow(send(engine, "alice", AUTOMATION), Reason.ALREADY_ACTIVE, False)
    assert usage(engine).active_contacts == 1


# -- SG-2: the limit is never exceeded ---------------------------------------------------------


def test_sg2_limit_plus_first_new_contact_is_denied_contact_limit_reached(engine: Engine):
    engine.put_plan(T, plan(3))
    for c in ("a", "b", "c"):
        allow(send(engine, c), Reason.NEW_CONTACT_COUNTED, True)
    out = send(engine, "d")
    assert (out.decision.decision, out.decision.reason, out.decision.newly_active) == (
        Decision.DENY,
        Reason.CONTACT_LIMIT_REACHED,
        False,
    )
    assert (out.usage.active_contacts, out.usage.sends) == (3, 3)
    with pytest.raises(NotFound):
        engine.get_contact(T, "d")


def test_sg2_addon_contacts_raise_the_limit(engine: Engine):
    engine.put_plan(T, plan(2, addon_contacts=1))
    fill(engine, 3)
    assert usage(engine).contact_limit == 3
    assert send(engine, "x").decision.reason is Reason.CONTACT_LIMIT_REACHED


def test_sg2_upgrade_mid_cycle_lets_new_contacts_in_at_once(engine: Engine):
    engine.put_plan(T, plan(2))
    fill(engine, 2)
    assert send(engine, "new").decision.decision is Decision.DENY
    engine.put_plan(T, plan(3))
    allow(send(engine, "new"), Reason.NEW_CONTACT_COUNTED, True)
    assert usage(engine).active_contacts == 3


# -- SG-3 / SG-4: the sends allowance ----------------------------------------------------------


def test_sg3_sends_limit_denies_already_active_contacts(engine: Engine):
    engine.put_plan(T, plan(10, sends_limit=3))
    send(engine, "a")
    send(engine, "a")
    allow(send(engine, "a"), Reason.ALREADY_ACTIVE, False)
    out = send(engine, "a")
    assert (out.decision.decision, out.decision.reason) == (Decision.DENY, Reason.SENDS_LIMIT_REACHED)
    assert (out.usage.sends, out.usage.sends_limit, out.usage.state) == (3, 3, UsageState.BLOCKED)


def test_sg3_sends_limit_denies_new_contacts_without_activating_them(engine: Engine):
    engine.put_plan(T, plan(10, sends_limit=2))
    send(engine, "a")
    send(engine, "a")
    out = send(engine, "b")
    assert (out.decision.decision, out.decision.reason, out.decision.newly_active) == (
        Decision.DENY,
        Reason.SENDS_LIMIT_REACHED,
        False,
    )
    assert (out.usage.active_contacts, out.usage.sends) == (1, 2)


def test_sg3_sg4_sends_per_contact_multiplies_the_limit_including_addons(engine: Engine):
    _, u = engine.put_plan(T, plan(2, addon_contacts=1, sends_per_contact=10))
    assert u.sends_limit == 30
    assert engine.get_plan(T).effective_sends_limit == 30


def test_sg4_raising_the_limit_mid_cycle_raises_the_sends_allowance_and_unblocks(engine: Engine):
    engine.put_plan(T, plan(2, sends_per_contact=2))  # sends allowance 4
    for c in ("a", "b", "a", "b"):
        assert send(engine, c).decision.decision is Decision.ALLOW
    blocked = send(engine, "a")
    assert blocked.decision.reason is Reason.SENDS_LIMIT_REACHED
    assert blocked.usage.state is UsageState.BLOCKED
    _, u = engine.put_plan(T, plan(3, sends_per_contact=2))  # sends allowance 6, at once
    assert (u.sends_limit, u.sends, u.state) == (6, 4, UsageState.OK)
    allow(send(engine, "a"), Reason.ALREADY_ACTIVE, False)
    allow(send(engine, "c"), Reason.NEW_CONTACT_COUNTED, True)
    assert (usage(engine).sends, usage(engine).active_contacts) == (6, 3)


def test_sg4_addon_purchase_mid_cycle_raises_sends_allowance(engine: Engine):
    engine.put_plan(T, plan(1, sends_per_contact=1))
    send(engine, "a")
    assert send(engine, "a").decision.reason is Reason.SENDS_LIMIT_REACHED
    engine.put_plan(T, plan(1, addon_contacts=1, sends_per_contact=1))
    allow(send(engine, "a"), Reason.ALREADY_ACTIVE, False)


# -- SG-5: the pre-flight dry run --------------------------------------------------------------


def test_sg5_dry_run_batch_reports_what_would_happen_and_counts_nothing(engine: Engine):
    engine.put_plan(T, plan(3))
    send(engine, "a")
    before = rows_of(engine.ledger)
    out = batch(engine, ["a", "b", "c", "d", "b", "e"], dry_run=True, request_id="preflight-1")
    got = [(c, d.decision, d.reason, d.newly_active) for c, d in out.results]
    assert got == [
        ("a", Decision.ALLOW, Reason.ALREADY_ACTIVE, False),
        ("b", Decision.ALLOW, Reason.NEW_CONTACT_COUNTED, True),
        # each decision sees the earlier ones: b and c fill the limit of 3
        ("c", Decision.ALLOW, Reason.NEW_CONTACT_COUNTED, True),
        ("d", Decision.DENY, Reason.CONTACT_LIMIT_REACHED, False),
        ("b", Decision.ALLOW, Reason.NEW_CONTACT_COUNTED, False),
        ("e", Decision.DENY, Reason.CONTACT_LIMIT_REACHED, False),
    ]
    assert (out.allowed, out.denied, out.newly_active) == (4, 2, 2)
    # the usage is what it would be after the batch
    assert (out.usage.active_contacts, out.usage.sends, out.usage.state) == (3, 4, UsageState.AT_LIMIT)
    # nothing counted, nothing stored (not even the request_id)
    assert rows_of(engine.ledger) == before
    assert (usage(engine).active_contacts, usage(engine).sends) == (1, 1)
    # the same request_id is free for a real batch: a dry run stored no answer
    real = batch(engine, ["b"], request_id="preflight-1")
    assert real.newly_active == 1


def test_sg5_dry_run_single_send_counts_nothing(engine: Engine):
    engine.put_plan(T, plan(1))
    before = rows_of(engine.ledger)
    out = send(engine, "a", dry_run=True, request_id="r1")
    allow(out, Reason.NEW_CONTACT_COUNTED, True)
    assert out.usage.active_contacts == 1
    assert rows_of(engine.ledger) == before
    # the dry run's request_id was not stored: a different real request may use it
    allow(send(engine, "b", request_id="r1"), Reason.NEW_CONTACT_COUNTED, True)


def test_sg5_dry_run_sees_the_sends_allowance_used_by_earlier_entries(engine: Engine):
    engine.put_plan(T, plan(10, sends_limit=3))
    send(engine, "a")
    out = batch(engine, ["a", "b", "c", "d"], dry_run=True)
    assert [d.reason for _, d in out.results] == [
        Reason.ALREADY_ACTIVE,
        Reason.NEW_CONTACT_COUNTED,
        Reason.SENDS_LIMIT_REACHED,
        Reason.SENDS_LIMIT_REACHED,
    ]
    assert usage(engine).sends == 1


# -- SG-7: the count resets at the cycle boundary ----------------------------------------------


def test_sg7_count_resets_at_the_cycle_boundary_and_past_figures_stay_readable(engine: Engine, clock: FakeClock):
    engine.put_plan(T, plan(2))
    fill(engine, 2)
    record(engine, ["c00001"], ActivityKind.CONTACT_CREATED)  # held, so get_contact knows it in any cycle
    assert engine.get_contact(T, "c00001").active_this_cycle is True
    assert send(engine, "x").decision.decision is Decision.DENY
    clock.set(to_us(CYCLE_END) - 1)  # 1 µs before the boundary: still the old cycle
    assert send(engine, "x").decision.reason is Reason.CONTACT_LIMIT_REACHED
    clock.set(CYCLE_END)  # exactly the boundary: the new cycle
    assert usage(engine).active_contacts == 0
    assert usage(engine).cycle_start_us == to_us(CYCLE_END)
    allow(send(engine, "x"), Reason.NEW_CONTACT_COUNTED, True)
    # a contact active last cycle is new again
    allow(send(engine, "c00000"), Reason.NEW_CONTACT_COUNTED, True)
    assert send(engine, "y").decision.reason is Reason.CONTACT_LIMIT_REACHED
    past = usage(engine, at=CYCLE_START + timedelta(days=3))
    assert (past.cycle_start_us, past.cycle_end_us, past.active_contacts, past.sends) == (
        to_us(CYCLE_START),
        to_us(CYCLE_END),
        2,
        2,
    )
    now = usage(engine)
    assert (now.active_contacts, now.sends) == (2, 2)
    assert engine.get_contact(T, "c00001").active_this_cycle is False


# -- SG-9 / SG-10: deleting contacts ------------------------------------------------------------


def test_sg9_contact_deleted_does_not_lower_the_count(engine: Engine):
    engine.put_plan(T, plan(3))
    fill(engine, 2)
    out = record(engine, ["c00000", "c00001"], ActivityKind.CONTACT_DELETED)
    assert (out.recorded, out.newly_active) == (2, 0)
    assert out.usage.active_contacts == 2
    assert usage(engine).active_contacts == 2
    state = engine.get_contact(T, "c00000")
    assert state.held is False and state.active_this_cycle is True


def test_sg10_at_the_limit_deleting_contacts_makes_no_room_but_active_contacts_still_get_mail(engine: Engine):
    engine.put_plan(T, plan(3))
    ids = fill(engine, 3)
    record(engine, ids[:2], ActivityKind.CONTACT_DELETED)
    out = send(engine, "newcomer")
    assert (out.decision.decision, out.decision.reason) == (Decision.DENY, Reason.CONTACT_LIMIT_REACHED)
    allow(send(engine, ids[2]), Reason.ALREADY_ACTIVE, False)
    allow(send(engine, ids[0]), Reason.ALREADY_ACTIVE, False)
    assert usage(engine).active_contacts == 3


def test_sg11_rotating_contacts_within_a_cycle_never_reaches_more_than_the_limit(engine: Engine):
    """SG-11: deleting the e-mailed contacts and creating new ones, round after round, cannot
    dodge the limit: across the whole cycle no more than `limit` distinct contacts are e-mailed."""
    engine.put_plan(T, plan(5))
    e_mailed: set[str] = set()
    for round_ in range(6):
        fresh = [f"r{round_}-{i}" for i in range(5)]
        record(engine, fresh, ActivityKind.CONTACT_CREATED)
        for contact_id in fresh:
            if send(engine, contact_id).decision.decision is Decision.ALLOW:
                e_mailed.add(contact_id)
        record(engine, fresh, ActivityKind.CONTACT_DELETED)
    assert len(e_mailed) == 5
    assert usage(engine).active_contacts == 5


# -- counted_kinds -----------------------------------------------------------------------------


def test_uncounted_kind_is_allowed_not_counted_and_touches_no_figure(engine: Engine):
    """MK-4 / api.md Decision rules: kinds not in counted_kinds are ALLOW NOT_COUNTED and touch no figure."""
    engine.put_plan(T, plan(1))
    send(engine, "a")
    before = rows_of(engine.ledger)
    # even at the limit, a transactional mail to a new contact goes out uncounted
    out = send(engine, "stranger", TRANSACTIONAL)
    allow(out, Reason.NOT_COUNTED, False)
    out = send(engine, "a", MessageKind.ONE_TO_ONE)
    allow(out, Reason.NOT_COUNTED, False)
    assert (out.usage.active_contacts, out.usage.sends) == (1, 1)
    b = batch(engine, ["x", "y", "x"], TRANSACTIONAL)
    assert [d.reason for _, d in b.results] == [Reason.NOT_COUNTED] * 3
    assert (b.allowed, b.denied, b.newly_active) == (3, 0, 0)
    after = rows_of(engine.ledger)
    # the answers kept for retries are request_replies on SQLite, request_results on PostgreSQL
    for table in {"usage", "activations", "contacts", "request_replies", "request_results"} & before.keys():
        assert after[table] == before[table], table
    with pytest.raises(NotFound):
        engine.get_contact(T, "stranger")


# -- batches ------------------------------------------------------------------------------------


def test_batch_results_in_request_order_duplicates_repeat_first_decision_and_count_once(engine: Engine):
    """SG-2, SG-8, api.md CheckSendBatch: results in request order; a repeated id repeats its first decision,
    newly_active false, counted once.
    """
    engine.put_plan(T, plan(3))
    send(engine, "m")
    out = batch(engine, ["z", "m", "a", "z", "q", "r", "a", "r"])
    got = [(c, d.decision, d.reason, d.newly_active) for c, d in out.results]
    assert got == [
        ("z", Decision.ALLOW, Reason.NEW_CONTACT_COUNTED, True),
        ("m", Decision.ALLOW, Reason.ALREADY_ACTIVE, False),
        ("a", Decision.ALLOW, Reason.NEW_CONTACT_COUNTED, True),
        ("z", Decision.ALLOW, Reason.NEW_CONTACT_COUNTED, False),
        ("q", Decision.DENY, Reason.CONTACT_LIMIT_REACHED, False),
        ("r", Decision.DENY, Reason.CONTACT_LIMIT_REACHED, False),
        ("a", Decision.ALLOW, Reason.NEW_CONTACT_COUNTED, False),
        ("r", Decision.DENY, Reason.CONTACT_LIMIT_REACHED, False),
    ]
    assert (out.allowed, out.denied, out.newly_active) == (5, 3, 2)
    # duplicates counted nothing more: 3 contacts, sends = 1 (earlier) + z + m + a
    assert (out.usage.active_contacts, out.usage.sends) == (3, 4)
    assert out.usage == usage(engine)


def test_batch_of_exactly_10000_contacts_is_accepted(engine: Engine):
    """SG-5 / api.md CheckSendBatch: up to 10,000 contacts in one call."""
    engine.put_plan(T, plan(20_000))
    out = batch(engine, [f"c{i}" for i in range(10_000)])
    assert (out.allowed, out.newly_active, out.usage.active_contacts) == (10_000, 10_000, 10_000)


# -- request_id idempotency -------------------------------------------------------------------


def test_request_id_retry_returns_first_answer_and_counts_nothing(engine: Engine):
    """SG-8 / api.md request_id: a retry returns the first answer and counts nothing twice."""
    engine.put_plan(T, plan(2))
    first = send(engine, "a", request_id="req-1")
    allow(first, Reason.NEW_CONTACT_COUNTED, True)
    send(engine, "b")  # the tenant is now at its limit
    before = rows_of(engine.ledger)
    retry = send(engine, "a", request_id="req-1")
    assert retry == first  # the first answer, newly_active and usage included
    assert rows_of(engine.ledger) == before
    assert (usage(engine).active_contacts, usage(engine).sends) == (2, 2)


def test_request_id_reused_for_a_different_request_is_invalid_argument(engine: Engine):
    """api.md Errors / request_id: the same id for a different request is INVALID_ARGUMENT naming request_id."""
    engine.put_plan(T, plan(5))
    send(engine, "a", request_id="req-1")
    before = rows_of(engine.ledger)
    with pytest.raises(InvalidArgument) as err:
        send(engine, "b", request_id="req-1")
    assert err.value.field == "request_id"
    with pytest.raises(InvalidArgument) as err:
        send(engine, "a", AUTOMATION, request_id="req-1")
    assert err.value.field == "request_id"
    assert rows_of(engine.ledger) == before


def test_request_id_is_scoped_to_tenant_and_rpc(engine: Engine):
    """api.md Errors: request_id is scoped to the tenant and the RPC (SG-8 counting stays exact)."""
    engine.put_plan(T, plan(5))
    engine.put_plan("tenant-b", plan(5))
    send(engine, "a", request_id="same")
    allow(send(engine, "a", tenant="tenant-b", request_id="same"), Reason.NEW_CONTACT_COUNTED, True)
    out = batch(engine, ["b"], request_id="same")
    assert out.newly_active == 1
    out = record(engine, ["c"], request_id="same")
    assert out.newly_active == 1
    assert usage(engine).active_contacts == 3


def test_batch_request_id_retry_returns_first_answer(engine: Engine):
    """SG-5, SG-8 / api.md request_id on CheckSendBatch."""
    engine.put_plan(T, plan(2))
    first = batch(engine, ["a", "b", "c", "a"], request_id="camp-7")
    before = rows_of(engine.ledger)
    again = batch(engine, ["a", "b", "c", "a"], request_id="camp-7")
    assert again == first
    assert rows_of(engine.ledger) == before
    with pytest.raises(InvalidArgument) as err:
        batch(engine, ["a", "b"], request_id="camp-7")
    assert err.value.field == "request_id"


def test_record_activity_request_id_retry_counts_nothing(engine: Engine):
    """CR-2 / api.md request_id on RecordActivity: a retry counts nothing."""
    engine.put_plan(T, plan(5))
    first = record(engine, ["a", "b"], request_id="act-1")
    assert first.newly_active == 2
    before = rows_of(engine.ledger)
    assert record(engine, ["a", "b"], request_id="act-1") == first
    assert rows_of(engine.ledger) == before
    with pytest.raises(InvalidArgument) as err:
        record(engine, ["a", "b", "c"], request_id="act-1")
    assert err.value.field == "request_id"


def test_request_id_answer_is_durable_across_a_restart(db_path: Path, clock: FakeClock):
    """SG-8 / api.md Errors: request_id answers are durable like the decision they repeat."""
    lg = SQLiteLedger(db_path)
    lg.open()
    try:
        eng = Engine(lg, clock)
        eng.put_plan(T, plan(2))
        first = send(eng, "a", request_id="req-1")
    finally:
        lg.close()
    lg = SQLiteLedger(db_path)
    lg.open()
    try:
        eng = Engine(lg, clock)
        assert send(eng, "a", request_id="req-1") == first
        assert usage(eng).sends == 1
        # and the contact is still known active after the filters were rebuilt (SG-8)
        allow(send(eng, "a"), Reason.ALREADY_ACTIVE, False)
    finally:
        lg.close()


# -- record_activity --------------------------------------------------------------------------


def test_record_activity_counted_activity_activates_whatever_the_hard_limit(engine: Engine):
    """CR-1, CR-5 / api.md Decision rules: RecordActivity of a counted activity activates whatever the limit, even
    under HARD (SG-2 still holds for CheckSend).
    """
    engine.put_plan(T, plan(2))
    fill(engine, 2)
    out = record(engine, ["x", "y", "z"])
    assert (out.recorded, out.newly_active) == (3, 3)
    assert out.usage.active_contacts == 5
    assert out.usage.overage_contacts == 3
    # sends stay for CheckSend: recorded activity adds no sends
    assert out.usage.sends == 2
    # still no new contact through CheckSend, but recorded ones are active
    assert send(engine, "w").decision.reason is Reason.CONTACT_LIMIT_REACHED
    allow(send(engine, "x"), Reason.ALREADY_ACTIVE, False)


def test_cr2_record_activity_counts_a_contact_once_per_cycle_however_many_activities(engine: Engine):
    engine.put_plan(
        T,
        plan(10, counted_activities=(MESSAGE_SENT, ActivityKind.NOTE_ADDED, ActivityKind.STATUS_CHANGED)),
    )
    out = record(engine, ["a", "b", "a", "a"])
    assert (out.recorded, out.newly_active) == (2, 2)
    out = record(engine, ["a", "b", "c"], ActivityKind.NOTE_ADDED)
    assert (out.recorded, out.newly_active) == (3, 1)
    out = record(engine, ["c"], ActivityKind.STATUS_CHANGED)
    assert (out.recorded, out.newly_active) == (1, 0)
    assert usage(engine).active_contacts == 3
    allow(send(engine, "a"), Reason.ALREADY_ACTIVE, False)


def test_record_activity_of_an_uncounted_kind_activates_nobody(engine: Engine):
    """CR-1 / api.md counted_activities: only listed activities make a contact active."""
    engine.put_plan(T, plan(10))
    out = record(engine, ["a", "b"], ActivityKind.NOTE_ADDED)
    assert (out.recorded, out.newly_active, out.usage.active_contacts) == (2, 0, 0)


def test_record_activity_is_booked_into_the_cycle_containing_occurred_at(engine: Engine, clock: FakeClock):
    """SG-7, CR-2, CR-7 / api.md RecordActivityRequest.occurred_at: activity is booked into the cycle that contains
    it.
    """
    engine.put_plan(T, plan(3))
    send(engine, "a")
    occurred = CYCLE_START - timedelta(days=2)  # the previous cycle [Jan 15, Feb 15)
    out = record(engine, ["a", "b"], occurred_at_us=to_us(occurred))
    assert (out.recorded, out.newly_active) == (2, 2)
    assert out.usage.cycle_start_us == to_us(ANCHOR)
    past = usage(engine, at=occurred)
    assert (past.cycle_start_us, past.active_contacts) == (to_us(ANCHOR), 2)
    assert usage(engine).active_contacts == 1
    rows, _ = engine.list_active_contacts(T, to_us(occurred), 0, "")
    assert [(r.contact_id, r.activated_at_us, r.activity) for r in rows] == [
        ("a", to_us(occurred), "MESSAGE_SENT"),
        ("b", to_us(occurred), "MESSAGE_SENT"),
    ]
    # the same contacts again in that cycle: once per cycle (CR-2)
    out = record(engine, ["b"], occurred_at_us=to_us(occurred + timedelta(hours=1)))
    assert out.newly_active == 0
    # exactly at the boundary the activity belongs to the current cycle
    out = record(engine, ["b"], occurred_at_us=to_us(CYCLE_START))
    assert out.newly_active == 1 and out.usage.cycle_start_us == to_us(CYCLE_START)
    out = record(engine, ["c"], occurred_at_us=to_us(CYCLE_START) - 1)
    assert out.newly_active == 1 and out.usage.cycle_start_us == to_us(ANCHOR)
    assert usage(engine, at=occurred).active_contacts == 3


def test_record_activity_refuses_occurred_at_far_in_the_future(engine: Engine, clock: FakeClock):
    """CR-1 / api.md Errors: activity is recorded after it happened; nothing is counted on an error."""
    engine.put_plan(T, plan(3))
    before = rows_of(engine.ledger)
    with pytest.raises(InvalidArgument) as err:
        record(engine, ["a"], occurred_at_us=clock.now_us() + 2 * HOUR_US)
    assert err.value.field == "occurred_at"
    assert rows_of(engine.ledger) == before


# -- GRACE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limit, grace, ceiling",
    [(20, 10, 22), (15, 10, 16), (9, 10, 9), (10, 0, 10), (10, 100, 20), (7, 33, 9)],
)
def test_ac7_grace_ceiling_is_limit_plus_floor_of_grace_percent(engine: Engine, limit: int, grace: int, ceiling: int):
    engine.put_plan(T, plan(limit, enforcement=Enforcement.GRACE, grace_percent=grace))
    out = batch(engine, [f"c{i:03d}" for i in range(ceiling + 2)])
    reasons = [d.reason for _, d in out.results]
    assert reasons[:ceiling] == [Reason.NEW_CONTACT_COUNTED] * ceiling
    assert reasons[ceiling:] == [Reason.OVER_GRACE] * 2
    assert [d.decision for _, d in out.results][ceiling:] == [Decision.DENY] * 2
    assert out.usage.active_contacts == ceiling


def test_grace_usage_states_at_limit_in_grace_and_blocked_at_the_ceiling(engine: Engine):
    """AC-7 / api.md UsageState: AT_LIMIT, IN_GRACE (limit < count < ceiling), BLOCKED at the ceiling under GRACE."""
    engine.put_plan(T, plan(20, enforcement=Enforcement.GRACE, grace_percent=10))  # ceiling 22
    fill(engine, 20)
    assert usage(engine).state is UsageState.AT_LIMIT
    assert send(engine, "g1").usage.state is UsageState.IN_GRACE
    assert send(engine, "g2").usage.state is UsageState.BLOCKED
    out = send(engine, "g3")
    assert (out.decision.decision, out.decision.reason, out.usage.state) == (
        Decision.DENY,
        Reason.OVER_GRACE,
        UsageState.BLOCKED,
    )
    allow(send(engine, "g1"), Reason.ALREADY_ACTIVE, False)


# -- OVERAGE (CR-5, CR-6) -------------------------------------------------------------------------


def test_cr5_cr6_overage_never_denies_and_reports_overage_amount(engine: Engine):
    engine.put_plan(
        T,
        plan(3, enforcement=Enforcement.OVERAGE, overage_unit_price="0.25", currency="EUR", plan_name="START"),
    )
    reasons = [send(engine, c).decision.reason for c in ("a", "b", "c", "d")]
    assert reasons == [Reason.NEW_CONTACT_COUNTED] * 3 + [Reason.OVERAGE]
    u = usage(engine)
    assert (u.active_contacts, u.overage_contacts, u.overage_amount, u.currency, u.state, u.plan_name) == (
        4,
        1,
        "0.25",
        "EUR",
        UsageState.IN_OVERAGE,
        "START",
    )
    out = batch(engine, [f"x{i}" for i in range(51)])
    assert out.denied == 0 and out.allowed == 51
    assert {d.reason for _, d in out.results} == {Reason.OVERAGE}
    assert (out.usage.overage_contacts, out.usage.overage_amount) == (52, "13.00")
    allow(send(engine, "a"), Reason.ALREADY_ACTIVE, False)


@pytest.mark.parametrize(
    "price, over, amount",
    [
        ("0.25", 1, "0.25"),
        ("0.25", 2, "0.50"),
        ("0.25", 4, "1.00"),
        ("0.25", 10, "2.50"),
        ("0.125", 3, "0.375"),
        ("0.125", 4, "0.50"),
        ("0.10", 7, "0.70"),
        ("2", 3, "6.00"),
        ("0.25", 0, "0.00"),
    ],
)
def test_cr6_overage_amount_is_an_exact_decimal_string(engine: Engine, price: str, over: int, amount: str):
    engine.put_plan(T, plan(2, enforcement=Enforcement.OVERAGE, overage_unit_price=price, currency="EUR"))
    out = record(engine, [f"c{i}" for i in range(2 + over)])
    assert (out.usage.overage_contacts, out.usage.overage_amount) == (over, amount)


def test_cr5_overage_record_activity_over_the_limit_shows_as_overage(engine: Engine):
    engine.put_plan(T, plan(2, enforcement=Enforcement.OVERAGE, overage_unit_price="0.25", currency="EUR"))
    out = record(engine, ["a", "b", "c"])
    assert (out.usage.state, out.usage.overage_contacts, out.usage.overage_amount) == (
        UsageState.IN_OVERAGE,
        1,
        "0.25",
    )


# -- AUTOMATION: DEFER and EXPIRED (AC-9) ---------------------------------------------------------


def test_ac9_automation_denied_by_the_limit_is_deferred_while_queued_less_than_max_queue(
    engine: Engine, clock: FakeClock
):
    engine.put_plan(T, plan(1))
    send(engine, "a")
    now = clock.now_us()
    for queued in (None, now, now - 23 * HOUR_US, now - 24 * HOUR_US + 1):
        out = send(engine, "b", AUTOMATION, queued_since_us=queued)
        assert out.decision.decision is Decision.DEFER, queued
        assert out.decision.reason in LIMIT_REASONS
        assert out.decision.retry_after_us > 0
        assert out.decision.newly_active is False
    assert usage(engine).active_contacts == 1
    assert usage(engine).sends == 1


def test_ac9_automation_queued_max_queue_or_longer_expires(engine: Engine, clock: FakeClock):
    engine.put_plan(T, plan(1))
    send(engine, "a")
    now = clock.now_us()
    for queued in (now - 24 * HOUR_US, now - 48 * HOUR_US):
        out = send(engine, "b", AUTOMATION, queued_since_us=queued)
        assert (out.decision.decision, out.decision.reason) == (Decision.EXPIRED, Reason.QUEUED_TOO_LONG)
    assert usage(engine).active_contacts == 1


def test_ac9_custom_max_queue_and_the_clock_moving_from_defer_to_expired(engine: Engine, clock: FakeClock):
    engine.put_plan(T, plan(1, max_queue_us=HOUR_US))
    send(engine, "a")
    queued = clock.now_us()
    out = send(engine, "b", AUTOMATION, queued_since_us=queued)
    assert out.decision.decision is Decision.DEFER
    clock.advance(3599)
    assert send(engine, "b", AUTOMATION, queued_since_us=queued).decision.decision is Decision.DEFER
    clock.advance(1)
    assert send(engine, "b", AUTOMATION, queued_since_us=queued).decision.decision is Decision.EXPIRED
    # a campaign is simply denied; only automation e-mails queue
    assert send(engine, "b", CAMPAIGN).decision.decision is Decision.DENY


def test_ac9_automation_over_the_sends_limit_is_deferred_too(engine: Engine, clock: FakeClock):
    engine.put_plan(T, plan(5, sends_limit=1))
    send(engine, "a")
    out = send(engine, "a", AUTOMATION)
    assert (out.decision.decision, out.decision.reason) == (Decision.DEFER, Reason.SENDS_LIMIT_REACHED)
    out = send(engine, "a", AUTOMATION, queued_since_us=clock.now_us() - 25 * HOUR_US)
    assert out.decision.decision is Decision.EXPIRED
    assert usage(engine).sends == 1


def test_ac9_automation_within_the_limit_is_allowed(engine: Engine):
    engine.put_plan(T, plan(2))
    allow(send(engine, "a", AUTOMATION, queued_since_us=0), Reason.NEW_CONTACT_COUNTED, True)


# -- usage states -------------------------------------------------------------------------------


def test_usage_states_ok_warning_at_lowest_threshold_inclusive_then_at_limit(engine: Engine):
    """MK-2, CR-8 / api.md UsageState: OK, WARNING from the lowest notify threshold (inclusive), AT_LIMIT."""
    engine.put_plan(T, plan(10, notify_thresholds=(0.9, 0.8)))
    states = [send(engine, f"c{i}").usage.state for i in range(10)]
    assert states == [UsageState.OK] * 7 + [UsageState.WARNING] * 2 + [UsageState.AT_LIMIT]


def test_usage_state_ok_without_thresholds_until_at_limit(engine: Engine):
    """SG-2 / api.md UsageState: AT_LIMIT when count == limit."""
    engine.put_plan(T, plan(2))
    assert [send(engine, c).usage.state for c in ("a", "b")] == [UsageState.OK, UsageState.AT_LIMIT]


@pytest.mark.parametrize("threshold, limit", [(0.56, 50), (0.55, 100), (0.07, 100), (0.8, 10), (0.5, 2)])
def test_mk2_cr8_warning_is_inclusive_when_the_ratio_equals_the_threshold_exactly(
    engine: Engine, threshold: float, limit: int
):
    """api.md UsageState: WARNING from the lowest notify threshold (inclusive)."""
    engine.put_plan(T, plan(limit, notify_thresholds=(threshold,)))
    at_threshold = round(threshold * limit)
    assert at_threshold / limit == threshold  # the usage ratio equals the threshold exactly
    if at_threshold > 1:
        fill(engine, at_threshold - 1)
    assert usage(engine).state is UsageState.OK
    out = send(engine, "last")
    assert out.usage.usage_ratio == threshold
    assert out.usage.state is UsageState.WARNING


# -- validation errors ----------------------------------------------------------------------------


def test_invalid_ids_are_invalid_argument_naming_the_field_and_count_nothing(engine: Engine):
    """api.md Errors: empty or over-256-byte ids, missing enums, batches over 10,000 are INVALID_ARGUMENT naming the
    field; nothing is counted.
    """
    engine.put_plan(T, plan(5))
    before = rows_of(engine.ledger)
    cases = [
        (lambda: engine.check_send(SendRequest("", "a", Channel.EMAIL, CAMPAIGN)), "tenant_id"),
        (lambda: engine.check_send(SendRequest(T, "", Channel.EMAIL, CAMPAIGN)), "contact_id"),
        (lambda: engine.check_send(SendRequest(T, "x" * 257, Channel.EMAIL, CAMPAIGN)), "contact_id"),
        # 129 characters but 258 UTF-8 bytes
        (lambda: engine.check_send(SendRequest(T, "é" * 129, Channel.EMAIL, CAMPAIGN)), "contact_id"),
        (lambda: engine.check_send(SendRequest("t" * 257, "a", Channel.EMAIL, CAMPAIGN)), "tenant_id"),
        (lambda: engine.check_send(SendRequest(T, "a", None, CAMPAIGN)), "channel"),
        (lambda: engine.check_send(SendRequest(T, "a", Channel.EMAIL, None)), "kind"),
        (lambda: engine.check_send(SendRequest(T, "a", Channel.EMAIL, CAMPAIGN, request_id="r" * 257)), "request_id"),
        (lambda: engine.check_send_batch(BatchRequest(T, None, CAMPAIGN, ["a"])), "channel"),
        (lambda: engine.check_send_batch(BatchRequest(T, Channel.EMAIL, None, ["a"])), "kind"),
        (lambda: engine.check_send_batch(BatchRequest(T, Channel.EMAIL, CAMPAIGN, [])), "contact_ids"),
        (
            lambda: engine.check_send_batch(BatchRequest(T, Channel.EMAIL, CAMPAIGN, [f"c{i}" for i in range(10_001)])),
            "contact_ids",
        ),
        (lambda: engine.check_send_batch(BatchRequest(T, Channel.EMAIL, CAMPAIGN, ["a", "", "b"])), "contact_ids[1]"),
        (lambda: engine.record_activity(ActivityRequest(T, None, ["a"])), "kind"),
        (lambda: engine.record_activity(ActivityRequest(T, MESSAGE_SENT, [])), "contact_ids"),
        (lambda: engine.record_activity(ActivityRequest("", MESSAGE_SENT, ["a"])), "tenant_id"),
        (lambda: engine.get_usage(""), "tenant_id"),
        (lambda: engine.get_contact(T, ""), "contact_id"),
        (lambda: engine.list_active_contacts(T, None, -1, ""), "page_size"),
        (lambda: engine.list_active_contacts(T, None, 10, "not-a-token"), "page_token"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgument) as err:
            call()
        assert err.value.field == field, (field, str(err.value))
    assert rows_of(engine.ledger) == before


def test_ids_of_exactly_256_bytes_are_accepted(engine: Engine):
    """api.md Errors: ids of at most 256 bytes are valid (SG-6 activates them)."""
    engine.put_plan(T, plan(5))
    allow(send(engine, "é" * 128), Reason.NEW_CONTACT_COUNTED, True)
    allow(send(engine, "x" * 256), Reason.NEW_CONTACT_COUNTED, True)


def test_input_is_validated_before_the_tenant_is_looked_up(engine: Engine):
    """api.md Errors: input is validated before the tenant is looked up."""
    with pytest.raises(InvalidArgument) as err:
        engine.check_send(SendRequest("nobody", "", Channel.EMAIL, CAMPAIGN))
    assert err.value.field == "contact_id"


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(contact_limit=-1), "plan.contact_limit"),
        (dict(addon_contacts=-1), "plan.addon_contacts"),
        (dict(sends_limit=-5), "plan.sends_limit"),
        (dict(contact_limit=0), "plan.contact_limit"),
        (dict(enforcement=Enforcement.GRACE, grace_percent=101), "plan.grace_percent"),
        (dict(sends_limit=100, sends_per_contact=10), "plan.sends_per_contact"),
        (dict(enforcement=Enforcement.OVERAGE, overage_unit_price="abc", currency="EUR"), "plan.overage_unit_price"),
        (dict(enforcement=Enforcement.OVERAGE, overage_unit_price="-0.25", currency="EUR"), "plan.overage_unit_price"),
        (dict(enforcement=Enforcement.OVERAGE, overage_unit_price="NaN", currency="EUR"), "plan.overage_unit_price"),
        (
            dict(enforcement=Enforcement.OVERAGE, overage_unit_price="Infinity", currency="EUR"),
            "plan.overage_unit_price",
        ),
        (dict(enforcement=Enforcement.OVERAGE, overage_unit_price="0.25"), "plan.currency"),
        (dict(metering=None), "plan.metering"),
        (dict(enforcement=None), "plan.enforcement"),
        (dict(counted_kinds=(), counted_activities=()), "plan.counted_kinds"),
        (dict(max_queue_us=-1), "plan.max_queue"),
    ],
)
def test_bad_plan_is_invalid_argument_naming_the_field_and_stores_nothing(engine: Engine, fields: dict, field: str):
    """SG-3, AC-7, CR-6 / api.md Errors: a negative or nonsensical plan is INVALID_ARGUMENT naming the field; the
    old plan stays.
    """
    engine.put_plan(T, plan(5))
    before = rows_of(engine.ledger)
    given = dict(fields)
    with pytest.raises(InvalidArgument) as err:
        engine.put_plan(T, plan(given.pop("contact_limit", 5), **given))
    assert err.value.field == field
    assert rows_of(engine.ledger) == before
    assert engine.get_plan(T).contact_limit == 5


def test_grace_percent_of_100_is_accepted(engine: Engine):
    """AC-7: grace_percent up to 100 is a valid plan."""
    p, _ = engine.put_plan(T, plan(10, enforcement=Enforcement.GRACE, grace_percent=100))
    assert p.ceiling == 20


def test_a_tenant_without_a_plan_is_not_found_for_every_call_and_nothing_is_counted(engine: Engine):
    """api.md Errors: a tenant with no plan is NOT_FOUND for every RPC; nothing is counted or stored."""
    engine.put_plan(T, plan(5))
    before = rows_of(engine.ledger)
    calls = [
        lambda: send(engine, "a", tenant="ghost"),
        lambda: send(engine, "a", tenant="ghost", dry_run=True),
        lambda: send(engine, "a", tenant="ghost", request_id="r1"),
        lambda: batch(engine, ["a", "b"], tenant="ghost"),
        lambda: batch(engine, ["a", "b"], tenant="ghost", dry_run=True),
        lambda: record(engine, ["a"], tenant="ghost", request_id="r2"),
        lambda: engine.get_usage("ghost"),
        lambda: engine.get_plan("ghost"),
        lambda: engine.get_contact("ghost", "a"),
        lambda: engine.list_active_contacts("ghost", None, 10, ""),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            call()
    assert rows_of(engine.ledger) == before


# -- plan anchor rules ----------------------------------------------------------------------------


def test_first_plan_without_anchor_is_anchored_at_now(engine: Engine, clock: FakeClock):
    """SG-7 / api.md Plan details: a first plan without cycle_anchor is anchored at the moment it is stored."""
    p, u = engine.put_plan(T, plan(5, cycle_anchor_us=None))
    assert p.cycle_anchor_us == clock.now_us()
    assert engine.get_plan(T).cycle_anchor_us == to_us(NOW)
    assert u.cycle_start_us == to_us(NOW)
    assert u.cycle_end_us == to_us(datetime(2026, 4, 10, 12, 0, tzinfo=UTC))


def test_replaced_plan_without_anchor_keeps_the_old_anchor(engine: Engine, clock: FakeClock):
    """SG-4, SG-7 / api.md Plan details: a plan replaced without cycle_anchor keeps the tenant's anchor."""
    engine.put_plan(T, plan(5, cycle_anchor_us=None))
    send(engine, "a")
    clock.advance(3 * 86_400)
    p, u = engine.put_plan(T, plan(50, cycle_anchor_us=None))
    assert p.cycle_anchor_us == to_us(NOW)
    assert (u.cycle_start_us, u.active_contacts, u.contact_limit) == (to_us(NOW), 1, 50)
    # an explicit anchor replaces it
    p, _ = engine.put_plan(T, plan(50, cycle_anchor_us=to_us(ANCHOR)))
    assert p.cycle_anchor_us == to_us(ANCHOR)
    p, _ = engine.put_plan(T, plan(60, cycle_anchor_us=None))
    assert p.cycle_anchor_us == to_us(ANCHOR)


# -- get_contact / list_active_contacts -------------------------------------------------------------


def test_get_contact_reports_activation_and_unknown_contacts_are_not_found(engine: Engine, clock: FakeClock):
    """SG-1, SG-6 / api.md GetContact: active this cycle and since when."""
    engine.put_plan(T, plan(5))
    send(engine, "a")
    s = engine.get_contact(T, "a")
    assert (s.tenant_id, s.contact_id, s.active_this_cycle, s.activated_at_us) == (T, "a", True, to_us(NOW))
    with pytest.raises(NotFound):
        engine.get_contact(T, "never-seen")


def test_list_active_contacts_pages_through_all_without_duplicates(engine: Engine):
    """CR-7 / api.md ListActiveContacts: the contacts behind an invoice line, every page, no duplicates."""
    engine.put_plan(T, plan(100))
    ids = [f"k{i:03d}" for i in (17, 3, 42, 8, 99, 0, 23, 5, 61, 30, 11, 77, 54, 2, 88, 19, 46, 71, 33, 6, 95, 14, 28)]
    batch(engine, ids[:10])
    record(engine, ids[10:])
    send(engine, "other", tenant=T, kind=TRANSACTIONAL)  # not counted, not listed
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        rows, token = engine.list_active_contacts(T, None, 7, token)
        pages += 1
        assert len(rows) <= 7
        seen += [r.contact_id for r in rows]
        if not token:
            break
    assert pages == 4
    assert seen == sorted(ids)
    assert len(seen) == len(set(seen))
    # the activity that activated each contact
    rows, _ = engine.list_active_contacts(T, None, 1000, "")
    by_id = {r.contact_id: r.activity for r in rows}
    assert by_id[ids[0]] == "CAMPAIGN" and by_id[ids[10]] == "MESSAGE_SENT"


def test_list_active_contacts_of_a_past_cycle_and_token_of_another_cycle_rejected(engine: Engine, clock: FakeClock):
    """SG-7, CR-7 / api.md ListActiveContacts: a past cycle's contacts; a page token of another cycle is
    INVALID_ARGUMENT.
    """
    engine.put_plan(T, plan(100))
    batch(engine, [f"old{i}" for i in range(5)])
    clock.set(CYCLE_END + timedelta(days=1))
    batch(engine, [f"new{i}" for i in range(5)])
    past_at = to_us(CYCLE_START + timedelta(days=1))
    rows, token = engine.list_active_contacts(T, past_at, 2, "")
    assert [r.contact_id for r in rows] == ["old0", "old1"] and token
    # the token continues the past cycle
    rows, token2 = engine.list_active_contacts(T, past_at, 2, token)
    assert [r.contact_id for r in rows] == ["old2", "old3"]
    # but not when a request names another cycle
    with pytest.raises(InvalidArgument) as err:
        engine.list_active_contacts(T, clock.now_us(), 2, token)
    assert err.value.field == "page_token"
    rows, _ = engine.list_active_contacts(T, None, 100, "")
    assert [r.contact_id for r in rows] == [f"new{i}" for i in range(5)]


# -- figures equal rows -------------------------------------------------------------------------------


def test_figures_equal_rows_after_a_mixed_workload(engine: Engine, clock: FakeClock):
    """SG-2/SG-8/CR-2 billing integrity: usage.active_contacts = COUNT(activations), usage.sends = SUM(sends)."""
    engine.put_plan(T, plan(20, sends_limit=60))
    engine.put_plan("tenant-b", plan(5, enforcement=Enforcement.OVERAGE, overage_unit_price="0.25", currency="EUR"))
    for round_ in range(3):
        for tenant in (T, "tenant-b"):
            batch(engine, [f"c{i}" for i in range(round_ * 4, round_ * 4 + 12)] + ["c0", "c1"], tenant=tenant)
            send(engine, "c3", tenant=tenant)
            send(engine, "c3", AUTOMATION, tenant=tenant)
            send(engine, "tx", TRANSACTIONAL, tenant=tenant)
            send(engine, f"dry{round_}", tenant=tenant, dry_run=True)
            batch(engine, ["d1", "d2"], tenant=tenant, dry_run=True)
            send(engine, f"r{round_}", tenant=tenant, request_id=f"req{round_}")
            send(engine, f"r{round_}", tenant=tenant, request_id=f"req{round_}")
            record(engine, [f"a{round_}", "c2", f"a{round_}"], tenant=tenant)
            record(engine, ["c5"], ActivityKind.CONTACT_DELETED, tenant=tenant)
            record(engine, [f"p{round_}"], tenant=tenant, occurred_at_us=to_us(CYCLE_START) - 1)
            try:
                send(engine, "", tenant=tenant)
            except InvalidArgument:
                pass
        clock.advance(12 * 86_400)  # rounds fall in two cycles
    found = assert_figures_equal_rows(engine.ledger)
    cycles = [(t, rows) for t, tenant in found.items() for rows in tenant.cycles.values() if not rows.empty]
    assert len(cycles) >= 4
    # and the engine reports the same figures as the rows
    for tenant_id, rows in cycles:
        u = engine.get_usage(tenant_id, rows.cycle.start_us)
        assert (u.active_contacts, u.sends) == rows.counted


# -- concurrency: the limit holds under racing callers ------------------------------------------


def test_sg2_racing_sends_from_16_threads_never_exceed_the_limit_and_a_shared_request_id_counts_once(engine: Engine):
    """SG-2, SG-8: racing CheckSends never take the tenant past its limit; one request_id counts once."""
    engine.put_plan(T, plan(10))
    barrier = threading.Barrier(16)
    outcomes: list[object] = []
    retries: list[object] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(20)
            for j in range(3):
                outcomes.append(send(engine, f"w{i:02d}-{j}"))
            retries.append(send(engine, "shared", request_id="same-request"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(16)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
        assert not t.is_alive()
    assert errors == []
    allowed = [o for o in outcomes if o.decision.decision is Decision.ALLOW]
    denied = [o for o in outcomes if o.decision.decision is Decision.DENY]
    shared_allowed = retries[0].decision.decision is Decision.ALLOW
    # "shared" took a place if its one real decision was an ALLOW
    assert len(allowed) + int(shared_allowed) == 10
    assert len(denied) == 48 - len(allowed)
    assert all(o.decision.reason is Reason.CONTACT_LIMIT_REACHED for o in denied)
    assert all(r == retries[0] for r in retries)  # every retry got the one first answer
    u = usage(engine)
    assert (u.active_contacts, u.sends) == (10, 10)
    assert assert_figures_equal_rows(engine.ledger)[T].figures()[-1] == (10, 10, 10, 10)
