"""The crash-consistency harness: the real `quota-sidecar serve` process under concurrent load, killed with
SIGKILL at random moments and restarted on the same ledger file, again and again.

Five tenants cover the meterings and enforcements: `hard` (CYCLE_ACTIVE, HARD, SG-2), `grace` (CYCLE_ACTIVE,
GRACE 10 %, AC-7's arithmetic), `sends` (CYCLE_ACTIVE, HARD, a sends_limit, SG-3), `crm` (CYCLE_ACTIVE,
OVERAGE, model 3: RecordActivity activates, CR-1, CR-2, CR-5) and `held` (HELD_CONTACTS, GRACE 10 %, model 1:
CheckContactAdd through API, IMPORT and MANUAL, deletions, AC-2..AC-7, AC-10). Worker threads send CheckSend
(new and repeat contacts, counted and uncounted kinds), CheckSendBatch (1..200 contacts mixing new, active and
repeated ids), dry-run batches (SG-5), RecordActivity and CheckContactAdd, each with a deadline and a unique
request_id (dry runs excepted); a plan thread raises limits, renames plans and changes notify thresholds with
PutPlan, never lowering a ceiling. A seeded random moment after the load starts, the process is killed.

After every kill, first on the file the dead process left and then through the restarted sidecar:

1. every acknowledged decision is in the ledger: each contact a counted ALLOW was acknowledged for is active
   in the cycle, each contact of an acknowledged counted RecordActivity too, each contact an acknowledged
   CheckContactAdd added is held unless an acknowledged deletion removed it; and nothing beyond what the
   calls cut off by the kill could have written is there. Those calls are then retried with their
   request_id, their answers count as acknowledged from then on, and the ledger must hold exactly what the
   acknowledged answers say: the active and held contacts, the sends, and every activation reported
   `newly_active` exactly once (SG-8, CR-2);
2. every stored figure equals its rows: `usage.active_contacts` the cycle's activation rows and
   `usage.sends` their sends (CYCLE_ACTIVE); the holdings the `contacts` rows and the cycle's held figure,
   and the held tenant's sends the audited sends (HELD_CONTACTS);
3. a retry of acknowledged calls with their request_id returns the original answer, unchanged;
4. no ceiling was passed: every answer's usage has `active_contacts` within the ceiling of the limit it
   reports (`limit` under HARD, `limit + floor(limit * grace_percent / 100)` under GRACE, as
   `Plan.ceiling` computes it) and `sends` within `sends_limit`; IMPORT and MANUAL adds never take the held
   count past the limit and no held-contact send is allowed past the ceiling; and the distinct contacts
   acknowledged a counted ALLOW in the cycle never outnumber the ceiling of the plan in force.

`python tests/crash_load.py --kills 100 --seed N` runs it from the command line and prints a summary;
tests/process/test_crash.py runs `QUOTA_CRASH_KILLS` kill points with `QUOTA_CRASH_SEED`.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import text_format

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.domain.clock import SystemClock
from quota_sidecar.server.domain.model import Counters

from support.oracle import read_rows
from support.process import AUTH, Process, start
from support.sqlite_file import file_reader

DEADLINE_S = 10.0
WORKERS = 6
KILL_AFTER_S = (0.2, 1.2)
GRACE_PERCENT = 10
PAGE_SIZE = 1_000
RETRIES_PER_WORKER = 2
RETRIES_OF_THE_ROUND = 20
RETRIES_OF_THE_PAST = 10
REMEMBERED_CALLS = 500
CONTACTS_LOOKED_UP = 4
SEND_TENANTS = ("hard", "grace", "sends", "crm")
CEILING_TENANTS = ("hard", "grace", "sends")
SEND_KINDS = (pb.MESSAGE_KIND_CAMPAIGN, pb.MESSAGE_KIND_AUTOMATION, pb.MESSAGE_KIND_TRANSACTIONAL)
SEND_KIND_WEIGHTS = (80, 15, 5)
CRM_ACTIVITIES = (pb.ACTIVITY_KIND_NOTE_ADDED, pb.ACTIVITY_KIND_STATUS_CHANGED, pb.ACTIVITY_KIND_PROPERTY_CHANGED)
LIMIT_REASONS = frozenset(
    {
        pb.REASON_CONTACT_LIMIT_REACHED,
        pb.REASON_OVER_GRACE,
        pb.REASON_SENDS_LIMIT_REACHED,
        pb.REASON_IMPORT_EXCEEDS_LIMIT,
        pb.REASON_SOURCE_BLOCKED,
    }
)
NEW_PER_CALL = {"crm": 5}
ADMIN_RPCS = frozenset({"PutPlan", "GetPlan", "GetContact", "ListActiveContacts"})
OPERATIONS = (
    "send_new",
    "send_repeat",
    "batch",
    "dry_run",
    "activity",
    "held_add",
    "held_delete",
    "held_send",
    "held_batch",
)
OPERATION_WEIGHTS = (18, 16, 12, 3, 8, 12, 6, 9, 4)


def initial_plans() -> dict[str, pb.Plan]:
    """The tenants' first plans: limits small enough that the load reaches them in the first round."""
    counted = [pb.MESSAGE_KIND_CAMPAIGN, pb.MESSAGE_KIND_AUTOMATION]
    return {
        "hard": pb.Plan(
            plan_name="HARD-1",
            metering=pb.METERING_CYCLE_ACTIVE,
            enforcement=pb.ENFORCEMENT_HARD,
            contact_limit=120,
            counted_kinds=counted,
            notify_thresholds=[0.8, 1.0],
        ),
        "grace": pb.Plan(
            plan_name="GRACE-1",
            metering=pb.METERING_CYCLE_ACTIVE,
            enforcement=pb.ENFORCEMENT_GRACE,
            grace_percent=GRACE_PERCENT,
            contact_limit=100,
            counted_kinds=counted,
        ),
        "sends": pb.Plan(
            plan_name="SENDS-1",
            metering=pb.METERING_CYCLE_ACTIVE,
            enforcement=pb.ENFORCEMENT_HARD,
            contact_limit=150,
            sends_limit=400,
            counted_kinds=counted,
        ),
        "crm": pb.Plan(preset="active-cycle-overage", plan_name="START", contact_limit=50),
        "held": pb.Plan(preset="contact-limit", plan_name="LITE", contact_limit=60),
    }


def ceiling_of(plan: pb.Plan, limit: int) -> int | None:
    """The count no new contact may pass for a limit (plan contacts + add-ons) under the plan's
    enforcement, as the engine's `Plan.ceiling` and api.md state it: the limit under HARD, the limit plus
    floor(limit x grace_percent / 100) under GRACE, none under OVERAGE."""
    if plan.enforcement == pb.ENFORCEMENT_HARD:
        return limit
    if plan.enforcement == pb.ENFORCEMENT_GRACE:
        return limit + limit * plan.grace_percent // 100
    return None


def limit_of(plan: pb.Plan) -> int:
    """Plan contacts plus add-ons."""
    return plan.contact_limit + plan.addon_contacts


def counted_allow(result: Any) -> bool:
    """An ALLOW that was counted (a send against the figures), as opposed to NOT_COUNTED."""
    return result.decision == pb.DECISION_ALLOW and result.reason != pb.REASON_NOT_COUNTED


def short(message: Any) -> str:
    """A message on one line, cut short, for problem reports."""
    return text_format.MessageToString(message, as_one_line=True)[:400]


@dataclass
class Call:
    """One call of the load: the exact request, and its answer once acknowledged."""

    rpc: str
    tenant: str
    request: Any
    worker: int = -1
    response: Any = None
    code: str = ""
    failed_at: float = 0.0

    @property
    def dry(self) -> bool:
        return bool(getattr(self.request, "dry_run", False))


class Pool:
    """Contacts to pick from at random, with O(1) removal."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.index: dict[str, int] = {}

    def add(self, item: str) -> None:
        if item not in self.index:
            self.index[item] = len(self.items)
            self.items.append(item)

    def remove(self, item: str) -> None:
        i = self.index.pop(item, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.index[last] = i

    def pick(self, rng: random.Random, n: int) -> list[str]:
        return rng.choices(self.items, k=n) if self.items else []

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Book:
    """What the acknowledged answers told the harness about one tenant."""

    name: str
    held_metering: bool
    plan: pb.Plan
    allowed: set[str] = field(default_factory=set)
    recorded: set[str] = field(default_factory=set)
    sends: int = 0
    newly: set[str] = field(default_factory=set)
    newly_by_activity: int = 0
    held: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    repeatable: Pool = field(default_factory=Pool)
    deletable: Pool = field(default_factory=Pool)
    last_count: int = 0
    shrinking: bool = False
    limited: Counter[str] = field(default_factory=Counter)

    @property
    def active(self) -> set[str]:
        return self.allowed | self.recorded


@dataclass
class Kill:
    """One kill point: when it came and what the load was doing."""

    number: int
    after_s: float
    acknowledged: int
    unknown: int
    workers_running: int


@dataclass
class Summary:
    """The run's counts and every problem found, by kind: `loss` (an acknowledged decision missing),
    `over-admission` (a ceiling or sends limit passed), `phantom` (counted with nobody answered for it),
    `figures` (a stored figure unequal to its rows or to the answers), `double count`, `retry mismatch`,
    `retry`, `answer` (an answer inconsistent in itself), `unexpected` and `sidecar log`."""

    seed: int
    kills: list[Kill] = field(default_factory=list)
    acknowledged: int = 0
    unknown: int = 0
    allows: int = 0
    allow_checks: int = 0
    retries_compared: int = 0
    retries_resolved: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)
    error_codes: Counter[str] = field(default_factory=Counter)
    limited: dict[str, Counter[str]] = field(default_factory=dict)
    tenants: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def count(self, kind: str) -> int:
        return len(self.problems.get(kind, ()))

    @property
    def losses(self) -> int:
        return self.count("loss")

    @property
    def over_admissions(self) -> int:
        return self.count("over-admission")

    @property
    def other_problems(self) -> int:
        return sum(len(v) for k, v in self.problems.items() if k not in ("loss", "over-admission"))

    def line(self) -> str:
        codes = ",".join(f"{k}:{v}" for k, v in sorted(self.error_codes.items())) or "none"
        return (
            f"crash summary: seed={self.seed} kill points survived={len(self.kills)}"
            f" calls acknowledged={self.acknowledged} (cut off by a kill={self.unknown},"
            f" retried={self.retries_resolved}; codes {codes}) ALLOWs checked={self.allows}"
            f" (contacts confirmed over all restarts={self.allow_checks})"
            f" retries compared={self.retries_compared} losses={self.losses}"
            f" over-admissions={self.over_admissions} other problems={self.other_problems}"
            f" elapsed={self.elapsed_s:.1f}s"
        )

    def report(self, limit: int = 10) -> str:
        lines = [self.line(), *self.tenants]
        for kind, found in sorted(self.problems.items()):
            lines.append(f"{kind}: {len(found)}")
            lines.extend(f"  {p}" for p in found[:limit])
        return "\n".join(lines)


class Stubs:
    """One channel to the sidecar with both services' stubs."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.quota = pb_grpc.QuotaServiceStub(self.channel)
        self.admin = pb_grpc.QuotaAdminServiceStub(self.channel)

    def invoke(self, rpc: str, request: Any) -> Any:
        if rpc in ADMIN_RPCS:
            return getattr(self.admin, rpc)(request, timeout=DEADLINE_S, metadata=AUTH)
        return getattr(self.quota, rpc)(request, timeout=DEADLINE_S)

    def close(self) -> None:
        self.channel.close()


@dataclass
class LedgerFile:
    """What the ledger file says, read with a read-only connection."""

    figures: list[tuple[str, int, int, int, int, int]]
    orphans: list[tuple[str, int, int]]
    active: dict[str, set[str]]
    sends: dict[str, int]
    held: dict[str, set[str]]
    holdings: dict[str, tuple[int, int, int, int]]
    contact_counts: dict[str, tuple[int, int, int]]
    held_figures: dict[tuple[str, int], tuple[int, int, int]]
    audited_sends: dict[tuple[str, int], int]


def read_ledger(path: Path) -> LedgerFile:
    """Every figure and row the checks compare, in one read transaction: through the ledger's reader
    (support/oracle.py), and the audit, which the ledger interface writes and never reads back, with SQL."""
    with file_reader(path) as reader:
        dump = read_rows(reader, SystemClock().now_us())
        audited_sends = {
            (r[0], r[1]): r[2]
            for r in reader.conn.execute(
                "SELECT tenant_id, cycle_start_us, SUM(sends_delta) FROM audit GROUP BY tenant_id, cycle_start_us"
            )
        }
    cycles = [(tenant, start, rows) for tenant, found in dump.items() for start, rows in found.cycles.items()]
    return LedgerFile(
        figures=[(tenant, start, *rows.stored, *rows.counted) for tenant, start, rows in cycles if not rows.empty],
        orphans=[
            (tenant, start, len(rows.activations))
            for tenant, start, rows in cycles
            if rows.activations and rows.counters == Counters()
        ],
        active={tenant: found.active_ids() for tenant, found in dump.items() if found.active_ids()},
        sends={tenant: sum(rows.counters.sends for rows in found.cycles.values()) for tenant, found in dump.items()},
        held={tenant: {c.contact_id for c in found.held} for tenant, found in dump.items() if found.held},
        holdings={
            tenant: (
                found.holdings.cycle_start_us,
                found.holdings.held,
                found.holdings.marketing,
                found.holdings.pending,
            )
            for tenant, found in dump.items()
            if found.holdings is not None
        },
        contact_counts={tenant: found.counted_holdings() for tenant, found in dump.items() if found.held},
        held_figures={
            (tenant, start): (rows.counters.held_end, rows.counters.held_peak, rows.counters.sends)
            for tenant, start, rows in cycles
        },
        audited_sends=audited_sends,
    )


class CrashHarness:
    """Runs the load, the kills, the restarts and the checks; see the module docstring."""

    def __init__(
        self,
        ledger: Path,
        kills: int,
        seed: int,
        *,
        processes: list[Process] | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.ledger = ledger
        self.kills = kills
        self.seed = seed
        self.rng = random.Random(f"{seed}:harness")
        self.processes = processes if processes is not None else []
        self.say = say
        self.summary = Summary(seed)
        self.lock = threading.Lock()
        self.books = {name: Book(name, plan.preset == "contact-limit", plan) for name, plan in initial_plans().items()}
        self.plan_in_flight: dict[str, pb.Plan] = {}
        self.calls: list[Call] = []
        self.past: list[Call] = []
        self.past_seen = 0
        self.stopping = threading.Event()
        self.process: Process | None = None

    # -- bookkeeping --------------------------------------------------------------------------------------

    def problem(self, kind: str, text: str) -> None:
        with self.lock:
            self.summary.problems.setdefault(kind, []).append(text)

    def acknowledge(self, call: Call, response: Any) -> None:
        """Books an acknowledged answer and checks it against the limits it reports (check 4)."""
        with self.lock:
            call.response = response
            self.summary.acknowledged += 1
            book = self.books[call.tenant]
            self._check_answer(book, call)
            if call.dry:
                return
            request = call.request
            if call.rpc == "CheckSend":
                self._book_results(book, [(request.contact_id, response)])
            elif call.rpc == "CheckSendBatch":
                self._book_results(book, [(r.contact_id, r) for r in response.results])
            elif call.rpc == "RecordActivity" and request.kind == pb.ACTIVITY_KIND_CONTACT_DELETED:
                book.held.difference_update(request.contact_ids)
                book.deleted.update(request.contact_ids)
            elif call.rpc == "RecordActivity":
                book.recorded.update(request.contact_ids)
                book.newly_by_activity += response.newly_active
                for c in request.contact_ids:
                    book.repeatable.add(c)
            elif call.rpc == "CheckContactAdd" and response.decision != pb.DECISION_ALLOW:
                book.limited[pb.Reason.Name(response.reason)] += 1
            elif call.rpc == "CheckContactAdd":
                book.held.update(request.contact_ids)
                self.summary.allows += len(request.contact_ids)
                for c in request.contact_ids:
                    book.deletable.add(c)
                    book.repeatable.add(c)
            if response.HasField("usage"):
                book.last_count = response.usage.active_contacts

    def _book_results(self, book: Book, results: Sequence[tuple[str, Any]]) -> None:
        seen: dict[str, Any] = {}
        for contact_id, result in results:
            first = seen.get(contact_id)
            if first is not None:
                if result.newly_active or (result.decision, result.reason) != (first.decision, first.reason):
                    self.summary.problems.setdefault("answer", []).append(
                        f"{book.name}: {contact_id} listed again in a batch answered {short(result)},"
                        f" first {short(first)}"
                    )
                continue
            seen[contact_id] = result
            if result.reason in LIMIT_REASONS:
                book.limited[pb.Reason.Name(result.reason)] += 1
            if not counted_allow(result):
                continue
            self.summary.allows += 1
            book.sends += 1
            if not book.held_metering:
                book.allowed.add(contact_id)
                book.repeatable.add(contact_id)
            if result.newly_active:
                if contact_id in book.newly:
                    self.summary.problems.setdefault("double count", []).append(
                        f"{book.name}: {contact_id} reported newly_active twice in the cycle (SG-8, CR-2)"
                    )
                book.newly.add(contact_id)

    def _check_answer(self, book: Book, call: Call) -> None:
        """Check 4 on one answer: the usage after the decision within the ceiling of the limit it
        reports, sends within the sends limit; batch answers complete and in request order."""
        response, request = call.response, call.request
        problems = self.summary.problems
        if call.rpc == "CheckSendBatch":
            ids = [r.contact_id for r in response.results]
            allowed = sum(1 for r in response.results if r.decision == pb.DECISION_ALLOW)
            newly = sum(1 for r in response.results if r.newly_active)
            if ids != list(request.contact_ids) or (response.allowed, response.denied, response.newly_active) != (
                allowed,
                len(ids) - allowed,
                newly,
            ):
                problems.setdefault("answer", []).append(f"{book.name}: batch answer inconsistent: {short(response)}")
        if (
            call.rpc == "CheckContactAdd"
            and response.decision == pb.DECISION_ALLOW
            and response.added != len(set(request.contact_ids))
        ):
            problems.setdefault("answer", []).append(
                f"{book.name}: {len(request.contact_ids)} new contacts added as {response.added}"
            )
        if not response.HasField("usage"):
            return
        usage = response.usage
        ceiling = ceiling_of(book.plan, usage.contact_limit)
        where = f"{book.name} {call.rpc} {call.request.request_id or 'dry run'}"
        if usage.sends_limit and usage.sends > usage.sends_limit:
            problems.setdefault("over-admission", []).append(
                f"{where}: sends {usage.sends} past the sends limit {usage.sends_limit} (SG-3)"
            )
        if ceiling is None:
            return
        if not book.held_metering:
            if usage.active_contacts > ceiling:
                problems.setdefault("over-admission", []).append(
                    f"{where}: {usage.active_contacts} active past the ceiling {ceiling} (SG-2, AC-7)"
                )
            return
        if call.rpc in ("CheckSend", "CheckSendBatch"):
            results = [response] if call.rpc == "CheckSend" else list(response.results)
            if any(counted_allow(r) for r in results) and usage.active_contacts > ceiling:
                problems.setdefault("over-admission", []).append(
                    f"{where}: a send allowed with {usage.active_contacts} held,"
                    f" past the ceiling {ceiling} (AC-6, AC-7)"
                )
        if (
            call.rpc == "CheckContactAdd"
            and response.decision == pb.DECISION_ALLOW
            and request.source in (pb.CONTACT_SOURCE_IMPORT, pb.CONTACT_SOURCE_MANUAL)
            and usage.active_contacts > usage.contact_limit
        ):
            problems.setdefault("over-admission", []).append(
                f"{where}: an IMPORT/MANUAL add took the count to {usage.active_contacts},"
                f" past the limit {usage.contact_limit} (AC-4, AC-5)"
            )

    # -- the load -----------------------------------------------------------------------------------------

    def next_call(self, rng: random.Random, prefix: str, seq: int) -> Call:
        """One call of the load, built from what the harness was acknowledged so far."""
        operation = rng.choices(OPERATIONS, OPERATION_WEIGHTS)[0]
        request_id = f"{prefix}.{seq}"
        fresh = iter(f"{prefix}.{seq}.{i}" for i in range(100_000))
        with self.lock:
            if operation in ("send_new", "send_repeat", "batch", "dry_run"):
                tenant = rng.choice(SEND_TENANTS)
                book = self.books[tenant]
                kind = rng.choices(SEND_KINDS, SEND_KIND_WEIGHTS)[0]
                if operation in ("send_new", "send_repeat"):
                    known = book.repeatable.pick(rng, 1) if operation == "send_repeat" else []
                    request = pb.CheckSendRequest(
                        tenant_id=tenant,
                        contact_id=known[0] if known else f"{tenant}:{next(fresh)}",
                        channel=pb.CHANNEL_EMAIL,
                        kind=kind,
                        request_id=request_id,
                    )
                    return Call("CheckSend", tenant, request)
                size = rng.randint(1, 200)
                least = size - NEW_PER_CALL.get(tenant, size)
                repeats = book.repeatable.pick(rng, rng.randint(min(least, len(book.repeatable)), size))
                ids = repeats + [f"{tenant}:{next(fresh)}" for _ in range(size - len(repeats))]
                rng.shuffle(ids)
                dry = operation == "dry_run"
                request = pb.CheckSendBatchRequest(
                    tenant_id=tenant,
                    channel=pb.CHANNEL_EMAIL,
                    kind=kind,
                    contact_ids=ids,
                    dry_run=dry,
                    request_id="" if dry else request_id,
                )
                return Call("CheckSendBatch", tenant, request)
            if operation == "activity":
                book = self.books["crm"]
                size = rng.randint(1, 50)
                known = book.repeatable.pick(
                    rng, rng.randint(min(size - NEW_PER_CALL["crm"], len(book.repeatable)), size)
                )
                ids = list(dict.fromkeys(known + [f"crm:{next(fresh)}" for _ in range(size - len(known))]))
                request = pb.RecordActivityRequest(
                    tenant_id="crm", kind=rng.choice(CRM_ACTIVITIES), contact_ids=ids, request_id=request_id
                )
                return Call("RecordActivity", "crm", request)
            book = self.books["held"]
            limit = limit_of(book.plan)
            ceiling = ceiling_of(book.plan, limit) or limit
            if book.last_count > ceiling + 3:
                book.shrinking = True
            elif book.last_count < limit - 5:
                book.shrinking = False
            if operation in ("held_add", "held_delete"):
                operation = "held_delete" if book.shrinking and len(book.deletable) else "held_add"
            if operation == "held_delete" and len(book.deletable):
                ids = list(dict.fromkeys(book.deletable.pick(rng, rng.randint(1, 5))))
                for c in ids:
                    book.deletable.remove(c)
                request = pb.RecordActivityRequest(
                    tenant_id="held",
                    kind=pb.ACTIVITY_KIND_CONTACT_DELETED,
                    contact_ids=ids,
                    request_id=request_id,
                )
                return Call("RecordActivity", "held", request)
            if operation in ("held_add", "held_delete"):
                source = rng.choice((pb.CONTACT_SOURCE_API, pb.CONTACT_SOURCE_IMPORT, pb.CONTACT_SOURCE_MANUAL))
                size = {pb.CONTACT_SOURCE_API: rng.randint(1, 3), pb.CONTACT_SOURCE_IMPORT: rng.randint(5, 30)}
                ids = [f"held:{next(fresh)}" for _ in range(size.get(source, 1))]
                request = pb.CheckContactAddRequest(
                    tenant_id="held", source=source, contact_ids=ids, request_id=request_id
                )
                return Call("CheckContactAdd", "held", request)
            kind = rng.choices(SEND_KINDS, SEND_KIND_WEIGHTS)[0]
            size = 1 if operation == "held_send" else rng.randint(1, 50)
            ids = book.deletable.pick(rng, size)
            ids = [c if rng.random() > 0.1 else f"held:{next(fresh)}" for c in ids] or [f"held:{next(fresh)}"]
            if operation == "held_send":
                request = pb.CheckSendRequest(
                    tenant_id="held", contact_id=ids[0], channel=pb.CHANNEL_EMAIL, kind=kind, request_id=request_id
                )
                return Call("CheckSend", "held", request)
            request = pb.CheckSendBatchRequest(
                tenant_id="held", channel=pb.CHANNEL_EMAIL, kind=kind, contact_ids=ids, request_id=request_id
            )
            return Call("CheckSendBatch", "held", request)

    def work(self, address: str, round_number: int, worker: int) -> None:
        """A worker of the load: calls until the sidecar goes away (or the harness stops it)."""
        rng = random.Random(f"{self.seed}:{round_number}:{worker}")
        prefix = f"r{round_number}w{worker}"
        stubs = Stubs(address)
        try:
            seq = 0
            while not self.stopping.is_set():
                seq += 1
                call = self.next_call(rng, prefix, seq)
                call.worker = worker
                with self.lock:
                    self.calls.append(call)
                try:
                    response = stubs.invoke(call.rpc, call.request)
                except grpc.RpcError as exc:
                    call.code = exc.code().name
                    call.failed_at = time.monotonic()
                    return
                self.acknowledge(call, response)
        finally:
            stubs.close()

    def change_plans(self, address: str, round_number: int) -> None:
        """The admin raising limits (SG-4), renaming plans and changing notify thresholds while the
        load runs; never lowering a ceiling, so check 4 keeps its meaning."""
        rng = random.Random(f"{self.seed}:{round_number}:plans")
        stubs = Stubs(address)
        try:
            while not self.stopping.wait(rng.uniform(0.05, 0.2)):
                tenant = rng.choice(sorted(self.books))
                with self.lock:
                    plan = pb.Plan()
                    plan.CopyFrom(self.books[tenant].plan)
                change = rng.choice(("raise", "raise", "name", "notify"))
                if change == "raise" and tenant != "crm":
                    if tenant == "sends" and rng.random() < 0.5:
                        plan.sends_limit += rng.randint(20, 120)
                    elif rng.random() < 0.3:
                        plan.addon_contacts += rng.randint(2, 10)
                    else:
                        plan.contact_limit += rng.randint(3, 25)
                elif change == "notify":
                    del plan.notify_thresholds[:]
                    plan.notify_thresholds.extend(sorted(rng.sample((0.5, 0.8, 0.9, 1.0), rng.randint(1, 3))))
                else:
                    plan.plan_name = f"{tenant.upper()}-{rng.randint(2, 999)}"
                with self.lock:
                    self.plan_in_flight[tenant] = plan
                try:
                    answer = stubs.invoke("PutPlan", pb.PutPlanRequest(tenant_id=tenant, plan=plan))
                except grpc.RpcError as exc:
                    with self.lock:
                        self.summary.error_codes[f"PutPlan {exc.code().name}"] += 1
                    return
                with self.lock:
                    self.plan_in_flight.pop(tenant, None)
                    self.books[tenant].plan = answer.plan
        finally:
            stubs.close()

    # -- the process --------------------------------------------------------------------------------------

    def start_sidecar(self) -> Process:
        process = start(self.ledger)
        self.processes.append(process)
        process.wait_serving()
        threading.Thread(target=self._drain, args=(process,), daemon=True).start()
        self.process = process
        return process

    def _drain(self, process: Process) -> None:
        """Reads the sidecar's log so the pipe never fills; errors in it are problems."""
        with process.proc.stderr as lines:
            for line in lines:
                if "Traceback" in line or " ERROR " in line or " CRITICAL " in line:
                    self.problem("sidecar log", line.strip())

    def kill(self, process: Process) -> None:
        process.proc.send_signal(signal.SIGKILL)
        process.proc.wait(timeout=30)
        process.proc.stdout.close()

    # -- the rounds ---------------------------------------------------------------------------------------

    def run(self) -> Summary:
        started = time.monotonic()
        self.say(
            f"crash harness: seed={self.seed} kills={self.kills} ledger={self.ledger}"
            f" (replay with QUOTA_CRASH_SEED={self.seed} or tests/crash_load.py --seed {self.seed})"
        )
        process = self.start_sidecar()
        try:
            stubs = Stubs(process.address)
            try:
                for tenant, book in self.books.items():
                    book.plan = stubs.invoke("PutPlan", pb.PutPlanRequest(tenant_id=tenant, plan=book.plan)).plan
            finally:
                stubs.close()
            for number in range(1, self.kills + 1):
                process = self.round(number, process)
            self.stop(process)
            self.describe_tenants()
        finally:
            self.stopping.set()
            if self.process is not None and self.process.proc.poll() is None:
                self.process.proc.kill()
                self.process.proc.wait()
            self.summary.elapsed_s = time.monotonic() - started
        return self.summary

    def round(self, number: int, process: Process) -> Process:
        """Load, a kill at a random moment, the checks on the dead process's file, a restart, the
        retries and the checks through the restarted sidecar. Returns the restarted process."""
        self.calls = []
        self.stopping.clear()
        delay = self.rng.uniform(*KILL_AFTER_S)
        workers = [
            threading.Thread(target=self.work, args=(process.address, number, w), daemon=True) for w in range(WORKERS)
        ]
        workers.append(threading.Thread(target=self.change_plans, args=(process.address, number), daemon=True))
        for t in workers:
            t.start()
        time.sleep(delay)
        running = sum(1 for t in workers[:WORKERS] if t.is_alive())
        killed_at = time.monotonic()
        self.kill(process)
        self.stopping.set()
        for t in workers:
            t.join(timeout=60)
            if t.is_alive():
                raise RuntimeError(f"a load thread of round {number} did not stop after the kill")
        acknowledged = [c for c in self.calls if c.response is not None]
        unknown = [c for c in self.calls if c.response is None]
        kill = Kill(number, delay, len(acknowledged), len(unknown), running)
        self.summary.kills.append(kill)
        self.summary.unknown += len(unknown)
        for c in unknown:
            self.summary.error_codes[c.code] += 1
            if c.failed_at < killed_at:
                self.problem("unexpected", f"{c.rpc} {c.request.request_id} failed with {c.code} before the kill")
        self.say(
            f"kill {number}: {delay:.2f}s into the load, {running}/{WORKERS} workers running,"
            f" {len(acknowledged)} calls acknowledged, {len(unknown)} cut off"
        )
        self.check_file_after_kill(unknown)
        process = self.start_sidecar()
        stubs = Stubs(process.address)
        try:
            self.check_plans(stubs)
            resolved = self.retry(stubs, unknown, acknowledged)
            self.check_exact(stubs)
        finally:
            stubs.close()
        self.remember([*acknowledged, *resolved])
        return process

    def stop(self, process: Process) -> None:
        """SIGTERM to the last sidecar: it drains and exits 0."""
        process.proc.send_signal(signal.SIGTERM)
        code = process.proc.wait(timeout=60)
        process.proc.stdout.close()
        if code != 0:
            self.problem("unexpected", f"the last sidecar exited {code} on SIGTERM")

    def describe_tenants(self) -> None:
        """Each tenant's final figures next to its limits, and the limit denials it was answered."""
        for name, book in self.books.items():
            plan = book.plan
            limit = limit_of(plan)
            figure = len(book.held) if book.held_metering else len(book.active)
            ceiling = ceiling_of(plan, limit)
            denials = ", ".join(f"{k} {v}" for k, v in sorted(book.limited.items())) or "none"
            self.summary.limited[name] = book.limited
            self.summary.tenants.append(
                f"  {name}: {'held' if book.held_metering else 'active'} {figure} (limit {limit},"
                f" ceiling {ceiling if ceiling is not None else 'none'}), sends {book.sends}"
                f" (limit {plan.sends_limit or 'none'}), limit answers: {denials}"
            )

    def remember(self, acknowledged: Iterable[Call]) -> None:
        """Keeps a uniform sample of acknowledged calls of past rounds to retry later."""
        for call in acknowledged:
            if call.dry:
                continue
            self.past_seen += 1
            if len(self.past) < REMEMBERED_CALLS:
                self.past.append(call)
            else:
                i = self.rng.randrange(self.past_seen)
                if i < REMEMBERED_CALLS:
                    self.past[i] = call

    # -- the checks ---------------------------------------------------------------------------------------

    def check_file_after_kill(self, unknown: Sequence[Call]) -> None:
        """Checks 1 and 2 on the file the killed process left: every acknowledged decision there, nothing
        beyond what the cut-off calls could have written, and every figure equal to its rows."""
        found = read_ledger(self.ledger)
        self.check_rows(found, "after the kill")
        for name, book in self.books.items():
            cut = [c for c in unknown if c.tenant == name and not c.dry]
            touched = {i for c in cut for i in self._contacts_of(c)}
            if book.held_metering:
                deleting = {i for c in cut if c.rpc == "RecordActivity" for i in c.request.contact_ids}
                adding = {i for c in cut if c.rpc == "CheckContactAdd" for i in c.request.contact_ids}
                self._compare(name, "held", book.held - deleting, book.held | adding, found.held.get(name, set()))
                continue
            self._compare(name, "active", book.active, book.active | touched, found.active.get(name, set()))
            self.summary.allow_checks += len(book.active)
            sends = found.sends.get(name, 0)
            most = book.sends + sum(len(set(self._contacts_of(c))) for c in cut if c.rpc != "RecordActivity")
            if not book.sends <= sends <= most:
                kind = "loss" if sends < book.sends else "phantom"
                self.problem(kind, f"{name} after the kill: {sends} sends on file, acknowledged {book.sends}")

    @staticmethod
    def _contacts_of(call: Call) -> list[str]:
        if call.rpc == "CheckSend":
            return [call.request.contact_id]
        return list(call.request.contact_ids)

    def _compare(self, tenant: str, what: str, least: set[str], most: set[str], found: set[str]) -> None:
        missing = least - found
        extra = found - most
        if missing:
            self.problem("loss", f"{tenant}: {len(missing)} acknowledged {what} contacts missing, e.g. {min(missing)}")
        if extra:
            self.problem(
                "phantom", f"{tenant}: {len(extra)} {what} contacts nobody was answered for, e.g. {min(extra)}"
            )

    def check_rows(self, found: LedgerFile, when: str) -> None:
        """Check 2: stored figures equal what the rows say."""
        for tenant, cycle, active, sends, rows, row_sends in found.figures:
            if self.books[tenant].held_metering:
                continue
            if (active, sends) != (rows, row_sends):
                self.problem(
                    "figures",
                    f"{tenant} {when}: usage of cycle {cycle} says {active} active / {sends} sends,"
                    f" activation rows say {rows} / {row_sends}",
                )
        for tenant, cycle, rows in found.orphans:
            self.problem("figures", f"{tenant} {when}: {rows} activations in cycle {cycle} without a usage row")
        for tenant, (cycle, held, marketing, pending) in found.holdings.items():
            counted = found.contact_counts.get(tenant, (0, 0, 0))
            if (held, marketing, pending) != counted:
                self.problem(
                    "figures",
                    f"{tenant} {when}: holdings say held/marketing/pending {(held, marketing, pending)},"
                    f" contacts rows {counted}",
                )
            held_end, held_peak, sends = found.held_figures.get((tenant, cycle), (None, None, None))
            if held_end != held or held_peak is None or held_peak < held_end:
                self.problem(
                    "figures", f"{tenant} {when}: cycle figures held_end/peak {held_end}/{held_peak}, holdings {held}"
                )
            audited = found.audited_sends.get((tenant, cycle), 0)
            if sends != audited:
                self.problem("figures", f"{tenant} {when}: usage says {sends} sends, the audit {audited}")

    def check_plans(self, stubs: Stubs) -> None:
        """An acknowledged PutPlan survives the kill; one cut off by it is there or not, whole."""
        for name, book in self.books.items():
            stored = stubs.invoke("GetPlan", pb.GetPlanRequest(tenant_id=name)).plan
            candidates = [book.plan] + ([self.plan_in_flight[name]] if name in self.plan_in_flight else [])
            fields = ("plan_name", "contact_limit", "addon_contacts", "sends_limit")
            match = [
                p
                for p in candidates
                if all(getattr(p, f) == getattr(stored, f) for f in fields)
                and (not p.notify_thresholds or list(p.notify_thresholds) == list(stored.notify_thresholds))
            ]
            if not match:
                self.problem("loss", f"{name}: plan after restart {short(stored)} is none of {len(candidates)} sent")
            book.plan = stored
        self.plan_in_flight.clear()

    def retry(self, stubs: Stubs, unknown: Sequence[Call], acknowledged: Sequence[Call]) -> list[Call]:
        """Check 3: the calls cut off by the kill are sent again with their request_id and their answers
        booked, then sent once more to get the same answer; a sample of acknowledged ones (those just
        before the kill, others of this round and of past rounds) must get their original answers back.
        Returns the cut-off calls now answered."""
        resend = [c for c in unknown if not c.dry]
        latest: dict[int, list[Call]] = {}
        for c in acknowledged:
            if not c.dry:
                latest.setdefault(c.worker, []).append(c)
        chosen = {id(c): c for calls in latest.values() for c in calls[-RETRIES_PER_WORKER:]}
        done = [c for c in acknowledged if not c.dry]
        for c in self.rng.sample(done, min(RETRIES_OF_THE_ROUND, len(done))):
            chosen[id(c)] = c
        for c in self.rng.sample(self.past, min(RETRIES_OF_THE_PAST, len(self.past))):
            chosen[id(c)] = c

        self.send_again(stubs, resend + list(chosen.values()))
        resolved = [c for c in resend if c.response is not None]
        self.send_again(stubs, resolved)
        return resolved

    def send_again(self, stubs: Stubs, calls: Sequence[Call]) -> None:
        """Sends each call again with its request_id: an answered one must get its answer back unchanged,
        an unanswered one's answer is booked as acknowledged."""

        def again(call: Call) -> tuple[Call, Any, str]:
            try:
                return call, stubs.invoke(call.rpc, call.request), ""
            except grpc.RpcError as exc:
                return call, None, f"{exc.code().name}: {exc.details()}"

        with ThreadPoolExecutor(WORKERS) as pool:
            outcomes = list(pool.map(again, calls))
        for call, response, error in outcomes:
            if error:
                self.problem("retry", f"{call.tenant} {call.rpc} {call.request.request_id} retried: {error}")
            elif call.response is None:
                self.summary.retries_resolved += 1
                self.acknowledge(call, response)
            else:
                self.summary.retries_compared += 1
                if response != call.response:
                    self.problem(
                        "retry mismatch",
                        f"{call.tenant} {call.rpc} {call.request.request_id}: first {short(call.response)}"
                        f" | retry {short(response)}",
                    )

    def check_exact(self, stubs: Stubs) -> None:
        """With every call's answer known: the ledger holds exactly what the answers say (checks 1 and
        2 through the public RPCs and the file) and the distinct contacts allowed fit the ceiling
        of the plan in force (check 4)."""
        for name, book in self.books.items():
            usage = stubs.invoke("GetUsage", pb.GetUsageRequest(tenant_id=name)).usage
            listed = self.list_contacts(stubs, name)
            expected = book.held if book.held_metering else book.active
            self._compare(name, "listed", expected, expected, listed)
            self.summary.allow_checks += len(expected)
            figures = (usage.active_contacts, usage.sends)
            if figures != (len(listed), book.sends):
                self.problem(
                    "figures",
                    f"{name}: usage {figures} active/sends, {len(listed)} listed, {book.sends} sends acknowledged",
                )
            if not book.held_metering and len(book.newly) + book.newly_by_activity != usage.active_contacts:
                self.problem(
                    "double count",
                    f"{name}: {len(book.newly)} + {book.newly_by_activity} reported newly_active,"
                    f" {usage.active_contacts} active (SG-8, CR-2)",
                )
            self.look_up(stubs, name, book)
            if name in CEILING_TENANTS:
                plan = book.plan
                ceiling = ceiling_of(plan, limit_of(plan))
                if ceiling is not None and len(book.allowed) > ceiling:
                    self.problem(
                        "over-admission",
                        f"{name}: {len(book.allowed)} distinct contacts allowed, ceiling {ceiling} (SG-2, AC-7)",
                    )
                if plan.sends_limit and book.sends > plan.sends_limit:
                    self.problem(
                        "over-admission", f"{name}: {book.sends} sends allowed, sends limit {plan.sends_limit} (SG-3)"
                    )
        self.check_rows(read_ledger(self.ledger), "after the restart")

    def list_contacts(self, stubs: Stubs, tenant: str) -> set[str]:
        """ListActiveContacts page by page: the contacts behind the metered figure now. Under
        HELD_CONTACTS the listing has every span counted in the cycle; the open ones (no
        counted_until) are the contacts counted now."""
        found: set[str] = set()
        token = ""
        while True:
            page = stubs.invoke(
                "ListActiveContacts",
                pb.ListActiveContactsRequest(tenant_id=tenant, page_size=PAGE_SIZE, page_token=token),
            )
            found.update(c.contact_id for c in page.contacts if not c.HasField("counted_until"))
            token = page.next_page_token
            if not token:
                return found

    def look_up(self, stubs: Stubs, tenant: str, book: Book) -> None:
        """GetContact for a few acknowledged contacts: active this cycle, or held (deleted: not held)."""
        expected = sorted(book.held if book.held_metering else book.active)
        sample = self.rng.sample(expected, min(CONTACTS_LOOKED_UP, len(expected)))
        for contact_id in sample:
            state = stubs.invoke("GetContact", pb.GetContactRequest(tenant_id=tenant, contact_id=contact_id)).contact
            if not (state.held if book.held_metering else state.active_this_cycle):
                self.problem("loss", f"{tenant}: GetContact {contact_id} says {short(state)}")
        deleted = sorted(book.deleted)
        for contact_id in self.rng.sample(deleted, min(CONTACTS_LOOKED_UP, len(deleted))):
            state = stubs.invoke("GetContact", pb.GetContactRequest(tenant_id=tenant, contact_id=contact_id)).contact
            if state.held:
                self.problem("phantom", f"{tenant}: deleted {contact_id} still held (AC-10)")


def run(
    ledger: Path,
    kills: int,
    seed: int,
    *,
    processes: list[Process] | None = None,
    say: Callable[[str], None] = print,
) -> Summary:
    """Runs `kills` kill points on a new ledger file and returns the summary."""
    return CrashHarness(ledger, kills, seed, processes=processes, say=say).run()


def seed_from(text: str | None) -> int:
    """The given seed, or a fresh random one."""
    return int(text) if text else random.SystemRandom().randrange(2**32)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kills",
        type=int,
        default=int(os.environ.get("QUOTA_CRASH_KILLS", "5")),
        help="kill points to run (default QUOTA_CRASH_KILLS or 5)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=seed_from(os.environ.get("QUOTA_CRASH_SEED")),
        help="the seed to replay (default QUOTA_CRASH_SEED or random, printed)",
    )
    parser.add_argument("--ledger-dir", type=Path, default=None, help="where to put the ledger (default a temp dir)")
    args = parser.parse_args(argv)
    seed = args.seed
    with tempfile.TemporaryDirectory(dir=args.ledger_dir) as folder:
        summary = run(Path(folder) / "ledger.db", args.kills, seed)
    print(summary.report())
    return 0 if summary.losses + summary.over_admissions + summary.other_problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
