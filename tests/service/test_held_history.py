"""The contacts behind a held-contacts invoice line, for the current and past cycles, and one
meaning of "counted" across GetContact, ListActiveContacts and RecordActivity, against a real
sidecar on a free port (fake clock). Rule ids refer to domain.md."""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.client.cli import main
from quota_sidecar.server.domain.clock import FakeClock, to_us
from quota_sidecar.server.domain.model import Activation, ActivityKind
from quota_sidecar.server.engine import ActivityRequest, Engine, PlanInput
from quota_sidecar.server.ledger.sqlite import MIGRATIONS, SQLiteLedger, _keep_held_spans, migrate

T = "tenant-h"
START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@contextmanager
def opened(path: Path) -> Iterator[SQLiteLedger]:
    ledger = SQLiteLedger(path)
    ledger.open()
    try:
        yield ledger
    finally:
        ledger.close()


def at(ts: Timestamp) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if ts.seconds or ts.nanos else None


def stamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def add(sidecar, ids: list[str], *, marketing: bool = True) -> pb.CheckContactAddResponse:
    request = pb.CheckContactAddRequest(tenant_id=T, source=pb.CONTACT_SOURCE_API, contact_ids=ids, marketing=marketing)
    return sidecar.quota().CheckContactAdd(request, timeout=5)


def record(sidecar, kind: int, ids: list[str], **extra: object) -> pb.RecordActivityResponse:
    request = pb.RecordActivityRequest(tenant_id=T, kind=kind, contact_ids=ids, **extra)
    return sidecar.quota().RecordActivity(request, timeout=5)


def listed(sidecar, cycle: datetime | None = None, page_size: int = 0) -> list[tuple[str, datetime, datetime | None]]:
    """Every page of ListActiveContacts: (contact, activated_at, counted_until)."""
    rows: list[tuple[str, datetime, datetime | None]] = []
    token = ""
    while True:
        request = pb.ListActiveContactsRequest(tenant_id=T, page_size=page_size, page_token=token)
        if cycle is not None:
            request.cycle_start.CopyFrom(stamp(cycle))
        page = sidecar.admin().ListActiveContacts(request, metadata=sidecar.auth, timeout=5)
        rows += [(c.contact_id, at(c.activated_at), at(c.counted_until)) for c in page.contacts]
        token = page.next_page_token
        if not token:
            return rows


def contact(sidecar, contact_id: str) -> pb.ContactState:
    request = pb.GetContactRequest(tenant_id=T, contact_id=contact_id)
    return sidecar.admin().GetContact(request, metadata=sidecar.auth, timeout=5).contact


def invoice_quantity(sidecar, cycle: datetime | None = None) -> int:
    request = pb.GetInvoiceRequest(tenant_id=T)
    if cycle is not None:
        request.cycle_start.CopyFrom(stamp(cycle))
    lines = sidecar.admin().GetInvoice(request, metadata=sidecar.auth, timeout=5).lines
    return next(line.quantity for line in lines if line.description.startswith("Highest"))


def test_the_contacts_behind_a_held_invoice_line_are_listed_for_the_current_and_past_cycles_MK_1_AC_10(
    sidecar,
) -> None:
    """MK-1, AC-10 (the issue's scenario): add a, b, c, d, delete c and d; the invoice bills the peak of 4,
    and the listing of the cycle, now and once it is past, gives all four with when each was held, paginated."""
    sidecar.put_plan(T, preset="marketing-contacts", contact_limit=10)
    added = sidecar.clock.now()
    add(sidecar, ["a", "b", "c", "d"])
    sidecar.clock.advance(3600)
    deleted = sidecar.clock.now()
    record(sidecar, pb.ACTIVITY_KIND_CONTACT_DELETED, ["c", "d"])
    expected = [("a", added, None), ("b", added, None), ("c", added, deleted), ("d", added, deleted)]
    assert invoice_quantity(sidecar) == 4
    assert listed(sidecar) == expected
    assert listed(sidecar, page_size=1) == expected

    cycle = sidecar.clock.now()
    sidecar.clock.advance(40 * 86400)
    assert invoice_quantity(sidecar, cycle) == 4
    assert listed(sidecar, cycle) == expected
    assert listed(sidecar, cycle, page_size=3) == expected
    assert listed(sidecar) == [("a", added, None), ("b", added, None)]


def test_a_contact_held_twice_in_a_cycle_is_listed_with_each_span_AC_10(sidecar) -> None:
    """AC-10: deleted and added again, a contact shows each span it was held, in order; GetContact gives
    the first, as it gives the first activation under CYCLE_ACTIVE."""
    sidecar.put_plan(T, preset="contact-limit", contact_limit=10)
    first = sidecar.clock.now()
    add(sidecar, ["a"])
    sidecar.clock.advance(60)
    gone = sidecar.clock.now()
    record(sidecar, pb.ACTIVITY_KIND_CONTACT_DELETED, ["a"])
    sidecar.clock.advance(60)
    back = sidecar.clock.now()
    add(sidecar, ["a"])
    assert listed(sidecar) == [("a", first, gone), ("a", back, None)]
    assert listed(sidecar, page_size=1) == [("a", first, gone), ("a", back, None)]
    state = contact(sidecar, "a")
    assert (state.held, state.active_this_cycle, at(state.activated_at)) == (True, True, first)


def test_a_switch_to_non_marketing_ends_the_span_at_the_cycle_end_MK_6(sidecar) -> None:
    """MK-6: set non-marketing, a contact counts until the next cycle start, which ends its span there."""
    plan = sidecar.put_plan(T, preset="marketing-contacts", contact_limit=10)
    cycle_end = at(plan.usage.cycle_end)
    added = sidecar.clock.now()
    add(sidecar, ["a", "b"])
    record(sidecar, pb.ACTIVITY_KIND_MARKETING_STATUS_SET, ["a"], marketing=False, source_type="USER")
    assert listed(sidecar) == [("a", added, None), ("b", added, None)]
    cycle = sidecar.clock.now()
    sidecar.clock.advance(40 * 86400)
    assert listed(sidecar, cycle) == [("a", added, cycle_end), ("b", added, None)]
    assert listed(sidecar) == [("b", added, None)]
    assert not contact(sidecar, "a").active_this_cycle


def test_quotactl_lists_a_past_cycle_of_held_contacts_as_csv_MK_1(sidecar, capsys) -> None:
    """MK-1: `quotactl active-contacts TENANT --cycle … --csv` gives the contacts behind a past invoice."""
    sidecar.put_plan(T, preset="marketing-contacts", contact_limit=10)
    added = sidecar.clock.now()
    add(sidecar, ["a", "b", "c"])
    sidecar.clock.advance(3600)
    deleted = sidecar.clock.now()
    record(sidecar, pb.ACTIVITY_KIND_CONTACT_DELETED, ["c"])
    cycle = sidecar.clock.now()
    sidecar.clock.advance(40 * 86400)
    connection = ["--address", sidecar.address, "--admin-token", sidecar.admin_token]
    assert main([*connection, "active-contacts", T, "--cycle", cycle.isoformat(), "--csv"]) == 0
    iso = lambda d: d.isoformat().replace("+00:00", "Z")  # noqa: E731
    assert list(csv.reader(io.StringIO(capsys.readouterr().out))) == [
        ["contact_id", "activated_at", "activity", "counted_until"],
        ["a", iso(added), "MARKETING_CONTACT", ""],
        ["b", iso(added), "MARKETING_CONTACT", ""],
        ["c", iso(added), "MARKETING_CONTACT", iso(deleted)],
    ]


@pytest.mark.parametrize("preset", ["contact-limit", "marketing-contacts", "active-cycle-hard", "active-cycle-overage"])
def test_get_contact_list_and_newly_active_agree_on_what_is_counted_for_every_metering(sidecar, preset: str) -> None:
    """AC-10, MK-1, SG-6, CR-1: for every metering a contact is active_this_cycle exactly when the
    current cycle's ListActiveContacts lists it, with the activated_at of its first row, and
    RecordActivity's newly_active is what the metered count rose by."""
    sidecar.put_plan(T, preset=preset, contact_limit=100, plan_name="START")
    before = sidecar.quota().GetUsage(pb.GetUsageRequest(tenant_id=T), timeout=5).usage.active_contacts
    created = record(sidecar, pb.ACTIVITY_KIND_CONTACT_CREATED, ["x", "y"], marketing=True)
    assert created.newly_active == created.usage.active_contacts - before
    again = record(sidecar, pb.ACTIVITY_KIND_CONTACT_CREATED, ["x", "z"], marketing=True)
    assert again.newly_active == again.usage.active_contacts - created.usage.active_contacts
    add(sidecar, ["n"], marketing=False)
    sidecar.quota().CheckSend(
        pb.CheckSendRequest(tenant_id=T, contact_id="s", channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN),
        timeout=5,
    )
    sidecar.clock.advance(60)
    record(sidecar, pb.ACTIVITY_KIND_CONTACT_DELETED, ["y"])
    rows: dict[str, datetime] = {}
    for contact_id, activated, _ in listed(sidecar):
        rows.setdefault(contact_id, activated)
    for contact_id in ("x", "y", "z", "n", "s"):
        try:
            state = contact(sidecar, contact_id)
        except grpc.RpcError as missing:
            assert missing.code() is grpc.StatusCode.NOT_FOUND and contact_id not in rows
            continue
        assert state.active_this_cycle == (contact_id in rows), contact_id
        assert at(state.activated_at) == rows.get(contact_id), contact_id


def test_newly_active_counts_the_contacts_a_call_made_count_under_held_contacts_AC_10_MK_1(sidecar) -> None:
    """AC-10, MK-1 (the issue's case): CONTACT_CREATED of two new contacts answers newly_active 2 as the count
    rises by 2; a marketing status set on a held non-marketing contact counts it (model 4) and says so."""
    sidecar.put_plan(T, preset="contact-limit", contact_limit=10)
    created = record(sidecar, pb.ACTIVITY_KIND_CONTACT_CREATED, ["a", "b"])
    assert (created.newly_active, created.usage.active_contacts) == (2, 2)
    assert contact(sidecar, "a").active_this_cycle

    sidecar.put_plan(T, preset="marketing-contacts", contact_limit=10)
    quiet = record(sidecar, pb.ACTIVITY_KIND_CONTACT_CREATED, ["n"], marketing=False)
    assert (quiet.newly_active, quiet.usage.active_contacts) == (0, 0)
    assert not contact(sidecar, "n").active_this_cycle
    counted = record(sidecar, pb.ACTIVITY_KIND_MARKETING_STATUS_SET, ["n"], marketing=True, source_type="USER")
    assert (counted.newly_active, counted.usage.active_contacts) == (1, 1)
    assert contact(sidecar, "n").active_this_cycle


def test_a_ledger_from_before_the_history_starts_it_with_the_contacts_held_AC_10(tmp_path: Path) -> None:
    """AC-10 across an upgrade: the migration starts the spans with the contacts held then, from when each
    was first held; the changes after it end and open spans as usual."""
    path = tmp_path / "ledger.db"
    clock = FakeClock(START)
    plan = PlanInput(preset="contact-limit", contact_limit=10)
    with opened(path) as ledger:
        engine = Engine(ledger, clock)
        engine.put_plan(T, plan)
        engine.record_activity(ActivityRequest(T, ActivityKind.CONTACT_CREATED, ["a", "b"]))
        engine.record_activity(ActivityRequest(T, ActivityKind.CONTACT_DELETED, ["b"]))
    reference = sqlite3.connect(migrate_to(tmp_path / "reference.db", MIGRATIONS.index(_keep_held_spans) + 1))
    with reference:
        with_spans = {name for (name,) in reference.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    reference.close()
    db = sqlite3.connect(path)
    with db:
        db.execute("DROP TABLE held_spans")
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            if name not in with_spans:
                db.execute(f"DROP TABLE {name}")
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            db.execute(f"DROP TRIGGER {name}")
        db.execute(f"PRAGMA user_version = {MIGRATIONS.index(_keep_held_spans)}")
    db.close()

    clock.advance(60)
    with opened(path) as ledger:
        engine = Engine(ledger, clock)
        start_us = to_us(START)
        assert engine.list_active_contacts(T, None, 0, "") == ([Activation("a", start_us, "HELD_CONTACT")], "")
        engine.record_activity(ActivityRequest(T, ActivityKind.CONTACT_DELETED, ["a"]))
        gone = Activation("a", start_us, "HELD_CONTACT", 0, clock.now_us())
        assert engine.list_active_contacts(T, None, 0, "") == ([gone], "")


def migrate_to(path: Path, version: int) -> Path:
    """A ledger at schema `version`, for the tables a ledger of that version has."""
    migrate(path, target=version)
    return path
