"""The real `quota-sidecar serve` process in a subprocess, on free loopback ports."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.domain.clock import SystemClock

from support.oracle import TenantRows, assert_rows_agree, read_rows
from support.serving import free_port, health_status, serve, wait_for_status
from support.sqlite_file import file_reader

TOKEN = "process-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@dataclass
class Process:
    proc: subprocess.Popen[str]
    address: str
    ledger: Path
    metrics_address: str = ""

    def health(self, service: str = "") -> str:
        return health_status(self.address, service)

    def wait_serving(self, timeout: float = 30) -> None:
        wait_for_status(self.proc, self.address, "SERVING", timeout)


def start(ledger: Path, *extra: str, address: str | None = None) -> Process:
    """The real `quota-sidecar serve` on `ledger`, on `address` (a free loopback port by default)."""
    address = address or f"127.0.0.1:{free_port()}"
    metrics_address = f"127.0.0.1:{free_port()}"
    proc = serve(f"sqlite:///{ledger}", address, metrics_address, TOKEN, *extra)
    return Process(proc, address, ledger, metrics_address)


def put_plan(address: str, limit: int) -> None:
    with grpc.insecure_channel(address) as ch:
        pb_grpc.QuotaAdminServiceStub(ch).PutPlan(
            pb.PutPlanRequest(
                tenant_id="t",
                plan=pb.Plan(
                    plan_name="P",
                    metering=pb.METERING_CYCLE_ACTIVE,
                    enforcement=pb.ENFORCEMENT_HARD,
                    contact_limit=limit,
                    counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
                ),
            ),
            metadata=AUTH,
            timeout=10,
        )


def ledger_rows(path: Path, tenant_id: str = "t") -> TenantRows:
    """What the ledger file of a process holds for the tenant, up to now, once every figure
    of the tenant equals its rows (the oracle, support/oracle.py)."""
    with file_reader(path) as reader:
        return assert_rows_agree(read_rows(reader, SystemClock().now_us(), tenants=[tenant_id]))[tenant_id]


class Load:
    """Mail workers sending to new contacts until the sidecar goes away."""

    def __init__(self, address: str, workers: int = 4) -> None:
        self.address = address
        self.acknowledged: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(workers)]

    def run(self, n: int) -> None:
        with grpc.insecure_channel(self.address) as ch:
            stub = pb_grpc.QuotaServiceStub(ch)
            i = 0
            while True:
                contact = f"w{n}-{i}"
                i += 1
                try:
                    r = stub.CheckSend(
                        pb.CheckSendRequest(tenant_id="t", contact_id=contact, channel=1, kind=1), timeout=5
                    )
                except grpc.RpcError:
                    return
                if r.decision == pb.DECISION_ALLOW:
                    with self.lock:
                        self.acknowledged.append(contact)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.acknowledged) >= count, "the load made no progress"

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=30)
