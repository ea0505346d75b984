"""Client-side coalescing of CheckSend (QuotaClient and AsyncQuotaClient, `coalesce=True`)
against the real sidecar over a real channel.

A recording proxy (a real gRPC server in front of the sidecar) shows what goes over the
wire and can hold calls until the test lets them go, which is how a test makes callers
arrive while another call is in flight without relying on timing. The client lets two
calls of one tenant, channel and kind be in flight, so a queue that is full
(`coalesce_max`) leaves while the first call is held; the tests give it a window far
longer than they run, so that no queue leaves for the window's sake. Rule ids refer to
domain.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from quota_sidecar.api.v1 import quota_pb2
from quota_sidecar.client import (
    AsyncQuotaClient,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Plan,
    QuotaClient,
    Retry,
    SendDecision,
    Unavailable,
)

from support.proxy import Proxy
from support.refusing_server import EAGER_RETRY

TENANT = "tenant-1"
PLAN = Plan(
    plan_name="P",
    metering="CYCLE_ACTIVE",
    enforcement="HARD",
    contact_limit=100,
    counted_kinds=("CAMPAIGN", "AUTOMATION"),
)
TIMEOUT = 5.0
# Longer than any test runs: a queue then leaves only when it is full.
NEVER = 600.0


@pytest.fixture
def admin(sidecar) -> Iterator[QuotaClient]:
    """A client straight to the sidecar, coalescing off, where TENANT has PLAN."""
    with QuotaClient(sidecar.address, admin_token=sidecar.admin_token, timeout=TIMEOUT, coalesce=False) as client:
        client.put_plan(TENANT, PLAN)
        yield client


def in_threads(*calls: Callable[[], Any]) -> tuple[list[threading.Thread], list[Any]]:
    """Starts each call in its own thread; the list fills with each one's result or exception."""
    results: list[Any] = [None] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, call), daemon=True) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    return threads, results


def joined(threads: list[threading.Thread]) -> bool:
    for thread in threads:
        thread.join(TIMEOUT * 2)
    return not any(thread.is_alive() for thread in threads)


def sends(client: QuotaClient, contacts: Iterable[str], tenant: str = TENANT, kind: str = "CAMPAIGN") -> list:
    """One check_send per contact, to run in threads."""
    return [lambda c=c: client.check_send(tenant, c, kind) for c in contacts]


def first_in_flight(proxy: Proxy, client: QuotaClient, tenant: str = TENANT, kind: str = "CAMPAIGN") -> tuple:
    """Starts a check_send for c0 that goes out alone, and waits until the proxy holds it:
    callers that come next queue behind it."""
    started = in_threads(*sends(client, ["c0"], tenant, kind))
    proxy.wait_for("the first CheckSend", lambda p: len(p.sent("CheckSend")) == 1)
    return started


def a_batch(proxy: Proxy) -> bool:
    return len(proxy.sent("CheckSendBatch")) >= 1


def test_a_lone_caller_sends_a_plain_check_send_at_once(admin: QuotaClient, proxies) -> None:
    """A caller with nobody else calling gets exactly what it got before coalescing: its
    call goes out at once as its own CheckSend, with its own request_id, and is counted
    once (SG-8)."""
    proxy = proxies()
    with QuotaClient(proxy.address, timeout=TIMEOUT) as client:
        assert client.coalesce is True
        first = client.check_send(TENANT, "c1", "CAMPAIGN")
        again = client.check_send(TENANT, "c1", "CAMPAIGN")
    assert (first.decision, first.reason, first.newly_active) == ("ALLOW", "NEW_CONTACT_COUNTED", True)
    assert (again.decision, again.reason, again.newly_active) == ("ALLOW", "ALREADY_ACTIVE", False)
    assert isinstance(first.raw, quota_pb2.CheckSendResponse)
    assert [name for name, _ in proxy.calls] == ["CheckSend", "CheckSend"]
    ids = [request.request_id for request in proxy.sent("CheckSend")]
    assert all(len(request_id) == 32 for request_id in ids) and ids[0] != ids[1]
    usage = admin.get_usage(TENANT)
    assert (usage.active_contacts, usage.sends) == (1, 2)


def test_concurrent_callers_share_one_batch_and_each_gets_its_own_answer_SG_8(admin: QuotaClient, proxies) -> None:
    """Mail workers calling at the same time are merged into one CheckSendBatch with a
    fresh request_id, and each gets the SendDecision a CheckSend of its own would have
    given: an already-active contact ALREADY_ACTIVE, a new one NEW_CONTACT_COUNTED, with
    the usage figures and a CheckSendResponse as `raw` (SG-8)."""
    admin.check_send_batch(TENANT, ["c1", "c2"], "CAMPAIGN")
    proxy = proxies(holding=True)
    contacts = ["c1", "c2", "c3", "c4", "c5", "c6"]
    with QuotaClient(proxy.address, timeout=TIMEOUT, coalesce_window=NEVER, coalesce_max=len(contacts)) as client:
        first, first_result = first_in_flight(proxy, client)
        threads, results = in_threads(*sends(client, contacts))
        proxy.wait_for("a CheckSendBatch", a_batch)
        proxy.release()
        assert joined(first + threads)

    for contact, result in zip(contacts, results, strict=True):
        assert isinstance(result, SendDecision), result
        assert result.decision == "ALLOW" and result.fallback is False
        expected = ("ALREADY_ACTIVE", False) if contact in ("c1", "c2") else ("NEW_CONTACT_COUNTED", True)
        assert (result.reason, result.newly_active) == expected, contact
        assert isinstance(result.raw, quota_pb2.CheckSendResponse)
        assert result.raw.decision == quota_pb2.DECISION_ALLOW
        assert result.usage is not None and result.usage.active_contacts >= 6
    assert first_result[0].reason == "NEW_CONTACT_COUNTED"

    (batch,) = proxy.sent("CheckSendBatch")
    assert sorted(batch.contact_ids) == contacts
    assert len(batch.request_id) == 32 and not batch.dry_run
    assert batch.request_id not in {request.request_id for request in proxy.sent("CheckSend")}
    usage = admin.get_usage(TENANT)
    assert (usage.active_contacts, usage.sends) == (7, 2 + 1 + 6)


@pytest.mark.parametrize("coalesce", [True, False])
def test_two_sends_to_one_contact_count_as_two_sends_SG_3_SG_8(admin: QuotaClient, proxies, coalesce: bool) -> None:
    """Two concurrent sends to one contact are two messages: counted as two sends and one
    activation (SG-3, SG-8), the same with coalescing as without. A batch never lists a
    contact twice (the sidecar would repeat the first decision and count it once)."""
    proxy = proxies(holding=True)
    with QuotaClient(
        proxy.address, timeout=TIMEOUT, coalesce=coalesce, coalesce_window=NEVER, coalesce_max=2
    ) as client:
        first, _ = first_in_flight(proxy, client)
        contacts = ["c1", "c1", "c2", "c2"]
        threads, results = in_threads(*sends(client, contacts))
        proxy.wait_for("every call", lambda p: len(p.calls) >= (2 if coalesce else 5))
        proxy.release()
        assert joined(first + threads)

    assert all(isinstance(result, SendDecision) and result.decision == "ALLOW" for result in results), results
    for contact in ("c1", "c2"):
        mine = [r for c, r in zip(contacts, results, strict=True) if c == contact]
        assert sorted(r.reason for r in mine) == ["ALREADY_ACTIVE", "NEW_CONTACT_COUNTED"]
        assert sorted(r.newly_active for r in mine) == [False, True]
    for batch in proxy.sent("CheckSendBatch"):
        assert len(set(batch.contact_ids)) == len(batch.contact_ids)
    assert bool(proxy.sent("CheckSendBatch")) is coalesce
    usage = admin.get_usage(TENANT)
    assert (usage.active_contacts, usage.sends) == (3, 5)


def test_dry_runs_queued_emails_and_callers_request_ids_are_never_merged_SG_5_AC_9(
    sidecar, admin: QuotaClient, proxies
) -> None:
    """A dry run (SG-5), an automation e-mail with `queued_since` (AC-9 needs it; a batch
    has none) and a call with the caller's own request_id (a retry with it must get the
    first answer) each go out as their own CheckSend even while another call is in flight,
    exactly as given."""
    proxy = proxies(holding=True)
    queued = sidecar.clock.now() - timedelta(hours=1)
    with QuotaClient(proxy.address, timeout=TIMEOUT, coalesce_window=NEVER, coalesce_max=2) as client:
        first, _ = first_in_flight(proxy, client, kind="AUTOMATION")
        threads, results = in_threads(
            lambda: client.check_send(TENANT, "c1", "AUTOMATION", dry_run=True),
            lambda: client.check_send(TENANT, "c2", "AUTOMATION", queued_since=queued),
            lambda: client.check_send(TENANT, "c3", "AUTOMATION", request_id="send-c3"),
        )
        proxy.wait_for("four CheckSend calls", lambda p: len(p.sent("CheckSend")) == 4)
        proxy.release()
        assert joined(first + threads)
        repeat = client.check_send(TENANT, "c3", "AUTOMATION", request_id="send-c3")

    assert proxy.sent("CheckSendBatch") == []
    dry, waited, chosen = sorted(proxy.sent("CheckSend")[1:4], key=lambda request: request.contact_id)
    assert (dry.dry_run, dry.request_id) == (True, "")
    assert waited.HasField("queued_since") and len(waited.request_id) == 32
    assert chosen.request_id == "send-c3"
    assert [result.decision for result in results] == ["ALLOW", "ALLOW", "ALLOW"]
    assert (repeat.reason, repeat.newly_active) == ("NEW_CONTACT_COUNTED", True)
    usage = admin.get_usage(TENANT)
    assert (usage.active_contacts, usage.sends) == (3, 3)


def test_a_batch_refused_for_one_callers_input_fails_only_that_caller(admin: QuotaClient, proxies) -> None:
    """When one caller's contact_id is invalid the sidecar refuses the whole batch
    (INVALID_ARGUMENT, nothing counted); every caller still gets what it would have got
    alone: the others are asked again one by one and counted, only the bad one raises."""
    proxy = proxies(holding=True)
    contacts = ["c1", "", "c2"]
    with QuotaClient(proxy.address, timeout=TIMEOUT, coalesce_window=NEVER, coalesce_max=3) as client:
        first, _ = first_in_flight(proxy, client)
        threads, results = in_threads(*sends(client, contacts))
        proxy.wait_for("a CheckSendBatch", a_batch)
        proxy.release()
        assert joined(first + threads)

    good, bad, other = results
    assert isinstance(bad, InvalidArgument) and "contact_id" in bad.message
    for result in (good, other):
        assert isinstance(result, SendDecision)
        assert (result.decision, result.reason, result.fallback) == ("ALLOW", "NEW_CONTACT_COUNTED", False)
    (batch,) = proxy.sent("CheckSendBatch")
    assert sorted(batch.contact_ids) == ["", "c1", "c2"]
    assert sorted(request.contact_id for request in proxy.sent("CheckSend")[1:]) == ["", "c1", "c2"]
    usage = admin.get_usage(TENANT)
    assert (usage.active_contacts, usage.sends) == (3, 3)


def test_a_tenant_without_a_plan_is_not_found_for_every_merged_caller(admin: QuotaClient, proxies) -> None:
    """NOT_FOUND for the tenant reaches every caller of the batch, as it would each alone."""
    proxy = proxies(holding=True)
    with QuotaClient(proxy.address, timeout=TIMEOUT, coalesce_window=NEVER, coalesce_max=3) as client:
        first, first_result = first_in_flight(proxy, client, "no-such-tenant")
        threads, results = in_threads(*sends(client, ("c1", "c2", "c3"), "no-such-tenant"))
        proxy.wait_for("a CheckSendBatch", a_batch)
        proxy.release()
        assert joined(first + threads)
    for result in first_result + results:
        assert isinstance(result, NotFound) and "no-such-tenant" in result.message
    assert len(proxy.sent("CheckSendBatch")) == 1 and len(proxy.sent("CheckSend")) == 1


def test_a_retried_batch_counts_nothing_twice_SG_8(admin: QuotaClient, proxies) -> None:
    """A batch whose answer is lost (UNAVAILABLE after the sidecar committed) is retried
    with the same request_id, so the sidecar returns its first answer and counts nothing
    twice (SG-8); every caller gets its real decision."""
    proxy = proxies(holding=True, lose_method="CheckSendBatch", lose=1)
    retry = Retry(attempts=3, backoff=0.01)
    with QuotaClient(proxy.address, timeout=TIMEOUT, retries=retry, coalesce_window=NEVER, coalesce_max=3) as client:
        first, _ = first_in_flight(proxy, client)
        threads, results = in_threads(*sends(client, ("c1", "c2", "c3")))
        proxy.wait_for("a CheckSendBatch", a_batch)
        proxy.release()
        assert joined(first + threads)

    for result in results:
        assert isinstance(result, SendDecision) and (result.reason, result.fallback) == ("NEW_CONTACT_COUNTED", False)
    sent, retried = proxy.sent("CheckSendBatch")
    assert sent.request_id and retried.request_id == sent.request_id
    assert list(retried.contact_ids) == list(sent.contact_ids)
    usage = admin.get_usage(TENANT)
    assert (usage.active_contacts, usage.sends) == (4, 4)


@pytest.mark.parametrize("fail_mode, decision", [("closed", "DENY"), ("open", "ALLOW")])
def test_a_batch_the_sidecar_never_answers_gives_each_caller_its_fallback(
    sidecar, admin: QuotaClient, proxies, fail_mode: str, decision: str
) -> None:
    """UNAVAILABLE after the retries: each merged caller gets the client's fail-open or
    fail-closed decision marked `fallback=True`, as a CheckSend of its own would."""
    proxy = proxies(holding=True)
    retry = Retry(attempts=2, backoff=0.01)
    with QuotaClient(
        proxy.address, timeout=TIMEOUT, retries=retry, fail_mode=fail_mode, coalesce_window=NEVER, coalesce_max=3
    ) as client:
        first, first_result = first_in_flight(proxy, client)
        threads, results = in_threads(*sends(client, ("c1", "c2", "c3")))
        proxy.wait_for("a CheckSendBatch", a_batch)
        sidecar.stop()
        proxy.release()
        assert joined(first + threads)
    for result in first_result + results:
        assert isinstance(result, SendDecision), result
        assert (result.decision, result.reason, result.fallback) == (decision, "UNSPECIFIED", True)
        assert isinstance(result.error, Unavailable) and result.usage is None and result.raw is None
    assert len(proxy.sent("CheckSendBatch")) == 2


def test_a_callers_timeout_bounds_its_wait_queue_included(admin: QuotaClient, proxies) -> None:
    """A caller never waits past its own timeout, whether its call went out in a batch
    that has not come back or is still queued: it gets its fallback (DeadlineExceeded)
    while the proxy still holds every call. A caller with more time, in the same batch,
    still gets its answer."""
    proxy = proxies(holding=True)
    with QuotaClient(proxy.address, timeout=TIMEOUT * 4, coalesce_window=NEVER, coalesce_max=2) as client:
        first, first_result = first_in_flight(proxy, client)
        batched, batched_results = in_threads(
            lambda: client.check_send(TENANT, "c1", "CAMPAIGN", timeout=0.3),
            lambda: client.check_send(TENANT, "c2", "CAMPAIGN"),
        )
        proxy.wait_for("a CheckSendBatch", a_batch)
        queued, queued_results = in_threads(lambda: client.check_send(TENANT, "c3", "CAMPAIGN", timeout=0.3))
        assert joined([batched[0], queued[0]])
        assert first[0].is_alive() and batched[1].is_alive()
        proxy.release()
        assert joined(first + batched)

    for result in (batched_results[0], queued_results[0]):
        assert isinstance(result, SendDecision), result
        assert (result.decision, result.fallback) == ("DENY", True)
        assert isinstance(result.error, DeadlineExceeded)
    for result in (first_result[0], batched_results[1]):
        assert isinstance(result, SendDecision) and (result.decision, result.fallback) == ("ALLOW", False)
    assert sorted(proxy.sent("CheckSendBatch")[0].contact_ids) == ["c1", "c2"]


def test_counting_under_a_hard_limit_is_the_same_as_without_coalescing_SG_2_SG_3_SG_8(sidecar) -> None:
    """Many workers sending to a mix of new and already-active contacts under a HARD
    contact limit and a sends allowance: the new contacts allowed never exceed the limit
    (SG-2), the sends allowed never exceed the allowance and are metered apart from the
    contacts (SG-3), each contact is counted once however often it is mailed (SG-8), and
    the answers add up to the usage figures; with coalescing exactly as without."""
    limit, sends_limit, workers, sends_each = 20, 100, 8, 30
    rng = random.Random(5)
    plans = [[f"c{rng.randrange(40)}" for _ in range(sends_each)] for _ in range(workers)]
    with QuotaClient(sidecar.address, admin_token=sidecar.admin_token, timeout=TIMEOUT, coalesce=False) as admin:
        for coalesce in (True, False):
            tenant = f"tenant-coalesce-{coalesce}"
            admin.put_plan(tenant, dataclasses.replace(PLAN, contact_limit=limit, sends_limit=sends_limit))
            with QuotaClient(sidecar.address, timeout=TIMEOUT, coalesce=coalesce) as client:

                def worker(contacts: list[str], tenant: str = tenant, client: QuotaClient = client) -> list:
                    return [(c, client.check_send(tenant, c, "CAMPAIGN")) for c in contacts]

                threads, results = in_threads(*(lambda p=p: worker(p) for p in plans))
                assert joined(threads)
            answers = [answer for result in results for answer in result]
            assert all(isinstance(d, SendDecision) and d.fallback is False for _, d in answers)
            allowed = [(c, d) for c, d in answers if d.decision == "ALLOW"]
            activated = [c for c, d in answers if d.newly_active]
            assert {d.reason for _, d in answers if d.decision != "ALLOW"} <= {
                "CONTACT_LIMIT_REACHED",
                "SENDS_LIMIT_REACHED",
            }
            assert len(activated) == len(set(activated)) == limit
            assert {c for c, _ in allowed} == set(activated)
            usage = admin.get_usage(tenant)
            assert (usage.active_contacts, usage.sends) == (limit, len(allowed))
            assert len(allowed) <= sends_limit
            if any(d.reason == "SENDS_LIMIT_REACHED" for _, d in answers):
                assert len(allowed) == sends_limit


def test_a_deferred_automation_email_gets_its_retry_after_AC_9(admin: QuotaClient, proxies) -> None:
    """An automation e-mail a limit defers gets DEFER with `retry_after`, as from a CheckSend
    of its own (AC-9), though the batch's results carry no retry_after."""
    admin.put_plan(TENANT, dataclasses.replace(PLAN, contact_limit=1))
    admin.check_send(TENANT, "c0", "CAMPAIGN")
    proxy = proxies(holding=True)
    with QuotaClient(proxy.address, timeout=TIMEOUT, coalesce_window=NEVER, coalesce_max=2) as client:
        first, first_result = first_in_flight(proxy, client, kind="AUTOMATION")
        threads, results = in_threads(*sends(client, ("a1", "a2"), kind="AUTOMATION"))
        proxy.wait_for("a CheckSendBatch", a_batch)
        proxy.release()
        assert joined(first + threads)
    assert first_result[0].reason == "ALREADY_ACTIVE"
    for result in results:
        assert isinstance(result, SendDecision)
        assert (result.decision, result.reason) == ("DEFER", "CONTACT_LIMIT_REACHED")
        assert isinstance(result.retry_after, timedelta) and result.retry_after > timedelta(0)
    usage = admin.get_usage(TENANT)
    assert (usage.active_contacts, usage.sends) == (1, 2)


def test_close_answers_every_waiting_caller(admin: QuotaClient, proxies) -> None:
    """Closing the client while callers wait (in flight alone, in flight in a batch, or
    queued) leaves none hanging until its deadline: each gets an answer or an error."""
    proxy = proxies(holding=True)
    client = QuotaClient(proxy.address, timeout=NEVER, coalesce_window=NEVER, coalesce_max=2)
    first, first_result = first_in_flight(proxy, client)
    batched, batched_results = in_threads(*sends(client, ("c1", "c2")))
    proxy.wait_for("a CheckSendBatch", a_batch)
    queued, queued_results = in_threads(*sends(client, ("c3", "c4")))
    client.close()
    assert joined(first + batched + queued)
    for result in first_result + batched_results + queued_results:
        assert isinstance(result, (SendDecision, Exception)) and result is not None


def test_coalescing_settings_are_checked_when_built() -> None:
    """A window or batch size the client cannot use fails at construction, not later; a
    batch of at most one call is no coalescing."""
    with pytest.raises(ValueError, match="coalesce_window"):
        QuotaClient("127.0.0.1:1", coalesce_window=-1)
    with pytest.raises(ValueError, match="coalesce_max"):
        QuotaClient("127.0.0.1:1", coalesce_max=0)
    with pytest.raises(ValueError, match="coalesce_max"):
        AsyncQuotaClient("127.0.0.1:1", coalesce_max=10_001)
    assert QuotaClient("127.0.0.1:1", coalesce=False).coalesce is False
    assert QuotaClient("127.0.0.1:1", coalesce_max=1).coalesce is False
    assert QuotaClient("127.0.0.1:1").coalesce is True


def test_async_callers_share_batches_and_each_gets_its_own_answer_SG_3_SG_8(admin: QuotaClient, proxies) -> None:
    """The asyncio client merges concurrent coroutines the same way: one batch per
    distinct set of contacts, each caller its own answer, two sends to one contact counted
    as two sends and one activation (SG-3, SG-8)."""
    proxy = proxies(holding=True)
    contacts = ["c1", "c1", "c2", "c2", "c3", "c3"]

    async def scenario() -> list[Any]:
        async with AsyncQuotaClient(proxy.address, timeout=TIMEOUT, coalesce_window=NEVER, coalesce_max=3) as client:
            first = asyncio.ensure_future(client.check_send(TENANT, "c0", "CAMPAIGN"))
            await asyncio.to_thread(proxy.wait_for, "the first CheckSend", lambda p: len(p.sent("CheckSend")) == 1)
            calls = [asyncio.ensure_future(client.check_send(TENANT, c, "CAMPAIGN")) for c in contacts]
            await asyncio.to_thread(proxy.wait_for, "a CheckSendBatch", a_batch)
            proxy.release()
            return await asyncio.gather(first, *calls, return_exceptions=True)

    first, *results = asyncio.run(scenario())
    assert (first.reason, first.newly_active) == ("NEW_CONTACT_COUNTED", True)
    for contact in ("c1", "c2", "c3"):
        mine = [r for c, r in zip(contacts, results, strict=True) if c == contact]
        assert all(isinstance(r, SendDecision) and r.decision == "ALLOW" and not r.fallback for r in mine), mine
        assert sorted(r.reason for r in mine) == ["ALREADY_ACTIVE", "NEW_CONTACT_COUNTED"]
        assert all(isinstance(r.raw, quota_pb2.CheckSendResponse) and r.usage is not None for r in mine)
    batches = proxy.sent("CheckSendBatch")
    assert [sorted(batch.contact_ids) for batch in batches] == [["c1", "c2", "c3"], ["c1", "c2", "c3"]]
    assert len({batch.request_id for batch in batches}) == 2
    usage = admin.get_usage(TENANT)
    assert (usage.active_contacts, usage.sends) == (4, 7)


def test_async_refused_batch_unknown_tenant_and_deadline(admin: QuotaClient, proxies) -> None:
    """Over asyncio: a batch refused for one caller's input fails only that caller, the
    others asked again alone; an unknown tenant is every caller's NotFound; a caller whose
    timeout passes while queued gets its fallback."""
    proxy = proxies(holding=True)

    async def scenario() -> tuple[list[Any], list[Any], SendDecision]:
        async with AsyncQuotaClient(proxy.address, timeout=TIMEOUT, coalesce_window=NEVER, coalesce_max=3) as client:
            first = asyncio.ensure_future(client.check_send(TENANT, "c0", "CAMPAIGN"))
            await asyncio.to_thread(proxy.wait_for, "the first CheckSend", lambda p: len(p.sent("CheckSend")) == 1)
            refused = [asyncio.ensure_future(client.check_send(TENANT, c, "CAMPAIGN")) for c in ("c1", "", "c2")]
            lost = [asyncio.ensure_future(client.check_send("no-such-tenant", c, "CAMPAIGN")) for c in "wxyz"]
            await asyncio.to_thread(proxy.wait_for, "two batches", lambda p: len(p.sent("CheckSendBatch")) == 2)
            expired = await client.check_send(TENANT, "c9", "CAMPAIGN", timeout=0.2)
            proxy.release()
            return (
                await asyncio.gather(first, *refused, return_exceptions=True),
                await asyncio.gather(*lost, return_exceptions=True),
                expired,
            )

    refused, lost, expired = asyncio.run(scenario())
    first, good, bad, other = refused
    assert isinstance(bad, InvalidArgument)
    assert all(isinstance(r, SendDecision) and r.reason == "NEW_CONTACT_COUNTED" for r in (first, good, other))
    assert all(isinstance(r, NotFound) for r in lost)
    late = expired
    assert (late.decision, late.fallback) == ("DENY", True) and isinstance(late.error, DeadlineExceeded)
    usage = admin.get_usage(TENANT)
    assert (usage.active_contacts, usage.sends) == (3, 3)


def test_async_close_answers_every_waiting_caller(admin: QuotaClient, proxies) -> None:
    """Closing the asyncio client while coroutines wait leaves none hanging until its deadline."""
    proxy = proxies(holding=True)

    async def scenario() -> list[Any]:
        client = AsyncQuotaClient(proxy.address, timeout=NEVER, coalesce_window=NEVER, coalesce_max=2)
        first = asyncio.ensure_future(client.check_send(TENANT, "c0", "CAMPAIGN"))
        await asyncio.to_thread(proxy.wait_for, "the first CheckSend", lambda p: len(p.sent("CheckSend")) == 1)
        calls = [asyncio.ensure_future(client.check_send(TENANT, c, "CAMPAIGN")) for c in ("c1", "c2", "c3", "c4")]
        await asyncio.to_thread(proxy.wait_for, "a CheckSendBatch", a_batch)
        await client.close()
        return await asyncio.wait_for(asyncio.gather(first, *calls, return_exceptions=True), TIMEOUT * 2)

    results = asyncio.run(scenario())
    assert len(results) == 5 and all(result is not None for result in results)


def test_merged_callers_retry_and_fall_back_within_their_timeout(refusing_server) -> None:
    """A sidecar answering UNAVAILABLE after 80 ms: the lone CheckSend and the batch of the
    callers queued behind it each retry only within their one deadline, every try sent with
    what remains of it, and every caller gets its fallback."""
    contacts = [f"c{i}" for i in range(5)]
    with QuotaClient(
        refusing_server.address, retries=EAGER_RETRY, timeout=0.1, coalesce_window=NEVER, coalesce_max=4
    ) as client:
        threads, results = in_threads(*sends(client, contacts))
        assert joined(threads)
    assert all(isinstance(r, SendDecision) and (r.decision, r.fallback) == ("DENY", True) for r in results), results
    assert {method for method, _, _ in refusing_server.attempts} == {"CheckSend", "CheckSendBatch"}
    refusing_server.assert_each_call_kept_one_deadline(0.1)


def test_async_merged_callers_retry_and_fall_back_within_their_timeout(refusing_server) -> None:
    async def scenario() -> list[Any]:
        async with AsyncQuotaClient(
            refusing_server.address, retries=EAGER_RETRY, timeout=0.1, coalesce_window=NEVER, coalesce_max=4
        ) as client:
            calls = [client.check_send(TENANT, f"c{i}", "CAMPAIGN") for i in range(5)]
            return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), TIMEOUT * 2)

    results = asyncio.run(scenario())
    assert all(isinstance(r, SendDecision) and (r.decision, r.fallback) == ("DENY", True) for r in results), results
    assert {method for method, _, _ in refusing_server.attempts} == {"CheckSend", "CheckSendBatch"}
    refusing_server.assert_each_call_kept_one_deadline(0.1)
