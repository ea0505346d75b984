"""The sidecar's Prometheus metrics, registered on a registry passed in.

No contact id ever appears in a label. Tenant ids appear only on the limit
proximity series, and only for a bounded number of pressing tenants
(`TenantFigures`). Figures read at scrape time come from `SidecarCollector`,
not from the hot path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ...api.v1 import quota_pb2
from .. import __version__
from ..domain.model import Usage, UsageEventType, UsageState
from .board import TenantFigure, UsageBoard

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.clock = clock
        # The process's own series: process_* (resident memory, against the manifests'
        # memory limit; CPU; open files against their limit), python_info and python_gc_*.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.calls = Counter(
            "quota_calls_total", "gRPC calls handled, by method and status code", ["method", "code"], registry=registry
        )
        self.decisions = Counter(
            "quota_decisions_total",
            "Decisions made, by method, decision and reason (batches count each contact)",
            ["method", "decision", "reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "quota_call_duration_seconds",
            "Time to handle a gRPC call in the server, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.commit_latency = Histogram(
            "quota_ledger_commit_duration_seconds",
            "Time of one ledger group commit, from BEGIN to durable COMMIT",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.commit_batch = Histogram(
            "quota_ledger_commit_batch_size",
            "Units of work (calls) sharing one ledger commit",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.commit_failures = Counter(
            "quota_ledger_commit_failures_total",
            "Ledger commits that failed (callers got UNAVAILABLE)",
            registry=registry,
        )
        self.usage_events = Counter(
            "quota_usage_events_total",
            "Usage events written to the outbox, by type (THRESHOLD_CROSSED, REMINDER)",
            ["type"],
            registry=registry,
        )
        self.webhook_deliveries = Counter(
            "quota_webhook_deliveries_total",
            "Attempts to deliver a usage event to the webhook, by result (delivered, failed)",
            ["result"],
            registry=registry,
        )
        self.pruned = Counter(
            "quota_ledger_pruned_rows_total",
            "Ledger rows deleted past their retention, by kind (results, events, audit)",
            ["kind"],
            registry=registry,
        )
        self.refused = Counter(
            "quota_calls_refused_before_handler_total",
            "Calls gRPC ended before their handler ran, by method: over --max-message-bytes or"
            " --max-pending-calls (RESOURCE_EXHAUSTED), or the caller gone before its request arrived",
            ["method"],
            registry=registry,
        )
        self._timers: dict[str, Any] = {}
        self._busy = threading.Lock()
        # Handled calls under way now, and when one last ended (`clock`): background work
        # (the reminder sweep) gives way to them (`give_way`).
        self.in_flight = 0
        self.active_at = float("-inf")
        Gauge(
            "quota_calls_in_flight", "gRPC calls being handled now (streams excluded)", registry=registry
        ).set_function(lambda: self.in_flight)
        self._calls: dict[tuple[str, str], Any] = {}
        self._decisions: dict[tuple[str, str, str], Any] = {}
        for event_type in UsageEventType:
            self.usage_events.labels(event_type.name)
        for result in ("delivered", "failed"):
            self.webhook_deliveries.labels(result)
        for kind in ("results", "events", "audit"):
            self.pruned.labels(kind)
        for service in quota_pb2.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                self.refused.labels(method.name)

    def call_started(self) -> None:
        with self._busy:
            self.in_flight += 1

    def call_ended(self) -> None:
        with self._busy:
            self.in_flight -= 1
            self.active_at = self.clock()

    def call_refused(self, method: str) -> None:
        self.refused.labels(method).inc()

    def call_done(self, method: str, code: str, seconds: float) -> None:
        """Times and counts one call (the labelled series looked up once each)."""
        timer = self._timers.get(method)
        if timer is None:
            timer = self._timers[method] = self.latency.labels(method)
        timer.observe(seconds)
        counter = self._calls.get((method, code))
        if counter is None:
            counter = self._calls[(method, code)] = self.calls.labels(method, code)
        counter.inc()

    def decided(self, method: str, decision: str, reason: str, count: int = 1) -> None:
        counter = self._decisions.get((method, decision, reason))
        if counter is None:
            counter = self._decisions[(method, decision, reason)] = self.decisions.labels(method, decision, reason)
        counter.inc(count)

    def observe_commit(self, seconds: float, units: int, ok: bool) -> None:
        if ok:
            self.commit_latency.observe(seconds)
            self.commit_batch.observe(units)
        else:
            self.commit_failures.inc()


class SidecarCollector(Collector):
    """Figures read at scrape time: build info, readiness, the tenants' usage (from the
    engine's board) and the notification outbox. The ledger's own figures (the SQLite
    backend's dedupe filters) come from its collector (`Ledger.collector`)."""

    def __init__(
        self,
        ready: Callable[[], bool],
        tenants: TenantFigures | None = None,
        outbox: Callable[[], tuple[int, float]] | None = None,
    ) -> None:
        self.ready = ready
        self.tenants = tenants
        self.outbox = outbox

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("quota_build_info", "The sidecar's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "quota_ready", "1 when the ledger is open and not failing", value=1 if self.ready() else 0
        )
        if self.tenants is not None:
            yield from self.tenants.collect()
        if self.outbox is not None:
            pending, age = self.outbox()
            yield GaugeMetricFamily(
                "quota_usage_events_pending", "Usage events not yet delivered to the webhook", value=pending
            )
            yield GaugeMetricFamily(
                "quota_webhook_oldest_pending_seconds",
                "Age of the oldest usage event not yet delivered to the webhook (0 when none)",
                value=age,
            )


RATIO_STEPS = (0.5, 0.8, 0.9, 1.0, 1.1)
QUIET_STATES = frozenset({UsageState.OK, UsageState.WARNING})


class TenantFigures:
    """The tenants' limit proximity with bounded cardinality.

    Without a tenant label: tenants by usage state, and how many are at or above
    each of RATIO_STEPS. With one: the usage ratio and state of tenants at or above
    `min_ratio`, or in a state past WARNING, at most `max_series` of them, the
    most pressing first; `quota_tenant_series_omitted` says how many were left out.
    When other sidecars write the ledger too (`shared`), the tenants about to be
    shown are read again first (at most `max_series` reads a scrape), so a plan
    or a count changed through another sidecar shows at once.
    """

    def __init__(
        self,
        board: UsageBoard,
        now_us: Callable[[], int],
        refresh: Callable[[str], Usage | None],
        min_ratio: float,
        max_series: int,
        shared: Callable[[], bool] = lambda: False,
    ) -> None:
        self.board = board
        self.now_us = now_us
        self.refresh = refresh
        self.min_ratio = min_ratio
        self.max_series = max_series
        self.shared = shared

    def _pressing(self, figures: dict[str, TenantFigure]) -> list[tuple[bool, float, str, UsageState]]:
        """The pressing tenants, most pressing first."""
        pressing = [
            (f.state not in QUIET_STATES, f.usage_ratio, tenant_id, f.state)
            for tenant_id, f in figures.items()
            if f.state not in QUIET_STATES or f.usage_ratio >= self.min_ratio
        ]
        pressing.sort(key=lambda p: (not p[0], -p[1], p[2]))
        return pressing

    def collect(self) -> Iterator[Metric]:
        figures = self.board.snapshot(self.now_us(), self.refresh)
        if self.shared():
            first = [tenant_id for _, _, tenant_id, _ in self._pressing(figures)[: self.max_series]]
            figures.update(self.board.reread(first, self.refresh))
        by_state = dict.fromkeys(UsageState, 0)
        at_least = dict.fromkeys(RATIO_STEPS, 0)
        for f in figures.values():
            by_state[f.state] += 1
            for step in RATIO_STEPS:
                if f.usage_ratio >= step:
                    at_least[step] += 1
        pressing = self._pressing(figures)
        states = GaugeMetricFamily("quota_tenants", "Tenants by usage state", labels=["state"])
        for state, n in by_state.items():
            states.add_metric([state.name], n)
        yield states
        steps = GaugeMetricFamily(
            "quota_tenants_at_or_above_usage_ratio",
            "Tenants whose usage ratio (metered count / limit) is at or above `ratio`",
            labels=["ratio"],
        )
        for step, n in at_least.items():
            steps.add_metric([format(step, "g")], n)
        yield steps
        shown = pressing[: self.max_series]
        ratio = GaugeMetricFamily(
            "quota_tenant_usage_ratio",
            "A tenant's metered count over its limit (0-1, above 1 past the limit); only pressing tenants",
            labels=["tenant"],
        )
        tenant_state = GaugeMetricFamily(
            "quota_tenant_usage_state", "1 for a pressing tenant's current usage state", labels=["tenant", "state"]
        )
        for _, r, tenant_id, s in shown:
            ratio.add_metric([tenant_id], r)
            tenant_state.add_metric([tenant_id, s.name], 1)
        yield ratio
        yield tenant_state
        yield GaugeMetricFamily(
            "quota_tenant_series_omitted",
            "Pressing tenants left without per-tenant series by --metrics-tenant-max",
            value=len(pressing) - len(shown),
        )
