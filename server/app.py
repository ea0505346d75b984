"""The running sidecar: the gRPC server, health, reflection, metrics and the ledger.

Start-up order is what callers can rely on: the port is bound and the health
service answers NOT_SERVING first; the ledger is then opened and its dedupe
filters loaded; only then does health say SERVING. On stop, health says
NOT_SERVING, new calls are refused, in-flight calls finish, the ledger commits
what is pending and closes.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_http_server

from quota_sidecar.client.v1 import quota_pb2 as pb
from quota_sidecar.client.v1 import quota_pb2_grpc as pb_grpc

from .clock import Clock, SystemClock
from .engine import Engine
from .ledger import Ledger
from .ledger.sqlite import SQLiteLedger, sqlite_path
from .metrics import Metrics, SidecarCollector
from .service import QuotaAdminService, QuotaService
from .settings import Settings
from .tenants import load_tenants

log = logging.getLogger("quota_sidecar")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["QuotaService"].full_name,
    pb.DESCRIPTOR.services_by_name["QuotaAdminService"].full_name,
)


class Sidecar:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        registry: CollectorRegistry | None = None,
        ledger: Ledger | None = None,
        tenant_plans: dict[str, pb.Plan] | None = None,
    ) -> None:
        self.settings = settings
        self.tenant_plans = tenant_plans
        self.clock = clock or SystemClock()
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.ledger = ledger or SQLiteLedger(
            sqlite_path(settings.ledger),
            synchronous=settings.sqlite_synchronous,
            filter_fp_rate=settings.filter_fp_rate,
            on_commit=self.metrics.observe_commit,
        )
        filters = getattr(self.ledger, "filters", None)
        self.registry.register(SidecarCollector(filters, lambda: self.ledger.ready))
        self.engine = Engine(self.ledger, self.clock)
        self.health = health.HealthServicer()
        self.server: grpc.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server = None

    @property
    def address(self) -> str:
        """The address callers dial (with the bound port when port 0 was asked for)."""
        if self.settings.address.startswith("unix:"):
            return self.settings.address
        host = self.settings.address.rpartition(":")[0]
        return f"{host}:{self.port}"

    def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def bind(self) -> None:
        """Binds the port and starts answering, with health NOT_SERVING."""
        s = self.settings
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=s.max_workers, thread_name_prefix="grpc"),
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", max(s.max_message_bytes, 64 * 1024 * 1024)),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_QuotaServiceServicer_to_server(QuotaService(self.engine, self.metrics), self.server)
        pb_grpc.add_QuotaAdminServiceServicer_to_server(
            QuotaAdminService(self.engine, self.metrics, s.admin_token), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if s.address.startswith("unix:"):
            path = Path(s.address.removeprefix("unix://").removeprefix("unix:"))
            if path.exists() and path.is_socket():
                path.unlink()
        port = self.server.add_insecure_port(s.address)
        if port == 0 and not s.address.startswith("unix:"):
            raise OSError(f"cannot listen on {s.address}")
        self.port = port
        if s.metrics_address:
            host, _, mport = s.metrics_address.rpartition(":")
            self._metrics_server, _ = start_http_server(int(mport), addr=host.strip("[]"), registry=self.registry)
            self.metrics_port = self._metrics_server.server_port
        self.server.start()
        metrics_at = f"http://{host}:{self.metrics_port}/metrics" if s.metrics_address else "disabled"
        log.info(
            "quota-sidecar listening on %s (metrics %s), ledger %s, pid %d",
            self.address,
            metrics_at,
            s.ledger,
            os.getpid(),
        )

    def open(self) -> None:
        """Opens the ledger, loads the filters and tenants, then reports SERVING."""
        self.ledger.open()
        if self.settings.tenants:
            count = load_tenants(self.engine, Path(self.settings.tenants), self.tenant_plans)
            log.info("loaded %d tenant plans from %s", count, self.settings.tenants)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ledger open and dedupe filters loaded; SERVING")

    def start(self) -> None:
        self.bind()
        try:
            self.open()
        except BaseException:
            self.stop(0)
            raise

    def stop(self, grace: float | None = None) -> None:
        """Refuses new calls, finishes in-flight ones, then flushes and closes the ledger."""
        self.health.enter_graceful_shutdown()
        if self.server is not None:
            self.server.stop(self.settings.drain_timeout if grace is None else grace).wait()
        self.ledger.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        log.info("stopped")
