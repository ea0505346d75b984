"""The ledger contract (server/ledger/__init__.py) that every backend must pass.

One test class, parametrised over `BACKENDS` (SQLite and PostgreSQL, each test on a
store of its own: a file, or a schema dropped afterwards). A `Backend` entry says how
to build a ledger at a test location and, for a backend with group commit, how many
units are waiting for its writer (used to line units up into one group commit without
timing anything). Three classes hold what only some backends promise: group commit
(SQLite), one writer per store (SQLite), and several ledgers writing one store at once
(PostgreSQL: the multi-instance cases).

Rules served: the durability and isolation the engine relies on for "counted
atomically with the decision" and "nothing decided and acknowledged is lost"
(domain.md, What follows for the product), exact counting behind a bloom filter
("a false positive must never let a new contact through uncounted", SG-2, SG-8),
and request_id answers kept durably (api.md Errors).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from quota_sidecar.server.domain.errors import DeadlineExceeded, LedgerUnavailable
from quota_sidecar.server.domain.model import (
    Activation,
    AuditEntry,
    ContactRecord,
    Counters,
    HeldSpan,
    Holdings,
    NoticeState,
    Reanchor,
    StoredPlan,
    StoredResult,
    Usage,
    UsageContext,
    UsageEvent,
    UsageEventType,
    UsageFigure,
    UsageState,
)
from quota_sidecar.server.ledger import HELD_SPANS_PER_CONTACT, Ledger, LedgerTx, ReadAhead

from support.backends import BACKENDS, GROUPING, SHARED, SINGLE_WRITER, Backend, _Call, writer_blocked
from support.waiting import wait_until

T = "tenant-a"
C1 = 1_771_142_400_000_000  # a cycle start
CONTEXT = UsageContext(T, C1, C1 + 28 * 86_400_000_000, 100, 0, "EUR", "Growth \u00e9")
C0 = 1_768_464_000_000_000  # the cycle before it


def act(contact_id: str, sends: int = 1, at: int = C1 + 1, activity: str = "CAMPAIGN") -> Activation:
    return Activation(contact_id, at, activity, sends)


def _race(fleet: list[Ledger], racer: Callable[[Ledger, str], None], racers: int = 16) -> None:
    """Runs `racer(ledger, name)` in `racers` threads at once, dealt round the fleet's ledgers."""
    threads = [threading.Thread(target=racer, args=(fleet[n % len(fleet)], f"r{n}")) for n in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    chosen: Backend = request.param
    if chosen.on_postgres:
        request.getfixturevalue("postgres_server")
    with chosen.store(tmp_path):
        yield chosen


@pytest.fixture
def commits() -> list[tuple[int, bool]]:
    return []


@pytest.fixture
def ledger(backend: Backend, tmp_path: Path, commits: list[tuple[int, bool]]) -> Iterator[Ledger]:
    lg = backend.make(tmp_path, on_commit=lambda seconds, size, ok: commits.append((size, ok)))
    lg.open()
    try:
        yield lg
    finally:
        lg.close()


class TestLedgerContract:
    # -- transact and read ------------------------------------------------------------------------

    def test_transact_commits_and_is_visible_to_read(self, ledger: Ledger):
        """Ledger.transact commits durably and read sees it (an ALLOW is durable before the caller hears it)."""
        assert ledger.ready

        def unit(tx: LedgerTx) -> str:
            tx.put_plan(T, '{"plan": 1}', 100)
            tx.activate(T, C1, [act("a", 1), act("b", 0, activity="MESSAGE_SENT")])
            tx.put_contacts(
                T,
                [ContactRecord("a", held=True, marketing=True, marketing_source_type="api", marketing_source_id="k1")],
                100,
            )
            return "done"

        assert ledger.transact(unit) == "done"
        assert ledger.read(lambda r: r.plan(T)) == StoredPlan('{"plan": 1}', 100)
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(2, 1)
        assert ledger.read(lambda r: r.activation(T, C1, "a")) == act("a", 1)
        assert ledger.read(lambda r: r.activation(T, C1, "b")) == act("b", 0, activity="MESSAGE_SENT")
        assert ledger.read(lambda r: r.contact(T, "a")) == ContactRecord("a", True, True, False, "api", "k1")
        assert ledger.read(lambda r: r.contact(T, "zz")) is None
        assert ledger.read(lambda r: r.plan("other")) is None

    def test_a_unit_sees_its_own_writes(self, ledger: Ledger):
        """SG-8: within a unit the writer sees its own activations, so a batch never counts a contact twice."""

        def unit(tx: LedgerTx) -> tuple:
            before = tx.activation(T, C1, "a")
            tx.activate(T, C1, [act("a")])
            return before, tx.activation(T, C1, "a"), tx.counters(T, C1)

        assert ledger.transact(unit) == (None, act("a"), Counters(1, 1))

    def test_plan_and_contacts_are_replaced_not_duplicated(self, ledger: Ledger):
        """SG-4 (plans replaced mid-cycle), MK-5 (contact records updated)."""
        ledger.transact(lambda tx: tx.put_plan(T, "v1", 1))
        ledger.transact(lambda tx: tx.put_plan(T, "v2", 2))
        ledger.transact(lambda tx: tx.put_contacts(T, [ContactRecord("a", held=True)], 1))
        ledger.transact(lambda tx: tx.put_contacts(T, [ContactRecord("a", held=False, marketing=True)], 2))
        assert ledger.read(lambda r: r.plan(T)) == StoredPlan("v2", 2)
        assert ledger.read(lambda r: r.contact(T, "a")) == ContactRecord("a", held=False, marketing=True)

    def test_plan_versions_answer_which_plan_was_in_force(self, ledger: Ledger):
        """CR-7: a past cycle is invoiced under the plan in force at its end."""
        ledger.transact(lambda tx: tx.put_plan(T, "v1", 10))
        ledger.transact(lambda tx: tx.put_plan(T, "v2", 20))
        ledger.transact(lambda tx: tx.put_plan(T, "v2", 30))
        assert ledger.read(lambda r: r.plan_at(T, 10)) is None
        assert ledger.read(lambda r: r.plan_at(T, 11)) == StoredPlan("v1", 10)
        assert ledger.read(lambda r: r.plan_at(T, 20)) == StoredPlan("v1", 10)
        assert ledger.read(lambda r: r.plan_at(T, 21)) == StoredPlan("v2", 20)
        assert ledger.read(lambda r: r.plan_at(T, 40)) == StoredPlan("v2", 20)

    def test_reanchors_answer_which_anchor_a_past_instant_was_under(self, ledger: Ledger):
        """SG-7 / api.md Plan: a re-anchor closes the cycle running then; the first one kept at an instant wins."""
        assert ledger.read(lambda r: r.reanchors_around(T, 5)) == (None, None)
        ledger.transact(lambda tx: tx.put_reanchor(T, Reanchor(10, 1)))
        ledger.transact(lambda tx: tx.put_reanchor(T, Reanchor(20, 2)))
        ledger.transact(lambda tx: tx.put_reanchor(T, Reanchor(20, 3)))
        ledger.transact(lambda tx: tx.put_reanchor("other", Reanchor(15, 9)))
        assert ledger.read(lambda r: r.reanchors_around(T, 9)) == (None, Reanchor(10, 1))
        assert ledger.read(lambda r: r.reanchors_around(T, 10)) == (10, Reanchor(20, 2))
        assert ledger.read(lambda r: r.reanchors_around(T, 19)) == (10, Reanchor(20, 2))
        assert ledger.read(lambda r: r.reanchors_around(T, 20)) == (20, None)

    def test_holdings_peaks_and_marketing_switches(self, ledger: Ledger):
        """AC-10 (the count falls, the cycle's peak stays), MK-6 (due switches applied in one statement),
        held sends counted without an activation (AC-6)."""
        contacts = [
            ContactRecord("a", held=True, marketing=True, held_since_us=5),
            ContactRecord("b", held=True, marketing=True, marketing_until_next_update=True, marketing_until_us=C1),
            ContactRecord("c", held=True, marketing=True, marketing_until_next_update=True, marketing_until_us=C1 + 9),
            ContactRecord("d", held=True),
            ContactRecord("e", held=False, marketing=True),
        ]

        def unit(tx: LedgerTx) -> int:
            tx.put_contacts(T, contacts, 1)
            tx.put_holdings(T, Holdings(C0, 4, 3, 2))
            tx.record_held(T, C0, 4, 3)
            tx.record_held(T, C0, 2, 1)
            tx.count_sends(T, C0, 3)
            return tx.switch_marketing(T, C1)

        assert ledger.transact(unit) == 1
        assert ledger.read(lambda r: r.holdings(T)) == Holdings(C0, 4, 3, 2)
        assert ledger.read(lambda r: r.holdings("other")) is None
        assert ledger.read(lambda r: r.counters(T, C0)) == Counters(0, 3, 2, 4, 1, 3)
        assert ledger.read(lambda r: r.contact(T, "b")) == ContactRecord("b", held=True)
        assert ledger.read(lambda r: r.contact(T, "a")) == contacts[0]
        held = ledger.read(lambda r: r.counted_contacts(T, False, C1, "", 10))
        assert [c.contact_id for c in held] == ["a", "b", "c", "d"]
        marketing = ledger.read(lambda r: r.counted_contacts(T, True, C1 + 9, "a", 10))
        assert [c.contact_id for c in marketing] == []
        marketing = ledger.read(lambda r: r.counted_contacts(T, True, C1 + 8, "", 1))
        assert [c.contact_id for c in marketing] == ["a"]

    def test_ledger_time_is_the_latest_instant_a_committed_write_noted_and_survives_a_reopen(
        self, backend: Backend, ledger: Ledger, tmp_path: Path
    ):
        """Ledger time never goes back: raised by a unit that wrote, not by one that only read, nor by one
        that raised, nor by an earlier instant; kept across a reopen."""
        assert ledger.time_us == 0

        def wrote(at_us: int) -> Callable[[LedgerTx], None]:
            def unit(tx: LedgerTx) -> None:
                tx.put_plan(T, f"plan-{at_us}", at_us)
                tx.note_time(at_us)

            return unit

        ledger.transact(wrote(500))
        assert ledger.time_us == 500
        ledger.transact(wrote(400))
        ledger.transact(lambda tx: (tx.plan(T), tx.note_time(900)))

        def raises(tx: LedgerTx) -> None:
            wrote(800)(tx)
            raise ValueError("the unit fails")

        with pytest.raises(ValueError):
            ledger.transact(raises)
        assert ledger.time_us == 500
        ledger.transact(wrote(600))
        assert ledger.time_us == 600
        ledger.close()
        again = backend.make(tmp_path)
        again.open()
        try:
            assert again.time_us == 600
        finally:
            again.close()
        ledger.open()

    def test_held_spans_follow_every_change_of_a_contact(self, ledger: Ledger):
        """AC-10 (a deleted contact's span ends when it is deleted), MK-6 (a marketing span ends at the
        switch instant, due or written), spans listed by overlap with a cycle, in (contact, start) order."""
        a = ContactRecord("a", held=True, marketing=True, held_since_us=10)
        ledger.transact(lambda tx: tx.put_contacts(T, [a, ContactRecord("b", held=True, held_since_us=10)], 10))
        ledger.transact(lambda tx: tx.put_contacts(T, [ContactRecord("b", held=False, held_since_us=10)], 20))
        spans = lambda *args: ledger.read(lambda r: r.held_spans(T, *args))  # noqa: E731
        assert spans(False, 0, 100, ("", 0), 10) == [HeldSpan("a", 10, None), HeldSpan("b", 10, 20)]
        assert spans(False, 20, 100, ("", 0), 10) == [HeldSpan("a", 10, None)]
        assert spans(False, 0, 100, ("a", 10), 10) == [HeldSpan("b", 10, 20)]
        assert spans(False, 0, 100, ("", 0), 10, "b") == [HeldSpan("b", 10, 20)]
        assert spans(True, 0, 100, ("", 0), 10) == [HeldSpan("a", 10, None)]
        pending = replace(a, marketing_until_next_update=True, marketing_until_us=50)
        ledger.transact(lambda tx: tx.put_contacts(T, [pending], 30))
        assert spans(True, 0, 100, ("", 0), 10) == [HeldSpan("a", 10, 50)]
        ledger.transact(lambda tx: tx.switch_marketing(T, 50))
        assert spans(True, 0, 100, ("", 0), 10) == [HeldSpan("a", 10, 50)]
        assert spans(True, 50, 100, ("", 0), 10) == []
        ledger.transact(lambda tx: tx.put_contacts(T, [ContactRecord("b", held=True, held_since_us=60)], 60))
        assert spans(False, 0, 100, ("a", 10), 10) == [HeldSpan("b", 10, 20), HeldSpan("b", 60, None)]

    def test_a_contact_keeps_a_bounded_number_of_spans(self, ledger: Ledger):
        """common.md (every resource a caller can grow is bounded): deleted and added again without end,
        a contact keeps its latest HELD_SPANS_PER_CONTACT spans."""
        for at in range(1, 2 * HELD_SPANS_PER_CONTACT + 10):
            held = at % 2 == 1
            ledger.transact(
                lambda tx, at=at, held=held: tx.put_contacts(T, [ContactRecord("a", held, held_since_us=at)], at)
            )
        spans = ledger.read(lambda r: r.held_spans(T, False, 0, 10**6, ("", 0), 10**3))
        assert len(spans) == HELD_SPANS_PER_CONTACT
        assert spans[-1] == HeldSpan("a", 2 * HELD_SPANS_PER_CONTACT + 9, None)

    def test_a_tenants_file_entry_is_remembered(self, ledger: Ledger):
        """The digest of the `--tenants` entry applied last, per tenant."""
        assert ledger.read(lambda r: r.file_entry(T)) is None
        ledger.transact(lambda tx: tx.put_file_entry(T, "d1", 5))
        ledger.transact(lambda tx: tx.put_file_entry(T, "d2", 6))
        assert (ledger.read(lambda r: r.file_entry(T)), ledger.read(lambda r: r.file_entry("other"))) == ("d2", None)

    def test_a_unit_that_raises_leaves_no_trace(self, ledger: Ledger):
        """api.md Errors: nothing is half-written; a unit that raises leaves no trace."""

        def bad(tx: LedgerTx) -> None:
            tx.put_plan(T, "plan", 1)
            tx.activate(T, C1, [act("a")])
            tx.store_result(T, "CheckSend", "r1", StoredResult(b"fp", b"\x01", CONTEXT), 1)
            raise ValueError("the unit fails")

        with pytest.raises(ValueError, match="the unit fails"):
            ledger.transact(bad)
        assert ledger.read(lambda r: (r.plan(T), r.counters(T, C1), r.activation(T, C1, "a"))) == (
            None,
            Counters(),
            None,
        )
        assert ledger.read(lambda r: r.stored_result(T, "CheckSend", "r1")) is None
        # and the writer's own view (through any filter) agrees: "a" is not active
        assert ledger.transact(lambda tx: tx.activation(T, C1, "a")) is None
        assert ledger.ready
        # the ledger keeps working
        ledger.transact(lambda tx: tx.activate(T, C1, [act("a")]))
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(1, 1)

    def test_a_unit_whose_deadline_has_passed_is_not_started(self, ledger: Ledger):
        """README Errors (DEADLINE_EXCEEDED: "it was not decided and nothing is counted"), on every backend:
        a unit given a deadline already past is never run and the call is DeadlineExceeded; one whose
        deadline is ahead commits."""
        ran: list[str] = []

        def unit(tx: LedgerTx) -> None:
            ran.append("ran")
            tx.activate(T, C1, [act("a")])

        with pytest.raises(DeadlineExceeded):
            ledger.transact(unit, deadline=time.monotonic() - 1)
        assert ran == [] and ledger.read(lambda r: r.counters(T, C1)) == Counters()
        ledger.transact(unit, deadline=time.monotonic() + 60)
        assert ran == ["ran"] and ledger.ready

    def test_the_backend_figures_and_loading_are_behind_the_interface(self, ledger: Ledger):
        """style.md (backend metrics through a collector it exposes): whatever the backend reports at scrape time
        comes from `Ledger.collector()`, and `loading` settles once its background loading is done."""
        ledger.transact(lambda tx: tx.activate(T, C1, [act("a")]))
        wait_until(lambda: not ledger.loading, "the background loading to settle")
        collector = ledger.collector()
        if collector is not None:
            names = [family.name for family in collector.collect()]
            assert names and len(names) == len(set(names))

    def test_transact_and_read_after_close_are_unavailable(self, backend: Backend, tmp_path: Path):
        """api.md Errors: a ledger that is not open is UNAVAILABLE, never a silent success."""
        lg = backend.make(tmp_path)
        lg.open()
        lg.close()
        assert not lg.ready
        with pytest.raises(LedgerUnavailable):
            lg.transact(lambda tx: tx.put_plan(T, "p", 1))
        with pytest.raises(LedgerUnavailable):
            lg.read(lambda r: r.plan(T))

    def test_tenants_are_those_with_a_plan_in_id_order(self, ledger: Ledger):
        """LedgerReader.tenants (the per-tenant metrics read every tenant through it): every tenant with a
        plan, ordered by id; figures alone make no tenant."""
        ledger.transact(lambda tx: (tx.put_plan("b", "p", 1), tx.put_plan("a", "p", 1), tx.count_sends("c", C1, 1)))
        assert ledger.read(lambda r: r.tenants()) == ["a", "b"]

    # -- notifications ---------------------------------------------------------------------------

    def test_notice_states_are_kept_per_figure_and_the_raised_ones_listed(self, ledger: Ledger):
        """AC-1 (reminders while a figure stays above a threshold): each figure's notice state is kept
        and replaced; the raised ones (level above 0) are listed by tenant and figure."""
        ledger.transact(lambda tx: tx.put_notice(T, UsageFigure.CONTACTS, NoticeState(0.8, C1, 5)))
        ledger.transact(lambda tx: tx.put_notice(T, UsageFigure.SENDS, NoticeState(0.0, C1, 0)))
        ledger.transact(lambda tx: tx.put_notice("tenant-b", UsageFigure.SENDS, NoticeState(0.5, C1, 6)))
        ledger.transact(lambda tx: tx.put_notice(T, UsageFigure.CONTACTS, NoticeState(0.9, C1, 7)))
        assert ledger.read(lambda r: r.notice(T, UsageFigure.CONTACTS)) == NoticeState(0.9, C1, 7)
        assert ledger.read(lambda r: r.notice(T, UsageFigure.SENDS)) == NoticeState(0.0, C1, 0)
        assert ledger.read(lambda r: r.notice("nobody", UsageFigure.CONTACTS)) is None
        assert ledger.read(lambda r: r.raised_notices()) == [
            (T, UsageFigure.CONTACTS, NoticeState(0.9, C1, 7)),
            ("tenant-b", UsageFigure.SENDS, NoticeState(0.5, C1, 6)),
        ]

    def test_the_outbox_lists_events_in_order_and_prunes_only_old_delivered_ones(self, ledger: Ledger):
        """docs/notifications.md (events in order, resumable by sequence): events listed after a sequence,
        for all tenants or one; a consumer's cursor never moves back; pruning takes the oldest events up
        to a sequence, and only those written before the instant given."""
        seqs = [
            ledger.transact(lambda tx, tenant=tenant, name=name: tx.add_event(event(tenant, name)))
            for tenant, name in ((T, "e1"), ("tenant-b", "e2"), (T, "e3"))
        ]
        assert seqs == [1, 2, 3]
        listed = ledger.read(lambda r: r.events_after(0, "", 10))
        assert [(e.event_id, e.sequence) for e in listed] == [("e1", 1), ("e2", 2), ("e3", 3)]
        assert listed[1] == replace(event("tenant-b", "e2"), sequence=2)
        assert [e.event_id for e in ledger.read(lambda r: r.events_after(1, T, 10))] == ["e3"]
        assert [e.event_id for e in ledger.read(lambda r: r.events_after(0, "", 2))] == ["e1", "e2"]
        assert ledger.read(lambda r: (r.pending_events(1), r.pending_events(3), r.last_event_seq())) == (
            (2, C1 + 5),
            (0, None),
            3,
        )
        assert ledger.read(lambda r: r.event_cursor("webhook")) == 0
        ledger.transact(lambda tx: tx.put_event_cursor("webhook", 2))
        ledger.transact(lambda tx: tx.put_event_cursor("webhook", 1))
        assert ledger.read(lambda r: r.event_cursor("webhook")) == 2
        assert ledger.transact(lambda tx: tx.prune_events(C1 + 5, 3, 10)) == 0
        assert ledger.transact(lambda tx: tx.prune_events(C1 + 6, 2, 1)) == 1
        assert ledger.transact(lambda tx: tx.prune_events(C1 + 6, 2, 10)) == 1
        assert [e.event_id for e in ledger.read(lambda r: r.events_after(0, "", 10))] == ["e3"]

    def test_kept_answers_and_audit_rows_are_pruned_oldest_first_and_only_when_old(self, ledger: Ledger):
        """api.md (answers kept for retries, then pruned), operations.md Retention: pruning
        deletes up to `limit` of the oldest rows written before the instant given, and nothing newer."""
        second = 1_000_000
        for n in range(1, 5):
            answer = StoredResult(b"fp", bytes([n]), CONTEXT)
            ledger.transact(lambda tx, n=n, answer=answer: tx.store_result(T, "CheckSend", f"r{n}", answer, n * second))
            entry = AuditEntry(n * second, T, C1, "CheckSend", f"c{n}", "ALLOW", "OK", 1, 1)
            ledger.transact(lambda tx, entry=entry: tx.audit([entry]))
        assert ledger.transact(lambda tx: tx.prune_results(3 * second, 10)) == 2
        assert ledger.transact(lambda tx: tx.prune_results(10 * second, 1)) == 1
        kept = ledger.read(lambda r: [r.stored_result(T, "CheckSend", f"r{n}") is not None for n in range(1, 5)])
        assert kept == [False, False, False, True]
        assert ledger.transact(lambda tx: tx.prune_audit(3 * second, 10)) == 2
        assert ledger.transact(lambda tx: tx.prune_audit(3 * second, 10)) == 0
        assert ledger.transact(lambda tx: tx.prune_audit(10 * second, 1)) == 1

    # -- counters ------------------------------------------------------------------------------

    def test_activate_and_add_sends_keep_usage_counters_consistent(self, ledger: Ledger):
        """SG-2, SG-3: usage counters move exactly with activations and sends."""
        ledger.transact(lambda tx: tx.activate(T, C1, [act("a", 1), act("b", 0), act("c", 2)]))
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(3, 3)
        ledger.transact(lambda tx: tx.add_sends(T, C1, "a", 4))
        ledger.transact(lambda tx: tx.add_sends(T, C1, "b", 1))
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(3, 8)
        assert ledger.read(lambda r: (r.activation(T, C1, "a").sends, r.activation(T, C1, "b").sends)) == (5, 1)
        ledger.transact(lambda tx: tx.activate(T, C1, []))
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(3, 8)
        # cycles and tenants are separate figures
        ledger.transact(lambda tx: tx.activate(T, C0, [act("a", 1, at=C0)]))
        ledger.transact(lambda tx: tx.activate("tenant-b", C1, [act("a", 7)]))
        assert ledger.read(lambda r: (r.counters(T, C0), r.counters("tenant-b", C1), r.counters(T, C1))) == (
            Counters(1, 1),
            Counters(1, 7),
            Counters(3, 8),
        )
        assert ledger.read(lambda r: r.counters("nobody", C1)) == Counters()

    def test_add_sends_to_a_contact_not_active_is_refused_and_changes_nothing(self, ledger: Ledger):
        """SG-3, SG-8: sends are only added to active contacts; a refusal changes no figure."""
        ledger.transact(lambda tx: tx.activate(T, C1, [act("a")]))
        with pytest.raises(Exception):  # noqa: B017 - any refusal; the point is that nothing changes
            ledger.transact(lambda tx: tx.add_sends(T, C1, "ghost", 1))
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(1, 1)
        assert ledger.read(lambda r: r.activation(T, C1, "ghost")) is None
        assert ledger.ready

    def test_sends_to_contacts_not_all_active_are_refused_and_change_nothing(self, ledger: Ledger):
        """SG-3, SG-8: `send_to_active` counts only contacts active in the cycle; given one that is
        not, the unit fails with LookupError (on PostgreSQL once the write is sent, at the commit at
        the latest) and no figure moves."""
        ledger.transact(lambda tx: tx.activate(T, C1, [act("a")]))
        with pytest.raises(LookupError):
            ledger.transact(lambda tx: tx.send_to_active(T, C1, ["a", "ghost"]))
        assert ledger.read(lambda r: (r.counters(T, C1), r.activation(T, C1, "a").sends)) == (Counters(1, 1), 1)
        ledger.transact(lambda tx: tx.send_to_active(T, C1, ["a"]))
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(1, 2)
        assert ledger.ready

    def test_active_contacts_are_listed_in_contact_id_order_after_a_cursor(self, ledger: Ledger):
        """CR-7 / api.md ListActiveContacts pagination depends on this order."""
        ids = ["m", "b", "z", "a", "k", "c"]
        ledger.transact(lambda tx: tx.activate(T, C1, [act(i) for i in ids]))
        ledger.transact(lambda tx: tx.activate(T, C0, [act("old", at=C0)]))
        assert [a.contact_id for a in ledger.read(lambda r: r.active_contacts(T, C1, "", 100))] == sorted(ids)
        assert [a.contact_id for a in ledger.read(lambda r: r.active_contacts(T, C1, "c", 2))] == ["k", "m"]
        assert ledger.read(lambda r: r.active_contacts(T, C1, "z", 10)) == []
        assert ledger.read(lambda r: r.active_contacts(T, C1, "", 1)) == [act("a")]

    # -- the dedupe filter: never "not active" for an active contact --------------------------

    def test_dedupe_never_answers_not_active_for_an_active_contact_beyond_filter_capacity(
        self, backend: Backend, ledger: Ledger
    ):
        """SG-2, SG-8, domain 'Counting is exact': the filter may say maybe, never 'not active' for an
        active contact: while it is built in the background, and after it outgrows its first size and is
        built again bigger while the contacts keep coming."""
        ids = [f"contact-{i:05d}" for i in range(3000)]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]

            def unit(tx: LedgerTx, chunk: list[str] = chunk) -> list[str]:
                tx.activate(T, C1, [act(c) for c in chunk])
                # read-your-writes through the filter, within the same unit
                return [c for c in chunk if tx.activation(T, C1, c) is None]

            assert ledger.transact(unit) == []
        capacity = backend.filter_capacity
        if capacity is not None:
            wait_until(lambda: (capacity(ledger, T, C1) or 0) >= 3000, "the filter built bigger")
        missing = ledger.transact(lambda tx: [c for c in ids if tx.activation(T, C1, c) is None])
        assert missing == []
        strangers = [f"stranger-{i}" for i in range(2000)]
        assert ledger.transact(lambda tx: [c for c in strangers if tx.activation(T, C1, c) is not None]) == []
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(3000, 3000)

    def test_dedupe_never_misses_a_contact_activated_while_a_bigger_filter_is_built(
        self, backend: Backend, ledger: Ledger
    ):
        """SG-2, SG-8, domain 'Counting is exact': 8 writers activate contacts in shared commits while the
        filter keeps outgrowing its size and is built again in the background; afterwards every one of them
        is active to the writer, alone and in a batch, so none could be counted twice."""
        rounds, writers, per_unit = 30, 8, 40
        every: list[str] = []
        lock = threading.Lock()

        def writer(n: int) -> None:
            for r in range(rounds):
                ids = [f"w{n}-r{r}-{i}" for i in range(per_unit)]
                ledger.transact(lambda tx, ids=ids: tx.activate(T, C1, [act(c) for c in ids]))
                with lock:
                    every.extend(ids)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(every) == rounds * writers * per_unit
        assert ledger.transact(lambda tx: [c for c in every if tx.activation(T, C1, c) is None]) == []
        assert ledger.transact(lambda tx: tx.active_among(T, C1, every)) == set(every)
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(len(every), len(every))

    def test_dedupe_filters_rebuilt_after_close_and_reopen_know_every_active_contact(
        self, backend: Backend, tmp_path: Path
    ):
        """SG-2, SG-8: filters rebuilt from the ledger at open never call an active contact new."""
        current = [f"now-{i}" for i in range(1500)]
        past = [f"past-{i}" for i in range(300)]
        other = [f"b-{i}" for i in range(50)]
        first = backend.make(tmp_path)
        first.open()
        try:
            first.transact(lambda tx: tx.activate(T, C0, [act(c, at=C0) for c in past]))
            first.transact(lambda tx: tx.activate(T, C1, [act(c) for c in current]))
            first.transact(lambda tx: tx.activate("tenant-b", C0, [act(c, at=C0) for c in other]))
        finally:
            first.close()
        second = backend.make(tmp_path)
        second.open()
        try:
            assert second.ready

            def missing(tenant: str, cycle: int, ids: list[str]) -> list[str]:
                return second.transact(lambda tx: [c for c in ids if tx.activation(tenant, cycle, c) is None])

            assert missing(T, C1, current) == []
            assert missing(T, C0, past) == []
            assert missing("tenant-b", C0, other) == []
            # keep activating past the rebuilt filter's size: growth after a reload
            more = [f"more-{i}" for i in range(3000)]
            second.transact(lambda tx: tx.activate(T, C1, [act(c) for c in more]))
            assert missing(T, C1, current + more) == []
            assert second.read(lambda r: r.counters(T, C1)) == Counters(4500, 4500)
            assert second.transact(lambda tx: tx.activation(T, C1, "past-1")) is None
        finally:
            second.close()

    def test_dedupe_stays_exact_after_a_unit_that_activated_and_then_raised(self, ledger: Ledger):
        """SG-8, domain 'Counting is exact': a rolled-back activation is not active; the filter's maybe is confirmed."""
        ledger.transact(lambda tx: tx.activate(T, C1, [act("kept")]))

        def bad(tx: LedgerTx) -> None:
            tx.activate(T, C1, [act("rolled-back")])
            raise ValueError("no")

        with pytest.raises(ValueError):
            ledger.transact(bad)
        assert ledger.transact(lambda tx: (tx.activation(T, C1, "kept"), tx.activation(T, C1, "rolled-back"))) == (
            act("kept"),
            None,
        )
        # the contact can now be activated for real
        ledger.transact(lambda tx: tx.activate(T, C1, [act("rolled-back")]))
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(2, 2)

    # -- stored results ------------------------------------------------------------------------

    def test_stored_results_round_trip_and_survive_reopen(self, backend: Backend, tmp_path: Path):
        """SG-8 / api.md Errors: request_id answers are durable and scoped to tenant and RPC."""
        result = StoredResult(b"\xff" * 8, bytes([1, 3, 1, 0, 200, 1]) + "é".encode(), CONTEXT)
        lg = backend.make(tmp_path)
        lg.open()
        try:
            lg.transact(lambda tx: tx.store_result(T, "CheckSend", "req-1", result, 42))
            assert lg.read(lambda r: r.stored_result(T, "CheckSend", "req-1")) == result
            assert lg.transact(lambda tx: tx.stored_result(T, "CheckSend", "req-1")) == result
            # scoped to tenant and rpc
            assert lg.read(lambda r: r.stored_result(T, "CheckSendBatch", "req-1")) is None
            assert lg.read(lambda r: r.stored_result("tenant-b", "CheckSend", "req-1")) is None
            assert lg.read(lambda r: r.stored_result(T, "CheckSend", "req-2")) is None
        finally:
            lg.close()
        lg = backend.make(tmp_path)
        lg.open()
        try:
            assert lg.read(lambda r: r.stored_result(T, "CheckSend", "req-1")) == result
        finally:
            lg.close()


def queued(backend: Backend, ledger: Ledger) -> int:
    assert backend.pending is not None, f"{backend.name} has no group commit"
    return backend.pending(ledger)


@pytest.mark.parametrize("backend", GROUPING, indirect=True)
class TestGroupCommit:
    """Units queued behind the writer share one transaction and stay isolated in it."""

    def test_a_unit_that_raises_fails_alone_while_the_rest_of_its_group_commits(
        self, backend: Backend, ledger: Ledger, commits: list[tuple[int, bool]]
    ):
        """Ledger docstring / api.md Errors: group commit isolates units; other callers' decisions still commit."""

        def good(name: str) -> Callable[[LedgerTx], str]:
            def unit(tx: LedgerTx) -> str:
                tx.activate(T, C1, [act(name)])
                return name

            return unit

        def bad(tx: LedgerTx) -> None:
            tx.activate(T, C1, [act("b")])
            raise RuntimeError("unit b fails")

        with writer_blocked(ledger):
            calls = [_Call(ledger, good("a"))]
            wait_until(lambda: queued(backend, ledger) == 1, "unit a queued")
            calls.append(_Call(ledger, bad))
            wait_until(lambda: queued(backend, ledger) == 2, "unit b queued")
            calls.append(_Call(ledger, good("c")))
            wait_until(lambda: queued(backend, ledger) == 3, "unit c queued")
        for c in calls:
            c.join()
        assert (calls[0].result, calls[0].error) == ("a", None)
        assert isinstance(calls[1].error, RuntimeError)
        assert (calls[2].result, calls[2].error) == ("c", None)
        assert (3, True) in commits  # the three shared one commit
        assert ledger.read(lambda r: [r.activation(T, C1, c) is not None for c in "abc"]) == [True, False, True]
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(2, 2)

    def test_a_unit_whose_statement_violates_a_constraint_fails_alone_while_the_rest_of_its_group_commits(
        self, backend: Backend, ledger: Ledger, commits: list[tuple[int, bool]]
    ):
        """Ledger docstring / api.md Errors (SG-2, SG-8): a unit breaking activate's precondition (contact
        already active) is still just a unit that raises: it fails alone, its neighbours commit, and the
        ledger stays ready."""
        ledger.transact(lambda tx: tx.activate(T, C1, [act("dup")]))

        def good(name: str) -> Callable[[LedgerTx], str]:
            def unit(tx: LedgerTx) -> str:
                tx.activate(T, C1, [act(name)])
                return name

            return unit

        def bad(tx: LedgerTx) -> None:
            tx.activate(T, C1, [act("dup")])  # already active: the store refuses the row

        with writer_blocked(ledger):
            calls = [_Call(ledger, good("a"))]
            wait_until(lambda: queued(backend, ledger) == 1, "unit a queued")
            calls.append(_Call(ledger, bad))
            wait_until(lambda: queued(backend, ledger) == 2, "unit dup queued")
            calls.append(_Call(ledger, good("c")))
            wait_until(lambda: queued(backend, ledger) == 3, "unit c queued")
        for c in calls:
            c.join()
        assert calls[1].error is not None
        assert (calls[0].result, calls[0].error) == ("a", None)
        assert (calls[2].result, calls[2].error) == ("c", None)
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(3, 3)
        assert ledger.ready

    def test_a_light_unit_queued_behind_heavy_ones_commits_before_the_second_of_them(
        self, backend: Backend, ledger: Ledger
    ):
        """Ledger.transact weight: three units of 500 contacts each, then a one-contact unit, queued
        behind the writer: the light one is committed with the first heavy one, ahead of the others
        (commit order, seen through the callbacks each unit registers)."""
        order: list[str] = []

        def unit(name: str, size: int) -> Callable[[LedgerTx], str]:
            def work(tx: LedgerTx) -> str:
                tx.activate(T, C1, [act(f"{name}-{i}") for i in range(size)])
                tx.after_commit(lambda: order.append(name))
                return name

            return work

        with writer_blocked(ledger):
            calls = []
            for name, size in (("heavy-1", 500), ("heavy-2", 500), ("heavy-3", 500), ("light", 1)):
                calls.append(_Call(ledger, unit(name, size), weight=size))
                wait_until(lambda: queued(backend, ledger) == len(calls), f"unit {name} queued")
        for c in calls:
            c.join()
        assert [c.error for c in calls] == [None] * 4
        assert order.index("light") < order.index("heavy-2")
        assert sorted(order) == ["heavy-1", "heavy-2", "heavy-3", "light"]
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(1501, 1501)

    def test_concurrent_transact_from_16_threads_all_commit_and_share_commits(
        self, backend: Backend, ledger: Ledger, commits: list[tuple[int, bool]]
    ):
        """SG-2, SG-8: concurrent decisions all commit exactly once, sharing commits (group commit)."""
        threads, per_thread = 16, 10
        results: dict[int, list[object]] = {i: [] for i in range(threads)}
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                for j in range(per_thread):
                    contact = f"t{i:02d}-{j:02d}"

                    def unit(tx: LedgerTx, contact: str = contact) -> str:
                        assert tx.activation(T, C1, contact) is None
                        tx.activate(T, C1, [act(contact, 1)])
                        tx.add_sends(T, C1, contact, 1)
                        return contact

                    results[i].append(ledger.transact(unit))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        with writer_blocked(ledger):
            pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
            for t in pool:
                t.start()
            # every thread's first unit is queued behind the blocked writer
            wait_until(lambda: queued(backend, ledger) == threads, "16 units queued")
        for t in pool:
            t.join(60)
            assert not t.is_alive()
        assert errors == []
        for i in range(threads):
            assert results[i] == [f"t{i:02d}-{j:02d}" for j in range(per_thread)]
        total = threads * per_thread
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(total, 2 * total)
        listed = ledger.read(lambda r: r.active_contacts(T, C1, "", 10_000))
        assert len(listed) == total and all(a.sends == 2 for a in listed)
        assert all(ok for _, ok in commits)
        assert sum(size for size, _ in commits) == total + 1  # every unit, plus the gate, committed once
        assert max(size for size, _ in commits) > 1  # and some shared a commit

    def test_a_unit_whose_deadline_passed_while_it_waited_is_not_run(self, backend: Backend, ledger: Ledger):
        """README Errors (DEADLINE_EXCEEDED: "it was not decided and nothing is counted"): a unit is not started
        once its deadline has passed; the caller gets DeadlineExceeded, nothing it would have written is stored,
        and a unit whose deadline is still ahead commits."""
        ran: list[str] = []

        def unit(name: str) -> Callable[[LedgerTx], str]:
            def work(tx: LedgerTx) -> str:
                ran.append(name)
                tx.activate(T, C1, [act(name)])
                return name

            return work

        with writer_blocked(ledger):
            late = _Call(ledger, unit("late"), deadline=time.monotonic() + 0.05)
            wait_until(lambda: queued(backend, ledger) == 1, "the late unit queued")
            timely = _Call(ledger, unit("timely"), deadline=time.monotonic() + 60)
            wait_until(lambda: queued(backend, ledger) == 2, "the timely unit queued")
            time.sleep(0.1)
        late.join()
        timely.join()
        assert isinstance(late.error, DeadlineExceeded)
        assert (timely.result, timely.error) == ("timely", None)
        assert ran == ["timely"]
        assert ledger.read(lambda r: r.active_among(T, C1, ["late", "timely"])) == {"timely"}
        assert ledger.read(lambda r: r.counters(T, C1)) == Counters(1, 1)
        with pytest.raises(DeadlineExceeded):
            ledger.transact(unit("past"), deadline=time.monotonic() - 1)
        assert ran == ["timely"] and ledger.ready


@pytest.mark.parametrize("backend", SINGLE_WRITER, indirect=True)
class TestOneWriter:
    def test_a_second_ledger_on_the_same_store_fails_to_open_while_the_first_is_open(
        self, backend: Backend, tmp_path: Path
    ):
        """SG-2: the filters are exact only with one writer; a second one is LedgerUnavailable."""
        first = backend.make(tmp_path)
        first.open()
        second = backend.make(tmp_path)
        try:
            with pytest.raises(LedgerUnavailable):
                second.open()
            assert not second.ready
            # the first is unaffected
            first.transact(lambda tx: tx.activate(T, C1, [act("a")]))
        finally:
            first.close()
        second.open()
        try:
            assert second.read(lambda r: r.counters(T, C1)) == Counters(1, 1)
        finally:
            second.close()


def test_a_lease_is_taken_renewed_and_released_by_its_holder(ledger: Ledger):
    """issue 16 (the webhook delivered, the reminder sweep run, by one sidecar at a time): a lease
    is taken for a time, renewed by its holder, kept in the store with its holder and expiry
    (on the store's clock), and let go by its holder only: it then expires, its last holder
    kept."""
    assert ledger.read(lambda r: r.lease("webhook")) is None
    assert ledger.transact(lambda tx: tx.take_lease("webhook", "a", 60_000_000)) is True
    first = ledger.read(lambda r: r.lease("webhook"))
    assert first is not None and first.holder == "a" and first.live
    assert 59_000_000 <= first.expires_us - first.now_us <= 60_000_000
    assert ledger.transact(lambda tx: tx.take_lease("webhook", "a", 120_000_000)) is True
    renewed = ledger.read(lambda r: r.lease("webhook"))
    assert renewed is not None and renewed.expires_us > first.expires_us
    ledger.transact(lambda tx: tx.release_lease("webhook", "someone-else"))
    kept = ledger.read(lambda r: r.lease("webhook"))
    assert kept is not None and (kept.holder, kept.expires_us) == (renewed.holder, renewed.expires_us)
    ledger.transact(lambda tx: tx.release_lease("webhook", "a"))
    released = ledger.read(lambda r: r.lease("webhook"))
    assert released is not None and released.holder == "a" and not released.live
    assert ledger.read(lambda r: r.lease("reminders")) is None


@pytest.mark.parametrize("backend", SINGLE_WRITER, indirect=True)
def test_the_only_writer_of_its_store_holds_every_lease_it_asks_for(ledger: Ledger):
    """A lease left by a sidecar that is gone (a kill -9 before it let go) is no obstacle on a store
    that has one writer: the sidecar holding the file now takes it at once."""
    assert ledger.transact(lambda tx: tx.take_lease("webhook", "before-the-crash", 60_000_000))
    assert ledger.transact(lambda tx: tx.take_lease("webhook", "after-the-restart", 60_000_000))
    lease = ledger.read(lambda r: r.lease("webhook"))
    assert lease is not None and lease.holder == "after-the-restart"


def event(tenant_id: str, name: str) -> UsageEvent:
    usage = Usage(tenant_id, C1, C1 + 10, 8, 10, 0.8, 8, 100, UsageState.WARNING, 0, "0", "EUR", "p")
    return UsageEvent(name, UsageEventType.THRESHOLD_CROSSED, UsageFigure.CONTACTS, tenant_id, 0.8, C1 + 5, usage)


@pytest.fixture
def fleet(backend: Backend, tmp_path: Path) -> Iterator[list[Ledger]]:
    """Two ledgers (two sidecars) open on one store."""
    ledgers = [backend.make(tmp_path), backend.make(tmp_path)]
    for lg in ledgers:
        lg.open()
    try:
        yield ledgers
    finally:
        for lg in ledgers:
            lg.close()


@pytest.mark.parametrize("backend", SHARED, indirect=True)
class TestSharedStore:
    """Several ledgers on one store, as several sidecars of a fleet share one database."""

    def test_ledgers_on_one_store_open_together_and_see_each_others_commits(self, fleet: list[Ledger]):
        """issue 16 (any number of sidecars share every tenant's quota): what one commits the other reads
        and decides on at once, in its units as in its reads; nothing is cached across transactions."""
        first, second = fleet
        first.transact(lambda tx: tx.activate(T, C1, [act("a")]))
        assert second.read(lambda r: r.counters(T, C1)) == Counters(1, 1)
        assert second.transact(lambda tx: tx.activation(T, C1, "a")) == act("a")
        second.transact(lambda tx: tx.send_to_active(T, C1, ["a"]))
        first.transact(lambda tx: tx.put_plan(T, "v2", 5))
        assert first.transact(lambda tx: (tx.counters(T, C1), tx.active_among(T, C1, ["a", "b"]))) == (
            Counters(1, 2),
            {"a"},
        )
        assert second.read(lambda r: r.plan(T)) == StoredPlan("v2", 5)

    def test_units_on_two_ledgers_racing_at_the_ceiling_admit_exactly_the_limit(self, fleet: list[Ledger]):
        """SG-2, SG-8: 8 threads on each of two ledgers read the count, decide and activate (the engine's
        read-decide-write in a unit, its reads told ahead as a CheckSend's are) for distinct new
        contacts: exactly the limit is admitted, and the count equals the rows."""
        limit, per_thread = 25, 10
        admitted: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(16)

        def admit(tx: LedgerTx, contact: str) -> bool:
            tx.read_ahead(T, ReadAhead(C1, [contact]))
            if tx.counters(T, C1).active_contacts >= limit or tx.active_among(T, C1, [contact]):
                return False
            tx.send_to_new(T, C1, [contact], C1 + 1, "CAMPAIGN")
            return True

        def racer(lg: Ledger, name: str) -> None:
            start.wait(20)
            for i in range(per_thread):
                contact = f"{name}-{i}"
                if lg.transact(lambda tx, contact=contact: admit(tx, contact)):
                    with lock:
                        admitted.append(contact)

        _race(fleet, racer)
        rows = fleet[0].read(lambda r: r.active_contacts(T, C1, "", 1000))
        assert (len(admitted), len(rows)) == (limit, limit)
        assert sorted(a.contact_id for a in rows) == sorted(admitted)
        assert fleet[1].read(lambda r: r.counters(T, C1)) == Counters(limit, limit)

    def test_a_lease_has_one_holder_at_a_time_until_it_expires_or_is_let_go(self, fleet: list[Ledger]):
        """issue 16 (the delivery lease): while one sidecar holds a lease, the other cannot take it;
        once it lapses (its holder stopped renewing: a kill -9) or is let go, the other takes it; 16
        threads on two ledgers racing for a free lease leave exactly one holder."""
        first, second = fleet
        assert first.transact(lambda tx: tx.take_lease("webhook", "a", 400_000))
        assert second.transact(lambda tx: tx.take_lease("webhook", "b", 400_000)) is False
        held = second.read(lambda r: r.lease("webhook"))
        assert held is not None and held.holder == "a" and held.live
        time.sleep(0.5)
        lapsed = second.read(lambda r: r.lease("webhook"))
        assert lapsed is not None and not lapsed.live
        assert second.transact(lambda tx: tx.take_lease("webhook", "b", 60_000_000))
        assert first.transact(lambda tx: tx.take_lease("webhook", "a", 60_000_000)) is False
        second.transact(lambda tx: tx.release_lease("webhook", "b"))
        assert first.transact(lambda tx: tx.take_lease("webhook", "a", 60_000_000))

        start = threading.Barrier(16)
        won: list[str] = []

        def racer(lg: Ledger, name: str) -> None:
            start.wait(20)
            if lg.transact(lambda tx: tx.take_lease("sweep", name, 60_000_000)):
                won.append(name)

        _race(fleet, racer)
        (winner,) = won
        lease = first.read(lambda r: r.lease("sweep"))
        assert lease is not None and lease.holder == winner

    def test_a_reader_following_the_outbox_sees_every_event_in_order_though_commits_are_late(self, fleet: list[Ledger]):
        """issue 16 (notifications once per fleet, in order; sequence values are not in commit order):
        units on two ledgers add events and hold their commits a little while a reader follows the outbox
        by `seq > cursor`; it reads every event once, in sequence order, with no gap."""
        writers, per_writer = 6, 8
        done = threading.Event()
        seen: list[UsageEvent] = []

        def writer(lg: Ledger, n: int) -> None:
            rng = random.Random(n)
            for i in range(per_writer):

                def unit(tx: LedgerTx, name: str = f"w{n}-{i}") -> int:
                    seq = tx.add_event(event(f"tenant-{n}", name))
                    time.sleep(rng.random() * 0.004)
                    return seq

                lg.transact(unit)

        def follow() -> None:
            cursor = 0
            while True:
                finished = done.is_set()
                found = fleet[0].read(lambda r, after=cursor: r.events_after(after, "", 100))
                seen.extend(found)
                cursor = found[-1].sequence if found else cursor
                if finished and not found:
                    return

        reader = threading.Thread(target=follow)
        reader.start()
        threads = [threading.Thread(target=writer, args=(fleet[n % 2], n)) for n in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        done.set()
        reader.join(60)
        total = writers * per_writer
        assert [e.sequence for e in seen] == list(range(1, total + 1))
        assert len({e.event_id for e in seen}) == total
        assert fleet[1].read(lambda r: r.last_event_seq()) == total

    def test_units_deadlocked_over_two_tenants_both_commit_and_a_failed_attempt_leaves_no_callback(
        self, fleet: list[Ledger]
    ):
        """Ledger concurrency contract: two units taking two tenants in opposite orders deadlock;
        PostgreSQL aborts one, which runs again until it commits; each unit's after_commit callback
        runs once, never for an aborted attempt."""
        first_in, second_in = threading.Event(), threading.Event()
        attempts = {"ab": 0, "ba": 0}
        called: list[str] = []

        def crossing(name: str, mine: threading.Event, theirs: threading.Event) -> Callable[[LedgerTx], str]:
            def unit(tx: LedgerTx) -> str:
                attempts[name] += 1
                tx.count_sends(f"tenant-{name[0]}", C1, 1)
                tx.after_commit(lambda: called.append(name))
                if attempts[name] == 1:
                    mine.set()
                    assert theirs.wait(20)
                tx.count_sends(f"tenant-{name[1]}", C1, 1)
                return name

            return unit

        calls = [
            _Call(fleet[0], crossing("ab", first_in, second_in)),
            _Call(fleet[1], crossing("ba", second_in, first_in)),
        ]
        for c in calls:
            c.join()
        assert [(c.result, c.error) for c in calls] == [("ab", None), ("ba", None)]
        # one at least was aborted and ran again (its re-run may meet the other again)
        assert min(attempts.values()) >= 1 and sum(attempts.values()) >= 3
        assert sorted(called) == ["ab", "ba"]
        assert fleet[0].read(lambda r: (r.counters("tenant-a", C1), r.counters("tenant-b", C1))) == (
            Counters(0, 2),
            Counters(0, 2),
        )
