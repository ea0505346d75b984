"""What a CheckSend costs on the wire to PostgreSQL (issue 16, Design notes: the round trips
of a decision), counted by a relay that reads the client's side of the protocol between a
real PostgresLedger and the real server: round trips (a Sync or a simple Query, after which
the client waits for the server) and statements. Counted, not timed: the figures hold on any
machine. Each test on a schema of its own, dropped afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.domain.model import Decision, Reason
from quota_sidecar.server.engine import Engine
from quota_sidecar.server.ledger.postgres import PostgresLedger

from support.engine import CAMPAIGN, NOW, T, batch, plan, send
from support.postgres import schema_for
from support.wire import WireCount, counting_relay

# A CheckSend's unit: BEGIN, the tenant's lock and what the unit reads of the tenant in one
# round trip; its writes, the tenant's ledger time and COMMIT in another.
ROUND_TRIPS = 2
# BEGIN, the lock, the read-ahead; the counted write, the stored result, the ledger time, COMMIT.
STATEMENTS = 7


@pytest.fixture
def wired(postgres_server: None, tmp_path: Path) -> Iterator[tuple[Engine, WireCount]]:
    """An engine over a PostgresLedger whose connections go through a counting relay."""
    with schema_for(tmp_path) as schema, counting_relay("127.0.0.1", 5432) as (port, count):
        url = (
            f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable&gssencmode=disable"
            f"&options=-csearch_path%3D{schema}"
        )
        ledger = PostgresLedger(url, pool_size=1)
        ledger.open()
        try:
            engine = Engine(ledger, FakeClock(NOW))
            engine.put_plan(T, plan(10, counted_kinds=(CAMPAIGN,), notify_thresholds=(0.5,)))
            yield engine, count
        finally:
            ledger.close()


def _send(engine: Engine, contact_id: str, request_id: str) -> Reason:
    outcome = send(engine, contact_id, request_id=request_id)
    assert outcome.decision.decision is Decision.ALLOW
    return outcome.decision.reason


def _costs(count: WireCount, call: Callable[[], object]) -> tuple[int, int]:
    """The round trips and statements `call()` made."""
    trips, statements = count.round_trips, count.statements
    call()
    return count.round_trips - trips, count.statements - statements


def test_a_check_send_is_two_round_trips_for_a_new_and_an_active_contact(wired: tuple[Engine, WireCount]):
    """A CheckSend with a request_id (as the Python client sends) of a new contact and of an
    active one, and its retry answered from the stored result: each one round trip to take
    the tenant with everything the unit reads, and one to write and commit. The first call
    of this engine (no plan remembered yet) may read more; the later ones may not. A decision
    was 11 round trips (new), 10 (active) and 12 statements before the reads were fetched
    ahead and the writes sent with the COMMIT."""
    engine, count = wired
    assert _send(engine, "warm-up", "r0") is Reason.NEW_CONTACT_COUNTED
    new = _costs(count, lambda: _send(engine, "c1", "r1"))
    active = _costs(count, lambda: _send(engine, "c1", "r2"))
    retry = _costs(count, lambda: _send(engine, "c1", "r2"))
    assert (new[0], active[0], retry[0]) == (ROUND_TRIPS, ROUND_TRIPS, ROUND_TRIPS), (new, active, retry)
    assert (new[1], active[1]) == (STATEMENTS, STATEMENTS), (new, active)
    assert engine.get_usage(T).sends == 3


def test_a_threshold_crossed_costs_the_outbox_its_own_round_trip(wired: tuple[Engine, WireCount]):
    """The event's sequence is read back from the outbox's counter row, which the engine
    needs (the event carries it): one round trip more than a plain decision, no other."""
    engine, count = wired
    for i in range(4):
        _send(engine, f"c{i}", f"r{i}")
    crossing = _costs(count, lambda: _send(engine, "c4", "r4"))
    assert engine.usage_events(T, 0, 10)[-1].threshold == 0.5
    assert crossing[0] == ROUND_TRIPS + 1, crossing


def test_a_check_send_batch_is_two_round_trips(wired: tuple[Engine, WireCount]):
    """A batch of new and active contacts in one unit: the same two round trips."""
    engine, count = wired
    _send(engine, "a1", "r0")
    trips, _ = _costs(count, lambda: batch(engine, ["a1", "b1", "b2", "a1"], request_id="rb"))
    assert trips == ROUND_TRIPS
    assert engine.get_usage(T).active_contacts == 3
