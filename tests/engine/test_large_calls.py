"""Large calls cut into units, so small calls of other tenants interleave (issue 13).

A CheckSendBatch or RecordActivity over more contacts than `Engine.unit_contacts` is
decided and committed a unit of contacts at a time, in request order, each unit
seeing the ones before it; the answer is the one a single unit would have given. A
request_id keeps a retry safe: each committed unit's answer is stored under it, so a
retry after a failure between units counts nothing twice and completes the call. The
reminder sweep writes a bounded number of tenants per transaction.

Faults are real: `DiskFullAt` makes one unit's SQLite transaction fail as a full disk
does (SQLite error, rolled back, UNAVAILABLE), everything else is the real ledger.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from quota_sidecar.server.domain.clock import MICROS, FakeClock, to_us
from quota_sidecar.server.domain.cycles import cycle_at
from quota_sidecar.server.domain.errors import InvalidArgument, LedgerUnavailable
from quota_sidecar.server.domain.model import ActivityKind, Decision, Enforcement, Metering
from quota_sidecar.server.engine import Engine
from quota_sidecar.server.ledger import LedgerTx
from quota_sidecar.server.ledger.sqlite import SQLiteLedger

from support.backends import writer_blocked
from support.engine import ANCHOR, CAMPAIGN, NOW, batch, plan, record, send
from support.oracle import assert_figures_equal_rows
from support.waiting import wait_until

T = "tenant-a"
OTHER = "tenant-b"
CYCLE = cycle_at(to_us(ANCHOR), to_us(NOW)).start_us
DAY_US = 86_400 * MICROS
UNIT = 500


class DiskFullAt(SQLiteLedger):
    """The real SQLite ledger, whose `fail_unit`-th unit of work fails in SQLite as a full
    disk makes it fail: the unit's writes are made, then the transaction errs and is
    rolled back, and the caller gets LedgerUnavailable."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(path, **options)
        self.units = 0
        self.fail_unit = 0

    def transact(self, work: Callable[[LedgerTx], Any], *, weight: int = 1, deadline: float | None = None) -> Any:
        self.units += 1
        if self.units != self.fail_unit:
            return super().transact(work, weight=weight, deadline=deadline)

        def disk_full(tx: LedgerTx) -> Any:
            work(tx)
            raise sqlite3.OperationalError("database or disk is full")

        return super().transact(disk_full, weight=weight, deadline=deadline)


def _open(path: Path, **options: Any) -> DiskFullAt:
    ledger = DiskFullAt(path, **options)
    ledger.open()
    return ledger


@pytest.fixture
def ledgers(tmp_path: Path) -> Iterator[Callable[..., DiskFullAt]]:
    opened: list[DiskFullAt] = []

    def make(name: str, **options: Any) -> DiskFullAt:
        opened.append(_open(tmp_path / f"{name}.db", **options))
        return opened[-1]

    yield make
    for ledger in opened:
        ledger.close()


def _engines(ledgers: Callable[..., DiskFullAt], clock: FakeClock, **plan_fields: Any) -> tuple[Engine, Engine]:
    """An engine cutting calls into units of UNIT contacts and one deciding every call in a
    single unit (as before), each on its own ledger, both with the same plan."""
    cut = Engine(ledgers("cut"), clock, unit_contacts=UNIT)
    whole = Engine(ledgers("whole"), clock, unit_contacts=100_000)
    for engine in (cut, whole):
        engine.put_plan(T, plan(**plan_fields))
    return cut, whole


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def _figures(engine: Engine) -> tuple[object, ...]:
    return engine.get_usage(T), engine.list_active_contacts(T, None, 1000, "")


def _request(n_active: int) -> list[str]:
    """2,400 ids (five units): new ones, ones active already, and ids listed again across units."""
    fresh = _ids("new", 2000)
    return fresh[:700] + _ids("old", n_active) + fresh[700:] + fresh[100:300]


@pytest.mark.parametrize(
    "fields",
    [
        dict(limit=1234),
        dict(limit=5000, sends_limit=1900),
        dict(limit=1000, enforcement=Enforcement.OVERAGE),
    ],
    ids=["hard-limit-mid-call", "sends-limit-mid-call", "overage"],
)
def test_sg2_sg3_a_batch_cut_into_units_answers_and_counts_as_one_unit_would(
    ledgers: Callable[..., DiskFullAt], clock: FakeClock, fields: dict[str, Any]
) -> None:
    """SG-2, SG-3, SG-8: limits reached in the third unit, contacts active before, ids listed again
    in a later unit: the same results in request order, the same counts and figures as one unit."""
    cut, whole = _engines(ledgers, clock, **fields)
    for engine in (cut, whole):
        batch(engine, _ids("old", 100))
    answers = [batch(engine, _request(100)) for engine in (cut, whole)]
    assert answers[0] == answers[1]
    assert answers[0].allowed < len(_request(100)) or "enforcement" in fields
    assert _figures(cut) == _figures(whole)
    assert assert_figures_equal_rows(cut.ledger) == assert_figures_equal_rows(whole.ledger)


def test_cr1_a_large_activity_cut_into_units_records_as_one_unit_would(
    ledgers: Callable[..., DiskFullAt], clock: FakeClock
) -> None:
    """CR-1: RecordActivity of 2,600 contacts (some active already, some listed twice): the same
    answer and figures as one unit."""
    cut, whole = _engines(ledgers, clock, limit=10)
    ids = _request(300)
    for engine in (cut, whole):
        batch(engine, _ids("old", 10))
    assert record(cut, ids) == record(whole, ids)
    assert _figures(cut) == _figures(whole)


def test_a_large_contact_activity_under_held_contacts_counts_as_one_unit_would(
    ledgers: Callable[..., DiskFullAt], clock: FakeClock
) -> None:
    """AC-10: CONTACT_CREATED for 1,600 contacts, then deleting 700 of them, in units: the held count
    and peak as one unit gives them."""
    cut, whole = _engines(ledgers, clock, limit=10, metering=Metering.HELD_CONTACTS, counted_activities=())
    ids = _ids("c", 1600)
    for engine in (cut, whole):
        record(engine, ids, ActivityKind.CONTACT_CREATED)
        record(engine, ids[:700], ActivityKind.CONTACT_DELETED)
    assert _figures(cut) == _figures(whole)
    assert cut.get_usage(T).active_contacts == 900


@pytest.mark.parametrize("call", ["batch", "activity"])
def test_a_request_id_retry_after_a_failure_between_units_counts_nothing_twice(
    ledgers: Callable[..., DiskFullAt], clock: FakeClock, call: str
) -> None:
    """SG-8, api.md request_id: the third unit's commit fails (UNAVAILABLE); the two units before it
    stay counted; the retry with the same request_id completes the call with the answer an unfailed
    call gives, and a further retry returns it again, counting nothing."""
    cut, whole = _engines(ledgers, clock, limit=1800)

    def make(engine: Engine) -> Any:
        if call == "batch":
            return batch(engine, _request(0), request_id="fan-out-1")
        return record(engine, _request(0), request_id="fan-out-1")

    expected = make(whole)
    ledger = cut.ledger
    assert isinstance(ledger, DiskFullAt)
    ledger.fail_unit = ledger.units + 3
    with pytest.raises(LedgerUnavailable):
        make(cut)
    assert cut.get_usage(T).active_contacts == 2 * UNIT
    assert make(cut) == expected
    assert make(cut) == expected
    assert _figures(cut) == _figures(whole)


def test_a_request_id_reused_for_another_large_request_is_refused_before_anything_counts(
    ledgers: Callable[..., DiskFullAt], clock: FakeClock
) -> None:
    cut, _ = _engines(ledgers, clock, limit=5000)
    batch(cut, _ids("a", 1200), request_id="r")
    before = _figures(cut)
    with pytest.raises(InvalidArgument, match="request_id"):
        batch(cut, _ids("b", 1200), request_id="r")
    assert _figures(cut) == before


def _commits_seen(tmp_path: Path, **options: Any) -> tuple[DiskFullAt, list[tuple[int, int]]]:
    """A ledger whose every commit is seen as (T's active contacts, OTHER's sends) after it."""
    seen: list[tuple[int, int]] = []
    holder: list[DiskFullAt] = []

    def observe(seconds: float, units: int, ok: bool) -> None:
        seen.append(holder[0].read(lambda r: (r.counters(T, CYCLE).active_contacts, r.counters(OTHER, CYCLE).sends)))

    holder.append(_open(tmp_path / "ledger.db", on_commit=observe, **options))
    return holder[0], seen


def test_alone_a_large_call_in_small_units_commits_as_rarely_as_in_large_ones(tmp_path: Path, clock: FakeClock) -> None:
    """Issue 13 item 7: on SQLite a unit is 100 contacts, and with no small call about, consecutive
    units of a call share a transaction up to 512 contacts: RecordActivity of 2,000 contacts in 4
    commits (20, a commit per unit, would halve what a large call does per second)."""
    ledger, seen = _commits_seen(tmp_path, light_recent_s=0)
    try:
        engine = Engine(ledger, clock)
        assert engine.unit_contacts == SQLiteLedger.unit_contacts == 100
        engine.put_plan(T, plan(limit=10_000))
        seen.clear()
        assert record(engine, _ids("c", 2000)).newly_active == 2000
        assert [active for active, _ in seen] == [500, 1000, 1500, 2000]
        assert_figures_equal_rows(ledger)
    finally:
        ledger.close()


def test_a_small_call_queued_behind_a_large_one_waits_for_one_small_unit(tmp_path: Path, clock: FakeClock) -> None:
    """Issue 13 item 7: the writer held, a RecordActivity of 2,000 contacts (units of 100) queues,
    then a CheckSend of another tenant: the large call's first transaction stops after one unit,
    and the CheckSend is committed next, after 100 of the contacts, not 500."""
    ledger, seen = _commits_seen(tmp_path, light_recent_s=0)
    try:
        engine = Engine(ledger, clock)
        engine.put_plan(T, plan(limit=10_000))
        engine.put_plan(OTHER, plan(limit=10))
        calls: list[threading.Thread] = []
        with writer_blocked(ledger):
            for work in (lambda: record(engine, _ids("c", 2000)), lambda: send(engine, "x", CAMPAIGN, tenant=OTHER)):
                calls.append(threading.Thread(target=work))
                calls[-1].start()
                wait_until(lambda: ledger.queued_units == len(calls), "the call queued behind the writer")
        for thread in calls:
            thread.join(30)
        assert seen[-1] == (2000, 1)
        assert next(active for active, sends in seen if sends == 1) == 100
    finally:
        ledger.close()


def test_among_small_calls_a_large_call_commits_unit_by_unit(tmp_path: Path, clock: FakeClock) -> None:
    """Issue 13 item 7: small calls were committed in the last `light_recent_s` seconds (here a
    minute, so that no timing decides the test), so they keep coming: a RecordActivity of 2,000
    contacts commits each unit of 100 on its own, and the next small call waits for one at most."""
    ledger, seen = _commits_seen(tmp_path, light_recent_s=60)
    try:
        engine = Engine(ledger, clock)
        engine.put_plan(T, plan(limit=10_000))
        engine.put_plan(OTHER, plan(limit=10))
        send(engine, "x", CAMPAIGN, tenant=OTHER)
        seen.clear()
        assert record(engine, _ids("c", 2000)).newly_active == 2000
        assert [active for active, _ in seen] == list(range(100, 2001, 100))
    finally:
        ledger.close()


@pytest.mark.parametrize("call", ["batch", "activity"])
def test_a_retry_cut_into_other_units_is_refused_not_read_against_other_contacts(
    tmp_path: Path, clock: FakeClock, call: str
) -> None:
    """SG-8, api.md request_id: each unit's answer is kept by its place in the cut. A call of 1,200
    contacts cut into units of 500 (as before this version), retried where units are 100: the
    retry is refused as another request (INVALID_ARGUMENT naming request_id) and counts nothing,
    rather than reading the first unit's 500 answers against 100 contacts."""
    ledger = _open(tmp_path / "ledger.db")
    try:
        before, now = Engine(ledger, clock, unit_contacts=500), Engine(ledger, clock)

        def make(engine: Engine) -> Any:
            if call == "batch":
                return batch(engine, _ids("c", 1200), request_id="fan-out-1")
            return record(engine, _ids("c", 1200), request_id="fan-out-1")

        before.put_plan(T, plan(5000))
        make(before)
        figures = _figures(now)
        with pytest.raises(InvalidArgument, match="request_id"):
            make(now)
        assert _figures(now) == figures
        again = make(before)
        assert (again.recorded if call == "activity" else again.allowed) == 1200
    finally:
        ledger.close()


def test_ac1_the_reminder_sweep_writes_its_tenants_in_several_transactions(tmp_path: Path, clock: FakeClock) -> None:
    """AC-1: 300 tenants past a threshold with a reminder due: every one gets its reminder, written
    in several transactions, none holding all the tenants; a sweep stopped after its first
    transaction (the sidecar stopping) leaves the rest to the next one."""
    units: list[int] = []
    ledger = _open(tmp_path / "ledger.db", on_commit=lambda seconds, n, ok: units.append(n))
    try:
        engine = Engine(ledger, clock)
        tenants = [f"t{i:03d}" for i in range(300)]
        for tenant in tenants:
            engine.put_plan(tenant, plan(limit=2, notify_thresholds=[0.5], renotify_interval_us=DAY_US))
            send(engine, "c", CAMPAIGN, tenant=tenant)
        clock.advance(2 * DAY_US // MICROS)
        units.clear()
        answers = iter([False, True])
        first = engine.send_reminders(pause=lambda: next(answers))
        assert len(units) == 1 and 0 < len(first) < len(tenants)
        units.clear()
        reminders = first + engine.send_reminders()
        assert sorted(e.tenant_id for e in reminders) == tenants
        assert len(units) >= 3
        assert all(e.usage.active_contacts == 1 for e in reminders)
        assert engine.send_reminders() == []
    finally:
        ledger.close()


def test_a_large_batch_answers_every_decision_in_request_order(
    ledgers: Callable[..., DiskFullAt], clock: FakeClock
) -> None:
    """api.md: one result per listed id, in request order, across units."""
    cut, _ = _engines(ledgers, clock, limit=10_000)
    ids = _request(0)
    answer = batch(cut, ids)
    assert [c for c, _ in answer.results] == ids
    assert all(d.decision is Decision.ALLOW for _, d in answer.results)
    assert answer.newly_active == 2000


@pytest.mark.parametrize("call", ["batch", "activity"])
def test_a_large_call_with_a_request_id_is_answered_again_on_every_backend(engine: Engine, call: str) -> None:
    """SG-8, api.md request_id, issue 16 (every RPC behaves as on SQLite): a call of 1,200
    contacts (several units, each answer kept under the request_id and the unit's index) with
    a request_id, then its retry: the same answer, nothing counted twice."""
    engine.put_plan(T, plan(5000))

    def make() -> Any:
        if call == "batch":
            return batch(engine, _ids("c", 1200), request_id="fan-out-1")
        return record(engine, _ids("c", 1200), request_id="fan-out-1")

    first = make()
    assert make() == first
    assert engine.get_usage(T).active_contacts == 1200
