"""A fleet: three real `quota-sidecar serve` processes sharing one PostgreSQL ledger (a schema
of its own per test, dropped afterwards), called by client processes and load threads through
every sidecar. Exact at the HARD, grace and held-contacts limits whichever sidecar decides;
a request_id retried through another sidecar, a plan changed through one; `kill -9` of one
sidecar and a PostgreSQL restart under load lose nothing acknowledged. The oracles read the
ledger through its interface (PostgresLedger). Rule ids refer to domain.md.
"""

from __future__ import annotations

import multiprocessing
import random
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.server.domain.model import Activation, ContactRecord, Counters, Holdings
from quota_sidecar.server.ledger.postgres import PostgresLedger

from support.fleet import Answer, FleetSidecar, Load, check_send, put_plan, race, start_fleet, usage
from support.postgres import CLUSTER
from support.serving import BIN

pytestmark = pytest.mark.process

T = "fleet-tenant"
SIDECARS = 3
CLIENTS = 3
PATIENCE_S = 120


@pytest.fixture
def fleet(ledger_url: str) -> Iterator[list[FleetSidecar]]:
    sidecars = start_fleet(ledger_url, SIDECARS, "--ledger-check-interval", "0.1")
    yield sidecars
    for sidecar in sidecars:
        sidecar.stop()


def addresses(fleet: list[FleetSidecar], first: int = 0) -> list[str]:
    """The fleet's addresses, starting with sidecar `first`: each client begins at another one."""
    return [fleet[(first + n) % len(fleet)].address for n in range(len(fleet))]


def run_race(fleet: list[FleetSidecar], rpc: str, contacts: list[list[str]]) -> list[Answer]:
    """One client process per list of contacts, all started at once, each going round the fleet."""
    spawn = multiprocessing.get_context("spawn")
    go = spawn.Barrier(len(contacts) + 1)
    answers = spawn.Queue()
    clients = [
        spawn.Process(target=race, args=(addresses(fleet, n), rpc, T, ids, go, answers))
        for n, ids in enumerate(contacts)
    ]
    for client in clients:
        client.start()
    go.wait(PATIENCE_S)
    reports = [answers.get(timeout=PATIENCE_S) for _ in clients]
    for client in clients:
        client.join(PATIENCE_S)
    assert [kind for kind, _ in reports] == ["answers"] * len(clients), reports
    return [answer for _, replies in reports if isinstance(replies, list) for answer in replies]


def overlapping(pool: int, each: int) -> list[list[str]]:
    """For each client, `each` contacts drawn from one pool of `pool`, in an order of its own: the
    clients ask about many of the same contacts through different sidecars."""
    ids = [f"c{i:03d}" for i in range(pool)]
    return [random.Random(n).sample(ids, each) for n in range(CLIENTS)]


def cycle_rows(url: str, tenant_id: str, cycle_start_us: int) -> tuple[Counters, list[Activation]]:
    """The tenant's stored figures for the cycle and its activation rows, as the ledger holds them."""
    ledger = PostgresLedger(url)
    ledger.open()
    try:
        return ledger.read(
            lambda r: (r.counters(tenant_id, cycle_start_us), r.active_contacts(tenant_id, cycle_start_us, "", 10**6))
        )
    finally:
        ledger.close()


def held_rows(url: str, tenant_id: str) -> tuple[Holdings | None, list[ContactRecord]]:
    ledger = PostgresLedger(url)
    ledger.open()
    try:
        return ledger.read(
            lambda r: (r.holdings(tenant_id), r.counted_contacts(tenant_id, False, ledger.time_us, "", 10**6))
        )
    finally:
        ledger.close()


def cycle_start_us(fleet: list[FleetSidecar]) -> int:
    (alive, *_) = (s for s in fleet if s.proc.poll() is None)
    return usage(alive.address, T).cycle_start.ToMicroseconds()


def assert_figures_equal_rows(url: str, fleet: list[FleetSidecar]) -> list[Activation]:
    """Every sidecar reports the stored figures, and those are what the activation rows add up to."""
    counters, rows = cycle_rows(url, T, cycle_start_us(fleet))
    assert (counters.active_contacts, counters.sends) == (len(rows), sum(a.sends for a in rows))
    for sidecar in fleet:
        if sidecar.proc.poll() is None:
            u = usage(sidecar.address, T)
            assert (u.active_contacts, u.sends) == (counters.active_contacts, counters.sends)
    return rows


def cycle_active(enforcement: int, limit: int, **fields: object) -> pb.Plan:
    return pb.Plan(
        plan_name="fleet",
        metering=pb.METERING_CYCLE_ACTIVE,
        enforcement=enforcement,
        contact_limit=limit,
        counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN],
        **fields,
    )


def assert_exactly_admitted(answers: list[Answer], admitted: int, denial: str) -> set[str]:
    """`admitted` contacts became active, each once whichever sidecar saw it first; every other
    answer for an active contact is ALREADY_ACTIVE, and every contact denied stays denied."""
    newly = [contact for contact, _, _, new in answers if new]
    allowed = {contact for contact, decision, _, _ in answers if decision == "DECISION_ALLOW"}
    denied = {contact for contact, decision, _, _ in answers if decision == "DECISION_DENY"}
    assert len(newly) == len(set(newly)) == admitted
    assert set(newly) == allowed and not allowed & denied
    assert {(d, r, new) for _, d, r, new in answers} <= {
        ("DECISION_ALLOW", "REASON_NEW_CONTACT_COUNTED", 1),
        ("DECISION_ALLOW", "REASON_ALREADY_ACTIVE", 0),
        ("DECISION_DENY", denial, 0),
    }
    return allowed


def test_three_sidecars_racing_at_a_hard_limit_admit_exactly_the_limit(ledger_url: str, fleet: list[FleetSidecar]):
    """SG-2 (never over the limit, however many sidecars decide), SG-6 and SG-8 (a contact counted
    once, whichever sidecar saw it): 3 client processes ask about 40 each of 60 contacts, going round
    the 3 sidecars, against a HARD limit of 30. Exactly 30 become active; every other answer for them
    is ALREADY_ACTIVE and the rest are CONTACT_LIMIT_REACHED; the figures equal the rows, which are
    exactly the contacts admitted, and every sidecar reports them."""
    put_plan(fleet[0].address, T, cycle_active(pb.ENFORCEMENT_HARD, 30))
    answers = run_race(fleet, "send", overlapping(60, 40))
    allowed = assert_exactly_admitted(answers, 30, "REASON_CONTACT_LIMIT_REACHED")
    rows = assert_figures_equal_rows(ledger_url, fleet)
    assert {a.contact_id for a in rows} == allowed
    assert sum(a.sends for a in rows) == sum(1 for _, d, _, _ in answers if d == "DECISION_ALLOW")


def test_three_sidecars_racing_at_a_grace_ceiling_admit_exactly_limit_and_grace(
    ledger_url: str, fleet: list[FleetSidecar]
):
    """AC-7 (a limit with grace: 10% over it before sends stop), SG-2 for the ceiling: the same race
    against a GRACE limit of 20 (ceiling 22) admits exactly 22, the rest OVER_GRACE; the tenant is
    then BLOCKED on every sidecar, and the figures equal the rows."""
    put_plan(fleet[1].address, T, cycle_active(pb.ENFORCEMENT_GRACE, 20, grace_percent=10))
    answers = run_race(fleet, "send", overlapping(45, 30))
    allowed = assert_exactly_admitted(answers, 22, "REASON_OVER_GRACE")
    rows = assert_figures_equal_rows(ledger_url, fleet)
    assert {a.contact_id for a in rows} == allowed
    for sidecar in fleet:
        assert usage(sidecar.address, T).state == pb.USAGE_STATE_BLOCKED


def test_three_sidecars_racing_at_a_held_contacts_limit(ledger_url: str, fleet: list[FleetSidecar]):
    """Model 1, AC-5 (a hand-added contact refused at the limit), AC-6 and AC-7 (campaigns stop past
    the limit and its 10% grace): racing MANUAL adds of 30 each of 45 contacts through the 3 sidecars
    against a held limit of 20 hold exactly 20, each added once (SOURCE_BLOCKED for the rest). Campaign
    sends to them then race through every sidecar and are all allowed; once API adds (never refused,
    AC-2) take the tenant past the ceiling of 22 through one sidecar, every sidecar blocks the next
    campaign send (OVER_GRACE)."""
    put_plan(fleet[2].address, T, pb.Plan(preset="contact-limit", plan_name="fleet", contact_limit=20))
    added = run_race(fleet, "add", overlapping(45, 30))
    held = {contact for contact, _, _, n in added if n}
    assert sum(n for _, _, _, n in added) == len(held) == 20
    assert {r for _, d, r, _ in added if d == "DECISION_DENY"} == {"REASON_SOURCE_BLOCKED"}
    holdings, rows = held_rows(ledger_url, T)
    assert holdings is not None and holdings.held == 20
    assert {c.contact_id for c in rows} == held

    sends = run_race(fleet, "send", [sorted(held)] * CLIENTS)
    assert Counter((d, r) for _, d, r, _ in sends) == {("DECISION_ALLOW", "REASON_OK"): 20 * CLIENTS}

    over = run_race(fleet[:1], "add-api", [[f"api-{i}" for i in range(3)]])
    assert sum(n for _, _, _, n in over) == 3
    for sidecar in fleet:
        r = check_send(sidecar.address, T, sorted(held)[0])
        assert (r.decision, r.reason) == (pb.DECISION_DENY, pb.REASON_OVER_GRACE)
        assert r.usage.state == pb.USAGE_STATE_BLOCKED
    holdings, rows = held_rows(ledger_url, T)
    assert holdings is not None and holdings.held == len(rows) == 23


def test_a_request_id_retried_through_another_sidecar_gets_the_first_answer(ledger_url: str, fleet: list[FleetSidecar]):
    """API request_id (a retry returns the first answer and counts nothing twice), across the fleet:
    a CheckSend retried through the two other sidecars, after other sends changed the figures, gets
    the first answer, figures included; one request_id sent through all three at once is counted once."""
    put_plan(fleet[0].address, T, cycle_active(pb.ENFORCEMENT_HARD, 10))
    first = check_send(fleet[0].address, T, "x", request_id="retry-1")
    assert (first.decision, first.reason, first.newly_active) == (
        pb.DECISION_ALLOW,
        pb.REASON_NEW_CONTACT_COUNTED,
        True,
    )
    check_send(fleet[0].address, T, "y")
    assert check_send(fleet[1].address, T, "x", request_id="retry-1") == first
    assert check_send(fleet[2].address, T, "x", request_id="retry-1") == first

    answers: list[pb.CheckSendResponse | str] = []
    go = threading.Barrier(SIDECARS)

    def retry(sidecar: FleetSidecar) -> None:
        go.wait(10)
        try:
            answers.append(check_send(sidecar.address, T, "z", request_id="retry-2"))
        except grpc.RpcError as exc:
            answers.append(exc.code().name)

    threads = [threading.Thread(target=retry, args=(s,)) for s in fleet]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answers) == SIDECARS and all(a == answers[0] for a in answers), answers
    assert isinstance(answers[0], pb.CheckSendResponse) and answers[0].newly_active
    rows = assert_figures_equal_rows(ledger_url, fleet)
    assert [(a.contact_id, a.sends) for a in rows] == [("x", 1), ("y", 1), ("z", 1)]


def test_a_plan_changed_through_one_sidecar_is_enforced_by_the_others_at_once(
    ledger_url: str, fleet: list[FleetSidecar]
):
    """SG-2 and SG-4 across the fleet (the plan is the fleet's, not a sidecar's): a limit lowered
    through one sidecar denies the next new contact on the others, and a limit raised through another
    admits exactly the room it made, whichever sidecar is asked next."""
    a, b, c = (s.address for s in fleet)
    put_plan(a, T, cycle_active(pb.ENFORCEMENT_HARD, 100))
    for i in range(5):
        assert check_send(a, T, f"early-{i}").decision == pb.DECISION_ALLOW
    put_plan(b, T, cycle_active(pb.ENFORCEMENT_HARD, 5))
    for address in (c, a):
        r = check_send(address, T, f"late-{address}")
        assert (r.decision, r.reason) == (pb.DECISION_DENY, pb.REASON_CONTACT_LIMIT_REACHED)
        assert r.usage.contact_limit == 5
    put_plan(c, T, cycle_active(pb.ENFORCEMENT_HARD, 6))
    assert check_send(a, T, "room").reason == pb.REASON_NEW_CONTACT_COUNTED
    assert check_send(b, T, "no-room").reason == pb.REASON_CONTACT_LIMIT_REACHED
    assert len(assert_figures_equal_rows(ledger_url, fleet)) == 6


def test_kill_9_of_one_sidecar_under_load_loses_nothing_acknowledged(ledger_url: str, fleet: list[FleetSidecar]):
    """Domain 'Nothing that was decided and acknowledged is lost', for a fleet: mail workers send to
    new contacts through all 3 sidecars; one is killed with SIGKILL mid-load and the other two carry
    on. Every contact any sidecar ALLOWed is in the ledger, the figures equal the rows, and the two
    survivors stay SERVING."""
    put_plan(fleet[0].address, T, cycle_active(pb.ENFORCEMENT_HARD, 1_000_000))
    load = Load(addresses(fleet), T)
    load.start()
    try:
        load.wait_for(60)
        fleet[0].proc.kill()
        fleet[0].proc.wait()
        load.wait_for(60)
    finally:
        load.stop()
    assert all(s.health() == "SERVING" for s in fleet[1:])
    assert set(load.outcomes) <= {"DECISION_ALLOW REASON_NEW_CONTACT_COUNTED", "UNAVAILABLE"}, load.outcomes
    rows = assert_figures_equal_rows(ledger_url, fleet)
    assert set(load.allowed) <= {a.contact_id for a in rows}


def test_a_postgresql_restart_under_load_is_unavailable_then_every_sidecar_recovers(
    ledger_url: str, fleet: list[FleetSidecar]
):
    """API errors (the ledger cannot commit: UNAVAILABLE, never a wrong answer), health NOT_SERVING
    while the ledger fails, and 'nothing acknowledged is lost': PostgreSQL is restarted
    (`pg_ctlcluster ... restart`) while mail workers send through all 3 sidecars. Calls during it are
    UNAVAILABLE, every sidecar reports NOT_SERVING and then SERVING again by itself and answers
    again; every contact ALLOWed is in the ledger and the figures equal the rows."""
    put_plan(fleet[0].address, T, cycle_active(pb.ENFORCEMENT_HARD, 1_000_000))
    seen: list[set[str]] = [set() for _ in fleet]
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            for statuses, sidecar in zip(seen, fleet, strict=True):
                statuses.add(sidecar.health())
            watching.wait(0.01)

    load = Load(addresses(fleet), T)
    watcher = threading.Thread(target=watch, daemon=True)
    load.start()
    try:
        load.wait_for(30)
        watcher.start()
        subprocess.run(["pg_ctlcluster", *CLUSTER, "restart"], check=True, capture_output=True, timeout=60)
        for sidecar in fleet:
            sidecar.wait_for("SERVING", 30)
        load.wait_for(30)
    finally:
        watching.set()
        load.stop()
    watcher.join(10)
    assert load.outcomes["UNAVAILABLE"] > 0, load.outcomes
    assert set(load.outcomes) <= {"DECISION_ALLOW REASON_NEW_CONTACT_COUNTED", "UNAVAILABLE"}, load.outcomes
    assert all("NOT_SERVING" in statuses for statuses in seen), seen
    for n, sidecar in enumerate(fleet):
        assert check_send(sidecar.address, T, f"after-{n}").decision == pb.DECISION_ALLOW
    rows = assert_figures_equal_rows(ledger_url, fleet)
    assert set(load.allowed) <= {a.contact_id for a in rows}


def test_the_ledger_password_never_shows_in_what_the_sidecar_prints(ledger_url: str):
    """Issue 16 (the password from the URL is never logged): a sidecar given a password in its ledger's
    URL (in the authority, and as libpq's `password` parameter) prints neither, whether it serves (the start
    line) or cannot open the ledger (the one line it exits with)."""
    secret = "fleet-secret-pw"
    user, at, rest = ledger_url.partition("@")
    serving = user + f":{secret}" + at + rest + f"&password={secret}"
    (sidecar,) = start_fleet(serving, 1)
    sidecar.proc.send_signal(signal.SIGTERM)
    out, err = sidecar.proc.communicate(timeout=30)
    assert "listening on" in err and "postgresql://postgres:***@127.0.0.1" in err, err
    assert secret not in out + err
    unreachable = f"postgresql://postgres:{secret}@127.0.0.1:1/quota?password={secret}"
    failed = subprocess.run(
        [
            str(BIN / "quota-sidecar"),
            "serve",
            "--address",
            "127.0.0.1:0",
            "--ledger",
            unreachable,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 1 and "cannot open the ledger" in failed.stderr, failed.stderr
    assert secret not in failed.stdout + failed.stderr
