"""The client library against the real sidecar over a real channel (fixture `sidecar`).

What is unreachable is real too: a port nobody listens on, a listener that never
answers, a stopped sidecar, and a gRPC proxy that loses the sidecar's answers.
Rule ids refer to domain.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
from collections.abc import Iterator
from concurrent import futures
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
import pytest

from quota_sidecar.api.v1 import quota_pb2
from quota_sidecar.client import (
    DEFAULT_ADMIN_TIMEOUT,
    DEFAULT_TIMEOUT,
    AsyncQuotaClient,
    BatchDecision,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Plan,
    QuotaClient,
    Retry,
    Unauthenticated,
    Unavailable,
)

from support.refusing_server import EAGER_RETRY

TENANT = "tenant-1"
PLAN = Plan(
    plan_name="P",
    metering="CYCLE_ACTIVE",
    enforcement="HARD",
    contact_limit=3,
    counted_kinds=("CAMPAIGN", "AUTOMATION"),
)
# Generous: these tests are about answers; test_default_deadlines_bound_every_call is about time.
TIMEOUT = 5.0
CHECK_CALLS = ("check_send", "check_send_batch", "check_contact_add", "check_enroll")


def _check(client: QuotaClient, name: str) -> tuple[Any, set[str]]:
    """Makes one check call; returns its result and the decisions in it."""
    calls = {
        "check_send": lambda: client.check_send(TENANT, "c1", "CAMPAIGN"),
        "check_send_batch": lambda: client.check_send_batch(TENANT, ["c1", "c2"], "CAMPAIGN"),
        "check_contact_add": lambda: client.check_contact_add(TENANT, ["c1"], "API"),
        "check_enroll": lambda: client.check_enroll(TENANT, "c1", "welcome"),
    }
    result = calls[name]()
    if isinstance(result, BatchDecision):
        return result, {entry.decision for entry in result.results}
    return result, {result.decision}


@pytest.fixture
def quota(sidecar) -> Iterator[QuotaClient]:
    """A client of a sidecar where TENANT has PLAN."""
    with QuotaClient(sidecar.address, admin_token=sidecar.admin_token, timeout=TIMEOUT) as client:
        client.put_plan(TENANT, PLAN)
        yield client


class SilentServer:
    """A real gRPC server that never answers: it notes the deadline each call arrived
    with (`context.time_remaining()`) and holds the call until that deadline passes."""

    def __init__(self) -> None:
        self.remaining: dict[str, float | None] = {}
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers([self])
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method.rsplit("/", 1)[-1]

        def hold(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.remaining[method] = context.time_remaining()
            done = threading.Event()
            context.add_callback(done.set)
            done.wait()
            return b""

        return grpc.unary_unary_rpc_method_handler(hold)


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server._server.stop(0)


@pytest.fixture
def lossy_proxy(proxies):
    """A proxy that loses the first `lose` answers to `method`."""
    return lambda method, lose: proxies(lose_method=method, lose=lose)


def test_put_plan_and_get_plan_speak_short_names(sidecar) -> None:
    with QuotaClient(sidecar.address, admin_token=sidecar.admin_token, timeout=TIMEOUT) as client:
        change = client.put_plan(TENANT, PLAN)
        assert change.plan.metering == "CYCLE_ACTIVE"
        assert change.plan.enforcement == "HARD"
        assert change.plan.counted_kinds == ("CAMPAIGN", "AUTOMATION")
        # A tenant's first plan without an anchor is anchored when it is stored.
        assert change.plan.cycle_anchor == sidecar.clock.now()
        assert change.usage is not None
        assert (change.usage.active_contacts, change.usage.contact_limit) == (0, 3)
        assert change.usage.cycle_start == sidecar.clock.now()
        assert isinstance(change.raw, quota_pb2.PutPlanResponse)

        plan = client.get_plan(TENANT)
        assert plan == change.plan
        assert isinstance(plan.raw, quota_pb2.Plan)
        assert plan.raw.metering == quota_pb2.METERING_CYCLE_ACTIVE

        raw = quota_pb2.Plan(plan_name="Q", metering=2, enforcement=1, contact_limit=5, counted_kinds=[1])
        assert client.put_plan(TENANT, raw).plan.contact_limit == 5


def test_check_send_counts_only_the_first_send_of_the_cycle_SG_8(quota: QuotaClient) -> None:
    first = quota.check_send(TENANT, "c1", "CAMPAIGN")
    assert (first.decision, first.reason, first.newly_active) == ("ALLOW", "NEW_CONTACT_COUNTED", True)
    assert first.fallback is False and first.error is None
    assert isinstance(first.raw, quota_pb2.CheckSendResponse)
    assert first.raw.decision == quota_pb2.DECISION_ALLOW
    assert first.usage is not None and (first.usage.active_contacts, first.usage.sends) == (1, 1)

    again = quota.check_send(TENANT, "c1", quota_pb2.MESSAGE_KIND_AUTOMATION, channel=quota_pb2.CHANNEL_EMAIL)
    assert (again.decision, again.reason, again.newly_active) == ("ALLOW", "ALREADY_ACTIVE", False)
    assert again.usage is not None and (again.usage.active_contacts, again.usage.sends) == (1, 2)

    # A repeated request_id gets the first answer and counts nothing more.
    first = quota.check_send(TENANT, "c2", "CAMPAIGN", request_id="send-c2")
    repeat = quota.check_send(TENANT, "c2", "CAMPAIGN", request_id="send-c2")
    assert (repeat.decision, repeat.reason, repeat.newly_active) == (first.decision, first.reason, True)
    assert quota.get_usage(TENANT).sends == 3


def test_hard_limit_denies_new_contacts_and_still_mails_active_ones_SG_2_SG_10(quota: QuotaClient) -> None:
    for contact in ("c1", "c2", "c3"):
        assert quota.check_send(TENANT, contact, "CAMPAIGN").decision == "ALLOW"
    denied = quota.check_send(TENANT, "c4", "CAMPAIGN")
    assert (denied.decision, denied.reason, denied.newly_active) == ("DENY", "CONTACT_LIMIT_REACHED", False)
    assert denied.fallback is False
    assert denied.usage is not None and denied.usage.active_contacts == 3
    assert quota.check_send(TENANT, "c1", "CAMPAIGN").reason == "ALREADY_ACTIVE"


def test_uncounted_kind_is_allowed_and_touches_no_figure(quota: QuotaClient) -> None:
    decision = quota.check_send(TENANT, "c1", "transactional")
    assert (decision.decision, decision.reason) == ("ALLOW", "NOT_COUNTED")
    assert decision.usage is not None and (decision.usage.active_contacts, decision.usage.sends) == (0, 0)


def test_automation_email_at_the_limit_waits_then_expires_AC_9(sidecar, quota: QuotaClient) -> None:
    for contact in ("c1", "c2", "c3"):
        quota.check_send(TENANT, contact, "CAMPAIGN")
    now = sidecar.clock.now()
    deferred = quota.check_send(TENANT, "c4", "AUTOMATION", queued_since=now - timedelta(hours=1))
    assert (deferred.decision, deferred.reason) == ("DEFER", "CONTACT_LIMIT_REACHED")
    assert isinstance(deferred.retry_after, timedelta) and deferred.retry_after > timedelta(0)

    expired = quota.check_send(TENANT, "c4", "AUTOMATION", queued_since=now - timedelta(hours=25))
    assert (expired.decision, expired.reason) == ("EXPIRED", "QUEUED_TOO_LONG")


def test_batch_is_decided_in_request_order_and_a_dry_run_counts_nothing_SG_5(quota: QuotaClient) -> None:
    ids = ["c1", "c2", "c3", "c4", "c1"]
    preflight = quota.check_send_batch(TENANT, ids, "CAMPAIGN", dry_run=True)
    assert [r.contact_id for r in preflight.results] == ids
    assert [r.decision for r in preflight.results] == ["ALLOW", "ALLOW", "ALLOW", "DENY", "ALLOW"]
    assert preflight.results[3].reason == "CONTACT_LIMIT_REACHED"
    assert preflight.results[4].newly_active is False
    assert (preflight.allowed, preflight.denied) == (4, 1)
    assert isinstance(preflight.raw, quota_pb2.CheckSendBatchResponse)
    assert quota.get_usage(TENANT).active_contacts == 0

    sent = quota.check_send_batch(TENANT, ids, "CAMPAIGN")
    assert sent.newly_active == 3
    assert sent.usage is not None and (sent.usage.active_contacts, sent.usage.sends) == (3, 3)


def test_record_activity_activates_whatever_the_limit_CR_1(sidecar, quota: QuotaClient) -> None:
    quota.put_plan(TENANT, dataclasses.replace(PLAN, counted_activities=["NOTE_ADDED"]))
    record = quota.record_activity(TENANT, ["c1", "c2"], "NOTE_ADDED", occurred_at=sidecar.clock.now())
    assert (record.recorded, record.newly_active) == (2, 2)
    assert isinstance(record.raw, quota_pb2.RecordActivityResponse)

    over = quota.record_activity(TENANT, ["c3", "c4"], "NOTE_ADDED")
    assert (over.recorded, over.newly_active) == (2, 2)
    assert over.usage is not None and over.usage.active_contacts == 4

    # CR-2: a contact counts once per cycle however much happens to it.
    again = quota.record_activity(TENANT, "c1", "NOTE_ADDED")
    assert (again.recorded, again.newly_active) == (1, 0)


def test_usage_resets_each_cycle_and_past_cycles_stay_readable_SG_7(sidecar, quota: QuotaClient) -> None:
    quota.check_send(TENANT, "c1", "CAMPAIGN")
    before = quota.get_usage(TENANT)
    assert before.active_contacts == 1 and before.state == "OK"
    assert before.cycle_start is not None and before.cycle_end is not None
    assert before.cycle_start <= sidecar.clock.now() < before.cycle_end
    assert isinstance(before.raw, quota_pb2.Usage)

    sidecar.clock.advance(timedelta(days=32).total_seconds())
    after = quota.get_usage(TENANT)
    assert after.active_contacts == 0
    assert after.cycle_start == before.cycle_end
    assert quota.get_usage(TENANT, cycle_start=before.cycle_start).active_contacts == 1


def test_upgrade_mid_cycle_raises_the_limit_at_once_SG_4(quota: QuotaClient) -> None:
    quota.check_send_batch(TENANT, ["c1", "c2", "c3"], "CAMPAIGN")
    assert quota.check_send(TENANT, "c4", "CAMPAIGN").decision == "DENY"
    change = quota.put_plan(TENANT, dataclasses.replace(PLAN, contact_limit=4))
    assert change.usage is not None and change.usage.contact_limit == 4
    assert quota.check_send(TENANT, "c4", "CAMPAIGN").decision == "ALLOW"


def test_get_contact_reports_activation(sidecar, quota: QuotaClient) -> None:
    quota.check_send(TENANT, "c1", "CAMPAIGN")
    contact = quota.get_contact(TENANT, "c1")
    assert (contact.tenant_id, contact.contact_id) == (TENANT, "c1")
    assert contact.active_this_cycle is True
    assert contact.activated_at == sidecar.clock.now()
    assert isinstance(contact.raw, quota_pb2.ContactState)

    with pytest.raises(NotFound):
        quota.get_contact(TENANT, "never-mailed")


def test_active_contacts_come_page_by_page_and_all_at_once(quota: QuotaClient) -> None:
    quota.check_send_batch(TENANT, ["c1", "c2", "c3"], "CAMPAIGN")
    page = quota.list_active_contacts(TENANT, page_size=2)
    assert len(page.contacts) == 2 and page.next_page_token
    assert isinstance(page.raw, quota_pb2.ListActiveContactsResponse)

    everyone = list(quota.iter_active_contacts(TENANT, page_size=2))
    assert sorted(contact.contact_id for contact in everyone) == ["c1", "c2", "c3"]
    assert all(contact.activated_at is not None and contact.activity for contact in everyone)


def test_check_contact_add_applies_each_source_policy_all_or_nothing_AC_2_to_AC_5_AC_7(quota: QuotaClient) -> None:
    """AC-2..AC-5, AC-7, AC-10: under the contact-limit preset an import past the limit is
    refused whole, a manual add once the limit is reached, while API and form adds go on
    into the 10% grace; `added` counts the contacts not held before."""
    quota.put_plan(TENANT, Plan(preset="contact-limit", plan_name="LITE", contact_limit=10))
    first = quota.check_contact_add(TENANT, [f"i{n}" for n in range(8)], "IMPORT")
    assert (first.decision, first.reason, first.added, first.fallback) == ("ALLOW", "OK", 8, False)
    assert isinstance(first.raw, quota_pb2.CheckContactAddResponse)
    assert first.usage is not None and (first.usage.active_contacts, first.usage.contact_limit) == (8, 10)

    refused = quota.check_contact_add(TENANT, ["i7", "i8", "i9", "i10"], "IMPORT")
    assert (refused.decision, refused.reason, refused.added) == ("DENY", "IMPORT_EXCEEDS_LIMIT", 0)
    assert refused.usage is not None and refused.usage.active_contacts == 8

    preview = quota.check_contact_add(TENANT, ["m1", "m2"], "MANUAL", dry_run=True)
    assert (preview.decision, preview.added) == ("ALLOW", 2)
    assert quota.get_usage(TENANT).active_contacts == 8
    manual = quota.check_contact_add(TENANT, ["m1", "m2"], "MANUAL")
    assert (manual.decision, manual.added) == ("ALLOW", 2)
    assert manual.usage is not None and manual.usage.state == "AT_LIMIT"
    blocked = quota.check_contact_add(TENANT, "m3", "MANUAL")
    assert (blocked.decision, blocked.reason, blocked.added) == ("DENY", "SOURCE_BLOCKED", 0)

    api = quota.check_contact_add(TENANT, ["i0", "a1"], "API")
    assert (api.decision, api.reason, api.added) == ("ALLOW", "OK", 1)
    assert api.usage is not None and (api.usage.active_contacts, api.usage.state) == (11, "IN_GRACE")
    form = quota.check_contact_add(TENANT, ["f1"], "FORM")
    assert (form.decision, form.added) == ("ALLOW", 1)
    assert form.usage is not None and (form.usage.active_contacts, form.usage.state) == (12, "BLOCKED")
    assert quota.get_contact(TENANT, "f1").marketing_source_type == "FORM"


def test_check_enroll_under_held_contacts_AC_7_AC_8_AC_10(quota: QuotaClient) -> None:
    """AC-7, AC-8, AC-10: a held contact may enter an automation up to the 10% grace, not past
    it, until contacts are deleted; a contact the tenant does not hold may not. Counts nothing."""
    quota.put_plan(TENANT, Plan(preset="contact-limit", contact_limit=10))
    quota.check_contact_add(TENANT, [f"c{n}" for n in range(11)], "API")
    enrolled = quota.check_enroll(TENANT, "c0", "welcome")
    assert (enrolled.decision, enrolled.reason, enrolled.fallback) == ("ALLOW", "OK", False)
    assert isinstance(enrolled.raw, quota_pb2.CheckEnrollResponse)
    assert enrolled.usage is not None and (enrolled.usage.active_contacts, enrolled.usage.state) == (11, "IN_GRACE")
    stranger = quota.check_enroll(TENANT, "nobody", "welcome")
    assert (stranger.decision, stranger.reason) == ("DENY", "UNKNOWN_CONTACT")

    quota.check_contact_add(TENANT, "c11", "API")
    over = quota.check_enroll(TENANT, "c0", "welcome")
    assert (over.decision, over.reason) == ("DENY", "OVER_GRACE")
    assert over.usage is not None and (over.usage.active_contacts, over.usage.state) == (12, "BLOCKED")

    quota.record_activity(TENANT, ["c10", "c11"], "CONTACT_DELETED")
    assert quota.check_enroll(TENANT, "c0", "welcome").decision == "ALLOW"
    assert quota.check_enroll(TENANT, "c11", "welcome").reason == "UNKNOWN_CONTACT"
    usage = quota.get_usage(TENANT)
    assert (usage.active_contacts, usage.peak_contacts, usage.sends) == (10, 12, 0)


def test_check_enroll_under_cycle_active_AC_8_SG_2(quota: QuotaClient) -> None:
    """AC-8, SG-2: under CYCLE_ACTIVE a contact active this cycle may always enter an
    automation, a new one only while the count is under the ceiling; enrolling counts nothing."""
    quota.check_send_batch(TENANT, ["c1", "c2"], "CAMPAIGN")
    assert (quota.check_enroll(TENANT, "c1", "welcome").reason, quota.get_usage(TENANT).sends) == ("ALREADY_ACTIVE", 2)
    fresh = quota.check_enroll(TENANT, "c3", "welcome")
    assert (fresh.decision, fresh.reason) == ("ALLOW", "OK")
    assert fresh.usage is not None and fresh.usage.active_contacts == 2
    quota.check_send(TENANT, "c3", "CAMPAIGN")
    full = quota.check_enroll(TENANT, "c4", "welcome")
    assert (full.decision, full.reason) == ("DENY", "CONTACT_LIMIT_REACHED")
    assert quota.check_enroll(TENANT, "c2", "welcome").decision == "ALLOW"
    usage = quota.get_usage(TENANT)
    assert (usage.active_contacts, usage.peak_contacts, usage.sends) == (3, 3, 3)


def test_get_invoice_bills_overage_in_exact_decimals_CR_3_CR_6_CR_7(sidecar, quota: QuotaClient) -> None:
    """CR-3, CR-6, CR-7: START includes 50 contacts; 53 active bill 3 x 0.25 = 0.75 EUR,
    monthly even on an annual plan; a past cycle keeps its invoice after an upgrade, and
    add-ons get their own line."""
    plan = Plan(preset="active-cycle-overage", plan_name="START", billing_interval="ANNUAL")
    assert quota.put_plan(TENANT, plan).plan.contact_limit == 50
    quota.record_activity(TENANT, [f"c{n}" for n in range(53)], "CONTACT_CREATED")

    invoice = quota.get_invoice(TENANT)
    assert isinstance(invoice.raw, quota_pb2.GetInvoiceResponse)
    assert [
        (line.description, line.quantity, line.unit_price, line.amount, line.currency) for line in invoice.lines
    ] == [
        ("Contacts included in the plan (START)", 50, Decimal("0.00"), Decimal("0.00"), "EUR"),
        ("Contacts active this cycle", 53, Decimal("0.00"), Decimal("0.00"), "EUR"),
        ("Overage contacts (annual plan, overage invoiced monthly)", 3, Decimal("0.25"), Decimal("0.75"), "EUR"),
    ]
    assert [line.raw.amount for line in invoice.lines] == ["0.00", "0.00", "0.75"]
    assert invoice.usage is not None
    assert (invoice.usage.overage_contacts, str(invoice.usage.overage_amount), invoice.usage.currency) == (
        3,
        "0.75",
        "EUR",
    )
    assert (invoice.usage.active_contacts, invoice.usage.peak_contacts, invoice.usage.state) == (53, 53, "IN_OVERAGE")

    past = invoice.usage.cycle_start
    sidecar.clock.advance(timedelta(days=32).total_seconds())
    quota.put_plan(TENANT, Plan(preset="active-cycle-overage", plan_name="GROW", addon_contacts=10))
    assert quota.get_invoice(TENANT, cycle_start=past).lines == invoice.lines
    current = quota.get_invoice(TENANT)
    assert [(line.description, line.quantity, line.amount) for line in current.lines] == [
        ("Contacts included in the plan (GROW)", 250, Decimal("0.00")),
        ("Add-on contacts", 10, Decimal("0.00")),
        ("Contacts active this cycle", 0, Decimal("0.00")),
        ("Overage contacts", 0, Decimal("0.00")),
    ]
    assert current.usage is not None and str(current.usage.overage_amount) == "0.00"


def test_marketing_contacts_plan_counts_and_bills_marketing_contacts_MK_1_MK_3_MK_5_MK_6(
    sidecar, quota: QuotaClient
) -> None:
    """MK-1, MK-3, MK-4, MK-5, MK-6, AC-10: only marketing contacts count; a contact set
    non-marketing keeps counting until the next cycle; overage is billed on the cycle's
    peak even after contacts are deleted."""
    plan = Plan(preset="marketing-contacts", contact_limit=2, overage_unit_price="10.00", currency="USD")
    change = quota.put_plan(TENANT, plan)
    assert (change.plan.marketing_contacts_only, change.plan.metering, change.plan.enforcement) == (
        True,
        "HELD_CONTACTS",
        "OVERAGE",
    )
    assert quota.get_plan(TENANT) == change.plan

    added = quota.check_contact_add(TENANT, ["m1", "m2", "m3"], "API")
    assert (added.decision, added.reason, added.added) == ("ALLOW", "OVERAGE", 3)
    free = quota.check_contact_add(TENANT, ["n1"], "IMPORT", marketing=False)
    assert (free.decision, free.reason, free.added) == ("ALLOW", "OK", 1)
    assert free.usage is not None and free.usage.active_contacts == 3
    assert quota.check_send(TENANT, "n1", "CAMPAIGN").reason == "NOT_MARKETING_CONTACT"
    assert quota.check_send(TENANT, "n1", "TRANSACTIONAL").reason == "NOT_COUNTED"

    quota.record_activity(
        TENANT, "m3", "MARKETING_STATUS_SET", marketing=False, source_type="WORKFLOW", source_id="wf-7"
    )
    m3 = quota.get_contact(TENANT, "m3")
    assert (m3.held, m3.marketing, m3.marketing_until_next_update) == (True, True, True)
    assert (m3.marketing_source_type, m3.marketing_source_id) == ("WORKFLOW", "wf-7")
    assert quota.check_send(TENANT, "m3", "CAMPAIGN").decision == "ALLOW"

    quota.record_activity(TENANT, ["m1", "m2"], "CONTACT_DELETED")
    usage = quota.get_usage(TENANT)
    assert (usage.active_contacts, usage.peak_contacts, usage.overage_contacts) == (1, 3, 1)
    assert (usage.overage_amount, usage.currency) == (Decimal("10.00"), "USD")
    assert quota.get_invoice(TENANT).lines[1].description == "Highest marketing contacts this cycle"

    sidecar.clock.advance(timedelta(days=32).total_seconds())
    m3 = quota.get_contact(TENANT, "m3")
    assert (m3.held, m3.marketing, m3.marketing_until_next_update) == (True, False, False)
    assert quota.get_usage(TENANT).active_contacts == 0
    assert quota.check_send(TENANT, "m3", "CAMPAIGN").reason == "NOT_MARKETING_CONTACT"


def test_bad_input_to_adds_enrolments_and_invoices_raises_never_falls_back(quota: QuotaClient) -> None:
    """AC-4, AC-8, CR-6: bad input and a tenant without a plan are errors the caller must
    fix, never a fail-open or fail-closed decision."""
    with pytest.raises(InvalidArgument, match="source"):
        quota.check_contact_add(TENANT, ["n1"], 0)
    with pytest.raises(InvalidArgument, match="contact_ids"):
        quota.check_contact_add(TENANT, [f"n{i}" for i in range(10_001)], "API")
    with pytest.raises(InvalidArgument, match="contact_id"):
        quota.check_enroll(TENANT, "", "welcome")
    for call in (
        lambda: quota.check_contact_add("no-such-tenant", ["n1"], "API"),
        lambda: quota.check_enroll("no-such-tenant", "n1", "welcome"),
        lambda: quota.get_invoice("no-such-tenant"),
    ):
        with pytest.raises(NotFound):
            call()
    usage = quota.get_usage(TENANT)
    assert (usage.active_contacts, usage.peak_contacts) == (0, 0)


def test_a_retried_contact_add_gets_the_first_answer_and_adds_once_AC_2(quota: QuotaClient, lossy_proxy) -> None:
    """AC-2, AC-4: when the answer to an add is lost and the client retries, the retry
    carries the same request_id, so the caller hears how many contacts its call added
    and the ledger holds them once; a dry run carries no id."""
    quota.put_plan(TENANT, Plan(preset="contact-limit", contact_limit=5))
    proxy = lossy_proxy("CheckContactAdd", lose=1)
    with QuotaClient(proxy.address, retries=Retry(attempts=3, backoff=0.01), timeout=TIMEOUT) as client:
        result = client.check_contact_add(TENANT, ["c1", "c2"], "IMPORT")
        client.check_contact_add(TENANT, ["c3"], "IMPORT", dry_run=True)
    assert (result.decision, result.added, result.fallback) == ("ALLOW", 2, False)
    first, retry, dry = proxy.sent("CheckContactAdd")
    assert len(first.request_id) == 32 and retry.request_id == first.request_id
    assert dry.request_id == ""
    assert quota.get_usage(TENANT).active_contacts == 2


def test_a_given_request_id_makes_a_repeated_add_harmless_AC_4(quota: QuotaClient) -> None:
    """AC-4: the caller's own request_id repeats the first answer, here a refused import,
    even after room was made, and adds nothing."""
    quota.put_plan(TENANT, Plan(preset="contact-limit", contact_limit=2))
    quota.check_contact_add(TENANT, ["c1", "c2"], "API")
    refused = quota.check_contact_add(TENANT, ["c3"], "IMPORT", request_id="import-7")
    assert (refused.decision, refused.reason) == ("DENY", "IMPORT_EXCEEDS_LIMIT")
    quota.record_activity(TENANT, "c1", "CONTACT_DELETED")
    again = quota.check_contact_add(TENANT, ["c3"], "IMPORT", request_id="import-7")
    assert (again.decision, again.reason, again.added) == ("DENY", "IMPORT_EXCEEDS_LIMIT", 0)
    assert quota.get_usage(TENANT).active_contacts == 1
    assert quota.check_contact_add(TENANT, ["c3"], "IMPORT").added == 1


@pytest.mark.parametrize("fail_mode, decision", [("closed", "DENY"), ("open", "ALLOW")])
def test_a_stopped_sidecar_falls_back_for_contact_adds_and_enrolments(sidecar, fail_mode: str, decision: str) -> None:
    """AC-2, AC-8: once the sidecar is gone, check_contact_add and check_enroll answer the
    client's fail mode, marked fallback, adding nothing; other calls raise Unavailable."""
    retry = Retry(attempts=2, backoff=0.01)
    with QuotaClient(
        sidecar.address, admin_token=sidecar.admin_token, timeout=TIMEOUT, retries=retry, fail_mode=fail_mode
    ) as client:
        client.put_plan(TENANT, Plan(preset="contact-limit", contact_limit=5))
        assert client.check_contact_add(TENANT, ["c1"], "API").added == 1
        assert client.check_enroll(TENANT, "c1", "welcome").fallback is False
        sidecar.stop()
        added = client.check_contact_add(TENANT, ["c2"], "API")
        assert (added.decision, added.reason, added.added, added.fallback) == (decision, "UNSPECIFIED", 0, True)
        assert isinstance(added.error, Unavailable) and added.usage is None and added.raw is None
        enrolled = client.check_enroll(TENANT, "c1", "welcome")
        assert (enrolled.decision, enrolled.fallback) == (decision, True)
        assert isinstance(enrolled.error, Unavailable) and enrolled.usage is None
        with pytest.raises(Unavailable):
            client.get_invoice(TENANT)


def test_server_errors_raise_typed_exceptions_with_the_servers_message(quota: QuotaClient) -> None:
    with pytest.raises(InvalidArgument) as bad:
        quota.check_send(TENANT, "", "CAMPAIGN")
    assert bad.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "contact_id" in bad.value.message
    assert isinstance(bad.value, ValueError)
    assert quota.get_usage(TENANT).active_contacts == 0

    with pytest.raises(NotFound) as missing:
        quota.check_send("no-such-tenant", "c1", "CAMPAIGN")
    assert "no-such-tenant" in missing.value.message and missing.value.code_name == "NOT_FOUND"
    with pytest.raises(NotFound):
        quota.get_usage("no-such-tenant")
    with pytest.raises(NotFound):
        quota.get_plan("no-such-tenant")


def test_arguments_the_client_cannot_send_raise_before_any_call(free_address: str) -> None:
    with QuotaClient(free_address, fail_mode="open") as client:
        with pytest.raises(InvalidArgument, match="kind"):
            client.check_send(TENANT, "c1", "LETTER")
        with pytest.raises(InvalidArgument, match="timezone"):
            client.check_send(TENANT, "c1", "AUTOMATION", queued_since=datetime(2025, 1, 1))


LONE_SURROGATE = "c\ud800"
# The field the client names, and a call with a lone surrogate (text that has no UTF-8
# form) in it; the same lambdas make the asyncio client's coroutines.
UNENCODABLE = [
    ("tenant_id", lambda c: c.check_send(LONE_SURROGATE, "c1", "CAMPAIGN")),
    ("contact_id", lambda c: c.check_send(TENANT, LONE_SURROGATE, "CAMPAIGN")),
    ("contact_id", lambda c: c.check_send(TENANT, LONE_SURROGATE, "CAMPAIGN", dry_run=True)),
    ("request_id", lambda c: c.check_send(TENANT, "c1", "CAMPAIGN", request_id=LONE_SURROGATE)),
    ("contact_ids[1]", lambda c: c.check_send_batch(TENANT, ["c1", LONE_SURROGATE], "CAMPAIGN")),
    ("contact_ids[0]", lambda c: c.check_contact_add(TENANT, [LONE_SURROGATE], "API")),
    ("contact_id", lambda c: c.check_enroll(TENANT, LONE_SURROGATE, "welcome")),
    ("automation_id", lambda c: c.check_enroll(TENANT, "c1", LONE_SURROGATE)),
    ("contact_ids[0]", lambda c: c.record_activity(TENANT, LONE_SURROGATE, "NOTE_ADDED")),
    ("source_id", lambda c: c.record_activity(TENANT, ["c1"], "NOTE_ADDED", source_id=LONE_SURROGATE)),
    ("tenant_id", lambda c: c.get_usage(LONE_SURROGATE)),
    ("plan.plan_name", lambda c: c.put_plan(TENANT, dataclasses.replace(PLAN, plan_name=LONE_SURROGATE))),
    ("tenant_id", lambda c: c.get_plan(LONE_SURROGATE)),
    ("contact_id", lambda c: c.get_contact(TENANT, LONE_SURROGATE)),
    ("page_token", lambda c: c.list_active_contacts(TENANT, page_token=LONE_SURROGATE)),
    ("tenant_id", lambda c: c.get_invoice(LONE_SURROGATE)),
]


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalescing", "plain"])
def test_text_without_a_utf8_form_is_invalid_argument_naming_the_field(free_address: str, coalesce: bool) -> None:
    """A lone surrogate in any string the client sends: InvalidArgument naming the field,
    raised before any call (nothing listens, and a check that went out would fall back)."""
    with QuotaClient(free_address, admin_token="token", fail_mode="open", coalesce=coalesce) as client:
        for field, call in UNENCODABLE:
            with pytest.raises(InvalidArgument) as caught:
                call(client)
            assert caught.value.message.startswith(f"{field}: "), (field, caught.value.message)
        with pytest.raises(InvalidArgument, match="^tenant_id: "):
            next(client.watch_usage_events(LONE_SURROGATE))


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalescing", "plain"])
def test_async_text_without_a_utf8_form_is_invalid_argument_naming_the_field(free_address: str, coalesce: bool) -> None:
    async def scenario() -> None:
        async with AsyncQuotaClient(free_address, admin_token="token", fail_mode="open", coalesce=coalesce) as client:
            for field, call in UNENCODABLE:
                with pytest.raises(InvalidArgument) as caught:
                    await call(client)
                assert caught.value.message.startswith(f"{field}: "), (field, caught.value.message)
            with pytest.raises(InvalidArgument, match="^tenant_id: "):
                await anext(client.watch_usage_events(LONE_SURROGATE))

    asyncio.run(scenario())


def test_admin_calls_need_the_admin_token(sidecar) -> None:
    with QuotaClient(sidecar.address, timeout=TIMEOUT) as anonymous:
        with pytest.raises(Unauthenticated) as caught:
            anonymous.put_plan(TENANT, PLAN)
        assert "authorization" in caught.value.message
    with QuotaClient(sidecar.address, admin_token="not-the-token", timeout=TIMEOUT) as impostor:
        with pytest.raises(PermissionDenied):
            impostor.get_plan(TENANT)
    with QuotaClient(sidecar.address, admin_token=sidecar.admin_token, timeout=TIMEOUT) as admin:
        admin.put_plan(TENANT, PLAN)
    with QuotaClient(sidecar.address, timeout=TIMEOUT) as worker:
        assert worker.check_send(TENANT, "c1", "CAMPAIGN").decision == "ALLOW"


@pytest.mark.parametrize("fail_mode, decision", [("closed", "DENY"), ("open", "ALLOW")])
@pytest.mark.parametrize("name", CHECK_CALLS)
def test_checks_fall_back_to_the_fail_mode_when_nothing_listens(
    free_address: str, fail_mode: str, decision: str, name: str
) -> None:
    with QuotaClient(free_address, fail_mode=fail_mode) as client:
        result, decisions = _check(client, name)
    assert decisions == {decision}
    assert result.fallback is True
    assert isinstance(result.error, Unavailable)
    assert result.usage is None and result.raw is None


def test_fallback_batch_answers_every_contact(free_address: str) -> None:
    with QuotaClient(free_address, fail_mode="open") as client:
        batch = client.check_send_batch(TENANT, ["c1", "c2", "c1"], "CAMPAIGN")
    assert [(r.contact_id, r.decision) for r in batch.results] == [("c1", "ALLOW"), ("c2", "ALLOW"), ("c1", "ALLOW")]
    assert (batch.allowed, batch.denied, batch.newly_active) == (3, 0, 0)


def test_calls_other_than_checks_raise_unavailable(free_address: str) -> None:
    with QuotaClient(free_address, admin_token="token", fail_mode="open") as client:
        calls = [
            lambda: client.record_activity(TENANT, ["c1"], "NOTE_ADDED"),
            lambda: client.get_usage(TENANT),
            lambda: client.put_plan(TENANT, PLAN),
            lambda: client.get_plan(TENANT),
            lambda: client.get_contact(TENANT, "c1"),
            lambda: client.list_active_contacts(TENANT),
            lambda: list(client.iter_active_contacts(TENANT)),
            lambda: client.get_invoice(TENANT),
        ]
        for call in calls:
            with pytest.raises(Unavailable) as caught:
                call()
            assert caught.value.code is grpc.StatusCode.UNAVAILABLE


def test_a_stopped_sidecar_falls_back_closed(sidecar) -> None:
    with QuotaClient(sidecar.address, admin_token=sidecar.admin_token, timeout=TIMEOUT) as client:
        client.put_plan(TENANT, PLAN)
        assert client.check_send(TENANT, "c1", "CAMPAIGN").fallback is False
        sidecar.stop()
        decision = client.check_send(TENANT, "c2", "CAMPAIGN")
        assert (decision.decision, decision.fallback) == ("DENY", True)
        with pytest.raises(Unavailable):
            client.get_usage(TENANT)


def test_default_deadlines_bound_every_call(silent_server: SilentServer) -> None:
    """Every call carries a deadline: the data-plane default, the admin one, or the per-call
    override, as the server sees it arrive (gRPC may round it up by a fraction of a millisecond)."""
    assert (DEFAULT_TIMEOUT, DEFAULT_ADMIN_TIMEOUT) == (0.1, 5.0)
    slack = 0.005
    with QuotaClient(silent_server.address, admin_timeout=0.07, retries=0) as client:
        assert (client.timeout, client.admin_timeout) == (0.1, 0.07)

        decision = client.check_send(TENANT, "c1", "CAMPAIGN")
        assert (decision.decision, decision.fallback) == ("DENY", True)
        assert isinstance(decision.error, DeadlineExceeded)
        with pytest.raises(DeadlineExceeded):
            client.get_plan(TENANT)
        with pytest.raises(DeadlineExceeded):
            client.get_usage(TENANT, timeout=0.04)

    sent = silent_server.remaining
    assert sent["CheckSend"] is not None and sent["CheckSend"] <= DEFAULT_TIMEOUT + slack
    assert sent["GetPlan"] is not None and sent["GetPlan"] <= 0.07 + slack
    assert sent["GetUsage"] is not None and sent["GetUsage"] <= 0.04 + slack


def test_retries_are_bounded_in_attempts_and_time(quota: QuotaClient, lossy_proxy) -> None:
    proxy = lossy_proxy("CheckSend", lose=100)
    retry = Retry(attempts=4, backoff=0.01, max_elapsed=1.0)
    with QuotaClient(proxy.address, retries=retry, timeout=TIMEOUT) as client:
        decision = client.check_send(TENANT, "c1", "CAMPAIGN")
    assert (decision.decision, decision.fallback) == ("DENY", True)
    assert len(proxy.sent("CheckSend")) == 4

    rng = random.Random(7)
    bounded = Retry(attempts=50, backoff=0.2, max_elapsed=0.3)
    assert bounded.pause(1, elapsed=0.0, rng=rng) is not None
    assert bounded.pause(2, elapsed=0.3, rng=rng) is None
    assert all((p := bounded.pause(n, elapsed=0.1, rng=rng)) is None or 0.1 + p < 0.3 for n in range(1, 50))
    assert Retry(attempts=4).pause(4, elapsed=0.0, rng=rng) is None


@pytest.mark.parametrize("coalesce", [False, True], ids=["plain", "coalescing"])
def test_the_timeout_bounds_the_whole_call_retries_and_fallback_included(refusing_server, coalesce: bool) -> None:
    """A server answering UNAVAILABLE after 80 ms: check_send(timeout=0.1) makes only the
    attempts its one deadline holds, each sent with what remains, then falls back."""
    with QuotaClient(refusing_server.address, retries=EAGER_RETRY, coalesce=coalesce) as client:
        decision = client.check_send(TENANT, "c1", "CAMPAIGN", timeout=0.1)
        assert (decision.decision, decision.fallback) == ("DENY", True)
        assert isinstance(decision.error, Unavailable)
        batch = client.check_send_batch(TENANT, ["c1", "c2"], "CAMPAIGN", timeout=0.1)
        assert batch.fallback is True
        with pytest.raises(Unavailable):
            client.record_activity(TENANT, ["c1"], "NOTE_ADDED", timeout=0.1)
    assert len(refusing_server.calls()) == 3
    refusing_server.assert_each_call_kept_one_deadline(0.1)


@pytest.mark.parametrize("coalesce", [False, True], ids=["plain", "coalescing"])
def test_the_async_timeout_bounds_the_whole_call_retries_and_fallback_included(refusing_server, coalesce: bool) -> None:
    async def scenario() -> None:
        async with AsyncQuotaClient(refusing_server.address, retries=EAGER_RETRY, coalesce=coalesce) as client:
            decision = await client.check_send(TENANT, "c1", "CAMPAIGN", timeout=0.1)
            assert (decision.decision, decision.fallback) == ("DENY", True)
            assert isinstance(decision.error, Unavailable)
            batch = await client.check_send_batch(TENANT, ["c1", "c2"], "CAMPAIGN", timeout=0.1)
            assert batch.fallback is True
            with pytest.raises(Unavailable):
                await client.record_activity(TENANT, ["c1"], "NOTE_ADDED", timeout=0.1)

    asyncio.run(scenario())
    assert len(refusing_server.calls()) == 3
    refusing_server.assert_each_call_kept_one_deadline(0.1)


@pytest.mark.parametrize(
    "method, call, counted",
    [
        ("CheckSend", lambda c: c.check_send(TENANT, "c1", "CAMPAIGN"), (1, 1)),
        ("CheckSendBatch", lambda c: c.check_send_batch(TENANT, ["c1", "c2"], "CAMPAIGN"), (2, 2)),
        ("RecordActivity", lambda c: c.record_activity(TENANT, ["c1", "c2"], "NOTE_ADDED"), (2, 0)),
    ],
)
def test_a_retried_call_counts_once_SG_8(quota: QuotaClient, lossy_proxy, method, call, counted) -> None:
    quota.put_plan(TENANT, dataclasses.replace(PLAN, counted_activities=["NOTE_ADDED"]))
    proxy = lossy_proxy(method, lose=1)
    with QuotaClient(proxy.address, retries=Retry(attempts=3, backoff=0.01), timeout=TIMEOUT) as client:
        result = call(client)
    assert getattr(result, "fallback", False) is False
    sent = proxy.sent(method)
    assert len(sent) == 2
    assert sent[0].request_id and sent[0].request_id == sent[1].request_id
    usage = quota.get_usage(TENANT)
    assert (usage.active_contacts, usage.sends) == counted


def test_dry_runs_carry_no_request_id(quota: QuotaClient, lossy_proxy) -> None:
    proxy = lossy_proxy("CheckSend", lose=0)
    with QuotaClient(proxy.address, timeout=TIMEOUT) as client:
        client.check_send(TENANT, "c1", "CAMPAIGN", dry_run=True)
        client.check_send(TENANT, "c1", "CAMPAIGN")
    dry, real = proxy.sent("CheckSend")
    assert dry.request_id == "" and len(real.request_id) == 32


# The first send crosses its threshold (1 of 3 contacts): one usage event to watch.
WATCHED_PLAN = dataclasses.replace(PLAN, notify_thresholds=(0.3,))


@pytest.mark.parametrize("sidecar_state", ["streaming", "stopped"])
def test_closing_the_client_ends_a_running_watch_cleanly(sidecar, sidecar_state: str) -> None:
    """close() under a thread iterating watch_usage_events, while the stream is open or
    while the watch dials a stopped sidecar again: the iterator just ends, nothing raised."""
    client = QuotaClient(sidecar.address, admin_token=sidecar.admin_token, timeout=TIMEOUT)
    client.put_plan(TENANT, WATCHED_PLAN)
    first_event = threading.Event()
    events: list[Any] = []
    ended: list[BaseException | None] = []

    def watch() -> None:
        try:
            for event in client.watch_usage_events(TENANT):
                events.append(event)
                first_event.set()
        except BaseException as exc:
            ended.append(exc)
        else:
            ended.append(None)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    client.check_send(TENANT, "c1", "CAMPAIGN")
    assert first_event.wait(TIMEOUT)
    if sidecar_state == "stopped":
        sidecar.stop()
    client.close()
    watcher.join(TIMEOUT)
    assert ended == [None]
    assert [(event.type, event.threshold) for event in events] == [("THRESHOLD_CROSSED", 0.3)]
    assert list(client.watch_usage_events(TENANT)) == []


@pytest.mark.parametrize("sidecar_state", ["streaming", "stopped"])
def test_closing_the_async_client_ends_a_running_watch_cleanly(sidecar, sidecar_state: str) -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        client = AsyncQuotaClient(sidecar.address, admin_token=sidecar.admin_token, timeout=TIMEOUT)
        await client.put_plan(TENANT, WATCHED_PLAN)
        first_event = asyncio.Event()
        events: list[Any] = []

        async def watch() -> None:
            async for event in client.watch_usage_events(TENANT):
                events.append(event)
                first_event.set()

        watcher = asyncio.create_task(watch())
        await client.check_send(TENANT, "c1", "CAMPAIGN")
        await asyncio.wait_for(first_event.wait(), TIMEOUT)
        if sidecar_state == "stopped":
            await asyncio.to_thread(sidecar.stop)
        await client.close()
        await asyncio.wait_for(watcher, TIMEOUT)
        return events, [event async for event in client.watch_usage_events(TENANT)]

    events, after_close = asyncio.run(scenario())
    assert [(event.type, event.threshold) for event in events] == [("THRESHOLD_CROSSED", 0.3)]
    assert after_close == []


def test_async_client_makes_every_call(sidecar) -> None:
    async def scenario() -> None:
        async with AsyncQuotaClient(sidecar.address, admin_token=sidecar.admin_token, timeout=TIMEOUT) as client:
            change = await client.put_plan(TENANT, dataclasses.replace(PLAN, counted_activities=["NOTE_ADDED"]))
            assert change.plan.plan_name == "P"
            assert (await client.get_plan(TENANT)).contact_limit == 3

            decision = await client.check_send(TENANT, "c1", "CAMPAIGN")
            assert (decision.decision, decision.reason, decision.fallback) == ("ALLOW", "NEW_CONTACT_COUNTED", False)
            batch = await client.check_send_batch(TENANT, ["c1", "c2"], "CAMPAIGN", dry_run=True)
            assert [r.reason for r in batch.results] == ["ALREADY_ACTIVE", "NEW_CONTACT_COUNTED"]
            record = await client.record_activity(TENANT, ["c2"], "NOTE_ADDED")
            assert record.newly_active == 1

            usage = await client.get_usage(TENANT)
            assert (usage.active_contacts, usage.sends) == (2, 1)
            assert (await client.get_contact(TENANT, "c2")).active_this_cycle is True
            page = await client.list_active_contacts(TENANT, page_size=1)
            assert len(page.contacts) == 1 and page.next_page_token
            everyone = [contact.contact_id async for contact in client.iter_active_contacts(TENANT, page_size=1)]
            assert sorted(everyone) == ["c1", "c2"]

            with pytest.raises(NotFound):
                await client.get_usage("no-such-tenant")
            with pytest.raises(InvalidArgument):
                await client.check_send(TENANT, "", "CAMPAIGN")

    asyncio.run(scenario())


def test_async_client_adds_enrolls_and_invoices_AC_4_AC_8_CR_6(sidecar) -> None:
    """AC-4, AC-8, CR-6, MK-1, AC-10: the asyncio client returns the same typed results as the
    blocking one for contact adds, enrolments, invoices and the new plan and usage fields; the
    contacts behind the peak include the deleted one, with when it stopped counting."""

    async def scenario() -> None:
        async with AsyncQuotaClient(sidecar.address, admin_token=sidecar.admin_token, timeout=TIMEOUT) as client:
            change = await client.put_plan(TENANT, Plan(preset="contact-limit", plan_name="LITE", contact_limit=3))
            assert (change.plan.metering, change.plan.grace_percent) == ("HELD_CONTACTS", 10)
            assert change.plan.marketing_contacts_only is False

            first = await client.check_contact_add(TENANT, ["c1", "c2"], "IMPORT", request_id="import-1")
            assert (first.decision, first.reason, first.added, first.fallback) == ("ALLOW", "OK", 2, False)
            repeat = await client.check_contact_add(TENANT, ["c1", "c2"], "IMPORT", request_id="import-1")
            assert (repeat.decision, repeat.added) == ("ALLOW", 2)
            refused = await client.check_contact_add(TENANT, ["c3", "c4"], "IMPORT")
            assert (refused.decision, refused.reason, refused.added) == ("DENY", "IMPORT_EXCEEDS_LIMIT", 0)
            preview = await client.check_contact_add(TENANT, ["c3", "c4"], "API", dry_run=True)
            assert preview.usage is not None and preview.usage.active_contacts == 4
            api = await client.check_contact_add(TENANT, ["c3", "c4"], "API")
            assert api.usage is not None and (api.usage.active_contacts, api.usage.state) == (4, "BLOCKED")

            enrolled = await client.check_enroll(TENANT, "c1", "welcome")
            assert (enrolled.decision, enrolled.reason) == ("DENY", "OVER_GRACE")
            await client.record_activity(TENANT, ["c4"], "CONTACT_DELETED")
            enrolled = await client.check_enroll(TENANT, "c1", "welcome")
            assert (enrolled.decision, enrolled.reason) == ("ALLOW", "OK")

            usage = await client.get_usage(TENANT)
            assert (usage.active_contacts, usage.peak_contacts, usage.overage_contacts) == (3, 4, 1)
            invoice = await client.get_invoice(TENANT)
            assert [(line.description, line.quantity, line.amount) for line in invoice.lines] == [
                ("Contacts included in the plan (LITE)", 3, Decimal("0.00")),
                ("Highest contacts held this cycle", 4, Decimal("0.00")),
                ("Overage contacts", 1, Decimal("0.00")),
            ]
            held = [contact async for contact in client.iter_active_contacts(TENANT)]
            assert [(c.contact_id, c.activity) for c in held] == [(c, "HELD_CONTACT") for c in ("c1", "c2", "c3", "c4")]
            assert [c.contact_id for c in held if c.counted_until is not None] == ["c4"]

            with pytest.raises(InvalidArgument, match="source"):
                await client.check_contact_add(TENANT, ["c5"], 99)
            with pytest.raises(NotFound):
                await client.check_enroll("no-such-tenant", "c1", "welcome")
            with pytest.raises(NotFound):
                await client.get_invoice("no-such-tenant")

    asyncio.run(scenario())


@pytest.mark.parametrize("fail_mode, decision", [("closed", "DENY"), ("open", "ALLOW")])
def test_async_client_falls_back_to_the_fail_mode(free_address: str, fail_mode: str, decision: str) -> None:
    async def scenario() -> None:
        async with AsyncQuotaClient(free_address, fail_mode=fail_mode) as client:
            batch = await client.check_send_batch(TENANT, ["c1", "c2"], "CAMPAIGN")
            assert batch.fallback is True
            assert [entry.decision for entry in batch.results] == [decision, decision]
            for result in (
                await client.check_send(TENANT, "c1", "CAMPAIGN"),
                await client.check_contact_add(TENANT, ["c1"], "API"),
                await client.check_enroll(TENANT, "c1", "welcome"),
            ):
                assert (result.decision, result.fallback) == (decision, True)
            with pytest.raises(Unavailable):
                await client.get_usage(TENANT)

    asyncio.run(scenario())


def test_client_settings_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="fail_mode"):
        QuotaClient("127.0.0.1:1", fail_mode="maybe")
    with pytest.raises(ValueError, match="timeout"):
        QuotaClient("127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="retries"):
        QuotaClient("127.0.0.1:1", retries=-1)
    assert QuotaClient("127.0.0.1:1", retries=0).retry.attempts == 1
