"""Answers kept for retries of a request_id, in the compact form the ledger stores.

A retry must get the first answer, so every answer given under a request_id is
kept for the request retention. Kept whole, an answer cost its message (500
bytes for a CheckSend, 400 KiB for a 10,000-contact batch). Kept here is only
what the retry does not carry itself, as unsigned varints: each decision as
small numbers, a batch as its few distinct decisions and one index into them per
contact in request order (the contact ids come with the retry, whose fingerprint
matched), and of the usage the figures that change from call to call. The rest
of a usage (tenant, cycle, limits, currency, plan name) is a `UsageContext` the
ledger stores once and shares between answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal

from ..domain.model import (
    ActivityOutcome,
    BatchOutcome,
    ContactAddOutcome,
    Decision,
    Reason,
    SendDecision,
    SendOutcome,
    Usage,
    UsageContext,
    UsageState,
    money,
)

NO_MONEY = money(Decimal(0))


def usage_ratio(count: int, limit: int) -> float:
    """The metered count as a share of the limit (0 without one)."""
    return count / limit if limit else 0.0


def overage_contacts(peak: int, limit: int) -> int:
    """What overage is billed on: the cycle's peak beyond the limit."""
    return max(0, peak - limit)


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

    def int(self) -> int:
        value = shift = 0
        while True:
            byte = self.data[self.at]
            self.at += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    def ints(self, n: int) -> list[int]:
        return [self.int() for _ in range(n)]

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
    distinct = [_decision_from(r) for _ in range(r.int())]
    results = [(contact_id, distinct[r.int()]) for contact_id in contact_ids]
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
