"""Races at the ceiling: many callers over real channels to one real sidecar, released
together by a barrier, competing for a tenant's last places. Whatever the interleaving,
no more new contacts are admitted than the ceiling leaves, exactly that many when demand
exceeds it, and the stored figures equal both the acknowledged answers and the ledger's
rows. Rule ids refer to domain.md.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import grpc
import pytest

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc

from support.oracle import TenantRows, assert_figures_equal_rows
from support.sidecar import RunningSidecar

CALLERS = 20
ROUNDS = 3
LIMIT = 50
ALREADY_USED = 40
DEMAND = 200
GRACE_PERCENT = 10
PRICE = "0.25"
SEND_TIMEOUT = 30.0

ENFORCEMENT = {"HARD": pb.ENFORCEMENT_HARD, "GRACE": pb.ENFORCEMENT_GRACE, "OVERAGE": pb.ENFORCEMENT_OVERAGE}
LIMIT_REASON = {"HARD": pb.REASON_CONTACT_LIMIT_REACHED, "GRACE": pb.REASON_OVER_GRACE}
CEILING = {"HARD": LIMIT, "GRACE": LIMIT + LIMIT * GRACE_PERCENT // 100, "OVERAGE": None}


@dataclass(frozen=True)
class Answer:
    """One acknowledged decision: a single check, one entry of a batch, or a whole contact add.
    `counted` is `newly_active` (0 or 1) for a send and `added` for a contact add."""

    rpc: str
    contact_ids: tuple[str, ...]
    decision: int
    reason: int
    counted: int
    usage: pb.Usage

    @property
    def allowed(self) -> bool:
        return self.decision == pb.DECISION_ALLOW


Job = Callable[[pb_grpc.QuotaServiceStub], list[Answer]]


def send(tenant: str, contact: str) -> Job:
    def call(stub: pb_grpc.QuotaServiceStub) -> list[Answer]:
        request = pb.CheckSendRequest(
            tenant_id=tenant, contact_id=contact, channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN
        )
        r = stub.CheckSend(request, timeout=SEND_TIMEOUT)
        return [Answer("CheckSend", (contact,), r.decision, r.reason, int(r.newly_active), r.usage)]

    return call


def send_batch(tenant: str, contacts: list[str]) -> Job:
    def call(stub: pb_grpc.QuotaServiceStub) -> list[Answer]:
        request = pb.CheckSendBatchRequest(
            tenant_id=tenant, contact_ids=contacts, channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN
        )
        r = stub.CheckSendBatch(request, timeout=SEND_TIMEOUT)
        assert [x.contact_id for x in r.results] == contacts
        assert r.allowed == sum(x.decision == pb.DECISION_ALLOW for x in r.results)
        assert r.newly_active == sum(x.newly_active for x in r.results)
        return [
            Answer("CheckSendBatch", (x.contact_id,), x.decision, x.reason, int(x.newly_active), r.usage)
            for x in r.results
        ]

    return call


def add(tenant: str, source: int, contacts: list[str]) -> Job:
    def call(stub: pb_grpc.QuotaServiceStub) -> list[Answer]:
        request = pb.CheckContactAddRequest(tenant_id=tenant, source=source, contact_ids=contacts)
        r = stub.CheckContactAdd(request, timeout=SEND_TIMEOUT)
        return [Answer("CheckContactAdd", tuple(contacts), r.decision, r.reason, r.added, r.usage)]

    return call


def enroll(tenant: str, contact: str) -> Job:
    def call(stub: pb_grpc.QuotaServiceStub) -> list[Answer]:
        request = pb.CheckEnrollRequest(tenant_id=tenant, contact_id=contact, automation_id="welcome")
        r = stub.CheckEnroll(request, timeout=SEND_TIMEOUT)
        return [Answer("CheckEnroll", (contact,), r.decision, r.reason, 0, r.usage)]

    return call


def race(address: str, jobs: list[Job], seed: int) -> list[Answer]:
    """Deals the jobs, shuffled, to CALLERS threads, each with its own channel; releases them
    together with a barrier and returns every answer. Any error fails the race."""
    jobs = list(jobs)
    random.Random(seed).shuffle(jobs)
    hands = [jobs[i::CALLERS] for i in range(CALLERS)]
    barrier = threading.Barrier(CALLERS)
    answers: list[Answer] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def caller(hand: list[Job]) -> None:
        try:
            with grpc.insecure_channel(address) as channel:
                grpc.channel_ready_future(channel).result(timeout=10)
                stub = pb_grpc.QuotaServiceStub(channel)
                barrier.wait(timeout=20)
                mine = [answer for job in hand for answer in job(stub)]
            with lock:
                answers.extend(mine)
        except BaseException as exc:
            barrier.abort()
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=caller, args=(hand,), daemon=True) for hand in hands]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a racing caller hung"
    assert errors == []
    return answers


def mixed_sends(tenant: str, contacts: list[str], batch_size: int = 5) -> list[Job]:
    """Half the contacts as single CheckSends, the other half in CheckSendBatch calls."""
    half = len(contacts) // 2
    singles = [send(tenant, c) for c in contacts[:half]]
    rest = contacts[half:]
    batches = [send_batch(tenant, rest[i : i + batch_size]) for i in range(0, len(rest), batch_size)]
    return singles + batches


def put_plan(sidecar: RunningSidecar, tenant: str, **fields: object) -> None:
    sidecar.put_plan(tenant, plan_name="P", **fields)


def usage(sidecar: RunningSidecar, tenant: str) -> pb.Usage:
    return sidecar.quota().GetUsage(pb.GetUsageRequest(tenant_id=tenant), timeout=10).usage


def activation_rows(sidecar: RunningSidecar, tenant: str) -> tuple[dict[str, int], tuple[int, int]]:
    """The tenant's activation rows (contact -> sends) and its stored (active_contacts, sends),
    read through the ledger once every figure equals its rows (support/oracle.py)."""
    cycles = [rows for rows in figures_and_rows(sidecar, tenant).cycles.values() if not rows.empty]
    assert len(cycles) == 1
    return {a.contact_id: a.sends for a in cycles[0].activations}, cycles[0].stored


def held_rows(sidecar: RunningSidecar, tenant: str) -> tuple[set[str], int, int]:
    """The tenant's held contacts and its stored held count, read through the ledger once every
    figure equals its rows, and the sends its audit rows add up to (the audit is the
    store's alone: the ledger interface writes it and never reads it back)."""
    found = figures_and_rows(sidecar, tenant)
    assert found.holdings is not None
    [(sends,)] = sidecar.query("SELECT COALESCE(SUM(sends_delta), 0) FROM audit WHERE tenant_id = ?", tenant)
    return {c.contact_id for c in found.held}, found.holdings.held, sends


def figures_and_rows(sidecar: RunningSidecar, tenant: str) -> TenantRows:
    return assert_figures_equal_rows(sidecar.sidecar.ledger)[tenant]


def preload_sends(sidecar: RunningSidecar, tenant: str, contacts: list[str], times: int = 1) -> None:
    stub = sidecar.quota()
    for _ in range(times):
        r = stub.CheckSendBatch(
            pb.CheckSendBatchRequest(
                tenant_id=tenant, contact_ids=contacts, channel=pb.CHANNEL_EMAIL, kind=pb.MESSAGE_KIND_CAMPAIGN
            ),
            timeout=10,
        )
        assert r.allowed == len(contacts)


def preload_held(sidecar: RunningSidecar, tenant: str, contacts: list[str]) -> None:
    r = sidecar.quota().CheckContactAdd(
        pb.CheckContactAddRequest(tenant_id=tenant, source=pb.CONTACT_SOURCE_API, contact_ids=contacts), timeout=10
    )
    assert (r.decision, r.added) == (pb.DECISION_ALLOW, len(contacts))


@pytest.mark.parametrize("enforcement", ["HARD", "GRACE", "OVERAGE"])
def test_racing_sends_to_new_contacts_never_pass_the_ceiling_and_fill_it_exactly_SG_2_SG_8_SG_10_AC_7_CR_5_CR_6(
    sidecar: RunningSidecar, enforcement: str
) -> None:
    """SG-2 (HARD), AC-7 (GRACE: 10% over the limit) and CR-5/CR-6 (OVERAGE: no ceiling,
    the excess billed): 200 new contacts race, as single CheckSends and CheckSendBatches,
    for the 10 places (15 under GRACE) left by 40 active contacts. Exactly that many are
    admitted, each counted once (SG-8), the rest denied with the enforcement's reason;
    under OVERAGE all are admitted and exactly the 190 past the limit are billed. Contacts
    already active keep being mailed (SG-10), enrolment checks agree with the figures they
    report (AC-8), and GetUsage equals the acknowledged answers and the ledger's rows."""
    ceiling = CEILING[enforcement]
    extra: dict[str, object] = {}
    if enforcement == "GRACE":
        extra["grace_percent"] = GRACE_PERCENT
    if enforcement == "OVERAGE":
        extra.update(overage_unit_price=PRICE, currency="EUR")
    for round_ in range(ROUNDS):
        tenant = f"t{round_}"
        put_plan(
            sidecar,
            tenant,
            metering=pb.METERING_CYCLE_ACTIVE,
            enforcement=ENFORCEMENT[enforcement],
            contact_limit=LIMIT,
            counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
            **extra,
        )
        known = [f"p{i}" for i in range(ALREADY_USED)]
        preload_sends(sidecar, tenant, known)
        new = [f"n{i}" for i in range(DEMAND)]
        fresh = set(new)
        again = [send(tenant, c) for c in known[:CALLERS]]
        enrolments = [enroll(tenant, f"e{i}") for i in range(CALLERS)]
        answers = race(sidecar.address, mixed_sends(tenant, new) + again + enrolments, seed=round_)

        sends_to_new = [a for a in answers if a.contact_ids[0] in fresh]
        assert len(sends_to_new) == DEMAND
        admitted = [a for a in sends_to_new if a.allowed]
        expected = DEMAND if ceiling is None else ceiling - ALREADY_USED
        assert len(admitted) == expected
        assert all(a.counted == 1 for a in admitted)
        refused = [a for a in sends_to_new if not a.allowed]
        if ceiling is None:
            reasons = sorted(a.reason for a in admitted)
            assert reasons.count(pb.REASON_NEW_CONTACT_COUNTED) == LIMIT - ALREADY_USED
            assert reasons.count(pb.REASON_OVERAGE) == ALREADY_USED + DEMAND - LIMIT
        else:
            assert {a.reason for a in admitted} == {pb.REASON_NEW_CONTACT_COUNTED}
            assert {(a.decision, a.reason, a.counted) for a in refused} == {
                (pb.DECISION_DENY, LIMIT_REASON[enforcement], 0)
            }
        singles = [a.usage.active_contacts for a in admitted if a.rpc == "CheckSend"]
        assert len(singles) == len(set(singles)), "two single sends reported the same count after activating"
        if ceiling is not None:
            assert all(a.usage.active_contacts <= ceiling for a in answers)

        repeats = [a for a in answers if a.rpc == "CheckSend" and a.contact_ids[0] in set(known)]
        assert {(a.decision, a.reason, a.counted) for a in repeats} == {
            (pb.DECISION_ALLOW, pb.REASON_ALREADY_ACTIVE, 0)
        }

        for a in (a for a in answers if a.rpc == "CheckEnroll"):
            room = ceiling is None or a.usage.active_contacts < ceiling
            assert (a.decision == pb.DECISION_ALLOW) == room
            if not room:
                assert a.reason == LIMIT_REASON[enforcement]

        figures = usage(sidecar, tenant)
        active = ALREADY_USED + len(admitted)
        assert (figures.active_contacts, figures.sends) == (active, active + len(repeats))
        assert figures.overage_contacts == max(0, active - LIMIT)
        state = {"HARD": pb.USAGE_STATE_AT_LIMIT, "GRACE": pb.USAGE_STATE_BLOCKED, "OVERAGE": pb.USAGE_STATE_IN_OVERAGE}
        assert figures.state == state[enforcement]
        if enforcement == "OVERAGE":
            excess = ALREADY_USED + DEMAND - LIMIT
            billed = str(Decimal(PRICE) * excess)
            assert (figures.overage_amount, figures.currency) == (billed, "EUR")
            invoice = sidecar.admin().GetInvoice(
                pb.GetInvoiceRequest(tenant_id=tenant), metadata=sidecar.auth, timeout=10
            )
            overage = [line for line in invoice.lines if line.description.startswith("Overage")]
            assert [(line.quantity, line.unit_price, line.amount) for line in overage] == [(excess, PRICE, billed)]

        rows, stored = activation_rows(sidecar, tenant)
        assert set(rows) == set(known) | {a.contact_ids[0] for a in admitted}
        assert stored == (len(rows), sum(rows.values())) == (figures.active_contacts, figures.sends)


@pytest.mark.parametrize("metering", ["CYCLE_ACTIVE", "HELD_CONTACTS"])
def test_racing_sends_never_pass_the_sends_limit_and_use_it_up_exactly_SG_3_SG_8(
    sidecar: RunningSidecar, metering: str
) -> None:
    """SG-3: sends are metered on their own. With 40 of 50 sends used, 200 sends race, to
    new contacts and to contacts already active (held, under HELD_CONTACTS), single and
    batched: exactly 10 are allowed, the rest denied SENDS_LIMIT_REACHED, and the stored
    sends equal the allowed answers and the ledger's rows; a contact activated by an
    allowed send is counted once (SG-8), a refused one not at all."""
    for round_ in range(ROUNDS):
        tenant = f"t{round_}"
        held = metering == "HELD_CONTACTS"
        put_plan(
            sidecar,
            tenant,
            metering=pb.METERING_HELD_CONTACTS if held else pb.METERING_CYCLE_ACTIVE,
            enforcement=pb.ENFORCEMENT_HARD,
            contact_limit=1000,
            sends_limit=LIMIT,
            counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
        )
        known = [f"p{i}" for i in range(10)]
        if held:
            preload_held(sidecar, tenant, known)
        preload_sends(sidecar, tenant, known, times=ALREADY_USED // len(known))
        to_known = [known[i % len(known)] for i in range(DEMAND if held else DEMAND // 2)]
        jobs = [send(tenant, c) for c in to_known[: len(to_known) // 2]]
        rest = to_known[len(to_known) // 2 :]
        jobs += [send_batch(tenant, rest[i : i + 5]) for i in range(0, len(rest), 5)]
        new = [] if held else [f"n{i}" for i in range(DEMAND // 2)]
        answers = race(sidecar.address, jobs + mixed_sends(tenant, new), seed=round_)

        assert len(answers) == DEMAND
        allowed = [a for a in answers if a.allowed]
        assert len(allowed) == LIMIT - ALREADY_USED
        assert {(a.decision, a.reason) for a in answers if not a.allowed} == {
            (pb.DECISION_DENY, pb.REASON_SENDS_LIMIT_REACHED)
        }
        assert all(a.usage.sends <= LIMIT for a in answers)
        figures = usage(sidecar, tenant)
        assert (figures.sends, figures.state) == (LIMIT, pb.USAGE_STATE_BLOCKED)
        if held:
            contacts, count, sends = held_rows(sidecar, tenant)
            assert contacts == set(known) and count == figures.active_contacts == len(known)
            assert sends == figures.sends
        else:
            activated = {a.contact_ids[0] for a in allowed if a.contact_ids[0] in set(new)}
            assert all(a.counted == (a.contact_ids[0] in set(new)) for a in allowed)
            rows, stored = activation_rows(sidecar, tenant)
            assert set(rows) == set(known) | activated
            assert stored == (len(rows), sum(rows.values())) == (figures.active_contacts, figures.sends)
            assert figures.active_contacts == len(known) + len(activated)


@pytest.mark.parametrize("enforcement", ["HARD", "GRACE", "OVERAGE"])
def test_racing_manual_adds_and_imports_never_pass_the_limit_and_fill_it_exactly_AC_4_AC_5(
    sidecar: RunningSidecar, enforcement: str
) -> None:
    """AC-5 (MANUAL: BLOCKED_AT_LIMIT) and AC-4 (IMPORT: REFUSE_IF_EXCEEDS, all or nothing)
    under HELD_CONTACTS, whatever the enforcement: with 40 of 50 contacts held, 200 new
    contacts race in single manual adds, single imports and imports of four. Exactly 10 are
    added, every refused request adds nothing and says why, and the held count equals the
    acknowledged adds and the ledger's rows."""
    extra: dict[str, object] = {"grace_percent": GRACE_PERCENT} if enforcement == "GRACE" else {}
    for round_ in range(ROUNDS):
        tenant = f"t{round_}"
        put_plan(
            sidecar,
            tenant,
            metering=pb.METERING_HELD_CONTACTS,
            enforcement=ENFORCEMENT[enforcement],
            contact_limit=LIMIT,
            counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
            source_rules=[
                pb.SourceRule(source=pb.CONTACT_SOURCE_MANUAL, policy=pb.SOURCE_POLICY_BLOCKED_AT_LIMIT),
                pb.SourceRule(source=pb.CONTACT_SOURCE_IMPORT, policy=pb.SOURCE_POLICY_REFUSE_IF_EXCEEDS),
            ],
            **extra,
        )
        known = [f"p{i}" for i in range(ALREADY_USED)]
        preload_held(sidecar, tenant, known)
        new = [f"n{i}" for i in range(DEMAND)]
        jobs = [add(tenant, pb.CONTACT_SOURCE_MANUAL, [c]) for c in new[:80]]
        jobs += [add(tenant, pb.CONTACT_SOURCE_IMPORT, [c]) for c in new[80:120]]
        jobs += [add(tenant, pb.CONTACT_SOURCE_IMPORT, new[i : i + 4]) for i in range(120, DEMAND, 4)]
        answers = race(sidecar.address, jobs, seed=round_)

        accepted = [a for a in answers if a.allowed]
        assert all(a.counted == len(a.contact_ids) and a.reason == pb.REASON_OK for a in accepted)
        assert sum(a.counted for a in accepted) == LIMIT - ALREADY_USED
        why = {
            pb.CONTACT_SOURCE_MANUAL: pb.REASON_SOURCE_BLOCKED,
            pb.CONTACT_SOURCE_IMPORT: pb.REASON_IMPORT_EXCEEDS_LIMIT,
        }
        for a in answers:
            assert a.usage.active_contacts <= LIMIT
            if not a.allowed:
                source = pb.CONTACT_SOURCE_MANUAL if a.contact_ids[0] in set(new[:80]) else pb.CONTACT_SOURCE_IMPORT
                assert (a.decision, a.reason, a.counted) == (pb.DECISION_DENY, why[source], 0)

        figures = usage(sidecar, tenant)
        assert figures.active_contacts == LIMIT and figures.overage_contacts == 0
        contacts, count, _ = held_rows(sidecar, tenant)
        assert contacts == set(known) | {c for a in accepted for c in a.contact_ids}
        assert count == len(contacts) == figures.active_contacts


@pytest.mark.parametrize("enforcement", ["HARD", "GRACE", "OVERAGE"])
def test_racing_sends_and_enrolments_stop_the_moment_api_adds_pass_the_ceiling_AC_2_AC_6_AC_7_AC_8(
    sidecar: RunningSidecar, enforcement: str
) -> None:
    """HELD_CONTACTS with the count at the ceiling (50 under HARD, 55 under GRACE: AC-7's
    10%; the limit under OVERAGE, which has none): 20 API adds (AC-2: accepted past the
    limit) race with campaign sends and enrolments to held contacts. Every add is accepted;
    every send and enrolment is allowed exactly when the count it reports is within the
    ceiling (AC-6, AC-8; always under OVERAGE), and the stored sends equal the allowed
    sends and the ledger's rows; under OVERAGE the excess over the limit is billed on the peak count."""
    ceiling = CEILING[enforcement]
    extra: dict[str, object] = {}
    if enforcement == "GRACE":
        extra["grace_percent"] = GRACE_PERCENT
    if enforcement == "OVERAGE":
        extra.update(overage_unit_price=PRICE, currency="EUR")
    start = ceiling if ceiling is not None else LIMIT
    adds = 20
    for round_ in range(ROUNDS):
        tenant = f"t{round_}"
        put_plan(
            sidecar,
            tenant,
            metering=pb.METERING_HELD_CONTACTS,
            enforcement=ENFORCEMENT[enforcement],
            contact_limit=LIMIT,
            counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
            **extra,
        )
        known = [f"p{i}" for i in range(start)]
        preload_held(sidecar, tenant, known)
        jobs = [add(tenant, pb.CONTACT_SOURCE_API, [f"n{i}"]) for i in range(adds)]
        jobs += mixed_sends(tenant, known[:40])
        jobs += [enroll(tenant, c) for c in known[40:50]]
        answers = race(sidecar.address, jobs, seed=round_)

        added = [a for a in answers if a.rpc == "CheckContactAdd"]
        assert {(a.decision, a.counted) for a in added} == {(pb.DECISION_ALLOW, 1)}
        checks = [a for a in answers if a.rpc != "CheckContactAdd"]
        assert len(checks) == 50
        for a in checks:
            within = ceiling is None or a.usage.active_contacts <= ceiling
            assert a.allowed == within, (a.rpc, a.usage.active_contacts)
            if not within:
                assert (a.decision, a.reason) == (pb.DECISION_DENY, LIMIT_REASON[enforcement])
        allowed_sends = sum(1 for a in checks if a.allowed and a.rpc != "CheckEnroll")

        figures = usage(sidecar, tenant)
        assert figures.active_contacts == start + adds
        assert figures.sends == allowed_sends
        if ceiling is None:
            excess = start + adds - LIMIT
            assert (figures.overage_contacts, figures.overage_amount) == (excess, str(Decimal(PRICE) * excess))
            assert figures.state == pb.USAGE_STATE_IN_OVERAGE
        else:
            assert figures.state == pb.USAGE_STATE_BLOCKED
            after = send(tenant, known[0])(sidecar.quota())[0]
            assert (after.decision, after.reason) == (pb.DECISION_DENY, LIMIT_REASON[enforcement])
        contacts, count, sends = held_rows(sidecar, tenant)
        assert count == len(contacts) == figures.active_contacts
        assert sends == figures.sends
