"""`quota-sidecar verify` on a PostgreSQL ledger: every stored figure against its rows, listed,
and recomputed by `--repair` while the fleet keeps serving (the repair holds every tenant's
row as a unit of work does). The real `quota-sidecar verify` process on a schema of its own;
figures are corrupted through plain SQL, as a bad restore or a hand edit would.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.domain.model import Channel, ContactSource, Decision, MessageKind
from quota_sidecar.server.engine import BatchRequest, ContactAddRequest, Engine, PlanInput, SendRequest
from quota_sidecar.server.ledger.postgres import PostgresLedger

from support.postgres import admin, schema_for, schema_url
from support.serving import BIN

NOW = 1_773_000_000_000_000


@pytest.fixture
def schema(postgres_server: None, tmp_path: Path) -> Iterator[str]:
    with schema_for(tmp_path) as name:
        yield name


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def engine(schema: str, clock: FakeClock) -> Iterator[Engine]:
    ledger = PostgresLedger(schema_url(schema))
    ledger.open()
    try:
        yield Engine(ledger, clock)
    finally:
        ledger.close()


def verify(schema: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "quota-sidecar"), "verify", "--ledger", schema_url(schema), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def sends(engine: Engine, prefix: str, count: int) -> list[Decision]:
    outcome = engine.check_send_batch(
        BatchRequest("t", Channel.EMAIL, MessageKind.CAMPAIGN, [f"{prefix}{i}" for i in range(count)])
    )
    return [d.decision for _, d in outcome.results]


def test_a_figure_changed_in_the_database_is_listed_and_repaired_while_the_ledger_serves(
    schema: str, engine: Engine
) -> None:
    """SG-2, SG-8 (issue 13's numbers on the fleet's ledger): limit 100, 90 active, the stored
    count set to 20 would admit 80 more; verify names it (exit 1), --repair recomputes it with
    a sidecar's ledger open, and exactly 10 more are admitted after."""
    engine.put_plan("t", PlanInput(preset="active-cycle-hard", contact_limit=100))
    assert sends(engine, "a", 90) == [Decision.ALLOW] * 90
    assert verify(schema).stdout.splitlines() == ["every figure equals its rows"]
    admin(f"UPDATE {schema}.usage SET active_contacts = 20 WHERE tenant_id = 't'")

    listed = verify(schema)
    assert listed.returncode == 1, listed.stderr
    cycle = engine.get_usage("t").cycle_start_us
    assert listed.stdout.splitlines()[0] == f"tenant 't' cycle {cycle}: usage.active_contacts is 20, the rows say 90"
    report = json.loads(verify(schema, "--json").stdout)
    assert [(m["figure"], m["stored"], m["from_rows"]) for m in report["mismatches"]] == [
        ("usage.active_contacts", 20, 90)
    ]
    assert "password" not in report["ledger"]

    repaired = verify(schema, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert verify(schema).returncode == 0
    assert sends(engine, "b", 20).count(Decision.ALLOW) == 10


def test_held_counts_and_a_past_cycle_are_checked_and_repaired(schema: str, engine: Engine, clock: FakeClock) -> None:
    """AC-10, MK-1, CR-6: held and marketing counts are sums over the contacts rows, peaks are
    at least their end counts, and a past cycle's sends are its activation rows' sends."""
    engine.put_plan("h", PlanInput(preset="marketing-contacts", contact_limit=10))
    engine.check_contact_add(ContactAddRequest("h", ContactSource.API, ["m1", "m2", "m3"]))
    engine.put_plan("t", PlanInput(preset="active-cycle-hard", contact_limit=10, cycle_anchor_us=NOW))
    engine.check_send(SendRequest("t", "c1", Channel.EMAIL, MessageKind.CAMPAIGN))
    engine.check_send(SendRequest("t", "c1", Channel.EMAIL, MessageKind.CAMPAIGN))
    past = engine.get_usage("t").cycle_start_us
    clock.advance(40 * 86_400)
    engine.check_send(SendRequest("t", "c2", Channel.EMAIL, MessageKind.CAMPAIGN))
    admin(f"UPDATE {schema}.holdings SET marketing = 1 WHERE tenant_id = 'h'")
    admin(f"UPDATE {schema}.usage SET held_peak = 0 WHERE tenant_id = 'h'")
    admin(f"UPDATE {schema}.usage SET sends = 7 WHERE tenant_id = 't' AND cycle_start_us = {past}")

    report = json.loads(verify(schema, "--json").stdout)
    assert sorted((m["tenant_id"], m["figure"], m["stored"], m["from_rows"]) for m in report["mismatches"]) == [
        ("h", "holdings.marketing", 1, 3),
        ("h", "usage.held_peak", 0, 3),
        ("t", "usage.sends", 7, 2),
    ]
    assert verify(schema, "--repair").returncode == 0
    assert verify(schema).returncode == 0
    usage = engine.get_usage("h")
    assert (usage.active_contacts, usage.peak_contacts) == (3, 3)
    assert engine.get_usage("t", past).sends == 2


def test_a_database_without_a_ledger_or_unreachable_is_exit_2_with_one_line(schema: str) -> None:
    """Nothing is created by verify: a schema no sidecar has opened is refused, as is a
    server that does not answer; the URL's password is never printed."""
    empty = verify(schema)
    assert empty.returncode == 2
    assert empty.stderr.startswith("quota-sidecar verify: ") and len(empty.stderr.splitlines()) == 1
    assert "no quota-sidecar ledger" in empty.stderr
    nowhere = subprocess.run(
        [str(BIN / "quota-sidecar"), "verify", "--ledger", "postgresql://u:s3cret@127.0.0.1:1/db"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nowhere.returncode == 2 and len(nowhere.stderr.splitlines()) == 1
    assert "s3cret" not in nowhere.stderr and "s3cret" not in nowhere.stdout
