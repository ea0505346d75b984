"""The reads of the PostgreSQL ledger: the SQL of `LedgerReader`, over one connection
inside a transaction the ledger opened (a unit's, or a read's snapshot).

A reader keeps nothing between calls: other sidecars write the same rows."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
import psycopg.errors

from ...domain.model import (
    Activation,
    ContactRecord,
    Counters,
    HeldSpan,
    Holdings,
    NoticeState,
    Reanchor,
    StoredPlan,
    StoredResult,
    Usage,
    UsageContext,
    UsageEvent,
    UsageEventType,
    UsageFigure,
)
from .. import Lease

# The database's clock in microseconds: what leases are timed by, so that sidecars whose
# clocks differ agree on when one expires.
NOW_US = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"


def stored_id(request_id: str) -> str:
    """A request_id as the text columns keep it. A call's later units keep their answers
    under the request_id, a NUL and the unit's index (engine/replies.py); PostgreSQL text
    holds no NUL, so it is written `\\0`, and a backslash `\\\\`: every id stays distinct."""
    return request_id.replace("\\", "\\\\").replace("\x00", "\\0")


CONTEXT_COLUMNS = "cycle_start_us, cycle_end_us, contact_limit, sends_limit, currency, plan_name"
CONTACT_COLUMNS = (
    "contact_id, held, marketing, marketing_until_next_update, marketing_source_type,"
    " marketing_source_id, marketing_until_us, held_since_us"
)

OPEN_STATES = (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR)

# The activations of a set of contacts (the array parameter), each found by its own probe
# of the primary key: a plan that stays right whatever the planner thinks of the table. A
# join or `contact_id = ANY(...)` was planned (as a prepared statement, on a table not yet
# analyzed) as a scan of the whole cycle, and a batch of 500 took 200 ms at 20,000 rows.
# `column`: `c` for the contact ids, `ctid` for the rows, which the unit may update at once
# (it holds the tenant: no other transaction moves them).
FOUND_BY_KEY = (
    "SELECT {column} FROM unnest(%s::text[]) c, LATERAL (SELECT ctid FROM activations"
    " WHERE tenant_id = %s AND cycle_start_us = %s AND contact_id = c LIMIT 1) a"
)


PLAN = "SELECT plan_json, updated_at_us FROM plans WHERE tenant_id = %s"
COUNTERS = (
    "SELECT active_contacts, sends, held_end, held_peak, marketing_end, marketing_peak FROM usage"
    " WHERE tenant_id = %s AND cycle_start_us = %s"
)
RESULT = (
    f"SELECT fingerprint, reply, {CONTEXT_COLUMNS} FROM request_results"
    " WHERE tenant_id = %s AND rpc = %s AND request_id = %s"
)


def _contact(row: tuple[Any, ...]) -> ContactRecord:
    return ContactRecord(*row)


def plan_of(row: tuple[Any, ...] | None) -> StoredPlan | None:
    return StoredPlan(row[0], row[1]) if row else None


def counters_of(row: tuple[Any, ...] | None) -> Counters:
    return Counters(*row) if row else Counters()


def result_of(tenant_id: str, row: tuple[Any, ...] | None) -> StoredResult | None:
    if row is None:
        return None
    return StoredResult(bytes(row[0]), bytes(row[1]), UsageContext(tenant_id, *row[2:]))


def notices_of(rows: Iterable[tuple[Any, ...]]) -> dict[int, NoticeState]:
    """The tenant's notice states by figure, from rows of (figure, level, cycle start, last instant)."""
    return {r[0]: NoticeState(r[1], r[2], r[3]) for r in rows}


class Reader:
    """Reads over one connection inside a transaction someone else opened."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def _enter(self, tenant_id: str) -> None:
        """Called before anything is read or written of the tenant; a reader needs nothing."""

    def _run(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self.conn.execute(sql, args)

    def _one(self, sql: str, args: Sequence[Any]) -> tuple[Any, ...] | None:
        return self._run(sql, args).fetchone()

    def plan(self, tenant_id: str) -> StoredPlan | None:
        self._enter(tenant_id)
        return plan_of(self._one(PLAN, (tenant_id,)))

    def plan_at(self, tenant_id: str, before_us: int) -> StoredPlan | None:
        self._enter(tenant_id)
        row = self._one(
            "SELECT plan_json, effective_us FROM plan_versions WHERE tenant_id = %s AND effective_us < %s"
            " ORDER BY effective_us DESC LIMIT 1",
            (tenant_id, before_us),
        )
        return StoredPlan(row[0], row[1]) if row else None

    def reanchors_around(self, tenant_id: str, instant_us: int) -> tuple[int | None, Reanchor | None]:
        self._enter(tenant_id)
        row = self._one(
            "SELECT (SELECT MAX(at_us) FROM reanchors WHERE tenant_id = %s AND at_us <= %s), n.at_us,"
            " n.anchor_before_us FROM (SELECT 1) o LEFT JOIN LATERAL (SELECT at_us, anchor_before_us FROM reanchors"
            " WHERE tenant_id = %s AND at_us > %s ORDER BY at_us LIMIT 1) n ON true",
            (tenant_id, instant_us, tenant_id, instant_us),
        )
        assert row is not None
        return row[0], Reanchor(row[1], row[2]) if row[1] is not None else None

    def counters(self, tenant_id: str, cycle_start_us: int) -> Counters:
        self._enter(tenant_id)
        return counters_of(self._one(COUNTERS, (tenant_id, cycle_start_us)))

    def holdings(self, tenant_id: str) -> Holdings | None:
        self._enter(tenant_id)
        row = self._one(
            "SELECT cycle_start_us, held, marketing, pending FROM holdings WHERE tenant_id = %s", (tenant_id,)
        )
        return Holdings(*row) if row else None

    def activation(self, tenant_id: str, cycle_start_us: int, contact_id: str) -> Activation | None:
        self._enter(tenant_id)
        row = self._one(
            "SELECT activated_at_us, activity, sends FROM activations"
            " WHERE tenant_id = %s AND cycle_start_us = %s AND contact_id = %s",
            (tenant_id, cycle_start_us, contact_id),
        )
        return Activation(contact_id, row[0], row[1], row[2]) if row else None

    def active_among(self, tenant_id: str, cycle_start_us: int, contact_ids: Sequence[str]) -> set[str]:
        self._enter(tenant_id)
        if not contact_ids:
            return set()
        rows = self._run(FOUND_BY_KEY.format(column="c"), (list(contact_ids), tenant_id, cycle_start_us))
        return {r[0] for r in rows}

    def contact(self, tenant_id: str, contact_id: str) -> ContactRecord | None:
        self._enter(tenant_id)
        row = self._one(
            f"SELECT {CONTACT_COLUMNS} FROM contacts WHERE tenant_id = %s AND contact_id = %s", (tenant_id, contact_id)
        )
        return _contact(row) if row else None

    def active_contacts(
        self, tenant_id: str, cycle_start_us: int, after_contact_id: str, limit: int
    ) -> list[Activation]:
        self._enter(tenant_id)
        rows = self._run(
            "SELECT contact_id, activated_at_us, activity, sends FROM activations"
            " WHERE tenant_id = %s AND cycle_start_us = %s AND contact_id > %s ORDER BY contact_id LIMIT %s",
            (tenant_id, cycle_start_us, after_contact_id, limit),
        )
        return [Activation(*row) for row in rows]

    def counted_contacts(
        self, tenant_id: str, marketing_only: bool, at_us: int, after_contact_id: str, limit: int
    ) -> list[ContactRecord]:
        self._enter(tenant_id)
        marketing = " AND marketing AND (marketing_until_us = 0 OR marketing_until_us > %s)" if marketing_only else ""
        args: tuple[Any, ...] = (tenant_id, after_contact_id) + ((at_us,) if marketing_only else ()) + (limit,)
        rows = self._run(
            f"SELECT {CONTACT_COLUMNS} FROM contacts WHERE tenant_id = %s AND held AND contact_id > %s{marketing}"
            " ORDER BY contact_id LIMIT %s",
            args,
        )
        return [_contact(r) for r in rows]

    def held_spans(
        self,
        tenant_id: str,
        marketing_only: bool,
        start_us: int,
        end_us: int,
        after: tuple[str, int],
        limit: int,
        contact_id: str | None = None,
    ) -> list[HeldSpan]:
        """An open marketing span whose MK-6 switch is due ends at the switch instant,
        though the switch itself is written by the tenant's next change. A span that starts
        in the cycle is in it even when it ended at once: the peak counted it."""
        self._enter(tenant_id)
        one = " AND s.contact_id = %s" if contact_id is not None else ""
        rows = self._run(
            "SELECT contact_id, from_us, until FROM (SELECT h.contact_id, h.from_us, COALESCE(h.to_us,"
            " CASE WHEN h.marketing AND c.marketing_until_us > 0 THEN c.marketing_until_us END) AS until"
            " FROM held_spans h JOIN contacts c ON c.tenant_id = h.tenant_id AND c.contact_id = h.contact_id"
            " WHERE h.tenant_id = %s AND h.marketing = %s AND (h.contact_id, h.from_us) > (%s, %s)"
            " AND h.from_us < %s) s"
            f" WHERE (s.from_us >= %s OR s.until IS NULL OR s.until > %s){one} ORDER BY contact_id, from_us LIMIT %s",
            (tenant_id, marketing_only, after[0], after[1], end_us, start_us, start_us)
            + ((contact_id,) if contact_id is not None else ())
            + (limit,),
        )
        return [HeldSpan(*row) for row in rows]

    def stored_result(self, tenant_id: str, rpc: str, request_id: str) -> StoredResult | None:
        self._enter(tenant_id)
        return result_of(tenant_id, self._one(RESULT, (tenant_id, rpc, stored_id(request_id))))

    def tenants(self) -> list[str]:
        return [r[0] for r in self._run("SELECT tenant_id FROM plans ORDER BY tenant_id")]

    def file_entry(self, tenant_id: str) -> str | None:
        self._enter(tenant_id)
        row = self._one("SELECT digest FROM tenant_file_entries WHERE tenant_id = %s", (tenant_id,))
        return row[0] if row else None

    def notice(self, tenant_id: str, figure: UsageFigure) -> NoticeState | None:
        self._enter(tenant_id)
        row = self._one(
            "SELECT level, cycle_start_us, last_at_us FROM notices WHERE tenant_id = %s AND figure = %s",
            (tenant_id, figure.value),
        )
        return NoticeState(*row) if row else None

    def raised_notices(self) -> list[tuple[str, UsageFigure, NoticeState]]:
        rows = self._run(
            "SELECT tenant_id, figure, level, cycle_start_us, last_at_us FROM notices WHERE level > 0"
            " ORDER BY tenant_id, figure"
        )
        return [(r[0], UsageFigure(r[1]), NoticeState(r[2], r[3], r[4])) for r in rows]

    def events_after(self, after_seq: int, tenant_id: str, limit: int) -> list[UsageEvent]:
        where = " AND tenant_id = %s" if tenant_id else ""
        args: tuple[Any, ...] = (after_seq, tenant_id, limit) if tenant_id else (after_seq, limit)
        rows = self._run(
            "SELECT seq, event_id, type, figure, tenant_id, threshold, at_us, usage_json FROM usage_events"
            f" WHERE seq > %s{where} ORDER BY seq LIMIT %s",
            args,
        )
        return [
            UsageEvent(
                r[1], UsageEventType(r[2]), UsageFigure(r[3]), r[4], r[5], r[6], Usage.from_dict(json.loads(r[7])), r[0]
            )
            for r in rows
        ]

    def event_cursor(self, consumer: str) -> int:
        row = self._one("SELECT seq FROM event_cursors WHERE consumer = %s", (consumer,))
        return row[0] if row else 0

    def pending_events(self, after_seq: int) -> tuple[int, int | None]:
        row = self._one("SELECT COUNT(*), MIN(at_us) FROM usage_events WHERE seq > %s", (after_seq,))
        assert row is not None
        return row[0], row[1]

    def last_event_seq(self) -> int:
        """The sequence of the last event committed: the counter moves only with commits."""
        row = self._one("SELECT last FROM event_sequence WHERE id = 1", ())
        assert row is not None
        return int(row[0])

    def lease(self, name: str) -> Lease | None:
        row = self._one(f"SELECT holder, expires_us, {NOW_US} FROM leases WHERE name = %s", (name,))
        return Lease(row[0], row[1], row[2]) if row else None
