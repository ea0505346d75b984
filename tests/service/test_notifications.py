"""Usage notifications (issue 4; AC-1, CR-8, MK-2, SG-4): thresholds crossed and reminders
are written to the ledger's outbox with the change that caused them, and read back in
order by the engine, over WatchUsageEvents and by a real HTTP webhook receiver."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib.metadata
import json
import re
import signal
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.client import AsyncQuotaClient, NotFound, QuotaClient
from quota_sidecar.client.cli import main as quotactl_main
from quota_sidecar.server.app import SWEEP_QUIET_S, SWEEP_YIELD_POLL_S, SWEEP_YIELD_S, give_way
from quota_sidecar.server.domain.clock import MICROS, FakeClock
from quota_sidecar.server.domain.model import ActivityKind, Enforcement, UsageEvent, UsageEventType, UsageFigure
from quota_sidecar.server.engine import Engine
from quota_sidecar.server.metrics.prometheus import Metrics

from support.engine import batch, plan, record, send
from support.held import T as HELD
from support.held import add, ids, preset
from support.process import start
from support.serving import free_port
from support.sidecar import RunningSidecar, query_ledger, start_sidecar
from support.webhook import Answer, Receiver, cross_80_percent, grpc_plan, to_pb_ts

CROSSED = UsageEventType.THRESHOLD_CROSSED
REMINDER = UsageEventType.REMINDER
CONTACTS = UsageFigure.CONTACTS
DAY = 24 * 3600


def events(engine: Engine, tenant: str = "") -> list[UsageEvent]:
    return engine.usage_events(tenant, 0, 10_000)


def kinds(engine: Engine) -> list[tuple[UsageEventType, UsageFigure, float]]:
    return [(e.type, e.figure, e.threshold) for e in events(engine)]


def outbox_rows(engine: Engine) -> int:
    return engine.ledger.read(lambda reader: reader.pending_events(0)[0])


# -- thresholds crossed ------------------------------------------------------------------------


def test_cr8_crossing_80_percent_writes_exactly_one_event_with_the_usage_after_the_send(engine: Engine) -> None:
    engine.put_plan("tenant-a", plan(10, notify_thresholds=[0.8, 1.0]))
    for i in range(7):
        send(engine, f"c{i}")
    assert events(engine) == []
    crossing = send(engine, "c7")
    (event,) = events(engine)
    assert (event.type, event.figure, event.threshold) == (CROSSED, CONTACTS, 0.8)
    assert event.usage == crossing.usage and event.usage.active_contacts == 8
    assert event.sequence > 0 and len(event.event_id) == 32
    send(engine, "c8")
    send(engine, "c7")
    assert len(events(engine)) == 1


def test_cr8_reaching_the_limit_is_a_second_threshold_and_a_jump_announces_each_threshold(engine: Engine) -> None:
    engine.put_plan("tenant-a", plan(10, notify_thresholds=[0.8, 0.9, 1.0]))
    batch(engine, [f"c{i}" for i in range(10)])
    assert kinds(engine) == [(CROSSED, CONTACTS, 0.8), (CROSSED, CONTACTS, 0.9), (CROSSED, CONTACTS, 1.0)]
    sequences = [e.sequence for e in events(engine)]
    assert sequences == sorted(sequences) and len(set(sequences)) == 3


def test_dry_runs_retries_and_denials_write_no_event(engine: Engine) -> None:
    """SG-5: a pre-flight check warns in its answer only; a retried request_id repeats its first
    answer and writes nothing more."""
    engine.put_plan("tenant-a", plan(10, notify_thresholds=[0.8]))
    batch(engine, [f"c{i}" for i in range(7)])
    dry = batch(engine, ["c7", "c8"], dry_run=True)
    assert dry.usage.usage_ratio == pytest.approx(0.9)
    assert outbox_rows(engine) == 0
    send(engine, "c7", request_id="r-1")
    send(engine, "c7", request_id="r-1")
    assert outbox_rows(engine) == 1


def test_mk2_held_count_moving_around_a_threshold_announces_it_once_per_cycle(engine: Engine, clock: FakeClock) -> None:
    engine.put_plan(HELD, preset("marketing-contacts", contact_limit=10))
    add(engine, ids("m", 8))
    assert kinds(engine) == [(CROSSED, CONTACTS, 0.8)]
    record(engine, ["m000"], kind=ActivityKind.CONTACT_DELETED, tenant=HELD)
    add(engine, ["n000"])
    record(engine, ["m001"], kind=ActivityKind.CONTACT_DELETED, tenant=HELD)
    add(engine, ["n001"])
    assert len(events(engine)) == 1
    clock.advance(40 * DAY)
    add(engine, ["n002"])
    assert kinds(engine) == [(CROSSED, CONTACTS, 0.8), (CROSSED, CONTACTS, 0.9)]


def test_sg7_a_new_cycle_rearms_the_thresholds_of_a_count_that_starts_again(engine: Engine, clock: FakeClock) -> None:
    engine.put_plan("tenant-a", plan(10, notify_thresholds=[0.8]))
    batch(engine, [f"c{i}" for i in range(8)])
    clock.advance(40 * DAY)
    batch(engine, [f"d{i}" for i in range(7)])
    assert len(events(engine)) == 1
    send(engine, "d7")
    first, second = events(engine)
    assert second.usage.cycle_start_us > first.usage.cycle_start_us


def test_cr4_an_upgrade_rearms_and_a_new_plans_thresholds_are_announced(engine: Engine) -> None:
    engine.put_plan("tenant-a", plan(10, notify_thresholds=[0.8]))
    batch(engine, [f"c{i}" for i in range(8)])
    engine.put_plan("tenant-a", plan(20, notify_thresholds=[0.8]))
    batch(engine, [f"d{i}" for i in range(7)])
    assert len(events(engine)) == 1
    send(engine, "d7")
    assert [e.usage.contact_limit for e in events(engine)] == [10, 20]


def test_a_downgrade_that_puts_the_tenant_past_a_threshold_is_announced_by_put_plan(engine: Engine) -> None:
    engine.put_plan("tenant-a", plan(20, notify_thresholds=[0.8, 1.0]))
    batch(engine, [f"c{i}" for i in range(10)])
    engine.put_plan("tenant-a", plan(10, notify_thresholds=[0.8, 1.0]))
    assert kinds(engine) == [(CROSSED, CONTACTS, 0.8), (CROSSED, CONTACTS, 1.0)]


def test_sg4_the_sends_allowance_has_its_own_thresholds(engine: Engine) -> None:
    engine.put_plan("tenant-a", plan(10, sends_limit=10, notify_thresholds=[0.8]))
    send(engine, "c0")
    for _ in range(7):
        send(engine, "c0")
    assert kinds(engine) == [(CROSSED, UsageFigure.SENDS, 0.8)]
    assert events(engine)[0].usage.sends == 8


def test_late_activity_is_announced_against_the_current_cycle(engine: Engine, clock: FakeClock) -> None:
    """CR-7: activity booked into a past cycle does not move the current cycle's figures."""
    engine.put_plan("tenant-a", plan(10, notify_thresholds=[0.5]))
    clock.advance(40 * DAY)
    record(engine, [f"c{i}" for i in range(6)], occurred_at_us=clock.now_us() - 30 * DAY * MICROS)
    assert events(engine) == []


# -- reminders -----------------------------------------------------------------------------------


def test_ac1_a_reminder_every_15_days_until_the_plan_is_upgraded(engine: Engine, clock: FakeClock) -> None:
    engine.put_plan(HELD, preset("contact-limit", contact_limit=10))
    add(engine, ids("c", 9))
    assert kinds(engine) == [(CROSSED, CONTACTS, 0.9)]
    clock.advance(14 * DAY)
    assert engine.send_reminders() == []
    clock.advance(DAY)
    (reminder,) = engine.send_reminders()
    assert (reminder.type, reminder.threshold, reminder.usage.active_contacts) == (REMINDER, 0.9, 9)
    assert engine.send_reminders() == []
    clock.advance(15 * DAY)
    assert [e.type for e in engine.send_reminders()] == [REMINDER]
    engine.put_plan(HELD, preset("contact-limit", contact_limit=50))
    clock.advance(30 * DAY)
    assert engine.send_reminders() == []
    assert [e.type for e in events(engine)] == [CROSSED, REMINDER, REMINDER]


def test_ac10_deleting_contacts_below_the_threshold_stops_the_reminders(engine: Engine, clock: FakeClock) -> None:
    engine.put_plan(HELD, preset("contact-limit", contact_limit=10))
    add(engine, ids("c", 9))
    record(engine, ids("c", 3), kind=ActivityKind.CONTACT_DELETED, tenant=HELD)
    clock.advance(16 * DAY)
    assert engine.send_reminders() == []


def test_reminders_need_a_renotify_interval(engine: Engine, clock: FakeClock) -> None:
    engine.put_plan("tenant-a", plan(10, notify_thresholds=[0.8], enforcement=Enforcement.OVERAGE))
    batch(engine, [f"c{i}" for i in range(9)])
    clock.advance(20 * DAY)
    assert engine.send_reminders() == []
    assert len(events(engine)) == 1


# -- WatchUsageEvents over gRPC ------------------------------------------------------------------


def grpc_send(running: RunningSidecar, tenant: str, contacts: list[str]) -> pb.CheckSendBatchResponse:
    return running.quota().CheckSendBatch(
        pb.CheckSendBatchRequest(
            tenant_id=tenant, channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN, contact_ids=contacts
        ),
        timeout=5,
    )


def test_watch_streams_the_backlog_then_live_events_in_order(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("a", **grpc_plan(10))
    sidecar.put_plan("b", **grpc_plan(10))
    grpc_send(sidecar, "a", [f"c{i}" for i in range(8)])
    stream = sidecar.quota().WatchUsageEvents(pb.WatchUsageEventsRequest(), timeout=10)
    first = next(stream).event
    assert (first.tenant_id, first.type, first.figure, first.threshold) == (
        "a",
        pb.USAGE_EVENT_TYPE_THRESHOLD_CROSSED,
        pb.USAGE_FIGURE_CONTACTS,
        pytest.approx(0.8),
    )
    assert first.usage.active_contacts == 8 and first.usage.state == pb.USAGE_STATE_WARNING
    grpc_send(sidecar, "b", [f"c{i}" for i in range(10)])
    live = [next(stream).event for _ in range(2)]
    stream.cancel()
    assert [(e.tenant_id, e.threshold) for e in live] == [("b", pytest.approx(0.8)), ("b", pytest.approx(1.0))]
    assert first.sequence < live[0].sequence < live[1].sequence


def test_watch_resumes_after_a_sequence_and_filters_by_tenant(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("a", **grpc_plan(10))
    sidecar.put_plan("b", **grpc_plan(10))
    grpc_send(sidecar, "a", [f"c{i}" for i in range(10)])
    grpc_send(sidecar, "b", [f"c{i}" for i in range(10)])
    stream = sidecar.quota().WatchUsageEvents(pb.WatchUsageEventsRequest(tenant_id="b"), timeout=10)
    b_events = [next(stream).event for _ in range(2)]
    stream.cancel()
    assert {e.tenant_id for e in b_events} == {"b"}
    resumed = sidecar.quota().WatchUsageEvents(
        pb.WatchUsageEventsRequest(tenant_id="b", after_sequence=b_events[0].sequence), timeout=10
    )
    again = next(resumed).event
    resumed.cancel()
    assert again.event_id == b_events[1].event_id


def test_watch_refuses_bad_input_and_unknown_tenants(sidecar: RunningSidecar) -> None:
    with pytest.raises(grpc.RpcError) as bad:
        next(sidecar.quota().WatchUsageEvents(pb.WatchUsageEventsRequest(tenant_id="x" * 300), timeout=5))
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "tenant_id" in bad.value.details()
    with pytest.raises(grpc.RpcError) as unknown:
        next(sidecar.quota().WatchUsageEvents(pb.WatchUsageEventsRequest(tenant_id="nobody"), timeout=5))
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


def test_watch_streams_are_bounded_and_end_when_the_sidecar_stops(
    ledger_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    running = start_sidecar(tmp_path / "ledger.db", clock, ledger=ledger_url, max_workers=4)
    try:
        running.put_plan("a", **grpc_plan(10))
        grpc_send(running, "a", [f"c{i}" for i in range(8)])
        held = running.quota().WatchUsageEvents(pb.WatchUsageEventsRequest(), timeout=30)
        assert next(held).event.tenant_id == "a"
        with pytest.raises(grpc.RpcError) as more:
            next(running.quota().WatchUsageEvents(pb.WatchUsageEventsRequest(), timeout=5))
        assert more.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.sidecar.stop(5)
    assert list(held) == []


# -- the webhook -----------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_cr8_crossing_80_percent_posts_exactly_one_signed_event_to_the_webhook(
    ledger_url: str, tmp_path: Path, clock: FakeClock, receiver: Receiver
) -> None:
    running = start_sidecar(
        tmp_path / "ledger.db",
        clock,
        ledger=ledger_url,
        metrics=True,
        webhook_url=receiver.url,
        webhook_secret="s3cret",
    )
    try:
        running.put_plan("acme", **grpc_plan(10))
        grpc_send(running, "acme", [f"c{i}" for i in range(7)])
        grpc_send(running, "acme", ["c7"])
        grpc_send(running, "acme", ["c7", "c8"])
        ((headers, body),) = receiver.wait_for(1)
        running.sidecar.webhook.stop()
    finally:
        running.stop()
    assert len(receiver.received) == 1
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["X-Quota-Signature"] == expected
    assert headers["Content-Type"] == "application/json"
    event = json.loads(body)
    assert headers["X-Quota-Event-Id"] == event["event_id"]
    assert event["type"] == "USAGE_EVENT_TYPE_THRESHOLD_CROSSED" and event["figure"] == "USAGE_FIGURE_CONTACTS"
    assert (event["tenant_id"], event["threshold"], event["sequence"]) == ("acme", 0.8, 1)
    assert event["occurred_at"].endswith("Z")
    assert event["usage"]["active_contacts"] == 8 and event["usage"]["state"] == "USAGE_STATE_WARNING"
    assert event["usage"]["usage_ratio"] == 0.8 and event["usage"]["contact_limit"] == 10


def test_the_webhook_body_and_quotactl_json_events_are_one_message_in_the_proto3_json_mapping(
    ledger_url: str, tmp_path: Path, clock: FakeClock, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 17 item 9, CR-8: the webhook body and a line of `quotactl --json events` are the
    UsageEvent message in the proto3 JSON mapping: json_format.Parse reads each into the
    message WatchUsageEvents streams, field for field."""
    running = start_sidecar(tmp_path / "ledger.db", clock, ledger=ledger_url, webhook_url=receiver.url)
    try:
        running.put_plan("acme", **grpc_plan(10))
        grpc_send(running, "acme", [f"c{i}" for i in range(8)])
        ((_, body),) = receiver.wait_for(1)
        (streamed,) = [
            answer.event
            for answer in running.quota().WatchUsageEvents(
                pb.WatchUsageEventsRequest(tenant_id="acme", backlog_only=True), timeout=5
            )
        ]
        assert quotactl_main(["--address", running.address, "--json", "events", "acme"]) == 0
        lines = capsys.readouterr().out.splitlines()
    finally:
        running.stop()
    from_webhook = json_format.Parse(body, pb.UsageEvent())
    from_quotactl = json_format.Parse(lines[0], pb.UsageEvent())
    assert len(lines) == 1
    assert from_webhook == from_quotactl == streamed
    assert from_webhook.type == pb.USAGE_EVENT_TYPE_THRESHOLD_CROSSED and from_webhook.usage.active_contacts == 8


def posts_for(
    tmp_path: Path,
    clock: FakeClock,
    ledger_url: str,
    receiver: Receiver,
    contacts: int,
    posts: int,
    **settings: object,
) -> list[tuple[dict[str, str], bytes]]:
    """Runs a sidecar posting to `receiver` (and `settings`), sends to `contacts` contacts of a
    10-contact plan, and returns the first `posts` posts once they arrived; closes both."""
    running = start_sidecar(
        tmp_path / "ledger.db",
        clock,
        ledger=ledger_url,
        webhook_url=settings.pop("webhook_url", receiver.url),
        **settings,
    )
    try:
        running.put_plan("acme", **grpc_plan(10))
        grpc_send(running, "acme", [f"c{i}" for i in range(contacts)])
        return receiver.wait_for(posts)[:posts]
    finally:
        running.stop()
        receiver.close()


def test_a_failing_receiver_gets_the_event_again_until_it_answers_2xx(
    ledger_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    posts = posts_for(tmp_path, clock, ledger_url, Receiver([500, 503]), 10, 4)
    ids_in_order = [json.loads(body)["event_id"] for _, body in posts]
    first, second = ids_in_order[0], ids_in_order[3]
    assert ids_in_order[:3] == [first, first, first] and second != first
    assert [json.loads(body)["threshold"] for _, body in posts] == [0.8, 0.8, 0.8, 1.0]
    assert webhook_cursor(ledger_url) == 2


def test_events_wait_in_the_ledger_across_a_restart_and_are_delivered_once(
    ledger_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    """At least once and no more than that: an event written while the receiver was down is
    delivered after the restart; one already delivered is not posted again."""
    down = Receiver()
    dead_url = down.url
    down.close()
    running = start_sidecar(tmp_path / "ledger.db", clock, ledger=ledger_url, webhook_url=dead_url)
    try:
        running.put_plan("acme", **grpc_plan(10))
        grpc_send(running, "acme", [f"c{i}" for i in range(8)])
    finally:
        running.stop()
    receiver = Receiver()
    try:
        running = start_sidecar(tmp_path / "ledger.db", clock, ledger=ledger_url, webhook_url=receiver.url)
        try:
            ((_, body),) = receiver.wait_for(1)
        finally:
            running.stop()
        running = start_sidecar(tmp_path / "ledger.db", clock, ledger=ledger_url, webhook_url=receiver.url)
        try:
            grpc_send(running, "acme", ["c8", "c9"])
            posts = receiver.wait_for(2)
        finally:
            running.stop()
    finally:
        receiver.close()
    assert json.loads(body)["threshold"] == 0.8
    assert [json.loads(b)["threshold"] for _, b in posts] == [0.8, 1.0]
    assert len({json.loads(b)["event_id"] for _, b in posts}) == 2


def test_reminders_are_written_by_the_running_sidecar(
    ledger_url: str, tmp_path: Path, clock: FakeClock, receiver: Receiver
) -> None:
    """AC-1 end to end: the sidecar's own reminder loop writes the reminder once it is due."""
    running = start_sidecar(
        tmp_path / "ledger.db", clock, ledger=ledger_url, webhook_url=receiver.url, reminder_interval=0.05
    )
    try:
        running.put_plan(
            "acme",
            **{
                **grpc_plan(10),
                "renotify_interval": {"seconds": 15 * DAY},
                "notify_thresholds": [0.9],
                "cycle_anchor": to_pb_ts(clock.now_us()),
            },
        )
        grpc_send(running, "acme", [f"c{i}" for i in range(9)])
        receiver.wait_for(1)
        clock.advance(timedelta(days=15).total_seconds())
        posts = receiver.wait_for(2)
    finally:
        running.stop()
    assert [json.loads(b)["type"] for _, b in posts[:2]] == [
        "USAGE_EVENT_TYPE_THRESHOLD_CROSSED",
        "USAGE_EVENT_TYPE_REMINDER",
    ]


def test_kill_9_keeps_every_acknowledged_crossing_for_the_webhook(tmp_path: Path, processes: list) -> None:
    """The real process: events written while the receiver is down survive SIGKILL and reach
    the receiver after the restart, once each; the decision that caused each was acknowledged."""
    down = Receiver()
    dead_url = down.url
    down.close()
    ledger = tmp_path / "ledger.db"
    first = start(ledger, "--webhook-url", dead_url)
    processes.append(first)
    first.wait_serving()
    tenants = [f"t{i}" for i in range(5)]
    for tenant in tenants:
        cross_80_percent(first.address, tenant)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)

    receiver = Receiver()
    try:
        again = start(ledger, "--webhook-url", receiver.url)
        processes.append(again)
        again.wait_serving()
        posts = receiver.wait_for(len(tenants))
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(timeout=30) == 0
    finally:
        receiver.close()
    delivered = [json.loads(body) for _, body in receiver.received]
    assert sorted(e["tenant_id"] for e in delivered) == tenants
    assert len({e["event_id"] for e in delivered}) == len(delivered) == len(posts)
    assert {e["threshold"] for e in delivered} == {0.8}


def redirect_to(location: str) -> Answer:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


def trickle(receiver: Receiver, interval: float = 0.2) -> Answer:
    """An answer that never ends: a byte every `interval` seconds until the receiver closes."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"." * 100_000:
            if receiver.closing.wait(interval):
                return
            try:
                handler.wfile.write(bytes([byte]))
            except OSError:
                return

    return answer


def webhook_cursor(url: str) -> int:
    """How far the webhook has delivered, as the ledger at `url` keeps it."""
    found = query_ledger(url, "SELECT seq FROM event_cursors WHERE consumer = ?", "webhook")
    return found[0][0] if found else 0


def test_a_redirect_is_not_followed_and_the_event_is_posted_again_until_a_2xx(
    ledger_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Issue 14.1: a 302 is a failure like any other non-2xx: no GET follows it, the position
    stays, and the same event is posted again to the configured URL after the backoff."""
    receiver = Receiver([redirect_to("/moved")])
    posts = posts_for(tmp_path, clock, ledger_url, receiver, 8, 2)
    assert receiver.requests[:2] == [("POST", "/quota-events"), ("POST", "/quota-events")]
    assert ("GET", "/moved") not in receiver.requests
    assert len({json.loads(body)["event_id"] for _, body in posts}) == 1
    assert webhook_cursor(ledger_url) == 1


def test_a_receiver_trickling_its_answer_is_cut_off_at_the_timeout_and_posted_again(
    ledger_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Issue 14.2: --webhook-timeout bounds the whole attempt, not each read: a receiver
    sending a byte every 0.2 s (each read well within the timeout) is cut off after 1 s and
    the event is posted again; the second receiver answers at once and it is delivered."""
    receiver = Receiver()
    receiver.answers.append(trickle(receiver))
    posts = posts_for(tmp_path, clock, ledger_url, receiver, 8, 2, webhook_timeout=1.0)
    assert len({json.loads(body)["event_id"] for _, body in posts}) == 1
    assert webhook_cursor(ledger_url) == 1


def test_sigterm_exits_0_within_the_drain_timeout_while_a_receiver_trickles(tmp_path: Path, processes: list) -> None:
    """Issue 14.2, the real process: with a post in flight to a receiver that would keep it
    for 600 s (the --webhook-timeout), SIGTERM still drains and exits 0 in a few seconds; the
    event stays undelivered in the ledger for the next start."""
    receiver = Receiver()
    receiver.answers.append(trickle(receiver))
    ledger = tmp_path / "ledger.db"
    try:
        running = start(ledger, "--webhook-url", receiver.url, "--webhook-timeout", "600", "--drain-timeout", "2")
        processes.append(running)
        running.wait_serving()
        cross_80_percent(running.address, "acme")
        receiver.wait_for(1)
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(timeout=20) == 0
    finally:
        receiver.close()
    assert webhook_cursor(f"sqlite:///{ledger}") == 0


def test_credentials_in_the_webhook_url_are_sent_as_basic_auth(
    ledger_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Issue 14.3: `http://user:password@host/path` (percent-encoded) posts to host/path with
    `Authorization: Basic`, and the credentials appear in no log line."""
    receiver = Receiver()
    url = receiver.url.replace("http://", "http://mail%40ops:p%3As%2Fs@")
    ((headers, _),) = posts_for(tmp_path, clock, ledger_url, receiver, 8, 1, webhook_url=url)
    assert receiver.requests[0] == ("POST", "/quota-events")
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"mail@ops:p:s/s").decode()


def test_the_signature_covers_a_timestamp_and_the_user_agent_names_the_product(
    ledger_url: str, tmp_path: Path, clock: FakeClock, receiver: Receiver
) -> None:
    """Issue 14.3: `X-Quota-Signature-V1: t=<unix seconds>,v1=<HMAC-SHA256 of "<t>." + body>`,
    the same t in `X-Quota-Timestamp`: a receiver refusing old timestamps refuses replays,
    because changing t breaks the signature. The body-only X-Quota-Signature stays."""
    ((headers, body),) = posts_for(tmp_path, clock, ledger_url, receiver, 8, 1, webhook_secret="s3cret")
    stamp = clock.now_us() // MICROS
    assert headers["X-Quota-Timestamp"] == str(stamp)

    def mac(signed: bytes) -> str:
        return hmac.new(b"s3cret", signed, hashlib.sha256).hexdigest()

    assert headers["X-Quota-Signature-V1"] == f"t={stamp},v1={mac(f'{stamp}.'.encode() + body)}"
    assert mac(f"{stamp + 1}.".encode() + body) not in headers["X-Quota-Signature-V1"]
    assert headers["X-Quota-Signature"] == f"sha256={mac(body)}"
    assert headers["User-Agent"] == f"quota-sidecar/{importlib.metadata.version('quota-sidecar')}"
    notifications = (Path(__file__).resolve().parents[2] / "docs" / "notifications.md").read_text()
    recipe = next(
        block for block in re.findall(r"```python\n(.+?)```", notifications, flags=re.S) if "def verify" in block
    )
    documented: dict[str, object] = {}
    exec(recipe, documented)
    verify = documented["verify"]
    # the fake clock is not the wall clock: a huge window checks the signature, a negative one the window
    assert verify(b"s3cret", headers, body, window=10**10)
    assert not verify(b"s3cret", headers, body + b" ", window=10**10)
    assert not verify(b"s3cret", headers, body, window=-1)


# -- the client library ------------------------------------------------------------------------


def test_the_client_watch_resumes_across_a_sidecar_restart_without_a_gap_or_a_repeat(
    ledger_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    """CR-8 for a billing system that reads events with QuotaClient: a restart of the sidecar
    costs the reader nothing."""
    address = f"127.0.0.1:{free_port()}"
    running = start_sidecar(tmp_path / "ledger.db", clock, address, ledger=ledger_url)
    running.put_plan("acme", **grpc_plan(10))
    grpc_send(running, "acme", [f"c{i}" for i in range(8)])
    received: list = []
    arrived = threading.Condition()

    def watch() -> None:
        with QuotaClient(address) as client:
            for event in client.watch_usage_events("acme"):
                with arrived:
                    received.append(event)
                    arrived.notify_all()
                if len(received) == 2:
                    return

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    with arrived:
        assert arrived.wait_for(lambda: len(received) == 1, 10)
    running.stop()
    running = start_sidecar(tmp_path / "ledger.db", clock, address, ledger=ledger_url)
    try:
        grpc_send(running, "acme", ["c8", "c9"])
        reader.join(timeout=20)
    finally:
        running.stop()
    assert [(e.type, e.figure, e.threshold) for e in received] == [
        ("THRESHOLD_CROSSED", "CONTACTS", 0.8),
        ("THRESHOLD_CROSSED", "CONTACTS", 1.0),
    ]
    assert received[1].usage.active_contacts == 10 and received[1].usage.state == "AT_LIMIT"
    assert received[0].sequence < received[1].sequence


def test_the_async_client_watch_reads_the_backlog_and_names_errors(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("acme", **grpc_plan(10))
    grpc_send(sidecar, "acme", [f"c{i}" for i in range(10)])

    async def read() -> list:
        async with AsyncQuotaClient(sidecar.address) as client:
            events = []
            async for event in client.watch_usage_events(after_sequence=0):
                events.append(event)
                if len(events) == 2:
                    break
            with pytest.raises(NotFound):
                async for _ in client.watch_usage_events("nobody"):
                    pass
            return events

    events = asyncio.run(read())
    assert [e.threshold for e in events] == [0.8, 1.0] and {e.tenant_id for e in events} == {"acme"}


class _DataPlane:
    """The real Metrics on a fake monotonic clock, which `sleep` moves on; while `busy`, one
    call starts and ends during every sleep (a caller sending calls back to back: never in
    flight when the sweep looks, never SWEEP_QUIET_S apart)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.busy = False
        self.metrics = Metrics(CollectorRegistry(), clock=lambda: self.now)

    def sleep(self, seconds: float) -> bool:
        self.now += seconds
        if self.busy:
            self.metrics.call_started()
            self.metrics.call_ended()
        return False

    def waited(self, sleep: Callable[[float], bool] | None = None) -> tuple[float, bool]:
        """How long the sweep's wait before a transaction took, and whether it said to stop."""
        start = self.now
        stop = give_way(self.metrics, sleep or self.sleep, quiet_s=SWEEP_QUIET_S, patience_s=SWEEP_YIELD_S)
        return self.now - start, stop


def test_ac1_item8_the_reminder_sweep_waits_for_a_quiet_moment_of_the_data_plane() -> None:
    """Issue 13 item 8, AC-1: before each transaction the reminder sweep waits until no call is in
    flight and none started or ended for SWEEP_QUIET_S. Calls back to back hold it for
    SWEEP_YIELD_S, after which it goes on (reminders are still sent); a quiet data plane costs it
    no wait; a stopping sidecar ends the wait."""
    plane = _DataPlane()
    assert plane.waited() == (0.0, False)
    plane.busy = True
    plane.sleep(0.0)
    waited, stop = plane.waited()
    assert SWEEP_YIELD_S <= waited < SWEEP_YIELD_S + 2 * SWEEP_YIELD_POLL_S and not stop
    plane.busy = False
    plane.metrics.call_started()
    plane.metrics.call_ended()
    waited, stop = plane.waited()
    assert SWEEP_QUIET_S <= waited < SWEEP_QUIET_S + 2 * SWEEP_YIELD_POLL_S and not stop
    plane.metrics.call_started()
    assert plane.waited()[0] >= SWEEP_YIELD_S
    assert plane.waited(lambda seconds: True) == (0.0, True)
    plane.metrics.call_ended()
