"""The four billing models of domain.md end to end, over a real gRPC channel and a real SQLite ledger.

Each scenario stores the tenant's plan with the model's preset (PutPlan) and walks through the model's
rules in the order its seed document gives them: model 1 `contact-limit` (seed 000), model 2
`active-cycle-hard` (seeds 001, 002), model 3 `active-cycle-overage` (seed 003), model 4
`marketing-contacts` (seed 004). Time is the only fake: the FakeClock starts 2026-03-10 12:00 UTC, which
is where a tenant's first plan anchors its monthly cycles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.server.domain.clock import FakeClock

from support.sidecar import START, RunningSidecar, start_sidecar

TENANT = "acme"
NEXT_CYCLE = datetime(2026, 4, 10, 12, 0, tzinfo=UTC)
THIRD_CYCLE = datetime(2026, 5, 10, 12, 0, tzinfo=UTC)


def ids(prefix: str, first: int, last: int) -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(first, last + 1)]


def send(
    s: RunningSidecar,
    contact: str,
    kind: int = pb.MESSAGE_KIND_CAMPAIGN,
    channel: int = pb.CHANNEL_EMAIL,
    queued_since: datetime | None = None,
) -> pb.CheckSendResponse:
    request = pb.CheckSendRequest(tenant_id=TENANT, contact_id=contact, channel=channel, kind=kind)
    if queued_since is not None:
        request.queued_since.FromDatetime(queued_since)
    return s.quota().CheckSend(request, timeout=10)


def send_batch(
    s: RunningSidecar, contacts: list[str], kind: int = pb.MESSAGE_KIND_CAMPAIGN, *, dry_run: bool = False
) -> pb.CheckSendBatchResponse:
    request = pb.CheckSendBatchRequest(
        tenant_id=TENANT, channel=pb.CHANNEL_EMAIL, kind=kind, contact_ids=contacts, dry_run=dry_run
    )
    return s.quota().CheckSendBatch(request, timeout=10)


def add_contacts(
    s: RunningSidecar, source: int, contacts: list[str], *, marketing: bool | None = None
) -> pb.CheckContactAddResponse:
    request = pb.CheckContactAddRequest(tenant_id=TENANT, source=source, contact_ids=contacts)
    if marketing is not None:
        request.marketing = marketing
    return s.quota().CheckContactAdd(request, timeout=10)


def record(s: RunningSidecar, kind: int, contacts: list[str], **fields: object) -> pb.RecordActivityResponse:
    request = pb.RecordActivityRequest(tenant_id=TENANT, kind=kind, contact_ids=contacts, **fields)
    return s.quota().RecordActivity(request, timeout=30)


def enroll(s: RunningSidecar, contact: str) -> pb.CheckEnrollResponse:
    request = pb.CheckEnrollRequest(tenant_id=TENANT, contact_id=contact, automation_id="welcome-series")
    return s.quota().CheckEnroll(request, timeout=10)


def usage(s: RunningSidecar, cycle: datetime | None = None) -> pb.Usage:
    request = pb.GetUsageRequest(tenant_id=TENANT)
    if cycle is not None:
        request.cycle_start.FromDatetime(cycle)
    return s.quota().GetUsage(request, timeout=10).usage


def invoice(s: RunningSidecar, cycle: datetime | None = None) -> pb.GetInvoiceResponse:
    request = pb.GetInvoiceRequest(tenant_id=TENANT)
    if cycle is not None:
        request.cycle_start.FromDatetime(cycle)
    return s.admin().GetInvoice(request, metadata=s.auth, timeout=10)


def invoice_lines(response: pb.GetInvoiceResponse) -> list[tuple[str, int, str, str, str]]:
    return [(x.description, x.quantity, x.unit_price, x.amount, x.currency) for x in response.lines]


def contact(s: RunningSidecar, contact_id: str) -> pb.ContactState:
    request = pb.GetContactRequest(tenant_id=TENANT, contact_id=contact_id)
    return s.admin().GetContact(request, metadata=s.auth, timeout=10).contact


def plan(s: RunningSidecar) -> pb.Plan:
    return s.admin().GetPlan(pb.GetPlanRequest(tenant_id=TENANT), metadata=s.auth, timeout=10).plan


def listed(s: RunningSidecar, cycle: datetime | None = None, page_size: int = 1000) -> list[pb.ActiveContact]:
    request = pb.ListActiveContactsRequest(tenant_id=TENANT, page_size=page_size)
    if cycle is not None:
        request.cycle_start.FromDatetime(cycle)
    return list(s.admin().ListActiveContacts(request, metadata=s.auth, timeout=10).contacts)


def listed_ids(s: RunningSidecar, cycle: datetime | None = None) -> list[str]:
    return [c.contact_id for c in listed(s, cycle)]


def figures(u: pb.Usage) -> tuple[int, int, int, int, str, int]:
    """active, peak, state, overage contacts, overage amount, sends."""
    return (u.active_contacts, u.peak_contacts, u.state, u.overage_contacts, u.overage_amount, u.sends)


def at(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def status_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@contextmanager
def restarted(running: RunningSidecar) -> Iterator[RunningSidecar]:
    """Stops the sidecar and starts a new one on the same ledger and clock."""
    running.stop()
    again = start_sidecar(running.ledger_path, running.clock, ledger=running.ledger_url)
    try:
        yield again
    finally:
        again.stop()


class Readings(NamedTuple):
    """Everything a dashboard or billing job reads about the tenant now, and of one past cycle if asked."""

    usage: pb.Usage
    invoice: pb.GetInvoiceResponse
    listed: list[pb.ActiveContact]
    plan: pb.Plan
    past_usage: pb.Usage | None = None
    past_invoice: pb.GetInvoiceResponse | None = None


def readings(s: RunningSidecar, past: datetime | None = None) -> Readings:
    return Readings(
        usage(s),
        invoice(s),
        listed(s),
        plan(s),
        usage(s, past) if past is not None else None,
        invoice(s, past) if past is not None else None,
    )


# -- model 1: contacts held, channel rules (seed 000, ActiveCampaign) ------------------------------


def put_contact_limit(s: RunningSidecar, limit: int = 10) -> pb.PutPlanResponse:
    return s.put_plan(TENANT, preset="contact-limit", plan_name="Lite", contact_limit=limit)


def test_model1_reminder_figures_and_each_source_at_the_limit(sidecar: RunningSidecar) -> None:
    """AC-1: the preset's notify thresholds (0.9, 1.0) and 15-day renotify are in GetPlan and the state turns
    WARNING at 0.9 of the limit; the plan is never upgraded by the sidecar.
    AC-2: API adds are accepted past the limit. AC-3: form sign-ups are accepted past the limit.
    AC-4: an import that would pass the limit is refused whole (nothing of it is added).
    AC-5: adding a contact by hand is refused once the limit is reached."""
    stored = put_contact_limit(sidecar)
    assert stored.usage.contact_limit == 10 and stored.usage.state == pb.USAGE_STATE_OK
    p = plan(sidecar)
    assert (p.metering, p.enforcement, p.grace_percent) == (pb.METERING_HELD_CONTACTS, pb.ENFORCEMENT_GRACE, 10)
    assert list(p.notify_thresholds) == [0.9, 1.0]
    assert p.renotify_interval.ToTimedelta() == timedelta(days=15)
    assert p.max_queue.ToTimedelta() == timedelta(hours=24)
    assert list(p.counted_kinds) == [pb.MESSAGE_KIND_CAMPAIGN, pb.MESSAGE_KIND_AUTOMATION]
    assert {(r.source, r.policy) for r in p.source_rules} == {
        (pb.CONTACT_SOURCE_API, pb.SOURCE_POLICY_OVER_LIMIT_ALLOWED),
        (pb.CONTACT_SOURCE_FORM, pb.SOURCE_POLICY_OVER_LIMIT_ALLOWED),
        (pb.CONTACT_SOURCE_IMPORT, pb.SOURCE_POLICY_REFUSE_IF_EXCEEDS),
        (pb.CONTACT_SOURCE_MANUAL, pb.SOURCE_POLICY_BLOCKED_AT_LIMIT),
    }

    imported = add_contacts(sidecar, pb.CONTACT_SOURCE_IMPORT, ids("c", 1, 8))
    assert (imported.decision, imported.reason, imported.added) == (pb.DECISION_ALLOW, pb.REASON_OK, 8)
    assert (imported.usage.active_contacts, imported.usage.state) == (8, pb.USAGE_STATE_OK)
    by_hand = add_contacts(sidecar, pb.CONTACT_SOURCE_MANUAL, ["c09"])
    assert (by_hand.decision, by_hand.added) == (pb.DECISION_ALLOW, 1)
    assert by_hand.usage.active_contacts == 9 and by_hand.usage.usage_ratio == pytest.approx(0.9)
    assert by_hand.usage.state == pb.USAGE_STATE_WARNING

    too_big = add_contacts(sidecar, pb.CONTACT_SOURCE_IMPORT, ["c01", "c10", "c11"])
    assert (too_big.decision, too_big.reason, too_big.added) == (pb.DECISION_DENY, pb.REASON_IMPORT_EXCEEDS_LIMIT, 0)
    assert too_big.usage.active_contacts == 9
    assert status_of(lambda: contact(sidecar, "c10")).code() == grpc.StatusCode.NOT_FOUND
    fits = add_contacts(sidecar, pb.CONTACT_SOURCE_IMPORT, ["c01", "c10"])
    assert (fits.decision, fits.reason, fits.added) == (pb.DECISION_ALLOW, pb.REASON_OK, 1)
    assert (fits.usage.active_contacts, fits.usage.state) == (10, pb.USAGE_STATE_AT_LIMIT)

    manual = add_contacts(sidecar, pb.CONTACT_SOURCE_MANUAL, ["c11"])
    assert (manual.decision, manual.reason, manual.added) == (pb.DECISION_DENY, pb.REASON_SOURCE_BLOCKED, 0)
    one_more_import = add_contacts(sidecar, pb.CONTACT_SOURCE_IMPORT, ["c11"])
    assert (one_more_import.decision, one_more_import.reason) == (pb.DECISION_DENY, pb.REASON_IMPORT_EXCEEDS_LIMIT)
    assert usage(sidecar).active_contacts == 10

    api = add_contacts(sidecar, pb.CONTACT_SOURCE_API, ["c11"])
    assert (api.decision, api.reason, api.added) == (pb.DECISION_ALLOW, pb.REASON_OK, 1)
    assert (api.usage.active_contacts, api.usage.state) == (11, pb.USAGE_STATE_IN_GRACE)
    form = add_contacts(sidecar, pb.CONTACT_SOURCE_FORM, ["c12"])
    assert (form.decision, form.reason, form.added) == (pb.DECISION_ALLOW, pb.REASON_OK, 1)
    assert (form.usage.active_contacts, form.usage.peak_contacts) == (12, 12)

    assert [contact(sidecar, c).marketing_source_type for c in ("c01", "c09", "c11", "c12")] == [
        "IMPORT",
        "MANUAL",
        "API",
        "FORM",
    ]
    assert contact(sidecar, "c12").held
    assert plan(sidecar).contact_limit == 10
    held = listed(sidecar)
    assert [c.contact_id for c in held] == ids("c", 1, 12)
    assert {c.activity for c in held} == {"HELD_CONTACT"}
    assert {at(c.activated_at) for c in held} == {START}


def test_model1_campaigns_and_automations_stop_past_the_grace(sidecar: RunningSidecar, clock: FakeClock) -> None:
    """AC-6: campaigns stop once the limit is passed, until the plan is upgraded (a tenant holding exactly its
    limit still sends). AC-7: 10% grace: at limit + grace campaigns, automation mail and enrolments still go;
    one more API add blocks them (OVER_GRACE). AC-8: CheckEnroll refuses past the grace and for unknown
    contacts. AC-9: an automation e-mail the limit holds back is DEFER with retry_after while queued under
    24 h, and EXPIRED (QUEUED_TOO_LONG) once queued_since is 24 h old."""
    put_contact_limit(sidecar)
    add_contacts(sidecar, pb.CONTACT_SOURCE_API, ids("c", 1, 10))
    at_limit = send(sidecar, "c01")
    assert (at_limit.decision, at_limit.reason, at_limit.newly_active) == (pb.DECISION_ALLOW, pb.REASON_OK, False)
    assert (at_limit.usage.state, at_limit.usage.sends) == (pb.USAGE_STATE_AT_LIMIT, 1)
    entering = enroll(sidecar, "c02")
    assert (entering.decision, entering.reason) == (pb.DECISION_ALLOW, pb.REASON_OK)

    in_grace = add_contacts(sidecar, pb.CONTACT_SOURCE_API, ["c11"])
    assert (in_grace.usage.active_contacts, in_grace.usage.state) == (11, pb.USAGE_STATE_IN_GRACE)
    campaign = send(sidecar, "c11")
    assert (campaign.decision, campaign.reason) == (pb.DECISION_ALLOW, pb.REASON_OK)
    automation = send(sidecar, "c03", kind=pb.MESSAGE_KIND_AUTOMATION)
    assert (automation.decision, automation.reason) == (pb.DECISION_ALLOW, pb.REASON_OK)
    assert automation.usage.sends == 3 and automation.usage.state == pb.USAGE_STATE_IN_GRACE
    assert enroll(sidecar, "c04").decision == pb.DECISION_ALLOW

    past = add_contacts(sidecar, pb.CONTACT_SOURCE_API, ["c12"])
    assert (past.decision, past.reason) == (pb.DECISION_ALLOW, pb.REASON_OK)
    assert (past.usage.active_contacts, past.usage.state) == (12, pb.USAGE_STATE_BLOCKED)
    blocked = send(sidecar, "c01")
    assert (blocked.decision, blocked.reason) == (pb.DECISION_DENY, pb.REASON_OVER_GRACE)
    assert (blocked.usage.sends, blocked.usage.state) == (3, pb.USAGE_STATE_BLOCKED)
    refused = enroll(sidecar, "c04")
    assert (refused.decision, refused.reason) == (pb.DECISION_DENY, pb.REASON_OVER_GRACE)
    stranger = enroll(sidecar, "stranger")
    assert (stranger.decision, stranger.reason) == (pb.DECISION_DENY, pb.REASON_UNKNOWN_CONTACT)
    unknown = send(sidecar, "stranger")
    assert (unknown.decision, unknown.reason) == (pb.DECISION_DENY, pb.REASON_UNKNOWN_CONTACT)

    queued = clock.now()
    deferred = send(sidecar, "c05", kind=pb.MESSAGE_KIND_AUTOMATION, queued_since=queued)
    assert (deferred.decision, deferred.reason) == (pb.DECISION_DEFER, pb.REASON_OVER_GRACE)
    assert deferred.retry_after.ToTimedelta() == timedelta(minutes=5)
    unstamped = send(sidecar, "c06", kind=pb.MESSAGE_KIND_AUTOMATION)
    assert unstamped.decision == pb.DECISION_DEFER and unstamped.retry_after.ToTimedelta() == timedelta(minutes=5)
    clock.advance(timedelta(hours=23, minutes=58).total_seconds())
    still = send(sidecar, "c05", kind=pb.MESSAGE_KIND_AUTOMATION, queued_since=queued)
    assert (still.decision, still.reason) == (pb.DECISION_DEFER, pb.REASON_OVER_GRACE)
    assert still.retry_after.ToTimedelta() == timedelta(minutes=2)
    clock.advance(120)
    expired = send(sidecar, "c05", kind=pb.MESSAGE_KIND_AUTOMATION, queued_since=queued)
    assert (expired.decision, expired.reason) == (pb.DECISION_EXPIRED, pb.REASON_QUEUED_TOO_LONG)
    assert expired.usage.sends == 3
    assert plan(sidecar).contact_limit == 10

    upgraded = put_contact_limit(sidecar, 20)
    assert (upgraded.usage.contact_limit, upgraded.usage.state) == (20, pb.USAGE_STATE_OK)
    resumed = send(sidecar, "c01")
    assert (resumed.decision, resumed.reason, resumed.usage.sends) == (pb.DECISION_ALLOW, pb.REASON_OK, 4)
    assert enroll(sidecar, "c04").decision == pb.DECISION_ALLOW


def test_model1_deleting_contacts_lowers_the_count_but_the_invoice_keeps_the_peak(sidecar: RunningSidecar) -> None:
    """AC-10: deleting contacts lowers the count at once and campaigns resume; the cycle's invoice still
    bills overage on the highest count held in the cycle, and the contacts listed behind it are all that were
    held in it, the deleted ones with when they stopped counting. AC-6: while past the grace campaigns are
    refused."""
    put_contact_limit(sidecar)
    add_contacts(sidecar, pb.CONTACT_SOURCE_API, ids("c", 1, 12))
    assert send(sidecar, "c01").reason == pb.REASON_OVER_GRACE

    cleaned = record(sidecar, pb.ACTIVITY_KIND_CONTACT_DELETED, ["c11", "c12"])
    assert cleaned.recorded == 2
    assert figures(cleaned.usage) == (10, 12, pb.USAGE_STATE_AT_LIMIT, 2, "0.00", 0)
    resumed = send(sidecar, "c01")
    assert (resumed.decision, resumed.reason, resumed.usage.sends) == (pb.DECISION_ALLOW, pb.REASON_OK, 1)
    assert enroll(sidecar, "c02").decision == pb.DECISION_ALLOW
    gone = send(sidecar, "c12")
    assert (gone.decision, gone.reason) == (pb.DECISION_DENY, pb.REASON_UNKNOWN_CONTACT)
    assert not contact(sidecar, "c12").held
    behind_the_peak = listed(sidecar)
    assert [c.contact_id for c in behind_the_peak] == ids("c", 1, 12)
    assert [c.contact_id for c in behind_the_peak if c.HasField("counted_until")] == ["c11", "c12"]

    bill = invoice(sidecar)
    assert figures(bill.usage) == (10, 12, pb.USAGE_STATE_AT_LIMIT, 2, "0.00", 1)
    assert invoice_lines(bill) == [
        ("Contacts included in the plan (Lite)", 10, "0.00", "0.00", ""),
        ("Highest contacts held this cycle", 12, "0.00", "0.00", ""),
        ("Overage contacts", 2, "0.00", "0.00", ""),
    ]


def test_model1_figures_survive_a_restart(sidecar: RunningSidecar) -> None:
    """AC-10, AC-7: the held count, the cycle's peak, sends and the invoice read the same after a restart on
    the same ledger, and the next API add counts on from the stored count."""
    put_contact_limit(sidecar)
    add_contacts(sidecar, pb.CONTACT_SOURCE_API, ids("c", 1, 12))
    record(sidecar, pb.ACTIVITY_KIND_CONTACT_DELETED, ["c12"])
    assert send(sidecar, "c01").decision == pb.DECISION_ALLOW
    before = readings(sidecar)
    assert figures(before.usage) == (11, 12, pb.USAGE_STATE_IN_GRACE, 2, "0.00", 1)

    with restarted(sidecar) as again:
        assert readings(again) == before
        grown = add_contacts(again, pb.CONTACT_SOURCE_API, ["c13"])
        assert figures(grown.usage) == (12, 12, pb.USAGE_STATE_BLOCKED, 2, "0.00", 1)
        assert send(again, "c01").reason == pb.REASON_OVER_GRACE


# -- model 2: contacts e-mailed in the cycle, hard limit (seeds 001, 002, SiteGround) -------------------


def put_active_cycle_hard(s: RunningSidecar, limit: int = 10, **extra: object) -> pb.PutPlanResponse:
    fields: dict[str, object] = {"plan_name": "Basic", "contact_limit": limit, **extra}
    return s.put_plan(TENANT, preset="active-cycle-hard", **fields)


def test_model2_a_contact_is_active_once_e_mailed_and_counted_once(sidecar: RunningSidecar, clock: FakeClock) -> None:
    """SG-1: a contact is active once it was e-mailed in the cycle; holding it is not enough.
    SG-2: at most the limit of unique contacts is e-mailed (CONTACT_LIMIT_REACHED past it).
    SG-3: the sends allowance is 10 x the limit. SG-6: the first e-mail activates the contact.
    SG-8: later e-mails to it in the cycle count a send, never a second contact."""
    stored = put_active_cycle_hard(sidecar)
    assert (stored.plan.metering, stored.plan.enforcement) == (pb.METERING_CYCLE_ACTIVE, pb.ENFORCEMENT_HARD)
    assert stored.plan.sends_per_contact == 10 and list(stored.plan.notify_thresholds) == [0.8, 1.0]
    assert (stored.usage.contact_limit, stored.usage.sends_limit) == (10, 100)

    held = add_contacts(sidecar, pb.CONTACT_SOURCE_API, ids("c", 1, 12))
    assert (held.decision, held.added, held.usage.active_contacts) == (pb.DECISION_ALLOW, 12, 0)
    c01 = contact(sidecar, "c01")
    assert c01.held and not c01.active_this_cycle

    first = send(sidecar, "c01")
    assert (first.decision, first.reason, first.newly_active) == (
        pb.DECISION_ALLOW,
        pb.REASON_NEW_CONTACT_COUNTED,
        True,
    )
    assert (first.usage.active_contacts, first.usage.sends) == (1, 1)
    c01 = contact(sidecar, "c01")
    assert c01.active_this_cycle and at(c01.activated_at) == START
    clock.advance(3600)
    again = send(sidecar, "c01", kind=pb.MESSAGE_KIND_AUTOMATION)
    assert (again.decision, again.reason, again.newly_active) == (pb.DECISION_ALLOW, pb.REASON_ALREADY_ACTIVE, False)
    assert (again.usage.active_contacts, again.usage.sends) == (1, 2)
    assert at(contact(sidecar, "c01").activated_at) == START
    elsewhere = record(sidecar, pb.ACTIVITY_KIND_MESSAGE_SENT, ["c02"])
    assert (elsewhere.newly_active, elsewhere.usage.active_contacts) == (1, 2)

    campaign = send_batch(sidecar, ids("c", 1, 8))
    assert [r.reason for r in campaign.results] == [pb.REASON_ALREADY_ACTIVE] * 2 + [pb.REASON_NEW_CONTACT_COUNTED] * 6
    assert (campaign.allowed, campaign.newly_active) == (8, 6)
    assert (campaign.usage.active_contacts, campaign.usage.sends) == (8, 10)
    assert campaign.usage.state == pb.USAGE_STATE_WARNING
    rest = send_batch(sidecar, ["c09", "c10", "c11"])
    assert [(r.decision, r.reason) for r in rest.results] == [
        (pb.DECISION_ALLOW, pb.REASON_NEW_CONTACT_COUNTED),
        (pb.DECISION_ALLOW, pb.REASON_NEW_CONTACT_COUNTED),
        (pb.DECISION_DENY, pb.REASON_CONTACT_LIMIT_REACHED),
    ]
    assert (rest.allowed, rest.denied) == (2, 1)
    assert (rest.usage.active_contacts, rest.usage.sends, rest.usage.state) == (10, 12, pb.USAGE_STATE_AT_LIMIT)

    refused = send(sidecar, "c11")
    assert (refused.decision, refused.reason) == (pb.DECISION_DENY, pb.REASON_CONTACT_LIMIT_REACHED)
    assert refused.usage.active_contacts == 10 and not contact(sidecar, "c11").active_this_cycle
    known = send(sidecar, "c05")
    assert (known.decision, known.reason, known.usage.sends) == (pb.DECISION_ALLOW, pb.REASON_ALREADY_ACTIVE, 13)
    activated_by = {c.contact_id: c.activity for c in listed(sidecar)}
    assert sorted(activated_by) == ids("c", 1, 10)
    assert (activated_by["c01"], activated_by["c02"], activated_by["c03"]) == ("CAMPAIGN", "MESSAGE_SENT", "CAMPAIGN")


def test_model2_sends_allowance_and_upgrade_mid_cycle(sidecar: RunningSidecar) -> None:
    """SG-3: sends are metered apart from contacts, allowance 10 x the limit. SG-4: past the allowance sends
    and enrolments are refused (SENDS_LIMIT_REACHED, automation mail deferred); raising the limit mid-cycle
    raises the contact limit and the sends allowance at once and the tenant sends again."""
    stored = put_active_cycle_hard(sidecar, limit=2)
    assert stored.usage.sends_limit == 20
    for n in range(1, 21):
        last = send(sidecar, "c01")
        assert last.decision == pb.DECISION_ALLOW and last.usage.sends == n
    assert (last.usage.active_contacts, last.usage.state) == (1, pb.USAGE_STATE_BLOCKED)

    over = send(sidecar, "c01")
    assert (over.decision, over.reason, over.usage.sends) == (pb.DECISION_DENY, pb.REASON_SENDS_LIMIT_REACHED, 20)
    new = send(sidecar, "c02")
    assert (new.decision, new.reason, new.usage.active_contacts) == (
        pb.DECISION_DENY,
        pb.REASON_SENDS_LIMIT_REACHED,
        1,
    )
    queued = send(sidecar, "c01", kind=pb.MESSAGE_KIND_AUTOMATION)
    assert (queued.decision, queued.reason) == (pb.DECISION_DEFER, pb.REASON_SENDS_LIMIT_REACHED)
    refused = enroll(sidecar, "c01")
    assert (refused.decision, refused.reason) == (pb.DECISION_DENY, pb.REASON_SENDS_LIMIT_REACHED)

    upgraded = put_active_cycle_hard(sidecar, limit=3, addon_contacts=1, plan_name="Plus")
    assert (upgraded.usage.contact_limit, upgraded.usage.sends_limit) == (4, 40)
    assert (upgraded.usage.active_contacts, upgraded.usage.sends, upgraded.usage.state) == (1, 20, pb.USAGE_STATE_OK)
    assert upgraded.plan.cycle_anchor == stored.plan.cycle_anchor
    assert send(sidecar, "c01").reason == pb.REASON_ALREADY_ACTIVE
    fresh = send(sidecar, "c02")
    assert (fresh.decision, fresh.reason) == (pb.DECISION_ALLOW, pb.REASON_NEW_CONTACT_COUNTED)
    assert (fresh.usage.active_contacts, fresh.usage.sends) == (2, 22)
    assert enroll(sidecar, "c03").decision == pb.DECISION_ALLOW


def test_model2_preflight_of_a_recipient_list_counts_nothing(sidecar: RunningSidecar) -> None:
    """SG-5: a dry-run batch of a campaign's recipients says who would pass the monthly limit and counts
    nothing; the real send then decides the same."""
    put_active_cycle_hard(sidecar)
    send_batch(sidecar, ids("c", 1, 8))
    recipients = ids("c", 7, 14)
    preflight = send_batch(sidecar, recipients, dry_run=True)
    expected = [
        (pb.DECISION_ALLOW, pb.REASON_ALREADY_ACTIVE),
        (pb.DECISION_ALLOW, pb.REASON_ALREADY_ACTIVE),
        (pb.DECISION_ALLOW, pb.REASON_NEW_CONTACT_COUNTED),
        (pb.DECISION_ALLOW, pb.REASON_NEW_CONTACT_COUNTED),
    ] + [(pb.DECISION_DENY, pb.REASON_CONTACT_LIMIT_REACHED)] * 4
    assert [(r.decision, r.reason) for r in preflight.results] == expected
    assert (preflight.allowed, preflight.denied, preflight.newly_active) == (4, 4, 2)
    assert (preflight.usage.active_contacts, preflight.usage.sends) == (10, 12)

    now = usage(sidecar)
    assert (now.active_contacts, now.sends, now.state) == (8, 8, pb.USAGE_STATE_WARNING)
    assert status_of(lambda: contact(sidecar, "c09")).code() == grpc.StatusCode.NOT_FOUND
    assert listed_ids(sidecar) == ids("c", 1, 8)

    real = send_batch(sidecar, recipients)
    assert [(r.decision, r.reason) for r in real.results] == expected
    assert (real.usage.active_contacts, real.usage.sends) == (10, 12)


def test_model2_deleting_makes_no_room_until_the_cycle_resets(sidecar: RunningSidecar, clock: FakeClock) -> None:
    """SG-9: deleting an e-mailed contact does not lower the count. SG-10: at the limit, deleting contacts lets
    no new contact be e-mailed or enrolled until the next cycle (automation mail waits with retry_after capped
    at the cycle end), while active ones still are. SG-11: no rotation: the
    deleted contacts stay on the cycle's list. SG-7: the count resets to 0 at the cycle start, and the past
    cycle's figures and invoice stay readable."""
    put_active_cycle_hard(sidecar)
    add_contacts(sidecar, pb.CONTACT_SOURCE_IMPORT, ids("c", 1, 13))
    send_batch(sidecar, ids("c", 1, 10))

    deleted = record(sidecar, pb.ACTIVITY_KIND_CONTACT_DELETED, ["c01", "c02", "c03"])
    assert (deleted.recorded, deleted.newly_active, deleted.usage.active_contacts) == (3, 0, 10)
    c01 = contact(sidecar, "c01")
    assert not c01.held and c01.active_this_cycle
    room = send(sidecar, "c11")
    assert (room.decision, room.reason) == (pb.DECISION_DENY, pb.REASON_CONTACT_LIMIT_REACHED)
    waiting = send(sidecar, "c11", kind=pb.MESSAGE_KIND_AUTOMATION)
    assert (waiting.decision, waiting.reason) == (pb.DECISION_DEFER, pb.REASON_CONTACT_LIMIT_REACHED)
    assert send(sidecar, "c04").reason == pb.REASON_ALREADY_ACTIVE
    no_entry = enroll(sidecar, "c11")
    assert (no_entry.decision, no_entry.reason) == (pb.DECISION_DENY, pb.REASON_CONTACT_LIMIT_REACHED)
    assert enroll(sidecar, "c04").reason == pb.REASON_ALREADY_ACTIVE
    assert listed_ids(sidecar) == ids("c", 1, 10)

    clock.set(NEXT_CYCLE - timedelta(seconds=1))
    assert send(sidecar, "c11").reason == pb.REASON_CONTACT_LIMIT_REACHED
    last_second = send(sidecar, "c11", kind=pb.MESSAGE_KIND_AUTOMATION)
    assert last_second.decision == pb.DECISION_DEFER and last_second.retry_after.ToTimedelta() == timedelta(seconds=1)

    clock.set(NEXT_CYCLE)
    reset = usage(sidecar)
    assert (reset.active_contacts, reset.sends, reset.state) == (0, 0, pb.USAGE_STATE_OK)
    assert (at(reset.cycle_start), at(reset.cycle_end)) == (NEXT_CYCLE, THIRD_CYCLE)
    newcomer = send(sidecar, "c11")
    assert (newcomer.decision, newcomer.reason, newcomer.usage.active_contacts) == (
        pb.DECISION_ALLOW,
        pb.REASON_NEW_CONTACT_COUNTED,
        1,
    )
    assert send(sidecar, "c04").reason == pb.REASON_NEW_CONTACT_COUNTED
    assert listed_ids(sidecar) == ["c04", "c11"]

    old = usage(sidecar, START + timedelta(days=3))
    assert (at(old.cycle_start), at(old.cycle_end)) == (START, NEXT_CYCLE)
    assert (old.active_contacts, old.sends, old.state) == (10, 11, pb.USAGE_STATE_AT_LIMIT)
    assert listed_ids(sidecar, START) == ids("c", 1, 10)
    assert invoice_lines(invoice(sidecar, START)) == [
        ("Contacts included in the plan (Basic)", 10, "0.00", "0.00", ""),
        ("Contacts active this cycle", 10, "0.00", "0.00", ""),
        ("Overage contacts", 0, "0.00", "0.00", ""),
    ]


def test_model2_figures_survive_a_restart(sidecar: RunningSidecar, clock: FakeClock) -> None:
    """SG-2, SG-8, SG-9, SG-7: after a restart on the same ledger the cycle's active contacts and sends, the
    invoice and the list read the same; an active contact is still known (no second count), the limit
    still holds, and the past cycle reads the same once the next one starts."""
    put_active_cycle_hard(sidecar)
    send_batch(sidecar, ids("c", 1, 10))
    record(sidecar, pb.ACTIVITY_KIND_CONTACT_DELETED, ["c01"])
    assert send(sidecar, "c11").decision == pb.DECISION_DENY
    before = readings(sidecar)

    with restarted(sidecar) as again:
        assert readings(again) == before
        assert send(again, "c02").reason == pb.REASON_ALREADY_ACTIVE
        assert send(again, "c11").reason == pb.REASON_CONTACT_LIMIT_REACHED
        cycle_end = (usage(again), invoice(again))
        clock.set(NEXT_CYCLE)
        assert (usage(again, START), invoice(again, START)) == cycle_end
        assert usage(again).active_contacts == 0


# -- model 3: contacts touched in the cycle, overage billing (seed 003, funnel CRM) ----------------------


def put_active_cycle_overage(s: RunningSidecar, plan_name: str, limit: int = 0, **extra: object) -> pb.PutPlanResponse:
    return s.put_plan(TENANT, preset="active-cycle-overage", plan_name=plan_name, contact_limit=limit, **extra)


def test_model3_every_activity_kind_activates_a_contact_once_per_month(
    sidecar: RunningSidecar, clock: FakeClock
) -> None:
    """CR-1 a-e: a contact becomes active when created (by hand or as a funnel lead), when its status changes,
    when a message (e-mail or WhatsApp) is sent to it, when a note is added, when a property changes.
    CR-2: it counts once per month however many of those happen, and once again in the next month."""
    stored = put_active_cycle_overage(sidecar, "START")
    assert stored.usage.contact_limit == 50
    assert list(stored.plan.counted_activities) == [
        pb.ACTIVITY_KIND_CONTACT_CREATED,
        pb.ACTIVITY_KIND_STATUS_CHANGED,
        pb.ACTIVITY_KIND_MESSAGE_SENT,
        pb.ACTIVITY_KIND_NOTE_ADDED,
        pb.ACTIVITY_KIND_PROPERTY_CHANGED,
        pb.ACTIVITY_KIND_STATUS_RENAMED,
    ]

    by_hand = add_contacts(sidecar, pb.CONTACT_SOURCE_MANUAL, ["by-hand"])
    assert (by_hand.decision, by_hand.reason, by_hand.added) == (pb.DECISION_ALLOW, pb.REASON_OK, 1)
    assert by_hand.usage.active_contacts == 1
    assert record(sidecar, pb.ACTIVITY_KIND_CONTACT_CREATED, ["funnel-lead"]).newly_active == 1
    assert record(sidecar, pb.ACTIVITY_KIND_STATUS_CHANGED, ["status"]).newly_active == 1
    whatsapp = send(sidecar, "whatsapp", channel=pb.CHANNEL_WHATSAPP)
    assert (whatsapp.decision, whatsapp.reason, whatsapp.newly_active) == (
        pb.DECISION_ALLOW,
        pb.REASON_NEW_CONTACT_COUNTED,
        True,
    )
    assert record(sidecar, pb.ACTIVITY_KIND_MESSAGE_SENT, ["e-mail"]).newly_active == 1
    assert record(sidecar, pb.ACTIVITY_KIND_NOTE_ADDED, ["note"]).newly_active == 1
    property_changed = record(sidecar, pb.ACTIVITY_KIND_PROPERTY_CHANGED, ["property"])
    assert (property_changed.newly_active, property_changed.usage.active_contacts) == (1, 7)
    assert {c.contact_id: c.activity for c in listed(sidecar)} == {
        "by-hand": "CONTACT_CREATED",
        "funnel-lead": "CONTACT_CREATED",
        "status": "STATUS_CHANGED",
        "whatsapp": "CAMPAIGN",
        "e-mail": "MESSAGE_SENT",
        "note": "NOTE_ADDED",
        "property": "PROPERTY_CHANGED",
    }

    touched = ["by-hand", "funnel-lead", "status", "whatsapp", "e-mail", "note", "property"]
    for kind in (
        pb.ACTIVITY_KIND_STATUS_CHANGED,
        pb.ACTIVITY_KIND_MESSAGE_SENT,
        pb.ACTIVITY_KIND_NOTE_ADDED,
        pb.ACTIVITY_KIND_PROPERTY_CHANGED,
    ):
        again = record(sidecar, kind, touched)
        assert (again.recorded, again.newly_active, again.usage.active_contacts) == (7, 0, 7)
    repeat = send(sidecar, "note", kind=pb.MESSAGE_KIND_ONE_TO_ONE)
    assert (repeat.reason, repeat.newly_active, repeat.usage.active_contacts) == (pb.REASON_ALREADY_ACTIVE, False, 7)

    clock.set(NEXT_CYCLE + timedelta(days=1))
    new_month = record(sidecar, pb.ACTIVITY_KIND_NOTE_ADDED, ["note", "status"])
    assert (new_month.newly_active, new_month.usage.active_contacts) == (2, 2)
    assert record(sidecar, pb.ACTIVITY_KIND_STATUS_CHANGED, ["note", "status"]).newly_active == 0
    assert usage(sidecar, START).active_contacts == 7


def test_model3_renaming_a_status_activates_every_contact_holding_it(sidecar: RunningSidecar) -> None:
    """CR-1f: renaming a status value activates all 20,000 contacts holding it in one call, each once
    (CR-2); CR-5: never refused, past the SCALE plan's 2,000 it is overage; CR-6: 18,000 x 0.25 EUR."""
    put_active_cycle_overage(sidecar, "SCALE")
    holders = [f"s{i:05d}" for i in range(20_000)]
    assert record(sidecar, pb.ACTIVITY_KIND_NOTE_ADDED, [holders[0]]).newly_active == 1

    renamed = record(sidecar, pb.ACTIVITY_KIND_STATUS_RENAMED, holders)
    assert (renamed.recorded, renamed.newly_active) == (20_000, 19_999)
    u = renamed.usage
    assert (u.active_contacts, u.contact_limit, u.state) == (20_000, 2_000, pb.USAGE_STATE_IN_OVERAGE)
    assert (u.overage_contacts, u.overage_amount, u.currency) == (18_000, "4500.00", "EUR")
    assert contact(sidecar, "s12345").active_this_cycle
    first_page = listed(sidecar, page_size=2)
    assert [(c.contact_id, c.activity) for c in first_page] == [("s00000", "NOTE_ADDED"), ("s00001", "STATUS_RENAMED")]
    assert invoice_lines(invoice(sidecar)) == [
        ("Contacts included in the plan (SCALE)", 2_000, "0.00", "0.00", "EUR"),
        ("Contacts active this cycle", 20_000, "0.00", "0.00", "EUR"),
        ("Overage contacts", 18_000, "0.25", "4500.00", "EUR"),
    ]


@pytest.mark.parametrize(("plan_name", "included"), [("START", 50), ("grow", 250), ("Expand", 500), ("SCALE", 2_000)])
def test_model3_plan_names_give_the_included_active_contacts(
    sidecar: RunningSidecar, plan_name: str, included: int
) -> None:
    """CR-3: the plans START, GROW, EXPAND and SCALE include 50, 250, 500 and 2,000 active contacts."""
    stored = put_active_cycle_overage(sidecar, plan_name)
    assert stored.plan.contact_limit == included and stored.usage.contact_limit == included
    assert invoice_lines(invoice(sidecar))[0] == (
        f"Contacts included in the plan ({plan_name})",
        included,
        "0.00",
        "0.00",
        "EUR",
    )


def test_model3_a_plan_name_outside_the_tiers_needs_a_contact_limit(sidecar: RunningSidecar) -> None:
    """CR-3: only the four plan names carry an included figure; another name without contact_limit is
    INVALID_ARGUMENT naming plan.contact_limit."""
    err = status_of(lambda: put_active_cycle_overage(sidecar, "Premium"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "plan.contact_limit" in err.details()


def test_model3_overage_instead_of_a_hard_limit_and_add_ons(sidecar: RunningSidecar) -> None:
    """CR-8: the tenant is warned at 0.8 of the limit. CR-5: nothing is refused past the limit: sends,
    automation mail, enrolments, new leads are ALLOW (OVERAGE). CR-6: each contact past the limit costs
    0.25 EUR, exact decimal amounts in usage and invoice. CR-4: add-on contacts raise the limit at once."""
    stored = put_active_cycle_overage(sidecar, "Funnel 10", limit=10)
    assert (stored.plan.overage_unit_price, stored.plan.currency) == ("0.25", "EUR")
    assert list(stored.plan.notify_thresholds) == [0.8, 1.0]
    assert (stored.usage.overage_amount, stored.usage.currency, stored.usage.sends_limit) == ("0.00", "EUR", 0)

    assert send_batch(sidecar, ids("c", 1, 7)).usage.state == pb.USAGE_STATE_OK
    eighth = send(sidecar, "c08")
    assert (eighth.usage.state, eighth.usage.usage_ratio) == (pb.USAGE_STATE_WARNING, pytest.approx(0.8))
    assert send_batch(sidecar, ["c09", "c10"]).usage.state == pb.USAGE_STATE_AT_LIMIT

    past = send(sidecar, "c11")
    assert (past.decision, past.reason, past.newly_active) == (pb.DECISION_ALLOW, pb.REASON_OVERAGE, True)
    assert figures(past.usage) == (11, 11, pb.USAGE_STATE_IN_OVERAGE, 1, "0.25", 11)
    funnel_mail = send(sidecar, "c12", kind=pb.MESSAGE_KIND_AUTOMATION)
    assert (funnel_mail.decision, funnel_mail.reason, funnel_mail.usage.overage_amount) == (
        pb.DECISION_ALLOW,
        pb.REASON_OVERAGE,
        "0.50",
    )
    entering = enroll(sidecar, "c13")
    assert (entering.decision, entering.reason, entering.usage.active_contacts) == (pb.DECISION_ALLOW, pb.REASON_OK, 12)
    lead = record(sidecar, pb.ACTIVITY_KIND_CONTACT_CREATED, ["c13"])
    assert (lead.newly_active, lead.usage.overage_contacts, lead.usage.overage_amount) == (1, 3, "0.75")
    signup = add_contacts(sidecar, pb.CONTACT_SOURCE_FORM, ["c14"])
    assert (signup.decision, signup.reason, signup.added) == (pb.DECISION_ALLOW, pb.REASON_OVERAGE, 1)
    assert figures(signup.usage) == (14, 14, pb.USAGE_STATE_IN_OVERAGE, 4, "1.00", 12)

    addon = put_active_cycle_overage(sidecar, "Funnel 10", limit=10, addon_contacts=5)
    assert (addon.usage.contact_limit, addon.usage.active_contacts) == (15, 14)
    assert (addon.usage.overage_contacts, addon.usage.overage_amount, addon.usage.state) == (
        0,
        "0.00",
        pb.USAGE_STATE_WARNING,
    )
    within = send(sidecar, "c15")
    assert (within.reason, within.usage.state) == (pb.REASON_NEW_CONTACT_COUNTED, pb.USAGE_STATE_AT_LIMIT)
    assert send(sidecar, "c16").reason == pb.REASON_OVERAGE
    notes = record(sidecar, pb.ACTIVITY_KIND_NOTE_ADDED, ids("n", 1, 50))
    assert figures(notes.usage) == (66, 66, pb.USAGE_STATE_IN_OVERAGE, 51, "12.75", 14)

    bill = invoice(sidecar)
    assert (bill.usage.overage_contacts, bill.usage.overage_amount, bill.usage.currency) == (51, "12.75", "EUR")
    assert invoice_lines(bill) == [
        ("Contacts included in the plan (Funnel 10)", 10, "0.00", "0.00", "EUR"),
        ("Add-on contacts", 5, "0.00", "0.00", "EUR"),
        ("Contacts active this cycle", 66, "0.00", "0.00", "EUR"),
        ("Overage contacts", 51, "0.25", "12.75", "EUR"),
    ]


def test_model3_annual_plan_is_invoiced_month_by_month(sidecar: RunningSidecar, clock: FakeClock) -> None:
    """CR-7: on an ANNUAL plan overage is metered and invoiced per monthly cycle, each cycle on its own
    (CR-6 at 0.25 EUR each; CR-2: a contact active in two months counts in both)."""
    stored = put_active_cycle_overage(sidecar, "Grow yearly", limit=10, billing_interval=pb.BILLING_INTERVAL_ANNUAL)
    assert plan(sidecar).billing_interval == pb.BILLING_INTERVAL_ANNUAL
    assert at(stored.usage.cycle_end) == NEXT_CYCLE
    assert record(sidecar, pb.ACTIVITY_KIND_CONTACT_CREATED, ids("c", 1, 13)).usage.overage_amount == "0.75"

    clock.set(NEXT_CYCLE + timedelta(days=1))
    assert usage(sidecar).active_contacts == 0
    second = record(sidecar, pb.ACTIVITY_KIND_NOTE_ADDED, ids("c", 1, 11))
    assert (second.newly_active, second.usage.overage_contacts, second.usage.overage_amount) == (11, 1, "0.25")

    clock.set(THIRD_CYCLE + timedelta(days=1))
    record(sidecar, pb.ACTIVITY_KIND_STATUS_CHANGED, ids("c", 1, 5))

    annual = "Overage contacts (annual plan, overage invoiced monthly)"
    months = [
        (START + timedelta(days=20), START, NEXT_CYCLE, 13, 3, "0.75"),
        (NEXT_CYCLE, NEXT_CYCLE, THIRD_CYCLE, 11, 1, "0.25"),
        (None, THIRD_CYCLE, datetime(2026, 6, 10, 12, 0, tzinfo=UTC), 5, 0, "0.00"),
    ]
    for asked, start, end, active, over, amount in months:
        bill = invoice(sidecar, asked)
        assert (at(bill.usage.cycle_start), at(bill.usage.cycle_end)) == (start, end)
        assert (bill.usage.active_contacts, bill.usage.overage_contacts, bill.usage.overage_amount) == (
            active,
            over,
            amount,
        )
        assert invoice_lines(bill) == [
            ("Contacts included in the plan (Grow yearly)", 10, "0.00", "0.00", "EUR"),
            ("Contacts active this cycle", active, "0.00", "0.00", "EUR"),
            (annual, over, "0.25", amount, "EUR"),
        ]


def test_model3_figures_survive_a_restart(sidecar: RunningSidecar, clock: FakeClock) -> None:
    """CR-2, CR-6, CR-7: after a restart on the same ledger the month's active contacts, overage and invoice
    read the same, a past month's invoice too, and a contact active this month is not counted again."""
    put_active_cycle_overage(sidecar, "Funnel 10", limit=10)
    record(sidecar, pb.ACTIVITY_KIND_CONTACT_CREATED, ids("c", 1, 12))
    clock.set(NEXT_CYCLE + timedelta(days=2))
    record(sidecar, pb.ACTIVITY_KIND_NOTE_ADDED, ids("c", 1, 13))
    before = readings(sidecar, past=START)
    assert before.past_usage is not None and before.past_usage.overage_amount == "0.50"
    assert before.usage.overage_amount == "0.75"

    with restarted(sidecar) as again:
        assert readings(again, past=START) == before
        repeat = record(again, pb.ACTIVITY_KIND_STATUS_CHANGED, ["c01", "c14"])
        assert (repeat.newly_active, repeat.usage.active_contacts, repeat.usage.overage_amount) == (1, 14, "1.00")


# -- model 4: marketing contacts (seed 004, HubSpot) -----------------------------------------------------


def put_marketing_contacts(s: RunningSidecar, **extra: object) -> pb.PutPlanResponse:
    return s.put_plan(TENANT, preset="marketing-contacts", plan_name="Starter", contact_limit=10, **extra)


def test_model4_only_marketing_contacts_count_and_the_count_is_readable(sidecar: RunningSidecar) -> None:
    """MK-1: only marketing contacts count towards the tier and are billed; non-marketing contacts are free.
    MK-2: the count can be read at any time (GetUsage) and the state turns WARNING at 0.8 of the limit."""
    stored = put_marketing_contacts(sidecar, overage_unit_price="0.50", currency="EUR")
    p = stored.plan
    assert (p.metering, p.enforcement, p.marketing_contacts_only) == (
        pb.METERING_HELD_CONTACTS,
        pb.ENFORCEMENT_OVERAGE,
        True,
    )
    assert list(p.counted_kinds) == [pb.MESSAGE_KIND_CAMPAIGN, pb.MESSAGE_KIND_AUTOMATION]
    assert list(p.notify_thresholds) == [0.8, 0.9, 1.0]

    marketing = add_contacts(sidecar, pb.CONTACT_SOURCE_IMPORT, ids("m", 1, 7))
    assert (marketing.decision, marketing.reason, marketing.added) == (pb.DECISION_ALLOW, pb.REASON_OK, 7)
    free = add_contacts(sidecar, pb.CONTACT_SOURCE_API, ids("n", 1, 5), marketing=False)
    assert (free.decision, free.reason, free.added, free.usage.active_contacts) == (
        pb.DECISION_ALLOW,
        pb.REASON_OK,
        5,
        7,
    )
    record(sidecar, pb.ACTIVITY_KIND_CONTACT_CREATED, ["n06"], marketing=False, source_type="CRM", source_id="sales")
    now = usage(sidecar)
    assert (now.active_contacts, now.usage_ratio, now.state) == (7, pytest.approx(0.7), pb.USAGE_STATE_OK)

    eighth = add_contacts(sidecar, pb.CONTACT_SOURCE_FORM, ["m08"])
    assert (eighth.usage.active_contacts, eighth.usage.state) == (8, pb.USAGE_STATE_WARNING)
    assert usage(sidecar).state == pb.USAGE_STATE_WARNING
    assert add_contacts(sidecar, pb.CONTACT_SOURCE_FORM, ["m09", "m10"]).usage.state == pb.USAGE_STATE_AT_LIMIT
    over = add_contacts(sidecar, pb.CONTACT_SOURCE_API, ["m11", "m12"])
    assert (over.decision, over.reason, over.added) == (pb.DECISION_ALLOW, pb.REASON_OVERAGE, 2)
    assert figures(over.usage) == (12, 12, pb.USAGE_STATE_IN_OVERAGE, 2, "1.00", 0)
    still_free = add_contacts(sidecar, pb.CONTACT_SOURCE_API, ["n07"], marketing=False)
    assert (still_free.reason, still_free.usage.active_contacts) == (pb.REASON_OK, 12)

    counted = listed(sidecar)
    assert [c.contact_id for c in counted] == ids("m", 1, 12)
    assert {c.activity for c in counted} == {"MARKETING_CONTACT"}
    record(sidecar, pb.ACTIVITY_KIND_CONTACT_DELETED, ["m12"])
    bill = invoice(sidecar)
    assert figures(bill.usage) == (11, 12, pb.USAGE_STATE_IN_OVERAGE, 2, "1.00", 0)
    assert invoice_lines(bill) == [
        ("Contacts included in the plan (Starter)", 10, "0.00", "0.00", "EUR"),
        ("Highest marketing contacts this cycle", 12, "0.00", "0.00", "EUR"),
        ("Overage contacts", 2, "0.50", "1.00", "EUR"),
    ]


def test_model4_marketing_tools_only_for_marketing_contacts_other_mail_to_anyone(sidecar: RunningSidecar) -> None:
    """MK-3: campaign and automation mail goes only to marketing contacts (DENY NOT_MARKETING_CONTACT, never
    deferred). MK-4: transactional and one-to-one mail goes to anyone, NOT_COUNTED, touching no figure."""
    put_marketing_contacts(sidecar)
    add_contacts(sidecar, pb.CONTACT_SOURCE_API, ["m01"])
    add_contacts(sidecar, pb.CONTACT_SOURCE_API, ["n01"], marketing=False)
    campaign = send(sidecar, "m01")
    assert (campaign.decision, campaign.reason, campaign.usage.sends) == (pb.DECISION_ALLOW, pb.REASON_OK, 1)
    for kind in (pb.MESSAGE_KIND_CAMPAIGN, pb.MESSAGE_KIND_AUTOMATION):
        refused = send(sidecar, "n01", kind=kind)
        assert (refused.decision, refused.reason) == (pb.DECISION_DENY, pb.REASON_NOT_MARKETING_CONTACT)
        assert not refused.HasField("retry_after")
    unknown = send(sidecar, "stranger")
    assert (unknown.decision, unknown.reason) == (pb.DECISION_DENY, pb.REASON_UNKNOWN_CONTACT)

    before = usage(sidecar)
    assert (before.active_contacts, before.sends) == (1, 1)
    for kind in (pb.MESSAGE_KIND_TRANSACTIONAL, pb.MESSAGE_KIND_ONE_TO_ONE):
        for who in ("n01", "m01", "stranger"):
            other = send(sidecar, who, kind=kind)
            assert (other.decision, other.reason, other.newly_active) == (
                pb.DECISION_ALLOW,
                pb.REASON_NOT_COUNTED,
                False,
            )
            assert other.usage == before
    assert usage(sidecar) == before
    assert not contact(sidecar, "n01").marketing
    assert status_of(lambda: contact(sidecar, "stranger")).code() == grpc.StatusCode.NOT_FOUND


def test_model4_contact_shows_status_flag_and_source(sidecar: RunningSidecar) -> None:
    """MK-5: GetContact shows the marketing status, the "marketing until next update" flag, and the type and
    id of the source that last set the status. MK-6: setting marketing counts at once."""
    put_marketing_contacts(sidecar)
    add_contacts(sidecar, pb.CONTACT_SOURCE_API, ["m01"])
    m01 = contact(sidecar, "m01")
    assert (m01.held, m01.marketing, m01.marketing_until_next_update) == (True, True, False)
    assert (m01.marketing_source_type, m01.marketing_source_id) == ("API", "")

    record(
        sidecar,
        pb.ACTIVITY_KIND_CONTACT_CREATED,
        ["n01"],
        marketing=False,
        source_type="INTEGRATION",
        source_id="crm-sync",
    )
    n01 = contact(sidecar, "n01")
    assert (n01.marketing, n01.marketing_until_next_update) == (False, False)
    assert (n01.marketing_source_type, n01.marketing_source_id) == ("INTEGRATION", "crm-sync")
    assert usage(sidecar).active_contacts == 1

    promoted = record(
        sidecar,
        pb.ACTIVITY_KIND_MARKETING_STATUS_SET,
        ["n01"],
        marketing=True,
        source_type="WORKFLOW",
        source_id="wf-42",
    )
    assert promoted.usage.active_contacts == 2
    n01 = contact(sidecar, "n01")
    assert (n01.marketing, n01.marketing_until_next_update) == (True, False)
    assert (n01.marketing_source_type, n01.marketing_source_id) == ("WORKFLOW", "wf-42")

    demoted = record(
        sidecar, pb.ACTIVITY_KIND_MARKETING_STATUS_SET, ["m01"], marketing=False, source_type="USER", source_id="u-7"
    )
    assert demoted.usage.active_contacts == 2
    m01 = contact(sidecar, "m01")
    assert (m01.marketing, m01.marketing_until_next_update) == (True, True)
    assert (m01.marketing_source_type, m01.marketing_source_id) == ("USER", "u-7")


def test_model4_non_marketing_takes_effect_at_the_next_cycle(sidecar: RunningSidecar, clock: FakeClock) -> None:
    """MK-6: a contact set non-marketing keeps counting and receiving marketing mail until the next cycle
    starts, then stops counting (no rotation within a cycle: newcomers are overage meanwhile); setting a
    contact marketing takes effect at once, also undoing a pending switch. MK-1: the past cycle's invoice
    keeps its highest marketing count."""
    put_marketing_contacts(sidecar)
    add_contacts(sidecar, pb.CONTACT_SOURCE_API, ids("m", 1, 10))
    demoted = record(
        sidecar,
        pb.ACTIVITY_KIND_MARKETING_STATUS_SET,
        ["m01", "m02", "m03", "m04"],
        marketing=False,
        source_type="USER",
        source_id="u-1",
    )
    assert (demoted.usage.active_contacts, demoted.usage.state) == (10, pb.USAGE_STATE_AT_LIMIT)
    assert contact(sidecar, "m01").marketing_until_next_update
    still = send(sidecar, "m01")
    assert (still.decision, still.reason) == (pb.DECISION_ALLOW, pb.REASON_OK)
    assert "m01" in listed_ids(sidecar)

    rotated_in = add_contacts(sidecar, pb.CONTACT_SOURCE_API, ["m11", "m12", "m13"])
    assert (rotated_in.decision, rotated_in.reason) == (pb.DECISION_ALLOW, pb.REASON_OVERAGE)
    assert figures(rotated_in.usage) == (13, 13, pb.USAGE_STATE_IN_OVERAGE, 3, "0.00", 1)
    undone = record(sidecar, pb.ACTIVITY_KIND_MARKETING_STATUS_SET, ["m04"], marketing=True, source_type="USER")
    assert undone.usage.active_contacts == 13
    assert not contact(sidecar, "m04").marketing_until_next_update

    clock.set(NEXT_CYCLE - timedelta(seconds=1))
    assert send(sidecar, "m01").decision == pb.DECISION_ALLOW
    assert usage(sidecar).active_contacts == 13

    clock.set(NEXT_CYCLE)
    switched = usage(sidecar)
    assert figures(switched) == (10, 10, pb.USAGE_STATE_AT_LIMIT, 0, "0.00", 0)
    m01 = contact(sidecar, "m01")
    assert (m01.held, m01.marketing, m01.marketing_until_next_update) == (True, False, False)
    assert (m01.marketing_source_type, m01.marketing_source_id) == ("USER", "u-1")
    assert contact(sidecar, "m04").marketing
    refused = send(sidecar, "m01")
    assert (refused.decision, refused.reason) == (pb.DECISION_DENY, pb.REASON_NOT_MARKETING_CONTACT)
    assert listed_ids(sidecar) == ids("m", 4, 13)
    march = invoice(sidecar, START)
    assert figures(march.usage) == (13, 13, pb.USAGE_STATE_IN_OVERAGE, 3, "0.00", 2)
    assert invoice_lines(march)[1:] == [
        ("Highest marketing contacts this cycle", 13, "0.00", "0.00", ""),
        ("Overage contacts", 3, "0.00", "0.00", ""),
    ]

    back = record(sidecar, pb.ACTIVITY_KIND_MARKETING_STATUS_SET, ["m01"], marketing=True, source_type="WORKFLOW")
    assert figures(back.usage) == (11, 11, pb.USAGE_STATE_IN_OVERAGE, 1, "0.00", 0)
    assert send(sidecar, "m01").decision == pb.DECISION_ALLOW
    assert invoice(sidecar, START) == march


def test_model4_figures_survive_a_restart(sidecar: RunningSidecar, clock: FakeClock) -> None:
    """MK-1, MK-5, MK-6: after a restart on the same ledger the marketing count, peak, invoice and a contact's
    pending switch read the same, and the switch still happens at the next cycle start."""
    put_marketing_contacts(sidecar, overage_unit_price="2.00", currency="USD")
    add_contacts(sidecar, pb.CONTACT_SOURCE_API, ids("m", 1, 11))
    add_contacts(sidecar, pb.CONTACT_SOURCE_API, ["n01"], marketing=False)
    record(sidecar, pb.ACTIVITY_KIND_MARKETING_STATUS_SET, ["m01"], marketing=False, source_type="USER", source_id="u")
    before = readings(sidecar)
    assert figures(before.usage) == (11, 11, pb.USAGE_STATE_IN_OVERAGE, 1, "2.00", 0)
    pending = contact(sidecar, "m01")

    with restarted(sidecar) as again:
        assert readings(again) == before
        assert contact(again, "m01") == pending
        clock.set(NEXT_CYCLE)
        assert figures(usage(again)) == (10, 10, pb.USAGE_STATE_AT_LIMIT, 0, "0.00", 0)
        assert not contact(again, "m01").marketing
        assert invoice(again, START) == before.invoice
