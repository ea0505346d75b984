"""Answers kept for retries of a request_id: the one mechanism that answers a retry
with the first answer (`once`), and the compact form the ledger stores it in.

A retry must get the first answer, so every answer given under a request_id is
kept for the request retention. Kept whole, an answer cost its message (500
bytes for a CheckSend, 400 KiB for a 10,000-contact batch). Kept here is only
what the retry does not carry itself, as unsigned varints: each decision as
small numbers, a batch as its few distinct decisions and one index into them per
contact in request order (the contact ids come with the retry, whose fingerprint
matched), and of the usage the figures that change from call to call. The rest
of a usage (tenant, cycle, limits, currency, plan name) is a `UsageContext` the
ledger stores once and shares between answers. Each RPC that keeps answers has a
`Codec`: its name, how its answer is packed and read back, and how an answer kept
before the packed form (as JSON) is read until it is pruned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..domain.errors import InvalidArgument
from ..domain.figures import NO_MONEY, overage_contacts, usage_ratio
from ..domain.model import (
    ActivityOutcome,
    BatchOutcome,
    ContactAddOutcome,
    Decision,
    Reason,
    SendDecision,
    SendOutcome,
    StoredResult,
    Usage,
    UsageContext,
    UsageState,
)
from ..ledger import LedgerTx

# Bytes of the request's hash kept with its answer: a retry with the same id must match them.
FINGERPRINT_BYTES = 8
A = TypeVar("A")


def pack(values: Iterable[int], text: str = "") -> bytes:
    """Unsigned LEB128 varints, then `text` as UTF-8."""
    out = bytearray()
    for value in values:
        while value > 0x7F:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + text.encode()


class Unpacker:
    """Reads back what `pack` wrote, in order."""

    __slots__ = ("data", "at")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.data[self.at]
            self.at += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    def ints(self, n: int) -> list[int]:
        return [self.varint() for _ in range(n)]

    def text(self) -> str:
        return self.data[self.at :].decode()


def context_of(usage: Usage) -> UsageContext:
    return UsageContext(
        usage.tenant_id,
        usage.cycle_start_us,
        usage.cycle_end_us,
        usage.contact_limit,
        usage.sends_limit,
        usage.currency,
        usage.plan_name,
    )


def _figures(usage: Usage) -> list[int]:
    return [usage.active_contacts, usage.peak_contacts, usage.sends, usage.state.value]


def _amount(usage: Usage) -> str:
    return "" if usage.overage_amount == NO_MONEY else usage.overage_amount


def _usage(c: UsageContext, r: Unpacker) -> Usage:
    count, peak, sends, state = r.ints(4)
    return Usage(
        tenant_id=c.tenant_id,
        cycle_start_us=c.cycle_start_us,
        cycle_end_us=c.cycle_end_us,
        active_contacts=count,
        contact_limit=c.contact_limit,
        usage_ratio=usage_ratio(count, c.contact_limit),
        sends=sends,
        sends_limit=c.sends_limit,
        state=UsageState(state),
        overage_contacts=overage_contacts(peak, c.contact_limit),
        overage_amount=r.text() or NO_MONEY,
        currency=c.currency,
        plan_name=c.plan_name,
        peak_contacts=peak,
    )


def _decision(d: SendDecision) -> list[int]:
    return [d.decision.value, d.reason.value, int(d.newly_active), d.retry_after_us]


def _decision_from(r: Unpacker) -> SendDecision:
    decision, reason, newly, retry = r.ints(4)
    return SendDecision(Decision(decision), Reason(reason), bool(newly), retry)


def pack_send(o: SendOutcome) -> tuple[bytes, UsageContext]:
    return pack([*_decision(o.decision), *_figures(o.usage)], _amount(o.usage)), context_of(o.usage)


def unpack_send(data: bytes, c: UsageContext) -> SendOutcome:
    r = Unpacker(data)
    decision = _decision_from(r)
    return SendOutcome(decision, _usage(c, r))


def batch_outcome(results: Sequence[tuple[str, SendDecision]], usage: Usage) -> BatchOutcome:
    allowed = sum(1 for _, d in results if d.decision is Decision.ALLOW)
    return BatchOutcome(
        results=tuple(results),
        allowed=allowed,
        denied=len(results) - allowed,
        newly_active=sum(1 for _, d in results if d.newly_active),
        usage=usage,
    )


def pack_batch(o: BatchOutcome) -> tuple[bytes, UsageContext]:
    distinct: dict[SendDecision, int] = {}
    indexes = [distinct.setdefault(d, len(distinct)) for _, d in o.results]
    values = [len(distinct)]
    for d in distinct:
        values += _decision(d)
    return pack([*values, *indexes, *_figures(o.usage)], _amount(o.usage)), context_of(o.usage)


def unpack_batch(contact_ids: Sequence[str], data: bytes, c: UsageContext) -> BatchOutcome:
    """A batch's answer, given the retry's contact ids."""
    r = Unpacker(data)
    distinct = [_decision_from(r) for _ in range(r.varint())]
    results = [(contact_id, distinct[r.varint()]) for contact_id in contact_ids]
    return batch_outcome(results, _usage(c, r))


def pack_contact_add(o: ContactAddOutcome) -> tuple[bytes, UsageContext]:
    values = [o.decision.value, o.reason.value, o.added, *_figures(o.usage)]
    return pack(values, _amount(o.usage)), context_of(o.usage)


def unpack_contact_add(data: bytes, c: UsageContext) -> ContactAddOutcome:
    r = Unpacker(data)
    decision, reason, added = r.ints(3)
    return ContactAddOutcome(Decision(decision), Reason(reason), added, _usage(c, r))


def pack_activity(o: ActivityOutcome) -> tuple[bytes, UsageContext]:
    return pack([o.recorded, o.newly_active, *_figures(o.usage)], _amount(o.usage)), context_of(o.usage)


def unpack_activity(data: bytes, c: UsageContext) -> ActivityOutcome:
    r = Unpacker(data)
    recorded, newly = r.ints(2)
    return ActivityOutcome(recorded, newly, _usage(c, r))


def _legacy_decision(raw: list[Any]) -> SendDecision:
    """A decision kept as JSON: [decision, reason, newly_active, retry_after_us]."""
    return SendDecision(Decision(raw[0]), Reason(raw[1]), raw[2], raw[3])


@dataclass(frozen=True, slots=True)
class Codec(Generic[A]):
    """How one RPC's answers are kept: `pack` for the ledger, `unpack` to read them
    back, `legacy` to read one kept before the packed form (from its JSON)."""

    rpc: str
    pack: Callable[[A], tuple[bytes, UsageContext]]
    unpack: Callable[[bytes, UsageContext], A]
    legacy: Callable[[Any], A]


SEND: Codec[SendOutcome] = Codec(
    "CheckSend",
    pack_send,
    unpack_send,
    lambda raw: SendOutcome(_legacy_decision(raw["d"]), Usage.from_dict(raw["u"])),
)
CONTACT_ADD: Codec[ContactAddOutcome] = Codec(
    "CheckContactAdd",
    pack_contact_add,
    unpack_contact_add,
    lambda raw: ContactAddOutcome(Decision(raw["d"]), Reason(raw["r"]), raw["a"], Usage.from_dict(raw["u"])),
)
ACTIVITY: Codec[ActivityOutcome] = Codec(
    "RecordActivity",
    pack_activity,
    unpack_activity,
    lambda raw: ActivityOutcome(raw["r"], raw["n"], Usage.from_dict(raw["u"])),
)


def batch(contact_ids: Sequence[str]) -> Codec[BatchOutcome]:
    """The codec of a CheckSendBatch answer, read back against the retry's contact ids."""
    return Codec(
        "CheckSendBatch",
        pack_batch,
        lambda data, c: unpack_batch(contact_ids, data, c),
        lambda raw: BatchOutcome(
            tuple((r[0], _legacy_decision(r[1:])) for r in raw["r"]),
            raw["a"],
            raw["d"],
            raw["n"],
            Usage.from_dict(raw["u"]),
        ),
    )


def fingerprint(*parts: object) -> bytes:
    """A hash of what a request asks, kept (its first bytes) with the answer."""
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()


def unit_request_id(request_id: str, index: int) -> str:
    """The key a call's unit stores its answer under: the request_id itself for the first
    (so reusing it for another request is refused at once), then with the unit's index
    after a NUL, which no caller's id contains."""
    return f"{request_id}\x00{index}" if request_id and index else request_id


def once(
    tx: LedgerTx,
    tenant_id: str,
    codec: Codec[A],
    request_id: str,
    fingerprint: Callable[[], bytes],
    decide: Callable[[], A],
    now_us: Callable[[], int],
) -> A:
    """Runs `decide` once per request_id, in the deciding transaction: a retry returns the
    first answer, counting nothing; a request_id reused for a different request (its
    fingerprint differs) is refused. The fingerprint is only computed when there is a
    request_id. A call committed in units runs this once per unit, under `unit_request_id`."""
    if request_id:
        stored = tx.stored_result(tenant_id, codec.rpc, request_id)
        if stored is not None:
            if stored.fingerprint != fingerprint()[: len(stored.fingerprint)]:
                raise InvalidArgument("request_id", f"was already used for a different {codec.rpc} request")
            if stored.context is None:
                return codec.legacy(json.loads(stored.legacy_json))
            return codec.unpack(stored.packed, stored.context)
    outcome = decide()
    if request_id:
        packed, context = codec.pack(outcome)
        result = StoredResult(fingerprint()[:FINGERPRINT_BYTES], packed, context)
        tx.store_result(tenant_id, codec.rpc, request_id, result, now_us())
    return outcome
