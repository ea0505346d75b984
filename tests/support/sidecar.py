"""A real sidecar in this process: a real gRPC server on a free port over a real ledger (a SQLite
file, or a PostgreSQL schema when given its URL), with a fake clock, and stubs for it."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.app import Sidecar
from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.ledger import Ledger
from quota_sidecar.server.ledger.postgres import PostgresLedger
from quota_sidecar.server.ledger.sqlite import SQLiteLedger
from quota_sidecar.server.settings import Settings

from support.postgres import schema_of, schema_query, schema_snapshot
from support.sqlite_file import snapshot

ADMIN_TOKEN = "test-admin-token"
START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@dataclass
class RunningSidecar:
    sidecar: Sidecar
    clock: FakeClock
    ledger_path: Path
    # the ledger URL it serves: sqlite:///ledger_path, or a PostgreSQL schema's
    ledger_url: str = ""
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

    def rows(self) -> dict[str, list[tuple]]:
        """Every row of every table of its ledger, whichever the backend."""
        return rows_of(self.sidecar.ledger)

    def query(self, sql: str, *args: object) -> list[tuple]:
        """The rows of one query against its ledger's tables (`query_ledger`)."""
        return query_ledger(self.ledger_url, sql, *args)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            for ch in self._channels:
                ch.close()
            self.sidecar.stop(1)


def start_sidecar(
    path: Path,
    clock: FakeClock,
    address: str = "127.0.0.1:0",
    *,
    metrics: bool = False,
    ledger: str | None = None,
    **settings: object,
) -> RunningSidecar:
    """A sidecar over a real channel, on the SQLite file at `path` or on the `ledger` URL when
    given; `settings` are further Settings fields (webhook_url, ...)."""
    url = ledger or f"sqlite:///{path}"
    values: dict[str, object] = dict(
        address=address,
        ledger=url,
        metrics_address="127.0.0.1:0" if metrics else "",
        admin_token=ADMIN_TOKEN,
        drain_timeout=2,
    )
    settings = Settings(**{**values, **settings}).validate()  # type: ignore[arg-type]
    sidecar = Sidecar(settings, clock=clock, registry=CollectorRegistry())
    sidecar.start()
    return RunningSidecar(sidecar, clock, path, url)


def query_ledger(url: str, sql: str, *args: object) -> list[tuple]:
    """The rows of one query (placeholders `?`) against the tables of the ledger at `url`,
    whichever the backend, served or not: for what the ledger interface writes and never
    reads back (the audit)."""
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()
    return schema_query(schema_of(url), sql.replace("?", "%s"), args)


def rows_of(ledger: Ledger) -> dict[str, list[tuple]]:
    """Every row of every table of the ledger's store, whichever the backend."""
    if isinstance(ledger, SQLiteLedger):
        return snapshot(ledger.path)
    assert isinstance(ledger, PostgresLedger)
    return schema_snapshot(schema_of(ledger.url))
