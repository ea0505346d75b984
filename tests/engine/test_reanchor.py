"""Re-anchoring: a plan stored with a new `cycle_anchor` mid-cycle (api.md "Plan").

The change closes the current cycle at that instant, a short cycle that keeps its
figures, contacts and invoice; the next cycle starts then and runs to the new
anchor's next boundary, then regular cycles of the new anchor follow (SG-7). Nothing
billed ever disappears (CR-6, CR-7). The engine runs over a real SQLite ledger with a
fake clock; the last tests go over a real gRPC channel.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.server.domain.clock import FakeClock, from_us, to_us
from quota_sidecar.server.domain.cycles import Cycle, cycle_at
from quota_sidecar.server.domain.model import (
    ActivityKind,
    Channel,
    ContactSource,
    Decision,
    Enforcement,
    Invoice,
    MessageKind,
    Metering,
    Reason,
    Usage,
)
from quota_sidecar.server.engine import (
    ActivityRequest,
    BatchRequest,
    ContactAddRequest,
    Engine,
    PlanInput,
    SendRequest,
)
from quota_sidecar.server.ledger.sqlite import SQLiteLedger

from support.sidecar import RunningSidecar, start_sidecar

T = "tenant-r"
ANCHOR = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
# NOW lies in the old anchor's cycle [Feb 15 08:00, Mar 15 08:00).
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
OLD_START = datetime(2026, 2, 15, 8, 0, tzinfo=UTC)
OLD_END = datetime(2026, 3, 15, 8, 0, tzinfo=UTC)
# "a new anchor today": the 10th at midnight, so the new cycles turn on the 10th.
TODAY = datetime(2026, 3, 10, tzinfo=UTC)
NEXT_10TH = datetime(2026, 4, 10, tzinfo=UTC)
IN_CLOSED = OLD_START + timedelta(days=3)


def us(instant: datetime) -> int:
    return to_us(instant)


def overage_plan(anchor: datetime = ANCHOR, **fields: object) -> PlanInput:
    """The issue's per-cycle billing: CYCLE_ACTIVE, OVERAGE, limit 2, 0.50 EUR a contact over."""
    base: dict[str, object] = dict(
        metering=Metering.CYCLE_ACTIVE,
        enforcement=Enforcement.OVERAGE,
        contact_limit=2,
        overage_unit_price="0.50",
        currency="EUR",
        cycle_anchor_us=us(anchor),
        counted_kinds=(MessageKind.CAMPAIGN,),
        counted_activities=(ActivityKind.MESSAGE_SENT,),
        plan_name="GROW",
    )
    base.update(fields)
    return PlanInput(**base)  # type: ignore[arg-type]


def preset(name: str, anchor: datetime = ANCHOR, **fields: object) -> PlanInput:
    return PlanInput(**{"preset": name, "cycle_anchor_us": us(anchor), **fields})  # type: ignore[arg-type]


def batch(engine: Engine, ids: list[str]):
    return engine.check_send_batch(BatchRequest(T, Channel.EMAIL, MessageKind.CAMPAIGN, ids))


def send(engine: Engine, contact: str):
    return engine.check_send(SendRequest(T, contact, Channel.EMAIL, MessageKind.CAMPAIGN))


def add(engine: Engine, ids: list[str], marketing: bool = True):
    return engine.check_contact_add(ContactAddRequest(T, ContactSource.API, ids, marketing=marketing))


def record(engine: Engine, kind: ActivityKind, ids: list[str], **kw: object):
    return engine.record_activity(ActivityRequest(T, kind, ids, **kw))  # type: ignore[arg-type]


def usage(engine: Engine, at: datetime | None = None) -> Usage:
    return engine.get_usage(T, us(at) if at is not None else None)


def invoice(engine: Engine, at: datetime | None = None) -> Invoice:
    return engine.get_invoice(T, us(at) if at is not None else None)


def listed(engine: Engine, at: datetime) -> list[str]:
    rows, token = engine.list_active_contacts(T, us(at), 0, "")
    assert token == ""
    return [a.contact_id for a in rows]


def span(u: Usage) -> Cycle:
    return Cycle(u.cycle_start_us, u.cycle_end_us)


def overage_line(inv: Invoice) -> tuple[int, str, str]:
    line = inv.lines[-1]
    assert line.description.startswith("Overage contacts")
    return line.quantity, line.amount, line.currency


def reanchor(engine: Engine, given: PlanInput) -> Usage:
    return engine.put_plan(T, given)[1]


# -- the scenario: per-cycle billing, a new anchor today ---------------------------------


def test_sg7_cr6_reanchor_closes_the_cycle_with_its_figures_contacts_and_invoice(engine: Engine) -> None:
    engine.put_plan(T, overage_plan())
    batch(engine, ["a", "b", "c", "d"])
    assert overage_line(invoice(engine)) == (2, "1.00", "EUR")

    now_usage = reanchor(engine, overage_plan(anchor=TODAY))

    # the new cycle starts at the change and runs to the new anchor's next boundary
    assert span(now_usage) == Cycle(us(NOW), us(NEXT_10TH))
    assert (now_usage.active_contacts, now_usage.overage_contacts) == (0, 0)
    # the interrupted cycle is closed at the change, a short cycle with everything it had
    closed = usage(engine, IN_CLOSED)
    assert span(closed) == Cycle(us(OLD_START), us(NOW))
    assert (closed.active_contacts, closed.sends, closed.overage_contacts, closed.overage_amount) == (
        4,
        4,
        2,
        "1.00",
    )
    inv = invoice(engine, IN_CLOSED)
    assert span(inv.usage) == Cycle(us(OLD_START), us(NOW))
    assert overage_line(inv) == (2, "1.00", "EUR")
    assert inv.lines[1].quantity == 4
    assert listed(engine, IN_CLOSED) == ["a", "b", "c", "d"]
    # the last microsecond before the change is in the closed cycle, the change itself in the new one
    assert span(usage(engine, NOW - timedelta(microseconds=1))) == Cycle(us(OLD_START), us(NOW))
    assert span(usage(engine, NOW)) == Cycle(us(NOW), us(NEXT_10TH))
    # the cycle before it is untouched
    assert span(usage(engine, OLD_START - timedelta(days=1))) == Cycle(us(ANCHOR), us(OLD_START))


def test_sg7_new_cycle_after_a_reanchor_counts_afresh_and_the_old_one_is_unchanged(engine: Engine) -> None:
    engine.put_plan(T, overage_plan())
    batch(engine, ["a", "b", "c", "d"])
    reanchor(engine, overage_plan(anchor=TODAY))
    out = batch(engine, ["a", "e"])
    assert [d.reason for _, d in out.results] == [Reason.NEW_CONTACT_COUNTED, Reason.NEW_CONTACT_COUNTED]
    assert out.usage.active_contacts == 2 and out.usage.cycle_start_us == us(NOW)
    assert listed(engine, NOW) == ["a", "e"]
    assert listed(engine, IN_CLOSED) == ["a", "b", "c", "d"]
    assert usage(engine, IN_CLOSED).active_contacts == 4
    # activity that happened in the closed cycle is booked into it
    record(engine, ActivityKind.MESSAGE_SENT, ["f"], occurred_at_us=us(IN_CLOSED))
    assert listed(engine, IN_CLOSED) == ["a", "b", "c", "d", "f"]
    assert overage_line(invoice(engine, IN_CLOSED)) == (3, "1.50", "EUR")
    # the new anchor's cycles follow: [Apr 10, May 10)
    assert span(usage(engine, NEXT_10TH + timedelta(days=5))) == Cycle(
        us(NEXT_10TH), us(datetime(2026, 5, 10, tzinfo=UTC))
    )


def test_sg2_sg7_hard_tenant_at_its_limit_counts_from_zero_only_in_the_new_cycle(engine: Engine) -> None:
    """Model 2 (HARD): at the limit a new contact is refused; after a re-anchor the new cycle
    starts at 0, and the closed cycle stays at its limit, billable."""
    engine.put_plan(T, preset("active-cycle-hard", contact_limit=2))
    batch(engine, ["a", "b"])
    assert send(engine, "c").decision.reason is Reason.CONTACT_LIMIT_REACHED
    reanchor(engine, preset("active-cycle-hard", anchor=TODAY, contact_limit=2))
    fresh = send(engine, "c")
    assert (fresh.decision.decision, fresh.usage.active_contacts) == (Decision.ALLOW, 1)
    closed = usage(engine, IN_CLOSED)
    assert (span(closed), closed.active_contacts, closed.sends) == (Cycle(us(OLD_START), us(NOW)), 2, 2)
    assert invoice(engine, IN_CLOSED).lines[1].quantity == 2
    assert listed(engine, IN_CLOSED) == ["a", "b"]


def test_mk6_cr6_marketing_contacts_peak_is_billed_in_the_closed_cycle(engine: Engine) -> None:
    """Model 4: the 2.00 EUR of the cycle's peak stays on the closed cycle's invoice; held
    marketing contacts carry into the new cycle, whose peak starts from them."""
    given = dict(contact_limit=2, overage_unit_price="0.50", currency="EUR")
    engine.put_plan(T, preset("marketing-contacts", **given))
    add(engine, [f"m{i}" for i in range(6)])
    record(engine, ActivityKind.CONTACT_DELETED, ["m4", "m5"])
    assert overage_line(invoice(engine)) == (4, "2.00", "EUR")

    reanchor(engine, preset("marketing-contacts", anchor=TODAY, **given))

    closed = invoice(engine, IN_CLOSED)
    assert span(closed.usage) == Cycle(us(OLD_START), us(NOW))
    assert (closed.usage.active_contacts, closed.usage.peak_contacts) == (4, 6)
    assert overage_line(closed) == (4, "2.00", "EUR")
    current = invoice(engine)
    assert span(current.usage) == Cycle(us(NOW), us(NEXT_10TH))
    assert (current.usage.active_contacts, current.usage.peak_contacts) == (4, 4)
    assert overage_line(current) == (2, "1.00", "EUR")
    # a change in the new cycle moves its figures only
    add(engine, ["m9"])
    assert (usage(engine).active_contacts, usage(engine).peak_contacts) == (5, 5)
    assert (usage(engine, IN_CLOSED).active_contacts, usage(engine, IN_CLOSED).peak_contacts) == (4, 6)


def test_mk6_pending_non_marketing_switch_happens_at_the_close(engine: Engine, clock: FakeClock) -> None:
    """MK-6: a contact set non-marketing switches at the next cycle boundary; a re-anchor makes
    that boundary the close, so it still counts in the closed cycle and not in the next one."""
    engine.put_plan(T, preset("marketing-contacts", contact_limit=10))
    add(engine, ["m1", "m2", "m3"])
    record(engine, ActivityKind.MARKETING_STATUS_SET, ["m3"], marketing=False)
    assert engine.get_contact(T, "m3").marketing_until_next_update is True
    assert usage(engine).active_contacts == 3

    reanchor(engine, preset("marketing-contacts", anchor=TODAY, contact_limit=10))

    assert usage(engine).active_contacts == 2
    state = engine.get_contact(T, "m3")
    assert (state.held, state.marketing, state.marketing_until_next_update) == (True, False, False)
    assert (usage(engine, IN_CLOSED).active_contacts, usage(engine, IN_CLOSED).peak_contacts) == (3, 3)
    # long after, with no change in between, the figures stay where the close left them
    clock.set(us(NEXT_10TH + timedelta(days=40)))
    assert usage(engine).active_contacts == 2
    assert usage(engine, IN_CLOSED).active_contacts == 3


def test_mk6_held_figures_untouched_for_cycles_roll_through_them_up_to_the_close(
    engine: Engine, clock: FakeClock
) -> None:
    """MK-6 with holdings last changed cycles before the re-anchor: the switch due at the end of that cycle
    happened there, the cycles passed over keep the count it left, and the close changes nothing more."""
    clock.set(datetime(2026, 1, 20, tzinfo=UTC))
    engine.put_plan(T, preset("marketing-contacts", contact_limit=10))
    add(engine, ["m1", "m2"])
    record(engine, ActivityKind.MARKETING_STATUS_SET, ["m2"], marketing=False)
    clock.set(us(NOW))
    reanchor(engine, preset("marketing-contacts", anchor=TODAY, contact_limit=10))
    january = usage(engine, datetime(2026, 1, 25, tzinfo=UTC))
    assert (january.cycle_end_us, january.active_contacts, january.peak_contacts) == (us(OLD_START), 2, 2)
    closed = usage(engine, IN_CLOSED)
    assert (span(closed), closed.active_contacts, closed.peak_contacts) == (Cycle(us(OLD_START), us(NOW)), 1, 1)
    assert (usage(engine).active_contacts, engine.get_contact(T, "m2").marketing) == (1, False)


def test_ac7_held_contacts_carry_into_the_new_cycle_and_the_closed_one_keeps_end_and_peak(
    engine: Engine, clock: FakeClock
) -> None:
    """Model 1 (held contacts, GRACE): the closed cycle keeps its end and peak counts; the held
    contacts are the new cycle's count."""
    engine.put_plan(T, preset("contact-limit", contact_limit=4))
    add(engine, [f"h{i}" for i in range(5)])
    record(engine, ActivityKind.CONTACT_DELETED, ["h0", "h1"])
    clock.advance(3600)
    reanchor(engine, preset("contact-limit", anchor=TODAY, contact_limit=4))
    reanchored_at = us(NOW) + 3_600_000_000
    closed = usage(engine, IN_CLOSED)
    assert (span(closed), closed.active_contacts, closed.peak_contacts) == (
        Cycle(us(OLD_START), reanchored_at),
        3,
        5,
    )
    now = usage(engine)
    assert (span(now), now.active_contacts, now.peak_contacts) == (Cycle(reanchored_at, us(NEXT_10TH)), 3, 3)
    add(engine, ["h9"])
    assert (usage(engine).active_contacts, usage(engine).peak_contacts) == (4, 4)
    assert engine.get_contact(T, "h9").held is True
    assert (usage(engine, IN_CLOSED).active_contacts, usage(engine, IN_CLOSED).peak_contacts) == (3, 5)
    # the closed cycle lists every contact held in it, the deleted ones with when they stopped counting
    rows, _ = engine.list_active_contacts(T, us(IN_CLOSED), 0, "")
    assert [(a.contact_id, a.counted_until_us) for a in rows] == [
        ("h0", us(NOW)),
        ("h1", us(NOW)),
        ("h2", 0),
        ("h3", 0),
        ("h4", 0),
    ]


# -- what is and is not a re-anchor --------------------------------------------------------------


def test_sg7_same_anchor_or_one_with_the_same_boundaries_closes_nothing(engine: Engine) -> None:
    engine.put_plan(T, overage_plan())
    batch(engine, ["a", "b", "c"])
    for anchor in (ANCHOR, datetime(2025, 7, 15, 8, 0, tzinfo=UTC), datetime(2027, 1, 15, 8, 0, tzinfo=UTC)):
        u = reanchor(engine, overage_plan(anchor=anchor))
        assert (span(u), u.active_contacts) == (Cycle(us(OLD_START), us(OLD_END)), 3)
    assert span(usage(engine, IN_CLOSED)) == Cycle(us(OLD_START), us(OLD_END))
    # a plan replaced without an anchor keeps the tenant's anchor and closes nothing
    u = reanchor(engine, overage_plan(anchor=TODAY, cycle_anchor_us=None, contact_limit=5))
    assert (span(u), u.active_contacts, u.contact_limit) == (Cycle(us(OLD_START), us(OLD_END)), 3, 5)


def test_sg7_reanchor_exactly_on_a_boundary_leaves_the_ended_cycle_whole(engine: Engine, clock: FakeClock) -> None:
    engine.put_plan(T, overage_plan())
    batch(engine, ["a", "b", "c"])
    clock.set(us(OLD_END))
    send(engine, "z")
    u = reanchor(engine, overage_plan(anchor=datetime(2026, 3, 20, tzinfo=UTC)))
    assert span(u) == Cycle(us(OLD_END), us(datetime(2026, 3, 20, tzinfo=UTC)))
    assert u.active_contacts == 1  # the send at the boundary was already in the cycle starting there
    ended = usage(engine, IN_CLOSED)
    assert (span(ended), ended.active_contacts) == (Cycle(us(OLD_START), us(OLD_END)), 3)
    assert overage_line(invoice(engine, IN_CLOSED)) == (1, "0.50", "EUR")


def test_sg7_reanchor_onto_the_new_anchors_own_boundary_starts_a_full_cycle(engine: Engine) -> None:
    engine.put_plan(T, overage_plan())
    u = reanchor(engine, overage_plan(anchor=NOW))
    assert span(u) == Cycle(us(NOW), us(datetime(2026, 4, 10, 12, 0, tzinfo=UTC)))


@pytest.mark.parametrize(
    ("anchor", "next_boundary"),
    [
        (datetime(2027, 6, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)),  # in the future
        (datetime(2020, 5, 20, 6, 30, tzinfo=UTC), datetime(2026, 3, 20, 6, 30, tzinfo=UTC)),  # in the past
        (datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 3, 31, tzinfo=UTC)),  # clamped months
    ],
)
def test_sg7_anchor_in_the_future_or_past_starts_the_next_cycle_at_the_change(
    engine: Engine, anchor: datetime, next_boundary: datetime
) -> None:
    engine.put_plan(T, overage_plan())
    batch(engine, ["a", "b", "c"])
    u = reanchor(engine, overage_plan(anchor=anchor))
    assert span(u) == Cycle(us(NOW), us(next_boundary))
    assert (span(usage(engine, IN_CLOSED)), usage(engine, IN_CLOSED).active_contacts) == (
        Cycle(us(OLD_START), us(NOW)),
        3,
    )
    after = usage(engine, next_boundary)
    assert after.cycle_start_us == us(next_boundary) and after.cycle_end_us > us(next_boundary)


def test_sg7_cr7_reanchoring_twice_keeps_every_cycle_with_the_plan_it_ended_under(
    engine: Engine, clock: FakeClock
) -> None:
    clock.set(us(OLD_START))
    engine.put_plan(T, overage_plan())
    clock.set(us(NOW))
    batch(engine, ["a", "b", "c", "d"])  # 4 in the first cycle
    reanchor(engine, overage_plan(anchor=TODAY))
    first_change = us(NOW)
    clock.set(us(datetime(2026, 3, 20, tzinfo=UTC)))
    batch(engine, ["a", "b", "c"])  # 3 in the second
    clock.advance(3600)
    second_change = clock.now_us()
    reanchor(engine, overage_plan(anchor=datetime(2026, 3, 25, tzinfo=UTC), overage_unit_price="1.00"))
    batch(engine, ["x", "y", "z", "w", "v"])  # 5 in the third
    mar25 = us(datetime(2026, 3, 25, tzinfo=UTC))
    assert span(usage(engine)) == Cycle(second_change, mar25)

    cycles = [
        (IN_CLOSED, Cycle(us(OLD_START), first_change), 4, "1.00"),
        (datetime(2026, 3, 15, tzinfo=UTC), Cycle(first_change, second_change), 3, "0.50"),
        (datetime(2026, 3, 22, tzinfo=UTC), Cycle(second_change, mar25), 5, "3.00"),
    ]
    for at, expected, active, amount in cycles:
        inv = invoice(engine, at)
        assert (span(inv.usage), inv.usage.active_contacts, inv.usage.overage_amount) == (expected, active, amount)
    # every cycle boundary, old anchor, first and second new anchor, lines up without gap or overlap
    instant = us(ANCHOR)
    seen = []
    while instant < us(datetime(2026, 5, 1, tzinfo=UTC)):
        c = span(usage(engine, from_us(instant)))
        assert c.start_us == instant
        seen.append(c)
        instant = c.end_us
    assert [c.start_us for c in seen] == [
        us(ANCHOR),
        us(OLD_START),
        first_change,
        second_change,
        mar25,
        us(datetime(2026, 4, 25, tzinfo=UTC)),
    ]
    # a money figure never goes missing: the sum over the cycles is what was billed along the way
    assert sum(Decimal(invoice(engine, at).usage.overage_amount) for at, *_ in cycles) == Decimal("4.50")


# -- any sequence of re-anchors -------------------------------------------------------------------

ANCHOR_CHOICES = [
    ANCHOR,
    datetime(2027, 1, 15, 8, 0, tzinfo=UTC),  # the same boundaries a year on
    TODAY,
    datetime(2026, 1, 31, tzinfo=UTC),
    datetime(2030, 6, 1, tzinfo=UTC),
    datetime(2019, 11, 29, 23, 59, 59, tzinfo=UTC),
]


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 45 * 24), st.integers(0, 3), st.sampled_from(ANCHOR_CHOICES)), min_size=1, max_size=6
    )
)
def test_sg7_cr6_any_reanchors_tile_time_and_every_activation_stays_in_its_cycle(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[int, int, datetime]]
) -> None:
    """SG-7, CR-6: after any sequence of sends and anchor changes, the tenant's cycles follow one another without
    gap or overlap, each boundary is a re-anchor instant or a boundary of the anchor then in force, and every
    contact activated stays listed and counted in the cycle its send was counted in: nothing disappears."""
    clock = FakeClock(datetime(2025, 12, 1, tzinfo=UTC))
    ledger = SQLiteLedger(tmp_path_factory.mktemp("reanchors") / "ledger.db")
    ledger.open()
    try:
        engine = Engine(ledger, clock)
        engine.put_plan(T, overage_plan())
        sent: dict[str, int] = {}
        segments = [(None, us(ANCHOR))]  # (from, anchor) as the plans were stored
        for i, (hours, contacts, anchor) in enumerate(steps):
            clock.advance(hours * 3600)
            ids = [f"s{i}c{j}" for j in range(contacts)]
            if ids:
                counted_in = batch(engine, ids).usage
                assert counted_in.cycle_start_us <= clock.now_us() < counted_in.cycle_end_us
                sent.update(dict.fromkeys(ids, counted_in.cycle_start_us))
            engine.put_plan(T, overage_plan(anchor=anchor))
            before = from_us(segments[-1][1])
            if (anchor.day, anchor.time()) != (before.day, before.time()):  # the boundaries move
                segments.append((clock.now_us(), us(anchor)))
        clock.advance(3600)

        def anchor_at(instant: int) -> int:
            return [a for since, a in segments if since is None or since <= instant][-1]

        reanchored = {since for since, _ in segments if since is not None}
        instant = engine.get_usage(T, us(datetime(2025, 10, 1, tzinfo=UTC))).cycle_start_us
        last = clock.now_us() + 70 * 86_400_000_000
        counted = 0
        while instant < last:
            u = engine.get_usage(T, instant)
            assert u.cycle_start_us == instant < u.cycle_end_us
            for edge in (u.cycle_start_us, u.cycle_end_us):
                assert edge in reanchored or cycle_at(anchor_at(edge), edge).start_us == edge
            assert [c for c, start in sorted(sent.items()) if start == u.cycle_start_us] == listed(
                engine, from_us(instant)
            )
            counted += u.active_contacts
            instant = u.cycle_end_us
        assert counted == len(sent)
    finally:
        ledger.close()


# -- over a real channel ------------------------------------------------------------------------

OVERAGE = dict(
    plan_name="GROW",
    metering=pb.METERING_CYCLE_ACTIVE,
    enforcement=pb.ENFORCEMENT_OVERAGE,
    contact_limit=2,
    overage_unit_price="0.50",
    currency="EUR",
    counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
)


def _request(message: type, at: datetime, **fields: object):  # noqa: ANN202
    request = message(tenant_id="t", **fields)
    request.cycle_start.FromDatetime(at)
    return request


def test_sg7_cr6_service_reanchor_keeps_the_closed_cycle_readable(sidecar: RunningSidecar) -> None:
    """The issue's scenario over gRPC: limit 2, 4 active, 0.50 EUR; PutPlan with a new anchor today."""
    sidecar.clock.set(us(NOW))
    quota, admin, auth = sidecar.quota(), sidecar.admin(), sidecar.auth
    anchor = pb.Plan().cycle_anchor
    anchor.FromDatetime(ANCHOR)
    sidecar.put_plan("t", cycle_anchor=anchor, **OVERAGE)
    sent = quota.CheckSendBatch(
        pb.CheckSendBatchRequest(
            tenant_id="t", channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN, contact_ids=["a", "b", "c", "d"]
        ),
        timeout=10,
    )
    assert sent.usage.overage_amount == "1.00"
    anchor.FromDatetime(TODAY)
    changed = sidecar.put_plan("t", cycle_anchor=anchor, **OVERAGE)
    assert (changed.usage.cycle_start.ToDatetime(UTC), changed.usage.cycle_end.ToDatetime(UTC)) == (NOW, NEXT_10TH)
    assert changed.usage.active_contacts == 0

    closed = quota.GetUsage(_request(pb.GetUsageRequest, IN_CLOSED), timeout=5).usage
    assert (closed.cycle_start.ToDatetime(UTC), closed.cycle_end.ToDatetime(UTC)) == (OLD_START, NOW)
    assert (closed.active_contacts, closed.overage_contacts, closed.overage_amount) == (4, 2, "1.00")
    bill = admin.GetInvoice(_request(pb.GetInvoiceRequest, IN_CLOSED), metadata=auth, timeout=5)
    assert [(line.quantity, line.amount) for line in bill.lines][-1] == (2, "1.00")
    page = admin.ListActiveContacts(
        _request(pb.ListActiveContactsRequest, IN_CLOSED, page_size=10), metadata=auth, timeout=5
    )
    assert [c.contact_id for c in page.contacts] == ["a", "b", "c", "d"]
    # the contacts of the closed cycle are not active in the new one: GetContact answers for now
    err = None
    try:
        admin.GetContact(pb.GetContactRequest(tenant_id="t", contact_id="a"), metadata=auth, timeout=5)
    except grpc.RpcError as e:
        err = e
    assert err is not None and err.code() == grpc.StatusCode.NOT_FOUND
    # the closed cycle is read from the ledger: a restarted sidecar still finds it
    sidecar.stop()
    again = start_sidecar(sidecar.ledger_path, sidecar.clock, ledger=sidecar.ledger_url)
    try:
        reread = again.quota().GetUsage(_request(pb.GetUsageRequest, IN_CLOSED), timeout=5).usage
        assert (reread.cycle_end.ToDatetime(UTC), reread.active_contacts, reread.overage_amount) == (NOW, 4, "1.00")
    finally:
        again.stop()


def test_mk6_cr6_service_marketing_contacts_peak_survives_a_reanchor(sidecar: RunningSidecar) -> None:
    sidecar.clock.set(us(NOW))
    quota, admin, auth = sidecar.quota(), sidecar.admin(), sidecar.auth
    plan = dict(preset="marketing-contacts", contact_limit=2, overage_unit_price="0.50", currency="EUR")
    anchor = pb.Plan().cycle_anchor
    anchor.FromDatetime(ANCHOR)
    sidecar.put_plan("t", cycle_anchor=anchor, **plan)
    contacts = [f"m{i}" for i in range(6)]
    quota.CheckContactAdd(
        pb.CheckContactAddRequest(tenant_id="t", source=pb.CONTACT_SOURCE_API, contact_ids=contacts), timeout=5
    )
    quota.RecordActivity(
        pb.RecordActivityRequest(tenant_id="t", kind=pb.ACTIVITY_KIND_CONTACT_DELETED, contact_ids=["m4", "m5"]),
        timeout=5,
    )
    anchor.FromDatetime(TODAY)
    sidecar.put_plan("t", cycle_anchor=anchor, **plan)
    bill = admin.GetInvoice(_request(pb.GetInvoiceRequest, IN_CLOSED), metadata=auth, timeout=5)
    assert (bill.usage.cycle_end.ToDatetime(UTC), bill.usage.overage_contacts, bill.usage.overage_amount) == (
        NOW,
        4,
        "2.00",
    )
    now = admin.GetInvoice(pb.GetInvoiceRequest(tenant_id="t"), metadata=auth, timeout=5)
    assert (now.usage.cycle_start.ToDatetime(UTC), now.usage.active_contacts, now.usage.overage_amount) == (
        NOW,
        4,
        "1.00",
    )
    state = admin.GetContact(pb.GetContactRequest(tenant_id="t", contact_id="m0"), metadata=auth, timeout=5).contact
    assert state.held and state.marketing
