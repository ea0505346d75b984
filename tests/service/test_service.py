"""The quota.v1 services over a real gRPC channel (free TCP port or Unix socket)."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.server.domain.clock import FakeClock

from support.oracle import TenantRows, assert_figures_equal_rows
from support.sidecar import START, RunningSidecar, start_sidecar

HARD = dict(
    plan_name="P",
    metering=pb.METERING_CYCLE_ACTIVE,
    enforcement=pb.ENFORCEMENT_HARD,
    counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN, pb.MESSAGE_KIND_AUTOMATION],
    counted_activities=[pb.ACTIVITY_KIND_MESSAGE_SENT, pb.ACTIVITY_KIND_NOTE_ADDED],
)


def send(s: RunningSidecar, contact: str, tenant: str = "t", **extra: object) -> pb.CheckSendResponse:
    request = pb.CheckSendRequest(
        tenant_id=tenant,
        contact_id=contact,
        channel=pb.CHANNEL_EMAIL,
        kind=extra.pop("kind", pb.MESSAGE_KIND_CAMPAIGN),
        **extra,
    )
    return s.quota().CheckSend(request, timeout=10)


def status_of(call) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def figures_and_rows(sidecar: RunningSidecar, tenant: str = "t") -> TenantRows:
    """What the sidecar's ledger holds for the tenant, once every figure equals its rows (support/oracle.py)."""
    return assert_figures_equal_rows(sidecar.sidecar.ledger)[tenant]


def tenants(sidecar: RunningSidecar) -> list[str]:
    return sidecar.sidecar.ledger.read(lambda reader: reader.tenants())


def test_sg2_sg8_check_send_counts_new_contacts_once_and_denies_past_the_limit(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("t", contact_limit=2, **HARD)
    first = send(sidecar, "a")
    assert (first.decision, first.reason, first.newly_active) == (
        pb.DECISION_ALLOW,
        pb.REASON_NEW_CONTACT_COUNTED,
        True,
    )
    assert first.usage.active_contacts == 1 and first.usage.sends == 1
    again = send(sidecar, "a")
    assert (again.decision, again.reason, again.newly_active) == (pb.DECISION_ALLOW, pb.REASON_ALREADY_ACTIVE, False)
    assert again.usage.active_contacts == 1 and again.usage.sends == 2
    send(sidecar, "b")
    denied = send(sidecar, "c")
    assert (denied.decision, denied.reason) == (pb.DECISION_DENY, pb.REASON_CONTACT_LIMIT_REACHED)
    assert denied.usage.active_contacts == 2
    assert denied.usage.state == pb.USAGE_STATE_AT_LIMIT
    assert denied.usage.usage_ratio == 1.0


def test_uncounted_kind_is_allowed_and_touches_no_figure(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("t", contact_limit=1, **HARD)
    send(sidecar, "a")
    r = send(sidecar, "b", kind=pb.MESSAGE_KIND_TRANSACTIONAL)
    assert (r.decision, r.reason) == (pb.DECISION_ALLOW, pb.REASON_NOT_COUNTED)
    assert (r.usage.active_contacts, r.usage.sends) == (1, 1)


def test_sg5_dry_run_batch_reports_without_counting(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("t", contact_limit=3, **HARD)
    send(sidecar, "a")
    request = pb.CheckSendBatchRequest(
        tenant_id="t",
        channel=pb.CHANNEL_EMAIL,
        kind=pb.MESSAGE_KIND_CAMPAIGN,
        contact_ids=["a", "b", "c", "b", "d"],
        dry_run=True,
    )
    r = sidecar.quota().CheckSendBatch(request, timeout=10)
    assert [(x.contact_id, x.reason) for x in r.results] == [
        ("a", pb.REASON_ALREADY_ACTIVE),
        ("b", pb.REASON_NEW_CONTACT_COUNTED),
        ("c", pb.REASON_NEW_CONTACT_COUNTED),
        ("b", pb.REASON_NEW_CONTACT_COUNTED),
        ("d", pb.REASON_CONTACT_LIMIT_REACHED),
    ]
    assert [x.newly_active for x in r.results] == [False, True, True, False, False]
    assert (r.allowed, r.denied, r.newly_active) == (4, 1, 2)
    usage = sidecar.quota().GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=5).usage
    assert (usage.active_contacts, usage.sends) == (1, 1)
    single = send(sidecar, "z", dry_run=True)
    assert single.reason == pb.REASON_NEW_CONTACT_COUNTED and single.usage.active_contacts == 2
    assert sidecar.quota().GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=5).usage.active_contacts == 1


def test_batch_counts_duplicates_once_in_request_order(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("t", contact_limit=2, **HARD)
    request = pb.CheckSendBatchRequest(
        tenant_id="t", channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN, contact_ids=["x", "y", "x", "z"]
    )
    r = sidecar.quota().CheckSendBatch(request, timeout=10)
    assert [x.contact_id for x in r.results] == ["x", "y", "x", "z"]
    assert [x.decision for x in r.results] == [
        pb.DECISION_ALLOW,
        pb.DECISION_ALLOW,
        pb.DECISION_ALLOW,
        pb.DECISION_DENY,
    ]
    assert (r.allowed, r.denied, r.newly_active) == (3, 1, 2)
    assert (r.usage.active_contacts, r.usage.sends) == (2, 2)
    assert [(a.contact_id, a.sends) for a in figures_and_rows(sidecar).activations()] == [("x", 1), ("y", 1)]


def test_request_id_retry_returns_first_answer_and_counts_once(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("t", contact_limit=5, **HARD)
    first = send(sidecar, "a", request_id="msg-1")
    retry = send(sidecar, "a", request_id="msg-1")
    assert retry == first
    assert retry.reason == pb.REASON_NEW_CONTACT_COUNTED and retry.newly_active
    usage = sidecar.quota().GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=5).usage
    assert (usage.active_contacts, usage.sends) == (1, 1)
    err = status_of(lambda: send(sidecar, "b", request_id="msg-1"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.details()
    batch = pb.CheckSendBatchRequest(
        tenant_id="t",
        channel=pb.CHANNEL_EMAIL,
        kind=pb.MESSAGE_KIND_CAMPAIGN,
        contact_ids=["c", "d"],
        request_id="msg-1",
    )
    b1 = sidecar.quota().CheckSendBatch(batch, timeout=5)
    b2 = sidecar.quota().CheckSendBatch(batch, timeout=5)
    assert b1 == b2 and b1.newly_active == 2
    activity = pb.RecordActivityRequest(
        tenant_id="t", kind=pb.ACTIVITY_KIND_NOTE_ADDED, contact_ids=["e"], request_id="act-1"
    )
    assert sidecar.quota().RecordActivity(activity, timeout=5) == sidecar.quota().RecordActivity(activity, timeout=5)
    usage = sidecar.quota().GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=5).usage
    assert (usage.active_contacts, usage.sends) == (4, 3)


def test_sg4_plan_upgrade_mid_cycle_raises_limits_at_once(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("t", contact_limit=1, sends_per_contact=2, **HARD)
    send(sidecar, "a")
    send(sidecar, "a")
    blocked = send(sidecar, "a")
    assert (blocked.decision, blocked.reason) == (pb.DECISION_DENY, pb.REASON_SENDS_LIMIT_REACHED)
    assert blocked.usage.state == pb.USAGE_STATE_BLOCKED and blocked.usage.sends_limit == 2
    upgraded = sidecar.put_plan("t", contact_limit=2, sends_per_contact=2, **HARD)
    assert upgraded.usage.sends_limit == 4 and upgraded.usage.contact_limit == 2
    assert (
        upgraded.plan.cycle_anchor
        == sidecar.admin().GetPlan(pb.GetPlanRequest(tenant_id="t"), metadata=sidecar.auth, timeout=5).plan.cycle_anchor
    )
    assert send(sidecar, "a").decision == pb.DECISION_ALLOW
    assert send(sidecar, "b").reason == pb.REASON_NEW_CONTACT_COUNTED


def test_sg7_cycle_boundary_resets_count_and_past_cycle_stays_readable(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("t", contact_limit=1, **HARD)
    send(sidecar, "a")
    assert send(sidecar, "b").decision == pb.DECISION_DENY
    past_start = send(sidecar, "a").usage.cycle_start
    sidecar.clock.set(START + timedelta(days=31))
    fresh = send(sidecar, "b")
    assert fresh.reason == pb.REASON_NEW_CONTACT_COUNTED and fresh.usage.active_contacts == 1
    assert fresh.usage.cycle_start.ToDatetime() > past_start.ToDatetime()
    old = sidecar.quota().GetUsage(pb.GetUsageRequest(tenant_id="t", cycle_start=past_start), timeout=5).usage
    assert (old.active_contacts, old.sends, old.cycle_start) == (1, 2, past_start)


def test_record_activity_books_into_cycle_of_occurred_at_and_is_never_refused(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("t", contact_limit=1, **HARD)
    send(sidecar, "a")
    r = sidecar.quota().RecordActivity(
        pb.RecordActivityRequest(tenant_id="t", kind=pb.ACTIVITY_KIND_MESSAGE_SENT, contact_ids=["b", "c", "a", "b"]),
        timeout=5,
    )
    assert (r.recorded, r.newly_active, r.usage.active_contacts) == (3, 2, 3)
    sidecar.clock.set(START + timedelta(days=40))
    earlier = pb.RecordActivityRequest(tenant_id="t", kind=pb.ACTIVITY_KIND_NOTE_ADDED, contact_ids=["d"])
    earlier.occurred_at.FromDatetime(START + timedelta(days=1))
    booked = sidecar.quota().RecordActivity(earlier, timeout=5)
    assert booked.newly_active == 1 and booked.usage.active_contacts == 4
    assert booked.usage.cycle_start.ToDatetime(tzinfo=START.tzinfo) <= START
    now = sidecar.quota().GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=5).usage
    assert now.active_contacts == 0


def test_admin_contact_and_active_contacts_pages(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("t", contact_limit=100, **HARD)
    ids = [f"c{i:03d}" for i in range(25)]
    sidecar.quota().CheckSendBatch(
        pb.CheckSendBatchRequest(
            tenant_id="t", channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN, contact_ids=ids
        ),
        timeout=10,
    )
    admin = sidecar.admin()
    seen: list[str] = []
    token = ""
    while True:
        page = admin.ListActiveContacts(
            pb.ListActiveContactsRequest(tenant_id="t", page_size=10, page_token=token),
            metadata=sidecar.auth,
            timeout=5,
        )
        seen += [c.contact_id for c in page.contacts]
        assert all(c.activity == "CAMPAIGN" for c in page.contacts)
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    contact = admin.GetContact(
        pb.GetContactRequest(tenant_id="t", contact_id="c003"), metadata=sidecar.auth, timeout=5
    ).contact
    assert contact.active_this_cycle and contact.activated_at.ToDatetime(tzinfo=START.tzinfo) == START
    err = status_of(
        lambda: admin.GetContact(
            pb.GetContactRequest(tenant_id="t", contact_id="nobody"), metadata=sidecar.auth, timeout=5
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_invalid_argument_names_the_field_and_counts_nothing(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("t", contact_limit=5, **HARD)
    cases = {
        "contact_id": pb.CheckSendRequest(tenant_id="t", contact_id="", channel=1, kind=1),
        "tenant_id": pb.CheckSendRequest(tenant_id="x" * 257, contact_id="a", channel=1, kind=1),
        "channel": pb.CheckSendRequest(tenant_id="t", contact_id="a", kind=1),
        "kind": pb.CheckSendRequest(tenant_id="t", contact_id="a", channel=1, kind=99),
    }
    for field, request in cases.items():
        err = status_of(lambda request=request: sidecar.quota().CheckSend(request, timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith(field)
        detail = rpc_status.from_call(err).details[0]
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad) and bad.field_violations[0].field == field
    too_big = pb.CheckSendBatchRequest(tenant_id="t", channel=1, kind=1, contact_ids=[f"c{i}" for i in range(10_001)])
    err = status_of(lambda: sidecar.quota().CheckSendBatch(too_big, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("contact_ids")
    err = status_of(lambda: sidecar.put_plan("t", contact_limit=-1, **HARD))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "plan.contact_limit" in err.details()
    err = status_of(lambda: sidecar.put_plan("t", contact_limit=5, grace_percent=150, **HARD))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "plan.grace_percent" in err.details()
    assert list(figures_and_rows(sidecar).activations()) == []
    assert (
        sidecar.admin().GetPlan(pb.GetPlanRequest(tenant_id="t"), metadata=sidecar.auth, timeout=5).plan.contact_limit
        == 5
    )


def test_input_is_validated_before_the_tenant_is_looked_up(sidecar: RunningSidecar) -> None:
    err = status_of(lambda: sidecar.quota().CheckSend(pb.CheckSendRequest(tenant_id="ghost", contact_id=""), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = status_of(lambda: send(sidecar, "a", tenant="ghost"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "ghost" in err.details()
    for call in (
        lambda: sidecar.quota().GetUsage(pb.GetUsageRequest(tenant_id="ghost"), timeout=5),
        lambda: sidecar.quota().RecordActivity(
            pb.RecordActivityRequest(tenant_id="ghost", kind=pb.ACTIVITY_KIND_NOTE_ADDED, contact_ids=["a"]), timeout=5
        ),
        lambda: sidecar.admin().GetPlan(pb.GetPlanRequest(tenant_id="ghost"), metadata=sidecar.auth, timeout=5),
    ):
        assert status_of(call).code() == grpc.StatusCode.NOT_FOUND


def test_admin_calls_need_the_token(sidecar: RunningSidecar) -> None:
    admin = sidecar.admin()
    request = pb.GetPlanRequest(tenant_id="t")
    assert status_of(lambda: admin.GetPlan(request, timeout=5)).code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer nope"),)
    assert status_of(lambda: admin.GetPlan(request, metadata=wrong, timeout=5)).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    plan = pb.PutPlanRequest(tenant_id="t", plan=pb.Plan(contact_limit=5, **HARD))
    assert status_of(lambda: admin.PutPlan(plan, timeout=5)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert tenants(sidecar) == []


def test_admin_calls_refused_when_no_token_is_configured(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from quota_sidecar.server.app import Sidecar
    from quota_sidecar.server.settings import Settings

    settings = Settings(address="127.0.0.1:0", ledger=str(tmp_path / "l.db"), metrics_address="").validate()
    s = Sidecar(settings, clock=FakeClock(START), registry=CollectorRegistry())
    s.start()
    try:
        with grpc.insecure_channel(s.address) as ch:
            from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc

            err = status_of(
                lambda: pb_grpc.QuotaAdminServiceStub(ch).GetPlan(
                    pb.GetPlanRequest(tenant_id="t"), metadata=(("authorization", "Bearer x"),), timeout=5
                )
            )
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "--admin-token" in err.details()
    finally:
        s.stop(0)


CONTACT_LIMIT = dict(preset="contact-limit", plan_name="P", contact_limit=3)
LONG_ID = "x" * 257


def add(
    s: RunningSidecar, source: int, ids: list[str], tenant: str = "t", **extra: object
) -> pb.CheckContactAddResponse:
    request = pb.CheckContactAddRequest(tenant_id=tenant, source=source, contact_ids=ids, **extra)
    return s.quota().CheckContactAdd(request, timeout=10)


def held_usage(s: RunningSidecar, tenant: str = "t") -> pb.Usage:
    return s.quota().GetUsage(pb.GetUsageRequest(tenant_id=tenant), timeout=5).usage


def _add_request(**fields: object) -> pb.CheckContactAddRequest:
    return pb.CheckContactAddRequest(
        **{"tenant_id": "t", "source": pb.CONTACT_SOURCE_API, "contact_ids": ["n"], **fields}
    )


def _far_future() -> pb.GetInvoiceRequest:
    request = pb.GetInvoiceRequest(tenant_id="t")
    request.cycle_start.seconds = 253_402_300_800
    return request


BAD_INPUT = {
    "add: missing source": ("CheckContactAdd", _add_request(source=0), "source"),
    "add: unknown source number": ("CheckContactAdd", _add_request(source=99), "source"),
    "add: no contact_ids": ("CheckContactAdd", _add_request(contact_ids=[]), "contact_ids"),
    "add: an empty id": ("CheckContactAdd", _add_request(contact_ids=["n", ""]), "contact_ids[1]"),
    "add: an over-long id": ("CheckContactAdd", _add_request(contact_ids=[LONG_ID]), "contact_ids[0]"),
    "add: over 10,000 ids": (
        "CheckContactAdd",
        _add_request(contact_ids=[f"n{i}" for i in range(10_001)]),
        "contact_ids",
    ),
    "add: empty tenant_id": ("CheckContactAdd", _add_request(tenant_id=""), "tenant_id"),
    "add: over-long tenant_id": ("CheckContactAdd", _add_request(tenant_id=LONG_ID), "tenant_id"),
    "add: over-long request_id": ("CheckContactAdd", _add_request(request_id=LONG_ID), "request_id"),
    "add: unknown tenant, bad source": ("CheckContactAdd", _add_request(tenant_id="ghost", source=99), "source"),
    "enroll: empty contact_id": (
        "CheckEnroll",
        pb.CheckEnrollRequest(tenant_id="t", contact_id="", automation_id="welcome"),
        "contact_id",
    ),
    "enroll: over-long contact_id": (
        "CheckEnroll",
        pb.CheckEnrollRequest(tenant_id="t", contact_id=LONG_ID, automation_id="welcome"),
        "contact_id",
    ),
    "enroll: over-long automation_id": (
        "CheckEnroll",
        pb.CheckEnrollRequest(tenant_id="t", contact_id="a", automation_id=LONG_ID),
        "automation_id",
    ),
    "enroll: empty tenant_id": (
        "CheckEnroll",
        pb.CheckEnrollRequest(tenant_id="", contact_id="a", automation_id="welcome"),
        "tenant_id",
    ),
    "enroll: unknown tenant, empty contact_id": (
        "CheckEnroll",
        pb.CheckEnrollRequest(tenant_id="ghost", contact_id="", automation_id="welcome"),
        "contact_id",
    ),
    "invoice: empty tenant_id": ("GetInvoice", pb.GetInvoiceRequest(tenant_id=""), "tenant_id"),
    "invoice: over-long tenant_id": ("GetInvoice", pb.GetInvoiceRequest(tenant_id=LONG_ID), "tenant_id"),
    "invoice: cycle_start past year 9999": ("GetInvoice", _far_future(), "cycle_start"),
}


@pytest.mark.parametrize("rpc, request_, field", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_contact_add_enroll_and_invoice_refuse_bad_input_naming_the_field_and_change_nothing(
    sidecar: RunningSidecar, rpc: str, request_: object, field: str
) -> None:
    """AC-2..AC-5, AC-8, CR-6: bad input is INVALID_ARGUMENT naming the field, with a
    google.rpc.BadRequest detail, checked before the tenant is looked up; nothing is added."""
    sidecar.put_plan("t", **CONTACT_LIMIT)
    add(sidecar, pb.CONTACT_SOURCE_API, ["a"])
    before = sidecar.rows()
    stub = sidecar.admin() if rpc == "GetInvoice" else sidecar.quota()
    err = status_of(lambda: getattr(stub, rpc)(request_, metadata=sidecar.auth, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}: ")
    bad = error_details_pb2.BadRequest()
    assert rpc_status.from_call(err).details[0].Unpack(bad)
    assert [violation.field for violation in bad.field_violations] == [field]
    assert sidecar.rows() == before
    assert held_usage(sidecar).active_contacts == 1


def test_contact_add_enroll_and_invoice_of_a_tenant_without_a_plan_are_not_found(sidecar: RunningSidecar) -> None:
    """AC-2, AC-8, CR-6: a tenant with no plan is NOT_FOUND for every RPC, and nothing is stored for it."""
    q, a = sidecar.quota(), sidecar.admin()
    fresh = sidecar.rows()
    for call in (
        lambda: q.CheckContactAdd(_add_request(tenant_id="ghost"), timeout=5),
        lambda: q.CheckContactAdd(_add_request(tenant_id="ghost", dry_run=True), timeout=5),
        lambda: q.CheckEnroll(pb.CheckEnrollRequest(tenant_id="ghost", contact_id="a", automation_id="w"), timeout=5),
        lambda: a.GetInvoice(pb.GetInvoiceRequest(tenant_id="ghost"), metadata=sidecar.auth, timeout=5),
    ):
        err = status_of(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "ghost" in err.details()
    assert sidecar.rows() == fresh


def test_get_invoice_needs_the_admin_token_CR_6(sidecar: RunningSidecar) -> None:
    """CR-6: the invoice is control-plane data: UNAUTHENTICATED without the admin token,
    PERMISSION_DENIED with a wrong one, and the lines with the right one."""
    sidecar.put_plan("t", **CONTACT_LIMIT)
    admin = sidecar.admin()
    request = pb.GetInvoiceRequest(tenant_id="t")
    assert status_of(lambda: admin.GetInvoice(request, timeout=5)).code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer nope"),)
    err = status_of(lambda: admin.GetInvoice(request, metadata=wrong, timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert admin.GetInvoice(request, metadata=sidecar.auth, timeout=5).lines[0].quantity == 3


def test_contact_add_request_id_retry_returns_the_first_answer_and_adds_nothing_AC_4(sidecar: RunningSidecar) -> None:
    """AC-4, AC-10: a CheckContactAdd repeated with its request_id gets the first answer,
    ALLOW or DENY, whatever happened since, and adds nothing; the id cannot be reused
    for other contacts."""
    sidecar.put_plan("t", **CONTACT_LIMIT)
    first = add(sidecar, pb.CONTACT_SOURCE_IMPORT, ["a", "b"], request_id="import-1")
    assert (first.decision, first.reason, first.added) == (pb.DECISION_ALLOW, pb.REASON_OK, 2)
    assert first.usage.active_contacts == 2
    assert add(sidecar, pb.CONTACT_SOURCE_IMPORT, ["a", "b"], request_id="import-1") == first
    assert [c.contact_id for c in figures_and_rows(sidecar).held] == ["a", "b"]

    assert add(sidecar, pb.CONTACT_SOURCE_API, ["c"]).usage.active_contacts == 3
    assert add(sidecar, pb.CONTACT_SOURCE_IMPORT, ["a", "b"], request_id="import-1") == first
    assert held_usage(sidecar).active_contacts == 3

    err = status_of(lambda: add(sidecar, pb.CONTACT_SOURCE_IMPORT, ["d"], request_id="import-1"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("request_id")

    refused = add(sidecar, pb.CONTACT_SOURCE_IMPORT, ["d", "e"], request_id="import-2")
    assert (refused.decision, refused.reason, refused.added) == (pb.DECISION_DENY, pb.REASON_IMPORT_EXCEEDS_LIMIT, 0)
    sidecar.quota().RecordActivity(
        pb.RecordActivityRequest(tenant_id="t", kind=pb.ACTIVITY_KIND_CONTACT_DELETED, contact_ids=["a", "b"]),
        timeout=5,
    )
    assert held_usage(sidecar).active_contacts == 1
    assert add(sidecar, pb.CONTACT_SOURCE_IMPORT, ["d", "e"], request_id="import-2") == refused
    assert held_usage(sidecar).active_contacts == 1
    allowed = add(sidecar, pb.CONTACT_SOURCE_IMPORT, ["d", "e"], request_id="import-3")
    assert (allowed.decision, allowed.added, allowed.usage.active_contacts) == (pb.DECISION_ALLOW, 2, 3)
    assert len(figures_and_rows(sidecar).held) == 3


PRESET_ERRORS = {
    "plan.preset": dict(preset="no-such-preset", contact_limit=5),
    "plan.contact_limit": dict(preset="active-cycle-overage", plan_name="PRO"),
    "plan.marketing_contacts_only": dict(preset="active-cycle-hard", contact_limit=5, marketing_contacts_only=True),
    "plan.counted_activities": dict(
        preset="contact-limit", contact_limit=5, counted_activities=[pb.ACTIVITY_KIND_NOTE_ADDED]
    ),
    "plan.grace_percent": dict(preset="marketing-contacts", contact_limit=5, grace_percent=10),
    "plan.overage_unit_price": dict(preset="active-cycle-overage", plan_name="START", overage_unit_price="-0.25"),
}


@pytest.mark.parametrize("field, plan", PRESET_ERRORS.items(), ids=PRESET_ERRORS.keys())
def test_a_preset_plan_that_makes_no_sense_is_refused_naming_the_field(
    sidecar: RunningSidecar, field: str, plan: dict
) -> None:
    """CR-3, CR-6, MK-1, AC-7: a preset with contradicting or missing settings is
    INVALID_ARGUMENT naming the plan field, and the tenant keeps its plan."""
    stored = sidecar.put_plan("t", **CONTACT_LIMIT).plan
    err = status_of(lambda: sidecar.put_plan("t", **plan))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(f"{field}: ")
    bad = error_details_pb2.BadRequest()
    assert rpc_status.from_call(err).details[0].Unpack(bad) and bad.field_violations[0].field == field
    assert sidecar.admin().GetPlan(pb.GetPlanRequest(tenant_id="t"), metadata=sidecar.auth, timeout=5).plan == stored


@pytest.mark.parametrize("use_batches", [False, True])
def test_sg2_racing_callers_never_over_admit(sidecar: RunningSidecar, use_batches: bool) -> None:
    sidecar.put_plan("t", contact_limit=50, **HARD)
    allowed: list[str] = []
    lock = threading.Lock()
    stub = sidecar.quota()

    def worker(n: int) -> None:
        ids = [f"w{n}-c{i}" for i in range(10)]
        if use_batches:
            r = stub.CheckSendBatch(
                pb.CheckSendBatchRequest(tenant_id="t", channel=1, kind=1, contact_ids=ids), timeout=30
            )
            got = [x.contact_id for x in r.results if x.decision == pb.DECISION_ALLOW]
        else:
            got = [
                c
                for c in ids
                if stub.CheckSend(
                    pb.CheckSendRequest(tenant_id="t", contact_id=c, channel=1, kind=1), timeout=30
                ).decision
                == pb.DECISION_ALLOW
            ]
        with lock:
            allowed.extend(got)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 50 == len(set(allowed))
    found = figures_and_rows(sidecar)
    assert found.active_ids() == set(allowed)
    assert found.figures() == [(50, 50, 50, 50)]


def test_health_serving_and_reflection_lists_the_services(sidecar: RunningSidecar) -> None:
    health = health_pb2_grpc.HealthStub(sidecar.channel())
    for service in ("", "quota.v1.QuotaService", "quota.v1.QuotaAdminService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(sidecar.channel())
    answer = next(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {"quota.v1.QuotaService", "quota.v1.QuotaAdminService", "grpc.health.v1.Health"} <= names


# grpc.reflection.v1's messages (grpc-proto, grpc/reflection/v1/reflection.proto) carry the
# same fields under the same numbers as v1alpha's, so v1alpha's classes speak v1 on the wire.
V1_REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1_REQUEST_FIELDS = {
    "host": 1,
    "file_by_filename": 3,
    "file_containing_symbol": 4,
    "file_containing_extension": 5,
    "all_extension_numbers_of_type": 6,
    "list_services": 7,
}
V1_RESPONSE_FIELDS = {
    "valid_host": 1,
    "original_request": 2,
    "file_descriptor_response": 4,
    "all_extension_numbers_response": 5,
    "list_services_response": 6,
    "error_response": 7,
}


def test_reflection_answers_v1_and_v1alpha_clients_alike(sidecar: RunningSidecar) -> None:
    """Issue 17 item 2: grpcurl, Postman and buf curl ask grpc.reflection.v1 first; a v1 client
    lists the services (v1 among them) and gets the file defining QuotaService and the one
    defining v1's own service (package grpc.reflection.v1, the published field numbers); a
    v1alpha client gets the same answers."""
    fields = {f.name: f.number for f in reflection_pb2.ServerReflectionRequest.DESCRIPTOR.fields}
    assert fields == V1_REQUEST_FIELDS
    assert {f.name: f.number for f in reflection_pb2.ServerReflectionResponse.DESCRIPTOR.fields} == V1_RESPONSE_FIELDS
    v1 = sidecar.channel().stream_stream(
        V1_REFLECTION,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    v1alpha = reflection_pb2_grpc.ServerReflectionStub(sidecar.channel()).ServerReflectionInfo
    asked = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="quota.v1.QuotaService"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    ]
    answers = {name: list(call(iter(asked), timeout=5)) for name, call in (("v1", v1), ("v1alpha", v1alpha))}
    for name, (listed, quota, reflection) in answers.items():
        services = {s.name for s in listed.list_services_response.service}
        assert {
            "quota.v1.QuotaService",
            "quota.v1.QuotaAdminService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services, name
        (quota_file,) = [
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in quota.file_descriptor_response.file_descriptor_proto[:1]
        ]
        assert quota_file.package == "quota.v1", name
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in reflection.file_descriptor_response.file_descriptor_proto
        ]
        (v1_file,) = [f for f in files if f.package == "grpc.reflection.v1"]
        messages = {m.name: {f.name: f.number for f in m.field} for m in v1_file.message_type}
        assert messages["ServerReflectionRequest"] == V1_REQUEST_FIELDS, name
        assert messages["ServerReflectionResponse"] == V1_RESPONSE_FIELDS, name
        assert [m.input_type for m in v1_file.service[0].method] == [".grpc.reflection.v1.ServerReflectionRequest"]


def test_unavailable_when_the_ledger_is_closed(sidecar: RunningSidecar) -> None:
    sidecar.put_plan("t", contact_limit=5, **HARD)
    sidecar.sidecar.ledger.close()
    err = status_of(lambda: send(sidecar, "a"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "quota.sock"
    s = start_sidecar(tmp_path / "ledger.db", FakeClock(START), address=f"unix://{sock}")
    try:
        s.put_plan("t", contact_limit=1, **HARD)
        assert send(s, "a").reason == pb.REASON_NEW_CONTACT_COUNTED
        assert send(s, "b").reason == pb.REASON_CONTACT_LIMIT_REACHED
    finally:
        s.stop()


def test_metrics_count_calls_and_decisions(sidecar_with_metrics: RunningSidecar) -> None:
    import urllib.request

    sidecar_with_metrics.put_plan("t", contact_limit=1, **HARD)
    send(sidecar_with_metrics, "a")
    send(sidecar_with_metrics, "b")
    text = urllib.request.urlopen(sidecar_with_metrics.metrics_url, timeout=5).read().decode()
    assert 'quota_decisions_total{decision="ALLOW",method="CheckSend",reason="NEW_CONTACT_COUNTED"} 1.0' in text
    assert 'quota_decisions_total{decision="DENY",method="CheckSend",reason="CONTACT_LIMIT_REACHED"} 1.0' in text
    assert 'quota_calls_total{code="OK",method="CheckSend"} 2.0' in text
    assert 'quota_call_duration_seconds_bucket{le="0.0005",method="CheckSend"}' in text
    assert "quota_ledger_commit_batch_size_count" in text
    # The dedupe filters are the SQLite backend's (its collector); PostgreSQL keeps none.
    assert ("quota_dedupe_filter_items" in text) == sidecar_with_metrics.ledger_url.startswith("sqlite:")
    assert '"a"' not in text and '"b"' not in text


def test_large_calls_work_in_turn_and_one_waiting_past_its_deadline_counts_nothing(sidecar: RunningSidecar) -> None:
    """One large call (more contacts than a unit) works at a time, so several do not each hold
    the interpreter in turn while a small call waits; a small call never waits for that
    turn, and a large call whose deadline passes while it waits is DEADLINE_EXCEEDED with
    nothing counted (SG-1: nobody was told of a decision)."""
    sidecar.put_plan("t", contact_limit=10_000, **HARD)
    sidecar.put_plan("other", contact_limit=10, **HARD)
    large = pb.CheckSendBatchRequest(
        tenant_id="t",
        contact_ids=[f"c{i}" for i in range(sidecar.sidecar.engine.unit_contacts + 1)],
        channel=pb.CHANNEL_EMAIL,
        kind=pb.MESSAGE_KIND_CAMPAIGN,
    )
    stub = sidecar.quota()
    turn = sidecar.sidecar.quota_service.large_calls
    with turn:
        assert send(sidecar, "x", tenant="other").decision == pb.DECISION_ALLOW
        late = status_of(lambda: stub.CheckSendBatch(large, timeout=0.5))
        assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        usage = stub.GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=10).usage
        assert usage.active_contacts == 0
    answer = stub.CheckSendBatch(large, timeout=30)
    assert answer.allowed == len(large.contact_ids)
    assert stub.GetUsage(pb.GetUsageRequest(tenant_id="t"), timeout=10).usage.active_contacts == answer.allowed
