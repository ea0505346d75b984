"""The real `quota-sidecar serve` process: start-up readiness, SIGTERM drain, kill -9 recovery."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.domain.clock import SystemClock
from quota_sidecar.server.domain.cycles import cycle_at
from quota_sidecar.server.domain.model import Enforcement, MessageKind, Metering, Plan
from quota_sidecar.server.ledger.sqlite import migrate

from support.process import Load, Process, ledger_rows, put_plan, start
from support.serving import BIN, free_port

pytestmark = pytest.mark.process


def test_serving_without_waiting_for_filters_and_exact_while_they_are_built(
    tmp_path: Path, processes: list[Process]
) -> None:
    """SG-2, SG-8, domain 'Counting is exact': with 600,000 contacts already active, the sidecar says SERVING
    once the ledger is open, without reading them all first; from the first call a contact already active is
    ALREADY_ACTIVE (never counted again) and a new one is counted once, while the dedupe filter is built in
    the background; the filter ends up holding every active contact."""
    ledger = tmp_path / "big.db"
    migrate(ledger)
    now = SystemClock().now_us()
    anchor = now - 86_400_000_000
    plan = Plan(
        Metering.CYCLE_ACTIVE, Enforcement.HARD, 2_000_000, anchor, plan_name="P", counted_kinds=(MessageKind.CAMPAIGN,)
    )
    cycle = cycle_at(anchor, now)
    n = 600_000
    conn = sqlite3.connect(ledger)
    with conn:
        conn.execute("INSERT INTO plans VALUES ('t', ?, ?)", (plan.to_json(), anchor))
        key = conn.execute("INSERT INTO cycle_keys (tenant_id, cycle_start_us) VALUES ('t', ?)", (cycle.start_us,))
        code = conn.execute("INSERT INTO activity_names (name) VALUES ('CAMPAIGN')").lastrowid
        conn.executemany(
            "INSERT INTO cycle_activations VALUES (?, ?, 0, ?, 1)", ((key.lastrowid, f"p{i}", code) for i in range(n))
        )
        conn.execute(
            "INSERT INTO usage (tenant_id, cycle_start_us, active_contacts, sends) VALUES ('t', ?, ?, ?)",
            (cycle.start_us, n, n),
        )
    conn.close()

    p = start(ledger)
    processes.append(p)
    p.wait_serving(60)
    with grpc.insecure_channel(p.address) as ch:
        stub = pb_grpc.QuotaServiceStub(ch)
        batch = stub.CheckSendBatch(
            pb.CheckSendBatchRequest(tenant_id="t", contact_ids=["p7", "new-1", "p599999"], channel=1, kind=1),
            timeout=30,
        )
        old = stub.CheckSend(pb.CheckSendRequest(tenant_id="t", contact_id="p5", channel=1, kind=1), timeout=30)
        new = stub.CheckSend(pb.CheckSendRequest(tenant_id="t", contact_id="fresh", channel=1, kind=1), timeout=30)
    assert [r.reason for r in batch.results] == [
        pb.REASON_ALREADY_ACTIVE,
        pb.REASON_NEW_CONTACT_COUNTED,
        pb.REASON_ALREADY_ACTIVE,
    ]
    assert old.reason == pb.REASON_ALREADY_ACTIVE
    assert new.reason == pb.REASON_NEW_CONTACT_COUNTED and new.usage.active_contacts == n + 2
    metrics_url = f"http://{p.metrics_address}/metrics"
    deadline = time.monotonic() + 60
    while scrape_value(metrics_url, "quota_dedupe_filter_items") < n + 2:
        assert time.monotonic() < deadline, "the dedupe filter was never built"
        time.sleep(0.05)
    with grpc.insecure_channel(p.address) as ch:
        again = pb_grpc.QuotaServiceStub(ch).CheckSend(
            pb.CheckSendRequest(tenant_id="t", contact_id="p123456", channel=1, kind=1), timeout=5
        )
    assert again.reason == pb.REASON_ALREADY_ACTIVE and again.usage.active_contacts == n + 2


def scrape_value(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def test_sigterm_drains_in_flight_calls_and_loses_nothing(tmp_path: Path, processes: list[Process]) -> None:
    p = start(tmp_path / "ledger.db")
    processes.append(p)
    p.wait_serving()
    put_plan(p.address, 1_000_000)
    load = Load(p.address)
    load.start()
    load.wait_for(200)
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(timeout=30) == 0
    load.join()
    stderr = p.proc.stderr.read()
    assert f"listening on {p.address}" in stderr
    assert "SIGTERM received" in stderr and "ledger flushed and closed" in stderr
    assert set(load.acknowledged) <= ledger_rows(p.ledger).active_ids()


def test_kill_9_mid_load_then_restart_keeps_every_acknowledged_allow(tmp_path: Path, processes: list[Process]) -> None:
    ledger = tmp_path / "ledger.db"
    p = start(ledger)
    processes.append(p)
    p.wait_serving()
    put_plan(p.address, 1_000_000)
    load = Load(p.address, workers=6)
    load.start()
    load.wait_for(300)
    p.proc.send_signal(signal.SIGKILL)
    p.proc.wait(timeout=10)
    load.join()
    acknowledged = set(load.acknowledged)

    rows = ledger_rows(ledger)
    ids = rows.active_ids()
    assert acknowledged <= ids, f"{len(acknowledged - ids)} acknowledged ALLOWs lost"
    assert rows.figures()

    again = start(ledger)
    processes.append(again)
    again.wait_serving()
    with grpc.insecure_channel(again.address) as ch:
        stub = pb_grpc.QuotaServiceStub(ch)
        usage = stub.GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=5).usage
        assert usage.active_contacts == len(ids)
        some = sorted(acknowledged)[:50]
        r = stub.CheckSendBatch(
            pb.CheckSendBatchRequest(tenant_id="t", channel=1, kind=1, contact_ids=some), timeout=10
        )
        assert {x.reason for x in r.results} == {pb.REASON_ALREADY_ACTIVE}
        assert r.usage.active_contacts == len(ids)
    again.proc.send_signal(signal.SIGTERM)
    assert again.proc.wait(timeout=30) == 0


def test_bad_settings_stop_the_start_with_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "quota-sidecar"), "serve", "--address", "nonsense", "--ledger", str(tmp_path / "l.db")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["quota-sidecar: --address: expected HOST:PORT, got 'nonsense'"]
    env_bad = subprocess.run(
        [str(BIN / "quota-sidecar"), "serve", "--ledger", "postgresql://nowhere/x?nonsense=1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert env_bad.returncode == 2 and env_bad.stderr.startswith("quota-sidecar: --ledger:")
    assert not (tmp_path / "l.db").exists()


def test_a_ledger_option_its_backend_refuses_stops_the_start_with_one_clear_line(tmp_path: Path) -> None:
    """style.md 5: the backend checks its own settings as the ledger is built, before the port is bound."""
    for flag, value, line in (
        ("--sqlite-synchronous", "SOMETIMES", "quota-sidecar: --sqlite-synchronous: one of FULL, EXTRA, NORMAL"),
        ("--filter-fp-rate", "2", "quota-sidecar: --filter-fp-rate: must be between 0 and 1"),
    ):
        result = subprocess.run(
            [str(BIN / "quota-sidecar"), "serve", "--ledger", str(tmp_path / "l.db"), flag, value],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (result.returncode, result.stderr.strip().splitlines()) == (2, [line])
    assert not (tmp_path / "l.db").exists()


def test_second_sidecar_on_the_same_ledger_is_refused(tmp_path: Path, processes: list[Process]) -> None:
    first = start(tmp_path / "ledger.db")
    processes.append(first)
    first.wait_serving()
    second = start(tmp_path / "ledger.db")
    processes.append(second)
    assert second.proc.wait(timeout=30) == 1
    assert "in use by another sidecar" in second.proc.stderr.read()
    assert first.health() == "SERVING"


def test_environment_variables_configure_serve_and_health_command_probes(
    tmp_path: Path, processes: list[Process]
) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {
        "QUOTA_ADDRESS": address,
        "QUOTA_LEDGER": str(tmp_path / "env.db"),
        "QUOTA_METRICS_ADDRESS": "",
        "PATH": str(BIN),
    }
    proc = subprocess.Popen(
        [str(BIN / "quota-sidecar"), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    p = Process(proc, address, tmp_path / "env.db")
    processes.append(p)
    p.wait_serving()
    probe = subprocess.run(
        [str(BIN / "quota-sidecar"), "health", "--address", address], capture_output=True, text=True, timeout=30
    )
    assert probe.returncode == 0 and "SERVING" in probe.stdout
    assert (tmp_path / "env.db").exists()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    down = subprocess.run(
        [str(BIN / "quota-sidecar"), "health", "--address", address, "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode != 0


def test_a_ledger_that_is_not_ours_stops_the_start_with_one_clear_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database\n" * 100)
    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    for ledger, problem in ((garbage, "not a database"), (newer, "newer than this sidecar")):
        result = subprocess.run(
            [
                str(BIN / "quota-sidecar"),
                "serve",
                "--address",
                f"127.0.0.1:{free_port()}",
                "--ledger",
                str(ledger),
                "--metrics-address",
                "",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"quota-sidecar: cannot open the ledger {ledger}") and problem in last
        assert "Traceback" not in result.stderr


STOP_CONTINUE_TERMINATE_ROUNDS = int(os.environ.get("QUOTA_TEST_SIGNAL_ROUNDS", "24"))


@pytest.mark.parametrize("loaded", [False, True], ids=["idle", "under-load"])
def test_sigterm_right_after_sigcont_always_drains_and_exits_0(
    tmp_path: Path, processes: list[Process], loaded: bool
) -> None:
    """SIGTERM sent the moment a stopped sidecar is continued is never lost: the kernel may hand it to any
    thread (the main one still has SIGCONT pending), and the drain must start all the same. Rounds in
    all, half idle and half under load: QUOTA_TEST_SIGNAL_ROUNDS (docs/guarantees.md)."""
    for round_ in range(STOP_CONTINUE_TERMINATE_ROUNDS // 2):
        p = start(tmp_path / f"ledger-{round_}.db", "--metrics-address", "")
        processes.append(p)
        p.wait_serving()
        load = None
        if loaded:
            put_plan(p.address, 1_000_000)
            load = Load(p.address, workers=2)
            load.start()
            load.wait_for(20)
        p.proc.send_signal(signal.SIGSTOP)
        p.proc.send_signal(signal.SIGCONT)
        p.proc.send_signal(signal.SIGTERM)
        try:
            code = p.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"round {round_}: SIGTERM after SIGCONT was ignored (still running 60 s later)"
        if load is not None:
            load.join()
        stderr = p.proc.stderr.read()
        assert "SIGTERM received: draining in-flight calls" in stderr and "ledger flushed and closed" in stderr
