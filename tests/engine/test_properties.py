"""Property tests of the decision engine: random workloads checked against a reference model and the ledger's rows.

Each example is a hypothesis state machine that drives the engine (server/engine/engine.py) directly, over a real
SQLite ledger file in a fresh temporary directory and a FakeClock. The tenant starts on one of the four presets
of api.md (one test class per preset) and then runs random steps: sends of every MessageKind to a pool of twelve
contact ids, batches with repeated ids, dry runs, every ActivityKind, contact additions from every source,
enrolments, plan changes (each preset, limits 1..8, add-ons, enforcement and grace, sends allowances, source
rules, prices, annual billing), request_id retries and clock advances of an hour to 40 days that cross cycle
boundaries. After every step:

- the engine's figures equal those recomputed from the ledger's rows (read through the ledger interface; the
  audit, which the interface never reads back, with plain sqlite3 on the file) and those of `Reference`, a small
  dict-based re-implementation of api.md's presets table and decision rules;
- every decision equals the reference's, and no ALLOW takes the count past a ceiling or a refusing source's limit;
- overage contacts and amounts are exact (Decimal, never float);
- dry runs and request_id retries leave every table row as it was.

The default run (60 examples of 40 steps per starting preset, 240 in all) takes about 15 s on two cores and is
sized to stay under 40 s in CI. Set QUOTA_PROPERTY_EXAMPLES to run more examples per starting preset, e.g.
`QUOTA_PROPERTY_EXAMPLES=1000 .venv/bin/python -m pytest tests/engine/test_properties.py` for a long hunt. The file
ends with plain tests holding minimal examples of server behaviour these properties led to.
Rule ids refer to docs/domain.md; "Decision rules" and "Presets" to docs/api.md.
"""

from __future__ import annotations

import calendar
import copy
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from quota_sidecar.server.domain.clock import MICROS, FakeClock, from_us, to_us
from quota_sidecar.server.domain.model import (
    ActivityKind,
    BillingInterval,
    Channel,
    ContactSource,
    Decision,
    Enforcement,
    MessageKind,
    Metering,
    Reason,
    SendDecision,
    SourcePolicy,
    Usage,
    UsageState,
)
from quota_sidecar.server.engine import (
    ActivityRequest,
    BatchRequest,
    ContactAddRequest,
    Engine,
    PlanInput,
    SendRequest,
)
from quota_sidecar.server.ledger.sqlite import SQLiteLedger

from support.oracle import pages_of_activations

EXAMPLES = int(os.environ.get("QUOTA_PROPERTY_EXAMPLES", "60"))
STEPS = 40
T = "tenant-p"
START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
CONTACTS = [f"c{i:02d}" for i in range(12)]
HOUR = 3_600 * MICROS
DAY = 24 * HOUR
MAX_QUEUE = DAY
DEFER_POLL = 5 * 60 * MICROS
MONEY = re.compile(r"\d+\.\d{2,}")

HELD = Metering.HELD_CONTACTS
ACTIVE = Metering.CYCLE_ACTIVE
HARD, GRACE, OVERAGE = Enforcement.HARD, Enforcement.GRACE, Enforcement.OVERAGE
ALLOW, DENY, DEFER, EXPIRED = Decision.ALLOW, Decision.DENY, Decision.DEFER, Decision.EXPIRED
OLA, REFUSE, BLOCKED = SourcePolicy.OVER_LIMIT_ALLOWED, SourcePolicy.REFUSE_IF_EXCEEDS, SourcePolicy.BLOCKED_AT_LIMIT
CAMPAIGN, AUTOMATION = MessageKind.CAMPAIGN, MessageKind.AUTOMATION
CONTACT_KINDS = {ActivityKind.CONTACT_CREATED, ActivityKind.CONTACT_DELETED, ActivityKind.MARKETING_STATUS_SET}

# The presets table of api.md, transcribed here so that the reference does not share server/domain/presets.py.
PRESETS: dict[str, dict] = {
    "contact-limit": {
        "metering": HELD,
        "enforcement": GRACE,
        "grace": 10,
        "rules": (
            (ContactSource.API, OLA),
            (ContactSource.FORM, OLA),
            (ContactSource.IMPORT, REFUSE),
            (ContactSource.MANUAL, BLOCKED),
        ),
        "kinds": (CAMPAIGN, AUTOMATION),
        "activities": (),
        "marketing_only": False,
        "per_contact": 0,
        "price": "",
        "currency": "",
        "thresholds": (0.9, 1.0),
    },
    "active-cycle-hard": {
        "metering": ACTIVE,
        "enforcement": HARD,
        "grace": 0,
        "rules": (),
        "kinds": (CAMPAIGN, AUTOMATION),
        "activities": (ActivityKind.MESSAGE_SENT,),
        "marketing_only": False,
        "per_contact": 10,
        "price": "",
        "currency": "",
        "thresholds": (0.8, 1.0),
    },
    "active-cycle-overage": {
        "metering": ACTIVE,
        "enforcement": OVERAGE,
        "grace": 0,
        "rules": (),
        "kinds": tuple(MessageKind),
        "activities": (
            ActivityKind.CONTACT_CREATED,
            ActivityKind.STATUS_CHANGED,
            ActivityKind.MESSAGE_SENT,
            ActivityKind.NOTE_ADDED,
            ActivityKind.PROPERTY_CHANGED,
            ActivityKind.STATUS_RENAMED,
        ),
        "marketing_only": False,
        "per_contact": 0,
        "price": "0.25",
        "currency": "EUR",
        "thresholds": (0.8, 1.0),
    },
    "marketing-contacts": {
        "metering": HELD,
        "enforcement": OVERAGE,
        "grace": 0,
        "rules": (),
        "kinds": (CAMPAIGN, AUTOMATION),
        "activities": (),
        "marketing_only": True,
        "per_contact": 0,
        "price": "",
        "currency": "",
        "thresholds": (0.8, 0.9, 1.0),
    },
}
ANCHORS = [None, datetime(2026, 1, 31, tzinfo=UTC), datetime(2025, 12, 15, 8, 0, tzinfo=UTC)]


# -- the reference model ------------------------------------------------------------------------------------------


def ref_cycle(anchor_us: int, at_us: int) -> tuple[int, int]:
    """[start, end) of the calendar-month cycle from the anchor that contains `at_us`, the day clamped."""
    anchor = from_us(anchor_us)

    def start(k: int) -> int:
        year, month = divmod(anchor.year * 12 + anchor.month - 1 + k, 12)
        day = min(anchor.day, calendar.monthrange(year, month + 1)[1])
        return to_us(anchor.replace(year=year, month=month + 1, day=day))

    at = from_us(at_us)
    k = (at.year - anchor.year) * 12 + at.month - anchor.month
    while start(k) > at_us:
        k -= 1
    while start(k + 1) <= at_us:
        k += 1
    return start(k), start(k + 1)


@dataclass(frozen=True)
class PlanChoice:
    """A plan as a test gives it: a preset and the fields given beside it."""

    preset: str
    contact_limit: int
    addon_contacts: int = 0
    enforcement: Enforcement | None = None
    grace_percent: int = 0
    sends: tuple[str, int] = ("preset", 0)
    price: str = ""
    source_rules: tuple[tuple[ContactSource, SourcePolicy], ...] = ()
    annual: bool = False
    plan_name: str = "Team"

    def plan_input(self, anchor_us: int | None) -> PlanInput:
        how, n = self.sends
        return PlanInput(
            preset=self.preset,
            plan_name=self.plan_name,
            contact_limit=self.contact_limit,
            addon_contacts=self.addon_contacts,
            enforcement=self.enforcement,
            grace_percent=self.grace_percent,
            sends_per_contact=n if how == "per_contact" else 0,
            sends_limit=n if how == "limit" else 0,
            overage_unit_price=self.price,
            currency="USD" if self.price else "",
            source_rules=self.source_rules,
            billing_interval=BillingInterval.ANNUAL if self.annual else None,
            cycle_anchor_us=anchor_us,
        )


@dataclass(frozen=True)
class RefPlan:
    metering: Metering
    enforcement: Enforcement
    contact_limit: int
    addon_contacts: int
    grace_percent: int
    sends_limit: int
    kinds: frozenset[MessageKind]
    activities: frozenset[ActivityKind]
    policies: tuple[tuple[ContactSource, SourcePolicy], ...]
    marketing_only: bool
    price: Decimal
    currency: str
    thresholds: tuple[float, ...]
    plan_name: str
    annual: bool

    @property
    def limit(self) -> int:
        return self.contact_limit + self.addon_contacts

    @property
    def ceiling(self) -> int | None:
        if self.enforcement is OVERAGE:
            return None
        if self.enforcement is GRACE:
            return self.limit + self.limit * self.grace_percent // 100
        return self.limit

    def policy(self, source: ContactSource) -> SourcePolicy:
        return dict(self.policies).get(source, OLA)


def resolve(choice: PlanChoice) -> RefPlan:
    """The plan api.md's presets table gives: explicit fields win; grace only under GRACE, price under OVERAGE."""
    p = PRESETS[choice.preset]
    enforcement = choice.enforcement or p["enforcement"]
    grace = (choice.grace_percent or p["grace"]) if enforcement is GRACE else 0
    limit = choice.contact_limit + choice.addon_contacts
    how, n = choice.sends
    sends_limit = {"preset": p["per_contact"] * limit, "per_contact": n * limit, "limit": n}[how]
    if choice.price:
        price, currency = choice.price, "USD"
    elif enforcement is OVERAGE:
        price, currency = p["price"], p["currency"]
    else:
        price, currency = "", ""
    return RefPlan(
        metering=p["metering"],
        enforcement=enforcement,
        contact_limit=choice.contact_limit,
        addon_contacts=choice.addon_contacts,
        grace_percent=grace,
        sends_limit=sends_limit,
        kinds=frozenset(p["kinds"]),
        activities=frozenset(p["activities"]),
        policies=choice.source_rules or p["rules"],
        marketing_only=p["marketing_only"],
        price=Decimal(price or "0"),
        currency=currency,
        thresholds=p["thresholds"],
        plan_name=choice.plan_name,
        annual=choice.annual,
    )


@dataclass
class RefContact:
    held: bool
    marketing: bool = False
    until_us: int = 0
    source_type: str = ""
    source_id: str = ""


@dataclass
class RefCycle:
    """One cycle's figures: contacts active in it with their sends, sends counted under HELD_CONTACTS, and the
    held and marketing counts at their highest and at the cycle's end (so far, for the current one)."""

    start_us: int
    end_us: int
    plan: RefPlan
    active: dict[str, int] = field(default_factory=dict)
    held_sends: int = 0
    peak_held: int = 0
    peak_marketing: int = 0
    end_held: int = 0
    end_marketing: int = 0


@dataclass(frozen=True)
class Figures:
    cycle_start_us: int
    cycle_end_us: int
    active_contacts: int
    peak_contacts: int
    contact_limit: int
    usage_ratio: float
    sends: int
    sends_limit: int
    state: UsageState
    overage_contacts: int
    overage_amount: Decimal
    currency: str
    plan_name: str


def ref_state(p: RefPlan, count: int, sends: int) -> UsageState:
    """UsageState as api.md defines it (BLOCKED when sends are blocked, then overage, grace, limit, warning)."""
    ceiling = p.ceiling
    if p.sends_limit and sends >= p.sends_limit:
        return UsageState.BLOCKED
    if ceiling is not None and p.metering is HELD and count > ceiling:
        return UsageState.BLOCKED
    if ceiling is not None and p.metering is ACTIVE and p.enforcement is GRACE and count >= ceiling:
        return UsageState.BLOCKED
    if p.enforcement is OVERAGE and count > p.limit:
        return UsageState.IN_OVERAGE
    if p.enforcement is GRACE and count > p.limit:
        return UsageState.IN_GRACE
    if count >= p.limit:
        return UsageState.AT_LIMIT
    if count / p.limit >= min(p.thresholds):
        return UsageState.WARNING
    return UsageState.OK


class Reference:
    """The rules of api.md (Decision rules) and common.md over plain dicts: what every call should answer."""

    def __init__(self, anchor_us: int, plan: RefPlan, now_us: int) -> None:
        self.anchor_us = anchor_us
        self.now_us = now_us
        self.contacts: dict[str, RefContact] = {}
        start, end = ref_cycle(anchor_us, now_us)
        self.cycles: dict[int, RefCycle] = {start: RefCycle(start, end, plan)}
        self.cur = self.cycles[start]

    @property
    def plan(self) -> RefPlan:
        return self.cur.plan

    def held_count(self) -> int:
        return sum(1 for c in self.contacts.values() if c.held)

    def marketing_count(self) -> int:
        return sum(1 for c in self.contacts.values() if c.held and c.marketing)

    def count(self) -> int:
        if self.plan.metering is ACTIVE:
            return len(self.cur.active)
        return self.marketing_count() if self.plan.marketing_only else self.held_count()

    def sends(self) -> int:
        return sum(self.cur.active.values()) + self.cur.held_sends

    def observe(self) -> None:
        """Keeps the current cycle's end and peak counts after a step."""
        held, marketing = self.held_count(), self.marketing_count()
        cur = self.cur
        cur.end_held, cur.end_marketing = held, marketing
        cur.peak_held, cur.peak_marketing = max(cur.peak_held, held), max(cur.peak_marketing, marketing)

    def set_time(self, now_us: int) -> None:
        """Moves to `now_us`; entering a new cycle applies the MK-6 switches due at its start (SG-7)."""
        self.now_us = now_us
        while self.cur.end_us <= now_us:
            for c in self.contacts.values():
                if c.until_us and c.until_us <= self.cur.end_us:
                    c.marketing, c.until_us = False, 0
            start, end = ref_cycle(self.anchor_us, self.cur.end_us)
            self.cycles[start] = RefCycle(start, end, self.plan)
            self.cur = self.cycles[start]
            self.observe()

    def put_plan(self, plan: RefPlan) -> None:
        self.cur.plan = plan

    # -- decisions --

    def _limited(self, kind: MessageKind, reason: Reason, queued_since_us: int | None) -> SendDecision:
        if kind is not AUTOMATION:
            return SendDecision(DENY, reason)
        waited = self.now_us - (queued_since_us if queued_since_us is not None else self.now_us)
        if waited >= MAX_QUEUE:
            return SendDecision(EXPIRED, Reason.QUEUED_TOO_LONG)
        retry = min(self.cur.end_us - self.now_us, MAX_QUEUE - waited, DEFER_POLL)
        return SendDecision(DEFER, reason, retry_after_us=max(retry, MICROS))

    def _limit_reason(self) -> Reason:
        return Reason.OVER_GRACE if self.plan.enforcement is GRACE else Reason.CONTACT_LIMIT_REACHED

    def send(self, kind: MessageKind, contact_id: str, queued_since_us: int | None = None) -> SendDecision:
        p, cur = self.plan, self.cur
        if kind not in p.kinds:
            return SendDecision(ALLOW, Reason.NOT_COUNTED)
        sends_left = not p.sends_limit or self.sends() < p.sends_limit
        if p.metering is ACTIVE:
            if contact_id in cur.active:
                if not sends_left:
                    return self._limited(kind, Reason.SENDS_LIMIT_REACHED, queued_since_us)
                cur.active[contact_id] += 1
                return SendDecision(ALLOW, Reason.ALREADY_ACTIVE)
            if p.ceiling is not None and self.count() >= p.ceiling:
                return self._limited(kind, self._limit_reason(), queued_since_us)
            if not sends_left:
                return self._limited(kind, Reason.SENDS_LIMIT_REACHED, queued_since_us)
            cur.active[contact_id] = 1
            over = p.enforcement is OVERAGE and self.count() > p.limit
            return SendDecision(ALLOW, Reason.OVERAGE if over else Reason.NEW_CONTACT_COUNTED, newly_active=True)
        contact = self.contacts.get(contact_id)
        if contact is None or not contact.held:
            return SendDecision(DENY, Reason.UNKNOWN_CONTACT)
        if p.marketing_only and not contact.marketing:
            return SendDecision(DENY, Reason.NOT_MARKETING_CONTACT)
        if p.ceiling is not None and self.count() > p.ceiling:
            return self._limited(kind, self._limit_reason(), queued_since_us)
        if not sends_left:
            return self._limited(kind, Reason.SENDS_LIMIT_REACHED, queued_since_us)
        cur.held_sends += 1
        return SendDecision(ALLOW, Reason.OK)

    def batch(self, kind: MessageKind, contact_ids: list[str]) -> list[tuple[str, SendDecision]]:
        first: dict[str, SendDecision] = {}
        results = []
        for contact_id in contact_ids:
            if contact_id in first:
                results.append((contact_id, replace(first[contact_id], newly_active=False)))
                continue
            first[contact_id] = self.send(kind, contact_id)
            results.append((contact_id, first[contact_id]))
        return results

    def add(self, source: ContactSource, contact_ids: list[str], marketing: bool) -> tuple[Decision, Reason, int]:
        p = self.plan
        ids = list(dict.fromkeys(contact_ids))
        new = [c for c in ids if not (c in self.contacts and self.contacts[c].held)]
        if p.metering is HELD:
            counted = len(new) if marketing or not p.marketing_only else 0
        elif ActivityKind.CONTACT_CREATED in p.activities:
            counted = sum(1 for c in new if c not in self.cur.active)
        else:
            counted = 0
        policy = p.policy(source)
        if policy is not OLA and counted and self.count() + counted > p.limit:
            return DENY, Reason.IMPORT_EXCEEDS_LIMIT if policy is REFUSE else Reason.SOURCE_BLOCKED, 0
        for c in new:
            self.contacts[c] = RefContact(True, marketing, 0, source.name, "")
            if p.metering is ACTIVE and counted and c not in self.cur.active:
                self.cur.active[c] = 0
        over = counted and p.enforcement is OVERAGE and self.count() > p.limit
        return ALLOW, Reason.OVERAGE if over else Reason.OK, len(new)

    def cycle_of(self, at_us: int) -> RefCycle:
        return next(c for c in self.cycles.values() if c.start_us <= at_us < c.end_us)

    def activity(
        self,
        kind: ActivityKind,
        contact_ids: list[str],
        marketing: bool,
        source_type: str,
        source_id: str,
        booked: RefCycle | None = None,
    ) -> tuple[int, int]:
        """Contact activities change contacts now; counted activities activate contacts in the cycle the activity
        is booked into (the one containing occurred_at), whatever the limit (CR-5). newly_active is the contacts
        the call made count: activated, or under HELD_CONTACTS held (model 4: held and marketing) by it."""
        booked = booked or self.cur
        ids = list(dict.fromkeys(contact_ids))
        counted_before = {c for c in ids if self._counts(c)}
        if kind in CONTACT_KINDS:
            for c in ids:
                self._change(c, kind, marketing, source_type, source_id)
        if self.plan.metering is not ACTIVE:
            return len(ids), sum(1 for c in ids if c not in counted_before and self._counts(c))
        newly = 0
        if kind in self.plan.activities:
            for c in ids:
                if c not in booked.active:
                    booked.active[c] = 0
                    newly += 1
        return len(ids), newly

    def _counts(self, contact_id: str) -> bool:
        c = self.contacts.get(contact_id)
        return c is not None and c.held and (c.marketing or not self.plan.marketing_only)

    def _change(self, contact_id: str, kind: ActivityKind, marketing: bool, source_type: str, source_id: str) -> None:
        """CONTACT_CREATED holds a contact, CONTACT_DELETED lets it go (AC-10), MARKETING_STATUS_SET sets its
        status (MK-5): marketing at once, non-marketing at the next cycle start (MK-6)."""
        before = self.contacts.get(contact_id)
        held = before is not None and before.held
        if kind is ActivityKind.CONTACT_CREATED:
            if not held:
                self.contacts[contact_id] = RefContact(True, marketing, 0, source_type, source_id)
            return
        if kind is ActivityKind.CONTACT_DELETED:
            if held:
                before.held, before.marketing, before.until_us = False, False, 0
            return
        contact = before if held else RefContact(True)
        contact.source_type, contact.source_id = source_type, source_id
        if marketing:
            contact.marketing, contact.until_us = True, 0
        elif contact.marketing and not contact.until_us:
            contact.until_us = self.cur.end_us
        self.contacts[contact_id] = contact

    def enroll(self, contact_id: str) -> tuple[Decision, Reason]:
        p = self.plan
        sends_used = bool(p.sends_limit) and self.sends() >= p.sends_limit
        if p.metering is HELD:
            contact = self.contacts.get(contact_id)
            if contact is None or not contact.held:
                return DENY, Reason.UNKNOWN_CONTACT
            if p.ceiling is not None and self.count() > p.ceiling:
                return DENY, self._limit_reason()
            if sends_used:
                return DENY, Reason.SENDS_LIMIT_REACHED
            return ALLOW, Reason.OK
        if sends_used:
            return DENY, Reason.SENDS_LIMIT_REACHED
        if contact_id in self.cur.active:
            return ALLOW, Reason.ALREADY_ACTIVE
        if p.ceiling is not None and self.count() >= p.ceiling:
            return DENY, self._limit_reason()
        return ALLOW, Reason.OK

    # -- figures --

    def figures(self, cycle: RefCycle | None = None) -> Figures:
        """GetUsage of a cycle (default current) under the plan in force at its end (now, for the current one)."""
        cycle = cycle or self.cur
        p = cycle.plan
        if p.metering is ACTIVE:
            count = peak = len(cycle.active)
        elif p.marketing_only:
            count, peak = cycle.end_marketing, max(cycle.peak_marketing, cycle.end_marketing)
        else:
            count, peak = cycle.end_held, max(cycle.peak_held, cycle.end_held)
        sends = sum(cycle.active.values()) + cycle.held_sends
        over = max(0, peak - p.limit)
        return Figures(
            cycle_start_us=cycle.start_us,
            cycle_end_us=cycle.end_us,
            active_contacts=count,
            peak_contacts=peak,
            contact_limit=p.limit,
            usage_ratio=count / p.limit,
            sends=sends,
            sends_limit=p.sends_limit,
            state=ref_state(p, count, sends),
            overage_contacts=over,
            overage_amount=p.price * over,
            currency=p.currency,
            plan_name=p.plan_name,
        )


# -- strategies ---------------------------------------------------------------------------------------------------

SENDS = st.sampled_from(
    [("preset", 0), ("per_contact", 1), ("per_contact", 2), ("per_contact", 10), ("limit", 3), ("limit", 12)]
)
RULES = st.one_of(
    st.just(()),
    st.dictionaries(st.sampled_from(list(ContactSource)), st.sampled_from(list(SourcePolicy)), min_size=1).map(
        lambda rules: tuple(sorted(rules.items()))
    ),
)
IDS = st.lists(st.sampled_from(CONTACTS), min_size=1, max_size=8)
HOURS = st.integers(1, 96).map(lambda hours: hours * HOUR)
# Hours twice over: most steps stay inside a cycle, so figures can build up between boundaries.
ADVANCES = st.one_of(
    HOURS,
    HOURS,
    st.integers(1, 40).map(lambda days: days * DAY),
    st.sampled_from(["to-cycle-end", "just-before-cycle-end"]),
)

ANY_PRESET = st.sampled_from(list(PRESETS))


@st.composite
def plan_choices(draw: st.DrawFn, presets: st.SearchStrategy[str] = ANY_PRESET) -> PlanChoice:
    """A valid plan: a preset, limit 1..8, add-ons, maybe another enforcement with a grace (GRACE only) or a price
    (OVERAGE only), a sends allowance, source rules and annual billing."""
    preset = draw(presets)
    enforcement = draw(st.sampled_from([None, HARD, GRACE, OVERAGE]))
    effective = enforcement or PRESETS[preset]["enforcement"]
    grace = draw(st.sampled_from([0, 10, 5, 25, 50, 100])) if effective is GRACE else 0
    price = draw(st.sampled_from(["", "0.25", "1.10", "0.125", "3"])) if effective is OVERAGE else ""
    return PlanChoice(
        preset=preset,
        contact_limit=draw(st.integers(1, 8)),
        addon_contacts=draw(st.integers(0, 3)),
        enforcement=enforcement,
        grace_percent=grace,
        sends=draw(SENDS),
        price=price,
        source_rules=draw(RULES),
        annual=draw(st.booleans()),
        plan_name=draw(st.sampled_from(["Team", "GROW"])),
    )


# -- checks -------------------------------------------------------------------------------------------------------


def snapshot(conn: sqlite3.Connection) -> dict[str, list[tuple]]:
    """Every row of every table of the ledger file."""
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def assert_usage(usage: Usage, expected: Figures) -> None:
    """GetUsage figures equal the reference's; overage contacts and amount are exact (CR-6)."""
    assert MONEY.fullmatch(usage.overage_amount), usage.overage_amount
    got = Figures(
        cycle_start_us=usage.cycle_start_us,
        cycle_end_us=usage.cycle_end_us,
        active_contacts=usage.active_contacts,
        peak_contacts=usage.peak_contacts,
        contact_limit=usage.contact_limit,
        usage_ratio=usage.usage_ratio,
        sends=usage.sends,
        sends_limit=usage.sends_limit,
        state=usage.state,
        overage_contacts=usage.overage_contacts,
        overage_amount=Decimal(usage.overage_amount),
        currency=usage.currency,
        plan_name=usage.plan_name,
    )
    assert got == expected


# -- the state machine --------------------------------------------------------------------------------------------


class EngineWorkload(RuleBasedStateMachine):
    """One tenant on one engine over a fresh SQLite file; subclasses choose the starting preset."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="quota-properties-")
        self.path = Path(self.directory) / "ledger.db"
        # WAL with synchronous NORMAL is still a real file with real transactions; it only skips the fsync per
        # commit, which thousands of steps cannot afford and which no property here is about.
        self.ledger = SQLiteLedger(self.path, synchronous="NORMAL")
        self.ledger.open()
        self.clock = FakeClock(START)
        self.engine = Engine(self.ledger, self.clock)
        self.rows = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        self.ref: Reference | None = None
        self.answered: list[tuple[int, str, object, object]] = []
        self.next_request = 0

    def teardown(self) -> None:
        self.rows.close()
        self.ledger.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def start(self, choice: PlanChoice, anchor: datetime | None) -> None:
        anchor_us = to_us(anchor) if anchor is not None else None
        plan, usage = self.engine.put_plan(T, choice.plan_input(anchor_us))
        self.ref = Reference(plan.cycle_anchor_us, resolve(choice), self.clock.now_us())
        self.ref.observe()
        assert_usage(usage, self.ref.figures())

    def request_id(self, wanted: bool) -> str:
        if not wanted:
            return ""
        self.next_request += 1
        return f"req-{self.next_request}"

    def remember(self, request_id: str, rpc: str, request: object, outcome: object) -> None:
        if request_id:
            self.answered.append((self.ref.cur.start_us, rpc, request, outcome))

    def call(self, rpc: str, request: object) -> object:
        return {
            "CheckSend": self.engine.check_send,
            "CheckSendBatch": self.engine.check_send_batch,
            "CheckContactAdd": self.engine.check_contact_add,
            "RecordActivity": self.engine.record_activity,
        }[rpc](request)

    # -- sends --

    @rule(
        kind=st.sampled_from(list(MessageKind)),
        contact_id=st.sampled_from(CONTACTS),
        queued_hours_ago=st.sampled_from([None, 0, 1, 23, 24, 30]),
        with_request_id=st.booleans(),
    )
    def send(self, kind: MessageKind, contact_id: str, queued_hours_ago: int | None, with_request_id: bool) -> None:
        """SG-2, SG-8, AC-6..AC-9, MK-3, MK-4: CheckSend decides as the rules say and never passes a ceiling."""
        ref = self.ref
        count_before = ref.count()
        queued = None if queued_hours_ago is None else self.clock.now_us() - queued_hours_ago * HOUR
        request_id = self.request_id(with_request_id)
        req = SendRequest(T, contact_id, Channel.EMAIL, kind, queued_since_us=queued, request_id=request_id)
        out = self.engine.check_send(req)
        expected = ref.send(kind, contact_id, queued)
        ref.observe()
        assert out.decision == expected
        assert_usage(out.usage, ref.figures())
        self.assert_within_ceiling(kind, count_before, [out.decision])
        self.remember(request_id, "CheckSend", req, out)

    @rule(kind=st.sampled_from(list(MessageKind)), contact_ids=IDS, with_request_id=st.booleans())
    def send_batch(self, kind: MessageKind, contact_ids: list[str], with_request_id: bool) -> None:
        """SG-2, SG-5, SG-8, CR-2: a batch is decided in order, a repeated id repeats its first decision and
        counts once, and no entry takes the count past the ceiling."""
        ref = self.ref
        count_before = ref.count()
        request_id = self.request_id(with_request_id)
        req = BatchRequest(T, Channel.EMAIL, kind, contact_ids, request_id=request_id)
        out = self.engine.check_send_batch(req)
        expected = ref.batch(kind, contact_ids)
        ref.observe()
        assert list(out.results) == expected
        allowed = sum(1 for _, d in expected if d.decision is ALLOW)
        assert (out.allowed, out.denied) == (allowed, len(contact_ids) - allowed)
        assert out.newly_active == sum(1 for _, d in expected if d.newly_active)
        assert_usage(out.usage, ref.figures())
        self.assert_within_ceiling(kind, count_before, [d for _, d in out.results])
        self.remember(request_id, "CheckSendBatch", req, out)

    def assert_within_ceiling(self, kind: MessageKind, count_before: int, decisions: list[SendDecision]) -> None:
        """SG-2, SG-11 (CYCLE_ACTIVE): a send makes a contact newly active only while count < ceiling.
        AC-6, AC-7, AC-8 (HELD_CONTACTS): no counted send is allowed while count > ceiling."""
        plan = self.ref.plan
        if plan.ceiling is None or kind not in plan.kinds:
            return
        count = count_before
        for d in decisions:
            if d.decision is not ALLOW:
                continue
            if plan.metering is ACTIVE and d.newly_active:
                assert count < plan.ceiling
                count += 1
            if plan.metering is HELD:
                assert count <= plan.ceiling

    # -- contacts --

    @rule(
        source=st.sampled_from(list(ContactSource)),
        contact_ids=st.lists(st.sampled_from(CONTACTS), min_size=1, max_size=5),
        marketing=st.sampled_from([None, True, False]),
        with_request_id=st.booleans(),
    )
    def add_contacts(
        self, source: ContactSource, contact_ids: list[str], marketing: bool | None, with_request_id: bool
    ) -> None:
        """AC-2..AC-5, MK-1, MK-5: a source's policy decides the whole request; a refusing policy never lets the
        count pass the limit; API and form adds go past it."""
        ref = self.ref
        count_before = ref.count()
        request_id = self.request_id(with_request_id)
        req = ContactAddRequest(T, source, contact_ids, marketing=marketing, request_id=request_id)
        out = self.engine.check_contact_add(req)
        expected = ref.add(source, contact_ids, marketing is not False)
        ref.observe()
        assert (out.decision, out.reason, out.added) == expected
        assert_usage(out.usage, ref.figures())
        if ref.plan.policy(source) is not OLA:
            assert ref.count() <= max(count_before, ref.plan.limit)
        if out.decision is DENY:
            assert ref.count() == count_before
        self.remember(request_id, "CheckContactAdd", req, out)

    @rule(
        kind=st.sampled_from(list(ActivityKind)),
        contact_ids=st.lists(st.sampled_from(CONTACTS), min_size=1, max_size=4),
        marketing=st.booleans(),
        source=st.sampled_from([("", ""), ("WORKFLOW", "wf-7"), ("USER", "u-1")]),
        occurred_at=st.sampled_from([None, "now", "cycle-start", "previous-cycle", "40-days-ago"]),
        with_request_id=st.booleans(),
    )
    def record_activity(
        self,
        kind: ActivityKind,
        contact_ids: list[str],
        marketing: bool,
        source: tuple[str, str],
        occurred_at: str | None,
        with_request_id: bool,
    ) -> None:
        """CR-1, CR-2, CR-5, SG-9, AC-10, MK-5, MK-6: activity is never refused; counted kinds activate once per
        cycle (the cycle containing occurred_at), deletion lowers only a held count, marketing status changes as
        MK-6 says. A late activity goes only into past cycles that ended under the current plan: the other case is
        test_cr6_cr7_activity_booked_into_a_past_cycle_answers_that_cycles_figures below."""
        ref = self.ref
        occurred, booked = None, ref.cur
        if occurred_at is not None:
            at = {
                "now": self.clock.now_us(),
                "cycle-start": ref.cur.start_us,
                "previous-cycle": ref.cur.start_us - HOUR,
                "40-days-ago": self.clock.now_us() - 40 * DAY,
            }[occurred_at]
            at = max(at, min(ref.cycles))
            if ref.cycle_of(at).plan == ref.plan:
                occurred, booked = at, ref.cycle_of(at)
        request_id = self.request_id(with_request_id)
        req = ActivityRequest(
            T,
            kind,
            contact_ids,
            occurred_at_us=occurred,
            marketing=marketing,
            source_type=source[0],
            source_id=source[1],
            request_id=request_id,
        )
        out = self.engine.record_activity(req)
        expected = ref.activity(kind, contact_ids, marketing, *source, booked=booked)
        ref.observe()
        assert (out.recorded, out.newly_active) == expected
        assert_usage(out.usage, ref.figures(booked))
        if booked is not ref.cur:
            assert_usage(self.engine.get_usage(T, occurred), ref.figures(booked))
            assert self.activations(booked.start_us) == booked.active
        self.remember(request_id, "RecordActivity", req, out)

    @rule(contact_id=st.sampled_from(CONTACTS))
    def enroll(self, contact_id: str) -> None:
        """AC-7, AC-8, SG-3: CheckEnroll decides as the rules say and counts nothing."""
        before = snapshot(self.rows)
        out = self.engine.check_enroll(T, contact_id, "auto-1")
        assert (out.decision, out.reason) == self.ref.enroll(contact_id)
        assert_usage(out.usage, self.ref.figures())
        assert snapshot(self.rows) == before

    # -- dry runs (SG-5) --

    @rule(
        kind=st.sampled_from(list(MessageKind)),
        contact_ids=IDS,
        single=st.booleans(),
    )
    def dry_run_sends(self, kind: MessageKind, contact_ids: list[str], single: bool) -> None:
        """SG-5: a dry run (CheckSend or CheckSendBatch) answers what the real call would, and changes no row."""
        before = snapshot(self.rows)
        would = copy.deepcopy(self.ref)
        if single:
            out = self.engine.check_send(SendRequest(T, contact_ids[0], Channel.EMAIL, kind, dry_run=True))
            assert out.decision == would.send(kind, contact_ids[0])
        else:
            batch = self.engine.check_send_batch(BatchRequest(T, Channel.EMAIL, kind, contact_ids, dry_run=True))
            assert list(batch.results) == would.batch(kind, contact_ids)
            out = batch
        would.observe()
        assert_usage(out.usage, would.figures())
        assert snapshot(self.rows) == before

    @rule(
        source=st.sampled_from(list(ContactSource)),
        contact_ids=st.lists(st.sampled_from(CONTACTS), min_size=1, max_size=5),
        marketing=st.sampled_from([None, True, False]),
    )
    def dry_run_add(self, source: ContactSource, contact_ids: list[str], marketing: bool | None) -> None:
        """SG-5, AC-4: a dry-run CheckContactAdd answers what the real call would, and changes no row."""
        before = snapshot(self.rows)
        would = copy.deepcopy(self.ref)
        req = ContactAddRequest(T, source, contact_ids, dry_run=True, marketing=marketing)
        out = self.engine.check_contact_add(req)
        assert (out.decision, out.reason, out.added) == would.add(source, contact_ids, marketing is not False)
        would.observe()
        assert_usage(out.usage, would.figures())
        assert snapshot(self.rows) == before

    # -- retries --

    @precondition(lambda self: any(a[0] == self.ref.cur.start_us for a in self.answered))
    @rule(pick=st.integers(0, 1_000))
    def retry(self, pick: int) -> None:
        """api.md request_id: a retry within the cycle returns the first answer and changes no row."""
        current = [a for a in self.answered if a[0] == self.ref.cur.start_us]
        _, rpc, request, first = current[pick % len(current)]
        before = snapshot(self.rows)
        assert self.call(rpc, request) == first
        assert snapshot(self.rows) == before

    # -- the control plane and time --

    @rule(choice=plan_choices())
    def put_plan(self, choice: PlanChoice) -> None:
        """SG-4, CR-4, Presets: a plan change resolves its preset as api.md's table says and applies at once."""
        plan, usage = self.engine.put_plan(T, choice.plan_input(None))
        expected = resolve(choice)
        assert (plan.metering, plan.enforcement, plan.marketing_contacts_only) == (
            expected.metering,
            expected.enforcement,
            expected.marketing_only,
        )
        assert (plan.limit, plan.ceiling, plan.effective_sends_limit) == (
            expected.limit,
            expected.ceiling,
            expected.sends_limit,
        )
        assert set(plan.counted_kinds) == expected.kinds and set(plan.counted_activities) == expected.activities
        assert all(plan.source_policy(s) is expected.policy(s) for s in ContactSource)
        assert Decimal(plan.overage_unit_price or "0") == expected.price and plan.currency == expected.currency
        self.ref.put_plan(expected)
        assert_usage(usage, self.ref.figures())

    @rule(step=ADVANCES)
    def advance(self, step: int | str) -> None:
        """SG-7, MK-6, CR-7: time moves, across cycle boundaries too; every cycle passed over keeps its figures,
        reported under the plan in force at its end."""
        now = self.clock.now_us()
        end = self.ref.cur.end_us
        if step == "to-cycle-end":
            target = end
        elif step == "just-before-cycle-end":
            target = max(now, end - MICROS)
        else:
            target = now + step
        self.clock.set(target)
        self.ref.set_time(target)
        self.ref.observe()
        for cycle in self.ref.cycles.values():
            if cycle is not self.ref.cur:
                assert_usage(self.engine.get_usage(T, cycle.start_us + HOUR), self.ref.figures(cycle))

    # -- invariants --

    @invariant()
    def figures_match_the_reference_and_the_invoice(self) -> None:
        """SG-1, SG-6, SG-7, SG-8, CR-2, CR-6, CR-7, AC-10, MK-1, MK-2: GetUsage equals the reference; the
        overage is max(0, peak - limit) (count - limit under CYCLE_ACTIVE) and the amount price x overage exactly;
        GetInvoice lists the same figures."""
        if self.ref is None:
            return
        expected = self.ref.figures()
        plan = self.ref.plan
        usage = self.engine.get_usage(T)
        assert_usage(usage, expected)
        assert usage.overage_contacts == max(0, usage.peak_contacts - usage.contact_limit)
        if plan.metering is ACTIVE:
            assert usage.peak_contacts == usage.active_contacts
        assert Decimal(usage.overage_amount) == plan.price * usage.overage_contacts
        invoice = self.engine.get_invoice(T)
        assert invoice.usage == usage
        if plan.metering is ACTIVE:
            metered = "Contacts active this cycle"
        elif plan.marketing_only:
            metered = "Highest marketing contacts this cycle"
        else:
            metered = "Highest contacts held this cycle"
        overage = "Overage contacts" + (" (annual plan, overage invoiced monthly)" if plan.annual else "")
        lines = [(f"Contacts included in the plan ({plan.plan_name})", plan.contact_limit, "0.00", "0.00")]
        if plan.addon_contacts:
            lines.append(("Add-on contacts", plan.addon_contacts, "0.00", "0.00"))
        lines.append((metered, expected.peak_contacts, "0.00", "0.00"))
        got = [(x.description, x.quantity, x.unit_price, x.amount) for x in invoice.lines]
        assert got[:-1] == lines
        description, quantity, unit_price, amount = got[-1]
        assert (description, quantity) == (overage, expected.overage_contacts)
        assert Decimal(unit_price) == plan.price and Decimal(amount) == plan.price * quantity
        assert MONEY.fullmatch(unit_price) and MONEY.fullmatch(amount)
        assert all(x.currency == plan.currency for x in invoice.lines)

    def activations(self, cycle_start_us: int) -> dict[str, int]:
        """The cycle's activations (contact -> sends), read through the ledger interface."""
        return self.engine.ledger.read(
            lambda r: {a.contact_id: a.sends for a in pages_of_activations(r, T, cycle_start_us)}
        )

    @invariant()
    def figures_match_the_ledger_rows(self) -> None:
        """SG-1, SG-8, SG-9, CR-2 (CYCLE_ACTIVE): active contacts are the cycle's activation rows and sends their
        sends (plus sends counted under a HELD_CONTACTS plan earlier in the cycle). AC-10, MK-1, MK-6
        (HELD_CONTACTS): the count is the contacts rows held (model 4: and marketing at now)."""
        if self.ref is None:
            return
        ref, now = self.ref, self.clock.now_us()
        start = ref.cur.start_us
        usage = self.engine.get_usage(T)
        activations = self.activations(start)
        assert activations == ref.cur.active
        # The audit is the SQLite file's alone: the ledger interface writes it and never reads it back.
        held_sends = self.rows.execute(
            "SELECT COALESCE(SUM(sends_delta), 0) FROM audit WHERE tenant_id = ? AND cycle_start_us = ?"
            " AND rpc IN ('CheckSend', 'CheckSendBatch') AND reason = 'OK'",
            (T, start),
        ).fetchone()[0]
        assert held_sends == ref.cur.held_sends
        assert usage.sends == sum(activations.values()) + held_sends
        if ref.plan.metering is ACTIVE:
            assert usage.active_contacts == len(activations)
        else:
            counted = self.engine.ledger.read(
                lambda r: r.counted_contacts(T, ref.plan.marketing_only, now, "", len(CONTACTS) + 1)
            )
            assert usage.active_contacts == len(counted)
        # Every contact the ledger knows: the workload only ever names the ids of CONTACTS.
        stored = self.engine.ledger.read(lambda r: [r.contact(T, cid) for cid in CONTACTS])
        contacts = {
            c.contact_id: (
                c.held,
                c.marketing and (c.marketing_until_us == 0 or c.marketing_until_us > now),
                c.marketing_until_us if c.marketing_until_us > now else 0,
                c.marketing_source_type,
                c.marketing_source_id,
            )
            for c in stored
            if c is not None
        }
        assert contacts == {
            cid: (c.held, c.held and c.marketing, c.until_us, c.source_type, c.source_id)
            for cid, c in ref.contacts.items()
        }


def _workload(preset: str) -> type[EngineWorkload]:
    class Workload(EngineWorkload):
        @initialize(choice=plan_choices(st.just(preset)), anchor=st.sampled_from(ANCHORS))
        def begin(self, choice: PlanChoice, anchor: datetime | None) -> None:
            self.start(choice, anchor)

    Workload.__name__ = Workload.__qualname__ = f"Workload[{preset}]"
    # database=None: no example database written into the repository; a failure prints its steps to replay.
    Workload.TestCase.settings = settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None
    )
    return Workload


TestContactLimitPreset = _workload("contact-limit").TestCase
TestActiveCycleHardPreset = _workload("active-cycle-hard").TestCase
TestActiveCycleOveragePreset = _workload("active-cycle-overage").TestCase
TestMarketingContactsPreset = _workload("marketing-contacts").TestCase


# -- minimal examples of server behaviour found while writing these properties ------------------------------------


@pytest.fixture
def engine_and_clock(tmp_path: Path) -> Iterator[tuple[Engine, FakeClock]]:
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    ledger.open()
    clock = FakeClock(START)
    try:
        yield Engine(ledger, clock), clock
    finally:
        ledger.close()


def test_cr6_cr7_activity_booked_into_a_past_cycle_answers_that_cycles_figures(
    engine_and_clock: tuple[Engine, FakeClock],
) -> None:
    """CR-6, CR-7, SG-7: a RecordActivity booked late into a past cycle (occurred_at) answers that cycle's figures
    as GetUsage and GetInvoice report them, under the plan in force at the cycle's end: the answer must not show
    the past cycle under today's limit (here no overage) while its invoice bills one overage contact."""
    engine, clock = engine_and_clock
    engine.put_plan(T, PlanInput(preset="active-cycle-overage", contact_limit=2))
    clock.advance(35 * 86_400)
    engine.put_plan(T, PlanInput(preset="active-cycle-overage", contact_limit=5))
    late = to_us(START) + DAY
    out = engine.record_activity(ActivityRequest(T, ActivityKind.NOTE_ADDED, ["a", "b", "c"], occurred_at_us=late))
    assert out.newly_active == 3
    assert engine.get_invoice(T, late).usage.overage_contacts == 1
    assert out.usage == engine.get_usage(T, late)


def test_ac6_ac7_moving_the_cycle_anchor_keeps_the_held_count(engine_and_clock: tuple[Engine, FakeClock]) -> None:
    """AC-6, AC-7, AC-10: under HELD_CONTACTS the count is the contacts the tenant holds, whatever its cycle anchor.
    A plan replaced with an earlier cycle_anchor (the current cycle now starts before the one the holdings were
    written in) must keep the four held contacts counted, so campaigns stay blocked above the ceiling."""
    engine, _ = engine_and_clock
    engine.put_plan(T, PlanInput(preset="contact-limit", contact_limit=2))
    engine.check_contact_add(ContactAddRequest(T, ContactSource.API, ["a", "b", "c", "d"]))
    moved = PlanInput(preset="contact-limit", contact_limit=2, cycle_anchor_us=to_us(datetime(2026, 1, 5, tzinfo=UTC)))
    _, usage = engine.put_plan(T, moved)
    assert usage.active_contacts == 4
    out = engine.check_send(SendRequest(T, "a", Channel.EMAIL, CAMPAIGN))
    assert (out.decision.decision, out.decision.reason) == (DENY, Reason.OVER_GRACE)
