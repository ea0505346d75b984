"""The engine over a ledger several sidecars write (PostgreSQL): what one engine keeps in
memory must never hide what another committed. Two engines, each with its own ledger, on
one schema, as two sidecars of a fleet."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quota_sidecar.server.domain.clock import MICROS, FakeClock
from quota_sidecar.server.domain.model import UsageEvent, UsageEventType
from quota_sidecar.server.engine import Engine, Retention
from quota_sidecar.server.ledger import Ledger

from support.backends import POSTGRES
from support.engine import NOW, T, plan, send


@pytest.fixture
def fleet(tmp_path: Path, postgres_server: None) -> Iterator[tuple[Engine, Engine, Ledger]]:
    with POSTGRES.store(tmp_path):
        ledgers = [POSTGRES.make(tmp_path), POSTGRES.make(tmp_path)]
        for lg in ledgers:
            lg.open()
        try:
            clock = FakeClock(NOW)
            yield Engine(ledgers[0], clock), Engine(ledgers[1], clock), ledgers[0]
        finally:
            for lg in ledgers:
                lg.close()


def crossings(ledger: Ledger) -> list[UsageEvent]:
    events = ledger.read(lambda r: r.events_after(0, T, 100))
    return [e for e in events if e.type == UsageEventType.THRESHOLD_CROSSED]


def test_a_threshold_re_armed_through_one_sidecar_is_crossed_again_through_another(
    fleet: tuple[Engine, Engine, Ledger],
) -> None:
    """AC-1, CR-8, SG-4 across a fleet: a threshold crossed is one event whoever crossed it.
    B crosses 50%; a raised limit put through A re-arms it; B crossing 50% of the new limit
    again is a second event, though B's own last look said the threshold was already told."""
    a, b, ledger = fleet
    a.put_plan(T, plan(4, notify_thresholds=(0.5,)))
    send(b, "c1")
    send(b, "c2")
    assert [e.threshold for e in crossings(ledger)] == [0.5]

    a.put_plan(T, plan(8, notify_thresholds=(0.5,)))
    send(b, "c3")
    send(b, "c4")
    assert [e.threshold for e in crossings(ledger)] == [0.5, 0.5]


def test_a_sidecar_without_the_webhook_prunes_no_event_another_sidecar_has_yet_to_deliver(
    fleet: tuple[Engine, Engine, Ledger],
) -> None:
    """Issue 16 (the webhook delivered by one sidecar of the fleet, at least once): B has no
    --webhook-url, but another sidecar holds the webhook's lease and has not delivered the
    event yet: B's pruning keeps it, however old. Once no sidecar has held that lease for the
    events' retention, the event is pruned like any other."""
    a, b, ledger = fleet
    a.put_plan(T, plan(4, notify_thresholds=(0.5,)))
    send(a, "c1")
    send(a, "c2")
    assert len(crossings(ledger)) == 1
    assert ledger.transact(lambda tx: tx.take_lease("webhook", "the-delivering-sidecar", 60_000_000))
    later = FakeClock(NOW)
    later.advance(30 * 86_400)
    b = Engine(b.ledger, later)
    assert b.prune(Retention(events_us=86_400 * MICROS))["events"] == 0
    assert len(crossings(ledger)) == 1

    ledger.transact(lambda tx: tx.release_lease("webhook", "the-delivering-sidecar"))
    time.sleep(0.2)
    assert b.prune(Retention(events_us=100_000))["events"] == 1
    assert crossings(ledger) == []
