"""The running sidecar: the gRPC server, health, reflection, metrics and the ledger.

Health answers two questions. Readiness (the whole server "", "readiness" and each
service name): may calls be sent here now? NOT_SERVING until the ledger is open, while
its commits fail (a full disk, the database down: the sidecar recovers by itself) and
once stopping. Liveness ("liveness"): is the process alive and answering? SERVING from
the moment the port is bound until the stop, whatever the ledger does, so a liveness
probe restarts a wedged sidecar, never one that waits for its disk.

Start-up order is what callers can rely on: the port is bound and the health
service answers NOT_SERVING first; the ledger is then opened (and migrated);
then health says SERVING. The dedupe filters are built from the ledger in the
background: until a tenant's is built its contacts are confirmed in the ledger,
so answers are exact from the first call. On stop, health says
NOT_SERVING, new calls are refused, in-flight calls finish, the ledger commits
what is pending and closes.
"""

from __future__ import annotations

import grp
import logging
import os
import secrets
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_http_server

from quota_sidecar.api.v1 import quota_pb2 as pb

from . import reflection
from .domain.clock import MICROS, Clock, SystemClock
from .domain.errors import QuotaError
from .domain.model import Usage, UsageEvent
from .engine import Engine, Retention
from .grpc.refused import RefusedCalls
from .grpc.service import QuotaAdminService, QuotaService, register
from .ledger import HeldLease, Ledger, LedgerOptions
from .ledger.factory import ledger_as_shown, open_ledger
from .metrics.prometheus import Metrics, SidecarCollector, TenantFigures
from .outbox.delivery import WEBHOOK, EventFeed, Webhook
from .settings import Settings
from .tenants import load_tenants

log = logging.getLogger("quota_sidecar")
# Background work (the board fill at start, the reminder sweep) pauses this long between
# its reads or transactions, so the calls it shares the writer and the interpreter with
# are not kept waiting behind it.
BOARD_CHUNK = 100
BOARD_PAUSE = 0.002
REMINDER_PAUSE = 0.002
# Before each transaction the reminder sweep waits for a quiet moment: no call in flight
# and none started or ended for SWEEP_QUIET_S (a caller sending calls back to back leaves
# gaps shorter than that). It starts the transaction after SWEEP_YIELD_S in any case, so
# that a sidecar never quiet still sends its reminders. It looks every SWEEP_YIELD_POLL_S.
SWEEP_QUIET_S = 0.001
SWEEP_YIELD_S = 0.2
SWEEP_YIELD_POLL_S = 0.0005


def give_way(metrics: Metrics, sleep: Callable[[float], bool], *, quiet_s: float, patience_s: float) -> bool:
    """Waits, by `sleep`, until the data plane is quiet (no call in flight, none ended in
    the last `quiet_s` seconds of `metrics.clock`) or `patience_s` have passed.
    True when `sleep` says to stop (it returns True: the sidecar is stopping)."""
    clock = metrics.clock
    until = clock() + patience_s
    while (metrics.in_flight or clock() - metrics.active_at < quiet_s) and clock() < until:
        if sleep(SWEEP_YIELD_POLL_S):
            return True
    return False


SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["QuotaService"].full_name,
    pb.DESCRIPTOR.services_by_name["QuotaAdminService"].full_name,
)
# The health names beside "" and the service names (app.py's docstring says what each answers).
READINESS = "readiness"
LIVENESS = "liveness"
# The ledger lease of the reminder sweep (the webhook's is WEBHOOK).
REMINDERS = "reminders"


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
        self.ledger = ledger or open_ledger(
            settings.ledger,
            LedgerOptions(
                on_commit=self.metrics.observe_commit,
                on_ready=self._ledger_ready,
                check_interval=settings.ledger_check_interval,
                backend=settings.ledger_backend,
            ),
        )
        self.feed = EventFeed()
        # Who this sidecar is when it holds a lease of the ledger (the webhook's delivery,
        # the reminder sweep): unique to this process.
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.engine = Engine(self.ledger, self.clock, on_events=self._events_committed)
        self.webhook = (
            Webhook(
                self.ledger,
                self.feed,
                self.metrics,
                settings.webhook_url,
                now_us=self.clock.now_us,
                secret=settings.webhook_secret,
                timeout=settings.webhook_timeout,
                lease=HeldLease(self.ledger, WEBHOOK, self.holder, settings.lease_ttl),
            )
            if settings.webhook_url
            else None
        )
        tenants = TenantFigures(
            self.engine.board,
            self.engine.clock.now_us,
            self._current_usage,
            settings.metrics_tenant_min_ratio,
            settings.metrics_tenant_max,
            shared=lambda: not self.ledger.sole_writer,
        )
        self.registry.register(SidecarCollector(lambda: self.ledger.ready, tenants, self._undelivered))
        backend_figures = self.ledger.collector()
        if backend_figures is not None:
            self.registry.register(backend_figures)
        self.health = health.HealthServicer()
        self._serving = False
        self._filling = False
        self._stopping = threading.Event()
        self._workers: list[threading.Thread] = []
        self.server: grpc.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server: WSGIServer | None = None

    def _ledger_ready(self, ready: bool) -> None:
        """Health follows the ledger: NOT_SERVING while its commits fail, SERVING once one succeeds."""
        if self._serving and not self._stopping.is_set():
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            self._set_health(status)
            log.warning(
                "health %s: the ledger %s",
                "SERVING" if ready else "NOT_SERVING",
                "takes writes again" if ready else "cannot commit",
            )

    def _events_committed(self, events: Sequence[UsageEvent]) -> None:
        for event in events:
            self.metrics.usage_events.labels(event.type.name).inc()
        self.feed.publish(events)

    def _current_usage(self, tenant_id: str) -> Usage | None:
        try:
            return self.engine.get_usage(tenant_id)
        except QuotaError:
            return None

    def _undelivered(self) -> tuple[int, float]:
        if self.webhook is None or not self.ledger.ready:
            return 0, 0.0
        try:
            return self.webhook.pending(self.engine.clock.now_us())
        except QuotaError:
            return 0, 0.0

    def _remind(self) -> None:
        """Writes due reminders every --reminder-interval seconds until stopped, while this
        sidecar holds the ledger's `reminders` lease: one sidecar of a fleet sweeps at a
        time. A sweep renews the lease as it goes and stops if it lost it. Before each of
        its transactions it waits for a quiet moment of the data plane, for up to
        SWEEP_YIELD_S (`give_way`): the sweep is background work, and its Python work and
        commits otherwise stalled the data plane (issue 13 item 8)."""
        lease = HeldLease(self.ledger, REMINDERS, self.holder, self.settings.lease_ttl)

        def pause() -> bool:
            if self._stopping.wait(REMINDER_PAUSE):
                return True
            if give_way(self.metrics, self._stopping.wait, quiet_s=SWEEP_QUIET_S, patience_s=SWEEP_YIELD_S):
                return True
            return not lease.hold()

        while not self._stopping.wait(self.settings.reminder_interval):
            if not lease.hold():
                continue
            try:
                self.engine.send_reminders(pause)
            except QuotaError as exc:
                log.warning("reminders not written this time: %s", exc)
        lease.release()

    def _prune(self) -> None:
        """Every --prune-interval seconds deletes what is past its retention."""
        s = self.settings
        retention = Retention(
            round(s.request_retention * MICROS), round(s.event_retention * MICROS), round(s.audit_retention * MICROS)
        )
        consumers = (WEBHOOK,) if self.webhook is not None else ()
        while not self._stopping.wait(s.prune_interval):
            try:
                pruned = self.engine.prune(retention, consumers)
            except QuotaError as exc:
                log.warning("nothing pruned this time: %s", exc)
                continue
            for kind, rows in pruned.items():
                self.metrics.pruned.labels(kind).inc(rows)

    def _fill_board(self) -> None:
        """Puts every tenant's current usage on the board, behind SERVING (it reads
        every tenant once; changes made meanwhile are already there and stay)."""
        try:
            added = self.engine.board.fill(self._paced(self.engine.tenant_usages(BOARD_CHUNK)))
        except QuotaError as exc:
            log.warning("tenant figures for metrics not loaded: %s", exc)
            return
        finally:
            self._filling = False
        log.info("tenant figures for metrics loaded: %d tenants", added)

    @property
    def loading(self) -> bool:
        """Whether what start-up loads in the background (the ledger's accelerators,
        such as the dedupe filters, and the metrics board) is still loading."""
        return self._filling or self.ledger.loading

    def _paced(self, usages: Iterator[Usage]) -> Iterator[Usage]:
        """The usages, with a pause after each chunk read: the fill is background work,
        and reading 100,000 tenants back to back kept the calls right after a restart
        waiting for the interpreter lock."""
        for n, usage in enumerate(usages, 1):
            yield usage
            if n % BOARD_CHUNK == 0 and self._stopping.wait(BOARD_PAUSE):
                return

    def _start_worker(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._workers.append(thread)

    @property
    def address(self) -> str:
        """The address callers dial (with the bound port when port 0 was asked for)."""
        if self.settings.address.startswith("unix:"):
            return self.settings.address
        host = self.settings.address.rpartition(":")[0]
        return f"{host}:{self.port}"

    def _set_health(self, status: int) -> None:
        """Sets readiness: the whole server, READINESS and each service."""
        for name in ("", READINESS, *SERVICE_NAMES):
            self.health.set(name, status)

    def bind(self) -> None:
        """Binds the port and starts answering, with health NOT_SERVING."""
        s = self.settings
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=s.max_workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=s.max_workers + s.max_pending_calls,
            interceptors=[RefusedCalls(self.metrics.call_refused)],
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", max(s.max_message_bytes, 64 * 1024 * 1024)),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", round(s.keepalive_min_ping_interval * 1000)),
                ("grpc.http2.max_ping_strikes", 2),
            ],
        )
        self.quota_service = QuotaService(self.engine, self.metrics, self.feed, max_watchers=max(1, s.max_workers // 4))
        register(self.server, "QuotaService", self.quota_service)
        register(self.server, "QuotaAdminService", QuotaAdminService(self.engine, self.metrics, s.admin_token))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable((*SERVICE_NAMES, health.SERVICE_NAME), self.server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        self.port = self._listen(s)
        if s.metrics_address:
            host, _, mport = s.metrics_address.rpartition(":")
            self._metrics_server, _ = start_http_server(int(mport), addr=host.strip("[]"), registry=self.registry)
            self.metrics_port = self._metrics_server.server_port
        self.server.start()
        metrics_at = f"http://{host}:{self.metrics_port}/metrics" if s.metrics_address else "disabled"
        log.info(
            "quota-sidecar listening on %s%s (metrics %s), ledger %s, pid %d",
            self.address,
            " with TLS" + (" (client certificates required)" if s.tls_client_ca else "") if s.tls_cert else "",
            metrics_at,
            ledger_as_shown(s.ledger),
            os.getpid(),
        )
        for wide in s.wide_binds:
            log.warning(
                "SECURITY: %s is reachable from other machines%s; bind to 127.0.0.1 or a unix socket"
                " unless that is intended",
                wide,
                "" if wide.startswith("metrics") or s.tls_cert else ", in plaintext (no --tls-cert)",
            )

    def _listen(self, s: Settings) -> int:
        """Adds the gRPC port (TLS when configured); a unix socket is created with mode
        0600, or 0660 and the --socket-group, so only its owner (and that group) can connect."""
        assert self.server is not None
        credentials = None
        if s.tls_cert and s.tls_key:
            credentials = grpc.ssl_server_credentials(
                [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())],
                root_certificates=Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None,
                require_client_auth=s.tls_client_ca is not None,
            )
        if not s.address.startswith("unix:"):
            if credentials is None:
                port = self.server.add_insecure_port(s.address)
            else:
                port = self.server.add_secure_port(s.address, credentials)
            if port == 0:
                raise OSError(f"cannot listen on {s.address}")
            return port
        path = Path(s.address.removeprefix("unix://").removeprefix("unix:"))
        if path.exists() and path.is_socket():
            path.unlink()
        umask = os.umask(0o177)
        try:
            port = (
                self.server.add_insecure_port(s.address)
                if credentials is None
                else self.server.add_secure_port(s.address, credentials)
            )
        finally:
            os.umask(umask)
        if s.socket_group is not None:
            os.chown(path, -1, grp.getgrnam(s.socket_group).gr_gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        return port

    def open(self) -> None:
        """Opens the ledger and loads the tenants file, then reports SERVING."""
        self.ledger.open()
        if self.settings.tenants:
            loaded = load_tenants(self.engine, Path(self.settings.tenants), self.tenant_plans)
            log.info("tenants file %s: %s", self.settings.tenants, loaded.summary())
        self._serving = True
        self._set_health(
            health_pb2.HealthCheckResponse.SERVING if self.ledger.ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        log.info("ledger open; SERVING%s", " (its accelerators load in the background)" if self.ledger.loading else "")
        self._filling = True
        self._start_worker(self._fill_board, "tenant-figures")
        self._start_worker(self._remind, "reminders")
        self._start_worker(self._prune, "pruner")
        if self.webhook is not None:
            self.webhook.start()
            log.info("usage events are posted to the webhook %s", _without_secrets(self.settings.webhook_url))

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
        self._stopping.set()
        self.feed.close()
        if self.server is not None:
            self.server.stop(self.settings.drain_timeout if grace is None else grace).wait()
        if self.webhook is not None:
            self.webhook.stop(self.settings.drain_timeout)
        for thread in self._workers:
            thread.join()
        self.ledger.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        log.info("stopped")


def _without_secrets(url: str | None) -> str:
    """The URL as logged: no user, password or query (they may carry credentials)."""
    parts = urllib.parse.urlsplit(url or "")
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
