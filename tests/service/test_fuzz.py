"""Property-based fuzzing of every RPC of quota.v1 over a real channel (api.md "Errors").

One real in-process sidecar (tests/support/sidecar.py `start_sidecar`: a real gRPC server on a free port, a real SQLite
ledger file, a FakeClock) serves the fuzz tests of this module. Five tenants get plans at the start (CYCLE_ACTIVE
under HARD, GRACE and OVERAGE, HELD_CONTACTS under the contact-limit and marketing-contacts presets) and contacts,
so that part of every RPC's examples succeed. Hypothesis then sends every RPC of QuotaService and QuotaAdminService
hostile requests beside valid ones: empty, over-long (> 256 bytes), NUL, combining, right-to-left and emoji ids;
batches over 10,000 ids (RecordActivity: over 100,000); unknown, negative and huge enum numbers; timestamps at and
beyond the protobuf limits and with negative nanos; huge and negative durations; absurd plans (negative or int64
overflowing limits, grace over 100, prices "1e999", "NaN", "-1", bad currencies, thresholds out of (0, 1], unknown
presets, duplicate rules and counted kinds); garbage page tokens and huge page sizes; admin calls with a missing or
wrong token; and raw wire bytes, some of which do not parse (invalid UTF-8 in a string field).

For every example:

- the status code is OK, INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED or PERMISSION_DENIED (never INTERNAL, UNKNOWN
  or anything else), and it is the one a model of api.md's "Errors" section gives for the request: bad input is
  INVALID_ARGUMENT, validated before the tenant is looked up; a tenant with no plan is NOT_FOUND for every RPC; an
  admin call without the credential is UNAUTHENTICATED and with a wrong one PERMISSION_DENIED;
- an INVALID_ARGUMENT names a field of the request that is bad, in its message and in a google.rpc.BadRequest detail;
- a call that did not answer OK left the ledger as it was ("Nothing is counted"): `PRAGMA data_version` read on a
  separate read-only connection to the ledger file is the same after the call as before (it moves whenever the
  sidecar commits, as `test_ledger_version_moves_with_every_commit_and_only_then` shows);
- an OK answer keeps the contract's shapes (one batch result per listed id in request order, a repeated id repeating
  its first decision, pages no longer than asked, the cycle containing the instant asked for, decimal amounts), and a
  plan PutPlan accepted is served by GetPlan, GetUsage, GetInvoice, CheckSend and ListActiveContacts afterwards.

A sidecar started with a 64 KiB max_message_bytes refuses bigger requests with RESOURCE_EXHAUSTED, counts nothing and
keeps answering.

Size: QUOTA_FUZZ_EXAMPLES examples per fuzz test (13 of them: one per RPC and one of raw wire bytes); the default of
300 runs about 3,900 cases in about 20 s on two cores. The long run, 100,800 cases over the twelve RPCs (109,200 with
the raw bytes):

    QUOTA_FUZZ_EXAMPLES=8400 .venv/bin/python -m pytest tests/service/test_fuzz.py -q

The number of cases run, per RPC and in all, is printed when the module's sidecar stops ("fuzz: N cases ...").
Rule ids refer to docs/domain.md; "Errors" to docs/api.md.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from quota_sidecar.api.v1 import quota_pb2 as pb
from quota_sidecar.api.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.domain.clock import MICROS, FakeClock, to_us

from support.sidecar import ADMIN_TOKEN, START, RunningSidecar, start_sidecar

EXAMPLES = int(os.environ.get("QUOTA_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
CALL_TIMEOUT = 120.0

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
ANSWERS = frozenset({OK, INVALID, NOT_FOUND, UNAUTHENTICATED, PERMISSION_DENIED})

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
MIN_S, MAX_S = -62_135_596_800, 253_402_300_799
MAX_DURATION_S = 315_576_000_000
DAY_S = 86_400
NOW_US = to_us(START)
NOW_S = NOW_US // MICROS
FUTURE_SKEW_US = 5 * 60 * MICROS
EDGE_ZONE_US = 93 * DAY_S * MICROS
MAX_ID_BYTES = 256
MAX_BATCH = 10_000
MAX_ACTIVITY_CONTACTS = 100_000

GOOD_AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
HARD = "t-hard"
GRACE = "t-grace"
OVERAGE = "t-overage"
HELD = "t-held"
MARKETING = "t-marketing"
BASE_PLANS: dict[str, dict[str, Any]] = {
    HARD: dict(
        metering=pb.METERING_CYCLE_ACTIVE,
        enforcement=pb.ENFORCEMENT_HARD,
        contact_limit=40,
        sends_per_contact=10,
        counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN, pb.MESSAGE_KIND_AUTOMATION],
        counted_activities=[pb.ACTIVITY_KIND_MESSAGE_SENT, pb.ACTIVITY_KIND_NOTE_ADDED],
        notify_thresholds=[0.8, 1.0],
    ),
    GRACE: dict(
        metering=pb.METERING_CYCLE_ACTIVE,
        enforcement=pb.ENFORCEMENT_GRACE,
        grace_percent=10,
        contact_limit=20,
        counted_kinds=[pb.MESSAGE_KIND_CAMPAIGN, pb.MESSAGE_KIND_AUTOMATION],
        counted_activities=[pb.ACTIVITY_KIND_CONTACT_CREATED],
    ),
    OVERAGE: dict(preset="active-cycle-overage", plan_name="GROW"),
    HELD: dict(preset="contact-limit", contact_limit=100),
    MARKETING: dict(preset="marketing-contacts", contact_limit=100, overage_unit_price="0.10", currency="USD"),
}
TENANTS = [*BASE_PLANS, "nobody"]
PLAN_TENANTS = ["p-0", "p-1", "p-2", "p-3", "p-4"]
ALL_TENANTS = [*TENANTS, *TENANTS, *PLAN_TENANTS]
CONTACTS = [f"c{i}" for i in range(8)]

ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "c0\x00",
    "\x00\x00\x00",
    "e\u0301\u0301\u0301",
    "\u202eevil\u202c",
    "\u05e9\u05dc\u05d5\u05dd\u200f",
    "\U0001f642",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467",
    "\ufeffc0",
    "\uffff",
    "\U0010ffff",
    "C0",
    "c0 ",
    "\n\t\r",
    "'; DROP TABLE contacts; --",
    "%s%n%x",
    "../../etc/passwd",
    "x" * MAX_ID_BYTES,
    "x" * (MAX_ID_BYTES + 1),
    "\u00e9" * (MAX_ID_BYTES // 2),
    "\u00e9" * (MAX_ID_BYTES // 2 + 1),
    "\U0001f642" * (MAX_ID_BYTES // 4),
    "\U0001f642" * (MAX_ID_BYTES // 4 + 1),
    "a" * 5_000,
]
SECONDS_EDGES = [
    MIN_S,
    MIN_S - 1,
    MAX_S,
    MAX_S + 1,
    0,
    -1,
    INT64_MAX,
    INT64_MIN,
    NOW_S,
    NOW_S + 299,
    NOW_S + 300,
    NOW_S + 301,
    NOW_S - 40 * DAY_S,
    *(MIN_S + days * DAY_S for days in (20, 61, 62, 63, 94)),
    *(MAX_S - days * DAY_S for days in (20, 61, 62, 63, 94)),
]
NANOS_EDGES = [0, 999_999_999, 1_000_000_000, -1, -999_999_999, INT32_MAX, INT32_MIN]
DURATION_EDGES = [0, 1, -1, 86_400, MAX_DURATION_S, MAX_DURATION_S + 1, -MAX_DURATION_S, -MAX_DURATION_S - 1]
PRESETS = ["contact-limit", "active-cycle-hard", "active-cycle-overage", "marketing-contacts"]
BAD_PRICES = [
    "NaN",
    "-NaN",
    "sNaN",
    "-1",
    "-0.01",
    "1e999",
    "1e999999999999999999",
    "1e-999999",
    "Infinity",
    "-Infinity",
    "abc",
    "1,5",
    "0x10",
    "--1",
    "1e12",
    "123456789012345678901234567890",
    "0.0000001",
]
GOOD_PRICES = ["0", "0.25", "12.50", "0.000001", "999999999999.999999", "3"]
BAD_CURRENCIES = ["eur", "EURO", "EU", "\u20acUR", "123", "\u00c9UR"]
NOT_LETTERS_CURRENCIES = ["E\x00R", " EU", "EU1", "E-R"]
BAD_THRESHOLDS = [0.0, -0.0, -0.1, 1.0000001, 2.0, math.nan, math.inf, -math.inf, 1e308]
BAD_PRESETS = ["nope", "CONTACT-LIMIT", " contact-limit", "contact-limit\x00", "\U0001f642", "x" * 300]


@dataclass(frozen=True)
class Answer:
    """One call's outcome: the status code, its message, the fields a BadRequest detail names, the response."""

    code: grpc.StatusCode
    message: str
    violations: tuple[str, ...] = ()
    response: Any = None


@dataclass(frozen=True)
class Expected:
    """What api.md's "Errors" section allows for one request: the status codes, and the fields (indices dropped)
    an INVALID_ARGUMENT may name; `fields` None lets it name any field of the request."""

    codes: frozenset[grpc.StatusCode]
    fields: frozenset[str] | None = frozenset()


@dataclass(repr=False)
class Fuzzed:
    """The module's sidecar, a read-only observer connection to its ledger file, and what the model knows:
    the metering of every tenant with a plan, request ids already answered, page tokens the sidecar gave."""

    sidecar: RunningSidecar
    observer: sqlite3.Connection
    quota: pb_grpc.QuotaServiceStub
    admin: pb_grpc.QuotaAdminServiceStub
    channel: grpc.Channel
    meterings: dict[str, int] = field(default_factory=dict)
    request_ids: set[tuple[str, str, str]] = field(default_factory=set)
    tokens: list[str] = field(default_factory=list)
    cases: Counter[str] = field(default_factory=Counter)

    def __repr__(self) -> str:
        return f"Fuzzed(sidecar at {self.sidecar.address}, ledger {self.sidecar.ledger_path})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def version(self) -> int:
        return ledger_version(self.observer)


def ledger_version(conn: sqlite3.Connection) -> int:
    """SQLite's data_version: it changes when another connection commits to the file."""
    return conn.execute("PRAGMA data_version").fetchone()[0]


def observe(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)


def answer(call: Callable[[], Any]) -> Answer:
    try:
        response = call()
    except grpc.RpcError as err:
        status = rpc_status.from_call(err)
        named: list[str] = []
        for detail in status.details if status is not None else ():
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                named += [v.field for v in bad.field_violations]
        return Answer(err.code(), err.details() or "", tuple(named))
    return Answer(OK, "", (), response)


def path_of(name: str) -> str:
    """A field path as the model keeps it: `contact_ids[3]` -> `contact_ids`."""
    return re.sub(r"\[\d+\]", "", name)


def names_a_field(descriptor: pb_descriptor.Descriptor, name: str) -> bool:
    """Whether `name` (like `plan.source_rules[0].policy`) is a field path of the message type."""
    current: pb_descriptor.Descriptor | None = descriptor
    for part in path_of(name).split("."):
        if current is None or part not in current.fields_by_name:
            return False
        current = current.fields_by_name[part].message_type
    return True


def shown(request: object) -> str:
    text = repr(request) if isinstance(request, bytes) else str(request).replace("\n", " ")
    return text if len(text) <= 400 else f"{text[:400]}... ({len(text):,} chars)"


def exchange(
    f: Fuzzed,
    rpc: str,
    request: pb_message.Message | bytes,
    call: Callable[[], Any],
    expected: Expected,
    descriptor: pb_descriptor.Descriptor | None = None,
    remember: Callable[[Any], None] | None = None,
) -> Answer:
    """Makes one call and checks it against `expected`; a call that did not answer OK must leave the ledger as it
    was, and an INVALID_ARGUMENT must name one bad field in its message and its BadRequest detail. `remember` is
    given the response of an OK call before any check, so that the model keeps up with the ledger even when a check
    fails."""
    before = f.version()
    got = answer(call)
    changed = f.version() != before
    f.cases[rpc] += 1
    if remember is not None and got.code is OK:
        remember(got.response)
    ledger = "the ledger changed" if changed else "the ledger unchanged"
    context = f"{rpc}({shown(request)}) answered {got.code.name} {got.message[:300]!r} {got.violations}, {ledger}"
    assert got.code in ANSWERS, context
    wanted = f"; expected one of {sorted(c.name for c in expected.codes)} naming {expected.fields}"
    assert got.code in expected.codes, context + wanted
    if got.code is not OK:
        assert not changed, f"{context}; the ledger changed although the call was refused"
    if got.code is INVALID and expected.fields != frozenset():
        assert len(got.violations) == 1, f"{context}; expected one BadRequest field violation"
        named = got.violations[0]
        assert got.message.startswith(named), f"{context}; the message does not name {named}"
        described = descriptor or request.DESCRIPTOR  # type: ignore[union-attr]
        assert names_a_field(described, named), f"{context}; {named} is not a field of the request"
        if expected.fields is not None:
            assert path_of(named) in expected.fields, context + wanted
    return got


def keep_request_id(f: Fuzzed, key: tuple[str, str, str], stored: bool) -> Callable[[Any], None] | None:
    """Remembers the request id of an answered call whose result the sidecar keeps (not a dry run)."""
    return (lambda _: f.request_ids.add(key)) if stored else None


def kept_exchange(f: Fuzzed, rpc: str, request: Any, tenant_id: str, request_id: str, kept: bool, bad: set[str]) -> Any:
    """One call of an RPC that keeps its answer for `request_id` when `kept` (not a dry run):
    a request_id already answered may be refused as reused for a different request."""
    key = (tenant_id, rpc, request_id)
    reused = kept and key in f.request_ids
    expected = judged(f, tenant_id, bad, maybe={"request_id"} if reused else None)
    call = getattr(f.quota, rpc)
    return exchange(
        f, rpc, request, lambda: call(request, timeout=CALL_TIMEOUT), expected, remember=keep_request_id(f, key, kept)
    )


def judged(
    f: Fuzzed,
    tenant_id: str,
    bad: set[str],
    *,
    maybe: set[str] | None = None,
    found: frozenset[grpc.StatusCode] = frozenset({OK}),
) -> Expected:
    """Bad input is INVALID_ARGUMENT naming one of the bad fields, before the tenant is looked up; then a tenant
    without a plan is NOT_FOUND. `maybe` are fields that may be refused for reasons the model does not decide."""
    if bad:
        return Expected(frozenset({INVALID}), frozenset(bad | (maybe or set())))
    codes = set(found) if tenant_id in f.meterings else {NOT_FOUND}
    if maybe:
        codes.add(INVALID)
    return Expected(frozenset(codes), frozenset(maybe or ()))


def admitted(metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode | None:
    """The refusal an admin call gets for its credential, or None when it is the admin token."""
    given = [value for key, value in metadata if key == "authorization"]
    if not given:
        return UNAUTHENTICATED
    return None if given[0] == GOOD_AUTH[0][1] else PERMISSION_DENIED


def id_bad(value: str, *, required: bool = True) -> bool:
    """Ids are non-empty, at most 256 UTF-8 bytes, without NUL (api.md "Errors")."""
    if not value:
        return required
    return len(value.encode()) > MAX_ID_BYTES or "\x00" in value


def ids_bad(values: Sequence[str], maximum: int) -> bool:
    return not values or len(values) > maximum or any(id_bad(v) for v in values)


def enum_bad(value: int, wrapper: Any, *, required: bool = True) -> bool:
    if value == 0:
        return required
    return value not in wrapper.values()


def timestamp_bad(ts: Timestamp | None) -> bool:
    return ts is not None and not (MIN_S <= ts.seconds <= MAX_S and 0 <= ts.nanos < 1_000_000_000)


def instant_us(ts: Timestamp) -> int:
    return ts.seconds * MICROS + ts.nanos // 1000


def at_the_edge(ts: Timestamp | None) -> bool:
    """A valid instant within three months of year 1 or year 9999's end: a cycle around it does not fit in the
    timestamp range, so selecting one may be refused as nonsensical."""
    if ts is None or timestamp_bad(ts):
        return False
    us = instant_us(ts)
    return us < MIN_S * MICROS + EDGE_ZONE_US or us > MAX_S * MICROS - EDGE_ZONE_US


def present(**fields: Any) -> dict[str, Any]:
    """Message fields without those left unset (None)."""
    return {name: value for name, value in fields.items() if value is not None}


def bulk_ids(size: int, odd: str | None, at: int) -> list[str]:
    """`size` distinct ids, one of them replaced by `odd` when given."""
    ids = [f"bulk-{i}" for i in range(size)]
    if odd is not None:
        ids[at % size] = odd
    return ids


# -- strategies ---------------------------------------------------------------------------------------------------

ODD_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Draws from the strategies in proportion to their weights, so that most requests are valid but for one
    field, and enough of them are valid throughout to reach the engine."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


def ids(pool: Sequence[str]) -> st.SearchStrategy[str]:
    """Mostly ids the sidecar knows, then odd ones: empty, over-long, NUL, combining, RTL, emoji, any text."""
    return weighted((6, st.sampled_from(pool)), (1, st.sampled_from(ODD_STRINGS)), (1, ODD_TEXT))


def optional_ids() -> st.SearchStrategy[str]:
    return weighted(
        (4, st.just("")),
        (2, st.sampled_from(["automation-1", "workflow"])),
        (1, st.sampled_from(ODD_STRINGS)),
        (1, ODD_TEXT),
    )


def request_ids() -> st.SearchStrategy[str]:
    """No id, fresh ids, ids used again (for the same or another request) and odd ones."""
    return weighted(
        (3, st.just("")),
        (3, st.uuids().map(str)),
        (2, st.sampled_from(["retry-1", "retry-2"])),
        (1, st.sampled_from(ODD_STRINGS)),
    )


def enum_numbers(wrapper: Any) -> st.SearchStrategy[int]:
    """Known values of the enum, its zero, and unknown numbers: negative, just past the last, int32's limits."""
    known = sorted(v for v in wrapper.values() if v)
    odd = [0, -1, known[-1] + 1, 1_000, INT32_MAX, INT32_MIN]
    return weighted((6, st.sampled_from(known)), (1, st.sampled_from(odd)), (1, st.integers(INT32_MIN, INT32_MAX)))


def timestamps() -> st.SearchStrategy[Timestamp | None]:
    """Unset, near now, at and beyond the protobuf limits (years 1 and 9999), any int64, odd nanos."""
    recent = st.builds(
        Timestamp, seconds=st.integers(NOW_S - 400 * DAY_S, NOW_S + DAY_S), nanos=st.integers(0, 999_999_999)
    )
    seconds = st.one_of(st.sampled_from(SECONDS_EDGES), st.integers(MIN_S, MAX_S), st.integers(INT64_MIN, INT64_MAX))
    nanos = st.one_of(st.sampled_from(NANOS_EDGES), st.integers(0, 999_999_999), st.integers(INT32_MIN, INT32_MAX))
    return weighted((4, st.none()), (3, recent), (3, st.builds(Timestamp, seconds=seconds, nanos=nanos)))


def valid_timestamps() -> st.SearchStrategy[Timestamp | None]:
    seconds = st.one_of(st.sampled_from([MIN_S, MAX_S, 0, NOW_S]), st.integers(MIN_S, MAX_S))
    return st.one_of(st.none(), st.builds(Timestamp, seconds=seconds, nanos=st.integers(0, 999_999_999)))


def durations() -> st.SearchStrategy[Duration | None]:
    seconds = st.one_of(
        st.sampled_from(DURATION_EDGES), st.integers(-(10**6), 10**6), st.integers(INT64_MIN, INT64_MAX)
    )
    nanos = st.one_of(st.sampled_from(NANOS_EDGES), st.integers(-999_999_999, 999_999_999))
    return st.one_of(st.none(), st.builds(Duration, seconds=seconds, nanos=nanos))


def valid_durations() -> st.SearchStrategy[Duration | None]:
    return st.one_of(
        st.none(),
        st.builds(Duration, seconds=st.integers(0, MAX_DURATION_S), nanos=st.integers(0, 999_999_999)),
        st.just(Duration(seconds=MAX_DURATION_S, nanos=999_999_999)),
    )


def contact_lists(pool: Sequence[str], sizes: Sequence[int]) -> st.SearchStrategy[list[str]]:
    """Short lists of known and odd ids (repeats included), now and then a bulk list of one of `sizes`."""
    bulk = st.builds(
        bulk_ids, st.sampled_from(sizes), st.one_of(st.none(), st.sampled_from(ODD_STRINGS)), st.integers()
    )
    small = weighted(
        (3, st.lists(st.sampled_from(pool), min_size=1, max_size=30)), (1, st.lists(ids(pool), max_size=12))
    )
    return st.sampled_from(range(16)).flatmap(lambda k: bulk if k == 7 else small)


def credentials() -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    """The admin token most of the time; else none, or a wrong one (near misses and any printable text)."""
    wrong = [
        "",
        "Bearer",
        "Bearer ",
        f"bearer {ADMIN_TOKEN}x",
        ADMIN_TOKEN,
        f"Bearer {ADMIN_TOKEN}x",
        f"Bearer {ADMIN_TOKEN[:-1]}",
        "Bearer wrong",
        f"Basic {ADMIN_TOKEN}",
    ]
    printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
    return weighted(
        (6, st.just(GOOD_AUTH)),
        (1, st.just(())),
        (1, st.sampled_from(wrong).map(lambda v: (("authorization", v),))),
        (1, printable.map(lambda v: (("authorization", v),))),
    )


def int64s() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 1, -1, INT64_MAX, INT64_MIN, 2**62, 2**32]),
        st.integers(0, 1_000),
        st.integers(INT64_MIN, INT64_MAX),
    )


def limits(maximum: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(1, 1_000), st.integers(1, maximum), st.just(maximum))


@st.composite
def valid_plans(draw: st.DrawFn) -> dict[str, Any]:
    """A plan api.md accepts: explicit meterings and enforcements with their settings, at the limits of their
    ranges (int64 limits, anchors in years 1 and 9999, the longest durations)."""
    metering = draw(st.sampled_from([pb.METERING_HELD_CONTACTS, pb.METERING_CYCLE_ACTIVE]))
    enforcement = draw(st.sampled_from([pb.ENFORCEMENT_HARD, pb.ENFORCEMENT_GRACE, pb.ENFORCEMENT_OVERAGE]))
    limit = draw(limits(2**62))
    addon = draw(st.one_of(st.just(0), st.integers(0, 2**62 - 1)))
    cycle_active = metering == pb.METERING_CYCLE_ACTIVE
    plan: dict[str, Any] = dict(
        metering=metering,
        enforcement=enforcement,
        contact_limit=limit,
        addon_contacts=addon,
        plan_name=draw(st.sampled_from(["", "P", "\u00e9" * (MAX_ID_BYTES // 2), "\U0001f642", "a\x00b"])),
        counted_kinds=draw(st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1 if cycle_active else 0, max_size=6)),
        billing_interval=draw(st.sampled_from([0, 1, 2])),
        notify_thresholds=draw(
            st.lists(st.floats(min_value=0, max_value=1, exclude_min=True) | st.just(5e-324), max_size=5)
        ),
        marketing_contacts_only=not cycle_active and draw(st.booleans()),
        **present(
            cycle_anchor=draw(valid_timestamps()),
            max_queue=draw(valid_durations()),
            renotify_interval=draw(valid_durations()),
        ),
    )
    if enforcement == pb.ENFORCEMENT_GRACE:
        plan["grace_percent"] = draw(st.integers(0, 100))
    if cycle_active:
        plan["counted_activities"] = draw(st.lists(st.sampled_from(range(1, 9)), max_size=10))
    if draw(st.booleans()):
        plan["sends_limit"] = draw(st.one_of(st.integers(0, 1_000), st.just(INT64_MAX)))
    else:
        plan["sends_per_contact"] = draw(st.integers(0, min(UINT32_MAX, INT64_MAX // (limit + addon))))
    if draw(st.booleans()):
        plan["overage_unit_price"] = draw(st.sampled_from(GOOD_PRICES))
        plan["currency"] = draw(st.sampled_from(["EUR", "USD", "JPY"]))
    sources = draw(st.lists(st.sampled_from([1, 2, 3, 4]), unique=True, max_size=4))
    plan["source_rules"] = [pb.SourceRule(source=s, policy=draw(st.sampled_from([1, 2, 3]))) for s in sources]
    return plan


def preset_plans() -> st.SearchStrategy[dict[str, Any]]:
    """Plans from api.md's presets table, with a limit that fits int64 once multiplied out."""
    return st.one_of(
        st.builds(lambda n: dict(preset="active-cycle-hard", contact_limit=n), limits(INT64_MAX // 10)),
        st.builds(
            lambda name: dict(preset="active-cycle-overage", plan_name=name),
            st.sampled_from(["START", "grow", "Expand", "SCALE"]),
        ),
        st.builds(
            lambda n, a: dict(preset="contact-limit", contact_limit=n, addon_contacts=a),
            limits(2**62),
            st.integers(0, 2**62 - 1),
        ),
        st.builds(
            lambda n: dict(preset="marketing-contacts", contact_limit=n, overage_unit_price="0.10", currency="USD"),
            limits(INT64_MAX),
        ),
    )


def bad_enum_numbers(wrapper: Any, *, zero: bool = False) -> st.SearchStrategy[int]:
    known = set(wrapper.values())
    odd = st.one_of(st.sampled_from([-1, max(known) + 1, INT32_MAX, INT32_MIN]), st.integers(INT32_MIN, INT32_MAX))
    if zero:
        odd = st.one_of(st.just(0), odd)
    return odd.filter(lambda v: v not in known or (zero and v == 0))


def bad_durations() -> st.SearchStrategy[Duration]:
    return st.one_of(
        st.builds(Duration, seconds=st.integers(-MAX_DURATION_S, -1), nanos=st.integers(-999_999_999, 0)),
        st.builds(Duration, seconds=st.just(0), nanos=st.integers(-999_999_999, -1)),
        st.builds(
            Duration,
            seconds=st.one_of(st.integers(MAX_DURATION_S + 1, INT64_MAX), st.integers(INT64_MIN, -MAX_DURATION_S - 1)),
        ),
        st.builds(Duration, seconds=st.integers(0, 10), nanos=st.sampled_from([1_000_000_000, INT32_MAX, INT32_MIN])),
    )


def bad_timestamps() -> st.SearchStrategy[Timestamp]:
    return st.one_of(
        st.builds(Timestamp, seconds=st.one_of(st.integers(MAX_S + 1, INT64_MAX), st.integers(INT64_MIN, MIN_S - 1))),
        st.builds(
            Timestamp,
            seconds=st.integers(MIN_S, MAX_S),
            nanos=st.one_of(st.integers(INT32_MIN, -1), st.integers(1_000_000_000, INT32_MAX)),
        ),
    )


def _break(plan: dict[str, Any], draw: st.DrawFn, how: str) -> tuple[dict[str, Any], set[str]]:
    """The plan with one thing made wrong, and the fields a refusal may name for it."""
    cycle = dict(metering=pb.METERING_CYCLE_ACTIVE, counted_kinds=[1], marketing_contacts_only=False)
    one_sends = dict(sends_limit=0, sends_per_contact=0)
    breaks: dict[str, Callable[[], tuple[dict[str, Any], set[str]]]] = {
        "negative contact_limit": lambda: (
            dict(contact_limit=draw(st.integers(INT64_MIN, -1))),
            {"plan.contact_limit"},
        ),
        "negative addon_contacts": lambda: (
            dict(addon_contacts=draw(st.integers(INT64_MIN, -1))),
            {"plan.addon_contacts"},
        ),
        "negative sends_limit": lambda: (
            dict(one_sends, sends_limit=draw(st.integers(INT64_MIN, -1))),
            {"plan.sends_limit"},
        ),
        "no limit": lambda: (dict(contact_limit=0, addon_contacts=0), {"plan.contact_limit", "plan.addon_contacts"}),
        "limit past int64": lambda: (
            dict(contact_limit=INT64_MAX - draw(st.integers(0, 10)), addon_contacts=draw(st.integers(11, INT64_MAX))),
            {"plan.contact_limit", "plan.addon_contacts"},
        ),
        "sends allowance past int64": lambda: (
            dict(
                one_sends,
                contact_limit=(n := draw(st.integers(2**33, INT64_MAX))),
                addon_contacts=0,
                sends_per_contact=draw(st.integers(INT64_MAX // n + 1, UINT32_MAX)),
            ),
            {"plan.sends_per_contact", "plan.contact_limit"},
        ),
        "both sends limits": lambda: (
            dict(sends_limit=draw(st.integers(1, INT64_MAX)), sends_per_contact=draw(st.integers(1, 100))),
            {"plan.sends_limit", "plan.sends_per_contact"},
        ),
        "grace over 100": lambda: (
            dict(enforcement=pb.ENFORCEMENT_GRACE, grace_percent=draw(st.integers(101, UINT32_MAX))),
            {"plan.grace_percent"},
        ),
        "grace without GRACE": lambda: (
            dict(
                enforcement=draw(st.sampled_from([pb.ENFORCEMENT_HARD, pb.ENFORCEMENT_OVERAGE])),
                grace_percent=draw(st.integers(1, 100)),
            ),
            {"plan.grace_percent", "plan.enforcement"},
        ),
        "unknown metering": lambda: (
            dict(metering=draw(bad_enum_numbers(pb.Metering, zero=True))),
            {"plan.metering"},
        ),
        "unknown enforcement": lambda: (
            dict(enforcement=draw(bad_enum_numbers(pb.Enforcement, zero=True)), grace_percent=0),
            {"plan.enforcement"},
        ),
        "unknown billing interval": lambda: (
            dict(billing_interval=draw(bad_enum_numbers(pb.BillingInterval))),
            {"plan.billing_interval"},
        ),
        "unknown counted kind": lambda: (
            dict(counted_kinds=[*plan["counted_kinds"], draw(bad_enum_numbers(pb.MessageKind, zero=True))]),
            {"plan.counted_kinds"},
        ),
        "unknown counted activity": lambda: (
            dict(cycle, counted_activities=[1, draw(bad_enum_numbers(pb.ActivityKind, zero=True))]),
            {"plan.counted_activities"},
        ),
        "activities without CYCLE_ACTIVE": lambda: (
            dict(metering=pb.METERING_HELD_CONTACTS, counted_activities=[draw(st.integers(1, 8))]),
            {"plan.counted_activities", "plan.metering"},
        ),
        "nothing counted": lambda: (
            dict(cycle, counted_kinds=[], counted_activities=[]),
            {"plan.counted_kinds", "plan.counted_activities"},
        ),
        "marketing only under CYCLE_ACTIVE": lambda: (
            dict(cycle, marketing_contacts_only=True),
            {"plan.marketing_contacts_only", "plan.metering"},
        ),
        "unknown source": lambda: (
            dict(source_rules=[pb.SourceRule(source=draw(bad_enum_numbers(pb.ContactSource, zero=True)), policy=1)]),
            {"plan.source_rules.source"},
        ),
        "unknown policy": lambda: (
            dict(source_rules=[pb.SourceRule(source=1, policy=draw(bad_enum_numbers(pb.SourcePolicy, zero=True)))]),
            {"plan.source_rules.policy"},
        ),
        "source named twice": lambda: (
            dict(
                source_rules=[
                    pb.SourceRule(source=(s := draw(st.integers(1, 4))), policy=1),
                    pb.SourceRule(source=s, policy=2),
                ]
            ),
            {"plan.source_rules"},
        ),
        "bad price": lambda: (
            dict(overage_unit_price=draw(st.sampled_from(BAD_PRICES)), currency="EUR"),
            {"plan.overage_unit_price"},
        ),
        "price without currency": lambda: (dict(overage_unit_price="0.25", currency=""), {"plan.currency"}),
        "bad currency": lambda: (dict(currency=draw(st.sampled_from(BAD_CURRENCIES))), {"plan.currency"}),
        "threshold out of range": lambda: (
            dict(notify_thresholds=[*plan["notify_thresholds"], draw(st.sampled_from(BAD_THRESHOLDS))]),
            {"plan.notify_thresholds"},
        ),
        "bad anchor": lambda: (dict(cycle_anchor=draw(bad_timestamps())), {"plan.cycle_anchor"}),
        "bad max_queue": lambda: (dict(max_queue=draw(bad_durations())), {"plan.max_queue"}),
        "bad renotify_interval": lambda: (dict(renotify_interval=draw(bad_durations())), {"plan.renotify_interval"}),
        "unknown preset": lambda: (dict(preset=draw(st.sampled_from(BAD_PRESETS))), {"plan.preset"}),
        "long plan name": lambda: (
            dict(plan_name=draw(st.sampled_from(["x" * 257, "\u00e9" * 129, "\U0001f642" * 65]))),
            {"plan.plan_name"},
        ),
    }
    changes, fields = breaks[how]()
    return {**plan, **changes}, fields


LIMIT_FIELDS = ("plan.contact_limit", "plan.addon_contacts")
PRICE = {"plan.overage_unit_price"}
BREAKS = [
    "negative contact_limit",
    "negative addon_contacts",
    "negative sends_limit",
    "no limit",
    "limit past int64",
    "sends allowance past int64",
    "both sends limits",
    "grace over 100",
    "grace without GRACE",
    "unknown metering",
    "unknown enforcement",
    "unknown billing interval",
    "unknown counted kind",
    "unknown counted activity",
    "activities without CYCLE_ACTIVE",
    "nothing counted",
    "marketing only under CYCLE_ACTIVE",
    "unknown source",
    "unknown policy",
    "source named twice",
    "bad price",
    "price without currency",
    "bad currency",
    "threshold out of range",
    "bad anchor",
    "bad max_queue",
    "bad renotify_interval",
    "unknown preset",
    "long plan name",
]


@st.composite
def broken_plans(draw: st.DrawFn) -> tuple[dict[str, Any], set[str]]:
    return _break(draw(valid_plans()), draw, draw(st.sampled_from(BREAKS)))


def chaos_plans() -> st.SearchStrategy[pb.Plan]:
    """Every field of a Plan hostile at once; some land on a preset and are valid."""
    return st.builds(
        pb.Plan,
        plan_name=st.one_of(st.sampled_from(ODD_STRINGS), ODD_TEXT),
        metering=enum_numbers(pb.Metering),
        enforcement=enum_numbers(pb.Enforcement),
        contact_limit=int64s(),
        addon_contacts=int64s(),
        grace_percent=st.one_of(st.integers(0, 100), st.integers(0, UINT32_MAX)),
        sends_limit=int64s(),
        sends_per_contact=st.one_of(st.just(0), st.integers(0, UINT32_MAX)),
        overage_unit_price=st.one_of(st.sampled_from(BAD_PRICES + GOOD_PRICES + [""]), ODD_TEXT),
        currency=st.one_of(st.sampled_from(BAD_CURRENCIES + ["", "EUR"]), ODD_TEXT),
        cycle_anchor=timestamps(),
        billing_interval=enum_numbers(pb.BillingInterval),
        counted_kinds=st.lists(enum_numbers(pb.MessageKind), max_size=6),
        counted_activities=st.lists(enum_numbers(pb.ActivityKind), max_size=6),
        source_rules=st.lists(
            st.builds(pb.SourceRule, source=enum_numbers(pb.ContactSource), policy=enum_numbers(pb.SourcePolicy)),
            max_size=5,
        ),
        max_queue=durations(),
        notify_thresholds=st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5),
        renotify_interval=durations(),
        preset=st.one_of(st.sampled_from(PRESETS + BAD_PRESETS + [""]), ODD_TEXT),
        marketing_contacts_only=st.booleans(),
    )


def plan_cases() -> st.SearchStrategy[tuple[pb.Plan | None, set[str] | None]]:
    """(plan, fields): a valid plan with no fields (OK expected), a plan with one thing wrong and the fields a
    refusal may name, a hostile plan (None: anything but INTERNAL), or no plan at all."""
    return st.one_of(
        preset_plans().map(lambda p: (pb.Plan(**p), set())),
        valid_plans().map(lambda p: (pb.Plan(**p), set())),
        broken_plans().map(lambda pf: (pb.Plan(**pf[0]), pf[1])),
        broken_plans().map(lambda pf: (pb.Plan(**pf[0]), pf[1])),
        chaos_plans().map(lambda p: (p, None)),
        st.just((None, {"plan"})),
    )


def token_of(cycle: object, after: object) -> str:
    """A page token in the sidecar's own shape carrying any values."""
    return base64.urlsafe_b64encode(json.dumps({"c": cycle, "a": after}).encode()).decode()


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def page_tokens() -> st.SearchStrategy[str]:
    """No token, garbage text and base64, and tokens in the sidecar's shape carrying hostile values."""
    crafted = st.builds(
        token_of,
        st.one_of(st.integers(), st.sampled_from([10**30, -(10**30), 1e999, -1e999, math.nan, "x", None, [1]])),
        st.one_of(st.text(max_size=20), st.sampled_from(["\ud800", "\x00", "", "c0"]), st.integers()),
    )
    raw = st.one_of(
        st.binary(max_size=60).map(b64),
        st.sampled_from([b"[" * 100_000, b"{" * 50_000, b'{"c": 1}', b'{"a": "x"}', b"[]", b"null", b"\xff\xfe"]).map(
            b64
        ),
    )
    return st.one_of(st.just(""), crafted, crafted, raw, st.sampled_from(ODD_STRINGS), ODD_TEXT)


# -- the module's sidecar ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Fuzzed]:
    """One sidecar for the module, with five tenants on plans and contacts; prints the cases run when it stops."""
    path = tmp_path_factory.mktemp("fuzz") / "ledger.db"
    running = start_sidecar(path, FakeClock(START), reminder_interval=3_600)
    channel = running.channel()
    f = Fuzzed(
        running, observe(path), pb_grpc.QuotaServiceStub(channel), pb_grpc.QuotaAdminServiceStub(channel), channel
    )
    try:
        for tenant_id, fields in BASE_PLANS.items():
            plan = running.put_plan(tenant_id, **fields).plan
            f.meterings[tenant_id] = plan.metering
        for tenant_id in (HELD, MARKETING, GRACE):
            f.quota.CheckContactAdd(
                pb.CheckContactAddRequest(tenant_id=tenant_id, source=pb.CONTACT_SOURCE_API, contact_ids=CONTACTS[:5]),
                timeout=CALL_TIMEOUT,
            )
        for tenant_id in (HARD, GRACE, OVERAGE):
            f.quota.CheckSendBatch(
                pb.CheckSendBatchRequest(
                    tenant_id=tenant_id, channel=1, kind=pb.MESSAGE_KIND_CAMPAIGN, contact_ids=CONTACTS[:4]
                ),
                timeout=CALL_TIMEOUT,
            )
        for tenant_id in (OVERAGE, HELD):
            listed = f.admin.ListActiveContacts(
                pb.ListActiveContactsRequest(tenant_id=tenant_id, page_size=1), metadata=GOOD_AUTH, timeout=CALL_TIMEOUT
            )
            assert listed.next_page_token
            f.tokens.append(listed.next_page_token)
        yield f
    finally:
        running.stop()
        f.observer.close()
        total = sum(f.cases.values())
        per_rpc = ", ".join(f"{rpc} {n:,}" for rpc, n in sorted(f.cases.items()))
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if capture is not None and total:
            with capture.global_and_fixture_disabled():
                print(f"\nfuzz: {total:,} cases ({per_rpc})")


def authorized(metadata: tuple[tuple[str, str], ...], expected: Expected) -> Expected:
    refused = admitted(metadata)
    return Expected(frozenset({refused})) if refused is not None else expected


# -- plans first, so that the other RPCs meet the plans PutPlan accepted -----------------------------------------------


def served(f: Fuzzed, tenant_id: str, plan: pb.Plan) -> None:
    """A plan the sidecar stored answers every RPC that reads it (PutPlan accepting a plan it cannot serve would
    leave the tenant failing every call)."""
    limit = plan.contact_limit + plan.addon_contacts
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("GetPlan", lambda: f.admin.GetPlan(pb.GetPlanRequest(tenant_id=tenant_id), metadata=GOOD_AUTH, timeout=60)),
        ("GetUsage", lambda: f.quota.GetUsage(pb.GetUsageRequest(tenant_id=tenant_id), timeout=60)),
        (
            "GetInvoice",
            lambda: f.admin.GetInvoice(pb.GetInvoiceRequest(tenant_id=tenant_id), metadata=GOOD_AUTH, timeout=60),
        ),
        (
            "CheckSend",
            lambda: f.quota.CheckSend(
                pb.CheckSendRequest(tenant_id=tenant_id, contact_id="c0", channel=1, kind=1, dry_run=True), timeout=60
            ),
        ),
        (
            "ListActiveContacts",
            lambda: f.admin.ListActiveContacts(
                pb.ListActiveContactsRequest(tenant_id=tenant_id), metadata=GOOD_AUTH, timeout=60
            ),
        ),
    ]
    for rpc, call in calls:
        got = answer(call)
        assert got.code is OK, (
            f"after PutPlan({tenant_id!r}, {shown(plan)}) {rpc} answered {got.code.name} {got.message!r}"
        )
        if rpc == "GetPlan":
            assert got.response.plan == plan
        if rpc == "GetUsage":
            assert got.response.usage.contact_limit == limit
        if rpc == "GetInvoice":
            for line in got.response.lines:
                assert Decimal(line.unit_price).is_finite() and Decimal(line.amount).is_finite()


@FUZZ
@given(tenant_id=ids(PLAN_TENANTS), metadata=credentials(), case=plan_cases())
@example(
    "p-0", GOOD_AUTH, (pb.Plan(preset="contact-limit", contact_limit=INT64_MAX, addon_contacts=1), set(LIMIT_FIELDS))
)
@example("p-0", GOOD_AUTH, (pb.Plan(preset="active-cycle-hard", contact_limit=2**62), {"plan.sends_per_contact"}))
@example("p-0", GOOD_AUTH, (pb.Plan(preset="active-cycle-overage", contact_limit=1, overage_unit_price="1e999"), PRICE))
@example("p-0", GOOD_AUTH, (pb.Plan(preset="active-cycle-overage", contact_limit=1, overage_unit_price="1e30"), PRICE))
@example(
    "p-0",
    GOOD_AUTH,
    (pb.Plan(preset="active-cycle-hard", contact_limit=1, cycle_anchor=Timestamp(seconds=MAX_S)), set()),
)
@example(
    "p-0",
    GOOD_AUTH,
    (pb.Plan(preset="active-cycle-hard", contact_limit=1, cycle_anchor=Timestamp(seconds=MIN_S)), set()),
)
def test_put_plan_answers_every_request_with_a_contract_status(
    fuzzed: Fuzzed,
    tenant_id: str,
    metadata: tuple[tuple[str, str], ...],
    case: tuple[pb.Plan | None, set[str] | None],
) -> None:
    """PutPlan (SG-4, CR-3, CR-6, AC-7, presets of api.md): a valid plan is stored and then served by every RPC; a
    negative or nonsensical plan (one thing wrong) is INVALID_ARGUMENT naming that field and stores nothing; a hostile
    plan is never INTERNAL; without the admin token it is UNAUTHENTICATED, with a wrong one PERMISSION_DENIED."""
    plan, fields = case
    request = pb.PutPlanRequest(tenant_id=tenant_id, **present(plan=plan))
    tenant_bad = {"tenant_id"} if id_bad(tenant_id) else set()
    if fields is None:
        expected = Expected(frozenset({OK, INVALID}), None)
    elif fields or tenant_bad:
        expected = Expected(frozenset({INVALID}), frozenset(fields | tenant_bad))
    else:
        expected = Expected(frozenset({OK}))
    got = exchange(
        fuzzed,
        "PutPlan",
        request,
        lambda: fuzzed.admin.PutPlan(request, metadata=metadata, timeout=CALL_TIMEOUT),
        authorized(metadata, expected),
        remember=lambda response: fuzzed.meterings.__setitem__(tenant_id, response.plan.metering),
    )
    if got.code is OK:
        served(fuzzed, tenant_id, got.response.plan)


@pytest.mark.parametrize("currency", NOT_LETTERS_CURRENCIES)
def test_a_currency_that_is_not_three_capital_letters_is_refused(fuzzed: Fuzzed, currency: str) -> None:
    """CR-6 prices overage in a currency: a plan's currency is an ISO 4217 code (three capital letters, as the
    sidecar's own message says), so one with NUL, a space, a digit or a dash is INVALID_ARGUMENT naming
    plan.currency and stores nothing."""
    tenant_id = "p-currency"
    plan = pb.Plan(preset="active-cycle-overage", contact_limit=5, overage_unit_price="0.25", currency=currency)
    request = pb.PutPlanRequest(tenant_id=tenant_id, plan=plan)
    exchange(
        fuzzed,
        "PutPlan",
        request,
        lambda: fuzzed.admin.PutPlan(request, metadata=GOOD_AUTH, timeout=CALL_TIMEOUT),
        Expected(frozenset({INVALID}), frozenset({"plan.currency"})),
        remember=lambda response: fuzzed.meterings.__setitem__(tenant_id, response.plan.metering),
    )


# -- the data plane -------------------------------------------------------------------------------------------------


@FUZZ
@given(
    tenant_id=ids(ALL_TENANTS),
    contact_id=ids(CONTACTS),
    channel=enum_numbers(pb.Channel),
    kind=enum_numbers(pb.MessageKind),
    queued_since=timestamps(),
    dry_run=st.booleans(),
    request_id=request_ids(),
)
def test_check_send_answers_every_request_with_a_contract_status(
    fuzzed: Fuzzed,
    tenant_id: str,
    contact_id: str,
    channel: int,
    kind: int,
    queued_since: Timestamp | None,
    dry_run: bool,
    request_id: str,
) -> None:
    """CheckSend (SG-2, SG-8, AC-9): hostile ids, enums and queued_since are INVALID_ARGUMENT naming the field and
    count nothing; a tenant with no plan is NOT_FOUND; everything else is decided (OK)."""
    request = pb.CheckSendRequest(
        tenant_id=tenant_id,
        contact_id=contact_id,
        channel=channel,
        kind=kind,
        dry_run=dry_run,
        request_id=request_id,
        **present(queued_since=queued_since),
    )
    bad = {
        name
        for name, wrong in (
            ("tenant_id", id_bad(tenant_id)),
            ("contact_id", id_bad(contact_id)),
            ("channel", enum_bad(channel, pb.Channel)),
            ("kind", enum_bad(kind, pb.MessageKind)),
            ("queued_since", timestamp_bad(queued_since)),
            ("request_id", id_bad(request_id, required=False)),
        )
        if wrong
    }
    got = kept_exchange(fuzzed, "CheckSend", request, tenant_id, request_id, bool(request_id) and not dry_run, bad)
    if got.code is OK:
        assert got.response.decision != pb.DECISION_UNSPECIFIED and got.response.usage.tenant_id == tenant_id


@FUZZ
@given(
    tenant_id=ids(ALL_TENANTS),
    contact_ids=contact_lists(CONTACTS, [MAX_BATCH, MAX_BATCH + 1]),
    channel=enum_numbers(pb.Channel),
    kind=enum_numbers(pb.MessageKind),
    dry_run=st.booleans(),
    request_id=request_ids(),
)
def test_check_send_batch_answers_every_request_with_a_contract_status(
    fuzzed: Fuzzed,
    tenant_id: str,
    contact_ids: list[str],
    channel: int,
    kind: int,
    dry_run: bool,
    request_id: str,
) -> None:
    """CheckSendBatch (SG-5 pre-flight, SG-8): an empty batch, one over 10,000 ids or with a bad id is
    INVALID_ARGUMENT naming contact_ids and counts nothing; an answered batch has one result per listed id in request
    order, a repeated id repeating its first decision with newly_active false, and allowed + denied = the ids."""
    request = pb.CheckSendBatchRequest(
        tenant_id=tenant_id,
        contact_ids=contact_ids,
        channel=channel,
        kind=kind,
        dry_run=dry_run,
        request_id=request_id,
    )
    bad = {
        name
        for name, wrong in (
            ("tenant_id", id_bad(tenant_id)),
            ("contact_ids", ids_bad(contact_ids, MAX_BATCH)),
            ("channel", enum_bad(channel, pb.Channel)),
            ("kind", enum_bad(kind, pb.MessageKind)),
            ("request_id", id_bad(request_id, required=False)),
        )
        if wrong
    }
    got = kept_exchange(fuzzed, "CheckSendBatch", request, tenant_id, request_id, bool(request_id) and not dry_run, bad)
    if got.code is not OK:
        return
    results = got.response.results
    assert [r.contact_id for r in results] == contact_ids
    assert got.response.allowed == sum(r.decision == pb.DECISION_ALLOW for r in results)
    assert got.response.allowed + got.response.denied == len(contact_ids)
    first: dict[str, pb.CheckSendResult] = {}
    for r in results:
        if r.contact_id in first:
            assert (r.decision, r.reason, r.newly_active) == (
                first[r.contact_id].decision,
                first[r.contact_id].reason,
                False,
            )
        first.setdefault(r.contact_id, r)


@FUZZ
@given(
    tenant_id=ids(ALL_TENANTS),
    source=enum_numbers(pb.ContactSource),
    contact_ids=contact_lists(CONTACTS, [MAX_BATCH, MAX_BATCH + 1]),
    dry_run=st.booleans(),
    marketing=st.one_of(st.none(), st.booleans()),
    request_id=request_ids(),
)
def test_check_contact_add_answers_every_request_with_a_contract_status(
    fuzzed: Fuzzed,
    tenant_id: str,
    source: int,
    contact_ids: list[str],
    dry_run: bool,
    marketing: bool | None,
    request_id: str,
) -> None:
    """CheckContactAdd (AC-2..AC-5): bad ids, sources or batches are INVALID_ARGUMENT and add nothing; an answered
    request is ALLOW or DENY for the whole request (AC-4 all-or-nothing: a DENY adds nothing)."""
    request = pb.CheckContactAddRequest(
        tenant_id=tenant_id,
        source=source,
        contact_ids=contact_ids,
        dry_run=dry_run,
        request_id=request_id,
        **present(marketing=marketing),
    )
    bad = {
        name
        for name, wrong in (
            ("tenant_id", id_bad(tenant_id)),
            ("source", enum_bad(source, pb.ContactSource)),
            ("contact_ids", ids_bad(contact_ids, MAX_BATCH)),
            ("request_id", id_bad(request_id, required=False)),
        )
        if wrong
    }
    got = kept_exchange(
        fuzzed, "CheckContactAdd", request, tenant_id, request_id, bool(request_id) and not dry_run, bad
    )
    if got.code is not OK:
        return
    assert got.response.decision in (pb.DECISION_ALLOW, pb.DECISION_DENY)
    assert 0 <= got.response.added <= len(set(contact_ids))
    if got.response.decision == pb.DECISION_DENY:
        assert got.response.added == 0


@FUZZ
@given(tenant_id=ids(ALL_TENANTS), contact_id=ids(CONTACTS), automation_id=optional_ids())
def test_check_enroll_answers_every_request_with_a_contract_status(
    fuzzed: Fuzzed, tenant_id: str, contact_id: str, automation_id: str
) -> None:
    """CheckEnroll (AC-8 with AC-7's grace): bad ids are INVALID_ARGUMENT naming the field; an answered enrolment is
    ALLOW or DENY and counts nothing."""
    request = pb.CheckEnrollRequest(tenant_id=tenant_id, contact_id=contact_id, automation_id=automation_id)
    bad = {
        name
        for name, wrong in (
            ("tenant_id", id_bad(tenant_id)),
            ("contact_id", id_bad(contact_id)),
            ("automation_id", id_bad(automation_id, required=False)),
        )
        if wrong
    }
    got = exchange(
        fuzzed,
        "CheckEnroll",
        request,
        lambda: fuzzed.quota.CheckEnroll(request, timeout=CALL_TIMEOUT),
        judged(fuzzed, tenant_id, bad),
    )
    if got.code is OK:
        assert got.response.decision in (pb.DECISION_ALLOW, pb.DECISION_DENY)


@FUZZ
@given(
    tenant_id=ids(ALL_TENANTS),
    kind=enum_numbers(pb.ActivityKind),
    contact_ids=contact_lists(CONTACTS, [MAX_BATCH, MAX_ACTIVITY_CONTACTS + 1]),
    occurred_at=timestamps(),
    marketing=st.booleans(),
    source_type=optional_ids(),
    source_id=optional_ids(),
    request_id=request_ids(),
)
def test_record_activity_answers_every_request_with_a_contract_status(
    fuzzed: Fuzzed,
    tenant_id: str,
    kind: int,
    contact_ids: list[str],
    occurred_at: Timestamp | None,
    marketing: bool,
    source_type: str,
    source_id: str,
    request_id: str,
) -> None:
    """RecordActivity (CR-1, CR-2, SG-9, AC-10, MK-5, MK-6): never refused for quota reasons, but bad input (ids, over
    100,000 contacts, kinds, an occurred_at that is invalid, before 1970 or in the future) is INVALID_ARGUMENT naming
    the field and records nothing."""
    request = pb.RecordActivityRequest(
        tenant_id=tenant_id,
        kind=kind,
        contact_ids=contact_ids,
        marketing=marketing,
        source_type=source_type,
        source_id=source_id,
        request_id=request_id,
        **present(occurred_at=occurred_at),
    )
    when_bad = timestamp_bad(occurred_at) or (
        occurred_at is not None and not 0 <= instant_us(occurred_at) <= NOW_US + FUTURE_SKEW_US
    )
    bad = {
        name
        for name, wrong in (
            ("tenant_id", id_bad(tenant_id)),
            ("kind", enum_bad(kind, pb.ActivityKind)),
            ("contact_ids", ids_bad(contact_ids, MAX_ACTIVITY_CONTACTS)),
            ("occurred_at", when_bad),
            ("source_type", id_bad(source_type, required=False)),
            ("source_id", id_bad(source_id, required=False)),
            ("request_id", id_bad(request_id, required=False)),
        )
        if wrong
    }
    got = kept_exchange(fuzzed, "RecordActivity", request, tenant_id, request_id, bool(request_id), bad)
    if got.code is OK:
        assert 0 <= got.response.newly_active <= got.response.recorded <= len(contact_ids)


@FUZZ
@given(tenant_id=ids(ALL_TENANTS), cycle_start=timestamps())
@example(HARD, Timestamp(seconds=MIN_S))
@example(HARD, Timestamp(seconds=MAX_S, nanos=999_999_999))
@example(HARD, Timestamp(seconds=MIN_S + 63 * DAY_S))
@example(HARD, Timestamp(seconds=MAX_S - 63 * DAY_S))
def test_get_usage_answers_every_request_with_a_contract_status(
    fuzzed: Fuzzed, tenant_id: str, cycle_start: Timestamp | None
) -> None:
    """GetUsage (SG-7, CR-7): an invalid cycle_start is INVALID_ARGUMENT naming it; an answered one reports the tenant's
    cycle that contains the instant asked for (now when unset)."""
    request = pb.GetUsageRequest(tenant_id=tenant_id, **present(cycle_start=cycle_start))
    bad = {
        name for name, wrong in (("tenant_id", id_bad(tenant_id)), ("cycle_start", timestamp_bad(cycle_start))) if wrong
    }
    expected = judged(fuzzed, tenant_id, bad, maybe={"cycle_start"} if at_the_edge(cycle_start) else None)
    got = exchange(fuzzed, "GetUsage", request, lambda: fuzzed.quota.GetUsage(request, timeout=CALL_TIMEOUT), expected)
    if got.code is OK:
        usage = got.response.usage
        at = NOW_US if cycle_start is None else instant_us(cycle_start)
        assert usage.tenant_id == tenant_id
        assert instant_us(usage.cycle_start) <= at < instant_us(usage.cycle_end)


@FUZZ
@given(
    tenant_id=st.one_of(st.just(""), ids(ALL_TENANTS)),
    after_sequence=st.one_of(
        st.sampled_from([0, 1, INT64_MAX, INT64_MAX + 1, UINT64_MAX]), st.integers(0, 50), st.integers(0, UINT64_MAX)
    ),
)
@example("", INT64_MAX + 1)
@example(HARD, UINT64_MAX)
def test_watch_usage_events_answers_every_request_with_a_contract_status(
    fuzzed: Fuzzed, tenant_id: str, after_sequence: int
) -> None:
    """WatchUsageEvents (AC-1, MK-2, CR-8 notifications), as a backlog listing: any after_sequence of uint64 is
    answered with the events after it in order, one tenant's when tenant_id is given, and writes nothing."""
    request = pb.WatchUsageEventsRequest(tenant_id=tenant_id, after_sequence=after_sequence, backlog_only=True)
    bad = {"tenant_id"} if id_bad(tenant_id, required=False) else set()
    expected = Expected(frozenset({OK})) if not tenant_id else judged(fuzzed, tenant_id, bad)
    got = exchange(
        fuzzed,
        "WatchUsageEvents",
        request,
        lambda: list(fuzzed.quota.WatchUsageEvents(request, timeout=CALL_TIMEOUT)),
        expected,
    )
    if got.code is OK:
        sequences = [r.event.sequence for r in got.response]
        assert sequences == sorted(set(sequences)) and all(s > after_sequence for s in sequences)
        assert all(r.event.tenant_id == tenant_id for r in got.response) or not tenant_id


# -- the control plane ----------------------------------------------------------------------------------------------


@FUZZ
@given(tenant_id=ids(ALL_TENANTS), metadata=credentials())
def test_get_plan_answers_every_request_with_a_contract_status(
    fuzzed: Fuzzed, tenant_id: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    """GetPlan (the plan an admin reads before an upgrade, SG-4, AC-10): the admin credential first
    (UNAUTHENTICATED / PERMISSION_DENIED), then a bad tenant id is INVALID_ARGUMENT, a tenant with no plan
    NOT_FOUND."""
    request = pb.GetPlanRequest(tenant_id=tenant_id)
    bad = {"tenant_id"} if id_bad(tenant_id) else set()
    exchange(
        fuzzed,
        "GetPlan",
        request,
        lambda: fuzzed.admin.GetPlan(request, metadata=metadata, timeout=CALL_TIMEOUT),
        authorized(metadata, judged(fuzzed, tenant_id, bad)),
    )


@FUZZ
@given(tenant_id=ids(ALL_TENANTS), contact_id=ids(CONTACTS), metadata=credentials())
def test_get_contact_answers_every_request_with_a_contract_status(
    fuzzed: Fuzzed, tenant_id: str, contact_id: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    """GetContact (MK-5): bad ids are INVALID_ARGUMENT naming the field; a contact the tenant never had is NOT_FOUND;
    a found contact is the one asked for."""
    request = pb.GetContactRequest(tenant_id=tenant_id, contact_id=contact_id)
    bad = {name for name, wrong in (("tenant_id", id_bad(tenant_id)), ("contact_id", id_bad(contact_id))) if wrong}
    got = exchange(
        fuzzed,
        "GetContact",
        request,
        lambda: fuzzed.admin.GetContact(request, metadata=metadata, timeout=CALL_TIMEOUT),
        authorized(metadata, judged(fuzzed, tenant_id, bad, found=frozenset({OK, NOT_FOUND}))),
    )
    if got.code is OK:
        assert (got.response.contact.tenant_id, got.response.contact.contact_id) == (tenant_id, contact_id)


@FUZZ
@given(
    tenant_id=ids(ALL_TENANTS),
    cycle_start=timestamps(),
    page_size=st.one_of(
        st.sampled_from([0, 1, -1, INT32_MAX, INT32_MIN, 1_000, 1_001]), st.integers(INT32_MIN, INT32_MAX)
    ),
    page_token=page_tokens(),
    given_token=st.one_of(st.none(), st.none(), st.sampled_from([0, 1])),
    metadata=credentials(),
)
@example(OVERAGE, None, 0, token_of(10**30, "c0"), None, GOOD_AUTH)
@example(OVERAGE, None, 0, b64(b'{"c": 1e999, "a": "c0"}'), None, GOOD_AUTH)
@example(OVERAGE, None, 0, token_of(5, "\ud800"), None, GOOD_AUTH)
@example(OVERAGE, None, 0, b64(b"[" * 100_000), None, GOOD_AUTH)
@example(OVERAGE, Timestamp(seconds=MIN_S), 0, "", None, GOOD_AUTH)
@example(OVERAGE, None, INT32_MAX, "", 0, GOOD_AUTH)
def test_list_active_contacts_answers_every_request_with_a_contract_status(
    fuzzed: Fuzzed,
    tenant_id: str,
    cycle_start: Timestamp | None,
    page_size: int,
    page_token: str,
    given_token: int | None,
    metadata: tuple[tuple[str, str], ...],
) -> None:
    """ListActiveContacts (SG-1, CR-2: the contacts behind an invoice line): a negative page_size, an invalid
    cycle_start or a page_token the sidecar did not give is INVALID_ARGUMENT naming the field; an answered page is
    no longer than page_size, whatever its size up to int32's limit. `given_token` picks a token the sidecar gave
    instead of page_token. (Under HELD_CONTACTS a token of another cycle is refused naming page_token: see
    test_a_page_token_of_another_cycle_is_refused_naming_page_token.)"""
    if given_token is not None:
        page_token = fuzzed.tokens[given_token]
    request = pb.ListActiveContactsRequest(
        tenant_id=tenant_id, page_size=page_size, page_token=page_token, **present(cycle_start=cycle_start)
    )
    bad = {
        name
        for name, wrong in (
            ("tenant_id", id_bad(tenant_id)),
            ("page_size", page_size < 0),
            ("cycle_start", timestamp_bad(cycle_start)),
        )
        if wrong
    }
    maybe: set[str] = set()
    if page_token and (page_token not in fuzzed.tokens or cycle_start is not None):
        maybe.add("page_token")
    held = fuzzed.meterings.get(tenant_id) == pb.METERING_HELD_CONTACTS
    if held and page_token and cycle_start is None:
        maybe.add("page_token")
    if at_the_edge(cycle_start) or (held and cycle_start is not None):
        maybe.add("cycle_start")
    got = exchange(
        fuzzed,
        "ListActiveContacts",
        request,
        lambda: fuzzed.admin.ListActiveContacts(request, metadata=metadata, timeout=CALL_TIMEOUT),
        authorized(metadata, judged(fuzzed, tenant_id, bad, maybe=maybe)),
    )
    if got.code is OK and page_size > 0:
        assert len(got.response.contacts) <= page_size


@FUZZ
@given(tenant_id=ids(ALL_TENANTS), cycle_start=timestamps(), metadata=credentials())
@example(GRACE, Timestamp(seconds=MIN_S), GOOD_AUTH)
@example(GRACE, Timestamp(seconds=MAX_S), GOOD_AUTH)
def test_get_invoice_answers_every_request_with_a_contract_status(
    fuzzed: Fuzzed, tenant_id: str, cycle_start: Timestamp | None, metadata: tuple[tuple[str, str], ...]
) -> None:
    """GetInvoice (CR-6, CR-7): an invalid cycle_start is INVALID_ARGUMENT naming it; an answered invoice is for the
    cycle containing the instant asked for and every amount is an exact decimal."""
    request = pb.GetInvoiceRequest(tenant_id=tenant_id, **present(cycle_start=cycle_start))
    bad = {
        name for name, wrong in (("tenant_id", id_bad(tenant_id)), ("cycle_start", timestamp_bad(cycle_start))) if wrong
    }
    expected = judged(fuzzed, tenant_id, bad, maybe={"cycle_start"} if at_the_edge(cycle_start) else None)
    got = exchange(
        fuzzed,
        "GetInvoice",
        request,
        lambda: fuzzed.admin.GetInvoice(request, metadata=metadata, timeout=CALL_TIMEOUT),
        authorized(metadata, expected),
    )
    if got.code is OK:
        usage = got.response.usage
        at = NOW_US if cycle_start is None else instant_us(cycle_start)
        assert instant_us(usage.cycle_start) <= at < instant_us(usage.cycle_end)
        for line in got.response.lines:
            assert Decimal(line.unit_price).is_finite() and Decimal(line.amount).is_finite()


def test_a_page_token_of_another_cycle_is_refused_naming_page_token(fuzzed: Fuzzed) -> None:
    """api.md "Errors" (a message naming the field): held contacts are listed as they are now (AC-10), so a
    page_token from another cycle, given without a cycle_start, is INVALID_ARGUMENT naming page_token, the field
    the caller got wrong, not cycle_start, which the caller did not set."""
    request = pb.ListActiveContactsRequest(tenant_id=HELD, page_token=token_of(5, "c0"))
    expected = Expected(frozenset({INVALID}), frozenset({"page_token"}))
    call = lambda: fuzzed.admin.ListActiveContacts(request, metadata=GOOD_AUTH, timeout=CALL_TIMEOUT)  # noqa: E731
    exchange(fuzzed, "ListActiveContacts", request, call, expected)


# -- raw wire bytes -------------------------------------------------------------------------------------------------

RAW_RPCS: dict[str, tuple[str, type[pb_message.Message], bool, bool]] = {
    "CheckSend": ("QuotaService", pb.CheckSendRequest, False, False),
    "CheckSendBatch": ("QuotaService", pb.CheckSendBatchRequest, False, False),
    "CheckContactAdd": ("QuotaService", pb.CheckContactAddRequest, False, False),
    "CheckEnroll": ("QuotaService", pb.CheckEnrollRequest, False, False),
    "RecordActivity": ("QuotaService", pb.RecordActivityRequest, False, False),
    "GetUsage": ("QuotaService", pb.GetUsageRequest, False, False),
    "WatchUsageEvents": ("QuotaService", pb.WatchUsageEventsRequest, False, True),
    "PutPlan": ("QuotaAdminService", pb.PutPlanRequest, True, False),
    "GetPlan": ("QuotaAdminService", pb.GetPlanRequest, True, False),
    "GetContact": ("QuotaAdminService", pb.GetContactRequest, True, False),
    "ListActiveContacts": ("QuotaAdminService", pb.ListActiveContactsRequest, True, False),
    "GetInvoice": ("QuotaAdminService", pb.GetInvoiceRequest, True, False),
}
VALID_REQUESTS: dict[str, pb_message.Message] = {
    "CheckSend": pb.CheckSendRequest(tenant_id=OVERAGE, contact_id="c0", channel=1, kind=1, dry_run=True),
    "CheckSendBatch": pb.CheckSendBatchRequest(tenant_id=HARD, contact_ids=["c0", "c1"], channel=1, kind=1),
    "CheckContactAdd": pb.CheckContactAddRequest(tenant_id=HELD, source=1, contact_ids=["c0"], dry_run=True),
    "CheckEnroll": pb.CheckEnrollRequest(tenant_id=HELD, contact_id="c0", automation_id="a"),
    "RecordActivity": pb.RecordActivityRequest(tenant_id=OVERAGE, kind=4, contact_ids=["c1"]),
    "GetUsage": pb.GetUsageRequest(tenant_id=GRACE),
    "WatchUsageEvents": pb.WatchUsageEventsRequest(tenant_id=HARD, backlog_only=True),
    "PutPlan": pb.PutPlanRequest(tenant_id="p-raw", plan=pb.Plan(preset="contact-limit", contact_limit=5)),
    "GetPlan": pb.GetPlanRequest(tenant_id=HARD),
    "GetContact": pb.GetContactRequest(tenant_id=HELD, contact_id="c0"),
    "ListActiveContacts": pb.ListActiveContactsRequest(tenant_id=OVERAGE, page_size=2),
    "GetInvoice": pb.GetInvoiceRequest(tenant_id=MARKETING),
}
INVALID_UTF8 = [b"\x80", b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"c0\xe2\x82"]
BACKLOG_ONLY = b"\x18\x01"


def with_bad_tenant(raw: bytes, bad: bytes) -> bytes:
    """The message with its tenant_id (field 1 of every request) set to bytes that are not UTF-8."""
    return raw + b"\x0a" + bytes([len(bad)]) + bad


def send_raw(f: Fuzzed, rpc: str, raw: bytes) -> Callable[[], Any]:
    service, _, admin, streaming = RAW_RPCS[rpc]
    method = f"/quota.v1.{service}/{rpc}"
    metadata = GOOD_AUTH if admin else ()
    if streaming:
        stream = f.channel.unary_stream(method)
        return lambda: list(stream(raw, metadata=metadata, timeout=CALL_TIMEOUT))
    unary = f.channel.unary_unary(method)
    return lambda: unary(raw, metadata=metadata, timeout=CALL_TIMEOUT)


@st.composite
def wire_messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """An RPC and bytes for it: a valid request with a string that is not UTF-8, with bytes inserted, replaced or cut
    (which may still parse, unknown fields and all), or any bytes. A WatchUsageEvents request that parses asks for
    the backlog only, so that its stream ends."""
    rpc = draw(st.sampled_from(sorted(RAW_RPCS)))
    valid = VALID_REQUESTS[rpc].SerializeToString()
    at = draw(st.integers(0, len(valid)))
    raw = draw(
        st.one_of(
            st.sampled_from(INVALID_UTF8).map(lambda bad: with_bad_tenant(valid, bad)),
            st.tuples(st.binary(max_size=8), st.integers(0, 4)).map(lambda t: valid[:at] + t[0] + valid[at + t[1] :]),
            st.binary(max_size=64),
        )
    )
    if RAW_RPCS[rpc][3]:
        raw += BACKLOG_ONLY
        assume(not parses(pb.WatchUsageEventsRequest, raw) or pb.WatchUsageEventsRequest.FromString(raw).backlog_only)
    return rpc, raw


def parses(message_type: type[pb_message.Message], raw: bytes) -> bool:
    try:
        message_type.FromString(raw)
    except pb_message.DecodeError:
        return False
    return True


def test_invalid_utf8_in_a_string_field_is_invalid_argument_for_every_rpc(fuzzed: Fuzzed) -> None:
    """api.md "Errors": a request whose tenant_id is not UTF-8 (a hand-made message; proto3 strings must be UTF-8)
    is bad input: INVALID_ARGUMENT for every RPC, and nothing is counted (SG-8)."""
    codes = {}
    for rpc in RAW_RPCS:
        raw = with_bad_tenant(VALID_REQUESTS[rpc].SerializeToString(), b"\xff\xfe")
        before = fuzzed.version()
        codes[rpc] = answer(send_raw(fuzzed, rpc, raw)).code.name
        assert fuzzed.version() == before, rpc
    assert codes == dict.fromkeys(RAW_RPCS, "INVALID_ARGUMENT")


@FUZZ
@given(message=wire_messages())
def test_raw_wire_bytes_are_answered_with_a_contract_status(fuzzed: Fuzzed, message: tuple[str, bytes]) -> None:
    """api.md "Errors" for bytes off the wire: those that do not parse as the request are bad input
    (INVALID_ARGUMENT); those that parse, unknown fields included, get a contract status; neither is ever INTERNAL,
    and a refused call counts nothing (SG-8)."""
    rpc, raw = message
    message_type = RAW_RPCS[rpc][1]
    if parses(message_type, raw):
        expected = Expected(frozenset(ANSWERS - {UNAUTHENTICATED, PERMISSION_DENIED}), None)
    else:
        expected = Expected(frozenset({INVALID}), frozenset())
    remember = None
    if rpc == "PutPlan":
        tenant_id = pb.PutPlanRequest.FromString(raw).tenant_id if parses(message_type, raw) else ""
        remember = lambda response: fuzzed.meterings.__setitem__(  # noqa: E731
            tenant_id, pb.PutPlanResponse.FromString(response).plan.metering
        )
    exchange(fuzzed, f"raw {rpc}", raw, send_raw(fuzzed, rpc, raw), expected, message_type.DESCRIPTOR, remember)


# -- the ledger check and the message size limit --------------------------------------------------------------------


def test_ledger_version_moves_with_every_commit_and_only_then(fuzzed: Fuzzed) -> None:
    """The fuzz tests' "nothing counted" check can fail: data_version moves when a CheckSend counts a new contact
    (SG-6, SG-8) and when PutPlan stores a plan, and stays put for a dry run, a read, and a refused call."""
    version = fuzzed.version()
    fuzzed.quota.CheckSend(
        pb.CheckSendRequest(tenant_id=OVERAGE, contact_id="version-probe", channel=1, kind=1, dry_run=True), timeout=10
    )
    fuzzed.quota.GetUsage(pb.GetUsageRequest(tenant_id=OVERAGE), timeout=10)
    assert answer(lambda: fuzzed.quota.CheckSend(pb.CheckSendRequest(tenant_id=OVERAGE), timeout=10)).code is INVALID
    assert fuzzed.version() == version
    sent = fuzzed.quota.CheckSend(
        pb.CheckSendRequest(tenant_id=OVERAGE, contact_id="version-probe", channel=1, kind=1), timeout=10
    )
    assert sent.newly_active
    counted = fuzzed.version()
    assert counted != version
    fuzzed.admin.PutPlan(
        pb.PutPlanRequest(tenant_id="p-version", plan=pb.Plan(preset="contact-limit", contact_limit=3)),
        metadata=GOOD_AUTH,
        timeout=10,
    )
    fuzzed.meterings["p-version"] = pb.METERING_HELD_CONTACTS
    assert fuzzed.version() != counted


def test_requests_over_max_message_bytes_are_resource_exhausted_and_count_nothing(tmp_path: Path) -> None:
    """A sidecar started with max_message_bytes 64 KiB refuses a bigger CheckSendBatch, RecordActivity or PutPlan
    with RESOURCE_EXHAUSTED; nothing is counted (SG-8: the contacts stay new) and it keeps answering calls."""
    path = tmp_path / "ledger.db"
    running = start_sidecar(path, FakeClock(START), max_message_bytes=64 * 1024, reminder_interval=3_600)
    observer = observe(path)
    try:
        running.put_plan(OVERAGE, **BASE_PLANS[OVERAGE])
        quota, admin = running.quota(), running.admin()
        many = [f"contact-{i:05d}-{'x' * 40}" for i in range(2_000)]
        big_plan = pb.Plan(preset="contact-limit", contact_limit=5, notify_thresholds=[0.5] * 10_000)
        calls: dict[str, Callable[[], Any]] = {
            "CheckSendBatch": lambda: quota.CheckSendBatch(
                pb.CheckSendBatchRequest(tenant_id=OVERAGE, channel=1, kind=1, contact_ids=many), timeout=30
            ),
            "RecordActivity": lambda: quota.RecordActivity(
                pb.RecordActivityRequest(tenant_id=OVERAGE, kind=pb.ACTIVITY_KIND_NOTE_ADDED, contact_ids=many),
                timeout=30,
            ),
            "PutPlan": lambda: admin.PutPlan(
                pb.PutPlanRequest(tenant_id="p-big", plan=big_plan), metadata=running.auth, timeout=30
            ),
        }
        before = ledger_version(observer)
        codes = {rpc: answer(call).code for rpc, call in calls.items()}
        assert codes == dict.fromkeys(calls, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert ledger_version(observer) == before
        sent = quota.CheckSend(
            pb.CheckSendRequest(tenant_id=OVERAGE, contact_id=many[0], channel=1, kind=1), timeout=10
        )
        assert (sent.decision, sent.reason, sent.newly_active) == (
            pb.DECISION_ALLOW,
            pb.REASON_NEW_CONTACT_COUNTED,
            True,
        )
        assert sent.usage.active_contacts == 1
        missing = answer(lambda: admin.GetPlan(pb.GetPlanRequest(tenant_id="p-big"), metadata=running.auth, timeout=10))
        assert missing.code is NOT_FOUND
    finally:
        running.stop()
        observer.close()
