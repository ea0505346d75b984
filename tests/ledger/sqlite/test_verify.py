"""A ledger whose stored figures disagree with their rows is refused at start, listed by
`quota-sidecar verify` and mended by `quota-sidecar verify --repair`.

The real `quota-sidecar` process on real ledger files; a figure is corrupted with the
sidecar stopped, through a plain SQL UPDATE or by changing its byte in the file.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
from pathlib import Path

import grpc
import pytest

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.domain.errors import LedgerUnavailable
from quota_sidecar.server.domain.model import Channel, ContactSource, MessageKind
from quota_sidecar.server.engine import ContactAddRequest, Engine, PlanInput, SendRequest
from quota_sidecar.server.ledger.sqlite import SQLiteLedger

from support.process import Process, put_plan, start
from support.serving import BIN

pytestmark = pytest.mark.process


def send_new(address: str, prefix: str, count: int) -> pb.CheckSendBatchResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.QuotaServiceStub(ch).CheckSendBatch(
            pb.CheckSendBatchRequest(
                tenant_id="t", channel=1, kind=1, contact_ids=[f"{prefix}{i}" for i in range(count)]
            ),
            timeout=10,
        )


def stop(p: Process) -> None:
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(timeout=30) == 0


def ledger_at_90_of_100(tmp_path: Path, processes: list[Process]) -> Path:
    """A ledger whose tenant `t` (limit 100, HARD) has 90 active contacts, the sidecar stopped."""
    ledger = tmp_path / "ledger.db"
    p = start(ledger)
    processes.append(p)
    p.wait_serving()
    put_plan(p.address, 100)
    assert send_new(p.address, "a", 90).allowed == 90
    stop(p)
    return ledger


def verify(ledger: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "quota-sidecar"), "verify", "--ledger", f"sqlite:///{ledger}", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def refused_start(ledger: Path, processes: list[Process]) -> str:
    p = start(ledger)
    processes.append(p)
    try:
        code = p.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the sidecar kept running on the corrupted ledger, health {p.health()}") from None
    assert code != 0
    return p.proc.stderr.read()


def serves_with_ten_slots_left(ledger: Path, processes: list[Process]) -> None:
    p = start(ledger)
    processes.append(p)
    p.wait_serving()
    more = send_new(p.address, "b", 30)
    assert (more.allowed, more.usage.active_contacts) == (10, 100)
    stop(p)


def test_a_figure_changed_on_disk_is_refused_at_start_listed_and_repaired(
    tmp_path: Path, processes: list[Process]
) -> None:
    """SG-2, SG-8: with 90 of 100 contacts active and the stored figure set to 20, the sidecar does not serve
    (it would allow 30 more); verify lists the figure, --repair recomputes it from the rows, and the sidecar
    then allows exactly the 10 contacts left."""
    ledger = ledger_at_90_of_100(tmp_path, processes)
    conn = sqlite3.connect(ledger)
    with conn:
        conn.execute("UPDATE usage SET active_contacts = 20 WHERE tenant_id = 't'")
    conn.close()

    stderr = refused_start(ledger, processes)
    assert "tenant 't'" in stderr and "usage.active_contacts is 20, the rows say 90" in stderr
    assert f"quota-sidecar verify --ledger sqlite:///{ledger}" in stderr and "--repair" in stderr

    listed = verify(ledger)
    assert listed.returncode == 1
    assert "tenant 't'" in listed.stdout and "usage.active_contacts is 20, the rows say 90" in listed.stdout
    report = json.loads(verify(ledger, "--json").stdout)
    assert [(m["tenant_id"], m["figure"], m["stored"], m["from_rows"]) for m in report["mismatches"]] == [
        ("t", "usage.active_contacts", 20, 90)
    ]
    assert (report["repaired"], report["integrity"]) == (False, ["ok"])

    repaired = verify(ledger, "--repair")
    assert repaired.returncode == 0
    assert "repaired: tenant 't'" in repaired.stdout and "usage.active_contacts is 20" in repaired.stdout
    again = verify(ledger)
    assert (again.returncode, again.stdout.strip()) == (0, "every figure equals its rows")
    serves_with_ten_slots_left(ledger, processes)


def test_a_byte_changed_in_the_closed_file_is_refused_and_repaired(tmp_path: Path, processes: list[Process]) -> None:
    """The issue's corruption, on the bytes: the usage record's active_contacts byte 90 becomes 20."""
    ledger = ledger_at_90_of_100(tmp_path, processes)
    conn = sqlite3.connect(ledger)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'usage'").fetchone()
    (cycle,) = conn.execute("SELECT cycle_start_us FROM usage WHERE tenant_id = 't'").fetchone()
    conn.close()
    data = bytearray(ledger.read_bytes())
    page = slice((root - 1) * page_size, root * page_size)
    record = b"t" + cycle.to_bytes(8, "big") + bytes([90, 90])
    at = bytes(data[page]).index(record) + page.start + 9
    data[at] = 20
    ledger.write_bytes(bytes(data))

    stderr = refused_start(ledger, processes)
    assert "tenant 't'" in stderr and "usage.active_contacts is 20, the rows say 90" in stderr
    assert verify(ledger).returncode == 1
    assert verify(ledger, "--repair").returncode == 0
    serves_with_ten_slots_left(ledger, processes)


def test_repair_is_refused_while_a_sidecar_serves_the_ledger(tmp_path: Path, processes: list[Process]) -> None:
    ledger = tmp_path / "ledger.db"
    p = start(ledger)
    processes.append(p)
    p.wait_serving()
    put_plan(p.address, 100)
    refused = verify(ledger, "--repair")
    assert refused.returncode == 2 and "in use by a running sidecar" in refused.stderr
    assert verify(ledger).returncode == 0
    stop(p)


def test_verify_of_a_missing_ledger_is_an_error(tmp_path: Path) -> None:
    missing = verify(tmp_path / "nothing.db")
    assert missing.returncode == 2 and "no ledger file" in missing.stderr
    assert not (tmp_path / "nothing.db").exists()


def test_held_counts_that_disagree_with_the_contacts_rows_are_refused_and_repaired(tmp_path: Path) -> None:
    """AC-10, MK-1: a tenant's held and marketing counts (and its cycle's end counts) are sums over its
    contacts rows; a changed count is named at open and recomputed by --repair."""
    path = tmp_path / "ledger.db"
    clock = FakeClock(1_773_000_000_000_000)
    ledger = SQLiteLedger(path)
    ledger.open()
    engine = Engine(ledger, clock)
    engine.put_plan("h", PlanInput(preset="marketing-contacts", contact_limit=10))
    engine.check_contact_add(ContactAddRequest("h", ContactSource.API, ["m1", "m2", "m3"]))
    ledger.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE holdings SET marketing = 1 WHERE tenant_id = 'h'")
        conn.execute("UPDATE usage SET held_peak = 0 WHERE tenant_id = 'h'")
    conn.close()

    with pytest.raises(LedgerUnavailable, match="tenant 'h'"):
        SQLiteLedger(path).open()
    report = json.loads(verify(path, "--json").stdout)
    assert sorted((m["figure"], m["stored"], m["from_rows"]) for m in report["mismatches"]) == [
        ("holdings.marketing", 1, 3),
        ("usage.held_peak", 0, 3),
    ]
    assert verify(path, "--repair").returncode == 0
    ledger = SQLiteLedger(path)
    ledger.open()
    try:
        usage = Engine(ledger, clock).get_usage("h")
        assert (usage.active_contacts, usage.peak_contacts) == (3, 3)
    finally:
        ledger.close()


def test_a_past_cycle_is_not_checked_at_start_but_verify_lists_and_repairs_it(tmp_path: Path) -> None:
    """CR-6, CR-7: a past cycle's figures only feed its invoice; the start checks each tenant's current
    figures, `verify` every cycle's."""
    path = tmp_path / "ledger.db"
    clock = FakeClock(1_773_000_000_000_000)
    ledger = SQLiteLedger(path)
    ledger.open()
    engine = Engine(ledger, clock)
    engine.put_plan("p", PlanInput(preset="active-cycle-hard", contact_limit=10, cycle_anchor_us=clock.now_us()))
    engine.check_send(SendRequest("p", "c1", Channel.EMAIL, MessageKind.CAMPAIGN))
    engine.check_send(SendRequest("p", "c1", Channel.EMAIL, MessageKind.CAMPAIGN))
    past = engine.get_usage("p")
    clock.advance(40 * 86_400)
    engine.check_send(SendRequest("p", "c2", Channel.EMAIL, MessageKind.CAMPAIGN))
    ledger.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE usage SET sends = 7 WHERE tenant_id = 'p' AND cycle_start_us = ?", (past.cycle_start_us,))
    conn.close()

    ledger = SQLiteLedger(path)
    ledger.open()
    ledger.close()
    report = json.loads(verify(path, "--json").stdout)
    assert [(m["cycle_start_us"], m["figure"], m["stored"], m["from_rows"]) for m in report["mismatches"]] == [
        (past.cycle_start_us, "usage.sends", 7, 2)
    ]
    assert verify(path, "--repair").returncode == 0
    assert verify(path).returncode == 0
