"""Shared fixtures: a real sidecar on a free port (in-process, fake clock) and stubs for it."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.app import Sidecar
from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.engine import Engine
from quota_sidecar.server.ledger.sqlite import SQLiteLedger
from quota_sidecar.server.settings import Settings

from support.postgres import ensure_server

ADMIN_TOKEN = "test-admin-token"
START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@dataclass
class RunningSidecar:
    sidecar: Sidecar
    clock: FakeClock
    ledger_path: Path
    admin_token: str = ADMIN_TOKEN
    _channels: list[grpc.Channel] = field(default_factory=list)
    _stopped: bool = False

    @property
    def address(self) -> str:
        return self.sidecar.address

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.metrics_port}/metrics"

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.address)
        self._channels.append(ch)
        return ch

    def quota(self) -> pb_grpc.QuotaServiceStub:
        return pb_grpc.QuotaServiceStub(self.channel())

    def admin(self) -> pb_grpc.QuotaAdminServiceStub:
        return pb_grpc.QuotaAdminServiceStub(self.channel())

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.admin_token}"),)

    def put_plan(self, tenant_id: str, **fields: object) -> pb.PutPlanResponse:
        return self.admin().PutPlan(
            pb.PutPlanRequest(tenant_id=tenant_id, plan=pb.Plan(**fields)), metadata=self.auth, timeout=5
        )

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            for ch in self._channels:
                ch.close()
            self.sidecar.stop(1)


def start_sidecar(
    path: Path, clock: FakeClock, address: str = "127.0.0.1:0", *, metrics: bool = False, **settings: object
) -> RunningSidecar:
    """A sidecar over a real channel; `settings` are further Settings fields (webhook_url, ...)."""
    values: dict[str, object] = dict(
        address=address,
        ledger=f"sqlite:///{path}",
        metrics_address="127.0.0.1:0" if metrics else "",
        admin_token=ADMIN_TOKEN,
        drain_timeout=2,
    )
    settings = Settings(**{**values, **settings}).validate()  # type: ignore[arg-type]
    sidecar = Sidecar(settings, clock=clock, registry=CollectorRegistry())
    sidecar.start()
    return RunningSidecar(sidecar, clock, path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def engine(db_path: Path, clock: FakeClock) -> Iterator[Engine]:
    """An engine over a real SQLite ledger file (no server)."""
    ledger = SQLiteLedger(db_path)
    ledger.open()
    try:
        yield Engine(ledger, clock)
    finally:
        ledger.close()


@pytest.fixture
def sidecar(tmp_path: Path, clock: FakeClock) -> Iterator[RunningSidecar]:
    running = start_sidecar(tmp_path / "ledger.db", clock)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def sidecar_with_metrics(tmp_path: Path, clock: FakeClock) -> Iterator[RunningSidecar]:
    running = start_sidecar(tmp_path / "ledger.db", clock, metrics=True)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def processes() -> Iterator[list]:
    """Real `quota-sidecar` processes a test started (tests/test_process.py `Process`); killed at the end."""
    started: list = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait()
        p.proc.stdout.close()
        p.proc.stderr.close()


class RefusingServer:
    """A real gRPC server that answers every call UNAVAILABLE after REFUSAL_DELAY seconds. It
    notes each attempt as it arrives: the method, the request_id it carries (a retry repeats
    its call's) and the deadline it came with (`context.time_remaining()`)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str, float | None]] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self._server.add_generic_rpc_handlers([self])
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method.rsplit("/", 1)[-1]

        def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
            request_id = getattr(pb, method + "Request").FromString(request).request_id
            self.attempts.append((method, request_id, context.time_remaining()))
            threading.Event().wait(REFUSAL_DELAY)
            context.abort(grpc.StatusCode.UNAVAILABLE, "refused")

        return grpc.unary_unary_rpc_method_handler(refuse)

    def calls(self) -> dict[str, list[float | None]]:
        """The deadlines each logical call's attempts arrived with, in order, by request_id."""
        calls: dict[str, list[float | None]] = {}
        for _method, request_id, remaining in self.attempts:
            calls.setdefault(request_id, []).append(remaining)
        return calls

    def assert_each_call_kept_one_deadline(self, timeout: float) -> None:
        """Every attempt of a call fits what is left of that call's `timeout`: the first
        arrived with at most `timeout`, each later one with at most what the one before it
        had less the REFUSAL_DELAY that attempt spent; so no more attempts than fit."""
        assert self.attempts
        for request_id, deadlines in self.calls().items():
            assert request_id and None not in deadlines
            assert deadlines[0] <= timeout + DEADLINE_SLACK
            for before, after in itertools.pairwise(deadlines):
                assert after <= before - REFUSAL_DELAY + DEADLINE_SLACK, deadlines
            assert len(deadlines) <= 1 + int(timeout // REFUSAL_DELAY), deadlines

    def close(self) -> None:
        self._server.stop(0).wait()


# How long RefusingServer takes to refuse; a deadline as the server reads it may be later
# than the client's by the time the request took to arrive and by gRPC rounding it up.
REFUSAL_DELAY = 0.08
DEADLINE_SLACK = 0.03


@pytest.fixture
def refusing_server() -> Iterator[RefusingServer]:
    server = RefusingServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_server() -> None:
    """The local PostgreSQL, started if it is down; a test asking for it fails, never skips, without it."""
    ensure_server()
