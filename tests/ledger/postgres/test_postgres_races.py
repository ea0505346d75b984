"""Sidecars racing on one PostgreSQL ledger: three real processes, each with its own
PostgresLedger and Engine on one schema, CheckSend distinct new contacts at once against
a HARD limit that the demand far exceeds. Rule ids refer to domain.md.
"""

from __future__ import annotations

import multiprocessing
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from quota_sidecar.server.domain.clock import FakeClock, to_us
from quota_sidecar.server.domain.model import Enforcement, MessageKind, Metering, PlanInput
from quota_sidecar.server.engine import Engine
from quota_sidecar.server.ledger import LedgerTx, ReadAhead
from quota_sidecar.server.ledger.postgres import PostgresLedger
from quota_sidecar.server.ledger.postgres.tx import Transaction

from support.postgres import schema_for, schema_url
from support.racers import check_new_contacts

T = "tenant-race"
ANCHOR = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
LIMIT = 40
PROCESSES = 3
PER_PROCESS = 60
PATIENCE_S = 120
C1 = 1_771_142_400_000_000  # a cycle start


def test_three_sidecars_racing_for_new_contacts_admit_exactly_the_hard_limit(postgres_server: None, tmp_path: Path):
    """SG-2 (the limit is never exceeded, however many sidecars decide), SG-6, SG-8 (each contact
    counted once): 3 processes x 60 new contacts against a HARD limit of 40 admit exactly 40, and
    the stored count equals the activation rows, which are exactly the contacts admitted."""
    with schema_for(tmp_path) as schema:
        url = schema_url(schema)
        ledger = PostgresLedger(url)
        ledger.open()
        try:
            engine = Engine(ledger, FakeClock(NOW))
            engine.put_plan(
                T,
                PlanInput(
                    metering=Metering.CYCLE_ACTIVE,
                    enforcement=Enforcement.HARD,
                    contact_limit=LIMIT,
                    cycle_anchor_us=to_us(ANCHOR),
                    counted_kinds=(MessageKind.CAMPAIGN,),
                    plan_name="race",
                ),
            )
            spawn = multiprocessing.get_context("spawn")
            go = spawn.Barrier(PROCESSES + 1)
            answers = spawn.Queue()
            racers = [
                spawn.Process(
                    target=check_new_contacts,
                    args=(url, to_us(NOW), T, [f"p{n}-{i:03d}" for i in range(PER_PROCESS)], go, answers),
                )
                for n in range(PROCESSES)
            ]
            for racer in racers:
                racer.start()
            go.wait(PATIENCE_S)
            reports = [answers.get(timeout=PATIENCE_S) for _ in racers]
            for racer in racers:
                racer.join(PATIENCE_S)
            assert [kind for kind, _ in reports] == ["allowed"] * PROCESSES, reports
            allowed = sorted(c for _, contacts in reports if isinstance(contacts, list) for c in contacts)
            usage = engine.get_usage(T)
            rows = ledger.read(lambda r: r.active_contacts(T, usage.cycle_start_us, "", 10 * LIMIT))
            assert (len(allowed), usage.active_contacts, len(rows)) == (LIMIT, LIMIT, LIMIT)
            assert [a.contact_id for a in rows] == allowed
        finally:
            ledger.close()


class _Unlocked(Transaction):
    """The wrong variant: a unit reads the tenant's row but holds nothing, so its reads,
    fetched ahead in the same round trip as before, are stale once another unit commits."""

    lock = "SELECT 1 FROM tenants WHERE tenant_id = %s"


class _UnlockedLedger(PostgresLedger):
    transaction = _Unlocked


@pytest.mark.parametrize("variant", [PostgresLedger, _UnlockedLedger], ids=["locked", "unlocked"])
def test_two_units_deciding_on_figures_fetched_ahead_admit_one_unless_the_tenant_is_held(
    postgres_server: None, tmp_path: Path, variant: type[PostgresLedger]
):
    """SG-2, SG-8: two sidecars' units each fetch the figures ahead with the tenant (as a
    CheckSend does, `read_ahead`), one place below a HARD limit, and each admits a new contact
    if there is room. Holding the tenant, the second waits for the first and sees it: one is
    admitted. The control, the same units without the lock, made to read before either writes
    (a barrier between read and write, for the control only: a held tenant keeps the second
    unit from reading until the first commits), both admit: one past the limit."""
    limit = 3
    with schema_for(tmp_path) as schema:
        url = schema_url(schema)
        ledgers = [variant(url), variant(url)]
        for ledger in ledgers:
            ledger.open()
        try:
            ledgers[0].transact(lambda tx: tx.send_to_new(T, C1, ["a", "b"], C1 + 1, "CAMPAIGN"))
            both_read = threading.Barrier(2)
            admitted: list[bool] = []

            def admit(tx: LedgerTx, contact: str) -> bool:
                tx.read_ahead(T, ReadAhead(C1, [contact]))
                room = tx.counters(T, C1).active_contacts < limit and not tx.active_among(T, C1, [contact])
                if variant is _UnlockedLedger:
                    both_read.wait(PATIENCE_S)
                if room:
                    tx.send_to_new(T, C1, [contact], C1 + 2, "CAMPAIGN")
                return room

            threads = [
                threading.Thread(target=lambda n=n: admitted.append(ledgers[n].transact(lambda tx: admit(tx, f"x{n}"))))
                for n in range(2)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(PATIENCE_S)
            counted = ledgers[1].read(
                lambda r: (r.counters(T, C1).active_contacts, len(r.active_contacts(T, C1, "", 10)))
            )
            if variant is PostgresLedger:
                assert (sorted(admitted), counted) == ([False, True], (limit, limit))
            else:
                assert (admitted, counted) == ([True, True], (limit + 1, limit + 1))
        finally:
            for ledger in ledgers:
                ledger.close()
