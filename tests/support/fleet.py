"""A fleet of real `quota-sidecar serve` processes on one PostgreSQL ledger, and the mail
workers that call it: client processes racing through every sidecar, and load threads
that note each answer they were given."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import grpc

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc

from support.serving import free_port, health_status, serve, wait_for_status

TOKEN = "fleet-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CALL_TIMEOUT_S = 10.0


@dataclass
class FleetSidecar:
    """One `quota-sidecar serve` of the fleet."""

    proc: subprocess.Popen[str]
    address: str
    metrics_address: str = ""

    def health(self, service: str = "") -> str:
        return health_status(self.address, service)

    def wait_for(self, status: str, timeout: float = 30) -> None:
        wait_for_status(self.proc, self.address, status, timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def start_fleet(ledger_url: str, size: int, *extra: str) -> list[FleetSidecar]:
    """`size` sidecars on `ledger_url`, started all at once (so they race to create its schema), each SERVING."""
    fleet = []
    for _ in range(size):
        address, metrics_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        proc = serve(ledger_url, address, metrics_address, TOKEN, *extra)
        fleet.append(FleetSidecar(proc, address, metrics_address))
    try:
        for sidecar in fleet:
            sidecar.wait_for("SERVING", 60)
    except AssertionError:
        for sidecar in fleet:
            sidecar.stop()
        raise
    return fleet


def put_plan(address: str, tenant_id: str, plan: pb.Plan) -> None:
    with grpc.insecure_channel(address) as ch:
        pb_grpc.QuotaAdminServiceStub(ch).PutPlan(
            pb.PutPlanRequest(tenant_id=tenant_id, plan=plan), metadata=AUTH, timeout=CALL_TIMEOUT_S
        )


def campaign_send(tenant_id: str, contact_id: str, request_id: str = "") -> pb.CheckSendRequest:
    """A CAMPAIGN e-mail to one contact, the kind every plan here counts."""
    return pb.CheckSendRequest(
        tenant_id=tenant_id,
        contact_id=contact_id,
        channel=pb.CHANNEL_EMAIL,
        kind=pb.MESSAGE_KIND_CAMPAIGN,
        request_id=request_id,
    )


def check_send(address: str, tenant_id: str, contact_id: str, request_id: str = "") -> pb.CheckSendResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.QuotaServiceStub(ch).CheckSend(
            campaign_send(tenant_id, contact_id, request_id), timeout=CALL_TIMEOUT_S
        )


def usage(address: str, tenant_id: str) -> pb.Usage:
    with grpc.insecure_channel(address) as ch:
        return (
            pb_grpc.QuotaServiceStub(ch).GetUsage(pb.GetUsageRequest(tenant_id=tenant_id), timeout=CALL_TIMEOUT_S).usage
        )


# An answer as a client process reports it: (contact, decision, reason, newly active or added).
Answer = tuple[str, str, str, int]


def race(
    addresses: list[str],
    rpc: str,
    tenant_id: str,
    contact_ids: list[str],
    go: Barrier,
    answers: Queue[tuple[str, object]],
) -> None:
    """A client process: once every racer reached `go`, asks about each contact in turn, each call
    through the next sidecar of `addresses`. `rpc` is "send" (a CAMPAIGN CheckSend), "add" (a
    CheckContactAdd of the one contact from the MANUAL source) or "add-api" (the same from the API).
    Puts ("answers", [Answer ...]), or ("error", why)."""
    channels = [grpc.insecure_channel(a) for a in addresses]
    try:
        stubs = [pb_grpc.QuotaServiceStub(ch) for ch in channels]
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=CALL_TIMEOUT_S)
        go.wait(60)
        replies: list[Answer] = []
        for n, contact_id in enumerate(contact_ids):
            stub = stubs[n % len(stubs)]
            if rpc == "send":
                r = stub.CheckSend(campaign_send(tenant_id, contact_id), timeout=CALL_TIMEOUT_S)
                replies.append(
                    (contact_id, pb.Decision.Name(r.decision), pb.Reason.Name(r.reason), int(r.newly_active))
                )
            else:
                source = pb.CONTACT_SOURCE_MANUAL if rpc == "add" else pb.CONTACT_SOURCE_API
                a = stub.CheckContactAdd(
                    pb.CheckContactAddRequest(tenant_id=tenant_id, source=source, contact_ids=[contact_id]),
                    timeout=CALL_TIMEOUT_S,
                )
                replies.append((contact_id, pb.Decision.Name(a.decision), pb.Reason.Name(a.reason), a.added))
        answers.put(("answers", replies))
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        answers.put(("error", repr(exc)))
    finally:
        for ch in channels:
            ch.close()


@dataclass
class Load:
    """Mail-worker threads sending CAMPAIGN mail to new contacts through the sidecars until stopped,
    noting every answer: the contacts ALLOWed, and how many calls ended with each status code or
    decision other than ALLOW."""

    addresses: list[str]
    tenant_id: str
    workers_per_sidecar: int = 2
    allowed: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, address: str, worker: str) -> None:
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.QuotaServiceStub(ch)
            i = 0
            while not self._stop.is_set():
                contact_id = f"{worker}-{i}"
                i += 1
                try:
                    r = stub.CheckSend(campaign_send(self.tenant_id, contact_id), timeout=CALL_TIMEOUT_S)
                except grpc.RpcError as exc:
                    with self._lock:
                        self.outcomes[exc.code().name] += 1
                    # A worker backs off a little on a failure, as a real one would.
                    time.sleep(0.02)
                    continue
                with self._lock:
                    if r.decision == pb.DECISION_ALLOW:
                        self.allowed.append(contact_id)
                    self.outcomes[f"{pb.Decision.Name(r.decision)} {pb.Reason.Name(r.reason)}"] += 1

    def start(self) -> None:
        for s, address in enumerate(self.addresses):
            for w in range(self.workers_per_sidecar):
                t = threading.Thread(target=self._run, args=(address, f"s{s}w{w}"), daemon=True)
                self._threads.append(t)
                t.start()

    def wait_for(self, allowed: int, timeout: float = 30) -> None:
        """Until `allowed` more contacts than now have been ALLOWed."""
        target = len(self.allowed) + allowed
        deadline = time.monotonic() + timeout
        while len(self.allowed) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.allowed) >= target, f"the load made no progress: {self.outcomes}"

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
