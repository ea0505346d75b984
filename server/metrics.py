"""The sidecar's Prometheus metrics, registered on a registry passed in.

No contact id ever appears in a label; tenant ids do not either (their figures
are served by GetUsage). Figures read at scrape time come from `LedgerCollector`,
not from the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .dedupe import DedupeFilters

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
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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

    def observe_commit(self, seconds: float, units: int, ok: bool) -> None:
        if ok:
            self.commit_latency.observe(seconds)
            self.commit_batch.observe(units)
        else:
            self.commit_failures.inc()


class SidecarCollector(Collector):
    """Figures read at scrape time: build info, readiness and the dedupe filters."""

    def __init__(self, filters: DedupeFilters | None, ready: Callable[[], bool]) -> None:
        self.filters = filters
        self.ready = ready

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("quota_build_info", "The sidecar's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "quota_ready", "1 when the ledger is open and the filters are loaded", value=1 if self.ready() else 0
        )
        if self.filters is None:
            return
        yield GaugeMetricFamily(
            "quota_dedupe_filters", "Dedupe filters held in memory (tenant cycles)", value=len(self.filters)
        )
        yield GaugeMetricFamily(
            "quota_dedupe_filter_items", "Contacts held in the dedupe filters", value=self.filters.items
        )
        yield GaugeMetricFamily(
            "quota_dedupe_filter_bytes", "Memory of the dedupe filters' bit arrays", value=self.filters.size_bytes
        )
        stats = self.filters.stats
        yield CounterMetricFamily("quota_dedupe_lookups", "Dedupe look-ups since start", value=stats.lookups)
        yield CounterMetricFamily(
            "quota_dedupe_certainly_new", "Look-ups the filter answered without the ledger", value=stats.certainly_new
        )
        yield CounterMetricFamily(
            "quota_dedupe_confirmed_false_positives",
            "Filter 'maybe' answers that the ledger showed to be new contacts",
            value=stats.confirmed_false_positives,
        )
