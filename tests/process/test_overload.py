"""Overload of the real `quota-sidecar serve`: a bounded queue of pending calls, and calls
whose deadline passed while they waited.

The sidecar is made slow for real: another process holds SQLite's write lock on the
ledger (`BEGIN IMMEDIATE`), so every call that writes waits for it, holding a worker.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc

from support.process import Process, ledger_rows, put_plan, start

pytestmark = pytest.mark.process


@contextmanager
def ledger_write_locked(ledger: Path) -> Iterator[None]:
    """Holds the ledger's write lock from another connection until the block ends."""
    conn = sqlite3.connect(ledger, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def check_send(stub: pb_grpc.QuotaServiceStub, contact: str, timeout: float) -> futures.Future:
    return stub.CheckSend.future(
        pb.CheckSendRequest(tenant_id="t", contact_id=contact, channel=1, kind=1), timeout=timeout
    )


def outcome(call: futures.Future) -> str:
    try:
        return pb.Decision.Name(call.result().decision)
    except grpc.RpcError as exc:
        return exc.code().name


def serve(tmp_path: Path, processes: list[Process], *flags: str) -> Process:
    p = start(tmp_path / "ledger.db", "--max-workers", "2", *flags)
    processes.append(p)
    p.wait_serving()
    put_plan(p.address, 1000)
    return p


def test_beyond_the_pending_bound_calls_get_resource_exhausted_at_once(
    tmp_path: Path, processes: list[Process]
) -> None:
    """With 2 workers and --max-pending-calls 2, four calls may be in the sidecar at once: of ten
    sent while the ledger is stuck, six are answered RESOURCE_EXHAUSTED while it is still stuck
    (they do not pile up), and count nothing; the four admitted are decided once it frees up
    (SG-8: each counted once)."""
    p = serve(tmp_path, processes, "--max-pending-calls", "2")
    with grpc.insecure_channel(p.address) as ch:
        stub = pb_grpc.QuotaServiceStub(ch)
        with ledger_write_locked(p.ledger):
            calls = {f"c{i}": check_send(stub, f"c{i}", timeout=60) for i in range(10)}
            waited = 0
            while sum(call.done() for call in calls.values()) < 6 and waited < 300:
                time.sleep(0.1)
                waited += 1
            refused = [c for c, call in calls.items() if call.done()]
            assert len(refused) == 6
            assert all(outcome(calls[c]) == "RESOURCE_EXHAUSTED" for c in refused)
            assert sum(not call.done() for call in calls.values()) == 4
        admitted = {c for c in calls if c not in refused}
        assert {outcome(calls[c]) for c in admitted} == {"DECISION_ALLOW"}
    rows = ledger_rows(p.ledger)
    assert rows.active_ids() == admitted
    assert rows.figures() == [(4, 4, 4, 4)]


def test_calls_whose_deadline_passed_while_waiting_are_not_worked_on(tmp_path: Path, processes: list[Process]) -> None:
    """A call whose deadline passed while it waited, for a worker or for the ledger, has been
    given up by its caller (DEADLINE_EXCEEDED) and is not decided: nothing is counted for a
    decision nobody received (SG-8). With two workers and one held by a call stuck on the
    ledger, one late call waits in the ledger's queue and the others wait for a worker."""
    p = serve(tmp_path, processes)
    with grpc.insecure_channel(p.address) as ch:
        stub = pb_grpc.QuotaServiceStub(ch)
        with ledger_write_locked(p.ledger):
            busy = [check_send(stub, "busy0", timeout=60)]
            late = [check_send(stub, f"late{i}", timeout=0.5) for i in range(3)]
            assert [outcome(call) for call in late] == ["DEADLINE_EXCEEDED"] * 3
            assert not any(call.done() for call in busy)
        assert [outcome(call) for call in busy] == ["DECISION_ALLOW"]
        assert (
            pb.Decision.Name(
                stub.CheckSend(
                    pb.CheckSendRequest(tenant_id="t", contact_id="after", channel=1, kind=1), timeout=10
                ).decision
            )
            == "DECISION_ALLOW"
        )
    assert ledger_rows(p.ledger).active_ids() == {"busy0", "after"}
    with urllib.request.urlopen(f"http://{p.metrics_address}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert 'quota_calls_total{code="OK",method="CheckSend"} 2.0' in metrics
