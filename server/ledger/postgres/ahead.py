"""What a unit fetched ahead of its reads (`LedgerTx.read_ahead`), within its transaction.

The statements that fetch it follow the tenant's lock in the same pipeline: under READ
COMMITTED each statement takes its snapshot when it starts, so they run once the lock is
granted and see every commit of the tenant before it; while the unit holds the tenant, no
other transaction changes those rows. So an answer fetched ahead stays the store's answer
until the unit itself writes what it shows, when it is dropped (`forget`) or kept as
written (`put_notice`). Nothing here outlives the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from ...domain.model import Counters, NoticeState, StoredPlan, StoredResult, UsageFigure
from .. import ReadAhead
from .rows import COUNTERS, FOUND_BY_KEY, NOTICES, PLAN, RESULT, Reader, counters_of, notices_of, plan_of, result_of

# What a `Fetched` read answers when it was not fetched ahead: the reader asks the store.
UNKNOWN: Any = object()


class Fetching:
    """The statements of one tenant's read-ahead, queued in the pipeline after its lock."""

    def __init__(self, conn: psycopg.Connection, tenant_id: str, ahead: ReadAhead) -> None:
        self.tenant_id = tenant_id
        self.ahead = ahead
        self.plan = conn.execute(PLAN, (tenant_id,))
        self.notices = conn.execute(NOTICES, (tenant_id,))
        cycle = ahead.cycle_start_us
        self.counters = conn.execute(COUNTERS, (tenant_id, cycle)) if cycle is not None else None
        self.asked = list(dict.fromkeys(ahead.contact_ids)) if cycle is not None else []
        self.active = (
            conn.execute(FOUND_BY_KEY.format(column="c"), (self.asked, tenant_id, cycle)) if self.asked else None
        )
        self.result = conn.execute(RESULT, (tenant_id, *ahead.result)) if ahead.result is not None else None

    def into(self, known: Fetched) -> None:
        """Keeps the answers, once the pipeline has brought them."""
        t, cycle = self.tenant_id, self.ahead.cycle_start_us
        known.put(("plan", t), plan_of(self.plan.fetchone()))
        known.put(("notices", t), notices_of(self.notices.fetchall()))
        if self.counters is not None:
            known.put(("counters", t, cycle), counters_of(self.counters.fetchone()))
        if self.active is not None:
            known.put(("active", t, cycle), (frozenset(self.asked), {r[0] for r in self.active.fetchall()}))
        if self.result is not None and self.ahead.result is not None:
            known.put(("result", t, *self.ahead.result), result_of(t, self.result.fetchone()))


class Fetched:
    """The answers fetched ahead, by the read they answer (its kind, the tenant, its keys)."""

    def __init__(self) -> None:
        self._known: dict[tuple[Any, ...], Any] = {}

    def put(self, key: tuple[Any, ...], value: object) -> None:
        self._known[key] = value

    def forget(self, tenant_id: str | None, *kinds: str) -> None:
        """Drops the answers of these kinds (of every tenant when `tenant_id` is None)."""
        for key in [k for k in self._known if k[0] in kinds and (tenant_id is None or k[1] == tenant_id)]:
            del self._known[key]

    def plan(self, tenant_id: str) -> StoredPlan | None:
        return self._known.get(("plan", tenant_id), UNKNOWN)  # type: ignore[no-any-return]

    def counters(self, tenant_id: str, cycle_start_us: int) -> Counters:
        return self._known.get(("counters", tenant_id, cycle_start_us), UNKNOWN)  # type: ignore[no-any-return]

    def stored_result(self, tenant_id: str, rpc: str, request_id: str) -> StoredResult | None:
        return self._known.get(("result", tenant_id, rpc, request_id), UNKNOWN)  # type: ignore[no-any-return]

    def active_among(self, tenant_id: str, cycle_start_us: int, contact_ids: list[str]) -> set[str]:
        """Which of the contacts are active, when each was asked ahead."""
        known = self._known.get(("active", tenant_id, cycle_start_us))
        if known is None or not known[0].issuperset(contact_ids):
            return UNKNOWN  # type: ignore[no-any-return]
        return {c for c in contact_ids if c in known[1]}

    def notice(self, tenant_id: str, figure: int) -> NoticeState | None:
        states: dict[int, NoticeState] | None = self._known.get(("notices", tenant_id))
        if states is None:
            return UNKNOWN  # type: ignore[no-any-return]
        return states.get(figure)

    def put_notice(self, tenant_id: str, figure: int, state: NoticeState) -> None:
        """The notice state the unit wrote is the one the store now holds."""
        states = self._known.get(("notices", tenant_id))
        if states is not None:
            states[figure] = state


class ReaderAhead(Reader):
    """A unit's reads: those fetched ahead answered from `fetched`, the others from the store."""

    fetched: Fetched

    def plan(self, tenant_id: str) -> StoredPlan | None:
        self._enter(tenant_id)
        known = self.fetched.plan(tenant_id)
        return super().plan(tenant_id) if known is UNKNOWN else known

    def counters(self, tenant_id: str, cycle_start_us: int) -> Counters:
        self._enter(tenant_id)
        known = self.fetched.counters(tenant_id, cycle_start_us)
        return super().counters(tenant_id, cycle_start_us) if known is UNKNOWN else known

    def active_among(self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> set[str]:
        self._enter(tenant_id)
        known = self.fetched.active_among(tenant_id, cycle_start_us, list(contact_ids))
        return super().active_among(tenant_id, cycle_start_us, contact_ids) if known is UNKNOWN else known

    def stored_result(self, tenant_id: str, rpc: str, request_id: str) -> StoredResult | None:
        self._enter(tenant_id)
        known = self.fetched.stored_result(tenant_id, rpc, request_id)
        return super().stored_result(tenant_id, rpc, request_id) if known is UNKNOWN else known

    def notice(self, tenant_id: str, figure: UsageFigure) -> NoticeState | None:
        self._enter(tenant_id)
        known = self.fetched.notice(tenant_id, figure.value)
        return super().notice(tenant_id, figure) if known is UNKNOWN else known
