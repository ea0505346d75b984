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
from .rows import CONTEXT_COLUMNS, FOUND_BY_KEY, Reader, counters_of, notices_of, plan_of, result_of, stored_id

# What a `Fetched` read answers when it was not fetched ahead: the reader asks the store.
UNKNOWN: Any = object()


# Everything a unit may read ahead of one tenant, in one statement (a statement costs the
# sidecar's Python more than its round trip), each part by the tenant's key and absent
# (NULL) when not asked for. Parameters: the tenant; the tenant and the cycle; the
# contacts, the tenant and the cycle (their activations, as FOUND_BY_KEY finds them);
# the tenant; the tenant, the rpc and the request_id of the stored result.
AHEAD = (
    "SELECT p.plan_json, p.updated_at_us, u.active_contacts, u.sends, u.held_end, u.held_peak,"
    " u.marketing_end, u.marketing_peak, f.active, n.figures, n.levels, n.starts, n.lasts,"
    f" r.fingerprint, r.reply, {', '.join('r.' + c.strip() for c in CONTEXT_COLUMNS.split(','))}"
    " FROM (SELECT 1) o LEFT JOIN plans p ON p.tenant_id = %s"
    " LEFT JOIN usage u ON u.tenant_id = %s AND u.cycle_start_us = %s"
    f" LEFT JOIN LATERAL (SELECT array_agg(c) AS active FROM ({FOUND_BY_KEY.format(column='c')}) k) f ON true"
    " LEFT JOIN LATERAL (SELECT array_agg(figure) AS figures, array_agg(level) AS levels,"
    " array_agg(cycle_start_us) AS starts, array_agg(last_at_us) AS lasts FROM notices WHERE tenant_id = %s) n ON true"
    " LEFT JOIN request_results r ON r.tenant_id = %s AND r.rpc = %s AND r.request_id = %s"
)


class Fetching:
    """One tenant's read-ahead, its statement queued in the pipeline after the tenant's lock."""

    def __init__(self, conn: psycopg.Connection, tenant_id: str, ahead: ReadAhead) -> None:
        self.tenant_id = tenant_id
        self.ahead = ahead
        cycle = ahead.cycle_start_us
        self.asked = list(dict.fromkeys(ahead.contact_ids)) if cycle is not None else []
        rpc, request_id = ahead.result if ahead.result is not None else (None, None)
        kept_as = stored_id(request_id) if request_id is not None else None
        self.fetching = conn.execute(
            AHEAD, (tenant_id, tenant_id, cycle, self.asked, tenant_id, cycle, tenant_id, tenant_id, rpc, kept_as)
        )

    def into(self, known: Fetched) -> None:
        """Keeps the answers asked for, once the pipeline has brought them."""
        t, cycle, ahead = self.tenant_id, self.ahead.cycle_start_us, self.ahead
        row = self.fetching.fetchone()
        assert row is not None
        known.put(("plan", t), plan_of(row[0:2] if row[0] is not None else None))
        known.put(("notices", t), notices_of(zip(*row[9:13], strict=True) if row[9] is not None else ()))
        if cycle is not None:
            known.put(("counters", t, cycle), counters_of(row[2:8] if row[2] is not None else None))
            known.put(("active", t, cycle), (frozenset(self.asked), set(row[8] or ())))
        if ahead.result is not None:
            known.put(("result", t, *ahead.result), result_of(t, row[13:] if row[13] is not None else None))


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
