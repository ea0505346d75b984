"""The "ledger in use" guard, with real `quota-sidecar serve` processes: it holds on the
database file itself, whatever name reaches it, and leaves no file behind."""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.ledger.sqlite import migrate

from support.process import Process, put_plan, start

pytestmark = pytest.mark.process

LIMIT = 100


def outcome(p: Process, timeout: float = 60) -> str:
    """'SERVING' once the sidecar serves, or 'exited N' once it has stopped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            return f"exited {p.proc.returncode}"
        if p.health() == "SERVING":
            return "SERVING"
        time.sleep(0.02)
    raise AssertionError("the sidecar neither served nor exited")


def assert_refused_naming(second: Process, holder: int) -> None:
    """Exit 1 at start, and exactly one line, the last, saying which process holds the ledger."""
    assert outcome(second) == "exited 1"
    lines = second.proc.stderr.read().strip().splitlines()
    naming = [line for line in lines if "in use" in line]
    assert naming == [lines[-1]], lines
    assert lines[-1].startswith("quota-sidecar: cannot open the ledger ")
    assert f"in use by another sidecar (pid {holder})" in lines[-1], lines[-1]
    assert "Traceback" not in "\n".join(lines)


def test_a_second_sidecar_is_refused_whatever_name_reaches_the_ledger(tmp_path: Path, processes: list[Process]) -> None:
    """SG-8, domain 'Counting is exact': the dedupe filters and the writer's counters are exact only
    while one process writes the ledger, so the guard holds on the database file: a second sidecar is
    refused at start through the same path, a symlink, a hard link, and after every `.lock` file
    beside the ledger was deleted; the first keeps serving."""
    ledger = tmp_path / "ledger.db"
    first = start(ledger)
    processes.append(first)
    first.wait_serving()
    (tmp_path / "symlink.db").symlink_to(ledger)
    os.link(ledger, tmp_path / "hardlink.db")
    names = [ledger, tmp_path / "symlink.db", tmp_path / "hardlink.db"]
    for name in names:
        second = start(name)
        processes.append(second)
        assert_refused_naming(second, first.proc.pid)
    for lock in tmp_path.glob("*.lock"):
        lock.unlink()
    again = start(ledger)
    processes.append(again)
    assert_refused_naming(again, first.proc.pid)
    assert first.health() == "SERVING"


def test_two_sidecars_started_at_once_through_a_symlink_never_admit_past_a_hard_limit(
    tmp_path: Path, processes: list[Process]
) -> None:
    """SG-2 (HARD limit), SG-8: two sidecars started together on one ledger, one through a symlink.
    If both served, each would count against the figures it read once and admitted itself,
    and between them admit nearly twice the limit; only one may serve, and the contacts
    admitted stay within the limit."""
    ledger = tmp_path / "ledger.db"
    link = tmp_path / "link.db"
    link.symlink_to(ledger)
    pair = [start(ledger), start(link)]
    processes.extend(pair)
    serving = [p for p in pair if outcome(p) == "SERVING"]
    for p in serving:
        put_plan(p.address, LIMIT)
    batches = {}
    for n, p in enumerate(serving):
        with grpc.insecure_channel(p.address) as ch:
            pb_grpc.QuotaServiceStub(ch).CheckSend(
                pb.CheckSendRequest(tenant_id="t", contact_id=f"first-{n}", channel=1, kind=1), timeout=10
            )
    for n, p in enumerate(serving):
        with grpc.insecure_channel(p.address) as ch:
            batches[n] = pb_grpc.QuotaServiceStub(ch).CheckSendBatch(
                pb.CheckSendBatchRequest(
                    tenant_id="t", contact_ids=[f"s{n}-{i}" for i in range(LIMIT)], channel=1, kind=1
                ),
                timeout=30,
            )
    for p in serving:
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=30) == 0
    conn = sqlite3.connect(ledger)
    try:
        activated = conn.execute("SELECT COUNT(*) FROM activations WHERE tenant_id = 't'").fetchone()[0]
    finally:
        conn.close()
    admitted = sum(r.decision == pb.DECISION_ALLOW for b in batches.values() for r in b.results) + len(serving)
    assert (admitted, activated) == (LIMIT, LIMIT)
    [refused] = [p for p in pair if p not in serving]
    [winner] = serving
    assert_refused_naming(refused, winner.proc.pid)


def test_a_clean_stop_leaves_no_lock_file_and_an_old_one_does_not_stop_the_start(
    tmp_path: Path, processes: list[Process]
) -> None:
    """Lifecycle: after SIGTERM only the ledger's own files remain; a `.lock` file an earlier
    version left beside a ledger neither stops the start nor outlives it."""
    ledger = tmp_path / "ledger.db"
    p = start(ledger)
    processes.append(p)
    p.wait_serving()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(timeout=30) == 0
    assert sorted(os.listdir(tmp_path)) == ["ledger.db"]

    old = tmp_path / "old.db"
    migrate(old)
    Path(f"{old}.lock").touch()
    q = start(old)
    processes.append(q)
    q.wait_serving()
    q.proc.send_signal(signal.SIGTERM)
    assert q.proc.wait(timeout=30) == 0
    assert sorted(os.listdir(tmp_path)) == ["ledger.db", "old.db"]


def test_a_sidecar_of_an_earlier_version_still_holding_its_lock_file_is_respected(
    tmp_path: Path, processes: list[Process]
) -> None:
    """During an upgrade the previous version may still run on the ledger, holding the `.lock`
    file it locks: the new sidecar is refused, naming that process."""
    ledger = tmp_path / "ledger.db"
    migrate(ledger)
    fd = os.open(f"{ledger}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = start(ledger)
        processes.append(p)
        assert_refused_naming(p, os.getpid())
    finally:
        os.close(fd)
    assert Path(f"{ledger}.lock").exists()


def test_a_ledger_written_back_after_removal_is_guarded_before_anything_more_is_acknowledged(
    tmp_path: Path, processes: list[Process]
) -> None:
    """SG-8: a ledger deleted underneath is written back as a new file, locked before it takes the ledger's
    name; once a decision is acknowledged on it, a second sidecar on that name is refused."""
    ledger = tmp_path / "ledger.db"
    first = start(ledger)
    processes.append(first)
    first.wait_serving()
    put_plan(first.address, 1_000)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink()
    with grpc.insecure_channel(first.address) as ch:
        r = pb_grpc.QuotaServiceStub(ch).CheckSend(
            pb.CheckSendRequest(tenant_id="t", contact_id="after", channel=1, kind=1), timeout=10
        )
    assert r.decision == pb.DECISION_ALLOW and ledger.exists()
    second = start(ledger)
    processes.append(second)
    assert_refused_naming(second, first.proc.pid)
    assert sorted(os.listdir(tmp_path)) == ["ledger.db", "ledger.db-shm", "ledger.db-wal"]
