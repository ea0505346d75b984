"""Scrape-time metrics (issue 4): limit proximity with bounded cardinality, tenants by
state, the all-tenant distribution, the dedupe filter's estimate and the outbox, read
from a real /metrics endpoint of a sidecar over a real channel."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.server.domain.clock import FakeClock
from quota_sidecar.server.ledger.sqlite.dedupe import CycleFilter, DedupeFilters

from support.postgres import schema_for, schema_url
from support.sidecar import RunningSidecar, start_sidecar

DAY = 24 * 3600


def scrape(running: RunningSidecar) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = urllib.request.urlopen(running.metrics_url, timeout=5).read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def by(samples: list[tuple[dict[str, str], float]], label: str) -> dict[str, float]:
    return {labels[label]: value for labels, value in samples}


def plan(limit: int, **fields: object) -> dict[str, object]:
    base: dict[str, object] = dict(
        plan_name="P",
        metering=pb.METERING_CYCLE_ACTIVE,
        enforcement=pb.ENFORCEMENT_HARD,
        contact_limit=limit,
        counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
        notify_thresholds=[0.8],
    )
    return {**base, **fields}


def send(running: RunningSidecar, tenant: str, contacts: list[str]) -> None:
    running.quota().CheckSendBatch(
        pb.CheckSendBatchRequest(
            tenant_id=tenant, channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN, contact_ids=contacts
        ),
        timeout=5,
    )


def contacts(tenant: str, n: int) -> list[str]:
    return [f"{tenant}-contact-{i:04d}@example.com" for i in range(n)]


@pytest.fixture
def five_tenants(tmp_path: Path, clock: FakeClock) -> RunningSidecar:
    """warn at 0.9 (WARNING), mid at 0.6 (OK), low at 0.3 (OK), full at 1.0 (AT_LIMIT) and
    sends with its sends allowance used up at a ratio of 0.1 (BLOCKED)."""
    running = start_sidecar(
        tmp_path / "ledger.db", clock, metrics=True, metrics_tenant_min_ratio=0.5, metrics_tenant_max=2
    )
    for tenant, sent in (("warn", 9), ("mid", 6), ("low", 3), ("full", 10)):
        running.put_plan(tenant, **plan(10))
        send(running, tenant, contacts(tenant, sent))
    running.put_plan("sends", **plan(10, sends_limit=3))
    for _ in range(3):
        send(running, "sends", contacts("sends", 1))
    return running


def test_per_tenant_series_only_for_pressing_tenants_and_capped_with_a_count_left_out(
    five_tenants: RunningSidecar,
) -> None:
    """AC-1, CR-8, MK-2: the tenants past WARNING come first, then the highest ratios; the cap
    leaves the others out and says how many."""
    try:
        m = scrape(five_tenants)
    finally:
        five_tenants.stop()
    assert by(m["quota_tenant_usage_ratio"], "tenant") == {"full": 1.0, "sends": 0.1}
    states = {(labels["tenant"], labels["state"]): v for labels, v in m["quota_tenant_usage_state"]}
    assert states == {("full", "AT_LIMIT"): 1, ("sends", "BLOCKED"): 1}
    assert m["quota_tenant_series_omitted"] == [({}, 2.0)]


def test_tenants_by_state_and_the_distribution_need_no_tenant_label(five_tenants: RunningSidecar) -> None:
    try:
        m = scrape(five_tenants)
    finally:
        five_tenants.stop()
    assert by(m["quota_tenants"], "state") == {
        "OK": 2,
        "WARNING": 1,
        "AT_LIMIT": 1,
        "IN_GRACE": 0,
        "BLOCKED": 1,
        "IN_OVERAGE": 0,
    }
    assert by(m["quota_tenants_at_or_above_usage_ratio"], "ratio") == {
        "0.5": 3,
        "0.8": 2,
        "0.9": 2,
        "1": 1,
        "1.1": 0,
    }


def test_no_contact_id_appears_in_any_label_or_name(five_tenants: RunningSidecar) -> None:
    try:
        text = urllib.request.urlopen(five_tenants.metrics_url, timeout=5).read().decode()
    finally:
        five_tenants.stop()
    assert "contact-" not in text and "@example.com" not in text


def test_a_new_cycle_is_read_again_at_scrape_time(tmp_path: Path, clock: FakeClock) -> None:
    """SG-7: a CYCLE_ACTIVE count starts again at 0, so a tenant near its limit last cycle is
    no longer pressing once the cycle has turned, with no call made since."""
    running = start_sidecar(tmp_path / "ledger.db", clock, metrics=True)
    try:
        running.put_plan("warn", **plan(10))
        send(running, "warn", contacts("warn", 9))
        assert by(scrape(running)["quota_tenant_usage_ratio"], "tenant") == {"warn": 0.9}
        clock.advance(40 * DAY)
        m = scrape(running)
    finally:
        running.stop()
    assert "quota_tenant_usage_ratio" not in m
    assert by(m["quota_tenants"], "state")["OK"] == 1


def test_after_a_restart_every_tenant_is_back_without_a_call(tmp_path: Path, clock: FakeClock) -> None:
    running = start_sidecar(tmp_path / "ledger.db", clock)
    running.put_plan("warn", **plan(10))
    send(running, "warn", contacts("warn", 9))
    running.stop()
    running = start_sidecar(tmp_path / "ledger.db", clock, metrics=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ratios = by(scrape(running).get("quota_tenant_usage_ratio", []), "tenant")
            if ratios:
                break
            time.sleep(0.05)
    finally:
        running.stop()
    assert ratios == {"warn": 0.9}


def test_dedupe_filter_estimate_and_target_and_event_counts(tmp_path: Path, clock: FakeClock) -> None:
    running = start_sidecar(tmp_path / "ledger.db", clock, metrics=True, filter_fp_rate=0.01)
    try:
        running.put_plan("a", **plan(100, notify_thresholds=[0.5, 0.8]))
        send(running, "a", contacts("a", 90))
        deadline = time.monotonic() + 20
        while (m := scrape(running))["quota_dedupe_filter_items"] != [({}, 90.0)]:
            assert time.monotonic() < deadline, "the dedupe filter was never built"
            time.sleep(0.01)
    finally:
        running.stop()
    assert m["quota_dedupe_filters_building"] == [({}, 0.0)]
    assert m["quota_dedupe_filter_false_positive_ratio_target"] == [({}, 0.01)]
    ((_, estimate),) = m["quota_dedupe_filter_false_positive_ratio"]
    assert 0 < estimate < 0.01
    assert by(m["quota_usage_events_total"], "type") == {"THRESHOLD_CROSSED": 2.0, "REMINDER": 0.0}
    assert m["quota_usage_events_pending"] == [({}, 0.0)]


def test_undelivered_events_and_their_age_while_the_webhook_is_down(tmp_path: Path, clock: FakeClock) -> None:
    running = start_sidecar(
        tmp_path / "ledger.db", clock, metrics=True, webhook_url="http://127.0.0.1:9/nobody-listens"
    )
    try:
        running.put_plan("a", **plan(10))
        send(running, "a", contacts("a", 8))
        clock.advance(120)
        m = scrape(running)
    finally:
        running.stop()
    assert m["quota_usage_events_pending"] == [({}, 1.0)]
    assert m["quota_webhook_oldest_pending_seconds"] == [({}, 120.0)]
    failed = by(m["quota_webhook_deliveries_total"], "result")
    assert failed["delivered"] == 0


def test_dedupe_figures_follow_filters_grown_replaced_evicted_and_dropped() -> None:
    """Issue 5 / docs/monitoring.md metrics table: the dedupe figures a scrape reads (`quota_dedupe_filter_items`,
    `_bytes`, `_false_positive_ratio`) are running totals, current after contacts are added to a filter, a
    filter is replaced by a rebuilt one, the least recently used is evicted, and filters are dropped."""
    filters = DedupeFilters(0.01, max_filters=2)

    def load(tenant_id: str, ids: list[str], capacity: int) -> CycleFilter:
        f = filters.sized(max(capacity, len(ids)))
        f.add_all(ids)
        filters.put(tenant_id, 0, f)
        return f

    a = load("a", ["x", "y"], 0)
    assert filters.items == 2 and filters.size_bytes == a.size_bytes
    a.add_all(["z"])
    filters.touched(("a", 0))
    assert filters.items == 3 and filters.estimated_fp_rate == a.estimated_fp_rate > 0
    bigger = load("a", ["x", "y", "z", "w"], 1_000)
    assert filters.items == 4 and filters.size_bytes == bigger.size_bytes
    b = load("b", ["p"], 0)
    c = load("c", ["q"], 0)
    assert filters.get("a", 0) is None
    assert filters.items == 2 and filters.size_bytes == b.size_bytes + c.size_bytes
    filters.forget("b")
    assert filters.items == 1 and filters.size_bytes == c.size_bytes
    filters.forget()
    assert (filters.items, filters.size_bytes, filters.estimated_fp_rate) == (0, 0, 0.0)


def test_in_a_fleet_a_sidecar_reads_again_the_tenants_it_shows_so_another_sidecars_change_is_seen(
    tmp_path: Path, clock: FakeClock, postgres_server: None
) -> None:
    """Issue 16, a PostgreSQL ledger shared by two sidecars: each shows a tenant's limit
    proximity as the ledger has it at the scrape, not as it was at its own last decision.
    A plan raised through B takes the tenant off A's pressing series; contacts counted
    through B show in A's ratio. (A sidecar that is its ledger's only writer knows every
    change already.)"""
    with schema_for(tmp_path) as schema:
        url = schema_url(schema)
        a = start_sidecar(tmp_path / "a.db", clock, metrics=True, ledger=url)
        b = start_sidecar(tmp_path / "b.db", clock, metrics=True, ledger=url)
        try:
            a.put_plan("acme", **plan(10))
            send(a, "acme", contacts("acme", 8))
            assert by(scrape(a)["quota_tenant_usage_ratio"], "tenant") == {"acme": 0.8}
            send(b, "acme", contacts("acme", 9))
            assert by(scrape(a)["quota_tenant_usage_ratio"], "tenant") == {"acme": 0.9}
            b.put_plan("acme", **plan(100))
            assert "quota_tenant_usage_ratio" not in scrape(a)
            assert by(scrape(a)["quota_tenants"], "state")["WARNING"] == 0
        finally:
            a.stop()
            b.stop()


def test_process_figures_and_calls_refused_before_their_handler_are_on_metrics(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Issue 17 item 7: the process's own series (resident memory against the manifests'
    limit, CPU, open files; the interpreter's collections) are scraped with the sidecar's,
    and a request over --max-message-bytes, refused by gRPC before any handler runs
    (RESOURCE_EXHAUSTED), is counted by method, once; a handled call is not."""
    running = start_sidecar(tmp_path / "ledger.db", clock, metrics=True, max_message_bytes=64 * 1024)
    try:
        running.put_plan("t", **plan(10))
        send(running, "t", contacts("t", 1))
        oversize = pb.CheckSendBatchRequest(
            tenant_id="t", channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN, contact_ids=contacts("t", 3_000)
        )
        assert oversize.ByteSize() > 64 * 1024
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as refused:
                running.quota().CheckSendBatch(oversize, timeout=5)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        m = wait_for_scrape(
            running, lambda m: by(m["quota_calls_refused_before_handler_total"], "method")["CheckSendBatch"] == 2
        )
    finally:
        running.stop()
    refused = by(m["quota_calls_refused_before_handler_total"], "method")
    assert {method: n for method, n in refused.items() if n} == {"CheckSendBatch": 2.0}
    assert "CheckSend" in refused and "PutPlan" in refused
    assert m["process_resident_memory_bytes"][0][1] > 10 * 1024 * 1024
    assert m["process_open_fds"][0][1] > 0
    assert "process_cpu_seconds_total" in m
    assert "python_gc_collections_total" in m
    assert "python_info" in m
    assert {
        labels["code"]: value for labels, value in m["quota_calls_total"] if labels["method"] == "CheckSendBatch"
    } == {"OK": 1.0}


def wait_for_scrape(running: RunningSidecar, ready: Callable[[dict], bool], timeout: float = 10.0) -> dict:
    """A scrape once `ready` holds of it (a refused call is counted once gRPC lets it go)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(running)
        if ready(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)
