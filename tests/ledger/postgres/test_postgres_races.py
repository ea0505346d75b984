"""Sidecars racing on one PostgreSQL ledger: three real processes, each with its own
PostgresLedger and Engine on one schema, CheckSend distinct new contacts at once against
a HARD limit that the demand far exceeds. Rule ids refer to domain.md.
"""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime
from pathlib import Path

from quota_sidecar.server.domain.clock import FakeClock, to_us
from quota_sidecar.server.domain.model import Enforcement, MessageKind, Metering, PlanInput
from quota_sidecar.server.engine import Engine
from quota_sidecar.server.ledger.postgres import PostgresLedger

from support.postgres import schema_for, schema_url
from support.racers import check_new_contacts

T = "tenant-race"
ANCHOR = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
LIMIT = 40
PROCESSES = 3
PER_PROCESS = 60
PATIENCE_S = 120


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
