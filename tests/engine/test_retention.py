"""What the ledger keeps and for how long: answers kept for retries (request_id), the
outbox of usage events and the audit, each pruned after its retention; and the bound
on a plan's notify_thresholds.

Sizes are measured on the real SQLite file (its page count), times with a fake clock.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.server.domain.clock import MICROS, FakeClock, to_us
from quota_sidecar.server.domain.model import (
    ActivityKind,
    Channel,
    ContactSource,
    Enforcement,
    MessageKind,
    Metering,
    Reason,
)
from quota_sidecar.server.engine import (
    PRUNE_ROWS,
    ActivityRequest,
    BatchRequest,
    ContactAddRequest,
    Engine,
    PlanInput,
    Retention,
    SendRequest,
)
from quota_sidecar.server.ledger.sqlite import SCHEMA_VERSION, SQLiteLedger
from quota_sidecar.server.ledger.sqlite.verify import verify_ledger
from quota_sidecar.server.outbox.delivery import WEBHOOK

from support.sidecar import RunningSidecar, start_sidecar

DATA = Path(__file__).resolve().parents[1] / "data"
# A ledger written by the release before answers were stored compactly, with the
# answers it gave (their repr) beside it; written by `first_calls` at LEGACY_AT.
LEGACY_LEDGER = DATA / "ledger-json-results.db"
LEGACY_ANSWERS = DATA / "ledger-json-results.answers.json"
LEGACY_AT = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
ANCHOR = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
HOUR = 3600
CAMPAIGN = MessageKind.CAMPAIGN
AUTOMATION = MessageKind.AUTOMATION


def cycle_active_plan(enforcement: Enforcement, limit: int, **fields: object) -> PlanInput:
    base: dict[str, object] = dict(
        metering=Metering.CYCLE_ACTIVE,
        enforcement=enforcement,
        contact_limit=limit,
        cycle_anchor_us=to_us(ANCHOR),
        counted_kinds=(CAMPAIGN, AUTOMATION),
        **fields,
    )
    return PlanInput(**base)  # type: ignore[arg-type]


def overage_plan(limit: int) -> PlanInput:
    return cycle_active_plan(
        Enforcement.OVERAGE,
        limit,
        counted_activities=(ActivityKind.MESSAGE_SENT, ActivityKind.CONTACT_CREATED),
        overage_unit_price="0.50",
        currency="EUR",
        plan_name="Growth",
        notify_thresholds=(0.5, 1.0),
    )


def hard_plan(limit: int) -> PlanInput:
    return cycle_active_plan(Enforcement.HARD, limit, plan_name="Starter")


def calls(engine: Engine) -> dict[str, object]:
    """Every kind of call that keeps its answer for a retry, each under a request_id;
    run again, each is a retry."""
    return {
        "CheckSendBatch": engine.check_send_batch(
            BatchRequest("over", Channel.EMAIL, CAMPAIGN, ["a", "b", "c", "a"], request_id="batch-1")
        ),
        "CheckSend": engine.check_send(SendRequest("over", "d", Channel.EMAIL, CAMPAIGN, request_id="send-1")),
        "RecordActivity": engine.record_activity(
            ActivityRequest("over", ActivityKind.MESSAGE_SENT, ["e", "a"], request_id="activity-1")
        ),
        "CheckContactAdd": engine.check_contact_add(
            ContactAddRequest("over", ContactSource.IMPORT, ["f", "g"], request_id="add-1")
        ),
        "CheckSend DEFER": engine.check_send(
            SendRequest("hard", "y", Channel.EMAIL, AUTOMATION, queued_since_us=to_us(LEGACY_AT), request_id="send-2")
        ),
        "CheckSendBatch DENY": engine.check_send_batch(
            BatchRequest("hard", Channel.EMAIL, CAMPAIGN, ["x", "z", "y", "x"], request_id="batch-2")
        ),
    }


def first_calls(engine: Engine) -> dict[str, object]:
    """The plans, one uncounted-by-request send, then `calls` for the first time."""
    engine.put_plan("over", overage_plan(2))
    engine.put_plan("hard", hard_plan(1))
    engine.check_send(SendRequest("hard", "x", Channel.EMAIL, CAMPAIGN))
    return calls(engine)


@pytest.fixture
def fast_ledger(tmp_path: Path) -> Iterator[SQLiteLedger]:
    lg = SQLiteLedger(tmp_path / "ledger.db", synchronous="NORMAL")
    lg.open()
    try:
        yield lg
    finally:
        lg.close()


def ledger_bytes(path: Path) -> int:
    """The size of the ledger's committed pages (WAL included), read from the file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()


# -- answers kept for retries --------------------------------------------------------------------


def test_a_stored_check_send_answer_costs_at_most_100_bytes(fast_ledger: SQLiteLedger):
    """CheckSends to active contacts, each with a fresh request_id as the Python client sends: the
    ledger grows by at most 100 bytes per call (what answering the retry needs, index included)."""
    engine = Engine(fast_ledger, FakeClock(LEGACY_AT))
    engine.put_plan("t", overage_plan(1_000))
    contacts = [f"contact-{i:03d}@example.com" for i in range(100)]
    engine.check_send_batch(BatchRequest("t", Channel.EMAIL, CAMPAIGN, contacts))
    warm = 500
    for i in range(warm):
        engine.check_send(SendRequest("t", contacts[i % 100], Channel.EMAIL, CAMPAIGN, request_id=uuid.uuid4().hex))
    before = ledger_bytes(fast_ledger.path)
    n = 3_000
    for i in range(n):
        engine.check_send(SendRequest("t", contacts[i % 100], Channel.EMAIL, CAMPAIGN, request_id=uuid.uuid4().hex))
    per_call = (ledger_bytes(fast_ledger.path) - before) / n
    assert engine.get_usage("t").sends == 100 + warm + n
    assert per_call <= 100, f"{per_call:.0f} bytes per stored CheckSend answer"


def test_a_stored_batch_answer_costs_about_a_byte_per_contact(fast_ledger: SQLiteLedger):
    """A 10,000-contact CheckSendBatch to active contacts under a request_id: its stored answer is a
    code per contact in request order, not the whole message (the contact ids are in the retry)."""
    engine = Engine(fast_ledger, FakeClock(LEGACY_AT))
    engine.put_plan("t", overage_plan(20_000))
    contacts = [f"contact-{i:05d}@example.com" for i in range(10_000)]
    engine.check_send_batch(BatchRequest("t", Channel.EMAIL, CAMPAIGN, contacts))
    before = ledger_bytes(fast_ledger.path)
    first = engine.check_send_batch(BatchRequest("t", Channel.EMAIL, CAMPAIGN, contacts, request_id="b"))
    grown = ledger_bytes(fast_ledger.path) - before
    assert grown <= 2 * len(contacts), f"{grown} bytes for one stored 10,000-contact answer"
    retry = engine.check_send_batch(BatchRequest("t", Channel.EMAIL, CAMPAIGN, contacts, request_id="b"))
    assert retry == first
    assert engine.get_usage("t").sends == 20_000


def test_every_stored_answer_is_replayed_identically(fast_ledger: SQLiteLedger):
    """A retry of each kind of call gets an answer equal to the first and counts nothing."""
    clock = FakeClock(LEGACY_AT)
    engine = Engine(fast_ledger, clock)
    first = first_calls(engine)
    figures = {t: engine.get_usage(t) for t in ("over", "hard")}
    clock.advance(HOUR)
    assert calls(engine) == first
    assert {t: engine.get_usage(t) for t in ("over", "hard")} == figures


def test_answers_stored_before_the_compact_form_are_replayed_after_upgrade(tmp_path: Path):
    """A ledger written by the previous release (answers stored as JSON): after the upgrade a
    retry of each kind of call gets the answer the previous release gave, and counts nothing."""
    path = tmp_path / "ledger.db"
    shutil.copy(LEGACY_LEDGER, path)
    answers = json.loads(LEGACY_ANSWERS.read_text())
    clock = FakeClock(LEGACY_AT + timedelta(hours=1))
    ledger = SQLiteLedger(path)
    ledger.open()
    try:
        engine = Engine(ledger, clock)
        figures = {t: engine.get_usage(t) for t in ("over", "hard")}
        assert {rpc: repr(outcome) for rpc, outcome in calls(engine).items()} == answers
        assert {t: engine.get_usage(t) for t in ("over", "hard")} == figures
    finally:
        ledger.close()


def test_answers_kept_before_the_upgrade_are_pruned_after_the_retention(tmp_path: Path):
    """Answers kept as JSON by the previous release are pruned like the others: past the request
    retention they are gone, and a call with one of their ids is a new call."""
    path = tmp_path / "ledger.db"
    shutil.copy(LEGACY_LEDGER, path)
    clock = FakeClock(LEGACY_AT + timedelta(hours=25))
    ledger = SQLiteLedger(path)
    ledger.open()
    try:
        engine = Engine(ledger, clock)
        assert engine.prune(Retention())["results"] == 6
        assert count(path, "request_results") == 0
        again = engine.check_send(SendRequest("over", "d", Channel.EMAIL, CAMPAIGN, request_id="send-1"))
        assert again.decision.reason is Reason.ALREADY_ACTIVE
    finally:
        ledger.close()


def count(path: Path, table: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def test_answers_are_replayed_within_the_request_retention_and_pruned_after_it(fast_ledger: SQLiteLedger):
    """api.md: a request_id is kept at least the request retention (24 hours by default), then
    pruned: a retry within it gets the first answer; after it, the call is new and counts again."""
    clock = FakeClock(LEGACY_AT)
    engine = Engine(fast_ledger, clock)
    first = first_calls(engine)
    figures = engine.get_usage("over")
    clock.advance(23 * HOUR)
    assert engine.prune(Retention()) == {"results": 0, "events": 0, "audit": 0}
    assert calls(engine) == first
    assert engine.get_usage("over") == figures
    clock.advance(2 * HOUR)
    assert engine.prune(Retention())["results"] == len(first)
    assert count(fast_ledger.path, "request_replies") == 0
    again = engine.check_send(SendRequest("over", "d", Channel.EMAIL, CAMPAIGN, request_id="send-1"))
    assert again.decision.reason is Reason.ALREADY_ACTIVE
    assert again.usage.sends == figures.sends + 1
    other = engine.check_send(SendRequest("over", "q", Channel.EMAIL, CAMPAIGN, request_id="batch-1"))
    assert other.decision.newly_active
    # the usage contexts only pruned answers took go too (an hour later, see CONTEXT_REFRESH_US)
    clock.advance(2 * HOUR)
    assert count(fast_ledger.path, "usage_contexts") == 2
    engine.prune(Retention())
    assert count(fast_ledger.path, "usage_contexts") == 1
    assert engine.check_send(SendRequest("over", "q", Channel.EMAIL, CAMPAIGN, request_id="batch-1")) == other


def test_the_request_retention_is_configurable(fast_ledger: SQLiteLedger):
    clock = FakeClock(LEGACY_AT)
    engine = Engine(fast_ledger, clock)
    first = first_calls(engine)
    hour = Retention(requests_us=HOUR * MICROS)
    clock.advance(HOUR - 1)
    assert engine.prune(hour)["results"] == 0
    assert calls(engine) == first
    clock.advance(2)
    assert engine.prune(hour)["results"] == len(first)


def test_pruning_deletes_in_small_transactions(tmp_path: Path):
    """More answers past the retention than one pruning transaction takes: several commits of at
    most PRUNE_ROWS rows each, and every answer gone."""
    commits: list[int] = []
    ledger = SQLiteLedger(tmp_path / "ledger.db", synchronous="NORMAL", on_commit=lambda s, u, ok: commits.append(u))
    ledger.open()
    try:
        clock = FakeClock(LEGACY_AT)
        engine = Engine(ledger, clock)
        engine.put_plan("t", overage_plan(10))
        n = 2 * PRUNE_ROWS + 500
        for i in range(n):
            engine.check_send(SendRequest("t", "a", Channel.EMAIL, CAMPAIGN, request_id=f"r{i}"))
        clock.advance(25 * HOUR)
        commits.clear()
        assert engine.prune(Retention())["results"] == n
        assert count(ledger.path, "request_replies") == 0
        assert len(commits) >= 3 + 2
    finally:
        ledger.close()


def test_events_and_audit_are_pruned_after_their_retention_and_undelivered_events_kept(
    fast_ledger: SQLiteLedger,
):
    """AC-1 events stay in the outbox until delivered: past --event-retention only events every
    durable consumer (the webhook) has delivered are pruned; audit rows past --audit-retention."""
    clock = FakeClock(LEGACY_AT)
    engine = Engine(fast_ledger, clock)
    engine.put_plan("over", overage_plan(2))
    engine.check_send(SendRequest("over", "a", Channel.EMAIL, CAMPAIGN))
    engine.check_send(SendRequest("over", "b", Channel.EMAIL, CAMPAIGN))
    engine.record_activity(ActivityRequest("over", ActivityKind.CONTACT_CREATED, ["c"]))
    crossed = engine.usage_events("over", 0, 100)
    assert [e.threshold for e in crossed] == [0.5, 1.0]
    audited = count(fast_ledger.path, "audit")
    assert audited >= 2
    fast_ledger.transact(lambda tx: tx.put_event_cursor(WEBHOOK, crossed[0].sequence))
    clock.advance(6 * 24 * HOUR)
    assert engine.prune(Retention(), (WEBHOOK,)) == {"results": 0, "events": 0, "audit": 0}
    clock.advance(2 * 24 * HOUR)
    engine.put_plan("over", overage_plan(4))
    assert engine.prune(Retention(), (WEBHOOK,))["events"] == 1
    assert engine.usage_events("over", 0, 100)[0] == crossed[1]
    fast_ledger.transact(lambda tx: tx.put_event_cursor(WEBHOOK, crossed[1].sequence))
    assert engine.prune(Retention(), (WEBHOOK,))["events"] == 1
    assert engine.usage_events("over", 0, 100) == []
    clock.advance(83 * 24 * HOUR)
    assert engine.prune(Retention())["audit"] == audited
    assert count(fast_ledger.path, "audit") == 1  # the later plan's
    assert engine.get_usage("over", to_us(LEGACY_AT)).active_contacts == 3


def test_without_a_webhook_events_are_pruned_by_age_alone(fast_ledger: SQLiteLedger):
    clock = FakeClock(LEGACY_AT)
    engine = Engine(fast_ledger, clock)
    engine.put_plan("over", overage_plan(2))
    engine.check_send(SendRequest("over", "a", Channel.EMAIL, CAMPAIGN))
    clock.advance(2 * HOUR)
    engine.check_send(SendRequest("over", "b", Channel.EMAIL, CAMPAIGN))
    kept = engine.usage_events("over", 0, 100)
    assert [e.at_us for e in kept] == [to_us(LEGACY_AT), clock.now_us()]
    assert engine.prune(Retention(events_us=HOUR * MICROS))["events"] == 1
    assert engine.usage_events("over", 0, 100) == kept[1:]


def test_the_sidecar_prunes_in_the_background(tmp_path: Path, clock: FakeClock):
    """quota-sidecar prunes every --prune-interval seconds with the configured retentions, and
    counts what it pruned in quota_ledger_pruned_rows_total."""
    running = start_sidecar(tmp_path / "ledger.db", clock, metrics=True, request_retention=HOUR, prune_interval=0.05)
    try:
        running.put_plan("t", preset="contact-limit", contact_limit=10)
        quota = running.quota()
        request = pb.CheckContactAddRequest(
            tenant_id="t", source=pb.CONTACT_SOURCE_API, contact_ids=["a"], request_id="r"
        )
        quota.CheckContactAdd(request, timeout=5)
        assert count(running.ledger_path, "request_replies") == 1
        clock.advance(HOUR + 1)
        deadline = time.monotonic() + 30
        while count(running.ledger_path, "request_replies") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count(running.ledger_path, "request_replies") == 0
        metrics = urllib.request.urlopen(running.metrics_url, timeout=5).read().decode()
        assert 'quota_ledger_pruned_rows_total{kind="results"} 1.0' in metrics
    finally:
        running.stop()


# -- a plan's notify_thresholds ------------------------------------------------------------------


def test_put_plan_with_too_many_notify_thresholds_is_invalid_and_stores_nothing(sidecar: RunningSidecar):
    """Each threshold crossed writes an event in the deciding call's transaction: a plan lists at
    most 10, more is INVALID_ARGUMENT naming notify_thresholds and changes nothing."""
    base = dict(preset="contact-limit", contact_limit=100)
    many = [round(0.05 * i, 2) for i in range(1, 12)]
    with pytest.raises(grpc.RpcError) as refused:
        sidecar.put_plan("new", notify_thresholds=many, **base)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "notify_thresholds" in refused.value.details()
    admin = sidecar.admin()
    with pytest.raises(grpc.RpcError) as missing:
        admin.GetPlan(pb.GetPlanRequest(tenant_id="new"), metadata=sidecar.auth, timeout=5)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    sidecar.put_plan("kept", notify_thresholds=many[:10], **base)
    with pytest.raises(grpc.RpcError) as again:
        sidecar.put_plan("kept", notify_thresholds=many, **base)
    assert again.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    kept = admin.GetPlan(pb.GetPlanRequest(tenant_id="kept"), metadata=sidecar.auth, timeout=5).plan
    assert list(kept.notify_thresholds) == many[:10]


def test_a_retention_that_is_not_positive_stops_the_start(tmp_path: Path) -> None:
    """The retentions come from flags or QUOTA_* variables; zero or less is refused before any port is bound."""
    command = [str(Path(sys.executable).parent / "quota-sidecar"), "serve", "--ledger", str(tmp_path / "l.db")]
    flagged = subprocess.run([*command, "--request-retention", "0"], capture_output=True, text=True, timeout=30)
    assert flagged.returncode == 2
    assert flagged.stderr.strip() == "quota-sidecar: --request-retention: must be positive"
    env = {**os.environ, "QUOTA_AUDIT_RETENTION": "-1"}
    from_env = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)
    assert from_env.returncode == 2
    assert from_env.stderr.strip() == "quota-sidecar: --audit-retention: must be positive"
    assert not (tmp_path / "l.db").exists()


def test_held_contact_sends_stay_verified_after_their_audit_rows_are_pruned(tmp_path: Path):
    """AC-6: under HELD_CONTACTS a send touches no contact row; its count is summed from the
    audit, which --audit-retention prunes. A tenant idle past the retention keeps the cycle
    of its last sends as its latest one: the sidecar must still start on that ledger, and
    verify must neither report nor "repair" the billed sends down to the audit rows left."""
    path = tmp_path / "ledger.db"
    clock = FakeClock(LEGACY_AT)
    ledger = SQLiteLedger(path, synchronous="NORMAL")
    ledger.open()
    try:
        engine = Engine(ledger, clock)
        engine.put_plan("held", PlanInput(preset="contact-limit", contact_limit=10, cycle_anchor_us=to_us(ANCHOR)))
        engine.check_contact_add(ContactAddRequest("held", ContactSource.API, ["a", "b"]))
        for contact_id in ("a", "b", "a"):
            assert engine.check_send(SendRequest("held", contact_id, Channel.EMAIL, CAMPAIGN)).decision.reason is (
                Reason.OK
            )
        assert engine.get_usage("held").sends == 3
        clock.advance(91 * 24 * HOUR)
        assert engine.prune(Retention())["audit"] > 0
    finally:
        ledger.close()
    report = verify_ledger(path, schema_version=SCHEMA_VERSION)
    assert report.mismatches == []
    assert verify_ledger(path, schema_version=SCHEMA_VERSION, repair_figures=True).mismatches == []
    again = SQLiteLedger(path, synchronous="NORMAL")
    again.open()
    try:
        assert Engine(again, clock).get_usage("held", to_us(LEGACY_AT)).sends == 3
    finally:
        again.close()
