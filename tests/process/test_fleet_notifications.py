"""Notifications once per fleet (issue 16): two real `quota-sidecar serve` processes on one
PostgreSQL ledger (a schema of its own, dropped afterwards), both given the webhook. One
delivers at a time, the holder of the ledger's `webhook` lease: every event once, in
order, while both live; after a `kill -9` of the holder the other takes over within
--lease-ttl and nothing is lost. A WatchUsageEvents stream on either sidecar shows every
event in sequence order, whichever sidecar crossed it; the reminder sweep runs on one
sidecar at a time. Rule ids refer to domain.md.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.ledger.postgres import PostgresLedger

from support.fleet import FleetSidecar, check_send, put_plan, start_fleet
from support.webhook import Receiver

pytestmark = pytest.mark.process

LEASE_TTL_S = 2.0
PATIENCE_S = 60.0
SLOW_RECEIVER_S = 0.5


def slow_ok(handler: BaseHTTPRequestHandler) -> None:
    """A receiver that takes a while to say 2xx: a second sidecar delivering at the same time
    would post the same event meanwhile."""
    time.sleep(SLOW_RECEIVER_S)
    handler.send_response(204)
    handler.end_headers()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([slow_ok] * 10)
    yield r
    r.close()


def two_sidecars(ledger_url: str, *extra: str) -> list[FleetSidecar]:
    return sidecars(ledger_url, 2, *extra)


def sidecars(ledger_url: str, count: int, *extra: str) -> list[FleetSidecar]:
    return start_fleet(ledger_url, count, "--lease-ttl", str(LEASE_TTL_S), "--ledger-check-interval", "0.1", *extra)


def crossing_plan(**fields: object) -> pb.Plan:
    return pb.Plan(
        plan_name="P",
        metering=pb.METERING_CYCLE_ACTIVE,
        enforcement=pb.ENFORCEMENT_HARD,
        contact_limit=10,
        counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
        notify_thresholds=[0.8],
        **fields,
    )


def cross(sidecar: FleetSidecar, tenant: str) -> None:
    """CR-8: a 10-contact plan and 8 contacts through this sidecar, one crossing of 80%."""
    put_plan(sidecar.address, tenant, crossing_plan())
    for i in range(8):
        assert check_send(sidecar.address, tenant, f"c{i}").decision == pb.DECISION_ALLOW


def outbox(ledger_url: str) -> list[tuple[int, str]]:
    """(sequence, event id) of every event in the ledger's outbox, in sequence order."""
    ledger = PostgresLedger(ledger_url)
    ledger.open()
    try:
        return [(e.sequence, e.event_id) for e in ledger.read(lambda r: r.events_after(0, "", 1000))]
    finally:
        ledger.close()


def webhook_holder(ledger_url: str, fleet: list[FleetSidecar]) -> FleetSidecar:
    """The sidecar holding the ledger's webhook lease (its holder names its process id)."""
    ledger = PostgresLedger(ledger_url)
    ledger.open()
    try:
        lease = ledger.read(lambda r: r.lease("webhook"))
    finally:
        ledger.close()
    assert lease is not None and lease.live
    pid = int(lease.holder.split(":")[-2])
    (holder,) = [s for s in fleet if s.proc.pid == pid]
    return holder


def delivered(receiver: Receiver) -> list[tuple[int, str]]:
    bodies = [json.loads(body) for _, body in receiver.received]
    return [(int(b["sequence"]), b["event_id"]) for b in bodies]


def wait_for_delivery(receiver: Receiver, expected: list[tuple[int, str]]) -> list[tuple[int, str]]:
    deadline = time.monotonic() + PATIENCE_S
    while {e for e in delivered(receiver)} < set(expected) and time.monotonic() < deadline:
        time.sleep(0.05)
    got = delivered(receiver)
    assert set(got) >= set(expected), f"not delivered: {sorted(set(expected) - set(got))}"
    return got


def first_arrivals(got: list[tuple[int, str]]) -> list[tuple[int, str]]:
    seen: set[tuple[int, str]] = set()
    return [e for e in got if not (e in seen or seen.add(e))]


def test_the_webhook_is_delivered_by_one_sidecar_and_taken_over_when_it_is_killed(
    ledger_url: str, receiver: Receiver
) -> None:
    """Issue 16, CR-8: both sidecars have --webhook-url. Thresholds crossed through either are
    posted once each, in sequence order, while both live: one sidecar delivers. kill -9 of
    that one: the other takes the lease over once it lapses and delivers every later event,
    in order; an event is repeated at most if it was in flight at the kill (at least once)."""
    fleet = two_sidecars(ledger_url, "--webhook-url", receiver.url)
    try:
        for n in range(6):
            cross(fleet[n % 2], f"before-{n}")
        before = outbox(ledger_url)
        assert len(before) == 6
        got = wait_for_delivery(receiver, before)
        time.sleep(LEASE_TTL_S)
        assert delivered(receiver) == got == before, "posted twice or out of order while both lived"

        holder = webhook_holder(ledger_url, fleet)
        (survivor,) = [s for s in fleet if s is not holder]
        holder.stop()
        for n in range(4):
            cross(survivor, f"after-{n}")
        everything = outbox(ledger_url)
        assert len(everything) == 10
        got = wait_for_delivery(receiver, everything)
        assert first_arrivals(got) == everything
        assert webhook_holder(ledger_url, fleet) is survivor
    finally:
        for sidecar in fleet:
            sidecar.stop()


def test_a_stream_on_one_sidecar_shows_the_events_crossed_through_the_other_in_order(ledger_url: str) -> None:
    """Issue 16, CR-8: a WatchUsageEvents stream opened on sidecar A before anything happens
    shows every event, those crossed through B as well as A's, once each, in sequence order."""
    fleet = two_sidecars(ledger_url)
    streamed: list[tuple[int, str]] = []
    done = threading.Event()

    def watch() -> None:
        with grpc.insecure_channel(fleet[0].address) as ch:
            stream = pb_grpc.QuotaServiceStub(ch).WatchUsageEvents(pb.WatchUsageEventsRequest(), timeout=PATIENCE_S)
            for answer in stream:
                streamed.append((answer.event.sequence, answer.event.event_id))
                if len(streamed) == 6:
                    done.set()
                    return

    reader = threading.Thread(target=watch, daemon=True)
    try:
        reader.start()
        time.sleep(0.5)
        for n in range(6):
            cross(fleet[1] if n % 3 else fleet[0], f"tenant-{n}")
        assert done.wait(PATIENCE_S), f"the stream on A showed {streamed}"
        assert streamed == outbox(ledger_url)
    finally:
        for sidecar in fleet:
            sidecar.stop()
        reader.join(5)


def reminders_written(sidecar: FleetSidecar) -> float:
    text = urllib.request.urlopen(f"http://{sidecar.metrics_address}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "quota_usage_events_total" and sample.labels.get("type") == "REMINDER":
                return sample.value
    return 0.0


def test_the_reminder_sweep_runs_on_one_sidecar_at_a_time(ledger_url: str) -> None:
    """Issue 16, AC-1: the sidecars sweep every 0.1 s and every 0.13 s (so that neither is
    always first), and 8 tenants past their threshold are each due a reminder every second;
    the reminders are written by one sidecar only, the holder of the `reminders` lease, while
    both live."""
    fleet = sidecars(ledger_url, 1, "--reminder-interval", "0.1") + sidecars(
        ledger_url, 1, "--reminder-interval", "0.13"
    )
    try:
        renotify = pb.Plan().renotify_interval
        renotify.FromSeconds(1)
        for n in range(8):
            put_plan(fleet[n % 2].address, f"due-{n}", crossing_plan(renotify_interval=renotify))
            for i in range(8):
                assert check_send(fleet[n % 2].address, f"due-{n}", f"c{i}").decision == pb.DECISION_ALLOW
        deadline = time.monotonic() + PATIENCE_S
        while sum(reminders_written(s) for s in fleet) < 24 and time.monotonic() < deadline:
            time.sleep(0.1)
        written = [reminders_written(s) for s in fleet]
        assert sum(written) >= 24 and 0 in written, written
    finally:
        for sidecar in fleet:
            sidecar.stop()
